"""How a command is declared: its options are one frozen dataclass, and the command line is made from it.

    @dataclass(frozen=True, kw_only=True)
    class MergeOptions(Options):
        files: Annotated[List[Path], typer.Argument(help="...")]
        out: Annotated[Path, typer.Option("--out", help="...")]
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False

    @command("merge", MergeOptions, epilog="Example: ...")
    def merge_command(o: MergeOptions) -> int:
        \"\"\"The help text.\"\"\"

Each field is a typer argument or option (its `Annotated` metadata: flags and help; its default), in
--help order. `command` gives typer a function whose parameters are those fields; on a call it builds
the dataclass, runs `checked()` (every check of the options that needs no model, before any work or
write: the one place for them), and passes the result to the command's body. So adding an option is
one field (plus its use), and every command turns a `PrunecertError` into one line and exit status 3
the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Callable, Self, TypeVar

import typer

from prunecert.cli import app, fail
from prunecert.errors import PrunecertError


@dataclass(frozen=True, kw_only=True)
class Options:
    """The base of every command's options (its fields are the command line)."""

    def checked(self) -> Self:
        """These options, validated (ConfigError naming the flag), with defaults that depend on other
        options filled in. The default has nothing to check."""
        return self


O = TypeVar("O", bound=Options)


def command(name: str, options: type[O], *, epilog: str | None = None, typer_app: typer.Typer = app
            ) -> Callable[[Callable[[O], int]], Callable[[O], int]]:
    """Register `prunecert NAME` (on `typer_app`, the prunecert app unless given) with the fields of
    `options` as its arguments and options; the decorated body receives the checked options and
    returns the exit status."""
    hints = typing.get_type_hints(options, include_extras=True)  # Annotated metadata carries typer's flags
    if any(f.default_factory is not dataclasses.MISSING for f in dataclasses.fields(options)):
        raise TypeError(f"{options.__name__}: a command line default is a plain value (typer shows it), "
                        "not a default_factory")
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(options)]

    def register(body: Callable[[O], int]) -> Callable[[O], int]:
        def invoke(**values: object) -> None:
            try:
                code = body(options(**values).checked())
            except PrunecertError as exc:
                fail(str(exc))
            if code:
                raise typer.Exit(code)

        # typer reads a command's parameters from inspect.signature (which honours __signature__) and
        # get_type_hints (which reads __annotations__); its help from the docstring
        setattr(invoke, "__signature__", inspect.Signature(params))
        invoke.__annotations__ = {p.name: p.annotation for p in params}
        invoke.__doc__, invoke.__name__ = body.__doc__, body.__name__
        typer_app.command(name, epilog=epilog)(invoke)
        return body

    return register
