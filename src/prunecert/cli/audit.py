"""`prunecert audit`: prune (or take a pruned model), measure, certify, attack, and write one report.

Exit status follows the verdict against --tolerance, so the audit can gate a deployment in CI:
0 certified (every gated layer), 1 violated (a counterexample was found), 2 unknown; 3 is an error.
`--demo` trains (or reuses a cached) LeNet-300-100 on mnist5k, prunes 90 % of its parameters with
coresets, distils the pruned model for 30 epochs (a deployable model, ~91 % accurate) and audits 10
test points x 2 radii plus the whole domain into reports/demo/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

import prunecert.audit  # run_audit through its module: tests replace it to prove no work starts before the checks
from prunecert.audit import AuditPlan, plan_audit
from prunecert.cli.command import Options, command
from prunecert.cli.demo import DEMO, demo_model, demo_pruned, untrained_demo_model
from prunecert.cli.options import AttackMethod, CertifyMethod, InputDomain, Scheduler, Seed, Threads, Workers
from prunecert.cli.prune import parse_keep
from prunecert.errors import ConfigError
from prunecert.fileutil import check_output_file
from prunecert.io import parse_input_domain, save_model
from prunecert.network import Network
from prunecert.reports import Audit, check_writable, fmt, write_report
from prunecert.stage_budgets import AUDIT_ATTACK_SECONDS, AUDIT_CERTIFY_SECONDS, AUDIT_COMPLETE_SECONDS, CERTIFY_SAMPLES

EXAMPLE = ("Examples: prunecert audit --demo   |   prunecert audit lenet.pt lenet-pruned.pt --data mnist5k "
           "--regions 20 --eps 0.01,0.02 --tolerance 2 --out audit/   |   prunecert audit lenet.pt "
           "--method coreset --compression 0.9 --tolerance 2 --out audit/")
POINTS, DATA, OUT = 20, "mnist5k", Path("audit")  # without --demo (which has its own, DEMO)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class AuditOptions(Options):
    """`prunecert audit`'s command line (the fields, in --help order). Options whose default depends on
    --demo are None here; `checked()` fills them in."""

    original: Annotated[Optional[Path], typer.Argument(help="The original model file (.pt, .onnx, .nnet).")] = None
    pruned: Annotated[Optional[Path], typer.Argument(
        help="The pruned model file; omit it to prune here (--method ...).")] = None
    method: Annotated[str, typer.Option(
        help="Pruning when no PRUNED is given: coreset, uniform, topk or magnitude.")] = "coreset"
    keep: Annotated[Optional[str], typer.Option(help="Neurons kept per hidden layer: 30, 0.1 or 0:30,1:10.")] = None
    compression: Annotated[Optional[float], typer.Option(help="Fraction of parameters to remove, e.g. 0.9.")] = None
    epsilon: Annotated[Optional[float], typer.Option(help="Provable per-layer bound to prune to.")] = None
    delta: Annotated[float, typer.Option(help="Failure probability of each layer's provable bound.")] = 0.1
    fine_tune: Annotated[Optional[int], typer.Option(
        "--fine-tune", help="Epochs of distillation fine-tuning after pruning here (on --data's training split; "
                            "voids the provable bound) [default: 0; 30 with --demo].")] = None
    data: Annotated[Optional[str], typer.Option(
        help="Test data: mnist5k, digits, fashion, idx:DIR or npz:FILE [default: mnist5k].")] = None
    regions: Annotated[Optional[int], typer.Option(
        "--regions", help="Test points (seeded choice) to put L-inf boxes around [default: 20; 10 with "
                          "--demo].")] = None
    center: Annotated[Optional[List[str]], typer.Option(
        "--center", help="Test points to put boxes around instead of --regions: DATA:test:I or a range "
                         "DATA:test:A-B (inclusive); repeatable. Shard a large audit this way and join the shards "
                         "with prunecert merge.")] = None
    eps: Annotated[str, typer.Option(
        help="Radii of the boxes, comma-separated (each point gets every radius).")] = "0.01,0.02"
    domain: Annotated[bool, typer.Option("--domain/--no-domain", help="Also audit the whole input domain.")] = True
    tolerance: Annotated[Optional[float], typer.Option(
        help="Tolerance on max |Delta logit| (> 0); sets the verdict.")] = None
    layer_tolerance: Annotated[Optional[str], typer.Option(
        help="Tolerances for hidden layers too: one value or one per hidden layer (comma-separated); they then "
             "gate the verdict.")] = None
    certify_method: CertifyMethod = "diff-linear"
    attack_method: AttackMethod = "auto"
    attack_budget: Annotated[float, typer.Option(
        help="Attack seconds per region and objective.")] = AUDIT_ATTACK_SECONDS
    certify_budget: Annotated[float, typer.Option(
        help="Bound-method seconds per region (past it: sound, looser, noted).")] = AUDIT_CERTIFY_SECONDS
    samples: Annotated[int, typer.Option(
        help="Points certify samples per region (its own counterexample search).")] = CERTIFY_SAMPLES
    complete: Annotated[float, typer.Option(
        help="Seconds per region to settle top-1 verdicts the bounds leave open (attack + branch and bound); 0 "
             "turns the stage off (so does a net whose LP is too large, e.g. a CNN).")] = AUDIT_COMPLETE_SECONDS
    seed: Seed = 0
    out: Annotated[Optional[Path], typer.Option(
        help="Report folder (default audit/, or reports/demo with --demo).")] = None
    save_pruned: Annotated[Optional[Path], typer.Option(
        help="Also save the model pruned here to this file.")] = None
    demo: Annotated[bool, typer.Option(
        "--demo", help="Train/reuse LeNet-300-100 on mnist5k, prune 90 %, distil, audit.")] = False
    json_only: Annotated[bool, typer.Option(
        "--json-only", help="Write only report.json and print it on stdout.")] = False
    input_domain: InputDomain = None
    workers: Workers = None
    scheduler: Scheduler = None
    threads: Threads = None
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress and no summary; only the exit status.")] = False

    def checked(self) -> AuditOptions:
        """Checked, with the defaults that depend on --demo filled in (every output is checked before any
        work, none is created yet)."""
        o = self
        if o.demo:
            if o.original is not None or o.pruned is not None or o.input_domain is not None:
                raise ConfigError("--demo trains its own model: give no model files (nor --input-domain) with it")
            no_target = o.keep is None and o.compression is None and o.epsilon is None
            o = dataclasses.replace(
                o, compression=DEMO["compression"] if no_target else o.compression,
                fine_tune=DEMO["fine_tune"] if o.fine_tune is None else o.fine_tune,  # a deployable (distilled) model
                regions=DEMO["points"] if o.regions is None else o.regions,
                tolerance=DEMO["tolerance"] if o.tolerance is None else o.tolerance,
                out=o.out or Path(DEMO["out"]), data=o.data or DEMO["data"])
        elif o.original is None:
            raise ConfigError("give ORIGINAL (and PRUNED, or pruning options), or --demo")
        if o.center and o.regions is not None and not o.demo:
            raise ConfigError("give either --regions N (a seeded choice of test points) or --center SPEC, not both")
        o = dataclasses.replace(o, fine_tune=o.fine_tune or 0, regions=POINTS if o.regions is None else o.regions,
                                data=o.data or DATA, out=o.out or OUT)
        if o.tolerance is None:
            raise ConfigError("--tolerance is required (the largest acceptable max |Delta logit|, > 0)")
        o.layer_tolerances()
        if not o.radii():
            raise ConfigError(f"--eps {o.eps!r} names no radius; give one or more (e.g. 0.01,0.02), or --regions 0 "
                              "to audit only the domain")
        check_writable(o.report_dir)
        if o.save_pruned is not None and o.pruned is not None:
            raise ConfigError("--save-pruned saves a model pruned by the audit; PRUNED was given")
        if o.save_pruned is not None:
            check_output_file(o.save_pruned, "--save-pruned")
        return o

    def radii(self) -> list[float]:
        return _floats(self.eps, "--eps")

    def layer_tolerances(self) -> float | list[float] | None:
        """--layer-tolerance: None, one value for every hidden layer, or one per hidden layer."""
        values = None if not self.layer_tolerance else _floats(self.layer_tolerance, "--layer-tolerance")
        return values[0] if values is not None and len(values) == 1 else values

    @property
    def report_dir(self) -> Path:
        return self.out or OUT


@command("audit", AuditOptions, epilog=EXAMPLE)
def audit_command(o: AuditOptions) -> int:
    """Audit PRUNED against ORIGINAL (or prune ORIGINAL here) and write report.{json,html,md} to --out.

    Exit status: 0 certified, 1 violated (counterexample found), 2 unknown, 3 error.
    """
    progress = not (o.quiet or o.json_only)
    with _redirect_stdout("stderr" if o.json_only else "null" if o.quiet else None):
        plan = _plan(o, progress)
        report: Audit
        report, pruned_net = prunecert.audit.run_audit(plan)
        paths = write_report(report, o.report_dir, ("json",) if o.json_only else ("json", "html", "md"))
        if o.demo and o.fine_tune and not o.json_only:
            _data_free_stage(plan, o, progress)
        if o.save_pruned is not None:
            save_model(pruned_net, o.save_pruned)
    if o.json_only:
        typer.echo(paths[0].read_text("utf-8"), nl=False)
    elif not o.quiet:
        _print_summary(report, paths)
    if o.demo:
        # the demo shows the tool working end to end; its verdict is in the report, not the exit status
        if not (o.quiet or o.json_only):
            typer.echo(f"demo: verdict {report.verdict.overall} (exit status {report.verdict.exit_status} in a real "
                       "audit; the demo exits 0)", err=True)
        return 0
    return report.verdict.exit_status


def _plan(o: AuditOptions, progress: bool) -> AuditPlan:
    """The audit's plan (plan_audit checks the rest); with --demo, its models trained or taken from the cache."""
    if not o.demo:
        assert o.original is not None, "checked(): an audit without --demo has ORIGINAL"
        return _plan_audit(o, o.original, o.pruned, progress)
    # check every option on an untrained stand-in first: errors come before training
    t0 = time.perf_counter()
    plan = _plan_audit(o, untrained_demo_model(o.data or DEMO["data"]), None, progress)
    plan.load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan.original, plan.sources["original"] = demo_model(o.seed, progress, o.data)
    plan.extra_timings.append(("demo model (train or load the cached one)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    plan.pruned, plan.sources["pruned"] = demo_pruned(plan, progress)
    plan.extra_timings.append(("demo pruned model (prune + distil, or load the cached one)", time.perf_counter() - t0))
    return plan


def _plan_audit(o: AuditOptions, original: Network | Path, pruned: Path | None, progress: bool) -> AuditPlan:
    assert o.tolerance is not None and o.data is not None and o.regions is not None, "checked() filled them in"
    return plan_audit(
        original, pruned, tolerance=o.tolerance, data=o.data, points=o.regions, eps=o.radii(), domain=o.domain,
        layer_tolerance=o.layer_tolerances(), prune_method=o.method, keep=parse_keep(o.keep),
        compression=o.compression, epsilon=o.epsilon, delta=o.delta, fine_tune=o.fine_tune or 0,
        certify_method=o.certify_method, complete=o.complete, attack_method=o.attack_method,
        attack_budget=o.attack_budget, certify_budget=o.certify_budget, samples=o.samples, seed=o.seed,
        progress=progress, command=_canonical(o), centers=o.center or None, workers=o.workers,
        scheduler=o.scheduler, threads=o.threads, input_domain=parse_input_domain(o.input_domain))


def _data_free_stage(plan: AuditPlan, o: AuditOptions, progress: bool) -> None:
    """The demo's second pair: the same coreset pruning without distillation (the paper's data-free
    setting, where the provable epsilon applies), audited over the same regions into OUT/data-free/
    (the command it records reproduces it: --demo --fine-tune 0 --out OUT/data-free)."""
    o2 = dataclasses.replace(o, fine_tune=0, out=o.report_dir / "data-free")
    plan2 = dataclasses.replace(plan, prune_options={**plan.prune_options, "fine_tune": 0}, pruned=None,
                                extra_timings=[], command=_canonical(o2), sources=dict(plan.sources))
    if progress:
        typer.echo("demo: the data-free stage (no distillation) -> " + str(o2.report_dir), err=True)
    t0 = time.perf_counter()
    plan2.pruned, plan2.sources["pruned"] = demo_pruned(plan2, progress)
    plan2.extra_timings.append(("demo pruned model (prune, or load the cached one)", time.perf_counter() - t0))
    report, _ = prunecert.audit.run_audit(plan2)
    write_report(report, o2.report_dir, ("json", "html", "md"))


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


def _canonical(o: AuditOptions) -> str:
    """The command with every option spelled out: re-running it reproduces the audit."""
    parts = ["prunecert", "audit"]
    if o.demo:
        parts.append("--demo")
    else:
        parts += [str(o.original)] + ([str(o.pruned)] if o.pruned else [])
    if not o.pruned:
        parts += ["--method", o.method]
        for flag, value in (("--keep", o.keep), ("--compression", o.compression), ("--epsilon", o.epsilon)):
            if value is not None:
                parts += [flag, str(value)]
        parts += ["--delta", str(o.delta)] + (["--fine-tune", str(o.fine_tune)] if o.fine_tune or o.demo else [])
    if o.input_domain is not None:
        parts += ["--input-domain", str(o.input_domain)]
    where = [a for c in o.center for a in ("--center", c)] if o.center else ["--regions", str(o.regions)]
    parts += ["--data", str(o.data), *where, "--eps", o.eps,
              "--domain" if o.domain else "--no-domain", "--tolerance", str(o.tolerance)]
    if o.layer_tolerance:
        parts += ["--layer-tolerance", o.layer_tolerance]
    parts += ["--certify-method", o.certify_method, "--attack-method", o.attack_method,
              "--attack-budget", str(o.attack_budget), "--certify-budget", str(o.certify_budget),
              "--samples", str(o.samples), "--complete", str(o.complete), "--seed", str(o.seed),
              "--out", str(o.out)]
    return shlex.join(parts)


def _print_summary(report: Audit, paths: list[Path]) -> None:
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
