"""Branch-and-bound on input splits, for networks with few inputs: leaves are sub-boxes.

A leaf's bound on every logit's Delta comes from the batched bound propagation (`lp.initial_bounds`:
diff-linear when installed, intersected with ReluDiff intervals), so hundreds of leaves are bounded
in one call. The leaves with the largest bound on M = max_k |Delta_k| are bisected along the input
whose (gradient x width) at the leaf centre is largest (the "smear" heuristic); leaves whose bound
cannot beat the best value reached at any evaluated point are closed. With few inputs this converges
quickly, unlike ReLU splits without re-tightened intermediate bounds; with many inputs (images) it
does not, and `bab.py` branches on ReLUs instead.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from prunecert.certify.formulation import Array
from prunecert.certify.lp import initial_bounds
from prunecert.certify.result import BabRegionInfo
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch
from prunecert.threads import one_torch_thread

BATCH = 64   # leaves split per step (each gives two children, bounded in one batched call)


def _leaf_bounds(pair: Pair, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) lower/upper bounds on the logits' Delta over each box."""
    pb = initial_bounds(pair, RegionBatch(lo, hi), optimize=False)
    d = pb.delta[-1]
    n = lo.shape[0]
    return d.lower.reshape(n, -1), d.upper.reshape(n, -1)


def _split_dims(pair: Pair, lo: torch.Tensor, hi: torch.Tensor, worst: torch.Tensor) -> torch.Tensor:
    """Per leaf, the input to bisect: largest |d Delta_worst / dx| * width at the centre (else widest)."""
    centre = ((lo + hi) / 2).clone().requires_grad_(True)
    d = pair.deltas(centre)[-1].reshape(len(lo), -1)
    picked = d.gather(1, worst[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, centre)
    width = (hi - lo).reshape(len(lo), -1)
    score = grad.abs().reshape(len(lo), -1) * width
    flat = torch.where(score.max(1, keepdim=True).values > 0, score, width)
    return flat.argmax(1)


def within_gap(upper: float, reached: float, rel_gap: float) -> bool:
    """The bound is within `rel_gap` (relative) of a value reached: the search is done."""
    return upper <= reached + rel_gap * abs(reached) + 1e-12


def stop_reason(upper: float, reached: float, rel_gap: float, tolerance: float | None, deadline: float) -> str | None:
    """Why a search may stop now: with a tolerance, only "certified" / "violated" (the verdict asked
    for; a bound close to the reached value does not decide it); without, "gap" (bound within
    rel_gap of a reached value); then "time"; None to go on."""
    if tolerance is not None:
        if upper <= tolerance:
            return "certified"
        if reached > tolerance:
            return "violated"
    elif within_gap(upper, reached, rel_gap):
        return "gap"
    if time.perf_counter() >= deadline:
        return "time"
    return None


def input_bab(pair: Pair, lo: Array, hi: Array, tolerance: float | None, deadline: float,
              rel_gap: float, reached: float, point: Array | None, logits: list[int] | None = None
              ) -> tuple[Array, Array, BabRegionInfo]:
    """Refine the logits' Delta bounds over the box [lo, hi] by bisecting inputs until done or out of time.

    Returns per-coordinate (lower, upper) over the whole box (max over all leaves, open or closed)
    and details. `reached`/`point`: the best max |Delta_logit| already known and where. `logits`:
    the coordinates whose max |Delta_k| is the quantity (all by default).
    """
    with one_torch_thread():
        return _input_bab(pair, lo, hi, tolerance, deadline, rel_gap, reached, point, logits)


def _input_bab(pair: Pair, lo: Array, hi: Array, tolerance: float | None, deadline: float,
               rel_gap: float, reached: float, point: Array | None, logits: list[int] | None
               ) -> tuple[Array, Array, BabRegionInfo]:
    shape = pair.input_shape
    box_lo = torch.as_tensor(lo, dtype=torch.float64).reshape(1, *shape)
    box_hi = torch.as_tensor(hi, dtype=torch.float64).reshape(1, *shape)
    leaf_lo, leaf_hi = box_lo, box_hi
    delta_lo, delta_hi = _leaf_bounds(pair, leaf_lo, leaf_hi)
    closed_lo = torch.full_like(delta_lo[0], np.inf)
    closed_hi = torch.full_like(delta_hi[0], -np.inf)
    nodes, steps = 1, 0

    cols: slice | torch.Tensor = slice(None) if logits is None else torch.as_tensor(logits)

    def worst_of(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per leaf, the bound on max_k |Delta_k| over the chosen logits, and which logit has it."""
        values, indices = torch.maximum(upper, -lower)[:, cols].max(1)
        return values, indices

    while True:
        leaf_max, _ = worst_of(delta_lo, delta_hi)
        # close leaves that cannot raise the max beyond what is reached
        keep = leaf_max > reached
        closed_lo = torch.minimum(closed_lo, delta_lo[~keep].min(0).values) if (~keep).any() else closed_lo
        closed_hi = torch.maximum(closed_hi, delta_hi[~keep].max(0).values) if (~keep).any() else closed_hi
        leaf_lo, leaf_hi, leaf_max = leaf_lo[keep], leaf_hi[keep], leaf_max[keep]
        delta_lo, delta_hi = delta_lo[keep], delta_hi[keep]
        # closed leaves count on the chosen logits only, as open ones do (leaf_max)
        upper = max(float(leaf_max.max()) if len(leaf_max) else -np.inf,
                    float(torch.maximum(closed_hi, -closed_lo)[cols].max()))
        stop = "gap" if not len(leaf_max) else stop_reason(upper, reached, rel_gap, tolerance, deadline)
        if stop:
            break
        order = torch.argsort(leaf_max, descending=True)
        top, rest = order[:BATCH], order[BATCH:]
        _, worst = worst_of(delta_lo[top], delta_hi[top])
        if logits is not None:
            worst = torch.as_tensor(logits)[worst]
        dims = _split_dims(pair, leaf_lo[top], leaf_hi[top], worst)
        parent_lo, parent_hi = leaf_lo[top].reshape(len(top), -1), leaf_hi[top].reshape(len(top), -1)
        rows = torch.arange(len(top))
        mid = (parent_lo[rows, dims] + parent_hi[rows, dims]) / 2
        left_hi, right_lo = parent_hi.clone(), parent_lo.clone()
        left_hi[rows, dims] = mid
        right_lo[rows, dims] = mid
        child_lo = torch.cat([parent_lo, right_lo]).reshape(-1, *shape)
        child_hi = torch.cat([left_hi, parent_hi]).reshape(-1, *shape)
        child_delta_lo, child_delta_hi = _leaf_bounds(pair, child_lo, child_hi)
        nodes += len(child_lo)
        steps += 1
        # lower bounds: the children's centres
        with torch.no_grad():
            dev = pair.deltas((child_lo + child_hi) / 2)[-1].reshape(len(child_lo), -1)[:, cols].abs().max(1).values
        best = int(dev.argmax())
        if float(dev[best]) > reached:
            reached, point = float(dev[best]), ((child_lo[best] + child_hi[best]) / 2).numpy().copy()
        leaf_lo = torch.cat([leaf_lo[rest], child_lo])
        leaf_hi = torch.cat([leaf_hi[rest], child_hi])
        delta_lo = torch.cat([delta_lo[rest], child_delta_lo])
        delta_hi = torch.cat([delta_hi[rest], child_delta_hi])
    out_lo = torch.minimum(closed_lo, delta_lo.min(0).values) if len(delta_lo) else closed_lo
    out_hi = torch.maximum(closed_hi, delta_hi.max(0).values) if len(delta_hi) else closed_hi
    up = float(torch.maximum(out_hi, -out_lo)[cols].max())
    info: BabRegionInfo = {"nodes": nodes, "open": int(len(delta_lo)), "upper": up, "reached": reached, "steps": steps,
                           "finished": within_gap(up, reached, rel_gap), "point": point,
                           "branching": "input", "stop": stop}
    return out_lo.numpy(), out_hi.numpy(), info
