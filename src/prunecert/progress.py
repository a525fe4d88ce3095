"""The one progress channel every stage reports through (stderr only; stdout carries results).

    with progress_task("certify (diff-linear)", total=len(regions), enabled=not quiet) as task:
        for part in chunks:
            ...
            task.advance(len(part))
    stage_line("audit [2/3] measure on test data done in 1.20 s", enabled)

On a terminal a task is a live rich bar; off a terminal (CI, nohup, a pipeline, stderr redirected to a
file) every `advance` prints one line: done/total, elapsed, ETA. `enabled=False` (`-q`) prints nothing.
A rich bar is silent off a TTY, which is why the line mode exists (a 12-minute audit printed nothing).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich itself is imported only when a bar is drawn (a terminal on stderr)
    from rich.progress import Progress, TaskID


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def stage_line(message: str, enabled: bool = True) -> None:
    """One line on stderr (a stage started or finished), in both modes."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


class Task:
    """A counted piece of work (regions, objectives); see `progress_task`."""

    def __init__(self, name: str, total: int, unit: str, enabled: bool, bar: Progress | None = None,
                 bar_task: TaskID | None = None):
        self.name, self.total, self.unit, self.enabled = name, int(total), unit, enabled
        self.done = 0
        self.start = time.perf_counter()
        self._bar, self._bar_task = bar, bar_task

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """`n` more done; `note` (e.g. "loss 0.0312") is shown beside the count."""
        self.done += int(n)
        if not self.enabled:
            return
        if self._bar is not None and self._bar_task is not None:
            self._bar.update(self._bar_task, advance=n,
                             description=self.name + (f" ({note})" if note else ""))
            return
        print(self.line(note), file=sys.stderr, flush=True)

    def line(self, note: str | None = None) -> str:
        """`name: done/total unit, elapsed m:ss, ETA m:ss[, note]` (the off-terminal log line)."""
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = _clock(eta) if self.done else "?"
        return (f"{self.name}: {self.done}/{self.total} {self.unit}, elapsed {_clock(elapsed)}, "
                f"ETA {eta_text}" + (f", {note}" if note else ""))


@contextlib.contextmanager
def progress_task(name: str, total: int, enabled: bool = True, unit: str = "regions") -> Iterator[Task]:
    """A task on the progress channel: a bar on a terminal, a line per `advance` otherwise."""
    if not enabled or not _stderr_is_terminal():
        yield Task(name, total, unit, enabled)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        yield Task(name, total, unit, True, bar, bar.add_task(name, total=total))
