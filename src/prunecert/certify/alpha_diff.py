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
from collections.abc import Callable

import torch

from prunecert.certify.adam import SEARCH_DTYPE, SLOPE_STOP, Grads, each_row, minimise, unit_rows
from prunecert.certify.backsub import Engine, Form, OpCtx, concretise
from prunecert.certify.layout import DENSE
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


def _search_upper(engine_f: Engine, engine_g: Engine, top: int, rows: torch.Tensor, region: RegionBatch
                  ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The search's objective: leaves (f's slopes per hidden layer below `top`, then g's) -> (K,) upper
    bounds of the one-row regions' rows . (f - g), in the engines' dtype without margins."""
    start_f = engine_f.through_layer(top, Form.rows_of(rows))    # no slopes above layer top's input
    start_g = engine_g.through_layer(top, Form.rows_of(-rows))
    # layer 0's ops the same in f and g: a^f_0 = a^g_0 for every input, so the two forms are added
    # there and layer 0's transpose (the widest) is taken once
    merge = all(c.dop is None for c in engine_f.ctx[0])

    def upper(leaves: list[torch.Tensor]) -> torch.Tensor:
        pf, pg = [DeltaParams(alpha_f=a) for a in leaves[:top]], [DeltaParams(alpha_f=a) for a in leaves[top:]]
        if merge:
            ff, fg = _to_first(engine_f, top, start_f, pf), _to_first(engine_g, top, start_g, pg)
        else:
            ff, fg = engine_f.below(start_f, top, pf), engine_g.below(start_g, top, pg)
        assert ff.lam_f is not None and fg.lam_f is not None
        form = Form(ff.lam_f + fg.lam_f, None, ff.bias + fg.bias, ff.err, ff.layout)
        return concretise(engine_f.through_layer(0, form) if merge else form, region, exact=False)[:, 0]
    return upper


def _hand_upper(engine_f: Engine, engine_g: Engine, top: int, rows: torch.Tensor, region: RegionBatch
                ) -> Callable[[list[torch.Tensor]], tuple[torch.Tensor, Grads]]:
    """`_search_upper` (the same floats: the same transposes, relaxation products and concretisation)
    over one leaf (K, 1, N): f's slopes per hidden layer below `top`, then g's, flattened side by side
    (projected Adam then steps one tensor, not 2 top). Its gradient is written out instead of taken
    by autograd: the walk is linear in the coefficients between ReLUs, so the gradient goes back up
    through each op's forward map (the adjoint of its transpose, the bias term included), and at each
    ReLU d mu / d alpha = lam where the row crosses an unstable neuron with lam < 0. No graph, no
    backward of the elementwise masking: about half the search's cost on LeNet. Boxes only."""
    engines = (engine_f, engine_g)
    starts = (engine_f.through_layer(top, Form.rows_of(rows)), engine_g.through_layer(top, Form.rows_of(-rows)))
    merge = all(c.dop is None for c in engine_f.ctx[0])    # as in `_search_upper`
    relus = [[(e.side[k].s.unsqueeze(1), e.side[k].t, e.side[k].unstable.unsqueeze(1)) for k in range(top)]
             for e in engines]
    cuts = _offsets(engine_f, top)

    def upper(leaves: list[torch.Tensor]) -> tuple[torch.Tensor, Grads]:
        alphas = _split(leaves[0], engine_f, top, cuts)
        trails: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        forms = []
        for n, (e, form) in enumerate(zip(engines, starts)):
            trail = []
            for k in range(top - 1, -1, -1):    # relax_side's floats: lam s where lam >= 0, else lam alpha
                s, t, unstable = relus[n][k]
                lam = form.lam_f
                assert lam is not None
                pos = lam >= 0
                sel = torch.where(pos, s, alphas[n * top + k])
                trail.append((lam, pos, sel, unstable & ~pos))
                form = Form(lam * sel, None, form.bias + DENSE.dot(lam.clamp_min(0.0), t), form.err, DENSE)
                if k > 0 or not merge:
                    form = e.through_layer(k, form)
            trails.append(trail[::-1])    # layer 0 first
            forms.append(form)
        ff, fg = forms
        assert ff.lam_f is not None and fg.lam_f is not None
        form = Form(ff.lam_f + fg.lam_f, None, ff.bias + fg.bias, ff.err, DENSE)
        if merge:
            form = engine_f.through_layer(0, form)
        ub = concretise(form, region, exact=False)[:, 0]

        def grads() -> list[torch.Tensor | None]:
            lam_in = form.lam_f
            assert lam_in is not None
            g = region.c.reshape(lam_in.shape) + torch.sign(lam_in) * region.r.reshape(lam_in.shape)
            shared = _adjoint(engine_f.ctx[0], g) if merge else None
            out = []
            for n, e in enumerate(engines):
                gm = shared if shared is not None else _adjoint(e.ctx[0], g)
                g_lam = gm
                for k, (lam, pos, sel, free) in enumerate(trails[n]):
                    if k > 0:
                        gm = _adjoint(e.ctx[k], g_lam)
                    out.append(torch.where(free, gm * lam, 0.0).flatten(1))
                    g_lam = gm * sel + torch.where(pos, relus[n][k][1].unsqueeze(1), 0.0)
            return [torch.cat(out, 1).unsqueeze(1)]
        return ub, grads
    return upper


def _offsets(engine: Engine, top: int) -> list[int]:
    """Where each hidden layer's slopes start in the flat leaf (f's layers, then g's alike)."""
    sizes = [math.prod(s.s.shape[1:]) for s in engine.side[:top]] * 2
    return [sum(sizes[:i]) for i in range(len(sizes) + 1)]


def _split(leaf: torch.Tensor, engine: Engine, top: int, cuts: list[int]) -> list[torch.Tensor]:
    """The flat (K, 1, N) leaf as per-layer slopes (K, 1, *shape) (views), f's layers then g's."""
    shapes = [s.s.shape[1:] for s in engine.side[:top]] * 2
    return [leaf[..., a:b].view(leaf.shape[0], 1, *shape) for a, b, shape in zip(cuts, cuts[1:], shapes)]


def _adjoint(ctx: list[OpCtx], g: torch.Tensor) -> torch.Tensor:
    """The gradient of a walk's value by the coefficients over a layer's output, from the one over its
    input `g` (K, 1, *in): the layer's ops applied forward (the transpose's adjoint, plus the bias,
    whose dot product the walk adds)."""
    k = g.shape[0]
    for c in ctx:
        g = c.op.forward(g.reshape(k, *c.op.in_shape))
    return g.reshape(k, 1, *g.shape[1:])


def _to_first(engine: Engine, top: int, form: Form, params: list[DeltaParams]) -> Form:
    """A form over layer `top`'s input walked down to layer 0's pre-activations (top >= 1)."""
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
    region32 = region.to(SEARCH_DTYPE)
    if region.l2 is None:
        start = torch.cat([t.detach().flatten(1) for t in _slopes(engine_f, top) + _slopes(engine_g, top)], 1)
        with torch.no_grad():
            free = torch.cat([s.unstable.flatten(1) for s in engine_f.side[:top] + engine_g.side[:top]], 1)
            found = minimise(_hand_upper(search_f, search_g, top, rows.to(SEARCH_DTYPE), region32),
                             [start.unsqueeze(1)], iterations, SLOPE_STOP, deadline, free=[free.unsqueeze(1)])
        best = _split(found.best[0], engine_f, top, _offsets(engine_f, top))
    else:   # the L2 ball's bound (a minimum of two) differentiated by autograd
        upper = _search_upper(search_f, search_g, top, rows.to(SEARCH_DTYPE), region32)
        # leaves (K, 1, ...): one row each
        found = minimise(upper, _slopes(engine_f, top) + _slopes(engine_g, top), iterations, SLOPE_STOP, deadline)
        best = found.best
    if found.steps == 0:   # no time left for any step: leave the default bound (met by the caller) alone
        return torch.full((len(row),), torch.inf, dtype=torch.float64), found.cut
    final = [DeltaParams(alpha_f=t.to(torch.float64)) for t in best]
    ff = engine_f.from_layer(top, Form.rows_of(rows), final[:top])
    fg = engine_g.from_layer(top, Form.rows_of(-rows), final[top:])
    return concretise(ff.plus(fg, region), region)[:, 0], found.cut
