"""Differential interval bounds (ReluDiff): soundness (sampled, gradient ascent, exact rational
arithmetic), never looser than naive, zero width on identical networks, the ReLU case analysis."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pairs import (assert_contains, exact_layers, extremes, pairs_and_boxes, random_box, random_conv_pair,
                   random_pair, sample_deltas, sample_points)

from prunecert.certify.diff_interval import diff_interval_bounds, relu_delta
from prunecert.core.interval import Bounds
from prunecert.certify.naive import naive_bounds
from prunecert.network import Linear


def _assert_within(inner: Bounds, outer: Bounds, what: str):
    assert (inner.lower >= outer.lower).all(), f"{what}: lower bound looser than naive"
    assert (inner.upper <= outer.upper).all(), f"{what}: upper bound looser than naive"


@settings(max_examples=40, deadline=None)
@given(pairs_and_boxes())
def test_diff_interval_is_sound_and_never_looser_than_naive(case):
    pair, lo, hi = case
    b, nb = diff_interval_bounds(pair, lo, hi), naive_bounds(pair, lo, hi)
    e2e = sample_deltas(pair, lo, hi, 600)
    local = sample_deltas(pair, lo, hi, 600, local=True)
    x = sample_points(lo, hi, 600)
    af, ag = pair.forward_layers(x)
    for l in range(pair.n_layers):
        assert_contains(b.delta[l].lower, b.delta[l].upper, e2e[l], f"end-to-end layer {l}")
        assert_contains(b.local[l].lower, b.local[l].upper, local[l], f"local layer {l}")
        assert_contains(b.f[l].lower, b.f[l].upper, (af[l].min(0).values, af[l].max(0).values), f"f layer {l}")
        assert_contains(b.g[l].lower, b.g[l].upper, (ag[l].min(0).values, ag[l].max(0).values), f"g layer {l}")
        for name in ("delta", "local", "f", "g"):
            _assert_within(getattr(b, name)[l], getattr(nb, name)[l], f"{name} layer {l}")
        # local[0] is delta[0]: both networks see the same input
    torch.testing.assert_close(b.local[0].lower, b.delta[0].lower, rtol=0, atol=0)
    assert (b.margin_lower >= nb.margin_lower).all()


@pytest.mark.parametrize("seed", range(4))
def test_diff_interval_contains_gradient_ascent_extremes(seed):
    rng = np.random.default_rng(200 + seed)
    pair = random_pair(rng, 3, (10, 8, 6), 3, twin=("prune", "quantise", "perturb", "perturb")[seed])
    lo, hi = random_box(rng, 3)
    b = diff_interval_bounds(pair, lo, hi)
    for l, ext in enumerate(extremes(pair, lo, hi, seed=seed)):
        assert_contains(b.delta[l].lower, b.delta[l].upper, ext, f"end-to-end layer {l}")
    for l, ext in enumerate(extremes(pair, lo, hi, seed=seed, local=True)):
        assert_contains(b.local[l].lower, b.local[l].upper, ext, f"local layer {l}")


def test_conv_pair_sound_and_tighter_than_naive():
    rng = np.random.default_rng(9)
    pair = random_conv_pair(rng, twin="perturb")
    lo, hi = random_box(rng, (1, 6, 6))
    b, nb = diff_interval_bounds(pair, lo, hi), naive_bounds(pair, lo, hi)
    e2e, local = sample_deltas(pair, lo, hi, 500), sample_deltas(pair, lo, hi, 500, local=True)
    for l in range(pair.n_layers):
        assert_contains(b.delta[l].lower, b.delta[l].upper, e2e[l], f"conv end-to-end {l}")
        assert_contains(b.local[l].lower, b.local[l].upper, local[l], f"conv local {l}")
        _assert_within(b.delta[l], nb.delta[l], f"conv layer {l}")
    assert_contains(b.delta[-1].lower, b.delta[-1].upper, extremes(pair, lo, hi, 300, layers=[-1])[-1], "conv logits")
    assert float(b.delta[-1].width.sum()) < float(nb.delta[-1].width.sum())


def test_conv_pair_with_a_pruned_twin():
    rng = np.random.default_rng(11)
    pair = random_conv_pair(rng, twin="prune")
    lo, hi = random_box(rng, (1, 6, 6))
    b = diff_interval_bounds(pair, lo, hi)
    e2e = sample_deltas(pair, lo, hi, 500)
    for l in range(pair.n_layers):
        assert_contains(b.delta[l].lower, b.delta[l].upper, e2e[l], f"pruned conv layer {l}")


@pytest.mark.parametrize("twin", ["same"])
def test_identical_networks_give_zero_width_up_to_the_margin(twin):
    rng = np.random.default_rng(3)
    for n_in, hidden in [(3, (8, 6)), (5, (12, 12, 4))]:
        pair = random_pair(rng, n_in, hidden, 3, twin=twin)
        b = diff_interval_bounds(pair, *random_box(rng, n_in))
        nb = naive_bounds(pair, *random_box(rng, n_in))
        for l in range(pair.n_layers):
            assert float(b.delta[l].width.max()) < 1e-250 and float(b.local[l].width.max()) < 1e-250
        assert float(nb.delta[-1].width.max()) > 1e-3  # what the naive method cannot see
    conv = random_conv_pair(rng, twin="same")
    b = diff_interval_bounds(conv, *random_box(rng, (1, 6, 6)))
    assert max(float(d.width.max()) for d in b.delta) < 1e-250


def test_small_perturbations_give_much_tighter_bounds_than_naive():
    ratios = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        f = random_pair(rng, 4, (12, 10), 3, twin="same").f
        ops = [Linear(op.weight + 0.01 * torch.randn(op.weight.shape, dtype=torch.float64,
                                                        generator=torch.Generator().manual_seed(seed)),
                      op.bias) if isinstance(op, Linear) else op for op in f.ops]
        from prunecert.core.pair import Pair
        from prunecert.network import Network
        pair = Pair(f, Network(ops, f.input_shape, 0.0, 1.0, name="g"))
        lo, hi = np.zeros(4), np.ones(4)
        ratios.append(float(diff_interval_bounds(pair, lo, hi).delta[-1].width.sum()
                            / naive_bounds(pair, lo, hi).delta[-1].width.sum()))
    assert max(ratios) < 0.5, ratios


# ----------------------------------------------------------------------------- exact arithmetic
@settings(max_examples=25, deadline=None)
@given(pairs_and_boxes(max_in=3, max_hidden=6), st.integers(0, 2**31))
def test_point_boxes_contain_the_exact_rational_deviation(case, seed):
    """lo = hi: the bounds are a few ulps wide and must contain the exact value, without any slack."""
    pair, lo, hi = case
    x = np.random.default_rng(seed).uniform(lo, hi)
    b = diff_interval_bounds(pair, x, x)
    nb = naive_bounds(pair, x, x)
    ef, eg = exact_layers(pair.f, x), exact_layers(pair.g, x)
    for l in range(pair.n_layers):
        for k, (vf, vg) in enumerate(zip(ef[l], eg[l])):
            for bounds in (b, nb):
                assert Fraction(float(bounds.delta[l].lower[0, k])) <= vf - vg <= Fraction(float(bounds.delta[l].upper[0, k]))
                assert Fraction(float(bounds.f[l].lower[0, k])) <= vf <= Fraction(float(bounds.f[l].upper[0, k]))


@settings(max_examples=25, deadline=None)
@given(pairs_and_boxes(max_in=3, max_hidden=6))
def test_first_layer_bound_covers_the_exact_corner_maximum(case):
    """Delta_0 is affine, so its exact extremes over the box sit at corners: no slack allowed."""
    pair, lo, hi = case
    b = diff_interval_bounds(pair, lo, hi)
    wf, wg = pair.f.ops[0].weight.numpy(), pair.g.ops[0].weight.numpy()
    bf, bg = pair.f.ops[0].bias.numpy(), pair.g.ops[0].bias.numpy()
    for k in range(wf.shape[0]):
        d = [Fraction(float(a)) - Fraction(float(c)) for a, c in zip(wf[k], wg[k])]
        base = Fraction(float(bf[k])) - Fraction(float(bg[k]))
        top = base + sum(max(di * Fraction(float(l)), di * Fraction(float(h))) for di, l, h in zip(d, lo, hi))
        bottom = base + sum(min(di * Fraction(float(l)), di * Fraction(float(h))) for di, l, h in zip(d, lo, hi))
        assert Fraction(float(b.delta[0].upper[0, k])) >= top
        assert Fraction(float(b.delta[0].lower[0, k])) <= bottom
        # and tight: within a relative 1e-12 of the exact range
        assert float(b.delta[0].upper[0, k]) - float(top) <= 1e-12 * (1 + abs(float(top)) + float(sum(abs(v) for v in d)))


# ----------------------------------------------------------------------------- the ReLU cases
def _t(v: float) -> torch.Tensor:
    return torch.tensor([float(v)], dtype=torch.float64)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=2), st.lists(st.floats(0, 2), min_size=6, max_size=6))
def test_relu_delta_contains_every_consistent_pair(values, widths):
    """For any a^f, a^g inside their intervals and Delta inside its interval, relu(a^f) - relu(a^g) is inside."""
    vf, vg = values
    af = Bounds(_t(vf - widths[0]), _t(vf + widths[1]))
    ag = Bounds(_t(vg - widths[2]), _t(vg + widths[3]))
    d = Bounds(_t(vf - vg - widths[4]), _t(vf - vg + widths[5]))
    out = relu_delta(af, ag, d)
    true = max(vf, 0.0) - max(vg, 0.0)
    assert float(out.lower) <= true + 1e-12 and true - 1e-12 <= float(out.upper)
    # and never looser than the two generic rules
    assert float(out.lower) >= min(float(d.lower), 0.0) and float(out.upper) <= max(float(d.upper), 0.0)


def test_relu_delta_cases_by_stability():
    def run(af, ag, d):
        b = relu_delta(Bounds(_t(af[0]), _t(af[1])), Bounds(_t(ag[0]), _t(ag[1])), Bounds(_t(d[0]), _t(d[1])))
        return float(b.lower), float(b.upper)
    assert run((1, 2), (1.5, 2.5), (-0.6, -0.4)) == (-0.6, -0.4)        # both active: Delta itself
    lo, hi = run((-2, -1), (-3, -1), (-0.5, 1.5))                       # both inactive: zero (+- 1 ulp)
    assert -1e-300 < lo <= 0.0 <= hi < 1e-300
    lo, hi = run((1, 2), (-2, -1), (2.0, 4.0))                          # f active, g inactive: a^f
    assert 1.0 - 1e-15 <= lo and hi <= 2.0 + 1e-15
    lo, hi = run((-1, 1), (0.5, 1), (0.2, 0.5))                         # g active: Delta h >= Delta > 0
    assert lo == 0.2 and hi == 0.5
    lo, hi = run((-1, 2), (-1, 2), (-0.3, 0.2))                         # both unstable: [min(0,l), max(0,u)]
    assert (lo, hi) == (-0.3, 0.2)


def test_diff_interval_agrees_with_milp_when_available():
    milp = pytest.importorskip("prunecert.certify.milp", reason="prunecert.certify.milp (exact MILP) not built yet")
    rng = np.random.default_rng(21)
    for twin in ("prune", "quantise", "perturb"):
        pair = random_pair(rng, 2, (5, 4), 2, twin=twin)
        lo, hi = random_box(rng, 2)
        exact = milp.milp_bounds(pair, lo, hi).delta[-1]  # exact on the logits (up to the solver's gap)
        b = diff_interval_bounds(pair, lo, hi).delta[-1]
        sampled = sample_deltas(pair, lo, hi, 2000)[-1]
        gap = 1e-6 * (1 + exact.upper.abs() + exact.lower.abs())
        # sound: our bounds contain the exact optimum, which contains every sampled value
        assert (b.upper >= exact.upper - gap).all() and (b.lower <= exact.lower + gap).all()
        assert_contains(exact.lower, exact.upper, sampled, f"milp {twin}")
