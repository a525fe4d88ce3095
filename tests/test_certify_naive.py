"""Naive bounds (separate interval bounds, subtracted): soundness, batching, agreement margins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from pairs import (assert_contains, extremes, pairs_and_boxes, random_box, random_conv_pair, random_pair,
                   sample_deltas, sample_points)

from prunecert.core.interval import interval_bounds
from prunecert.certify.naive import naive_bounds
from prunecert.errors import RegionError


def _check_sound(pair, lo, hi, bounds, n=600, seed=0):
    e2e = sample_deltas(pair, lo, hi, n, seed)
    local = sample_deltas(pair, lo, hi, n, seed, local=True)
    x = sample_points(lo, hi, n, seed)
    af, ag = pair.forward_layers(x)
    for l in range(pair.n_layers):
        assert_contains(bounds.delta[l].lower, bounds.delta[l].upper, e2e[l], f"end-to-end layer {l}")
        assert_contains(bounds.local[l].lower, bounds.local[l].upper, local[l], f"local layer {l}")
        assert_contains(bounds.f[l].lower, bounds.f[l].upper, (af[l].min(0).values, af[l].max(0).values), f"f {l}")
        assert_contains(bounds.g[l].lower, bounds.g[l].upper, (ag[l].min(0).values, ag[l].max(0).values), f"g {l}")


@settings(max_examples=40, deadline=None)
@given(pairs_and_boxes())
def test_naive_bounds_contain_every_sampled_deviation(case):
    pair, lo, hi = case
    _check_sound(pair, lo, hi, naive_bounds(pair, lo, hi))


@pytest.mark.parametrize("seed", range(3))
def test_naive_bounds_contain_gradient_ascent_extremes(seed):
    rng = np.random.default_rng(100 + seed)
    pair = random_pair(rng, 3, (10, 8, 6), 3, twin=("prune", "quantise", "perturb")[seed])
    lo, hi = random_box(rng, 3)
    b = naive_bounds(pair, lo, hi)
    for l, ext in enumerate(extremes(pair, lo, hi, seed=seed)):
        assert_contains(b.delta[l].lower, b.delta[l].upper, ext, f"layer {l}")


def test_naive_bounds_on_a_conv_pair():
    rng = np.random.default_rng(5)
    pair = random_conv_pair(rng, twin="perturb")
    lo, hi = random_box(rng, (1, 6, 6))
    b = naive_bounds(pair, lo, hi)
    assert [tuple(d.lower.shape) for d in b.delta] == [(1, 3, 6, 6), (1, 2, 1, 1), (1, 3)]
    _check_sound(pair, lo, hi, b, n=400)
    ext = extremes(pair, lo, hi, n=400, layers=[-1])
    assert_contains(b.delta[-1].lower, b.delta[-1].upper, ext[-1], "conv logits")


def test_naive_is_the_subtraction_of_the_interval_bounds():
    rng = np.random.default_rng(1)
    pair = random_pair(rng, 4, (6, 6), 3, twin="perturb")
    lo, hi = random_box(rng, 4)
    b = naive_bounds(pair, lo, hi)
    bf, bg = interval_bounds(pair.f, lo, hi), interval_bounds(pair.g, lo, hi)
    for l in range(pair.n_layers):
        assert torch.equal(b.f[l].lower, bf[l].lower) and torch.equal(b.g[l].upper, bg[l].upper)
        assert (b.delta[l].lower <= bf[l].lower - bg[l].upper).all()
        assert (b.delta[l].upper >= bf[l].upper - bg[l].lower).all()
        # one ulp outward, no more
        assert (b.delta[l].upper <= torch.nextafter(bf[l].upper - bg[l].lower, torch.tensor(np.inf))).all()
    torch.testing.assert_close(b.local[0].lower, b.delta[0].lower, rtol=0, atol=0)


def test_batched_boxes_give_the_same_bounds_as_one_at_a_time():
    rng = np.random.default_rng(2)
    pair = random_pair(rng, 3, (7, 5), 4, twin="quantise")
    boxes = [random_box(rng, 3) for _ in range(5)]
    lo = np.stack([b[0] for b in boxes])
    hi = np.stack([b[1] for b in boxes])
    batched = naive_bounds(pair, lo, hi)
    assert batched.batch == 5
    for i, (l, h) in enumerate(boxes):
        single = naive_bounds(pair, l, h)
        for layer in range(pair.n_layers):
            torch.testing.assert_close(batched.delta[layer].lower[i], single.delta[layer].lower[0])
            torch.testing.assert_close(batched.local[layer].upper[i], single.local[layer].upper[0])
        torch.testing.assert_close(batched.margin_lower[i], single.margin_lower[0])


@settings(max_examples=30, deadline=None)
@given(pairs_and_boxes())
def test_agreement_margins_are_sound(case):
    pair, lo, hi = case
    b = naive_bounds(pair, lo, hi)
    x = sample_points(lo, hi, 400)
    for net in (pair.f, pair.g):
        y = net.forward(x)
        gaps = y.unsqueeze(2) - y.unsqueeze(1)  # [n, c, j] = y_c - y_j
        assert (b.margin_lower[0] <= gaps.min(0).values + 1e-9).all()
    proved, cls = b.proved_agreement()
    if proved[0]:
        assert (pair.f.forward(x).argmax(1) == cls[0]).all() and (pair.g.forward(x).argmax(1) == cls[0]).all()


def test_margins_prove_agreement_on_a_small_box_where_the_top_class_is_clear():
    rng = np.random.default_rng(4)
    pair = random_pair(rng, 3, (6, 6), 3, twin="quantise")
    x = torch.rand(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    yf, yg = pair.f.forward(x), pair.g.forward(x)
    top = yf.topk(2, dim=1).values
    same = yf.argmax(1) == yg.argmax(1)
    i = int(torch.where(same, top[:, 0] - top[:, 1], torch.zeros(200, dtype=torch.float64)).argmax())
    c = x[i].numpy()
    proved, cls = naive_bounds(pair, c, c).proved_agreement()  # a single point: margins are exact up to rounding
    assert bool(proved[0]) and int(cls[0]) == int(yf[i].argmax())


def test_naive_rejects_boxes_of_the_wrong_shape():
    pair = random_pair(np.random.default_rng(0), 3, (4, 4), 2)
    with pytest.raises(RegionError, match=r"do not match \(B, 3\)"):
        naive_bounds(pair, np.zeros(4), np.ones(4))


def test_pair_bounds_intersect_select_and_concat():
    from prunecert.certify.diff_interval import diff_interval_bounds
    from prunecert.certify.result import PairBounds
    rng = np.random.default_rng(8)
    pair = random_pair(rng, 3, (6, 5), 3, twin="perturb")
    boxes = [random_box(rng, 3) for _ in range(4)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    nb, db = naive_bounds(pair, lo, hi), diff_interval_bounds(pair, lo, hi)
    both = nb.intersect(db)  # diff-interval lies inside naive, so the intersection is diff-interval
    for l in range(pair.n_layers):
        assert torch.equal(both.delta[l].lower, db.delta[l].lower) and torch.equal(both.local[l].upper, db.local[l].upper)
    assert torch.equal(both.margin_lower, torch.maximum(nb.margin_lower, db.margin_lower))
    joined = PairBounds.concat([db.select(slice(0, 1)), db.select(slice(1, 4))])
    assert joined.batch == 4
    for l in range(pair.n_layers):
        assert torch.equal(joined.delta[l].upper, db.delta[l].upper) and torch.equal(joined.f[l].lower, db.f[l].lower)
    mag = torch.maximum(db.delta[-1].upper, -db.delta[-1].lower).max(dim=1).values
    assert torch.equal(db.max_abs_logit_deviation(), mag)
    idx = torch.tensor([1, 3])      # intersecting with bounds of some regions only
    part = nb.intersect(db.select(idx), idx)
    for r in range(4):
        want = db if r in (1, 3) else nb
        for got, ref in ((part.delta, want.delta), (part.local, want.local), (part.f, want.f), (part.g, want.g)):
            for l in range(pair.n_layers):
                assert torch.equal(got[l].lower[r], ref[l].lower[r]) and torch.equal(got[l].upper[r], ref[l].upper[r])
        assert torch.equal(part.margin_lower[r], both.margin_lower[r] if r in (1, 3) else nb.margin_lower[r])
