"""LP bounds: the triangle relaxation of f and g over the shared input, solved layer by layer.

For each layer l in turn we encode layers 0..l (`formulation.build_encoding`: stable neurons exact,
unstable ones by the triangle h >= 0, h >= a, h <= u (a - l) / (u - l)) and solve linear programs:
first the unstable neurons of f and g (tighter ReLU relaxations for every later layer, the
per-neuron tightening of MIPVerify / the "LP-all" bounds of Salman et al. 2019), then both sides of
every coordinate of Delta_l and of the local deviation. Every reported number is a *sound* dual bound
(`highs.HighsModel.safe_bound`), never the solver's primal value. Initial bounds come from the best
cheaper method available (diff-linear when D2's module exists, else ReluDiff intervals); the LP
result is intersected with them, so it is never looser.

Boxes go to HiGHS directly (warm-started dual simplex: one model per layer re-solved for hundreds of
objectives). An L2 ball adds the cone ||x - c|| <= r: that model is built once in cvxpy with the
objective as a Parameter and solved by Clarabel (`cone.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify.diff_interval import diff_interval_bounds
from prunecert.certify.diff_linear import diff_linear_bounds
from prunecert.certify.formulation import (
    Array,
    Columns,
    Encoding,
    Interval,
    RegionBounds,
    build_encoding,
    check_encodable,
)
from prunecert.certify.highs import HighsModel, LPModel
from prunecert.certify.result import MethodInfo, PairBounds
from prunecert.core.interval import Bounds
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.errors import ConfigError
from prunecert.network import Flatten, TensorLike
from prunecert.progress import stage_line

ModelFactory = Callable[[Encoding], LPModel]
# (centres (B, *input_shape), radii (B,)): each region's box intersected with an L2 ball
L2Balls = tuple[TensorLike, TensorLike]

@boxes_or_batch
def initial_bounds(pair: Pair, region: RegionBatch, optimize: bool = True) -> PairBounds:
    """The tightest cheap sound bounds: diff-linear intersected with ReluDiff intervals.

    `optimize=False` skips diff-linear's slope optimisation (faster; for many small leaves).
    """
    bounds = diff_interval_bounds(pair, region)
    # every logit's bounds enter the encoding, so every logit row is optimised (all_rows)
    kwargs = {"all_rows": True} if optimize else {"optimize": False, "all_rows": True}
    return diff_linear_bounds(pair, region, **kwargs).intersect(bounds)


@dataclass
class RegionLP:
    """LP results for one region, flattened per layer: each entry (lower, upper) numpy arrays."""

    bounds: RegionBounds
    local: list[Interval | None]  # per layer; None: not bounded by LP (to_pair_bounds puts -inf, inf)
    margin: Array | None        # (C,) lower bounds on min(f_c - f_j, g_c - g_j) for c = `label`
    label: int | None
    solves: int
    complete: bool              # False when the deadline cut the pass short


def unit(enc: Encoding, plus: npt.ArrayLike, minus: npt.ArrayLike | None = None) -> Array:
    """Objective vector: +1 on column(s) `plus`, -1 on `minus` (shared columns cancel)."""
    c = np.zeros(enc.n_cols)
    np.add.at(c, np.atleast_1d(plus), 1.0)
    if minus is not None:
        np.add.at(c, np.atleast_1d(minus), -1.0)
    return c


def _range(model: LPModel, c: Array) -> tuple[float, float]:
    """Sound (min, max) of c.v over the model's feasible set."""
    return -model.maximize_lp(-c).bound, model.maximize_lp(c).bound


def refine_region(pair: Pair, lo: Array, hi: Array, rb: RegionBounds,
                  model_factory: ModelFactory = HighsModel, tighten: bool = True,
                  delta_layers: set[int] | None = None, local: bool = True, margins: bool = True,
                  deadline: float | None = None, final_factory: ModelFactory | None = None
                  ) -> RegionLP:
    """One region, layer by layer: tighten unstable f/g neurons, then bound Delta_l and local_l by LP.

    `delta_layers`: the layers whose Delta/local coordinates get LPs (default all; hidden layers'
    Delta bounds also serve as cuts for later layers). Past `deadline` (perf_counter), the remaining
    quantities keep their initial (sound) bounds. `final_factory` (e.g. the L2 cone model) replaces
    `model_factory` for the last layer's LPs; hidden layers use the bounding box.
    """
    rb = rb.copy()
    assert rb.delta is not None  # from_pair_bounds always fills Delta; cuts and LPs need it
    n_layers = pair.n_layers
    delta_layers = set(range(n_layers)) if delta_layers is None else set(delta_layers)
    local_b: list[Interval | None] = [(rb.delta[0][0].copy(), rb.delta[0][1].copy())]
    local_b += [None] * (n_layers - 1)
    solves, complete = 0, True
    margin_out: Array | None = None
    label: int | None = None

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    for l in range(n_layers):
        enc = build_encoding(pair, lo, hi, rb, local=local and l > 0, upto=l)
        hidden = l < n_layers - 1
        model = (final_factory or model_factory)(enc) if not hidden else model_factory(enc)
        if tighten and hidden and not (l == 0 and _single_weighted_op(pair, 0)):
            for side_bounds, side, cols in ((rb.f, "f", enc.af[l]), (rb.g, "g", enc.ag[l])):
                blo, bhi = side_bounds[l]
                for i in np.flatnonzero((blo < 0) & (bhi > 0)):
                    if late():
                        complete = False
                        break
                    if side == "g" and enc.ag[l][i] == enc.af[l][i]:
                        blo[i], bhi[i] = rb.f[l][0][i], rb.f[l][1][i]
                        continue
                    lo_i, hi_i = _range(model, unit(enc, cols[i]))
                    solves += 2
                    blo[i], bhi[i] = max(blo[i], lo_i), max(min(bhi[i], hi_i), max(blo[i], lo_i))
                    model.set_col_bounds(cols[i], blo[i], bhi[i])
        if l in delta_layers:
            dlo, dhi = rb.delta[l]
            for j in range(len(enc.af[l])):
                if enc.af[l][j] == enc.ag[l][j]:
                    dlo[j] = dhi[j] = 0.0  # the same column: Delta is identically 0
                    continue
                if late():
                    complete = False
                    break
                lo_j, hi_j = _range(model, unit(enc, enc.af[l][j], enc.ag[l][j]))
                solves += 2
                dlo[j], dhi[j] = max(dlo[j], lo_j), min(dhi[j], hi_j)
            if l > 0 and local and local_b[l] is None:
                local_b[l] = _local_bounds(enc, model, l, late)
                solves += 2 * len(enc.af[l])
        if l == n_layers - 1 and margins and not late():
            label, margin_out = _margin_bounds(pair, enc, model, lo, hi)
            solves += 2 * len(enc.af[l])
    return RegionLP(rb, local_b, margin_out, label, solves, complete)


def _single_weighted_op(pair: Pair, l: int) -> bool:
    """Layer 0 with one op (plus flatten): interval bounds over a box are already exact."""
    return sum(not isinstance(op, Flatten) for op in pair.layers_f[l].ops) == 1


def _local_bounds(enc: Encoding, model: LPModel, l: int, late: Callable[[], bool]) -> Interval | None:
    """Bounds on layer l's local deviation a_l^f - L_l^g(h_{l-1}^f); None when `enc` has no g-on-f columns."""
    local_cols: Columns | None = enc.gf[l]
    if local_cols is None:
        return None
    n = len(enc.af[l])
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    for i in range(n):
        if enc.af[l][i] == local_cols[i]:
            lo[i] = hi[i] = 0.0
            continue
        if late():
            break
        lo[i], hi[i] = _range(model, unit(enc, enc.af[l][i], local_cols[i]))
    return lo, hi


def _margin_bounds(pair: Pair, enc: Encoding, model: LPModel, lo: Array, hi: Array) -> tuple[int, Array]:
    """For the class c that f predicts at the box centre: lower bounds on f_c - f_j and g_c - g_j."""
    centre = torch.as_tensor((np.asarray(lo) + np.asarray(hi)) / 2).reshape(1, *pair.input_shape)
    with torch.no_grad():
        c = int(pair.f.forward(centre).reshape(-1).argmax())
    n = len(enc.af[-1])
    out = np.full(n, -np.inf)
    for j in range(n):
        if j == c:
            continue
        mf = -model.maximize_lp(-unit(enc, enc.af[-1][c], enc.af[-1][j])).bound
        mg = -model.maximize_lp(-unit(enc, enc.ag[-1][c], enc.ag[-1][j])).bound
        out[j] = min(mf, mg)
    return c, out


def to_pair_bounds(pair: Pair, results: list[RegionLP], init: PairBounds, method: str) -> PairBounds:
    """Stack per-region results into a PairBounds, intersected with the initial (sound) bounds."""
    def stack(get: Callable[[RegionLP, int], Interval], base: list[Bounds]) -> list[Bounds]:
        out: list[Bounds] = []
        for l in range(pair.n_layers):
            shape = shape_of(l)
            lo = torch.stack([torch.as_tensor(get(r, l)[0]).reshape(shape) for r in results])
            hi = torch.stack([torch.as_tensor(get(r, l)[1]).reshape(shape) for r in results])
            out.append(Bounds(torch.maximum(lo, base[l].lower), torch.minimum(hi, base[l].upper)))
        return out

    def shape_of(l: int) -> tuple[int, ...]:
        return tuple(pair.layers_f[l].out_shape)

    def delta_of(r: RegionLP, l: int) -> Interval:
        assert r.bounds.delta is not None  # refine_region's bounds always carry Delta
        return r.bounds.delta[l]

    def local_of(r: RegionLP, l: int) -> Interval:
        bounds = r.local[l]
        if bounds is not None:
            return bounds
        n = math.prod(shape_of(l))
        return np.full(n, -np.inf), np.full(n, np.inf)

    f = stack(lambda r, l: r.bounds.f[l], init.f)
    g = stack(lambda r, l: r.bounds.g[l], init.g)
    delta = stack(delta_of, init.delta)
    local = stack(local_of, init.local)
    local[0] = delta[0]
    margin = init.agreement_margins().clone()
    for b, r in enumerate(results):
        if r.margin is not None:
            m = torch.as_tensor(r.margin)
            margin[b, r.label] = torch.maximum(margin[b, r.label], m)
    complete = [r.complete for r in results]
    info: MethodInfo = {**init.info, "method": method, "solves": [r.solves for r in results],
                        "complete": complete, "truncated": [not c for c in complete]}
    return PairBounds(f, g, delta, local, margin, info)


@boxes_or_batch
def lp_bounds(pair: Pair, region: RegionBatch, tighten: bool = True, layers: Iterable[int] | None = None, local: bool = True,
              margins: bool = True, time_limit: float | None = None, progress: bool = False) -> PairBounds:
    """LP (triangle relaxation) bounds on Delta_l, local_l, f and g for a batch of regions.

    A region with an L2 ball is its box intersected with the ball (second-order cone, Clarabel) for the
    logits' LPs; hidden layers are bounded over the bounding box (sound, as the ball lies inside it).
    `layers`: which layers get LPs for Delta (all by default). `time_limit`: seconds per region; past
    it, remaining quantities keep initial bounds.
    """
    check_encodable(pair, "lp", "use diff-linear or crown-diff (they scale to conv nets)")
    lo_t, hi_t = region.lo, region.hi
    init = initial_bounds(pair, region)
    final: ModelFactory | None = None
    results: list[RegionLP] = []
    delta_layers = None if layers is None else {int(l) % pair.n_layers for l in layers}
    for b in range(lo_t.shape[0]):
        if region.l2 is not None:
            # imported here: cvxpy costs ~1.2 s at import (python -X importtime, load ~6), and only L2 regions need it
            from prunecert.certify.cone import cone_factory
            centres, radii = region.l2
            final = cone_factory(centres[b].reshape(-1).numpy(), float(radii[b]))
        deadline = None if time_limit is None else time.perf_counter() + float(time_limit)
        rb = RegionBounds.from_pair_bounds(init, b)
        results.append(refine_region(pair, lo_t[b].numpy(), hi_t[b].numpy(), rb, HighsModel, tighten, delta_layers,
                                     local, margins, deadline, final))
        stage_line(f"lp: region {b + 1}/{lo_t.shape[0]}: {results[-1].solves} LPs", progress)
    if not results:
        raise ConfigError("lp_bounds: no regions")
    return to_pair_bounds(pair, results, init, "lp")
