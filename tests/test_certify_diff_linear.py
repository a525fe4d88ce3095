"""Differential linear bounds (diff-linear): soundness against sampling, gradient ascent, exhaustive
enumeration, the MILP and exact rational arithmetic; never looser than diff-interval / naive; zero
width on identical networks; optimisation only tightens; L2 balls; the relaxations themselves."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import (assert_contains, exact_layers, extremes, pairs_and_boxes, random_box, random_conv_pair,
                   random_pair, sample_deltas, sample_points)

from prunecert.certify.diff_interval import diff_interval_bounds
from prunecert.certify.diff_linear import diff_linear_bounds
from prunecert.core.interval import Bounds
from prunecert.certify.naive import naive_bounds
from prunecert.certify.relax import DeltaParams, DeltaRelax, quantise_theta, relax_delta, upper_line
from prunecert.errors import ConfigError, RegionError

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _within(inner: Bounds, outer: Bounds, what: str) -> None:
    assert (inner.lower >= outer.lower).all(), f"{what}: lower bound looser"
    assert (inner.upper <= outer.upper).all(), f"{what}: upper bound looser"


def _margins_sound(b, pair, x) -> None:
    af, ag = pair.forward_layers(x)
    m = b.margin_lower[0]
    c = m.shape[0]
    for logits in (af[-1], ag[-1]):
        diff = logits.unsqueeze(2) - logits.unsqueeze(1)          # (n, c, j)
        low = diff.min(0).values
        off = ~torch.eye(c, dtype=torch.bool)
        assert (m[off] <= low[off] + 1e-9 * (1 + low[off].abs())).all(), "agreement margin above a sampled one"


# ----------------------------------------------------------------------------- soundness
@settings(max_examples=30, **SLOW)
@given(pairs_and_boxes())
def test_sound_and_never_looser_than_diff_interval_or_naive(case):
    pair, lo, hi = case
    b = diff_linear_bounds(pair, lo, hi)
    di, nb = diff_interval_bounds(pair, lo, hi), naive_bounds(pair, lo, hi)
    e2e, local = sample_deltas(pair, lo, hi, 500), sample_deltas(pair, lo, hi, 500, local=True)
    x = sample_points(lo, hi, 500)
    af, ag = pair.forward_layers(x)
    for l in range(pair.n_layers):
        assert_contains(b.delta[l].lower, b.delta[l].upper, e2e[l], f"end-to-end layer {l}")
        assert_contains(b.local[l].lower, b.local[l].upper, local[l], f"local layer {l}")
        assert_contains(b.f[l].lower, b.f[l].upper, (af[l].min(0).values, af[l].max(0).values), f"f layer {l}")
        assert_contains(b.g[l].lower, b.g[l].upper, (ag[l].min(0).values, ag[l].max(0).values), f"g layer {l}")
        for name in ("delta", "local", "f", "g"):
            _within(getattr(b, name)[l], getattr(di, name)[l], f"{name} layer {l} vs diff-interval")
            _within(getattr(b, name)[l], getattr(nb, name)[l], f"{name} layer {l} vs naive")
    torch.testing.assert_close(b.local[0].lower, b.delta[0].lower, rtol=0, atol=0)
    assert (b.margin_lower >= di.margin_lower).all() and (b.margin_lower >= nb.margin_lower).all()
    _margins_sound(b, pair, x)


@pytest.mark.parametrize("seed", range(4))
def test_contains_gradient_ascent_extremes_of_deeper_pairs(seed):
    rng = np.random.default_rng(500 + seed)
    pair = random_pair(rng, 4, (12, 10, 8), 3, twin=("prune", "quantise", "perturb", "perturb")[seed])
    lo, hi = random_box(rng, 4)
    b = diff_linear_bounds(pair, lo, hi)
    for l, ext in enumerate(extremes(pair, lo, hi, seed=seed)):
        assert_contains(b.delta[l].lower, b.delta[l].upper, ext, f"end-to-end layer {l}")
    for l, ext in enumerate(extremes(pair, lo, hi, seed=seed, local=True)):
        assert_contains(b.local[l].lower, b.local[l].upper, ext, f"local layer {l}")


@pytest.mark.parametrize("twin", ["perturb", "prune", "quantise"])
def test_conv_pair_sound_and_tighter_than_diff_interval(twin):
    rng = np.random.default_rng({"perturb": 9, "prune": 11, "quantise": 13}[twin])
    pair = random_conv_pair(rng, twin=twin)
    lo, hi = random_box(rng, (1, 6, 6))
    b, di = diff_linear_bounds(pair, lo, hi), diff_interval_bounds(pair, lo, hi)
    e2e, local = sample_deltas(pair, lo, hi, 500), sample_deltas(pair, lo, hi, 500, local=True)
    for l in range(pair.n_layers):
        assert_contains(b.delta[l].lower, b.delta[l].upper, e2e[l], f"conv end-to-end {l}")
        assert_contains(b.local[l].lower, b.local[l].upper, local[l], f"conv local {l}")
        _within(b.delta[l], di.delta[l], f"conv layer {l}")
    assert_contains(b.delta[-1].lower, b.delta[-1].upper, extremes(pair, lo, hi, 300, layers=[-1])[-1], "conv logits")
    assert float(b.delta[-1].width.sum()) < float(di.delta[-1].width.sum())


@settings(max_examples=12, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune", "quantise"]),
       st.sampled_from([(1, 6, 6), (2, 8, 8), (1, 10, 10), (3, 6, 8)]))
def test_conv_pairs_of_random_shapes_are_sound_for_every_propagation_method(seed, twin, in_shape):
    """Random conv pairs (pruned channels included) of several input shapes: naive, diff-interval and
    diff-linear contain every sampled and gradient-ascended Delta, local and end-to-end."""
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=in_shape)
    lo, hi = random_box(rng, in_shape)
    e2e, local = sample_deltas(pair, lo, hi, 300), sample_deltas(pair, lo, hi, 300, local=True)
    ascended = extremes(pair, lo, hi, 100, layers=[-1], seed=seed)[-1]
    for fn in (naive_bounds, diff_interval_bounds, diff_linear_bounds):
        b = fn(pair, lo, hi)
        for l in range(pair.n_layers):
            assert_contains(b.delta[l].lower, b.delta[l].upper, e2e[l], f"{fn.__name__} end-to-end {l}")
            assert_contains(b.local[l].lower, b.local[l].upper, local[l], f"{fn.__name__} local {l}")
        assert_contains(b.delta[-1].lower, b.delta[-1].upper, ascended, f"{fn.__name__} ascended logits")


def test_conv_pair_over_a_wide_box_is_much_tighter_than_diff_interval():
    rng = np.random.default_rng(9)
    pair = random_conv_pair(rng, twin="perturb")
    lo, hi = np.zeros((1, 6, 6)), np.ones((1, 6, 6))
    b, di = diff_linear_bounds(pair, lo, hi), diff_interval_bounds(pair, lo, hi)
    assert float(b.delta[-1].width.sum()) < 0.75 * float(di.delta[-1].width.sum())
    assert_contains(b.delta[-1].lower, b.delta[-1].upper, sample_deltas(pair, lo, hi, 1000)[-1], "conv domain")


# ----------------------------------------------------------------------------- exact ground truth
@st.composite
def _tiny(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pair = random_pair(rng, draw(st.integers(1, 2)), (draw(st.integers(2, 4)), draw(st.integers(2, 3))), 2,
                       draw(st.sampled_from(["prune", "quantise", "perturb"])))
    return pair, *random_box(rng, pair.f.input_shape[0])


@settings(max_examples=15, **SLOW)
@given(_tiny())
def test_logit_bounds_contain_the_exhaustive_enumeration_optimum(case):
    """enumerate_max solves one LP per joint activation pattern: the true extremes of Delta_logit."""
    from prunecert.certify.exhaustive import enumerate_max
    pair, lo, hi = case
    b = diff_linear_bounds(pair, lo, hi)
    for k in range(2):
        for sign in (1.0, -1.0):
            cf = np.zeros(2)
            cf[k] = sign
            truth = enumerate_max(pair, lo, hi, (-1, cf, -cf)).value   # max of sign * Delta_k
            bound = float(b.delta[-1].upper[0, k]) if sign > 0 else -float(b.delta[-1].lower[0, k])
            assert bound >= truth - 1e-9 * (1 + abs(truth)), (k, sign, bound, truth)


def test_against_milp_sound_and_close():
    """Sound against the exact MILP on small pairs, and close to it: the median width ratio stays small."""
    milp = pytest.importorskip("prunecert.certify.milp", reason="prunecert.certify.milp not available")
    rng = np.random.default_rng(21)
    ratios = []
    for twin in ("prune", "quantise", "perturb", "prune", "perturb", "quantise"):
        pair = random_pair(rng, 3, (6, 5), 2, twin=twin)
        lo, hi = random_box(rng, 3)
        exact = milp.milp_bounds(pair, lo, hi, local=False).delta[-1]
        b = diff_linear_bounds(pair, lo, hi).delta[-1]
        gap = 1e-6 * (1 + exact.upper.abs() + exact.lower.abs())
        assert (b.upper >= exact.upper - gap).all() and (b.lower <= exact.lower + gap).all()
        ratios.append(float(b.width.sum() / exact.width.sum().clamp_min(1e-12)))
    assert np.median(ratios) < 2.0, ratios


@settings(max_examples=20, **SLOW)
@given(pairs_and_boxes(max_in=3, max_hidden=6), st.integers(0, 2**31))
def test_point_boxes_contain_the_exact_rational_values(case, seed):
    """lo = hi: the bounds are a few ulps wide and must contain the exact values, without any slack."""
    pair, lo, hi = case
    x = np.random.default_rng(seed).uniform(lo, hi)
    b = diff_linear_bounds(pair, x, x)
    ef, eg = exact_layers(pair.f, x), exact_layers(pair.g, x)
    for l in range(pair.n_layers):
        for k, (vf, vg) in enumerate(zip(ef[l], eg[l])):
            assert Fraction(float(b.delta[l].lower[0, k])) <= vf - vg <= Fraction(float(b.delta[l].upper[0, k]))
            assert Fraction(float(b.f[l].lower[0, k])) <= vf <= Fraction(float(b.f[l].upper[0, k]))
            assert Fraction(float(b.g[l].lower[0, k])) <= vg <= Fraction(float(b.g[l].upper[0, k]))


# ----------------------------------------------------------------------------- properties of the method
def test_identical_networks_give_zero_width():
    rng = np.random.default_rng(3)
    for n_in, hidden in [(3, (8, 6)), (5, (12, 12, 4))]:
        pair = random_pair(rng, n_in, hidden, 3, twin="same")
        b = diff_linear_bounds(pair, *random_box(rng, n_in))
        for l in range(pair.n_layers):
            assert float(b.delta[l].width.max()) < 1e-250 and float(b.local[l].width.max()) < 1e-250
    conv = random_conv_pair(rng, twin="same")
    b = diff_linear_bounds(conv, *random_box(rng, (1, 6, 6)))
    assert max(float(d.width.max()) for d in b.delta) < 1e-250


def test_optimisation_never_loosens_and_does_tighten():
    gains = []
    for seed in range(4):
        rng = np.random.default_rng(40 + seed)
        pair = random_pair(rng, 4, (12, 10, 8), 3, twin=("perturb", "quantise")[seed % 2])
        lo, hi = random_box(rng, 4)
        plain = diff_linear_bounds(pair, lo, hi, optimize=False)
        opt = diff_linear_bounds(pair, lo, hi, optimize=True, iterations=20)
        assert plain.info["optimized"] is False and opt.info["optimized"] is True
        _within(opt.delta[-1], plain.delta[-1], "optimised logits")
        for l in range(pair.n_layers - 1):   # hidden layers are not optimised: identical
            torch.testing.assert_close(opt.delta[l].lower, plain.delta[l].lower, rtol=0, atol=0)
        gains.append(1 - float(opt.delta[-1].width.sum() / plain.delta[-1].width.sum()))
    assert max(gains) > 0.01, gains


def test_much_tighter_than_diff_interval_for_small_perturbations_over_the_domain():
    ratios = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        pair = random_pair(rng, 4, (12, 10), 3, twin="perturb")
        lo, hi = np.zeros(4), np.ones(4)
        ratios.append(float(diff_linear_bounds(pair, lo, hi).delta[-1].width.sum()
                            / diff_interval_bounds(pair, lo, hi).delta[-1].width.sum()))
    assert np.median(ratios) < 0.6, ratios


def test_batched_regions_match_single_calls():
    rng = np.random.default_rng(7)
    pair = random_pair(rng, 3, (9, 7), 3, twin="prune")
    boxes = [random_box(rng, 3) for _ in range(5)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    batched = diff_linear_bounds(pair, lo, hi, optimize=False)
    for i, (l, h) in enumerate(boxes):
        one = diff_linear_bounds(pair, l, h, optimize=False)
        for layer in range(pair.n_layers):
            for name in ("delta", "local", "f", "g"):
                a, c = getattr(batched, name)[layer], getattr(one, name)[layer]
                torch.testing.assert_close(a.lower[i], c.lower[0], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(a.upper[i], c.upper[0], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- L2 balls
def _ball_points(centre: np.ndarray, radius: float, lo, hi, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, centre.size))
    d *= (radius * rng.uniform(0, 1, size=(n, 1)) ** (1 / centre.size)) / np.linalg.norm(d, axis=1, keepdims=True)
    d[: n // 4] *= radius / np.linalg.norm(d[: n // 4], axis=1, keepdims=True)   # on the sphere
    return torch.from_numpy(np.clip(centre + d, lo, hi))


@pytest.mark.parametrize("seed", range(3))
def test_l2_ball_bounds_are_sound_and_tighter_than_its_bounding_box(seed):
    rng = np.random.default_rng(70 + seed)
    n_in = 6
    pair = random_pair(rng, n_in, (10, 8), 3, twin=("prune", "perturb", "quantise")[seed])
    centre, radius = rng.uniform(0.3, 0.7, size=n_in), 0.25
    lo, hi = np.clip(centre - radius, 0, 1), np.clip(centre + radius, 0, 1)
    l2 = (torch.from_numpy(centre)[None], torch.tensor([radius], dtype=torch.float64))
    ball = diff_linear_bounds(pair, lo, hi, l2=l2)
    box = diff_linear_bounds(pair, lo, hi)
    x = _ball_points(centre, radius, 0.0, 1.0, 3000, seed)
    deltas = pair.deltas(x)
    for l in range(pair.n_layers):
        assert_contains(ball.delta[l].lower, ball.delta[l].upper, (deltas[l].min(0).values, deltas[l].max(0).values),
                        f"l2 layer {l}")
        _within(ball.delta[l], box.delta[l], f"l2 layer {l} vs its bounding box")
    assert float(ball.delta[-1].width.sum()) < float(box.delta[-1].width.sum())


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_errors():
    pair = random_pair(np.random.default_rng(0), 3, (4, 4), 2)
    lo, hi = np.zeros(3), np.ones(3)
    with pytest.raises(ConfigError, match="iterations"):
        diff_linear_bounds(pair, lo, hi, iterations=-1)
    with pytest.raises(RegionError, match="do not match"):
        diff_linear_bounds(pair, np.zeros(4), np.ones(4))
    with pytest.raises(RegionError, match="radii"):
        diff_linear_bounds(pair, lo, hi, l2=(torch.zeros(1, 3), torch.tensor([-1.0])))
    with pytest.raises(RegionError, match="centres"):
        diff_linear_bounds(pair, lo, hi, l2=(torch.zeros(1, 5), torch.tensor([0.1])))
    for bad in ([2], [], [-1]):
        with pytest.raises(ConfigError, match="logits must be"):
            diff_linear_bounds(pair, lo, hi, logits=bad)


# ----------------------------------------------------------------------------- the relaxations
@settings(max_examples=300, deadline=None)
@given(st.floats(-5, 5), st.floats(-5, 5), st.floats(0, 1))
def test_upper_line_lies_above_relu_in_exact_arithmetic(a, b, where):
    lo, hi = min(a, b), max(a, b)
    s, t = upper_line(torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64))
    s, t = Fraction(float(s)), Fraction(float(t))
    assert 0 <= s <= 1
    for v in (Fraction(lo), Fraction(hi), Fraction(lo) + (Fraction(hi) - Fraction(lo)) * Fraction(where)):
        assert s * v + t >= max(v, Fraction(0))


def _t(v) -> torch.Tensor:
    return torch.tensor([float(v)], dtype=torch.float64)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=2), st.lists(st.floats(0, 2), min_size=6, max_size=6),
       st.lists(st.floats(0, 1), min_size=6, max_size=6))
def test_delta_relaxation_lines_hold_at_every_consistent_point(values, widths, params):
    """Both Delta-h lines, for any parameters, bound relu(a^f) - relu(a^g) at a point (a^f, a^g) of the
    boxes (the rounding of the combined line is covered by the engine's margins, not here: 1e-12)."""
    vf, vg = values
    af = Bounds(_t(vf - widths[0]), _t(vf + widths[1]))
    ag = Bounds(_t(vg - widths[2]), _t(vg + widths[3]))
    d = Bounds(_t(vf - vg - widths[4]), _t(vf - vg + widths[5]))
    rel = DeltaRelax.of(af, ag, d)
    p = DeltaParams(*[torch.tensor([[v]], dtype=torch.float64) for v in params[:5]])
    lam = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)   # rows: upper line, -(lower line)
    mu_f, mu_d, bias, _ = relax_delta(rel, lam, DeltaParams(*[x.expand(1, 2, 1) for x in p.tensors()]), exact=True)
    true = max(vf, 0.0) - max(vg, 0.0)
    # the computed line may differ from the exact one by rounding; at these magnitudes 1e-12 covers it
    line = float(mu_f[0, 0, 0]) * vf + float(mu_d[0, 0, 0]) * (vf - vg) + float(bias[0, 0])
    assert line >= true - 1e-12
    line = -(float(mu_f[0, 1, 0]) * vf + float(mu_d[0, 1, 0]) * (vf - vg) + float(bias[0, 1]))
    assert line <= true + 1e-12


def test_theta_grid_makes_one_minus_theta_exact():
    th = quantise_theta(torch.rand(1000, dtype=torch.float64))
    assert ((1.0 - th) + th == 1.0).all()
    assert all(Fraction(float(1.0 - v)) + Fraction(float(v)) == 1 for v in th[:50])


def test_local_equals_end_to_end_when_only_the_last_layer_differs():
    """With identical hidden layers, Delta h = 0 before the logits: the local and end-to-end deviations
    of the logits are the same function of x, and both bounds must reflect it (without optimisation,
    which tunes only the end-to-end rows and so may only tighten those)."""
    from prunecert.core.pair import Pair
    from prunecert.network import Linear, Network
    rng = np.random.default_rng(17)
    f = random_pair(rng, 4, (10, 8), 3, twin="same").f
    last = f.ops[-1]
    ops = f.ops[:-1] + [Linear(last.weight + 0.05 * torch.from_numpy(rng.normal(size=tuple(last.weight.shape))),
                               last.bias, name="g.fc")]
    pair = Pair(f, Network(ops, f.input_shape, 0.0, 1.0, name="g"))
    lo, hi = random_box(rng, 4)
    b = diff_linear_bounds(pair, lo, hi, optimize=False)
    for l in range(pair.n_layers - 1):
        assert float(b.delta[l].width.max()) < 1e-250
    torch.testing.assert_close(b.local[-1].lower, b.delta[-1].lower, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.local[-1].upper, b.delta[-1].upper, rtol=1e-9, atol=1e-12)
    opt = diff_linear_bounds(pair, lo, hi).delta[-1]   # within the (equal up to rounding) local bound
    assert (opt.lower >= b.local[-1].lower - 1e-9).all() and (opt.upper <= b.local[-1].upper + 1e-9).all()
    assert_contains(b.local[-1].lower, b.local[-1].upper, sample_deltas(pair, lo, hi, 1000, local=True)[-1], "local")


def test_row_chunks_do_not_change_the_result(monkeypatch):
    import prunecert.certify.diff_linear as dl
    rng = np.random.default_rng(5)
    pair = random_conv_pair(rng, twin="quantise", in_shape=(1, 8, 8))
    lo, hi = random_box(rng, (1, 8, 8))
    whole = diff_linear_bounds(pair, lo, hi, optimize=False)
    monkeypatch.setattr(dl, "ROW_BUDGET", 200)      # a handful of rows per chunk
    chunked = diff_linear_bounds(pair, lo, hi, optimize=False)
    for l in range(pair.n_layers):
        for name in ("delta", "local", "f", "g"):
            a, c = getattr(whole, name)[l], getattr(chunked, name)[l]
            torch.testing.assert_close(a.lower, c.lower, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(a.upper, c.upper, rtol=1e-9, atol=1e-12)
    e2e = sample_deltas(pair, lo, hi, 400)
    for l in range(pair.n_layers):
        assert_contains(chunked.delta[l].lower, chunked.delta[l].upper, e2e[l], f"chunked layer {l}")


def test_l2_regions_through_certify_on_a_conv_pair():
    from prunecert.certify import certify
    from prunecert.core.regions import Box, L2Ball
    rng = np.random.default_rng(8)
    pair = random_conv_pair(rng, twin="perturb")
    lo, hi = pair.domain()
    regions = [L2Ball(rng.uniform(0.2, 0.8, size=(1, 6, 6)), 0.3, lo, hi) for _ in range(3)]
    res = certify(pair, None, regions, method="diff-linear", progress=False, samples=200, seed=1)
    assert res.method == "diff-linear" and res.n_regions == 3
    assert (res.max_abs_logit_deviation >= res.sampled_max_abs_logit_deviation).all()
    box = certify(pair, None, [Box(*r.bounding_box(), lo, hi) for r in regions], method="diff-linear",
                  progress=False, samples=10, seed=1)
    assert (res.max_abs_logit_deviation <= box.max_abs_logit_deviation).all()
