"""alpha-CROWN on the difference network f - g: optimised lower slopes for the paired output rows.

CROWN on f - g (`diff_linear.crown_diff_bounds`) bounds Delta_k = f_k - g_k by walking the row +e_k
down f and the row -e_k down g and adding the two input-level forms. Every hidden ReLU that a walk
crosses with a negative coefficient is replaced by relu(a) >= alpha a, which is sound for *any*
alpha in [0, 1] (`relax.relax_side`), chosen independently per region, row, network and neuron. So
each row's bound is a function of those slopes (f's and g's) that may be minimised freely: projected
Adam on the sum of the rows' upper bounds, as alpha-CROWN does (Xu et al., ICLR 2021, "Fast and
Complete"). Intermediate bounds stay those of the CROWN pass (only the output rows are optimised).

As in `alpha.py`, the search runs in float32 without rounding margins (it only *chooses* slopes),
warm-started at CROWN's own slopes; the best slopes seen per row are evaluated once in float64 with
every margin (`Form.plus`, `concretise`), and the caller intersects that with the default bound, so
the result is never looser than CROWN on f - g.
"""

from __future__ import annotations

import math
import time

import torch

from prunecert.certify.alpha import MIN_GAIN, PATIENCE, SEARCH_DTYPE, _Adam
from prunecert.certify.backsub import Engine, Form, concretise
from prunecert.core.region_batch import RegionBatch
from prunecert.certify.relax import DeltaParams
from prunecert.core.interval import Bounds

REGION_BUDGET = 2 ** 20   # elements of one (regions x rows x widest hidden layer) slope tensor per group


def optimise_diff_rows(engine_f: Engine, engine_g: Engine, top: int, region: RegionBatch, iterations: int,
                       deadline: float | None = None) -> tuple[Bounds, bool]:
    """Sound bounds on Delta of layer `top` from optimised f and g lower slopes, and whether the
    `deadline` (perf_counter) cut the search short: a step starts only if twice the last step's time
    (the step and the final float64 evaluation) fits before it; a group of regions with no room for
    any step gets infinite bounds (the caller's default bound stands). `engine_f`, `engine_g`: the
    single-network walks (and relaxations) of the CROWN pass. Regions go in groups of at most
    REGION_BUDGET slope entries."""
    n = math.prod(engine_f.ctx[top][-1].op.out_shape)
    widest = max([math.prod(s.s.shape[1:]) for s in engine_f.side[:top]] + [1])
    group = max(1, REGION_BUDGET // (2 * n * widest))
    parts = [_optimise(engine_f.select(slice(a, a + group)), engine_g.select(slice(a, a + group)), top,
                       region.select(slice(a, a + group)), iterations, deadline)
             for a in range(0, region.batch, group)]
    return (Bounds(torch.cat([p.lower for p, _ in parts]), torch.cat([p.upper for p, _ in parts])),
            any(cut for _, cut in parts))


def _slopes(engine: Engine, top: int, rows: int) -> list[torch.Tensor]:
    """CROWN's lower slopes of every hidden layer below `top`, one copy per row: (B, R, *shape) leaves."""
    out = []
    for side in engine.side[:top]:
        a = side.alpha.unsqueeze(1)
        out.append(a.expand(a.shape[0], rows, *a.shape[2:]).to(SEARCH_DTYPE).clone().requires_grad_(True))
    return out


def _upper(engine_f: Engine, engine_g: Engine, top: int, rows: torch.Tensor, region: RegionBatch,
           alpha_f: list[torch.Tensor], alpha_g: list[torch.Tensor], exact: bool) -> torch.Tensor:
    """(B, R) upper bounds of rows . (f - g) at layer `top` under the given slopes."""
    ff = engine_f.from_layer(top, Form.rows_of(rows), [DeltaParams(alpha_f=a) for a in alpha_f])
    fg = engine_g.from_layer(top, Form.rows_of(-rows), [DeltaParams(alpha_f=a) for a in alpha_g])
    if exact:
        return concretise(ff.plus(fg, region), region)
    assert ff.lam_f is not None and fg.lam_f is not None    # rows over the logits reach the input
    form = Form(ff.lam_f + fg.lam_f, None, ff.bias + fg.bias, ff.err, ff.layout)
    return concretise(form, region, exact=False)


def _optimise(engine_f: Engine, engine_g: Engine, top: int, region: RegionBatch, iterations: int,
              deadline: float | None) -> tuple[Bounds, bool]:
    shape = engine_f.ctx[top][-1].op.out_shape
    n, b = math.prod(shape), region.batch
    rows = torch.cat([torch.eye(n), -torch.eye(n)]).reshape(1, 2 * n, *shape).to(torch.float64)
    search_f, search_g = (Engine(e.ctx, [s.to(SEARCH_DTYPE) for s in e.side], exact=False)
                          for e in (engine_f, engine_g))
    alpha_f, alpha_g = _slopes(engine_f, top, 2 * n), _slopes(engine_g, top, 2 * n)
    leaves = alpha_f + alpha_g
    best_leaves = [t.detach().clone() for t in leaves]
    region32, rows32 = region.to(SEARCH_DTYPE), rows.to(SEARCH_DTYPE)
    adam = _Adam(leaves)
    best = torch.full((b, 2 * n), torch.inf, dtype=SEARCH_DTYPE)
    # each region stops on its own (its own stall count): a region's slopes then do not depend on which
    # other regions share its batch, so shards and worker counts give the same bounds
    previous = torch.full((b,), torch.inf, dtype=SEARCH_DTYPE)
    stalled = torch.zeros(b, dtype=torch.int64)
    cut, steps, spent = False, 0, 0.0
    for _ in range(iterations):
        start = time.perf_counter()
        if deadline is not None and start + 2 * spent > deadline:   # room for a step and the final evaluation
            cut = True
            break
        steps += 1
        ub = _upper(search_f, search_g, top, rows32, region32, alpha_f, alpha_g, exact=False)
        with torch.no_grad():
            better = ub < best
            best = torch.where(better, ub, best)
            for i, (cur, keep) in enumerate(zip(leaves, best_leaves)):
                best_leaves[i] = torch.where(better.reshape(b, 2 * n, *([1] * (cur.dim() - 2))), cur, keep)
            total = best.sum(dim=1)
            stalled = torch.where(previous - total <= MIN_GAIN * total.abs(), stalled + 1, 0)
            previous = total
            active = stalled < PATIENCE
        if not bool(active.any()):
            break
        # a region that has stopped keeps its slopes (leaves: (B, R, ...))
        adam.step(torch.autograd.grad(ub.sum(), leaves, allow_unused=True), active, dim=0)
        spent = time.perf_counter() - start
    if steps == 0:   # no time left for any step: leave the default bound (met by the caller) alone
        inf = torch.full((b, *shape), torch.inf, dtype=torch.float64)
        return Bounds(-inf, inf), cut
    final = [t.to(torch.float64) for t in best_leaves]
    k = len(alpha_f)
    ub64 = _upper(engine_f, engine_g, top, rows, region, final[:k], final[k:], exact=True)
    return Bounds(-ub64[:, n:].reshape(b, *shape), ub64[:, :n].reshape(b, *shape)), cut
