"""Optimising the relaxation parameters of the Delta back-substitution (alpha-CROWN style).

Every lower slope alpha in [0, 1] and every mixing weight theta in [0, 1] gives a sound relaxation
(`relax.py`), so the bound of each row is a function of these parameters that we may minimise
freely: projected Adam on the sum of the rows' upper bounds, one parameter set per (region, row,
neuron), as in alpha-CROWN (Xu et al., ICLR 2021). The search runs in float32 without rounding
margins (it only *chooses* parameters); the chosen ones (the best seen per row) are then evaluated
once more in float64 with margins, and each row keeps the better of that and the default
relaxation's bound, so optimisation never loosens a bound. The search and its stopping rule (each
row stops once it gains < 0.1 % for 3 steps in a row): `adam.py`.
"""

from __future__ import annotations

import math
import torch

from prunecert.certify.adam import DELTA_STOP, SEARCH_DTYPE, each_row, minimise, unit_rows
from prunecert.certify.backsub import Engine, Form, concretise
from prunecert.core.interval import Bounds
from prunecert.core.region_batch import RegionBatch
from prunecert.certify.relax import DeltaParams

REGION_BUDGET = 2 ** 20   # elements of one (regions x rows x widest hidden layer) tensor in the search


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


def _free(engine: Engine, top: int) -> list[torch.Tensor]:
    """Per leaf of `_initial_params`, where a parameter can move the bound: the lower slopes on unstable
    neurons, the mixing weights where not both sides are stable (elsewhere `relax.py` uses the
    defaults: the gradient is exactly 0 there)."""
    assert engine.delta is not None
    out = []
    for k in range(top):
        side, rel = engine.side[k], engine.delta[k]
        mixed = ~rel.both_stable
        out.append(torch.stack((side.unstable, mixed, rel.g.unstable, mixed, rel.f.unstable)).unsqueeze(2))
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
    per region (`adam.each_row`; every row when None); the others get infinite bounds. Rows go in
    groups small enough that the per-region tensors of one group stay under REGION_BUDGET elements
    per hidden level: the autograd graph holds dozens of them (on the vgg-small pair, 10 regions at
    once peaked at 3 GB)."""
    shape = engine.ctx[top][-1].op.out_shape
    if rows is None:
        rows = torch.ones(region.batch, 2 * math.prod(shape), dtype=torch.bool)
    levels = sum(math.prod(s.s.shape[1:]) for s in engine.side[:top])
    return each_row(rows, shape, max(1, REGION_BUDGET // max(levels, 1)),
                    lambda idx, row: _optimise(engine.select(idx), top, region.select(idx), iterations, deadline, row))


def _optimise(engine: Engine, top: int, region: RegionBatch, iterations: int, deadline: float | None,
              row: torch.Tensor) -> torch.Tensor:
    """(K,) sound upper bounds of K one-row regions (row k: `row[k]`, see `adam.unit_rows`) after the
    parameter search."""
    shape = engine.ctx[top][-1].op.out_shape
    rows = unit_rows(row, shape)
    search = _search_engine(engine)
    region32, rows32 = region.to(SEARCH_DTYPE), rows.to(SEARCH_DTYPE)
    start = search.through_layer(top, Form.rows_of(None, rows32))   # no parameters above layer top's input

    def upper(leaves: list[torch.Tensor]) -> torch.Tensor:
        return concretise(search.below(start, top, _params(leaves)), region32, exact=False)[:, 0]

    # leaves (5, K, ...): dimension 1 indexes the rows, each stopping on its own
    found = minimise(upper, _initial_params(engine, top), iterations, DELTA_STOP, deadline, dim=1,
                     free=_free(engine, top))
    if found.steps == 0:   # no time for any step: infinite bounds (the caller's default bound stands)
        return torch.full((len(row),), torch.inf, dtype=torch.float64)
    final = _params(found.best, torch.float64)
    return concretise(engine.from_layer(top, Form.rows_of(None, rows), final), region)[:, 0]
