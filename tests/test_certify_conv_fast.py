"""The conv fast paths of diff-linear: float32 transposes within their margin, widest-first rows that
settle each layer's maximum like every row would, region groups that walk what one region alone
would, and the whole method sound on batched conv pairs with these paths (and the second pass) on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, extremes, random_box, random_conv_pair, sample_deltas

import prunecert.certify.diff_linear as dl
import prunecert.certify.firstop as fo
from prunecert.certify.backsub import Engine, Form, OpCtx
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.layout import unit_patches
from prunecert.certify.rows import Selection, bound_rows, bound_top_rows, bound_widest, walk_width
from prunecert.core.interval import Bounds
from prunecert.core.region_batch import RegionBatch
from prunecert.network import Conv2d

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _step(op: Conv2d, xmax: torch.Tensor, form: Form, fast: bool) -> Form:
    ctx = OpCtx(op, op.abs_linear(xmax) + op.bias.abs(), xsum=xmax.flatten(1).sum(1) * (1 + 2.0 ** -30))
    engine = Engine([[ctx]], [])
    engine.fast = fast
    return engine.through_op(ctx, form)


@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 5), st.sampled_from([1, 2]), st.sampled_from([0, 1]),
       st.booleans())
def test_float32_transposes_stay_within_their_margin(seed, c_in, c_out, stride, padding, windows):
    """sum_j |fast_j - exact_j| |x_j|max never exceeds the two forms' error terms, for coefficients
    spanning 1e-44 .. 1e4 (float32 underflow included) and weights that float32 must round."""
    rng = np.random.default_rng(seed)
    h = int(rng.integers(5, 12))
    op = Conv2d(rng.normal(size=(c_out, c_in, 3, 3)) * 10.0 ** rng.uniform(-3, 2), rng.normal(size=c_out),
                (c_in, h, h), stride=stride, padding=padding)
    xmax = torch.as_tensor(rng.uniform(0, 10, size=(2, c_in, h, h)))
    shape = op.out_shape
    if windows:
        n = int(np.prod(shape))
        lam, lay = unit_patches(torch.arange(n).reshape(1, n).expand(2, n), torch.ones(2, n), shape)
    else:
        lam, lay = torch.zeros(2, 6, *shape, dtype=torch.float64), None
    lam = lam + torch.as_tensor(rng.normal(size=lam.shape) * 10.0 ** rng.uniform(-44, 4, size=lam.shape))
    lam[torch.as_tensor(rng.random(lam.shape) < 0.2)] = 0.0
    form = Form.rows_of(lam) if lay is None else Form.rows_of(lam, layout=lay)
    fast, exact = _step(op, xmax, form, True), _step(op, xmax, form, False)
    a, b = fast.lam_f, exact.lam_f
    if not fast.layout.dense:
        a, b = fast.layout.to_dense(a), exact.layout.to_dense(b)
    assert fast.layout.dense == exact.layout.dense
    seen = ((a - b).abs() * xmax.unsqueeze(1)).flatten(2).sum(-1)
    assert (seen <= fast.err + exact.err).all()
    assert (fast.err > exact.err).all()        # the float32 path did run, with its own margin


def _table_walk(lower: torch.Tensor, upper: torch.Tensor, calls: list):
    """A walk whose rows +-e_i concretise to upper_i / -lower_i exactly (no coefficients left)."""
    def walk(lam, lay, idx):
        lo, up = (lower, upper) if idx is None else (lower[idx], upper[idx])
        calls.append(int((lam != 0).any(-1).sum()))
        bias = (lam.clamp_min(0) * up.unsqueeze(1)).sum(-1) + (lam.clamp_max(0) * lo.unsqueeze(1)).sum(-1)
        return Form(None, None, bias, torch.zeros_like(bias))
    return walk


@pytest.mark.parametrize("widest", [bound_widest, bound_top_rows])
@settings(max_examples=30, **SLOW)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 8))
def test_widest_first_settles_the_maximum_of_every_row(widest, seed, batch, first):
    """Neuron by neuron (`bound_widest`) or bound by bound (`bound_top_rows`): each region's maximum
    |bound| is that of walking every candidate row, no bound is loosened, no row walked twice."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    centre = torch.as_tensor(rng.normal(size=(batch, n)))
    half = torch.as_tensor(rng.exponential(size=(batch, n)) * 10.0 ** rng.uniform(-1, 1, size=(batch, 1)))
    prior = Bounds(centre - half, centre + half)
    shrink = torch.as_tensor(rng.uniform(0, 1, size=(batch, n)))
    walked = Bounds(centre - shrink * half, centre + shrink * half)
    cand = torch.as_tensor(rng.random((batch, n)) < 0.8)
    region = RegionBatch(torch.zeros(batch, 1, dtype=torch.float64), torch.ones(batch, 1, dtype=torch.float64))
    calls: list = []
    got = widest(_table_walk(walked.lower, walked.upper, calls), prior, cand, (n,), region, 7, first)
    every = Bounds(torch.where(cand, torch.maximum(prior.lower, walked.lower), prior.lower),
                   torch.where(cand, torch.minimum(prior.upper, walked.upper), prior.upper))
    amax = lambda b: torch.maximum(b.lower.abs(), b.upper.abs()).max(1).values  # noqa: E731
    torch.testing.assert_close(amax(got), amax(every), rtol=1e-12, atol=0)   # concretise rounds up an ulp
    assert (got.lower >= prior.lower).all() and (got.upper <= prior.upper).all()
    assert sum(calls) <= 2 * int(cand.sum())


def test_top_rows_walk_only_the_bounds_that_carry_the_maximum():
    """One dominant bound per region (its walk keeps it the largest): one row walked per region."""
    n = 12
    lower = -torch.arange(1.0, n + 1, dtype=torch.float64).repeat(2, 1)   # |lower| up to 12 ...
    upper = torch.full((2, n), 0.5, dtype=torch.float64)
    upper[1, 3] = 20.0                                                     # ... region 1: an upper bound of 20
    calls: list = []
    region = RegionBatch(torch.zeros(2, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
    got = bound_top_rows(_table_walk(lower * 0.99, upper * 0.99, calls), Bounds(lower, upper),
                         torch.ones(2, n, dtype=torch.bool), (n,), region, 7, 1)
    assert calls == [2]     # one round: row -e_11 of region 0, +e_3 of region 1
    assert float(got.lower[0, -1]) == pytest.approx(-11.88) and float(got.upper[1, 3]) == pytest.approx(19.8)
    assert torch.equal(got.upper[0], upper[0]) and torch.equal(got.lower[1], lower[1])


def _every_row(walk, prior, cand, shape, region, chunk, first, stop=lambda: False):
    """`bound_top_rows`' stand-in walking every candidate row."""
    b, n = cand.shape
    sel = Selection.of(cand, n)
    res = bound_rows(walk, sel, shape, region, chunk, stop)
    lo = torch.maximum(prior.lower.reshape(b, n), sel.spread(res.lower, -torch.inf, b))
    up = torch.minimum(prior.upper.reshape(b, n), sel.spread(res.upper, torch.inf, b))
    return Bounds(lo.reshape(b, *shape), up.reshape(b, *shape))


@settings(max_examples=4, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune"]), st.sampled_from([0, 2000]))
def test_top_rows_report_the_maxima_of_every_row(seed, twin, full_cost):
    """diff-linear on the wide-layer paths: walking only the bounds that can carry a layer's maximum
    reports the same per-layer max |Delta| and max |local deviation| as walking every row (float64
    hidden and first-op transposes: float32 ones depend on which rows share a walk -- the first op's
    window matrix product sums in an order that depends on the row count --, within their margin).
    full_cost 2000: the hidden layers are costly, the logits cheap (as on vgg-small)."""
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=(1, 12, 12))
    logit_cost = 3 * walk_width([op for lf, _ in reversed(pair.layer_pairs()) for op in reversed(lf.ops)])
    assert 0 < logit_cost <= 2000
    boxes = [random_box(rng, (1, 12, 12)) for _ in range(3)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    amax = lambda b: torch.maximum(b.lower.abs(), b.upper.abs()).flatten(1).max(1).values  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dl, "FULL_COST", full_cost)
        m.setattr(dl, "TOP_ROWS", 1)
        m.setattr(dl, "FAST_HIDDEN", False)
        m.setattr(fo, "FAST_FIRST", False)
        assert not dl._all_cheap(pair)
        top, top0 = diff_linear_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi, logits=[0])
        m.setattr(dl, "bound_top_rows", _every_row)
        every, every0 = diff_linear_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi, logits=[0])
    # a subset of the logits (certify's tolerance verdict over --logits): its maximum, as every row gives
    # (the full pass is decided on that maximum, so both sides take the subset)
    torch.testing.assert_close(top0.max_abs_logit_deviation([0]), every0.max_abs_logit_deviation([0]), rtol=1e-12, atol=0)
    for l in range(pair.n_layers):
        torch.testing.assert_close(amax(top.delta[l]), amax(every.delta[l]), rtol=1e-12, atol=0)
        torch.testing.assert_close(amax(top.local[l]), amax(every.local[l]), rtol=1e-12, atol=0)


def test_region_groups_walk_what_each_region_selects():
    rng = np.random.default_rng(3)
    batch, n = 7, 40
    lower = torch.as_tensor(rng.normal(size=(batch, n))) - 1
    upper = lower + 2
    counts = [40, 1, 30, 3, 0, 29, 12]
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for r, c in enumerate(counts):
        mask[r, torch.as_tensor(rng.permutation(n)[:c])] = True
    sel = Selection.of(mask, n)
    region = RegionBatch(torch.zeros(batch, 1, dtype=torch.float64), torch.ones(batch, 1, dtype=torch.float64))
    calls: list = []
    res = bound_rows(_table_walk(lower, upper, calls), sel, (n,), region, 1000)
    lo, up = sel.spread(res.lower, -torch.inf, batch), sel.spread(res.upper, torch.inf, batch)
    torch.testing.assert_close(lo[mask], lower[mask], rtol=1e-15, atol=0)   # concretise rounds an ulp outward
    torch.testing.assert_close(up[mask], upper[mask], rtol=1e-15, atol=0)
    assert (lo[~mask] == -torch.inf).all()
    assert sum(calls) == 2 * sum(counts)    # rows with a coefficient: each selected neuron's pair, once
    assert len(calls) == 5                  # groups {40, 30}, {29}, {12}, {3}, {1} (within 0.75 of the first)


@settings(max_examples=6, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune", "quantise"]),
       st.sampled_from([(1, 16, 16), (3, 12, 12)]), st.booleans())
def test_batched_conv_pairs_sound_on_the_fast_paths(seed, twin, in_shape, second_pass):
    """Three boxes at once through the wide-layer paths (widest-first rows from one neuron per region,
    float32 hidden transposes, region groups; `second_pass`: every region also gets the full pass):
    both methods contain sampled and ascended Delta; diff-linear is never looser than crown-diff."""
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=in_shape)
    boxes = [random_box(rng, in_shape) for _ in range(3)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dl, "FULL_COST", 0)
        m.setattr(dl, "TOP_ROWS", 1)
        if second_pass:
            m.setattr(dl, "DELTA_GAIN", -1.0)
        cd, b = crown_diff_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi)
    for r in range(3):
        e2e = sample_deltas(pair, lo[r], hi[r], 200, seed=r)
        local = sample_deltas(pair, lo[r], hi[r], 200, seed=r, local=True)
        ascended = extremes(pair, lo[r], hi[r], 60, layers=[-1], seed=seed)[-1]
        for name, res in (("crown-diff", cd.select(slice(r, r + 1))), ("diff-linear", b.select(slice(r, r + 1)))):
            for l in range(pair.n_layers):
                assert_contains(res.delta[l].lower, res.delta[l].upper, e2e[l], f"{name} end-to-end {l}, box {r}")
                assert_contains(res.local[l].lower, res.local[l].upper, local[l], f"{name} local {l}, box {r}")
            assert_contains(res.delta[-1].lower, res.delta[-1].upper, ascended, f"{name} ascended, box {r}")
    for l in range(pair.n_layers):
        assert (b.delta[l].lower >= cd.delta[l].lower).all() and (b.delta[l].upper <= cd.delta[l].upper).all()
