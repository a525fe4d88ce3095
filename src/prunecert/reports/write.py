"""Writing a report folder: report.json (validated), report.html and report.md, all or nothing.

Everything is rendered in memory first, then written to temporary files beside the targets, and only
when all of them are complete are they renamed into place: an error or a crash while rendering or
writing leaves the previous report untouched (and no temporary files behind).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from prunecert.errors import PrunecertError
from prunecert.fileutil import atomic_path, check_output_dir
from prunecert.reports.model import Audit
from prunecert.reports.render_md import render_markdown
from prunecert.reports.schema import validate

FILES = {"json": "report.json", "html": "report.html", "md": "report.md"}


def check_writable(out_dir: str | os.PathLike[str]) -> Path:
    """Prove `out_dir` is, or can become, a folder we can write into (before any long work starts).

    Nothing is created here: a run that fails on a later check must not leave an empty folder behind.
    """
    return check_output_dir(out_dir, "output folder")


def _file_mode() -> int:
    """0666 minus the process umask: the mode an ordinary open() would give."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def render_all(audit: Audit, formats: tuple[str, ...] = ("json", "html", "md")) -> dict[str, str]:
    """{format: text} for the requested formats; report.json is schema-validated here."""
    unknown = [f for f in formats if f not in FILES]
    if unknown:
        raise PrunecertError(f"unknown report format(s) {unknown}; valid: {', '.join(FILES)}")
    doc = audit.to_json()
    validate(doc, "report.json")
    texts = {"json": json.dumps(doc, indent=1, allow_nan=False) + "\n"}
    if "html" in formats:
        # imported here: matplotlib and jinja2 cost 1.7-1.8 s (python -X importtime, load 8)
        from prunecert.reports.html import render_html
        texts["html"] = render_html(audit)
    if "md" in formats:
        texts["md"] = render_markdown(audit)
    return {f: texts[f] for f in formats}


def write_report(audit: Audit, out_dir: str | os.PathLike[str], formats: tuple[str, ...] = ("json", "html", "md")
                 ) -> list[Path]:
    """Render `audit` and write the requested files into `out_dir` atomically as a set; returns the paths."""
    texts = render_all(audit, formats)
    out = check_writable(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunecertError(f"output folder {out} cannot be created: {exc.strerror or exc}") from exc
    targets = [out / FILES[f] for f in formats]
    mode = _file_mode()
    with contextlib.ExitStack() as stack:
        # every temp file is complete before the first rename; on error each context removes its temp
        for fmt_name, target in zip(formats, targets):
            tmp = stack.enter_context(atomic_path(target))
            os.chmod(tmp, mode)  # temp files are created 0600; a report is an ordinary readable file
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(texts[fmt_name])
                fh.flush()
                os.fsync(fh.fileno())
    return targets
