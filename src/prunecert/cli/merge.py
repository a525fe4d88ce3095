"""`prunecert merge`: join the results of shards of one run (certify / attack / audit JSON files).

    prunecert certify ... --center mnist5k:test:0-4999    --json part1.json   (machine A)
    prunecert certify ... --center mnist5k:test:5000-9999 --json part2.json   (machine B)
    prunecert merge part1.json part2.json --out certify.json

Audit shards (`audit --center ...`) merge into a report folder: `prunecert merge a/report.json
b/report.json --out all/`. Files that are not shards of one run (another schema, other model weights,
other settings) are refused with one line and exit status 3; nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, List

import typer

from prunecert.cli.command import Options, command
from prunecert.errors import PrunecertError
from prunecert.fileutil import atomic_write_text
from prunecert.merge import AUDIT, merge_documents, read_document
from prunecert.reports import Audit, check_writable, write_report


@dataclass(frozen=True, kw_only=True)
class MergeOptions(Options):
    """`prunecert merge`'s command line."""

    files: Annotated[List[Path], typer.Argument(
        help="certify --json files, attack result.json files, or audit report.json files of one run, in region "
             "order.")]
    out: Annotated[Path, typer.Option(
        "--out", help="The merged file (certify, attack) or report folder (audit).")]
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False


@command("merge", MergeOptions, epilog="Example: prunecert merge shard1.json shard2.json --out certify.json")
def merge_command(o: MergeOptions) -> int:
    """Merge the results of shards of one run into one, refusing files of different runs (exit 3)."""
    written = _merge(o.files, o.out)
    if not o.quiet:
        typer.echo(f"merged {len(o.files)} files into {written}", err=True)
    return 0


def _merge(files: list[Path], out: Path) -> Path:
    docs = [(str(f), read_document(f)) for f in files]
    is_audit = docs[0][1]["schema"] == AUDIT
    if is_audit:
        check_writable(out)
    elif out.is_dir():
        raise PrunecertError(f"--out {out} is a folder; certify and attack results merge into a file")
    merged = merge_documents(docs, out)
    if is_audit:
        write_report(Audit.from_json(merged), out)
        return out
    atomic_write_text(out, json.dumps(merged, separators=(",", ":")) + "\n")
    return out
