"""`audit`: the whole job — prune (optionally), measure on data, certify, attack — as one `Audit`.

    plan = plan_audit(original, pruned, data="mnist5k", points=20, eps=(0.01, 0.02), tolerance=1.0)
    report, pruned = run_audit(plan)  # -> (prunecert.reports.Audit, the compact pruned Network)

`plan_audit` checks every input (the pair, the data set, tolerances, methods, region options) and
does no long work, so a bad option fails in seconds; `run_audit` runs the stages, timing each:

1. prune     coreset (or another criterion) when no pruned model is given,
2. measure   accuracy of f and g, top-1 agreement, the largest |Delta_l| on the test set,
3. certify   local and end-to-end bounds per layer on every region (L-inf boxes around test points
             at each radius, and the whole input domain), with top-1 agreement; then (`complete`)
             the verdicts still open are settled by attack + branch and bound within a budget,
4. attack    the logits (max |Delta|), top-1 disagreement, and each hidden layer's worst neuron;
             every point found (and certify's samples) is re-evaluated at every layer in float64,
5. report    verdicts, ratios and counterexample panels (`prunecert.reports.build`).

An attacked value above a certified bound would be a soundness bug: it raises instead of reporting.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from prunecert.adversarial import METHODS as ATTACKS
from prunecert.adversarial import attack_many
from prunecert.adversarial.batching import evaluation_batch
from prunecert.adversarial.witness import certify_searches
from prunecert.certify import certify, get_method, make_pair
from prunecert.certify.chunks import executor_items
from prunecert.certify.result import CertifyResult
from prunecert.certify.settle import complete_fits
from prunecert.core.pair import Pair
from prunecert.core.regions import Array, Box, Domain, Region
from prunecert.data import Dataset, load_dataset
from prunecert.errors import ConfigError, ShapeMismatchError
from prunecert.io import Domain as InputDomain
from prunecert.io import load_model, with_input_domain
from prunecert.network import Network
from prunecert.progress import progress_task, stage_line
from prunecert.prune import prune
from prunecert.prune.targets import Keep
from prunecert.reports import Audit, check_writable, write_report
from prunecert.reports.build import (AttackPoints, DataMeasures, Findings, Found, PointMeasures,
                                     build_audit)
from prunecert.reports.model import Stage
from prunecert.scale import Executor, open_executor, release_memory
from prunecert.stage_budgets import AUDIT_ATTACK_SECONDS, AUDIT_CERTIFY_SECONDS, AUDIT_COMPLETE_SECONDS, CERTIFY_SAMPLES

P = ParamSpec("P")
R = TypeVar("R")

SLACK_REL, SLACK_ABS = 1e-9, 1e-12  # float64 re-evaluation noise allowed between an attack and a bound


@dataclass
class AuditPlan:
    """Validated inputs of one audit (what `plan_audit` checked; nothing slow has run yet)."""

    original: Network
    pruned: Network | None            # None: prune `original` with `prune_options` in run_audit
    prune_options: dict[str, Any]     # method, the one target (keep/compression/epsilon), delta, fine_tune
    dataset: Dataset
    data_spec: str
    centers: list[int]                # test-set indices of the box centres
    eps: list[float]
    domain: bool
    tolerances: list[float | None]    # per layer; the logits always have one
    certify_method: str
    attack_method: str
    attack_budget: float
    samples: int
    seed: int
    progress: bool = True
    command: str | None = None
    sources: dict[str, str | None] = field(default_factory=dict)
    max_panels: int = 6
    complete: float | None = None     # seconds per region to settle open top-1 verdicts (None: off)
    load_seconds: float = 0.0         # time plan_audit spent loading models and data
    certify_budget: float | None = AUDIT_CERTIFY_SECONDS  # seconds per region for the bound method (None: no limit)
    extra_timings: list[tuple[str, float]] = field(default_factory=list)  # e.g. training the demo model
    workers: int | None = 1           # executor of the certify/attack chunks (results do not depend on it)
    scheduler: str | None = None
    threads: int | None = None


def _load(model: Network | str | os.PathLike[str], input_domain: InputDomain | None = None
          ) -> tuple[Network, str | None]:
    if isinstance(model, Network):
        return with_input_domain(model, input_domain), None
    return load_model(model, input_domain=input_domain), str(model)


def _positive(value: float | str, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _tolerances(n_layers: int, tolerance: float, layer_tolerance: float | Sequence[float | None] | None
                ) -> list[float | None]:
    """Logits: `tolerance`; hidden layers: `layer_tolerance` (one value for all, or one per hidden layer)."""
    out: list[float | None] = [None] * (n_layers - 1) + [_positive(tolerance, "tolerance")]
    if layer_tolerance is None:
        return out
    values = [layer_tolerance] * (n_layers - 1) if isinstance(layer_tolerance, (int, float)) else list(layer_tolerance)
    if len(values) != n_layers - 1:
        raise ConfigError(f"layer tolerance: give one value or one per hidden layer ({n_layers - 1}), got {len(values)}")
    for l, v in enumerate(values):
        out[l] = None if v is None else _positive(v, f"layer tolerance of layer {l}")
    return out


def plan_audit(original: Network | str | os.PathLike[str], pruned: Network | str | os.PathLike[str] | None = None, *,
               tolerance: float, data: str = "mnist5k", points: int = 20, eps: Sequence[float] = (0.01, 0.02),
               domain: bool = True, layer_tolerance: float | Sequence[float | None] | None = None,
               prune_method: str = "coreset", keep: Keep | None = None, compression: float | None = None,
               epsilon: float | None = None, delta: float = 0.1, fine_tune: int = 0, certify_method: str = "diff-linear",
               attack_method: str = "auto", attack_budget: float = AUDIT_ATTACK_SECONDS,
               samples: int = CERTIFY_SAMPLES, seed: int = 0,
               progress: bool = True, command: str | None = None, max_panels: int = 6,
               input_domain: InputDomain | None = None, certify_budget: float | None = AUDIT_CERTIFY_SECONDS,
               complete: float | None = AUDIT_COMPLETE_SECONDS, centers: Sequence[str] | None = None, workers: int | None = 1,
               scheduler: str | None = None, threads: int | None = None) -> AuditPlan:
    """Check everything an audit needs (see the module docstring) and return the plan to run.

    Give either `pruned` (a model or a file; compact pruned models are completed onto the original) or
    a pruning target (`keep`, `compression` or `epsilon`, with `prune_method`, `delta` and optionally
    `fine_tune` epochs on the data set's training split, which voids the provable bounds).
    `input_domain` (lo, hi) replaces both models' input box (see `prunecert.io.with_input_domain`).
    `complete`: seconds per region for the final stage that settles the top-1 verdicts the bounds
    leave open (attack, then branch and bound); None or 0 turns it off, and so does a pair whose LP is
    too large to branch on (`settle.complete_fits`: a CNN; the stage line says so).
    `centers` (e.g. ["mnist5k:test:0-499"]) names the test points instead of a seeded choice of
    `points`, so one audit can be sharded into several and merged (`prunecert merge`). `workers`,
    `scheduler` and `threads` choose where the certify/attack chunks run (see `prunecert.scale`).
    """
    t0 = time.perf_counter()
    original, original_src = _load(original, input_domain)
    targets = {k: v for k, v in (("keep", keep), ("compression", compression), ("epsilon", epsilon)) if v is not None}
    pruned_src = None
    if pruned is not None:
        if targets:
            raise ConfigError(f"give either a pruned model or pruning options ({', '.join(targets)}), not both")
        pruned, pruned_src = _load(pruned, input_domain)
        make_pair(original, pruned)  # a PairingError naming the layer, now rather than after training data loads
    elif len(targets) != 1:
        raise ConfigError("no pruned model given: give exactly one pruning target (keep, compression or epsilon)"
                          + (f", got {', '.join(targets)}" if targets else ""))
    n_layers = len(original.layers())
    tolerances = _tolerances(n_layers, tolerance, layer_tolerance)
    eps = [float(e) for e in eps]
    for e in eps:
        if not math.isfinite(e) or e < 0:
            raise ConfigError(f"eps must be finite numbers >= 0, got {e!r}")
    if len(set(eps)) != len(eps):
        raise ConfigError(f"eps values must be distinct, got {eps}")
    get_method(certify_method)  # ConfigError if unknown or not installed
    if attack_method not in ATTACKS:
        raise ConfigError(f"unknown attack method {attack_method!r}; valid: {', '.join(ATTACKS)}")
    budget = _positive(attack_budget, "attack budget (seconds)")
    if certify_budget is not None:
        certify_budget = _positive(certify_budget, "certify budget (seconds)")
    if int(samples) < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    dataset = load_dataset(data)
    if math.prod(dataset.input_shape) != original.n_inputs:
        raise ShapeMismatchError(f"data set {data} has inputs of shape {dataset.input_shape}, the model "
                                 f"{original.name} takes {original.input_shape}")
    n_out = math.prod(original.output_shape)
    if dataset.n_classes > n_out:
        raise ShapeMismatchError(f"data set {data} has {dataset.n_classes} classes, the model {original.name} "
                                 f"has {n_out} outputs")
    n_test = len(dataset.y_test)
    if centers is not None:
        chosen = test_indices(centers, str(data), n_test)
        points = len(chosen)
    else:
        points = int(points)
        if points < 0 or points > n_test:
            raise ConfigError(f"points (regions around test points) must be in 0..{n_test} for {data}, got {points}")
    if (points == 0 or not eps) and not domain:
        raise ConfigError("no regions: give points > 0 and at least one eps, or audit the domain")
    if centers is None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA0D17]))
        chosen = sorted(int(i) for i in rng.choice(n_test, size=points, replace=False)) if eps else []
    elif not eps:
        chosen = []
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if int(fine_tune) < 0 or (fine_tune and pruned is not None):
        raise ConfigError(f"fine_tune must be >= 0 epochs and needs pruning options, got {fine_tune}")
    options = {"method": prune_method, **targets, "delta": float(delta), "fine_tune": int(fine_tune)}
    complete = None if not complete else _positive(complete, "complete (seconds per region)")
    return AuditPlan(original, pruned, options, dataset, str(data), chosen, eps, bool(domain), tolerances,
                     certify_method, attack_method, budget, int(samples), int(seed), progress, command,
                     {"original": original_src, "pruned": pruned_src}, int(max_panels), complete,
                     time.perf_counter() - t0, certify_budget=certify_budget, workers=workers, scheduler=scheduler,
                     threads=threads)


def test_indices(specs: Sequence[str], data: str, n_test: int) -> list[int]:
    """Test-set indices named by centre specs `DATA:test:I` or `DATA:test:A-B` (inclusive), in order.

    An audit's regions are boxes around test points of its data set; naming them (instead of a seeded
    choice) is what lets one audit be split into shards that `prunecert merge` joins. Ranges are
    checked against the test set before they are expanded.
    """
    out: list[int] = []
    for spec in specs:
        head, _, tail = str(spec).rpartition(":")
        if head != f"{data}:test":
            raise ConfigError(f"--center {spec!r}: an audit centres its boxes on test points of --data {data}; "
                              f"expected {data}:test:I or {data}:test:A-B")
        a, dash, b = tail.partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ConfigError(f"--center {spec!r}: expected an index I or a range A-B after '{head}:'")
        lo, hi = int(a), int(b) if dash else int(a)
        if hi < lo:
            raise ConfigError(f"--center {spec!r}: end {hi} is before start {lo}")
        if hi >= n_test:
            raise ConfigError(f"--center {spec!r}: index {hi} out of range for the {n_test} test points of {data}")
        out.extend(range(lo, hi + 1))
    if len(set(out)) != len(out):
        dup = Counter(out).most_common(1)[0][0]
        raise ConfigError(f"--center: test point {data}:test:{dup} is named twice")
    return out


# ----------------------------------------------------------------------------- stages
class _Stages:
    """Times each stage; one line per stage start and end on the progress channel when `progress`."""

    def __init__(self, progress: bool, total: int):
        self.progress = progress
        self.total, self.done = total, 0
        self.timings: list[tuple[str, float]] = []

    def run(self, name: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        self.done += 1
        stage_line(f"audit [{self.done}/{self.total}] {name} ...", self.progress)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        self.timings.append((name, seconds))
        stage_line(f"audit [{self.done}/{self.total}] {name} done in {seconds:.2f} s", self.progress)
        return out


def _regions(plan: AuditPlan, pair: Pair) -> list[Region]:
    lo, hi = pair.domain()
    out: list[Region] = []
    for i in plan.centers:
        center = np.asarray(plan.dataset.x_test[i], dtype=np.float64).reshape(pair.input_shape)
        out += [Box.around(center, e, lo, hi, source=f"{plan.data_spec}:test:{i}") for e in plan.eps]
    if plan.domain:
        out.append(Domain(lo, hi))
    return out


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) max |t| over everything but the batch."""
    return t.abs().reshape(t.shape[0], -1).amax(dim=1)


def measure_data(pair: Pair, x: npt.ArrayLike, y: npt.ArrayLike, batch: int | None = None) -> DataMeasures:
    """Accuracy of f and g, top-1 agreement, and per layer the largest |Delta| (end-to-end, local) on (x, y).
    `batch` (default: as many points as fit the attack's memory budget, at most 512) changes no result."""
    x, y = np.asarray(x), np.asarray(y)
    batch = evaluation_batch(pair) if batch is None else batch
    n_layers = pair.n_layers
    e2e, loc = np.zeros(n_layers), np.zeros(n_layers)
    worst = np.zeros(n_layers, dtype=np.int64)
    correct_f = correct_g = agree = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[s:s + batch], dtype=np.float64))
            af, ag = pair.forward_layers(xb)
            local = pair.local_deltas(xb)
            for l in range(n_layers):
                d = _abs_max(af[l] - ag[l]).numpy()
                if d.max() > e2e[l]:
                    e2e[l], worst[l] = d.max(), s + int(d.argmax())
                loc[l] = max(loc[l], float(_abs_max(local[l]).max()))
            pf, pg = af[-1].reshape(len(xb), -1).argmax(1).numpy(), ag[-1].reshape(len(xb), -1).argmax(1).numpy()
            yb = np.asarray(y[s:s + batch])
            correct_f += int((pf == yb).sum())
            correct_g += int((pg == yb).sum())
            agree += int((pf == pg).sum())
    n = len(x)
    return DataMeasures(accuracy_f=correct_f / n, accuracy_g=correct_g / n, agreement=agree / n,
                        end_to_end=e2e, local=loc, worst_index=worst)


def _neuron_objectives(cert: CertifyResult, n_layers: int, n_regions: int) -> dict[str, list[int]]:
    """Per hidden layer and region, the neuron (and sign) with the largest certified |Delta|: spec -> regions."""
    groups: dict[str, list[int]] = {}
    for l in range(n_layers - 1):
        layer = cert.layers[l]
        lower = layer.end_to_end_lower.reshape(n_regions, -1)
        upper = layer.end_to_end_upper.reshape(n_regions, -1)
        for b in range(n_regions):
            mag = np.maximum(upper[b], -lower[b])
            k = int(np.argmax(mag))
            if mag[k] <= 0:
                continue  # the layer provably does not deviate here
            spec = f"layer:{l}:neuron:{k}" + (":min" if -lower[b, k] > upper[b, k] else "")
            groups.setdefault(spec, []).append(b)
    return groups


def attack_regions(plan: AuditPlan, pair: Pair, regions: Sequence[Region], cert: CertifyResult,
                   executor: Executor | None = None) -> AttackPoints:
    """Run the attacks; returns the points found per region and top-1 disagreements found."""
    objectives = {"max-logit-deviation": list(range(len(regions))), "disagreement": list(range(len(regions)))}
    objectives.update(_neuron_objectives(cert, pair.n_layers, len(regions)))
    points: list[list[Array]] = [[] for _ in regions]
    disagreements: dict[int, tuple[Array, int, int]] = {}
    truncated = 0
    with progress_task(f"attack ({plan.attack_method})", len(objectives), plan.progress, unit="objectives") as task:
        for spec, idx in objectives.items():
            results = attack_many(pair, None, [regions[i] for i in idx], spec, method=plan.attack_method,
                                  budget_seconds=plan.attack_budget, seed=plan.seed, progress=False,
                                  executor=executor)
            for i, res in zip(idx, results):
                truncated += bool(res.truncated)
                points[i].append(np.asarray(res.x, dtype=np.float64))
                if res.disagreement and i not in disagreements:
                    disagreements[i] = (points[i][-1], int(res.class_f), int(res.class_g))
            task.advance()
    return AttackPoints(points=points, disagreements=disagreements, objectives=len(objectives), truncated=truncated,
                        attacks=sum(len(idx) for idx in objectives.values()))


def evaluate_points(pair: Pair, regions: Sequence[Region], points: list[list[Array]]) -> PointMeasures:
    """Per region and layer: the largest |Delta| (end-to-end, local) over the points, and the point reaching it."""
    n_r, n_l = len(regions), pair.n_layers
    e2e, loc = np.zeros((n_r, n_l)), np.zeros((n_r, n_l))
    best: list[list[Array]] = [[pts[0]] * n_l for pts in points]  # every entry is set below
    with torch.no_grad():
        for b, pts in enumerate(points):
            x = torch.from_numpy(np.stack([p.reshape(pair.input_shape) for p in pts]))
            d_e2e, d_loc = pair.deltas(x), pair.local_deltas(x)
            for l in range(n_l):
                v = _abs_max(d_e2e[l]).numpy()
                e2e[b, l], best[b][l] = float(v.max()), pts[int(v.argmax())]
                loc[b, l] = float(_abs_max(d_loc[l]).max())
    return PointMeasures(end_to_end=e2e, local=loc, best=best)


def _check_sound(name: str, found: Array, bound: Array, method: str, regions: Sequence[Region]) -> None:
    bad = found > bound * (1 + SLACK_REL) + SLACK_ABS
    if bad.any():
        b, l = (int(v) for v in np.argwhere(bad)[0])
        raise RuntimeError(f"certify method {method!r} bounds the {name} |Delta| of layer {l} on region {b} "
                           f"({regions[b].describe().get('source', 'domain')}) by {bound[b, l]:.6g}, but a point "
                           f"reaches {found[b, l]:.6g}: unsound bound, please report")


def run_audit(plan: AuditPlan) -> tuple[Audit, Network]:
    """Run the stages of `plan`; returns the Audit (write it with `prunecert.reports.write_report`) and
    the compact pruned network (pruned here, or the one given)."""
    stages = _Stages(plan.progress, 4 if plan.pruned is None else 3)
    pruned = plan.pruned
    if pruned is None:
        options = dict(plan.prune_options)
        pruned = stages.run("prune" + (f" + fine-tune {options['fine_tune']} epochs" if options["fine_tune"] else ""),
                            prune, plan.original, options.pop("method"), seed=plan.seed, progress=plan.progress,
                            data=plan.dataset if options["fine_tune"] else None, **options)
    pair = make_pair(plan.original, pruned)
    regions = _regions(plan, pair)
    data = stages.run("measure on test data", measure_data, pair, plan.dataset.x_test, plan.dataset.y_test)
    release_memory()   # the pass's batches, before the workers start beside this process
    # a pair too large for the complete stage's branch and bound (a CNN's LP) keeps the bounds' verdicts,
    # settled further by the attack stage's disagreement search
    complete = plan.complete if plan.complete and complete_fits(pair) else None
    name = f"certify {len(regions)} regions ({plan.certify_method}"
    if complete:
        name += f", then complete verdicts <= {complete:g} s per open region)"
    else:
        name += ")" if not plan.complete else "; no complete verdicts: the pair's LP is too large to branch on)"
    with contextlib.ExitStack() as stack:
        # small audits stay in this process (`executor_items`): spawning workers would only cost
        executor = stack.enter_context(open_executor(plan.workers, plan.scheduler, plan.threads,
                                                     n_items=executor_items(len(regions))))
        cert = stages.run(name, certify, pair, None, regions, method=plan.certify_method, progress=plan.progress,
                          seed=plan.seed, samples=plan.samples, complete=complete,
                          time_limit=plan.certify_budget,
                          executor=executor, **certify_searches(plan.certify_method, pair, plan.seed))
        found = stages.run(f"attack {len(regions)} regions ({plan.attack_method})", _attack_stage, plan, pair,
                           regions, cert, executor)
    return _finish_audit(plan, stages, pruned, pair, regions, data, cert, found)


def _attack_stage(plan: AuditPlan, pair: Pair, regions: Sequence[Region], cert: CertifyResult,
                  executor: Executor) -> Found:
    found = attack_regions(plan, pair, regions, cert, executor)
    for b in range(len(regions)):  # certify's own search points count too
        found["points"][b].append(np.asarray(cert.sampled_points[b], dtype=np.float64))
        a = cert.agreement[b]
        if a.point is not None:
            found["points"][b].append(np.asarray(a.point, dtype=np.float64))
    measured = evaluate_points(pair, regions, found["points"])
    return Found(**found, **measured)


def _finish_audit(plan: AuditPlan, stages: _Stages, pruned: Network, pair: Pair, regions: list[Region],
                  data: DataMeasures, cert: CertifyResult, found: Found) -> tuple[Audit, Network]:
    cert_e2e = np.stack([L.max_abs_end_to_end for L in cert.layers], axis=1)
    cert_loc = np.stack([L.max_abs_local for L in cert.layers], axis=1)
    _check_sound("end-to-end", found["end_to_end"], cert_e2e, plan.certify_method, regions)
    _check_sound("local", found["local"], cert_loc, plan.certify_method, regions)
    if plan.domain:
        _check_sound("end-to-end (test data)", data["end_to_end"][None], cert_e2e[-1:], plan.certify_method, regions[-1:])
        _check_sound("local (test data)", data["local"][None], cert_loc[-1:], plan.certify_method, regions[-1:])
    findings = Findings(pair=pair, pruned=pruned, regions=regions, data=data, cert=cert, cert_e2e=cert_e2e,
                        cert_local=cert_loc, found=found)
    t0 = time.perf_counter()
    report = build_audit(plan, findings, plan.extra_timings + stages.timings)
    report.timings.append(Stage("report", time.perf_counter() - t0))
    return report, pruned


def audit(original: Network | str | os.PathLike[str], pruned: Network | str | os.PathLike[str] | None = None,
          out: str | os.PathLike[str] | None = None, **options: Any) -> Audit:
    """Plan, run and (when `out` is given) write an audit; options as for `plan_audit`."""
    if out is not None:
        check_writable(out)
    plan = plan_audit(original, pruned, **options)  # every check before any long work
    report, _ = run_audit(plan)
    if out is not None:
        write_report(report, Path(out))
    return report
