"""Class properties on networks with many inputs: branch and bound on ReLU splits, LP leaves.

For each class c left open by the bounds, f's side condition becomes rows f_c - f_j >= m (j != c;
the closure of the strict condition) of the triangle-relaxation LP of the pair over the box
(intermediate bounds LP-tightened first, `milp.tighten_bounds`). Every pair (c, j) asks
max g_j - g_c <= 0. A leaf is (j, forced neuron phases); its bound is the LP's rigorous dual bound
(`HighsModel.safe_bound`), so a proof rests on no solver's word. The leaf with the largest bound is
split on the neuron most violated at its LP optimum (`bab.pick_branch`), and every LP optimum is
replayed as an input (nudged just inside f's side condition when it sits on its boundary): a point
where f is confident in c and g strictly prefers another class is a counterexample. An infeasible leaf (no input of it is confidently c) vanishes, by a Farkas ray.
"""

from __future__ import annotations

import heapq
import itertools
import time

import numpy as np
import torch

from prunecert.certify.bab import Splits, apply_splits, pick_branch
from prunecert.certify.classprop import (
    ClassProperty,
    Settled,
    nudge,
    open_classes,
    replay,
)
from prunecert.certify.formulation import Array, Encoding, RegionBounds, build_encoding
from prunecert.certify.highs import HighsModel
from prunecert.certify.lp import unit
from prunecert.certify.result import PairBounds
from prunecert.core.pair import Pair


def relu_settle(pair: Pair, lo: Array, hi: Array, prop: ClassProperty, deadline: float,
                bounds: PairBounds) -> Settled:
    """Decide `prop` on one box by ReLU branch and bound (see the module docstring)."""
    enc = build_encoding(pair, lo, hi, RegionBounds.from_pair_bounds(bounds, 0))
    model = HighsModel(enc)
    last, n = pair.n_layers - 1, pair.n_classes
    with torch.no_grad():
        centre = int(pair.f.forward(torch.as_tensor((lo + hi) / 2)[None]).argmax())
    classes = sorted((int(c) for c in open_classes(bounds, prop)[0].nonzero().flatten()), key=lambda c: c != centre)
    stats: dict[str, int] = {"nodes": 0, "unstable": len(enc.neurons)}
    gap = -np.inf
    for c in classes:
        if time.perf_counter() >= deadline:
            gap = np.inf     # a class not looked at is open
            break
        rows = [model.add_side_row(np.array([enc.af[last][c], enc.af[last][j]]), np.array([1.0, -1.0]),
                                   prop.margin, np.inf) for j in range(n) if j != c]
        try:
            out = _class_bab(pair, enc, model, prop, c, deadline, stats)
        finally:
            for row in rows:
                model.set_row_bounds(row, -np.inf, np.inf)
        if isinstance(out, Settled):
            return out
        gap = max(gap, out)
    if gap > 0:
        # gap: the largest open bound (None: a class or root LP the time limit left unbounded)
        return Settled("unknown", "time", details={**stats, "gap": float(gap) if np.isfinite(gap) else None})
    return Settled("proved", "relu-bab", details={**stats})


# an open leaf: (-bound, creation order, class j, forced phases, neuron to split next or None if exact)
_Leaf = tuple[float, int, int, Splits, "int | None"]


def _class_bab(pair: Pair, enc: Encoding, model: HighsModel, prop: ClassProperty, c: int, deadline: float,
               stats: dict[str, int]) -> Settled | float:
    """Branch and bound over max_j (g_j - g_c) under f's side rows for class c: a counterexample, or
    the largest open bound (<= 0: class c is settled)."""
    last, n = pair.n_layers - 1, pair.n_classes
    heap: list[_Leaf] = []
    seq = itertools.count()

    def bound(j: int, splits: Splits) -> Settled | None:
        apply_splits(enc, model, splits)
        try:
            sol = model.maximize_lp(unit(enc, enc.ag[last][j], enc.ag[last][c]), deadline - time.perf_counter())
        finally:
            apply_splits(enc, model, splits, undo=True)
        stats["nodes"] += 1
        if sol.bound == -np.inf or sol.bound <= 0:
            return None      # infeasible, or g keeps c here
        if sol.v is not None:
            x = np.clip(sol.v[enc.x], enc.col_lo[enc.x], enc.col_hi[enc.x])
            classes = replay(pair, x, prop)
            if classes is None and (moved := nudge(pair, x, c, prop, enc.col_lo[enc.x], enc.col_hi[enc.x])):
                x, classes = moved   # the optimum sat on f's boundary; a point just inside refutes
            if classes is not None:
                return Settled("refuted", "relu-bab", x.reshape(pair.input_shape).copy(), *classes,
                               details={**stats})
        branch = pick_branch(enc, sol.v, splits)
        heapq.heappush(heap, (-float(sol.bound), next(seq), j, splits, branch))
        return None

    for j in range(n):
        if time.perf_counter() >= deadline:
            return np.inf    # out of time before every root was bounded (a large net's LPs)
        if j != c and (found := bound(j, ())) is not None:
            return found
    while heap:
        top, _, j, splits, branch = heap[0]
        if time.perf_counter() >= deadline or branch is None:
            return -top      # out of time, or an exact leaf above 0 that no replay confirmed
        heapq.heappop(heap)
        for on in (True, False):
            if (found := bound(j, splits + ((branch, on),))) is not None:
                return found
    return 0.0
