"""LP bounds (`certify.lp`), the encoding they share with MILP/BaB, and the sound dual bounds."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairs import pairs_and_boxes, random_box, random_conv_pair, random_pair, sample_deltas, sample_points
from prunecert.certify import formulation
from prunecert.certify.formulation import RegionBounds, build_encoding, relu_upper_line
from prunecert.certify.highs import HighsModel
from prunecert.certify.lp import initial_bounds, lp_bounds, unit
from prunecert.certify.naive import naive_bounds
from prunecert.core.regions import L2Ball
from prunecert.errors import ConfigError, RegionError

# float64 forward passes (the sampled "truth") carry rounding of this order; bounds are on real values
FWD = 1e-12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _contains(bounds, sampled, what):
    lo, hi = bounds.lower[0].reshape(sampled[0].shape), bounds.upper[0].reshape(sampled[1].shape)
    assert (lo <= sampled[0] + FWD).all(), f"{what}: lower bound above a sampled value: {lo - sampled[0]}"
    assert (hi >= sampled[1] - FWD).all(), f"{what}: upper bound below a sampled value: {hi - sampled[1]}"


def _region_bounds(pair, lo, hi) -> RegionBounds:
    return RegionBounds.from_pair_bounds(initial_bounds(pair, torch.as_tensor(lo)[None], torch.as_tensor(hi)[None]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_and_boxes())
def test_lp_contains_every_sampled_deviation(case):
    pair, lo, hi = case
    pb = lp_bounds(pair, lo, hi)
    for l, (end, loc) in enumerate(zip(sample_deltas(pair, lo, hi, 600), sample_deltas(pair, lo, hi, 600, local=True))):
        _contains(pb.delta[l], end, f"end-to-end layer {l}")
        _contains(pb.local[l], loc, f"local layer {l}")
        af, ag = pair.forward_layers(sample_points(lo, hi, 200))
        _contains(pb.f[l], (af[l].min(0).values, af[l].max(0).values), f"f layer {l}")
        _contains(pb.g[l], (ag[l].min(0).values, ag[l].max(0).values), f"g layer {l}")
    # agreement margins must hold at every sample too
    m = pb.agreement_margins()[0]
    x = sample_points(lo, hi, 300)
    yf, yg = pair.f.forward(x), pair.g.forward(x)
    for c in range(pair.n_classes):
        for j in range(pair.n_classes):
            if c != j:
                assert m[c, j] <= (yf[:, c] - yf[:, j]).min() + FWD
                assert m[c, j] <= (yg[:, c] - yg[:, j]).min() + FWD


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_and_boxes())
def test_raw_lp_never_looser_than_naive(case):
    """The LP's own dual bound (no intersection with other bounds) is at least as tight as naive."""
    pair, lo, hi = case
    naive = naive_bounds(pair, lo, hi)
    enc = build_encoding(pair, lo, hi, RegionBounds.from_pair_bounds(naive), delta_cuts=False)
    model = HighsModel(enc)
    for l in range(pair.n_layers):
        up = naive.delta[l].upper[0].reshape(-1).numpy()
        low = naive.delta[l].lower[0].reshape(-1).numpy()
        for k in range(len(up)):
            c = unit(enc, enc.af[l][k], enc.ag[l][k])
            slack = 1e-9 * (1 + abs(up[k]) + abs(low[k]))
            assert model.maximize_lp(c).bound <= up[k] + slack
            assert -model.maximize_lp(-c).bound >= low[k] - slack


def test_lp_tighter_than_naive_somewhere():
    """On a pruned pair over a wide box, the shared input makes the LP strictly tighter than naive."""
    rng = np.random.default_rng(4)
    pair = random_pair(rng, 3, (10, 8), 3, "perturb")
    lo, hi = np.zeros(3), np.ones(3)
    lp, naive = lp_bounds(pair, lo, hi), naive_bounds(pair, lo, hi)
    assert (lp.delta[-1].width < 0.5 * naive.delta[-1].width).all()


def test_identical_networks_give_zero_width():
    rng = np.random.default_rng(1)
    pair = random_pair(rng, 3, (6, 5), 3, "same")
    pb = lp_bounds(pair, np.zeros(3), np.ones(3))
    for l in range(pair.n_layers):
        assert torch.equal(pb.delta[l].lower, torch.zeros_like(pb.delta[l].lower))
        assert torch.equal(pb.delta[l].upper, torch.zeros_like(pb.delta[l].upper))
        assert pb.local[l].width.abs().max() == 0


@pytest.mark.parametrize("milp", [False, True])
def test_encoding_contains_real_points(milp):
    """Every real input, embedded as columns, satisfies every row and column bound (conv pairs too)."""
    rng = np.random.default_rng(2)
    for pair in (random_pair(rng, 3, (6, 5), 3, "prune"), random_pair(rng, 2, (5, 4), 2, "quantise"),
                 random_conv_pair(rng, "perturb")):
        lo, hi = random_box(rng, pair.input_shape)
        enc = build_encoding(pair, lo, hi, _region_bounds(pair, lo, hi), milp=milp, local=True)
        for x in sample_points(lo, hi, 40):
            v = enc.embed(pair, x.numpy())
            av = enc.A @ v
            assert (av >= enc.row_lo - 1e-12).all() and (av <= enc.row_hi + 1e-12).all()
            assert (v >= enc.col_lo - 1e-12).all() and (v <= enc.col_hi + 1e-12).all()


def test_pruned_twin_shares_layer_zero_columns():
    rng = np.random.default_rng(3)
    pair = random_pair(rng, 3, (6, 5), 3, "prune")  # incoming weights of layer 0 are untouched
    lo, hi = np.zeros(3), np.ones(3)
    enc = build_encoding(pair, lo, hi, _region_bounds(pair, lo, hi))
    assert np.array_equal(enc.af[0], enc.ag[0])
    assert not np.array_equal(enc.af[1], enc.ag[1])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_and_boxes(max_hidden=6), st.integers(0, 2**31 - 1))
def test_safe_bound_holds_for_any_dual_vector(case, seed):
    """Weak duality needs no optimality: garbage duals give a looser, never a wrong, bound."""
    pair, lo, hi = case
    rng = np.random.default_rng(seed)
    enc = build_encoding(pair, lo, hi, _region_bounds(pair, lo, hi))
    model = HighsModel(enc)
    c = rng.normal(size=enc.n_cols)
    points = [enc.embed(pair, x.numpy()) for x in sample_points(lo, hi, 30, seed=seed % 1000)]
    best = max(float(c @ v) for v in points)
    for y in (rng.normal(size=enc.n_rows), np.zeros(enc.n_rows), rng.normal(size=enc.n_rows) * 1e6):
        assert model.safe_bound(c, y) >= best - 1e-12
    sol = model.maximize_lp(c)
    assert sol.bound >= best - 1e-12
    assert sol.bound <= sol.value + 1e-6 * (1 + abs(sol.value))  # tight at the solver's own duals


def test_infeasibility_is_proven_by_a_farkas_ray():
    rng = np.random.default_rng(5)
    pair = random_pair(rng, 2, (4, 3), 2, "perturb")
    lo, hi = np.zeros(2), np.ones(2)
    enc = build_encoding(pair, lo, hi, _region_bounds(pair, lo, hi))
    model = HighsModel(enc)
    col = enc.af[0][0]
    top = enc.col_hi[col]
    model.set_col_bounds(col, top + 1.0, top + 2.0)  # beyond what the box can reach
    sol = model.maximize_lp(unit(enc, enc.af[-1][0]))
    assert sol.bound == -np.inf and sol.status == "infeasible"


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e3, -1e-6), st.floats(1e-6, 1e3))
def test_relu_upper_line_is_above_relu_exactly(lo, hi):
    s, t = relu_upper_line(lo, hi)
    fs, ft = Fraction(s), Fraction(t)
    assert fs * Fraction(lo) + ft >= 0                    # at the lower end, relu = 0
    assert fs * Fraction(hi) + ft >= Fraction(hi)         # at the upper end, relu = hi


def test_lp_on_conv_pair_is_sound():
    rng = np.random.default_rng(6)
    pair = random_conv_pair(rng, "prune")
    lo, hi = random_box(rng, pair.input_shape)
    pb = lp_bounds(pair, lo, hi)
    for l, s in enumerate(sample_deltas(pair, lo, hi, 400)):
        _contains(pb.delta[l], s, f"conv layer {l}")


def test_lp_with_l2_ball_is_sound_and_not_looser_than_its_box():
    rng = np.random.default_rng(7)
    for k in range(3):
        pair = random_pair(rng, 3, (8, 6), 3, ("prune", "quantise", "perturb")[k])
        c, r = rng.uniform(0.2, 0.8, 3), rng.uniform(0.05, 0.3)
        ball = L2Ball(c, r, np.zeros(3), np.ones(3))
        lo, hi = ball.bounding_box()
        pl2 = lp_bounds(pair, lo, hi, l2=(torch.as_tensor(c)[None], torch.tensor([r])))
        pbox = lp_bounds(pair, lo, hi)
        d = pair.deltas(ball.sample(3000, 0))[-1]
        _contains(pl2.delta[-1], (d.min(0).values, d.max(0).values), "L2 logits")
        assert (pl2.delta[-1].upper <= pbox.delta[-1].upper + 1e-6).all()
        assert (pl2.delta[-1].lower >= pbox.delta[-1].lower - 1e-6).all()


def test_batch_of_regions_matches_one_by_one():
    # the LP starts from diff-linear's bounds, whose float32 slope searches round differently in
    # differently shaped batches (docs/scale.md, on shards and chunks): equal up to that rounding, which
    # is ~1 ulp here; a batching bug (a region's LP fed another region's bounds) is off by far more
    rng = np.random.default_rng(8)
    pair = random_pair(rng, 3, (6, 5), 2, "prune")
    boxes = [random_box(rng, 3) for _ in range(3)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    batch = lp_bounds(pair, lo, hi)
    for b, (l, h) in enumerate(boxes):
        one = lp_bounds(pair, l, h)
        for got, want in ((batch.delta[-1].upper[b], one.delta[-1].upper[0]),
                          (batch.delta[-1].lower[b], one.delta[-1].lower[0])):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_too_large_pair_is_refused(monkeypatch):
    monkeypatch.setattr(formulation, "MAX_COLUMNS", 20)
    rng = np.random.default_rng(9)
    pair = random_pair(rng, 3, (12, 10), 3, "perturb")
    with pytest.raises(ConfigError, match="columns.*diff-linear"):
        lp_bounds(pair, np.zeros(3), np.ones(3))


def test_bad_l2_radius_is_refused():
    rng = np.random.default_rng(10)
    pair = random_pair(rng, 2, (3, 3), 2, "prune")
    with pytest.raises(RegionError, match="radii"):
        lp_bounds(pair, np.zeros(2), np.ones(2), l2=(torch.full((1, 2), 0.5), torch.tensor([-1.0])))


def test_time_limit_keeps_sound_initial_bounds():
    rng = np.random.default_rng(11)
    pair = random_pair(rng, 3, (10, 8), 3, "perturb")
    lo, hi = np.zeros(3), np.ones(3)
    pb = lp_bounds(pair, lo, hi, time_limit=1e-9)
    assert pb.info["complete"] == [False]
    for l, s in enumerate(sample_deltas(pair, lo, hi, 500)):
        _contains(pb.delta[l], s, f"layer {l}")
