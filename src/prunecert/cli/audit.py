"""`prunecert audit`: prune (or take a pruned model), measure, certify, attack, and write one report.

Exit status follows the verdict against --tolerance, so the audit can gate a deployment in CI:
0 certified (every gated layer), 1 violated (a counterexample was found), 2 unknown; 3 is an error.
`--demo` trains (or reuses a cached) LeNet-300-100 on mnist5k, prunes 90 % of its parameters with
coresets, distils the pruned model for 30 epochs (a deployable model, ~91 % accurate) and audits 10
test points x 2 radii plus the whole domain into reports/demo/.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from prunecert.cli import app
from prunecert.cli.options import AttackMethod, CertifyMethod, InputDomain, Scheduler, Seed, Threads, Workers
from prunecert.errors import ConfigError, PrunecertError

DEMO = {"arch": "lenet300", "data": "mnist5k", "epochs": 10, "compression": 0.9, "fine_tune": 30, "points": 10,
        "eps": "0.01,0.02", "tolerance": 1.0, "out": "reports/demo"}
EXAMPLE = ("Examples: prunecert audit --demo   |   prunecert audit lenet.pt lenet-pruned.pt --data mnist5k "
           "--regions 20 --eps 0.01,0.02 --tolerance 2 --out audit/   |   prunecert audit lenet.pt "
           "--method coreset --compression 0.9 --tolerance 2 --out audit/")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def cache_dir() -> Path:
    """$PRUNECERT_CACHE, else ~/.cache/prunecert."""
    env = os.environ.get("PRUNECERT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prunecert"


def _untrained_demo_model(data: str):
    """The demo architecture with random weights (for checking the options before training)."""
    from prunecert.data import load_dataset
    from prunecert.io.torch_io import network_from_module
    from prunecert.train import build_arch

    ds = load_dataset(data)
    return network_from_module(build_arch(DEMO["arch"], ds.input_shape, ds.n_classes), ds.input_shape,
                               name=f"{DEMO['arch']}-{ds.name}")


def demo_model(seed: int, progress: bool, data: str | None = None):
    """The demo's LeNet-300-100 (on mnist5k unless `data`): from the cache when a matching one is there,
    else trained and cached. Returns (network, cache path or None)."""
    from prunecert.errors import ModelFormatError
    from prunecert.io import load_model, save_model
    from prunecert.threads import one_torch_thread
    from prunecert.train import train_model

    data = data or DEMO["data"]
    path = cache_dir() / f"{DEMO['arch']}-{data.replace(':', '_').replace('/', '_')}-e{DEMO['epochs']}-s{seed}.pt"
    from prunecert.data import load_dataset
    want = {"arch": DEMO["arch"], "dataset": load_dataset(data).name, "epochs": DEMO["epochs"], "seed": seed}
    if path.is_file():
        try:
            net = load_model(path)
            training = net.metadata.get("training", {})
            if all(training.get(k) == v for k, v in want.items()):
                if progress:
                    typer.echo(f"demo: using the cached model {path}", err=True)
                return net, _tilde(path)
        except ModelFormatError:
            pass  # a damaged cache entry: train again and replace it
    if progress:
        typer.echo(f"demo: training {DEMO['arch']} on {data} ({DEMO['epochs']} epochs, seed {seed}); "
                   f"cached in {path}", err=True)
    with one_torch_thread():  # small batches: one thread is several times faster on a shared 2-core machine
        net = train_model(DEMO["arch"], data, epochs=DEMO["epochs"], seed=seed, progress=progress,
                          name=f"{DEMO['arch']}-{data}")
    try:
        save_model(net, path)
    except (PrunecertError, OSError) as exc:
        typer.echo(f"demo: could not cache the model ({exc}); continuing", err=True)
        return net, None
    return net, _tilde(path)


def demo_pruned(plan, progress: bool):
    """The demo's pruned (and distilled) model for `plan.prune_options`: from the cache when one was
    made from this very original (weights hash) with these options and seed, else pruned and cached."""
    from prunecert.io import load_model, save_model, weights_sha256
    from prunecert.prune import prune
    from prunecert.threads import one_torch_thread

    options = dict(plan.prune_options)
    key = "-".join(f"{k}{v}" for k, v in sorted(options.items()) if v is not None)
    original_hash = weights_sha256(plan.original)
    path = cache_dir() / f"{DEMO['arch']}-{original_hash[:12]}-{key}-s{plan.seed}.pt"
    if path.is_file():
        try:
            net = load_model(path)
            if net.metadata.get("pruning", {}).get("original_weights_sha256") == original_hash:
                if progress:
                    typer.echo(f"demo: using the cached pruned model {path}", err=True)
                return net, _tilde(path)
        except PrunecertError:
            pass  # a damaged cache entry: prune again and replace it
    if progress:
        typer.echo(f"demo: pruning ({key}); cached in {path}", err=True)
    with one_torch_thread():   # distillation in small batches: 1 thread was ~10x faster on a busy 2-core machine
        net = prune(plan.original, options.pop("method"), seed=plan.seed, progress=progress,
                    data=plan.dataset if options.get("fine_tune") else None, **options)
    try:
        save_model(net, path)
    except (PrunecertError, OSError) as exc:
        typer.echo(f"demo: could not cache the pruned model ({exc}); continuing", err=True)
        return net, None
    return net, _tilde(path)


def _data_free_stage(plan, o: dict, progress: bool) -> None:
    """The demo's second pair: the same coreset pruning without distillation (the paper's data-free
    setting, where the provable epsilon applies), audited over the same regions into OUT/data-free/
    (the command it records reproduces it: --demo --fine-tune 0 --out OUT/data-free)."""
    import dataclasses

    from prunecert.audit import run_audit
    from prunecert.reports import write_report

    o2 = dict(o, fine_tune=0, out=Path(o["out"]) / "data-free")
    plan2 = dataclasses.replace(plan, prune_options={**plan.prune_options, "fine_tune": 0}, pruned=None,
                                extra_timings=[], command=_canonical(o2["original"], o2["pruned"], o2),
                                sources=dict(plan.sources))
    if progress:
        typer.echo("demo: the data-free stage (no distillation) -> " + str(o2["out"]), err=True)
    t0 = time.perf_counter()
    plan2.pruned, plan2.sources["pruned"] = demo_pruned(plan2, progress)
    plan2.extra_timings.append(("demo pruned model (prune, or load the cached one)", time.perf_counter() - t0))
    report, _ = run_audit(plan2)
    write_report(report, o2["out"], ("json", "html", "md"))


def _tilde(path: Path) -> str:
    """`path` with the home folder written as ~ (reports do not need to show the user's home)."""
    try:
        return str(Path("~") / path.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def _redirect_stdout(to: str | None) -> Iterator[None]:
    """Route fd 1 to stderr ("stderr") or /dev/null ("null") while the audit runs: third-party solver
    banners must not reach stdout, which --json-only keeps for the report and --quiet keeps empty."""
    if to is None:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    target = os.open(os.devnull, os.O_WRONLY) if to == "null" else os.dup(2)
    try:
        os.dup2(target, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


def _canonical(original, pruned, o: dict) -> str:
    """The command with every option spelled out: re-running it reproduces the audit."""
    parts = ["prunecert", "audit"]
    if o["demo"]:
        parts.append("--demo")
    else:
        parts += [str(original)] + ([str(pruned)] if pruned else [])
    if not pruned:
        parts += ["--method", o["method"]]
        for k in ("keep", "compression", "epsilon"):
            if o[k] is not None:
                parts += [f"--{k}", str(o[k])]
        parts += ["--delta", str(o["delta"])] + (["--fine-tune", str(o["fine_tune"])]
                                                   if o["fine_tune"] or o["demo"] else [])
    if o.get("input_domain") is not None:
        parts += ["--input-domain", str(o["input_domain"])]
    where = [a for c in o["center"] for a in ("--center", c)] if o["center"] else ["--regions", str(o["regions"])]
    parts += ["--data", o["data"], *where, "--eps", o["eps"],
              "--domain" if o["domain"] else "--no-domain", "--tolerance", str(o["tolerance"])]
    if o["layer_tolerance"]:
        parts += ["--layer-tolerance", o["layer_tolerance"]]
    parts += ["--certify-method", o["certify_method"], "--attack-method", o["attack_method"],
              "--attack-budget", str(o["attack_budget"]), "--certify-budget", str(o["certify_budget"]),
              "--samples", str(o["samples"]), "--complete", str(o["complete"]), "--seed", str(o["seed"]),
              "--out", str(o["out"])]
    return shlex.join(parts)


@app.command("audit", epilog=EXAMPLE)
def audit_command(
    original: Optional[Path] = typer.Argument(None, help="The original model file (.pt, .onnx, .nnet)."),
    pruned: Optional[Path] = typer.Argument(None, help="The pruned model file; omit it to prune here (--method ...)."),
    method: str = typer.Option("coreset", help="Pruning when no PRUNED is given: coreset, uniform, topk or magnitude."),
    keep: Optional[str] = typer.Option(None, help="Neurons kept per hidden layer: 30, 0.1 or 0:30,1:10."),
    compression: Optional[float] = typer.Option(None, help="Fraction of parameters to remove, e.g. 0.9."),
    epsilon: Optional[float] = typer.Option(None, help="Provable per-layer bound to prune to."),
    delta: float = typer.Option(0.1, help="Failure probability of each layer's provable bound."),
    fine_tune: Optional[int] = typer.Option(None, "--fine-tune", help="Epochs of distillation fine-tuning after "
                                            "pruning here (on --data's training split; voids the provable bound) "
                                            "[default: 0; 30 with --demo]."),
    data: Optional[str] = typer.Option(None, help="Test data: mnist5k, digits, fashion, idx:DIR or npz:FILE "
                                       "[default: mnist5k]."),
    regions: Optional[int] = typer.Option(None, "--regions", help="Test points (seeded choice) to put L-inf boxes "
                                          "around [default: 20; 10 with --demo]."),
    center: Optional[List[str]] = typer.Option(None, "--center", help="Test points to put boxes around instead of "
                                               "--regions: DATA:test:I or a range DATA:test:A-B (inclusive); "
                                               "repeatable. Shard a large audit this way and join the shards "
                                               "with prunecert merge."),
    eps: str = typer.Option("0.01,0.02", help="Radii of the boxes, comma-separated (each point gets every radius)."),
    domain: bool = typer.Option(True, "--domain/--no-domain", help="Also audit the whole input domain."),
    tolerance: Optional[float] = typer.Option(None, help="Tolerance on max |Delta logit| (> 0); sets the verdict."),
    layer_tolerance: Optional[str] = typer.Option(None, help="Tolerances for hidden layers too: one value or one "
                                                  "per hidden layer (comma-separated); they then gate the verdict."),
    certify_method: CertifyMethod = "diff-linear",
    attack_method: AttackMethod = "auto",
    attack_budget: float = typer.Option(0.5, help="Attack seconds per region and objective."),
    certify_budget: float = typer.Option(5.0, help="Bound-method seconds per region (past it: sound, looser, noted)."),
    samples: int = typer.Option(256, help="Points certify samples per region (its own counterexample search)."),
    complete: float = typer.Option(5.0, help="Seconds per region to settle top-1 verdicts the bounds leave open "
                                   "(attack + branch and bound); 0 turns the stage off."),
    seed: Seed = 0,
    out: Optional[Path] = typer.Option(None, help="Report folder (default audit/, or reports/demo with --demo)."),
    save_pruned: Optional[Path] = typer.Option(None, help="Also save the model pruned here to this file."),
    demo: bool = typer.Option(False, "--demo", help="Train/reuse LeNet-300-100 on mnist5k, prune 90 %, distil, audit."),
    json_only: bool = typer.Option(False, "--json-only", help="Write only report.json and print it on stdout."),
    input_domain: InputDomain = None,
    workers: Workers = None,
    scheduler: Scheduler = None,
    threads: Threads = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary; only the exit status."),
) -> None:
    """Audit PRUNED against ORIGINAL (or prune ORIGINAL here) and write report.{json,html,md} to --out.

    Exit status: 0 certified, 1 violated (counterexample found), 2 unknown, 3 error.
    """
    opts = dict(locals())
    try:
        code = _run(opts)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))
        return
    raise typer.Exit(code)


def _run(o: dict) -> int:
    from prunecert.audit import plan_audit, run_audit
    from prunecert.cli.prune import parse_keep
    from prunecert.fileutil import check_output_file
    from prunecert.reports import check_writable, write_report

    progress = not (o["quiet"] or o["json_only"])
    if o["demo"]:
        if o["original"] is not None or o["pruned"] is not None or o["input_domain"] is not None:
            raise ConfigError("--demo trains its own model: give no model files (nor --input-domain) with it")
        if o["keep"] is None and o["compression"] is None and o["epsilon"] is None:
            o["compression"] = DEMO["compression"]
        if o["fine_tune"] is None:   # the demo audits a deployable (distilled) model
            o["fine_tune"] = DEMO["fine_tune"]
        o["regions"] = DEMO["points"] if o["regions"] is None else o["regions"]
        o["tolerance"] = DEMO["tolerance"] if o["tolerance"] is None else o["tolerance"]
        o["out"] = o["out"] or Path(DEMO["out"])
        o["data"] = o["data"] or DEMO["data"]
    elif o["original"] is None:
        raise ConfigError("give ORIGINAL (and PRUNED, or pruning options), or --demo")
    o["fine_tune"] = o["fine_tune"] or 0
    if o["center"] and o["regions"] is not None and not o["demo"]:
        raise ConfigError("give either --regions N (a seeded choice of test points) or --center SPEC, not both")
    o["regions"] = 20 if o["regions"] is None else o["regions"]
    o["data"] = o["data"] or "mnist5k"
    if o["tolerance"] is None:
        raise ConfigError("--tolerance is required (the largest acceptable max |Delta logit|, > 0)")
    o["out"] = o["out"] or Path("audit")
    layer_tol = None if not o["layer_tolerance"] else _floats(o["layer_tolerance"], "--layer-tolerance")
    if layer_tol is not None and len(layer_tol) == 1:
        layer_tol = layer_tol[0]
    if not _floats(o["eps"], "--eps"):
        raise ConfigError(f"--eps {o['eps']!r} names no radius; give one or more (e.g. 0.01,0.02), or --regions 0 "
                          "to audit only the domain")
    check_writable(o["out"])  # every output is checked before any work, none is created yet
    if o["save_pruned"] is not None and o["pruned"] is not None:
        raise ConfigError("--save-pruned saves a model pruned by the audit; PRUNED was given")
    if o["save_pruned"] is not None:
        check_output_file(o["save_pruned"], "--save-pruned")
    with _redirect_stdout("stderr" if o["json_only"] else "null" if o["quiet"] else None):
        plan_kwargs = dict(
            tolerance=o["tolerance"], data=o["data"], points=o["regions"], eps=_floats(o["eps"], "--eps"),
            domain=o["domain"], layer_tolerance=layer_tol, prune_method=o["method"], keep=parse_keep(o["keep"]),
            compression=o["compression"], epsilon=o["epsilon"], delta=o["delta"], fine_tune=o["fine_tune"],
            certify_method=o["certify_method"], complete=o["complete"],
            attack_method=o["attack_method"], attack_budget=o["attack_budget"], certify_budget=o["certify_budget"],
            samples=o["samples"], seed=o["seed"],
            progress=progress, command=_canonical(o["original"], o["pruned"], o), centers=o["center"] or None,
            workers=o["workers"], scheduler=o["scheduler"], threads=o["threads"])
        if o["input_domain"] is not None:
            from prunecert.io import parse_input_domain
            plan_kwargs["input_domain"] = parse_input_domain(o["input_domain"])
        if o["demo"]:  # check every option on an untrained stand-in first: errors come before training
            t0 = time.perf_counter()
            plan = plan_audit(_untrained_demo_model(o["data"]), None, **plan_kwargs)
            plan.load_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan.original, plan.sources["original"] = demo_model(o["seed"], progress, o["data"])
            plan.extra_timings.append(("demo model (train or load the cached one)", time.perf_counter() - t0))
            t0 = time.perf_counter()
            plan.pruned, plan.sources["pruned"] = demo_pruned(plan, progress)
            plan.extra_timings.append(("demo pruned model (prune + distil, or load the cached one)",
                                       time.perf_counter() - t0))
        else:
            plan = plan_audit(o["original"], o["pruned"], **plan_kwargs)
        report, pruned_net = run_audit(plan)
        paths = write_report(report, o["out"], ("json",) if o["json_only"] else ("json", "html", "md"))
        if o["demo"] and o["fine_tune"] and not o["json_only"]:
            _data_free_stage(plan, o, progress)
        if o["save_pruned"] is not None:
            from prunecert.io import save_model
            save_model(pruned_net, o["save_pruned"])
    if o["json_only"]:
        typer.echo(paths[0].read_text("utf-8"), nl=False)
    elif not o["quiet"]:
        _print_summary(report, paths)
    if o["demo"]:
        # the demo shows the tool working end to end; its verdict is in the report, not the exit status
        if not (o["quiet"] or o["json_only"]):
            typer.echo(f"demo: verdict {report.verdict.overall} (exit status {report.verdict.exit_status} in a real "
                       "audit; the demo exits 0)", err=True)
        return 0
    return report.verdict.exit_status


def _print_summary(report, paths) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from prunecert.reports import fmt

    console = Console()
    color = {"certified": "green", "violated": "red", "unknown": "yellow"}[report.verdict.overall]
    console.print(f"[bold {color}]{report.verdict.overall.upper()}[/] {report.verdict.headline}", highlight=False)
    table = Table(title="max |Δ| per layer over all regions", caption="prov: provable ε of the previous "
                  "layer's pruning; loc/e2e: local/end-to-end; c/e: certified/empirical", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for col in ("#", "kept", "prov", "cert loc", "cert e2e", "attack", "data", "c/e", "verdict"):
        table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
    for l in report.layers:
        table.add_row(str(l.index), fmt.kept(l.neurons_kept, l.neurons_total),
                      fmt.num(l.provable.eps, 3) if l.provable else fmt.DASH, fmt.num(l.certified.local, 3),
                      fmt.num(l.certified.end_to_end, 3), fmt.num(l.empirical.end_to_end, 3),
                      fmt.num(l.data.end_to_end, 3), fmt.ratio(l.ratios.certified_over_empirical),
                      l.verdict or fmt.DASH)
    console.print(table)
    m = report.metrics
    console.print(f"accuracy f {fmt.pct(m.accuracy_original)}, g {fmt.pct(m.accuracy_pruned)}; agreement "
                  f"{fmt.pct(m.agreement_rate)}; certified agreement {fmt.pct(m.certified_agreement_rate, 1)} of "
                  f"{len(report.regions)} regions; {fmt.pct(m.compression.params_removed, 1)} of parameters removed",
                  highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)
