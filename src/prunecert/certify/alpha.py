"""Optimising the relaxation parameters of the Delta back-substitution (alpha-CROWN style).

Every lower slope alpha in [0, 1] and every mixing weight theta in [0, 1] gives a sound relaxation
(`relax.py`), so the bound of each row is a function of these parameters that we may minimise
freely: projected Adam on the sum of the rows' upper bounds, one parameter set per (region, row,
neuron), as in alpha-CROWN (Xu et al., ICLR 2021). The search runs in float32 without rounding
margins (it only *chooses* parameters); the chosen ones (the best seen per row) are then evaluated
once more in float64 with margins, and each row keeps the better of that and the default
relaxation's bound, so optimisation never loosens a bound. The search stops early once the summed
bound improves by less than 0.1% for 3 steps in a row (on LeNet-300-100 pairs it converges in ~5).
"""

from __future__ import annotations

import math
import time

import torch

from prunecert.certify.backsub import Engine, Form, RegionBatch, concretise
from prunecert.core.interval import Bounds
from prunecert.certify.relax import DeltaParams

LEARNING_RATE = 0.5
DECAY = 0.9
PATIENCE = 3          # stop after this many steps that improve the summed bound by < MIN_GAIN (relative)
MIN_GAIN = 1e-3
SEARCH_DTYPE = torch.float32
REGION_BUDGET = 2 ** 20   # elements of one (regions x rows x widest hidden layer) tensor in the search


class _Adam:
    """Projected Adam (Kingma & Ba 2015) onto [0, 1] with an exponentially decaying step.

    Written out (a few lines) because constructing a `torch.optim` optimiser imports torch._dynamo,
    which costs seconds on the first call of every process (every CLI run).
    """

    def __init__(self, leaves: list[torch.Tensor], lr: float = LEARNING_RATE, betas=(0.9, 0.999), eps: float = 1e-8):
        self.leaves, self.lr, self.betas, self.eps, self.t = leaves, lr, betas, eps, 0
        self.m = [torch.zeros_like(x) for x in leaves]
        self.v = [torch.zeros_like(x) for x in leaves]

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * DECAY ** (self.t - 1) * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for x, g, m, v in zip(self.leaves, grads, self.m, self.v):
            if g is None:       # a parameter the bound does not depend on
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            x.addcdiv_(m, v.sqrt().add_(self.eps), value=-lr).clamp_(0.0, 1.0)


def _initial_params(engine: Engine, top: int, rows: int) -> list[DeltaParams]:
    """Per hidden layer below `top`, the default parameters broadcast to (B, R, *shape), as leaves."""
    out = []
    for k in range(top):
        side, rel = engine.side[k], engine.delta[k]

        def leaf(t: torch.Tensor) -> torch.Tensor:
            t = t.unsqueeze(1).expand(t.shape[0], rows, *t.shape[1:])
            return t.to(SEARCH_DTYPE).clone().requires_grad_(True)
        out.append(DeltaParams(leaf(side.alpha), leaf(rel.theta_up), leaf(rel.g.alpha), leaf(rel.theta_lo),
                               leaf(rel.f.alpha)))
    return out


def _search_engine(engine: Engine) -> Engine:
    """The same walk in SEARCH_DTYPE without rounding margins (ops convert their weights on the fly)."""
    return Engine(engine.ctx, [s.to(SEARCH_DTYPE) for s in engine.side],
                  [d.to(SEARCH_DTYPE) for d in engine.delta], exact=False)


def optimise_rows(engine: Engine, top: int, region: RegionBatch, iterations: int, deadline: float | None = None,
                  rows: torch.Tensor | None = None) -> Bounds:
    """Optimised sound bounds on +-e_i of layer `top`'s Delta (the pair engine `engine`); the search
    stops early at `deadline` (perf_counter). `rows`: optional (B, 2n) mask of the rows to optimise
    per region (row i < n: +e_i, the upper bound; row n + i: -e_i, the lower bound); the others get
    infinite bounds. Regions are optimised in groups small enough that one (regions x rows x widest
    hidden layer) tensor stays under REGION_BUDGET elements: the autograd graph holds dozens of them
    (on the vgg-small pair, 10 regions at once peaked at 3 GB)."""
    shape = engine.ctx[top][-1].op.out_shape
    n = math.prod(shape)
    if rows is None:
        rows = torch.ones(region.batch, 2 * n, dtype=torch.bool)
    m = int(rows.sum(1).max())
    if m == 0:
        inf = torch.full((region.batch, *shape), torch.inf, dtype=torch.float64)
        return Bounds(-inf, inf)
    # per region its m chosen rows first (padding rows after them: all-zero coefficients)
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.gather(rows, 1, order)
    widest = max([math.prod(s.s.shape[1:]) for s in engine.side[:top]] + [1])
    group = max(1, REGION_BUDGET // (m * widest))
    parts = [_optimise(engine.select(sl), top, region.select(sl), iterations, deadline, order[sl], valid[sl])
             for sl in (slice(a, a + group) for a in range(0, region.batch, group))]
    ub = torch.full((region.batch, 2 * n), torch.inf, dtype=torch.float64)
    ub.scatter_(1, order, torch.where(valid, torch.cat(parts), torch.inf))
    return Bounds(-ub[:, n:].reshape(-1, *shape), ub[:, :n].reshape(-1, *shape))


def _unit_rows(order: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    """(B, m, *shape) float64 rows: +e_i for order < n, -e_(order - n) above, 0 where not valid."""
    n = math.prod(shape)
    sign = torch.where(order < n, 1.0, -1.0).to(torch.float64) * valid
    rows = torch.zeros(*order.shape, n, dtype=torch.float64)
    rows.scatter_(2, (order % n).unsqueeze(2), sign.unsqueeze(2))
    return rows.reshape(*order.shape, *shape)


def _optimise(engine: Engine, top: int, region: RegionBatch, iterations: int, deadline: float | None,
              order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, m) sound upper bounds of the rows `order` (see `_unit_rows`) after the parameter search."""
    shape = engine.ctx[top][-1].op.out_shape
    b, m = order.shape
    rows = _unit_rows(order, valid, shape)
    search = _search_engine(engine)
    params = _initial_params(engine, top, m)
    best_params = [DeltaParams(*[t.detach().clone() for t in p.tensors()]) for p in params]
    region32 = region.to(SEARCH_DTYPE)
    rows32 = rows.to(SEARCH_DTYPE)
    leaves = [t for p in params for t in p.tensors()]
    adam = _Adam(leaves)
    best = torch.full((b, m), torch.inf, dtype=SEARCH_DTYPE)
    previous, stalled = best.clone(), 0
    for _ in range(iterations):
        form = search.from_layer(top, Form.rows_of(None, rows32), params)
        ub = concretise(form, region32, exact=False)
        with torch.no_grad():
            better = ub < best
            best = torch.where(better, ub, best)
            for p, q in zip(params, best_params):
                for field in DeltaParams.FIELDS:
                    cur, keep = getattr(p, field), getattr(q, field)
                    mask = better.reshape(b, m, *([1] * (cur.dim() - 2)))
                    setattr(q, field, torch.where(mask, cur.detach(), keep))
            gain = torch.nan_to_num(previous - best, nan=torch.inf)    # inf - inf: the first step
            stalled = stalled + 1 if bool((gain <= MIN_GAIN * best.abs()).all()) else 0
            previous = best
        if stalled >= PATIENCE or (deadline is not None and time.perf_counter() > deadline):
            break
        grads = torch.autograd.grad(ub.sum(), leaves, allow_unused=True)
        adam.step(grads)
    final = [DeltaParams(*[t.to(torch.float64) for t in q.tensors()]) for q in best_params]
    return concretise(engine.from_layer(top, Form.rows_of(None, rows), final), region)
