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
                        budget_seconds, seed, restarts, tolerance, out, quiet, lowest_margin, input_domain)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))
        return
    raise typer.Exit(code)


def _run(original, pruned, centers, eps, norm, region, vnnlib, objective, method, budget, seed, restarts,
         tolerance, out, quiet, lowest_margin=None, input_domain=None) -> int:
    from prunecert.adversarial import attack_many, parse_objective, save_counterexample
    from prunecert.core.completion import make_pair
    from prunecert.core.region_options import regions_from_options
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
    lo, hi = pair.domain()
    regions = regions_from_options(pair.input_shape, lo, hi, centers=centers, eps=eps, norm=norm, region=region,
                                   vnnlib=vnnlib)
    if lowest_margin is not None:
        from prunecert.adversarial.centres import lowest_margin as pick
        regions = pick(pair, regions, lowest_margin)
    results = attack_many(pair, None, regions, objective, method, budget, seed, restarts, progress=not quiet)
    if out is not None:
        hashes = (weights_sha256(net_f), weights_sha256(net_g))
        extra = {"models": {"original": {"path": str(original), "sha256": hashes[0]},
                            "pruned": {"path": str(pruned), "sha256": hashes[1]}}}
        if len(results) == 1:
            save_counterexample(results[0], pair, regions[0], out, hashes, extra)
        else:
            _save_many(results, pair, regions, out, hashes, extra)
    _print(results, out)
    if tolerance is None:
        return 0
    return 1 if max(r.value for r in results) > tolerance else 2


def _save_many(results, pair, regions, out: Path, hashes, extra) -> None:
    """One sub-folder per region, and a summary result.json naming the best one."""
    from prunecert.adversarial import save_counterexample
    from prunecert.fileutil import atomic_write_text

    docs = []
    for i, (res, reg) in enumerate(zip(results, regions)):
        doc = save_counterexample(res, pair, reg, out / f"region{i}", hashes, extra)
        docs.append({**doc, "x_path": f"region{i}/x.npz"})
    best = max(range(len(docs)), key=lambda i: docs[i]["value"])
    summary = {**{k: docs[best][k] for k in ("schema", "objective", "method", "value", "x_path", "trace",
                                             "seconds", "seed", "models")},
               "best_region": best, "regions": docs}
    atomic_write_text(out / "result.json", json.dumps(summary, indent=1) + "\n")


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
