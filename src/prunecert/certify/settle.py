"""Complete verdicts for class properties (`classprop`): proved, refuted with an input, or unknown.

`settle(pair, lo, hi, prop, ...)` decides P(m) on one box, in stages, each only where the previous
left the question open:

1. the bounds already computed for the region (diff-linear's, or any method's `PairBounds` row);
2. the centre and SAMPLES seeded uniform points, then a counterexample search injected by the caller (`search(lo, hi, prop, seconds) -> x or None`,
   e.g. `prunecert.adversarial.class_search`; certify does not import the attacks);
3. branch and bound until the deadline:
   - input splits on networks with <= INPUT_SPLIT_MAX inputs: the open leaves are bisected in
     batches and every batch of sub-boxes is bounded in one call of the fast engine
     (`lp.initial_bounds`: diff-linear intersected with ReluDiff); leaf centres are checked for
     counterexamples as they appear;
   - ReLU splits otherwise (`relu_verdict.py`): LP leaves with forced neuron phases, f's side
     condition as linear rows, rigorous dual bounds.
Every counterexample is replayed by a float64 forward pass before it is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from prunecert.certify.classprop import (
    ClassProperty,
    Settled,
    open_classes,
    replay,
    violations,
)
from prunecert.certify.formulation import Array, check_encodable, encodable
from prunecert.certify.lp import initial_bounds
from prunecert.certify.relu_verdict import relu_settle
from prunecert.certify.result import PairBounds
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch
from prunecert.stage_budgets import SETTLE_SEARCH_SHARE as SEARCH_SHARE  # the time split is policy (stage_budgets)
from prunecert.threads import one_torch_thread

INPUT_SPLIT_MAX = 16   # bisect the input on networks with at most this many inputs
BATCH = 256            # leaves bisected per step (their children are bounded in one call)
SAMPLES = 2048         # uniform points checked before the injected search
SAMPLE_BATCH = 256     # of them per forward pass; the deadline is checked between batches (2049 points
                       # of the vgg-small pair took 7.7 s CPU in one pass, past a 5 s budget)

# (lo, hi, property, seconds) -> an input refuting the property, or None
ClassSearch = Callable[[Array, Array, ClassProperty, float], "Array | None"]


def complete_fits(pair: Pair) -> bool:
    """Whether the complete stage can branch on this pair: input splits (few inputs), or ReLU splits
    on an LP of at most `formulation.MAX_COLUMNS` columns (the CNN pair's 60588 were built for every
    open region, and the budget ran out in the LP)."""
    return pair.f.n_inputs <= INPUT_SPLIT_MAX or encodable(pair)


def check_complete(pair: Pair, what: str, advice: str) -> None:
    """Refuse, before any work, a complete stage that `complete_fits` rules out (a ConfigError naming
    `what`, the columns and the limit, then `advice`)."""
    if not complete_fits(pair):
        check_encodable(pair, what, advice)


def _refuted(pair: Pair, x: Array, prop: ClassProperty, stage: str, start: float, **details: int
             ) -> Settled | None:
    classes = replay(pair, x, prop)
    if classes is None:
        return None
    return Settled("refuted", stage, np.asarray(x, dtype=np.float64).reshape(pair.input_shape).copy(), *classes,
                   seconds=time.perf_counter() - start, details={**details})


def settle(pair: Pair, lo: Array, hi: Array, prop: ClassProperty, budget: float,
           bounds: PairBounds | None = None, search: ClassSearch | None = None,
           branching: str = "auto", samples: int | None = None) -> Settled:
    """Decide `prop` on the box [lo, hi] within `budget` seconds (see the module docstring).

    `bounds`: sound bounds of this one region (batch 1) to start from; computed when None.
    `branching`: "input", "relu" or "auto" (input on networks with <= INPUT_SPLIT_MAX inputs); ReLU
    splits on a pair whose LP exceeds `formulation.MAX_COLUMNS` are refused (ConfigError) before any work.
    `samples`: uniform points checked before the search (default SAMPLES; 16x that on networks with
    <= INPUT_SPLIT_MAX inputs, where a forward pass costs little and the space is small).
    """
    if branching == "auto":
        branching = "input" if pair.f.n_inputs <= INPUT_SPLIT_MAX else "relu"
    if branching == "relu":
        check_encodable(pair, "complete verdicts (ReLU branch and bound)", "decide this property by its bounds and "
                        "a counterexample search only")
    start = time.perf_counter()
    deadline = start + float(budget)
    lo = np.asarray(lo, dtype=np.float64).reshape(pair.input_shape)
    hi = np.asarray(hi, dtype=np.float64).reshape(pair.input_shape)
    if bounds is None:
        bounds = initial_bounds(pair, RegionBatch(torch.as_tensor(lo)[None], torch.as_tensor(hi)[None]))
    if not bool(open_classes(bounds, prop).any()):
        return Settled("proved", "bounds", seconds=time.perf_counter() - start)
    if samples is None:
        samples = SAMPLES * (16 if pair.f.n_inputs <= INPUT_SPLIT_MAX else 1)
    found = _sampled(pair, lo, hi, prop, start, samples, deadline)
    if found is not None:
        return found
    if time.perf_counter() >= deadline:
        return Settled("unknown", "time", seconds=time.perf_counter() - start, details={"nodes": 0})
    if search is not None:
        x = search(lo, hi, prop, SEARCH_SHARE * budget)
        # a search's point is clipped into the box (and then replayed): a refutation lies in the region
        x = None if x is None else np.clip(np.asarray(x, dtype=np.float64).reshape(lo.shape), lo, hi)
        found = None if x is None else _refuted(pair, x, prop, "search", start)
        if found is not None:
            return found
    if branching == "input":
        with one_torch_thread():
            out = _input_bab(pair, lo, hi, prop, deadline, start)
    else:
        out = relu_settle(pair, lo, hi, prop, deadline, bounds)
    out.seconds = time.perf_counter() - start
    return out


def _sampled(pair: Pair, lo: Array, hi: Array, prop: ClassProperty, start: float,
             samples: int, deadline: float) -> Settled | None:
    """The centre and `samples` seeded uniform points, in batches of SAMPLE_BATCH until one refutes or
    the deadline passes: a cheap first search (the first violating point in the seeded order)."""
    gen = torch.Generator().manual_seed(0)
    lo_t, hi_t = torch.as_tensor(lo), torch.as_tensor(hi)
    x = lo_t + (hi_t - lo_t) * torch.rand((samples, *lo.shape), generator=gen, dtype=torch.float64)
    x = torch.cat([((lo_t + hi_t) / 2)[None], x])
    for a in range(0, len(x), SAMPLE_BATCH):
        if a and time.perf_counter() >= deadline:
            return None
        bad = violations(pair, x[a:a + SAMPLE_BATCH], prop).nonzero().flatten()
        if len(bad):
            return _refuted(pair, x[a + int(bad[0])].numpy(), prop, "search", start)
    return None


def _split(pair: Pair, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bisect each box along the input of largest (|grad| x width) of f's and g's top-2 margins at its
    centre (the widest input where the gradient vanishes); returns the 2B children (left then right)."""
    n = len(lo)
    centre = ((lo + hi) / 2).clone().requires_grad_(True)
    yf = pair.f.forward(centre).reshape(n, -1)
    yg = pair.g.forward(centre).reshape(n, -1)
    top = yf.detach().topk(2, dim=1).indices
    pick = (yf.gather(1, top[:, :1]) - yf.gather(1, top[:, 1:]) + yg.gather(1, top[:, :1]) - yg.gather(1, top[:, 1:]))
    (grad,) = torch.autograd.grad(pick.sum(), centre)
    width = (hi - lo).reshape(n, -1)
    score = grad.abs().reshape(n, -1) * width
    dims = torch.where(score.max(1).values > 0, score.argmax(1), width.argmax(1))
    parent_lo, parent_hi = lo.reshape(n, -1), hi.reshape(n, -1)
    rows = torch.arange(n)
    mid = (parent_lo[rows, dims] + parent_hi[rows, dims]) / 2
    left_hi, right_lo = parent_hi.clone(), parent_lo.clone()
    left_hi[rows, dims] = mid
    right_lo[rows, dims] = mid
    shape = lo.shape[1:]
    return torch.cat([parent_lo, right_lo]).reshape(-1, *shape), torch.cat([left_hi, parent_hi]).reshape(-1, *shape)


def _input_bab(pair: Pair, lo: Array, hi: Array, prop: ClassProperty, deadline: float,
               start: float) -> Settled:
    """Bisect the input box until no leaf is open (proved), a leaf centre refutes, or time is up."""
    leaf_lo = torch.as_tensor(lo)[None]
    leaf_hi = torch.as_tensor(hi)[None]
    total = float(torch.prod(leaf_hi - leaf_lo))
    nodes = 1
    while len(leaf_lo):
        if time.perf_counter() >= deadline:
            left = float(torch.prod((leaf_hi - leaf_lo).reshape(len(leaf_lo), -1), 1).sum())
            return Settled("unknown", "time", details={"nodes": nodes, "open": len(leaf_lo),
                                                       "open_volume": left / total if total > 0 else None})
        take = min(BATCH, len(leaf_lo))
        child_lo, child_hi = _split(pair, leaf_lo[:take], leaf_hi[:take])
        nodes += len(child_lo)
        mid = (child_lo + child_hi) / 2
        bad = violations(pair, mid, prop).nonzero().flatten()
        if len(bad):
            found = _refuted(pair, mid[int(bad[0])].numpy(), prop, "input-bab", start, nodes=nodes)
            if found is not None:
                return found
        still = open_classes(initial_bounds(pair, RegionBatch(child_lo, child_hi), optimize=False), prop).any(dim=1)
        leaf_lo = torch.cat([leaf_lo[take:], child_lo[still]])
        leaf_hi = torch.cat([leaf_hi[take:], child_hi[still]])
    return Settled("proved", "input-bab", details={"nodes": nodes})
