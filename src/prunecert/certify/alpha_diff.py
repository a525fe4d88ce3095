"""alpha-CROWN on the difference network f - g: optimised lower slopes for the paired output rows.

CROWN on f - g (`diff_linear.crown_diff_bounds`) bounds Delta_k = f_k - g_k by walking the row +e_k
down f and the row -e_k down g and adding the two input-level forms. Every hidden ReLU that a walk
crosses with a negative coefficient is replaced by relu(a) >= alpha a, which is sound for *any*
alpha in [0, 1] (`relax.relax_side`), chosen independently per region, row, network and neuron. So
each row's bound is a function of those slopes (f's and g's) that may be minimised freely: projected
Adam on each row's upper bound, as alpha-CROWN does (Xu et al., ICLR 2021, "Fast and Complete").
Intermediate bounds stay those of the CROWN pass, and only the output rows that can carry a region's
reported max |Delta_k| are optimised (the caller's rule, `diff_linear._optimise_where_it_matters`).

As in `alpha.py`, the search runs in float32 without rounding margins (it only *chooses* slopes),
warm-started at CROWN's own slopes; the best slopes seen per row are evaluated once in float64 with
every margin (`Form.plus`, `concretise`), and the caller intersects that with the default bound, so
the result is never looser than CROWN on f - g.
"""

from __future__ import annotations

import math

import torch

from prunecert.certify.adam import SEARCH_DTYPE, each_row, minimise, unit_rows
from prunecert.certify.backsub import Engine, Form, concretise
from prunecert.core.region_batch import RegionBatch
from prunecert.certify.relax import DeltaParams
from prunecert.core.interval import Bounds

REGION_BUDGET = 2 ** 20   # elements of one (rows x widest hidden layer) slope tensor per group


def optimise_diff_rows(engine_f: Engine, engine_g: Engine, top: int, region: RegionBatch, iterations: int,
                       deadline: float | None = None, rows: torch.Tensor | None = None) -> tuple[Bounds, bool]:
    """Sound bounds on Delta of layer `top` from optimised f and g lower slopes, and whether the
    `deadline` (perf_counter) cut the search short (`adam.minimise`); a group of rows with no room
    for any step gets infinite bounds (the caller's default bound stands). `engine_f`, `engine_g`: the
    single-network walks (and relaxations) of the CROWN pass. `rows`: optional (B, 2n) mask of the
    rows to optimise per region (`adam.each_row`; every row when None); the others get infinite
    bounds. Rows go in groups of at most REGION_BUDGET slope entries per hidden layer."""
    shape = engine_f.ctx[top][-1].op.out_shape
    if rows is None:
        rows = torch.ones(region.batch, 2 * math.prod(shape), dtype=torch.bool)
    widest = max([math.prod(s.s.shape[1:]) for s in engine_f.side[:top]] + [1])
    cut: list[bool] = []

    def solve(idx: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        ub, stopped = _optimise(engine_f.select(idx), engine_g.select(idx), top, region.select(idx), iterations,
                                deadline, row)
        cut.append(stopped)
        return ub

    return each_row(rows, shape, max(1, REGION_BUDGET // widest), solve), any(cut)


def _slopes(engine: Engine, top: int) -> list[torch.Tensor]:
    """CROWN's lower slopes of every hidden layer below `top`: (K, 1, *shape) leaves (one row per region)."""
    return [side.alpha.unsqueeze(1).to(SEARCH_DTYPE).clone().requires_grad_(True) for side in engine.side[:top]]


def _upper(engine_f: Engine, engine_g: Engine, top: int, rows: torch.Tensor, region: RegionBatch,
           alpha_f: list[torch.Tensor], alpha_g: list[torch.Tensor], exact: bool) -> torch.Tensor:
    """(B, R) upper bounds of rows . (f - g) at layer `top` under the given slopes."""
    pf, pg = [DeltaParams(alpha_f=a) for a in alpha_f], [DeltaParams(alpha_f=a) for a in alpha_g]
    if not exact and all(c.dop is None for c in engine_f.ctx[0]):
        # layer 0's ops are the same in f and g, so a^f_0 = a^g_0 for every input: the search adds the
        # two forms there and takes layer 0's transpose (the widest) once
        ff, fg = _to_first(engine_f, top, Form.rows_of(rows), pf), _to_first(engine_g, top, Form.rows_of(-rows), pg)
        assert ff.lam_f is not None and fg.lam_f is not None
        form = engine_f.through_layer(0, Form(ff.lam_f + fg.lam_f, None, ff.bias + fg.bias, ff.err, ff.layout))
        return concretise(form, region, exact=False)
    ff = engine_f.from_layer(top, Form.rows_of(rows), pf)
    fg = engine_g.from_layer(top, Form.rows_of(-rows), pg)
    if exact:
        return concretise(ff.plus(fg, region), region)
    assert ff.lam_f is not None and fg.lam_f is not None    # rows over the logits reach the input
    form = Form(ff.lam_f + fg.lam_f, None, ff.bias + fg.bias, ff.err, ff.layout)
    return concretise(form, region, exact=False)


def _to_first(engine: Engine, top: int, form: Form, params: list[DeltaParams]) -> Form:
    """A form over layer `top`'s pre-activations walked down to layer 0's pre-activations (top >= 1)."""
    form = engine.through_layer(top, form)
    for k in range(top - 1, 0, -1):
        form = engine.through_layer(k, engine.relax(k, form, params[k]))
    return engine.relax(0, form, params[0])


def _optimise(engine_f: Engine, engine_g: Engine, top: int, region: RegionBatch, iterations: int,
              deadline: float | None, row: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(K,) sound upper bounds of K one-row regions (row k: `row[k]`, see `adam.unit_rows`) after the
    slope search, and whether the deadline cut it."""
    rows = unit_rows(row, engine_f.ctx[top][-1].op.out_shape)
    search_f, search_g = (Engine(e.ctx, [s.to(SEARCH_DTYPE) for s in e.side], exact=False)
                          for e in (engine_f, engine_g))
    alpha_f, alpha_g = _slopes(engine_f, top), _slopes(engine_g, top)
    k = len(alpha_f)
    region32, rows32 = region.to(SEARCH_DTYPE), rows.to(SEARCH_DTYPE)

    def upper(leaves: list[torch.Tensor]) -> torch.Tensor:
        return _upper(search_f, search_g, top, rows32, region32, leaves[:k], leaves[k:], exact=False)[:, 0]

    found = minimise(upper, alpha_f + alpha_g, iterations, deadline)    # leaves (K, 1, ...): one row each
    if found.steps == 0:   # no time left for any step: leave the default bound (met by the caller) alone
        return torch.full((len(row),), torch.inf, dtype=torch.float64), found.cut
    final = [t.to(torch.float64) for t in found.best]
    return _upper(engine_f, engine_g, top, rows, region, final[:k], final[k:], exact=True)[:, 0], found.cut
