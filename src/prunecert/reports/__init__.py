"""Audit reports: the data model, its JSON Schema, and the HTML / Markdown renderers.

    Audit                       the data model (`model.py`); `to_json()` is report.json
    write_report(audit, dir)    report.json + report.html + report.md, atomically as a set
    render_html / render_markdown, load_schema / validate / read_report
"""

from prunecert.reports.model import SCHEMA, Audit
from prunecert.reports.render_md import render_markdown
from prunecert.reports.schema import ReportError, load_schema, read_report, validate
from prunecert.reports.write import check_writable, render_all, write_report


def render_html(audit: Audit) -> str:
    """report.html as a string (see `prunecert.reports.html`)."""
    # imported here: the HTML renderer loads matplotlib and jinja2, 1.7-1.8 s (python -X importtime,
    # load 8) that JSON/Markdown-only callers and `prunecert.reports` itself should not pay.
    # (The module is html.py: a submodule named render_html, once imported, replaced this function
    # as the package's attribute `render_html`.)
    from prunecert.reports.html import render_html as _render
    return _render(audit)


__all__ = ["SCHEMA", "Audit", "ReportError", "load_schema", "read_report", "validate", "check_writable",
           "render_all", "write_report", "render_html", "render_markdown"]
