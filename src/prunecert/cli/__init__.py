"""The `prunecert` command line: one typer app; each job registers its command from its own module.

Expected failures (`PrunecertError`) become a one-line message on stderr and exit status 3, so the
statuses 0/1/2 stay free for verdicts (certified / violated / unknown).
"""

from __future__ import annotations

import importlib
import sys

import typer

from prunecert.errors import PrunecertError

ERROR_EXIT = 3

app = typer.Typer(
    name="prunecert",
    help="Prune ReLU networks with data-independent coresets, certify and attack the deviation, write audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# each module defines its commands with @app.command(); imported for that side effect
for _module in ("models", "prune", "certify", "attack", "audit", "merge"):
    try:
        importlib.import_module(f"prunecert.cli.{_module}")
    except ModuleNotFoundError as exc:  # a job not built yet
        if exc.name != f"prunecert.cli.{_module}":
            raise


def fail(message: str) -> None:
    """Print a one-line error and exit with ERROR_EXIT."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(ERROR_EXIT)


def main() -> None:
    """Console entry point: turn PrunecertError into a one-line message."""
    from prunecert.solvers import silence_highs_banner

    silence_highs_banner()  # keep stdout clean (--json-only output must stay parseable)
    try:
        app()
    except PrunecertError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(ERROR_EXIT)
