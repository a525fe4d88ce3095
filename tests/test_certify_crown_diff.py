"""CROWN on the difference network f - g (crown-diff), conv windows, and the row-selection paths of
diff-linear: sound against sampling, gradient ascent and the exact MILP; diff-linear never looser
than crown-diff, neuron by neuron; windowed (patch) back-substitution equals the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, extremes, pairs_and_boxes, random_box, random_conv_pair, random_pair, sample_deltas

import prunecert.certify.diff_linear as dl
from prunecert.certify import get_method
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.layout import dense_backward, unit_patches
from prunecert.network import Conv2d, Scale

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _not_looser(inner, outer, what: str) -> None:
    assert (inner.lower >= outer.lower).all(), f"{what}: lower bound looser"
    assert (inner.upper <= outer.upper).all(), f"{what}: upper bound looser"


def test_registered():
    assert get_method("crown-diff").bounds is crown_diff_bounds


@settings(max_examples=25, **SLOW)
@given(pairs_and_boxes())
def test_dense_pairs_sound_and_diff_linear_never_looser(case):
    pair, lo, hi = case
    cd, b = crown_diff_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi)
    e2e = sample_deltas(pair, lo, hi, 400)
    for l in range(pair.n_layers):
        assert_contains(cd.delta[l].lower, cd.delta[l].upper, e2e[l], f"crown-diff layer {l}")
        _not_looser(b.delta[l], cd.delta[l], f"diff-linear vs crown-diff, layer {l}")


@settings(max_examples=10, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune", "quantise"]),
       st.sampled_from([(1, 6, 6), (3, 8, 8), (1, 16, 16), (2, 12, 14)]), st.booleans())
def test_conv_pairs_sound_on_the_selected_row_paths(seed, twin, in_shape, frugal):
    """Conv pairs through windows, with every row or (`frugal`) only the rows the wide-layer path picks:
    both methods contain sampled and ascended Delta; diff-linear is never looser than crown-diff."""
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=in_shape)
    lo, hi = random_box(rng, in_shape)
    e2e, local = sample_deltas(pair, lo, hi, 300), sample_deltas(pair, lo, hi, 300, local=True)
    ascended = extremes(pair, lo, hi, 100, layers=[-1], seed=seed)[-1]
    with pytest.MonkeyPatch.context() as m:
        if frugal:
            m.setattr(dl, "FULL_COST", 0)
            m.setattr(dl, "TOP_ROWS", 2)
        cd, b = crown_diff_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi)
    for l in range(pair.n_layers):
        for name, r in (("crown-diff", cd), ("diff-linear", b)):
            assert_contains(r.delta[l].lower, r.delta[l].upper, e2e[l], f"{name} end-to-end {l}")
            assert_contains(r.local[l].lower, r.local[l].upper, local[l], f"{name} local {l}")
        _not_looser(b.delta[l], cd.delta[l], f"diff-linear vs crown-diff, layer {l}")
    for name, r in (("crown-diff", cd), ("diff-linear", b)):
        assert_contains(r.delta[-1].lower, r.delta[-1].upper, ascended, f"{name} ascended logits")


def test_frugal_rows_stay_tight_on_the_logits():
    """The wide-layer path drops Delta rows of neurons stable in both networks (their relaxation is
    exact): on a conv pair the logit bound stays within 10 % of the every-row bound."""
    rng = np.random.default_rng(5)
    pair = random_conv_pair(rng, twin="prune", in_shape=(2, 8, 8))
    lo, hi = random_box(rng, (2, 8, 8), 0.3, 0.4)
    with pytest.MonkeyPatch.context() as m:     # the wide-layer path on this small network
        m.setattr(dl, "FULL_COST", 0)
        m.setattr(dl, "TOP_ROWS", 2)
        frugal = diff_linear_bounds(pair, lo, hi).delta[-1]
    full = diff_linear_bounds(pair, lo, hi).delta[-1]
    assert float(frugal.width.sum()) <= 1.1 * float(full.width.sum()) + 1e-12


def test_against_milp():
    """The exact MILP maximum never exceeds crown-diff's bound, and diff-linear is at most crown-diff."""
    milp = pytest.importorskip("prunecert.certify.milp", reason="prunecert.certify.milp not available")
    rng = np.random.default_rng(33)
    for twin in ("prune", "quantise", "perturb", "prune"):
        pair = random_pair(rng, 3, (6, 5), 2, twin=twin)
        lo, hi = random_box(rng, 3)
        exact = milp.milp_bounds(pair, lo, hi, local=False).delta[-1]
        cd = crown_diff_bounds(pair, lo, hi).delta[-1]
        gap = 1e-6 * (1 + exact.upper.abs() + exact.lower.abs())
        assert (cd.upper >= exact.upper - gap).all() and (cd.lower <= exact.lower + gap).all()
        _not_looser(diff_linear_bounds(pair, lo, hi).delta[-1], cd, "diff-linear vs crown-diff")


@pytest.mark.parametrize("in_shape", [(1, 6, 6), (1, 16, 16), (3, 12, 14), (2, 17, 15)])
def test_windows_equal_dense_rows(in_shape):
    """A conv stack walked as windows gives the dense walk's coefficients (up to rounding)."""
    rng = np.random.default_rng(1)
    pair = random_conv_pair(rng, in_shape=in_shape)
    ops = [op for op in pair.f.ops if op.kind in ("conv2d", "avgpool2d", "scale")][::-1]   # conv2, pool, conv1, scale
    shape = ops[0].out_shape
    n = int(np.prod(shape))
    neuron = torch.arange(n).reshape(1, n)
    lam, lay = unit_patches(neuron, torch.ones(1, n), shape)
    dense = torch.eye(n, dtype=torch.float64).reshape(1, n, *shape)
    windows = 0
    for op in ops:
        windows += not lay.dense
        lam, lay = lay.backward(op, lam)
        dense = dense_backward(op, dense)
    assert windows >= (3 if in_shape[1] >= 12 else 1)
    got = lam if lay.dense else lay.to_dense(lam)
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hw", [(32, 32), (31, 29), (17, 20)])
def test_windows_equal_dense_rows_through_strided_padded_convs(hw):
    """Stride-2, padding-1 convs (CIFAR-style stems) on odd sizes: windows give the dense coefficients."""
    rng = np.random.default_rng(2)
    h, w = hw
    norm = Scale(rng.uniform(0.5, 2, (3, 1, 1)), rng.normal(size=(3, 1, 1)), (3, h, w))
    c1 = Conv2d(rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4), (3, h, w), stride=2, padding=1)
    c2 = Conv2d(rng.normal(size=(5, 4, 3, 3)), rng.normal(size=5), c1.out_shape, stride=2, padding=1)
    for ops in ([c2, c1, norm], [c1, norm]):
        shape = ops[0].out_shape
        n = int(np.prod(shape))
        lam, lay = unit_patches(torch.arange(n).reshape(1, n), torch.ones(1, n), shape)
        dense = torch.eye(n, dtype=torch.float64).reshape(1, n, *shape)
        for op in ops:
            lam, lay = lay.backward(op, lam)
            dense = dense_backward(op, dense)
        got = lam if lay.dense else lay.to_dense(lam)
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-14)
