"""The versioned JSON Schema of report.json, and validation against it.

A report is validated before it is written (a renderer bug cannot produce an invalid report.json)
and when it is read back for re-rendering (report files are user input).
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from prunecert.errors import PrunecertError


class ReportError(PrunecertError):
    """A report document does not follow audit.schema.json, or a report file cannot be read."""


@functools.lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """audit.schema.json, shipped with the package."""
    text = resources.files("prunecert.reports").joinpath("audit.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate(doc: dict[str, Any], source: str = "report") -> None:
    """Raise ReportError naming the first offending path if `doc` does not follow the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ReportError(f"{source}: invalid audit report at {where}: {err.message[:200]}{more}")


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a report.json."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: report file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a readable JSON report ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    validate(doc, str(path))
    return doc
