"""Branch-and-bound: tighten max |Delta_logit| to a target, anytime and sound.

The quantity is M = max_k |Delta_k|, the largest of the 2K objectives +-Delta_k. Two branchings:

- ReLU splits (this module; networks with many inputs). Start from the LP pass
  (`lp.refine_region`: tightened neuron bounds, LP bounds on every logit). A leaf is an objective
  plus forced neuron phases (on: a >= 0, h = a; off: a <= 0, h = 0); its bound is the rigorous dual
  bound of the triangle-relaxation LP under those splits. Splits are only bound changes, so one
  HiGHS model is re-solved warm. The leaf with the largest bound is split on the unstable neuron
  most violated at its LP optimum (h - relu(a), the BaBSR idea without the dual weighting).
- Input splits (`bab_input.py`; networks with few inputs): bisect the box, bound leaves in batches.

Anytime: the sound bound is the max over open *and* closed leaves, whenever the search stops. Leaves
whose bound cannot beat the best reached value are closed. Reached values come from LP optima and
leaf centres (forward passes), random samples and, when installed, an APGD attack. Stop reasons:
"gap" (bound within `rel_gap` of the reached value), "certified" (bound <= tolerance), "violated"
(reached > tolerance), "time", "exhausted". Derivations: docs/theory.md.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify.bab_input import input_bab, stop_reason, within_gap
from prunecert.certify.formulation import Array, Encoding, RegionBounds, build_encoding
from prunecert.certify.highs import HighsModel
from prunecert.certify.lp import RegionLP, initial_bounds, refine_region, to_pair_bounds, unit
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.certify.result import BabRegionInfo, PairBounds
from prunecert.core.pair import Pair
from prunecert.errors import ConfigError
from prunecert.progress import stage_line
from prunecert.stage_budgets import BAB_ATTACK_SHARE as ATTACK_SHARE  # the time split is policy (stage_budgets)
from prunecert.stage_budgets import BAB_LP_SHARE as LP_SHARE
from prunecert.stage_budgets import BAB_SECONDS

EXACT_GAP = 1e-9        # a leaf whose relaxation is this close to the ReLUs at its optimum is exact
INPUT_SPLIT_MAX = 16    # "auto" branching bisects the input box up to this many inputs

Splits = tuple[tuple[int, bool], ...]   # forced neuron phases: (index into Encoding.neurons, on)


@dataclass(order=True)
class _Leaf:
    """One open leaf: an objective under forced phases, ordered by (-bound, creation) in the heap."""

    key: float
    seq: int
    upper: float = field(compare=False)
    obj: int = field(compare=False)
    splits: Splits = field(compare=False)
    branch: int | None = field(compare=False)   # neuron index to split next (None: leaf is exact)


def apply_splits(enc: Encoding, model: HighsModel, splits: Splits, undo: bool = False) -> None:
    """Force (or, with `undo`, release) neuron phases in an LP model: (neuron index, on) pairs;
    on: a >= 0 and h = a; off: a <= 0 and h = 0. Only bound changes, so re-solves stay warm."""
    for index, on in splits:
        neuron = enc.neurons[index]
        if undo:
            cols = [neuron.a, neuron.h]
            model.set_col_bounds(cols, enc.col_lo[cols], enc.col_hi[cols])
            model.set_row_bounds(neuron.lower_row, enc.row_lo[neuron.lower_row], enc.row_hi[neuron.lower_row])
        elif on:
            model.set_col_bounds(neuron.a, max(enc.col_lo[neuron.a], 0.0), max(enc.col_hi[neuron.a], 0.0))
            model.set_row_bounds(neuron.lower_row, 0.0, 0.0)
        else:
            model.set_col_bounds(neuron.a, min(enc.col_lo[neuron.a], 0.0), min(enc.col_hi[neuron.a], 0.0))
            model.set_col_bounds(neuron.h, 0.0, 0.0)


def pick_branch(enc: Encoding, v: Array | None, splits: Splits) -> int | None:
    """The unsplit neuron whose relaxation is most violated at the LP optimum v (h - relu(a)); without
    a solution, the first unsplit neuron; None when the relaxation is exact at v (or all are split)."""
    done = {n for n, _ in splits}
    if v is None:
        free = [i for i in range(len(enc.neurons)) if i not in done]
        return free[0] if free else None
    branch: int | None = None
    best = EXACT_GAP
    for i, neuron in enumerate(enc.neurons):
        gap = v[neuron.h] - max(v[neuron.a], 0.0)
        if gap > best and i not in done:
            best, branch = gap, i
    return branch


class _Tree:
    """The leaves of one region's search, over the objectives +-Delta_k of the logits."""

    def __init__(self, pair: Pair, enc: Encoding, objectives: list[tuple[int, float]], cols: list[int]) -> None:
        self.pair, self.enc, self.objectives, self.cols = pair, enc, objectives, cols
        self.model = HighsModel(enc)
        self.heap: list[_Leaf] = []
        self.closed = np.full(len(objectives), -np.inf)   # max bound of closed leaves, per objective
        self.seq = itertools.count()
        self.reached = -np.inf
        self.point: Array | None = None
        self.nodes = 0
        self.c = [unit(enc, enc.af[-1][k], enc.ag[-1][k]) * s for k, s in objectives]

    def see(self, x: npt.ArrayLike) -> None:
        """Record max |Delta_logit| at input x (a reached value: a lower bound on M)."""
        with torch.no_grad():
            d = self.pair.deltas(torch.as_tensor(x).reshape(1, *self.pair.input_shape))[-1]
        v = float(d.reshape(-1)[self.cols].abs().max())
        if v > self.reached:
            self.reached, self.point = v, np.asarray(x).reshape(self.pair.input_shape).copy()

    def _apply(self, splits: Splits, undo: bool = False) -> None:
        apply_splits(self.enc, self.model, splits, undo)

    def solve(self, obj: int, splits: Splits) -> None:
        """Bound one leaf and queue it (infeasible leaves vanish, proven by a Farkas ray)."""
        self._apply(splits)
        try:
            sol = self.model.maximize_lp(self.c[obj])
        finally:
            self._apply(splits, undo=True)
        self.nodes += 1
        if sol.bound == -np.inf:
            return
        if sol.v is not None:
            self.see(np.clip(sol.v[self.enc.x], self.enc.col_lo[self.enc.x], self.enc.col_hi[self.enc.x]))
        branch = pick_branch(self.enc, sol.v, splits)
        leaf = _Leaf(-sol.bound, next(self.seq), sol.bound, obj, splits, branch)
        if branch is None:
            self.closed[obj] = max(self.closed[obj], sol.bound)
        else:
            heapq.heappush(self.heap, leaf)

    def upper(self) -> float:
        top = -self.heap[0].key if self.heap else -np.inf
        return float(max(top, self.closed.max(initial=-np.inf)))

    def per_objective(self) -> Array:
        out = self.closed.copy()
        for leaf in self.heap:
            out[leaf.obj] = max(out[leaf.obj], leaf.upper)
        return out

    def step(self) -> None:
        """Split the leaf with the largest bound (or close it if it cannot beat the reached value)."""
        leaf = heapq.heappop(self.heap)
        if leaf.upper <= self.reached:
            self.closed[leaf.obj] = max(self.closed[leaf.obj], leaf.upper)
            return
        assert leaf.branch is not None  # `solve` closes exact leaves instead of queueing them
        for on in (True, False):
            self.solve(leaf.obj, leaf.splits + ((leaf.branch, on),))


def _max_abs(pair: Pair, x: torch.Tensor, cols: list[int] | None = None) -> torch.Tensor:
    with torch.no_grad():
        d = pair.deltas(x)[-1].reshape(len(x), -1)
    return (d if cols is None else d[:, cols]).abs().max(1).values


# a search for large max |Delta_logit| in a box: (lo, hi, seconds) -> an input, or None
# (e.g. `prunecert.adversarial.reach_search(pair)`; certify does not import the attacks)
ReachSearch = Callable[[Array, Array, float], "npt.ArrayLike | None"]


def lower_bound(pair: Pair, lo: Array, hi: Array, budget: float, seed: int,
                reach: ReachSearch | None = None, cols: list[int] | None = None) -> tuple[float, Array]:
    """A reached max |Delta_logit| and its input: centre, random samples, and `reach` when given."""
    gen = torch.Generator().manual_seed(int(seed))
    lo_t, hi_t = torch.as_tensor(lo), torch.as_tensor(hi)
    x = torch.cat([((lo_t + hi_t) / 2)[None], lo_t + (hi_t - lo_t) * torch.rand((255, *lo_t.shape), generator=gen,
                                                                                 dtype=torch.float64)])
    if reach is not None and budget > 0:
        found = reach(lo, hi, budget)
        if found is not None:
            x = torch.cat([x, torch.as_tensor(np.clip(np.asarray(found, dtype=np.float64).reshape(lo.shape), lo, hi))[None]])
    d = _max_abs(pair, x, cols)
    best = int(d.argmax())
    return float(d[best]), x[best].numpy().copy()


def bab_region(pair: Pair, lo: Array, hi: Array, rb: RegionBounds, tolerance: float | None,
               deadline: float, rel_gap: float, seed: int = 0, attack_budget: float = 0.0,
               reach: ReachSearch | None = None, logits: Sequence[int] | None = None
               ) -> tuple[RegionBounds, BabRegionInfo]:
    """Refine the logits' Delta bounds of one box (from LP-tightened `rb`) by branch-and-bound
    (only the `logits` chosen, when given: their max |Delta_k| is the quantity)."""
    enc = build_encoding(pair, lo, hi, rb)
    assert rb.delta is not None  # refine_region's bounds always carry Delta
    last = pair.n_layers - 1
    dlo, dhi = rb.delta[last]
    chosen = list(range(len(dlo))) if logits is None else [int(k) for k in logits]
    objectives = [(k, s) for k in chosen for s in (1.0, -1.0) if enc.af[last][k] != enc.ag[last][k]]
    tree = _Tree(pair, enc, objectives, chosen)
    tree.see(lower_bound(pair, lo, hi, attack_budget, seed, reach, chosen)[1])
    roots = [float(dhi[k]) if s > 0 else float(-dlo[k]) for k, s in objectives]
    for j in np.argsort(roots)[::-1]:
        if roots[j] > tree.reached and time.perf_counter() < deadline:
            tree.solve(int(j), ())
        else:
            tree.closed[j] = roots[j]
    stop: str | None = "gap"
    while tree.heap:
        stop = stop_reason(tree.upper(), tree.reached, rel_gap, tolerance, deadline)
        if stop:
            break
        tree.step()
    else:
        stop = stop_reason(tree.upper(), tree.reached, rel_gap, tolerance, deadline) or "exhausted"
    bounds = tree.per_objective()
    rb = rb.copy()
    assert rb.delta is not None
    dlo, dhi = rb.delta[last]
    for (k, s), b in zip(objectives, bounds):
        if s > 0:
            dhi[k] = min(dhi[k], b)
        else:
            dlo[k] = max(dlo[k], -b)
    up = tree.upper() if objectives else 0.0
    info: BabRegionInfo = {"nodes": tree.nodes, "open": len(tree.heap), "upper": float(max(up, 0.0)),
                           "reached": tree.reached, "finished": not tree.heap or within_gap(up, tree.reached, rel_gap),
                           "point": tree.point, "branching": "relu", "stop": stop}
    return rb, info


@boxes_or_batch
def bab_bounds(pair: Pair, region: RegionBatch, tolerance: float | None = None, time_limit: float = BAB_SECONDS,
               rel_gap: float = 0.01, seed: int = 0, local: bool = False,
               branching: str = "auto", progress: bool = False, logits: Sequence[int] | None = None,
               reach: ReachSearch | None = None) -> PairBounds:
    """Branch-and-bound bounds on the logits' Delta for a batch of boxes; other layers from LP.

    Starts from the fast bounds (`lp.initial_bounds`: diff-linear intersected with ReluDiff) and is
    never looser. `time_limit` (seconds) is per region,
    everything included. With a `tolerance` it stops as soon as max |Delta_k| (over `logits`, all
    by default) is decided against it -- a region the fast bounds already certify costs nothing
    more; without one, when the maximum is known within `rel_gap` (relative). `branching`: "input"
    (bisect the box; few inputs), "relu" (split neurons, LP leaves) or "auto" (input when the
    network has <= INPUT_SPLIT_MAX inputs). `local=True` also bounds local deviations by LP (costs
    time). `reach`: a search for large deviations (an attack) run first. Details: `info["bab"]`.
    """
    budget = float(time_limit)
    if not budget > 0:
        raise ConfigError(f"bab: time budget must be > 0 seconds, got {budget}")
    if rel_gap < 0:
        raise ConfigError(f"bab: rel_gap must be >= 0, got {rel_gap}")
    if branching not in ("auto", "input", "relu"):
        raise ConfigError(f"bab: branching must be auto, input or relu, got {branching!r}")
    if branching == "auto":
        branching = "input" if pair.f.n_inputs <= INPUT_SPLIT_MAX else "relu"
    region = region.bounding_boxes()   # branch and bound splits boxes; a ball's box contains it (sound)
    lo_t, hi_t = region.lo, region.hi
    init = initial_bounds(pair, region)
    cols = list(range(pair.n_classes)) if logits is None else [int(k) for k in logits]
    logit_delta = init.delta[-1]
    fast = torch.maximum(logit_delta.upper, -logit_delta.lower).reshape(lo_t.shape[0], -1)[:, cols].max(1).values
    results: list[RegionLP] = []
    infos: list[BabRegionInfo] = []
    for b in range(lo_t.shape[0]):
        start = time.perf_counter()
        lo_b, hi_b = lo_t[b].numpy(), hi_t[b].numpy()
        rb = RegionBounds.from_pair_bounds(init, b)
        info: BabRegionInfo
        if tolerance is not None and float(fast[b]) <= tolerance:
            res = RegionLP(rb, [None] * pair.n_layers, None, None, 0, True)
            info = {"nodes": 0, "open": 0, "upper": float(fast[b]), "reached": 0.0, "finished": True,
                    "point": None, "branching": "none", "stop": "certified"}
        elif branching == "relu":
            res = refine_region(pair, lo_b, hi_b, rb, HighsModel, True, None, local, margins=True,
                                deadline=start + LP_SHARE * budget)
            res.bounds, info = bab_region(pair, lo_b, hi_b, res.bounds, tolerance, start + budget, rel_gap, seed,
                                          ATTACK_SHARE * budget, reach, logits)
        else:
            # the root LP first (cheap on the small nets input splits are for): the leaves' bounds
            # come from bound propagation, which can end a little above it, so intersect with it
            res = refine_region(pair, lo_b, hi_b, rb, HighsModel, True, None, local, margins=True,
                                deadline=start + LP_SHARE * budget)
            reached, point = lower_bound(pair, lo_b, hi_b, ATTACK_SHARE * budget, seed, reach, cols)
            split_lo, split_hi, info = input_bab(pair, lo_b, hi_b, tolerance, start + budget, rel_gap, reached,
                                                 point, cols)
            delta = res.bounds.delta
            assert delta is not None  # refine_region's bounds always carry Delta
            delta[-1] = (np.maximum(delta[-1][0], split_lo), np.minimum(delta[-1][1], split_hi))
            info["upper"] = float(np.maximum(delta[-1][1], -delta[-1][0])[cols].max())
            info["finished"] = within_gap(info["upper"], info["reached"], rel_gap)
        info["seconds"] = time.perf_counter() - start
        results.append(res)
        infos.append(info)
        stage_line(f"bab: region {b + 1}/{lo_t.shape[0]}: {info['nodes']} nodes ({info['branching']} splits), "
                   f"bound {info['upper']:.6g}, reached {info['reached']:.6g}", progress)
    out = to_pair_bounds(pair, results, init, "bab")
    out.info["bab"] = infos
    out.info["truncated"] = [i.get("stop") == "time" for i in infos]
    return out
