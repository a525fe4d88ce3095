"""Differential interval bounds (ReluDiff, Paulsen et al., ICSE 2020): bound f, g and Delta together.

For each affine op pair (f's op A^f x + b^f, g's op A^g x + b^g), with Delta x = x^f - x^g,

    Delta y = (A^f - A^g) x^f + A^g Delta x + (b^f - b^g),

so Delta is bounded by intervals over x^f and Delta x, whose width scales with the *difference* of
the weights rather than with the networks' ranges. Through a ReLU, Delta h = relu(a^f) - relu(a^g) is
bounded by cases on each side's stability (both active: Delta; both inactive: 0; in general relu is
monotone and 1-Lipschitz, so Delta h lies between min(0, Delta) and max(0, Delta); if g is active,
Delta h >= Delta; if f is active, Delta h <= Delta). Every step is also intersected with the naive
subtraction, and a^g is refined by a^f - Delta (and a^f by a^g + Delta), so the result is never looser
than `naive_bounds`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prunecert.core.interval import Bounds, affine_interval, centre_radius
from prunecert.certify.naive import Part, affine_sum, margin_op, naive_bounds, op_bounds
from prunecert.core.rounding import UNIT_ROUNDOFF
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.certify.result import PairBounds, interval_margins, meet, sub_bounds
from prunecert.errors import PairingError
from prunecert.network import AffineOp, AvgPool2d, Conv2d, Flatten, Linear, Scale

_DOWN, _UP = -torch.inf, torch.inf


def _add(a: Bounds, b: Bounds) -> Bounds:
    """Sound bounds of x + y (one-ulp outward rounding)."""
    return Bounds(torch.nextafter(a.lower + b.lower, torch.full_like(a.lower, _DOWN)),
                  torch.nextafter(a.upper + b.upper, torch.full_like(a.upper, _UP)))


def difference_op(opf: AffineOp, opg: AffineOp) -> AffineOp | None:
    """The op (A^f - A^g, b^f - b^g), or None when the ops carry no weights (identical maps)."""
    if isinstance(opf, (Flatten, AvgPool2d)):
        return None
    # the twins' ops agree kind by kind (`Pair` checks it), so opg is opf's class
    if isinstance(opf, Linear):
        assert isinstance(opg, Linear)
        return Linear(opf.weight - opg.weight, opf.bias - opg.bias, name="difference")
    if isinstance(opf, Conv2d):
        assert isinstance(opg, Conv2d)
        return Conv2d(opf.weight - opg.weight, opf._bias - opg._bias, opf.in_shape, opf.stride, opf.padding,
                      name="difference")
    if isinstance(opf, Scale):
        assert isinstance(opg, Scale)
        return Scale(opf.scale - opg.scale, opf.shift - opg.shift, opf.in_shape, name="difference")
    raise PairingError(f"differential bounds do not support op kind {opf.kind!r}")


def diff_step(opf: AffineOp, opg: AffineOp, dop: AffineOp | None, xf: Bounds, xg: Bounds, dx: Bounds | None,
              interval: Callable[[AffineOp, Bounds], Bounds] | None = None) -> tuple[Bounds, Bounds, Bounds]:
    """Bounds on (y^f, y^g, Delta y) for one op pair; `dx` None means Delta x = 0 exactly. `interval`:
    each network's own interval step (default `affine_interval`; diff-linear's passes share results)."""
    interval = interval or _interval
    yf = interval(opf, xf)
    yg = interval(opg, xg)
    parts: list[Part] = []
    fan_in = 0
    if dop is not None:
        # +2: the difference weights and bias are rounded
        parts.append((dop.linear, dop.abs_linear, xf))
        fan_in += dop.fan_in + 2
    if dx is not None:
        parts.append((opg.linear, opg.abs_linear, dx))
        fan_in += opg.fan_in
    if parts:
        bias = dop.bias if dop is not None else torch.zeros((), dtype=torch.float64)
        dy = affine_sum(parts, bias, fan_in + len(parts))
    else:  # same weightless op on the same input
        zero = torch.zeros_like(yf.lower)
        dy = Bounds(zero, zero.clone())
    dy = meet(dy, sub_bounds(yf, yg))
    yg = meet(yg, sub_bounds(yf, dy))      # a^g = a^f - Delta
    yf = meet(yf, _add(yg, dy))            # a^f = a^g + Delta
    return yf, yg, dy


def _interval(op: AffineOp, x: Bounds) -> Bounds:
    return affine_interval(op, x.lower, x.upper)


def relu_delta(af: Bounds, ag: Bounds, d: Bounds) -> Bounds:
    """Bounds on relu(a^f) - relu(a^g) given bounds on a^f, a^g and Delta = a^f - a^g."""
    naive = sub_bounds(af.relu(), ag.relu())
    lower = torch.maximum(torch.minimum(d.lower, torch.zeros_like(d.lower)), naive.lower)
    upper = torch.minimum(torch.maximum(d.upper, torch.zeros_like(d.upper)), naive.upper)
    lower = torch.where(ag.lower >= 0, torch.maximum(lower, d.lower), lower)  # g active: Dh >= Delta
    upper = torch.where(af.lower >= 0, torch.minimum(upper, d.upper), upper)  # f active: Dh <= Delta
    return Bounds(lower, upper)


def _chain(pair_ops: Sequence[tuple[AffineOp, AffineOp, AffineOp | None]], xf: Bounds, xg: Bounds, dx: Bounds | None
           ) -> tuple[Bounds, Bounds, Bounds | None, list[Bounds | None]]:
    """Run a layer's op pairs; also return the bounds entering its last op (for margins)."""
    last_in: tuple[Bounds, Bounds, Bounds | None] = (xf, xg, dx)
    for opf, opg, dop in pair_ops:
        last_in = (xf, xg, dx)
        xf, xg, dx = diff_step(opf, opg, dop, xf, xg, dx)
    return xf, xg, dx, list(last_in)


@boxes_or_batch
def diff_interval_bounds(pair: Pair, region: RegionBatch) -> PairBounds:
    """ReluDiff bounds on every layer's Delta over the regions' boxes."""
    lo, hi = region.lo, region.hi
    naive = naive_bounds(pair, region)
    ops = [[(of, og, difference_op(of, og)) for of, og in zip(lf.ops, lg.ops)] for lf, lg in pair.layer_pairs()]
    hf = hg = Bounds(lo, hi)
    dh: Bounds | None = None  # Delta of the layer input; exactly 0 at the network input
    f_b: list[Bounds] = []
    g_b: list[Bounds] = []
    delta: list[Bounds] = []
    local: list[Bounds] = []
    last_in: list[Bounds | None] = []
    for l in range(pair.n_layers):
        af, ag, d, last_in = _chain(ops[l], hf, hg, dh)
        assert d is not None
        af, ag, d = meet(af, naive.f[l]), meet(ag, naive.g[l]), meet(d, naive.delta[l])
        if l == 0:
            loc = d
        else:  # g's layer fed with f's input: Delta x = 0
            _, _, loc_in, _ = _chain(ops[l], hf, hf, None)
            assert loc_in is not None   # Delta of a layer's output is always bounded
            loc = meet(loc_in, naive.local[l])
        f_b.append(af)
        g_b.append(ag)
        delta.append(d)
        local.append(loc)
        if l < pair.n_layers - 1:
            dh = relu_delta(af, ag, d)
            hf, hg = af.relu(), ag.relu()
    margins = _margins(pair, last_in, f_b[-1], g_b[-1])
    margins = torch.maximum(margins, naive.margin_lower) if naive.margin_lower is not None else margins
    return PairBounds(f_b, g_b, delta, local, margins, {"method": "diff-interval"})


def _margins(pair: Pair, last_in: list[Bounds | None], logits_f: Bounds, logits_g: Bounds) -> torch.Tensor:
    """(B, C, C) lower bounds on f_c - f_j and g_c - g_j: the margin maps run through `diff_step`."""
    c = pair.n_classes
    mf = margin_op(pair.layers_f[-1].ops[-1], c)
    mg = margin_op(pair.layers_g[-1].ops[-1], c)
    fallback = interval_margins(logits_f, logits_g)
    if mf is None or mg is None:
        return fallback
    xf, xg, dx = last_in
    assert xf is not None and xg is not None   # only Delta x may be None (exactly 0)
    # the margin ops' own weights are rounded differences: +2 terms in their margins
    yf, yg = op_bounds(mf, xf, 2), op_bounds(mg, xg, 2)
    dm = difference_op(mf, mg)
    assert dm is not None   # two Linears always have a difference op
    parts = [(dm.linear, dm.abs_linear, xf)]
    fan_in = dm.fan_in + 2
    if dx is not None:
        parts.append((mg.linear, mg.abs_linear, dx))
        fan_in += mg.fan_in + 2
    # dm = fl(mf - mg) with mf, mg themselves rounded: their errors are relative to |mf| + |mg|, not
    # to |dm|, so cover u (|mf| + |mg|) |x^f| (and the biases') explicitly
    c_f, r_f = centre_radius(xf)
    k = (mf.weight.abs() + mg.weight.abs()) * (2 * UNIT_ROUNDOFF)
    kb = (mf.bias.abs() + mg.bias.abs()) * (2 * UNIT_ROUNDOFF)
    extra = (c_f.abs() + r_f).reshape(c_f.shape[0], -1) @ k.T + kb
    dy = meet(affine_sum(parts, dm.bias, fan_in + len(parts), extra), sub_bounds(yf, yg))
    lf = torch.maximum(yf.lower, _add(yg, dy).lower)   # f_c - f_j = (g_c - g_j) + Delta margin
    lg = torch.maximum(yg.lower, sub_bounds(yf, dy).lower)
    m = torch.minimum(lf, lg).reshape(-1, c, c)
    return torch.maximum(m, fallback)
