"""`prunecert attack`: search a region for inputs where the pruned model deviates most from the original.

Exit status: 0 done (without --tolerance) or a saved counterexample reproduced (--replay); with
--tolerance, 1 if the value found exceeds it (violated: a counterexample), 2 if not (unknown: an
attack cannot prove the bound); --replay exits 1 if the saved value does not reproduce. 3 is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prunecert.cli import app
from prunecert.cli.options import AttackMethod, Centers, Eps, InputDomain, Norm, Original, Pruned, RegionName, Seed, Vnnlib
from prunecert.cli.options import Scheduler, Threads, Workers, cli_regions
from prunecert.errors import ConfigError, PrunecertError

EXAMPLE = ("prunecert attack lenet.pt lenet-pruned.pt --center mnist5k:test:0 --eps 0.02 "
           "--objective max-logit-deviation --method auto --budget-seconds 10 --out cex/")


@app.command("attack", epilog=f"Example: {EXAMPLE}   Replay: prunecert attack --replay cex/x.npz lenet.pt "
                              f"lenet-pruned.pt")
def attack_command(
    original: Original,
    pruned: Pruned,
    center: Centers = None,
    eps: Eps = None,
    norm: Norm = "inf",
    region: RegionName = None,
    vnnlib: Vnnlib = None,
    objective: str = typer.Option("max-logit-deviation", help="max-logit-deviation, disagreement, evasive[:c] "
                                  "or layer:L:neuron:K[:min]."),
    method: AttackMethod = "auto",
    budget_seconds: float = typer.Option(10.0, "--budget-seconds", help="Time budget per region (seconds)."),
    seed: Seed = 0,
    restarts: Optional[int] = typer.Option(None, help="Restarts per sub-objective (gradient methods) or LP walks."),
    lowest_margin: Optional[int] = typer.Option(None, "--lowest-margin", help="Attack only the K regions whose "
                                                "centres have the smallest margin of PRUNED for ORIGINAL's class "
                                                "(where disagreements cluster), smallest first."),
    tolerance: Optional[float] = typer.Option(None, help="Exit 1 if the value found exceeds this, else 2."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for x.npz, PNGs and result.json."),
    replay_path: Optional[Path] = typer.Option(None, "--replay", help="Re-evaluate a saved x.npz instead."),
    input_domain: InputDomain = None,
    workers: Workers = None,
    scheduler: Scheduler = None,
    threads: Threads = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Find inputs in a region maximising how far PRUNED deviates from ORIGINAL; save counterexamples.

    Objectives: max |f - g| over the logits, one neuron of any layer (Delta_L[K], or -Delta with :min),
    top-1 disagreement (g's best wrong margin against f's class at the centre), or DIVA's evasive
    objective softmax(f)_y - c softmax(g)_y. Every reported value is a float64 re-evaluation at x.

    Example: prunecert attack lenet.pt lenet-pruned.pt --center mnist5k:test:0 --eps 0.02 --out cex/
    """
    try:
        if replay_path is not None:
            code = _replay(replay_path, original, pruned, input_domain)
        else:
            code = _run(original, pruned, center or [], eps, norm, region, vnnlib, objective, method,
                        budget_seconds, seed, restarts, tolerance, out, quiet, lowest_margin, input_domain, workers,
                        scheduler, threads)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))
        return
    raise typer.Exit(code)


def _run(original, pruned, centers, eps, norm, region, vnnlib, objective, method, budget, seed, restarts,
         tolerance, out, quiet, lowest_margin=None, input_domain=None, workers=1, scheduler=None, threads=None) -> int:
    from prunecert.adversarial import parse_objective
    from prunecert.adversarial.api import attack_stream
    from prunecert.core.completion import make_pair
    from prunecert.fileutil import check_output_dir
    from prunecert.io import load_model, parse_input_domain, weights_sha256

    parse_objective(objective)  # a malformed spec fails before any model is loaded
    if out is not None:
        check_output_dir(out, "--out")
    if eps is not None and centers and not eps > 0:
        raise ConfigError(f"--eps must be > 0 for an attack (a region of zero volume has nothing to search), "
                          f"got {eps}")
    if lowest_margin is not None and lowest_margin < 1:
        raise ConfigError(f"--lowest-margin must be >= 1 (the number of regions to keep), got {lowest_margin}")
    domain = parse_input_domain(input_domain)
    net_f, net_g = load_model(original, input_domain=domain), load_model(pruned, input_domain=domain)
    pair = make_pair(net_f, net_g)
    regions = cli_regions(pair, centers, eps, norm, region, vnnlib)
    if lowest_margin is not None:
        from prunecert.adversarial.centres import lowest_margin as pick
        regions = pick(pair, regions, lowest_margin)
    hashes = (weights_sha256(net_f), weights_sha256(net_g))
    extra = {"models": {"original": {"path": str(original), "sha256": hashes[0]},
                        "pruned": {"path": str(pruned), "sha256": hashes[1]}}}
    saver = _Saver(pair, regions, out, hashes, extra) if out is not None else None
    rows = []  # light per-region summaries: the points themselves are saved (or dropped) as they come
    for first, part in attack_stream(pair, None, regions, objective, method, budget, seed, restarts,
                                     progress=not quiet, workers=workers, scheduler=scheduler, threads=threads):
        for i, res in enumerate(part, start=first):
            if saver is not None:
                saver.add(i, res)
            res.x = res.center = None
            rows.append(res)
    if saver is not None:
        saver.finish()
    _print(rows, out)
    if tolerance is None:
        return 0
    return 1 if max(r.value for r in rows) > tolerance else 2


class _Saver:
    """Counterexamples saved as the chunks come: one region in `out` itself; several in out/region<i>/
    and, written last (atomically), a summary result.json naming the best. A region folder without a
    result.json beside it is what an interrupted run leaves."""

    def __init__(self, pair, regions, out: Path, hashes, extra):
        self.pair, self.regions, self.out, self.hashes, self.extra = pair, regions, Path(out), hashes, extra
        self.docs: list[dict] = []

    def add(self, i: int, res) -> None:
        from prunecert.adversarial import save_counterexample

        if len(self.regions) == 1:
            save_counterexample(res, self.pair, self.regions[0], self.out, self.hashes, self.extra)
            return
        doc = save_counterexample(res, self.pair, self.regions[i], self.out / f"region{i}", self.hashes, self.extra)
        self.docs.append({**doc, "x_path": f"region{i}/x.npz"})

    def finish(self) -> None:
        from prunecert.fileutil import atomic_write_text

        if not self.docs:
            return
        docs = self.docs
        best = max(range(len(docs)), key=lambda i: docs[i]["value"])
        summary = {**{k: docs[best][k] for k in ("schema", "objective", "method", "value", "x_path", "trace",
                                                 "seconds", "seed", "models")},
                   "best_region": best, "regions": docs}
        atomic_write_text(self.out / "result.json", json.dumps(summary, indent=1) + "\n")


def _print(results, out) -> None:
    from rich.console import Console
    from rich.table import Table

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


def _replay(path: Path, original: Path, pruned: Path, input_domain: str | None = None) -> int:
    from prunecert.adversarial import replay
    from prunecert.io import load_model, parse_input_domain

    domain = parse_input_domain(input_domain)
    r = replay(path, load_model(original, input_domain=domain), load_model(pruned, input_domain=domain))
    typer.echo(f"{r.path}: {r.objective} = {r.value!r} (saved {r.saved_value!r}); argmax f = {r.class_f}, "
               f"argmax g = {r.class_g}; inside region: {'yes' if r.inside else 'NO'}; "
               f"models match the saved hashes: {'yes' if r.models_match else 'NO'}")
    typer.echo("reproduced" if r.reproduced else "NOT reproduced")
    return 0 if r.reproduced else 1
