"""Audit reports: the data model, its JSON Schema, and the HTML / Markdown renderers.

    Audit                       the data model (`model.py`); `to_json()` is report.json
    write_report(audit, dir)    report.json + report.html + report.md, atomically as a set
    render_html / render_markdown, load_schema / validate / read_report
"""

from prunecert.reports.model import SCHEMA, Audit
from prunecert.reports.schema import ReportError, load_schema, read_report, validate
from prunecert.reports.write import check_writable, render_all, write_report


def render_html(audit: Audit) -> str:
    """report.html as a string (see `prunecert.reports.render_html`)."""
    from prunecert.reports.render_html import render_html as _render
    return _render(audit)


def render_markdown(audit: Audit) -> str:
    """report.md as a string (see `prunecert.reports.render_md`)."""
    from prunecert.reports.render_md import render_markdown as _render
    return _render(audit)


__all__ = ["SCHEMA", "Audit", "ReportError", "load_schema", "read_report", "validate", "check_writable",
           "render_all", "write_report", "render_html", "render_markdown"]
