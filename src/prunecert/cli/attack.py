"""`prunecert attack`: search a region for inputs where the pruned model deviates most from the original.

Exit status: 0 done (without --tolerance) or a saved counterexample reproduced (--replay); with
--tolerance, 1 if the value found exceeds it (violated: a counterexample), 2 if not (unknown: an
attack cannot prove the bound); --replay exits 1 if the saved value does not reproduce. 3 is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from prunecert.adversarial import parse_objective, replay, save_counterexample
from prunecert.adversarial.api import attack_stream
from prunecert.adversarial.centres import lowest_margin
from prunecert.adversarial.result import AttackResult
from prunecert.cli.command import Options, command
from prunecert.cli.options import AttackMethod, Centers, Eps, InputDomain, Norm, Original, Pruned, RegionName, Seed, Vnnlib
from prunecert.cli.options import Scheduler, Threads, Workers, cli_regions
from prunecert.core.completion import make_pair
from prunecert.core.pair import Pair
from prunecert.core.regions import Region
from prunecert.errors import ConfigError
from prunecert.fileutil import atomic_write_text, check_output_dir
from prunecert.io import load_model, parse_input_domain, weights_sha256
from prunecert.stage_budgets import ATTACK_SECONDS

EXAMPLE = ("prunecert attack lenet.pt lenet-pruned.pt --center mnist5k:test:0 --eps 0.02 "
           "--objective max-logit-deviation --method auto --budget-seconds 10 --out cex/")
NO_POINT = np.empty(0)  # what the printed rows keep of a point: the points are saved (or dropped) as they come


@dataclass(frozen=True, kw_only=True)
class AttackOptions(Options):
    """`prunecert attack`'s command line (the fields, in --help order)."""

    original: Original
    pruned: Pruned
    center: Centers = None
    eps: Eps = None
    norm: Norm = "inf"
    region: RegionName = None
    vnnlib: Vnnlib = None
    objective: Annotated[str, typer.Option(
        help="max-logit-deviation, disagreement, evasive[:c] or layer:L:neuron:K[:min].")] = "max-logit-deviation"
    method: AttackMethod = "auto"
    budget_seconds: Annotated[float, typer.Option(
        "--budget-seconds", help="Time budget per region (seconds).")] = ATTACK_SECONDS
    seed: Seed = 0
    restarts: Annotated[Optional[int], typer.Option(
        help="Restarts per sub-objective (gradient methods) or LP walks.")] = None
    lowest_margin: Annotated[Optional[int], typer.Option(
        "--lowest-margin", help="Attack only the K regions whose centres have the smallest margin of PRUNED for "
                                "ORIGINAL's class (where disagreements cluster), smallest first.")] = None
    tolerance: Annotated[Optional[float], typer.Option(help="Exit 1 if the value found exceeds this, else 2.")] = None
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for x.npz, PNGs and result.json.")] = None
    replay_path: Annotated[Optional[Path], typer.Option(
        "--replay", help="Re-evaluate a saved x.npz instead.")] = None
    input_domain: InputDomain = None
    workers: Workers = None
    scheduler: Scheduler = None
    threads: Threads = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False

    def checked(self) -> AttackOptions:
        if self.replay_path is not None:  # a replay reads the models and the saved point only
            return self
        parse_objective(self.objective)  # a malformed spec fails before any model is loaded
        if self.out is not None:
            check_output_dir(self.out, "--out")
        if self.eps is not None and self.center and not self.eps > 0:
            raise ConfigError(f"--eps must be > 0 for an attack (a region of zero volume has nothing to search), "
                              f"got {self.eps}")
        if self.lowest_margin is not None and self.lowest_margin < 1:
            raise ConfigError(f"--lowest-margin must be >= 1 (the number of regions to keep), got "
                              f"{self.lowest_margin}")
        return self


@command("attack", AttackOptions, epilog=f"Example: {EXAMPLE}   Replay: prunecert attack --replay cex/x.npz "
                                         f"lenet.pt lenet-pruned.pt")
def attack_command(o: AttackOptions) -> int:
    """Find inputs in a region maximising how far PRUNED deviates from ORIGINAL; save counterexamples.

    Objectives: max |f - g| over the logits, one neuron of any layer (Delta_L[K], or -Delta with :min),
    top-1 disagreement (g's best wrong margin against f's class at the centre), or DIVA's evasive
    objective softmax(f)_y - c softmax(g)_y. Every reported value is a float64 re-evaluation at x.

    Example: prunecert attack lenet.pt lenet-pruned.pt --center mnist5k:test:0 --eps 0.02 --out cex/
    """
    if o.replay_path is not None:
        return _replay(o.replay_path, o)
    domain = parse_input_domain(o.input_domain)
    net_f, net_g = load_model(o.original, input_domain=domain), load_model(o.pruned, input_domain=domain)
    pair = make_pair(net_f, net_g)
    regions = cli_regions(pair, o)
    if o.lowest_margin is not None:
        regions = lowest_margin(pair, regions, o.lowest_margin)
    hashes = (weights_sha256(net_f), weights_sha256(net_g))
    extra = {"models": {"original": {"path": str(o.original), "sha256": hashes[0]},
                        "pruned": {"path": str(o.pruned), "sha256": hashes[1]}}}
    saver = _Saver(pair, regions, o.out, hashes, extra) if o.out is not None else None
    rows = []  # light per-region summaries: the points themselves are saved (or dropped) as they come
    for first, part in attack_stream(pair, None, regions, o.objective, o.method, o.budget_seconds, o.seed,
                                     o.restarts, progress=not o.quiet, workers=o.workers, scheduler=o.scheduler,
                                     threads=o.threads):
        for i, res in enumerate(part, start=first):
            if saver is not None:
                saver.add(i, res)
            rows.append(dataclasses.replace(res, x=NO_POINT, center=None))
    if saver is not None:
        saver.finish()
    _print(rows, o.out)
    if o.tolerance is None:
        return 0
    return 1 if max(r.value for r in rows) > o.tolerance else 2


class _Saver:
    """Counterexamples saved as the chunks come: one region in `out` itself; several in out/region<i>/
    and, written last (atomically), a summary result.json naming the best. A region folder without a
    result.json beside it is what an interrupted run leaves."""

    def __init__(self, pair: Pair, regions: Sequence[Region], out: Path, hashes: tuple[str, str],
                 extra: dict[str, Any]) -> None:
        self.pair, self.regions, self.out, self.hashes, self.extra = pair, regions, out, hashes, extra
        self.docs: list[dict[str, Any]] = []

    def add(self, i: int, res: AttackResult) -> None:
        if len(self.regions) == 1:
            save_counterexample(res, self.pair, self.regions[0], self.out, self.hashes, self.extra)
            return
        doc = save_counterexample(res, self.pair, self.regions[i], self.out / f"region{i}", self.hashes, self.extra)
        self.docs.append({**doc, "x_path": f"region{i}/x.npz"})

    def finish(self) -> None:
        if not self.docs:
            return
        docs = self.docs
        best = max(range(len(docs)), key=lambda i: docs[i]["value"])
        summary = {**{k: docs[best][k] for k in ("schema", "objective", "method", "value", "x_path", "trace",
                                                 "seconds", "seed", "models")},
                   "best_region": best, "regions": docs}
        atomic_write_text(self.out / "result.json", json.dumps(summary, indent=1) + "\n")


def _print(results: list[AttackResult], out: Path | None) -> None:
    console = Console()
    table = Table(title=f"attack: {results[0].objective} by {results[0].method}")
    for col in ("region", "value", "sub-objective", "class f", "class g", "max |Delta_logit|", "seconds"):
        table.add_column(col, justify="left" if col in ("region", "sub-objective") else "right")
    for i, r in enumerate(results):
        name = r.region.get("source", r.region.get("kind", str(i)))
        table.add_row(str(name), f"{r.value:.6g}", r.sub_objective, str(r.class_f),
                      str(r.class_g) + (" (disagree)" if r.disagreement else ""), f"{r.logit_deviation:.4g}",
                      f"{r.seconds:.2f}" + (" (budget hit)" if r.truncated else ""))
    console.print(table)
    if out is not None and len(results) == 1:
        console.print(f"saved to {out}/ (x.npz, result.json)", highlight=False)
    elif out is not None:
        console.print(f"saved to {out}/: result.json (the summary) and region0/ .. region{len(results) - 1}/ "
                      "(x.npz, result.json each)", highlight=False)


def _replay(path: Path, o: AttackOptions) -> int:
    domain = parse_input_domain(o.input_domain)
    r = replay(path, load_model(o.original, input_domain=domain), load_model(o.pruned, input_domain=domain))
    typer.echo(f"{r.path}: {r.objective} = {r.value!r} (saved {r.saved_value!r}); argmax f = {r.class_f}, "
               f"argmax g = {r.class_g}; inside region: {'yes' if r.inside else 'NO'}; "
               f"models match the saved hashes: {'yes' if r.models_match else 'NO'}")
    typer.echo("reproduced" if r.reproduced else "NOT reproduced")
    return 0 if r.reproduced else 1
