"""cli.command: a command's options are one frozen dataclass whose fields are its command line;
`checked()` runs before the body, and errors become one line with exit status 3."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from prunecert.cli import ERROR_EXIT, app
from prunecert.cli.attack import AttackOptions
from prunecert.cli.audit import AuditOptions
from prunecert.cli.certify import CertifyOptions
from prunecert.cli.command import Options, command
from prunecert.cli.merge import MergeOptions
from prunecert.cli.models import InfoOptions, TrainOptions
from prunecert.cli.prune import PruneOptions
from prunecert.errors import ConfigError, DataError

OPTIONS: dict[str, type[Options]] = {"train": TrainOptions, "info": InfoOptions, "prune": PruneOptions,
                                     "certify": CertifyOptions, "attack": AttackOptions, "audit": AuditOptions,
                                     "merge": MergeOptions}


def test_every_command_line_is_its_options_fields_in_order():
    commands = typer.main.get_command(app).commands  # a click Group: the prunecert commands
    assert list(commands) == list(OPTIONS)  # also the workflow order of --help
    for name, options in OPTIONS.items():
        assert [p.name for p in commands[name].params] == [f.name for f in dataclasses.fields(options)], name
        assert options.__dataclass_params__.frozen


def test_options_are_frozen_and_keyword_only(tmp_path):
    o = CertifyOptions(original=tmp_path / "f.pt", pruned=tmp_path / "g.pt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.samples = 2
    with pytest.raises(TypeError):
        CertifyOptions(tmp_path / "f.pt", tmp_path / "g.pt")  # keyword-only: no positional mix-ups
    assert o.checked() is o and o.samples == 256 and o.method == "diff-linear"


@dataclass(frozen=True, kw_only=True)
class HelloOptions(Options):
    name: Annotated[str, typer.Argument(help="Who.")]
    times: Annotated[int, typer.Option(help="How often (the exit status).")] = 1

    def checked(self) -> HelloOptions:
        if self.times < 1:
            raise ConfigError(f"--times must be >= 1, got {self.times}")
        return self


def _hello_app(calls: list[HelloOptions]) -> typer.Typer:
    hello_app = typer.Typer()

    @hello_app.callback()
    def main() -> None:
        """Two levels, like prunecert."""

    @command("hello", HelloOptions, typer_app=hello_app)
    def hello(o: HelloOptions) -> int:
        """Say hello."""
        calls.append(o)
        if o.name == "nobody":
            raise DataError("nobody\nis there")
        typer.echo(f"hello {o.name}")
        return o.times - 1

    return hello_app


def test_checked_runs_first_and_errors_are_one_line_with_status_3():
    calls: list[HelloOptions] = []
    hello_app = _hello_app(calls)
    runner = CliRunner()
    ok = runner.invoke(hello_app, ["hello", "world", "--times", "3"])
    assert (ok.exit_code, ok.stdout) == (2, "hello world\n") and calls == [HelloOptions(name="world", times=3)]
    bad = runner.invoke(hello_app, ["hello", "world", "--times", "0"])
    assert bad.exit_code == ERROR_EXIT and bad.stderr == "error: --times must be >= 1, got 0\n"
    assert len(calls) == 1  # the body never ran
    failed = runner.invoke(hello_app, ["hello", "nobody"])
    assert failed.exit_code == ERROR_EXIT and failed.stderr == "error: nobody is there\n"
    helped = runner.invoke(hello_app, ["hello", "--help"])
    assert "Say hello." in helped.stdout and "How often (the exit status)." in helped.stdout
