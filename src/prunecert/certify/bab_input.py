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

from prunecert.certify.lp import initial_bounds
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


def input_bab(pair: Pair, lo: np.ndarray, hi: np.ndarray, tolerance: float | None, deadline: float,
              rel_gap: float, reached: float, point: np.ndarray | None, logits: list[int] | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Refine the logits' Delta bounds over the box [lo, hi] by bisecting inputs until done or out of time.

    Returns per-coordinate (lower, upper) over the whole box (max over all leaves, open or closed)
    and details. `reached`/`point`: the best max |Delta_logit| already known and where. `logits`:
    the coordinates whose max |Delta_k| is the quantity (all by default).
    """
    with one_torch_thread():
        return _input_bab(pair, lo, hi, tolerance, deadline, rel_gap, reached, point, logits)


def _input_bab(pair: Pair, lo: np.ndarray, hi: np.ndarray, tolerance: float | None, deadline: float,
               rel_gap: float, reached: float, point: np.ndarray | None, logits: list[int] | None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    shape = pair.input_shape
    box_lo = torch.as_tensor(lo, dtype=torch.float64).reshape(1, *shape)
    box_hi = torch.as_tensor(hi, dtype=torch.float64).reshape(1, *shape)
    leaf_lo, leaf_hi = box_lo, box_hi
    d_lo, d_hi = _leaf_bounds(pair, leaf_lo, leaf_hi)
    closed_lo = torch.full_like(d_lo[0], np.inf)
    closed_hi = torch.full_like(d_hi[0], -np.inf)
    nodes, steps = 1, 0

    cols = slice(None) if logits is None else torch.as_tensor(logits)

    def worst_of(dl, dh):
        return torch.maximum(dh, -dl)[:, cols].max(1)

    while True:
        m, _ = worst_of(d_lo, d_hi)
        # close leaves that cannot raise the max beyond what is reached
        keep = m > reached
        closed_lo = torch.minimum(closed_lo, d_lo[~keep].min(0).values) if (~keep).any() else closed_lo
        closed_hi = torch.maximum(closed_hi, d_hi[~keep].max(0).values) if (~keep).any() else closed_hi
        leaf_lo, leaf_hi, d_lo, d_hi, m = leaf_lo[keep], leaf_hi[keep], d_lo[keep], d_hi[keep], m[keep]
        upper = max(float(m.max()) if len(m) else -np.inf, float(torch.maximum(closed_hi, -closed_lo).max()))
        stop = "gap" if not len(m) else stop_reason(upper, reached, rel_gap, tolerance, deadline)
        if stop:
            break
        order = torch.argsort(m, descending=True)
        top, rest = order[:BATCH], order[BATCH:]
        _, worst = worst_of(d_lo[top], d_hi[top])
        if logits is not None:
            worst = torch.as_tensor(logits)[worst]
        dims = _split_dims(pair, leaf_lo[top], leaf_hi[top], worst)
        p_lo, p_hi = leaf_lo[top].reshape(len(top), -1), leaf_hi[top].reshape(len(top), -1)
        rows = torch.arange(len(top))
        mid = (p_lo[rows, dims] + p_hi[rows, dims]) / 2
        left_hi, right_lo = p_hi.clone(), p_lo.clone()
        left_hi[rows, dims] = mid
        right_lo[rows, dims] = mid
        c_lo = torch.cat([p_lo, right_lo]).reshape(-1, *shape)
        c_hi = torch.cat([left_hi, p_hi]).reshape(-1, *shape)
        cd_lo, cd_hi = _leaf_bounds(pair, c_lo, c_hi)
        nodes += len(c_lo)
        steps += 1
        # lower bounds: the children's centres
        with torch.no_grad():
            dev = pair.deltas((c_lo + c_hi) / 2)[-1].reshape(len(c_lo), -1)[:, cols].abs().max(1).values
        best = int(dev.argmax())
        if float(dev[best]) > reached:
            reached, point = float(dev[best]), ((c_lo[best] + c_hi[best]) / 2).numpy().copy()
        leaf_lo = torch.cat([leaf_lo[rest], c_lo])
        leaf_hi = torch.cat([leaf_hi[rest], c_hi])
        d_lo = torch.cat([d_lo[rest], cd_lo])
        d_hi = torch.cat([d_hi[rest], cd_hi])
    out_lo = torch.minimum(closed_lo, d_lo.min(0).values) if len(d_lo) else closed_lo
    out_hi = torch.maximum(closed_hi, d_hi.max(0).values) if len(d_hi) else closed_hi
    up = float(torch.maximum(out_hi, -out_lo)[cols].max())
    info = {"nodes": nodes, "open": int(len(d_lo)), "upper": up, "reached": reached, "steps": steps,
            "finished": within_gap(up, reached, rel_gap), "point": point,
            "branching": "input", "stop": stop}
    return out_lo.numpy(), out_hi.numpy(), info
