"""Certified-budget pruning: the smallest pruned model for which a property is *certified* over regions.

A user who needs "max |Delta logit| <= tau on these boxes" or "top-1 agreement proved on >= 95 % of
them" should not have to guess keep counts. `prune_to_certificate` searches the per-layer keep counts
for the smallest network (fewest parameters) whose pair with the original passes the requirement
under a sound bound method (default diff-linear), each candidate pruned from the original and
optionally fine-tuned (plain, distilled or adversarially distilled) before it is certified.

Search (coarse to fine; every candidate is kept in the trace):
1. the unpruned copy (keep everything): if even it fails, the requirement is out of reach (e.g. f
   itself is not robust on the boxes, so agreement cannot be proved) and we say so;
2. bisection on one keep fraction shared by all hidden layers (`coarse_steps` halvings);
3. per-layer bisection from the best passing candidate, the layers with the most parameters per
   neuron first, the others held fixed.
Pruning and fine-tuning are random, so "passes" need not be monotone in the keep counts; bisection
then finds *a* small passing model, not necessarily the smallest, and the result is always one that
was certified. Before a candidate is certified, the region centres are checked by a forward pass: if
too many already violate the requirement, the (costlier) certification is skipped.

This module composes `prune` and `certify`, which are siblings (DESIGN §2), so it lives above both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify import certify
from prunecert.certify.result import CertifyResult
from prunecert.core.regions import L2Ball, Region
from prunecert.core.surgery import geometry, hidden_layers
from prunecert.data import Dataset, load_dataset
from prunecert.errors import ConfigError
from prunecert.network import Network
from prunecert.objectives import Adversarial
from prunecert.progress import stage_line
from prunecert.prune import prune
from prunecert.prune.finetune import fine_tune as fine_tune_network
from prunecert.train import evaluate


@dataclass(frozen=True)
class Requirement:
    """What must be certified on at least `fraction` of the regions: max_k |Delta_k| <= `tolerance`
    (when given), else top-1 agreement (argmax f = argmax g = one class on the whole region).

    `relative`: the fraction counts against the regions the *unpruned* copy certifies instead of all of
    them. It matters for agreement: certify proves agreement as "both networks give the same single
    class on the whole box", so a box on which f itself changes its answer (or is not proved robust)
    can never count, however little is pruned."""

    tolerance: float | None = None
    fraction: float = 1.0
    relative: bool = False

    def __post_init__(self) -> None:
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ConfigError(f"certified tolerance must be a finite number > 0, got {self.tolerance!r}")
        if not (0.0 < self.fraction <= 1.0):
            raise ConfigError(f"certified fraction of regions must lie in (0, 1], got {self.fraction!r}")

    def needed(self, n_regions: int) -> int:
        """Regions to certify out of `n_regions` (all regions, or those the unpruned copy certifies)."""
        return max(1, int(math.ceil(self.fraction * n_regions - 1e-9)))

    def certified(self, result: CertifyResult) -> int:
        """How many regions the certificate settles in the requirement's favour."""
        if self.tolerance is None:
            return sum(a.verdict == "proved" for a in result.agreement)
        return int(np.sum(np.asarray(result.max_abs_logit_deviation) <= self.tolerance))

    def violated_at_centres(self, f: Network, g: Network, regions: Sequence[Region]) -> int:
        """Regions whose centre already breaks the requirement (a forward pass; no certificate can help)."""
        x = torch.from_numpy(np.stack([_centre(r) for r in regions]).reshape(len(regions), *f.input_shape))
        yf, yg = f.forward(x), g.forward(x)
        if self.tolerance is None:
            return int((yf.argmax(1) != yg.argmax(1)).sum())
        return int(((yf - yg).abs().amax(1) > self.tolerance).sum())

    def describe(self) -> str:
        what = "top-1 agreement" if self.tolerance is None else f"max |Delta logit| <= {self.tolerance:g}"
        of = "of the regions the unpruned copy certifies" if self.relative else "of the regions"
        return f"{what} certified on >= {100 * self.fraction:g} % {of}"


def _centre(region: Region) -> npt.NDArray[np.float64]:
    if isinstance(region, L2Ball):
        return np.asarray(region.center, dtype=np.float64)
    lo, hi = region.bounding_box()
    return (lo + hi) / 2


@dataclass
class Candidate:
    """One row of the search trace."""

    stage: str                  # "full", "coarse" or "layer L"
    keep: dict[int, int]
    params: int
    compression: float
    certified: int | None       # regions certified (None: skipped, the centres already failed)
    needed: int
    passed: bool
    max_bound: float | None     # largest certified max |Delta logit| over the regions
    accuracy: float | None
    seconds: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep"] = {str(k): v for k, v in self.keep.items()}
        return d


class BudgetSettings(TypedDict, total=False):
    """The search's settings, as recorded in the result and the pruning record."""

    method: str
    seed: int
    fine_tune: int
    distill: bool
    augment: str | None
    adversarial: dict[str, Any] | None
    max_accuracy_drop: float | None
    certify_method: str
    coarse_steps: int
    refine: bool
    resolution: float
    time_limit: float | None
    samples: int
    n_regions: int


@dataclass
class BudgetResult:
    """The smallest certified model found, its certificate (certify's result for the final pair) and the trace."""

    model: Network
    certificate: CertifyResult
    trace: list[Candidate]
    requirement: Requirement
    original_accuracy: float | None
    seconds: float
    settings: BudgetSettings = field(default_factory=lambda: BudgetSettings())

    @property
    def best(self) -> Candidate:
        return min((c for c in self.trace if c.passed), key=lambda c: c.params)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {"requirement": {**asdict(self.requirement), "statement": self.requirement.describe()},
                "keep": {str(k): v for k, v in best.keep.items()}, "params": best.params,
                "compression": best.compression, "certified": best.certified, "needed": best.needed,
                "n_regions": self.certificate.n_regions, "accuracy": best.accuracy,
                "original_accuracy": self.original_accuracy, "candidates": len(self.trace),
                "seconds": round(self.seconds, 3), "settings": self.settings,
                "trace": [c.to_json() for c in self.trace]}


def _log(progress: bool, msg: str) -> None:
    stage_line(f"[certified-budget] {msg}", progress)


@dataclass
class _Best:
    """The smallest passing candidate so far, its model and its certificate."""

    candidate: Candidate
    model: Network
    certificate: CertifyResult


def prune_to_certificate(network: Network, regions: Sequence[Region], requirement: Requirement,
                         method: str = "coreset", seed: int = 0, fine_tune: int = 0,
                         data: str | Dataset | None = None, distill: bool = True, augment: str | None = None,
                         adversarial: Adversarial | dict[str, Any] | None = None,
                         max_accuracy_drop: float | None = None,
                         certify_method: str = "diff-linear", coarse_steps: int = 6, refine: bool = True,
                         resolution: float = 1 / 64,
                         time_limit: float | None = None, samples: int = 32, progress: bool = True) -> BudgetResult:
    """Find the smallest pruned `network` (per-layer keep counts) whose pair with `network` meets
    `requirement` under `certify_method` over `regions`; see the module docstring for the search.

    Each candidate is `prune(network, method, keep=..., seed=seed)`, then `fine_tune` epochs on `data`
    (distilled / augmented / adversarial as in `prunecert.prune.finetune`). `max_accuracy_drop` (needs
    `data`) also requires test accuracy >= the original's minus that much. Per-layer bisection stops
    at `resolution` of the layer's width (at least one neuron). `time_limit` (seconds) stops
    the search early with the best certified model so far. `samples`: points per region of certify's
    counterexample search.
    """
    start = time.perf_counter()
    regions = list(regions)
    if not regions:
        raise ConfigError("certified-budget pruning needs at least one region")
    if coarse_steps < 0:
        raise ConfigError(f"coarse_steps must be >= 0, got {coarse_steps}")
    if not 0 < resolution < 1:
        raise ConfigError(f"resolution must lie in (0, 1), got {resolution}")
    if (fine_tune or max_accuracy_drop is not None) and data is None:
        raise ConfigError("fine-tuning and max_accuracy_drop need data (e.g. data='mnist5k')")
    ds = None if data is None else data if isinstance(data, Dataset) else load_dataset(str(data))
    original_accuracy = None if ds is None else evaluate(network, ds.x_test, ds.y_test)
    accuracy_floor = None if max_accuracy_drop is None or original_accuracy is None \
        else original_accuracy - max_accuracy_drop
    layers = hidden_layers(network)
    sizes = {i: geometry(network, i).n for i in layers}
    needed = requirement.needed(len(regions))  # relative: set again once the unpruned copy is certified
    settings = BudgetSettings(
        method=method, seed=int(seed), fine_tune=int(fine_tune), distill=bool(distill), augment=augment,
        adversarial=None if adversarial is None else
        (adversarial if isinstance(adversarial, dict) else asdict(adversarial)),
        max_accuracy_drop=max_accuracy_drop, certify_method=certify_method, coarse_steps=int(coarse_steps),
        refine=bool(refine), resolution=resolution, time_limit=time_limit, samples=int(samples),
        n_regions=len(regions))
    trace: list[Candidate] = []
    tried: dict[tuple[int, ...], Candidate] = {}
    best: _Best | None = None  # the smallest passing candidate

    def evaluate_candidate(keep: dict[int, int], stage: str) -> bool:
        nonlocal needed, best
        key = tuple(keep[i] for i in layers)
        if key in tried:
            return tried[key].passed
        t0 = time.perf_counter()
        full = all(keep[i] == sizes[i] for i in layers)
        g = prune(network, method, keep=dict(keep), seed=seed, progress=False)
        if fine_tune and not full:
            g = fine_tune_network(g, network, ds, fine_tune, seed=seed, distill=distill, augment=augment,
                                  adversarial=adversarial, progress=False)
        accuracy = None if ds is None else evaluate(g, ds.x_test, ds.y_test)
        result, certified, note, max_bound = None, None, "", None
        bad_centres = requirement.violated_at_centres(network, g, regions)
        if accuracy_floor is not None and accuracy is not None and accuracy < accuracy_floor:
            note = f"accuracy below {accuracy_floor:.4f}"
        elif len(regions) - bad_centres < needed:
            note = f"{bad_centres} centres already violate"
        else:
            result = certify(network, g, regions, method=certify_method, tolerance=requirement.tolerance,
                             progress=False, seed=seed, samples=samples)
            certified = requirement.certified(result)
            max_bound = float(np.max(result.max_abs_logit_deviation))
        if stage == "full" and requirement.relative and certified:
            needed = requirement.needed(certified)
        passed = certified is not None and certified >= needed
        cand = Candidate(stage, dict(keep), g.n_params(), 1.0 - g.n_params() / network.n_params(), certified,
                         needed, passed, max_bound, accuracy, round(time.perf_counter() - t0, 3), note)
        trace.append(cand)
        tried[key] = cand
        if passed and result is not None and (best is None or cand.params < best.candidate.params):
            best = _Best(cand, g, result)
        _log(progress, f"{stage:8s} keep {_keep_text(keep, layers)} ({cand.params:,} params, compression "
                       f"{100 * cand.compression:.1f} %): "
                       + (f"{certified}/{len(regions)} certified (need {needed}), max bound {max_bound:.4g}"
                          if certified is not None else f"skipped, {note}")
                       + (f", accuracy {accuracy:.4f}" if accuracy is not None else "")
                       + f" -> {'PASS' if passed else 'fail'} ({cand.seconds:.1f} s)")
        return passed

    def out_of_time() -> bool:
        return time_limit is not None and time.perf_counter() - start > time_limit

    _log(progress, f"{requirement.describe()} ({'relative' if requirement.relative else needed} of "
                   f"{len(regions)} regions), {certify_method}, "
                   f"pruning {method}" + (f", fine-tuning {fine_tune} epochs" if fine_tune else ""))
    if not evaluate_candidate(dict(sizes), "full") or best is None:
        raise ConfigError(f"{network.name}: the requirement ({requirement.describe()}) is not certified even "
                          f"with nothing pruned ({trace[0].certified or 0} of {needed} needed regions); widen "
                          f"the tolerance, lower the fraction, shrink the regions or use a tighter method")
    lo, hi = 0.0, 1.0  # hi passes
    for _ in range(int(coarse_steps)):
        if out_of_time():
            break
        mid = (lo + hi) / 2
        keep = {i: max(1, int(math.floor(mid * sizes[i] + 0.5))) for i in layers}
        if evaluate_candidate(keep, "coarse"):
            hi = mid
        else:
            lo = mid
    if refine:
        per_neuron = {i: _params_per_neuron(network, i) for i in layers}
        for i in sorted(layers, key=lambda i: -per_neuron[i]):
            low, high = 0, best.candidate.keep[i]  # `high` passes (with the others as in the best)
            step = max(1, int(math.ceil(resolution * sizes[i])))
            while high - low > step and not out_of_time():
                mid = (low + high) // 2
                keep = {**best.candidate.keep, i: mid}
                if evaluate_candidate(keep, f"layer {i}"):
                    high = mid
                else:
                    low = mid
    model = best.model
    meta = dict(model.metadata)
    rec = dict(meta["pruning"])
    result = BudgetResult(model, best.certificate, trace, requirement, original_accuracy,
                          time.perf_counter() - start, settings)
    rec["certified_budget"] = result.to_json()
    meta["pruning"] = rec
    model.metadata = meta
    _log(progress, f"smallest certified: keep {_keep_text(best.candidate.keep, layers)}, "
                   f"{best.candidate.params:,} params (compression {100 * best.candidate.compression:.1f} %), "
                   f"{len(trace)} candidates in {result.seconds:.1f} s")
    return result


def _keep_text(keep: dict[int, int], layers: list[int]) -> str:
    return "-".join(str(keep[i]) for i in layers)


def _params_per_neuron(net: Network, index: int) -> int:
    """Parameters one neuron of hidden layer `index` carries: its incoming row (and bias) and outgoing column."""
    g = geometry(net, index)
    return int(g.points.shape[1] + g.coeffs.shape[0] * g.coeffs.shape[2])
