"""Naive deviation bounds: bound f and g separately (interval arithmetic), then subtract.

The baseline every tighter method is compared against: Delta_l lies in
[lower(a_l^f) - upper(a_l^g), upper(a_l^f) - lower(a_l^g)]. It ignores that f and g see the same
input, so its width grows like the sum of both networks' ranges, not like their difference.

Also home to the small sound-arithmetic helpers the differential methods share (`affine_sum`) and to
the agreement margins: f_c - f_j = (W_c - W_j) h + (b_c - b_j) is bounded through the last layer's
input, which is far tighter than lower(f_c) - upper(f_j).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from prunecert.core.interval import Bounds, affine_interval, centre_radius, interval_bounds, layer_interval
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.certify.result import PairBounds, interval_margins, sub_bounds
from prunecert.core.rounding import UNIT_ROUNDOFF, margin, widen
from prunecert.network import AffineOp, Layer, Linear, Network

# (linear map, absolute-value map, bounds on its argument)
Part = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], Bounds]

MAX_MARGIN_CLASSES = 64  # beyond this, C^2 margin rows cost more than they are worth


def affine_sum(parts: Sequence[Part], bias: torch.Tensor | float, fan_in: int,
               extra_err: torch.Tensor | None = None) -> Bounds:
    """Sound bounds of sum_k A_k x_k + bias with x_k in the boxes of `parts` (float64).

    `fan_in` must count every floating-point term summed into one output, plus two per rounded input
    (a weight matrix that is itself a rounded difference); the margin is gamma(fan_in + 4) * M with
    M = sum_k |A_k| (|c_k| + r_k) + |bias| (see docs/theory.md, "Rounding margins"). `extra_err` is a
    further absolute error to cover (weights whose rounding is not relative to their own size).
    """
    centre: torch.Tensor | None = None
    radius: torch.Tensor | None = None
    mag: torch.Tensor | None = None
    for lin, abs_lin, b in parts:
        c, r = centre_radius(b)
        terms = (lin(c), abs_lin(r), abs_lin(c.abs() + r))
        if centre is None:
            centre, radius, mag = terms
        else:
            assert radius is not None and mag is not None   # set together with centre
            centre, radius, mag = centre + terms[0], radius + terms[1], mag + terms[2]
    assert centre is not None and radius is not None and mag is not None, "affine_sum needs at least one part"
    bias_t = torch.as_tensor(bias, dtype=torch.float64)
    centre = centre + bias_t
    mag = mag + bias_t.abs()
    err = margin(mag, fan_in)
    if extra_err is not None:
        err = err + extra_err * (1.0 + 8 * UNIT_ROUNDOFF)
    return Bounds(*widen(centre - radius, centre + radius, err))


def op_bounds(op: AffineOp, b: Bounds, extra_terms: int = 0) -> Bounds:
    """Interval bounds of `op` over `b`, with `extra_terms` more rounded terms in its margin."""
    return affine_sum([(op.linear, op.abs_linear, b)], op.bias, op.fan_in + extra_terms)


# ----------------------------------------------------------------------------- agreement margins
def margin_op(op: AffineOp, n_classes: int) -> Linear | None:
    """The map h -> (z_c - z_j)_{c,j} composed with the last op, if it is a (small) Linear."""
    if not isinstance(op, Linear) or n_classes > MAX_MARGIN_CLASSES:
        return None
    w, b = op.weight, op.bias
    wm = (w.unsqueeze(1) - w.unsqueeze(0)).reshape(n_classes * n_classes, -1)
    bm = (b.unsqueeze(1) - b.unsqueeze(0)).reshape(-1)
    return Linear(wm, bm, name="margin")


def last_op_input(net_layers: Sequence[Layer], last_in: Bounds) -> Bounds:
    """Bounds on the input of the last op of the last layer, given bounds on that layer's input."""
    for op in net_layers[-1].ops[:-1]:
        last_in = affine_interval(op, last_in.lower, last_in.upper)
    return last_in


def margins_from_inputs(pair: Pair, in_f: Bounds, in_g: Bounds, logits_f: Bounds, logits_g: Bounds) -> torch.Tensor:
    """(B, C, C) lower bounds on both f_c - f_j and g_c - g_j, from the last ops' input bounds."""
    c = pair.n_classes
    mf = margin_op(pair.layers_f[-1].ops[-1], c)
    mg = margin_op(pair.layers_g[-1].ops[-1], c)
    fallback = interval_margins(logits_f, logits_g)
    if mf is None or mg is None:
        return fallback
    # +2: the margin weights are rounded differences of the original weights
    lf = op_bounds(mf, in_f, extra_terms=2).lower
    lg = op_bounds(mg, in_g, extra_terms=2).lower
    m = torch.minimum(lf, lg).reshape(-1, c, c)
    return torch.maximum(m, fallback)


# ----------------------------------------------------------------------------- the method
def network_bounds(net: Network, lo: torch.Tensor, hi: torch.Tensor) -> list[Bounds]:
    return interval_bounds(net, lo, hi)


@boxes_or_batch
def naive_bounds(pair: Pair, region: RegionBatch,
                 per_network: Callable[[Network, torch.Tensor, torch.Tensor], list[Bounds]] | None = None
                 ) -> PairBounds:
    """Bound f and g separately over the regions' boxes, subtract.

    `per_network` (default: interval propagation) can be any sound per-network bound, e.g. CROWN.
    """
    lo, hi = region.lo, region.hi
    bound = per_network or network_bounds
    bf, bg = bound(pair.f, lo, hi), bound(pair.g, lo, hi)
    delta = [sub_bounds(a, b) for a, b in zip(bf, bg)]
    local = [delta[0]]
    for l in range(1, pair.n_layers):
        # both layers fed with f's layer input h^f_{l-1} in relu(bf[l-1])
        local.append(sub_bounds(bf[l], layer_interval(pair.layers_g[l], bf[l - 1].relu())))
    in_f = last_op_input(pair.layers_f, bf[-2].relu() if pair.n_layers > 1 else Bounds(lo, hi))
    in_g = last_op_input(pair.layers_g, bg[-2].relu() if pair.n_layers > 1 else Bounds(lo, hi))
    margins = margins_from_inputs(pair, in_f, in_g, bf[-1], bg[-1])
    return PairBounds(bf, bg, delta, local, margins, {"method": "naive"})
