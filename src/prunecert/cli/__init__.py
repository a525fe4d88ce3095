"""The `prunecert` command line: one typer app; each job registers its command from its own module.

Expected failures (`PrunecertError`) become a one-line message on stderr and exit status 3, so the
statuses 0/1/2 stay free for verdicts (certified / violated / unknown).
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:  # mypy reads the installed typer, which vendors click (typer >= 0.20)
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
else:
    try:  # typer >= 0.20 vendors click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - older typer on top of click
        from click.exceptions import NoArgsIsHelpError, UsageError

from prunecert.errors import PrunecertError
from prunecert.scale import keep_freed_memory
from prunecert.solvers import silence_highs_banner

ERROR_EXIT = 3

app = typer.Typer(
    name="prunecert",
    help="Prune ReLU networks with data-independent coresets, certify and attack the deviation, write audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit with ERROR_EXIT."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(ERROR_EXIT)


def run(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default sys.argv[1:]) and return the exit status.

    Usage errors (a misspelt option, a bad value, a missing argument) and PrunecertError become one
    line on stderr and status 3; 1 and 2 are verdicts, never "click did not understand". Warnings
    (numpy, torch) raised on the way to an error are dropped, so the error line stands alone; after a
    successful run they are shown as usual.
    """
    silence_highs_banner()  # keep stdout clean (--json-only output must stay parseable)
    with warnings.catch_warnings(record=True) as caught:
        code = _invoke(argv)
    if code != ERROR_EXIT:
        for w in caught:  # as Python would have printed them (formatwarning), on stderr
            sys.stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return code


def _invoke(argv: list[str] | None) -> int:
    try:
        result = app(args=argv, prog_name="prunecert", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # bare `prunecert` or `prunecert CMD`: the help
        typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return 0
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "prunecert"
        message = " ".join(exc.format_message().split())
        typer.echo(f"error: {message} (see '{where} --help')", err=True)
        return ERROR_EXIT
    except PrunecertError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        return ERROR_EXIT
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def one_line(exc: BaseException | str) -> str:
    """An error message squeezed onto one line (messages may quote multi-line file content)."""
    text = " ".join(str(exc).split())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a non-UTF-8 path must not crash the print


def main() -> None:
    """Console entry point (`prunecert`): see `run`. Sets the process's allocator up first
    (`scale.keep_freed_memory`)."""
    keep_freed_memory()
    sys.exit(run())


# each module declares its commands on `app` above (prunecert.cli.command); imported last, for that side
# effect, because they use `app` and `fail`; the order is the workflow order of --help
from prunecert.cli import models, prune, certify, attack, audit, merge  # noqa: E402,F401
