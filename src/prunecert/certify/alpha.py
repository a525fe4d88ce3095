"""Optimising the relaxation parameters of the Delta back-substitution (alpha-CROWN style).

Every lower slope alpha in [0, 1] and every mixing weight theta in [0, 1] gives a sound relaxation
(`relax.py`), so the bound of each row is a function of these parameters that we may minimise
freely: projected Adam on the sum of the rows' upper bounds, one parameter set per (region, row,
neuron), as in alpha-CROWN (Xu et al., ICLR 2021). The search runs in float32 without rounding
margins (it only *chooses* parameters); the chosen ones (the best seen per row) are then evaluated
once more in float64 with margins, and each row keeps the better of that and the default
relaxation's bound, so optimisation never loosens a bound. The search stops early once no row's
bound improves by 0.1% for 3 steps in a row (on LeNet-300-100 pairs: 4-9 steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from prunecert.certify.backsub import Engine, Form, concretise
from prunecert.core.interval import Bounds
from prunecert.core.region_batch import RegionBatch
from prunecert.certify.relax import DeltaParams

LEARNING_RATE = 0.5
DECAY = 0.9
PATIENCE = 3          # a row stops after this many steps in a row that improve it by < MIN_GAIN (relative)
MIN_GAIN = 1e-3
SEARCH_DTYPE = torch.float32
REGION_BUDGET = 2 ** 20   # elements of one (regions x rows x widest hidden layer) tensor in the search


class _Adam:
    """Projected Adam (Kingma & Ba 2015) onto [0, 1] with an exponentially decaying step.

    Written out (a few lines) because constructing a `torch.optim` optimiser imports torch._dynamo,
    which costs seconds on the first call of every process (every CLI run).
    """

    def __init__(self, leaves: list[torch.Tensor], lr: float = LEARNING_RATE, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.leaves, self.lr, self.betas, self.eps, self.t = leaves, lr, betas, eps, 0
        self.m = [torch.zeros_like(x) for x in leaves]
        self.v = [torch.zeros_like(x) for x in leaves]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None], active: torch.Tensor | None = None, dim: int = 0) -> None:
        """One step. `active`: optional bool mask over dimension `dim` of every leaf (the searches' rows
        or regions); entries it marks False keep their values, so each stops on its own."""
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * DECAY ** (self.t - 1) * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for x, g, m, v in zip(self.leaves, grads, self.m, self.v):
            if g is None:       # a parameter the bound does not depend on
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            stepped = x.addcdiv(m, v.sqrt().add_(self.eps), value=-lr).clamp_(0.0, 1.0)
            if active is None:
                x.copy_(stepped)
            else:
                x.copy_(torch.where(active.reshape(*([1] * dim), -1, *([1] * (x.dim() - dim - 1))), stepped, x))


def _initial_params(engine: Engine, top: int) -> list[torch.Tensor]:
    """Per hidden layer below `top`, one leaf (5, B, 1, *shape) holding the default parameters in
    DeltaParams.FIELDS order (one leaf per layer: fewer ops per search step than one per field)."""
    assert engine.delta is not None   # the pair engine (alpha-CROWN on Delta)
    out = []
    for k in range(top):
        side, rel = engine.side[k], engine.delta[k]
        fields = (side.alpha, rel.theta_up, rel.g.alpha, rel.theta_lo, rel.f.alpha)
        out.append(torch.stack(fields).unsqueeze(2).to(SEARCH_DTYPE).requires_grad_(True))
    return out


def _params(leaves: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[DeltaParams]:
    return [DeltaParams(*(leaf if dtype is None else leaf.to(dtype)).unbind(0)) for leaf in leaves]


def _search_engine(engine: Engine) -> Engine:
    """The same walk in SEARCH_DTYPE without rounding margins (ops convert their weights on the fly)."""
    assert engine.delta is not None   # the pair engine
    return Engine(engine.ctx, [s.to(SEARCH_DTYPE) for s in engine.side],
                  [d.to(SEARCH_DTYPE) for d in engine.delta], exact=False)


def optimise_rows(engine: Engine, top: int, region: RegionBatch, iterations: int, deadline: float | None = None,
                  rows: torch.Tensor | None = None) -> Bounds:
    """Optimised sound bounds on +-e_i of layer `top`'s Delta (the pair engine `engine`); the search
    stops early at `deadline` (perf_counter). `rows`: optional (B, 2n) mask of the rows to optimise
    per region (row i < n: +e_i, the upper bound; row n + i: -e_i, the lower bound); the others get
    infinite bounds. Every chosen (region, row) becomes its own one-row region of the search (no
    padding where regions choose different numbers of rows), in groups small enough that the
    per-region tensors of one group stay under REGION_BUDGET elements per hidden level: the autograd
    graph holds dozens of them (on the vgg-small pair, 10 regions at once peaked at 3 GB)."""
    shape = engine.ctx[top][-1].op.out_shape
    n = math.prod(shape)
    if rows is None:
        rows = torch.ones(region.batch, 2 * n, dtype=torch.bool)
    which, row = rows.nonzero(as_tuple=True)
    ub = torch.full((region.batch, 2 * n), torch.inf, dtype=torch.float64)
    levels = sum(math.prod(s.s.shape[1:]) for s in engine.side[:top])
    group = max(1, REGION_BUDGET // max(levels, 1))
    for a in range(0, len(row), group):
        idx = which[a:a + group]
        ub[idx, row[a:a + group]] = _optimise(engine.select(idx), top, region.select(idx), iterations, deadline,
                                              row[a:a + group])
    return Bounds(-ub[:, n:].reshape(-1, *shape), ub[:, :n].reshape(-1, *shape))


def _unit_rows(row: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(K, 1, *shape) float64 rows: +e_row for row < n, else -e_(row - n)."""
    n = math.prod(shape)
    out = torch.zeros(len(row), n, dtype=torch.float64)
    out.scatter_(1, (row % n).unsqueeze(1), torch.where(row < n, 1.0, -1.0).to(torch.float64).unsqueeze(1))
    return out.reshape(len(row), 1, *shape)


def _optimise(engine: Engine, top: int, region: RegionBatch, iterations: int, deadline: float | None,
              row: torch.Tensor) -> torch.Tensor:
    """(K,) sound upper bounds of K one-row regions (row k: `row[k]`, see `_unit_rows`) after the
    parameter search."""
    shape = engine.ctx[top][-1].op.out_shape
    rows = _unit_rows(row, shape)
    search = _search_engine(engine)
    leaves = _initial_params(engine, top)
    best_leaves = [t.detach().clone() for t in leaves]
    region32 = region.to(SEARCH_DTYPE)
    rows32 = rows.to(SEARCH_DTYPE)
    adam = _Adam(leaves)
    best = torch.full((len(row),), torch.inf, dtype=SEARCH_DTYPE)
    # every row stops on its own (its own stall count), so its parameters, hence its bound, do not
    # depend on which rows or regions share its group: shards and worker counts give the same bounds
    previous, stalled = best.clone(), torch.zeros(len(row), dtype=torch.int64)
    start = search.through_layer(top, Form.rows_of(None, rows32))   # no parameters above layer top's input
    for _ in range(iterations):
        form = search.below(start, top, _params(leaves))
        ub = concretise(form, region32, exact=False)[:, 0]
        with torch.no_grad():
            better = ub < best
            best = torch.where(better, ub, best)
            for leaf, keep in zip(leaves, best_leaves):
                keep.copy_(torch.where(better.reshape(1, -1, *([1] * (leaf.dim() - 2))), leaf, keep))
            gain = torch.nan_to_num(previous - best, nan=torch.inf)    # inf - inf: the first step
            stalled = torch.where(gain <= MIN_GAIN * best.abs(), stalled + 1, 0)
            previous = best
            active = stalled < PATIENCE
        if not bool(active.any()) or (deadline is not None and time.perf_counter() > deadline):
            break
        grads = torch.autograd.grad(ub.sum(), leaves, allow_unused=True)
        adam.step(grads, active, dim=1)   # a row that has stopped keeps its parameters (leaves: (5, K, ...))
    final = _params(best_leaves, torch.float64)
    return concretise(engine.from_layer(top, Form.rows_of(None, rows), final), region)[:, 0]
