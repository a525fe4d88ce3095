"""Algorithms 1 and 2 on hand-checkable cases, sampling procedures, unbiasedness by averaging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunecert.errors import ConfigError
from prunecert.prune.coreset import (coreset_layer, coreset_neuron, draw, layer_probabilities, layer_sensitivities,
                                     neuron_probabilities, reweight, sample_fixed, sample_until)


def relu(x):
    return np.maximum(x, 0.0)


# ----------------------------------------------------------------------------- Algorithm 1
def test_algorithm1_probabilities_by_hand():
    points = np.array([[3.0, 4.0], [1.0, 0.0]])  # norms 5 and 1
    w = np.array([1.0, -2.0])
    # s(p) = |w(p)| * beta ||p|| = (1*2*5, 2*2*1) = (10, 4)
    np.testing.assert_allclose(neuron_probabilities(points, w, beta=2.0), [10 / 14, 4 / 14], rtol=1e-15)


def test_algorithm1_reweighting_by_hand():
    points = np.array([[3.0, 4.0], [1.0, 0.0]])
    w = np.array([1.0, -2.0])
    q = np.array([10 / 14, 4 / 14])
    # draws (p1, p2, p2) with m = 3: u(p1) = 1 * 1/(3 q1), u(p2) = -2 * 2/(3 q2); the sign is kept
    u = reweight(w, np.array([1, 2]), q, 3)
    np.testing.assert_allclose(u, [14 / 30, -2 * 2 * 14 / 12], rtol=1e-14)
    idx, u1 = coreset_neuron(points, w, 50, 2.0, np.random.default_rng(0))
    assert set(idx) <= {0, 1} and np.all(u1[np.setdiff1d([0, 1], idx)] == 0)
    assert np.all(np.sign(u1[idx]) == np.sign(w[idx]))


def test_algorithm1_zero_weights_refused():
    with pytest.raises(ConfigError, match="zero"):
        neuron_probabilities(np.ones((2, 2)), np.zeros(2), 1.0)


def test_algorithm1_is_unbiased():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(6, 3))
    w = rng.normal(size=6)
    z = rng.normal(size=3)
    g = float(w @ relu(points @ z))
    q = neuron_probabilities(points, w, 1.5)
    m, reps = 3, 20000
    est = np.array([coreset_neuron(points, w, m, 1.5, rng)[1] @ relu(points @ z) for _ in range(reps)])
    x = w * relu(points @ z) / q  # one draw's term
    var = (q @ x ** 2 - g ** 2) / m
    assert abs(est.mean() - g) <= 5 * np.sqrt(var / reps)
    assert abs(est.var() - var) <= 0.1 * var  # the variance is the one sampling theory predicts


# ----------------------------------------------------------------------------- Algorithm 2
def test_algorithm2_normalised_sensitivities_by_hand():
    points = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])  # beta ||p|| = (1, 2, 1)
    coeffs = np.array([[1.0, 1.0, 0.0], [0.0, -1.0, 3.0]])[:, :, None]
    # S_1 = 1 + 2 = 3, S_2 = 2 + 3 = 5; s = (max(1/3, 0), max(2/3, 2/5), max(0, 3/5))
    s = layer_sensitivities(points, coeffs, 1.0)
    np.testing.assert_allclose(s, [1 / 3, 2 / 3, 3 / 5], rtol=1e-15)
    q, t = layer_probabilities(points, coeffs, 1.0)
    assert t == pytest.approx(1.6, rel=1e-15)
    np.testing.assert_allclose(q, np.array([1 / 3, 2 / 3, 3 / 5]) / 1.6, rtol=1e-15)


def test_algorithm2_aggregates_offsets_and_skips_dead_neurons():
    points = np.array([[1.0], [2.0]])
    coeffs = np.zeros((2, 2, 3))
    coeffs[0, 0] = [1.0, -1.0, 2.0]  # aggregated |w| = 4
    coeffs[0, 1] = [0.5, 0.0, 0.0]   # 0.5
    # next neuron 1 sees nothing: skipped, not a division by zero
    np.testing.assert_allclose(layer_sensitivities(points, coeffs, 1.0), [4 / 5, 1 / 5])


def test_algorithm2_shared_sample_own_weights():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(8, 3))
    coeffs = rng.normal(size=(4, 8, 1))
    kept, u = coreset_layer(points, coeffs, 6, 1.0, rng)
    assert 1 <= len(kept) <= 6
    dropped = np.setdiff1d(np.arange(8), kept)
    assert np.all(u[:, dropped] == 0)  # every next neuron drops the same points
    ratio = u[:, kept, 0] / coeffs[:, kept, 0]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[0], ratio.shape))  # one factor per kept point


def test_algorithm2_is_unbiased_for_every_next_neuron():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(7, 3))
    coeffs = rng.normal(size=(3, 7, 1))
    z = rng.normal(size=3)
    h = relu(points @ z)
    g = coeffs[:, :, 0] @ h
    q, _ = layer_probabilities(points, coeffs, 2.0)
    m, reps = 4, 20000
    est = np.array([coreset_layer(points, coeffs, m, 2.0, rng)[1][:, :, 0] @ h for _ in range(reps)])
    x = coeffs[:, :, 0] * h[None] / q[None]
    var = ((x ** 2) @ q - g ** 2) / m
    assert np.all(np.abs(est.mean(0) - g) <= 5 * np.sqrt(var / reps))


# ----------------------------------------------------------------------------- sampling procedures
def test_draw_never_picks_zero_probability_and_matches_q():
    q = np.array([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])
    idx = draw(q, 40000, np.random.default_rng(4))
    counts = np.bincount(idx, minlength=6) / 40000
    assert counts[[0, 2, 5]].sum() == 0
    np.testing.assert_allclose(counts, q, atol=0.015)


def test_sample_until_stops_at_exactly_k_distinct():
    q = np.array([0.6, 0.3, 0.05, 0.03, 0.02])
    for seed in range(20):
        s = sample_until(q, 3, np.random.default_rng(seed))
        assert len(s.kept) == 3 and s.sequential
        assert s.counts.sum() == s.m
        assert np.all(np.diff(s.kept) > 0)


def test_sample_until_replays_the_same_stream_as_a_fixed_sample():
    """The stopping rule only decides *when* to stop: the draws are the same i.i.d. stream."""
    q = np.array([0.4, 0.3, 0.2, 0.1])
    s = sample_until(q, 4, np.random.default_rng(5))
    stream = draw(q, 1024, np.random.default_rng(5))  # first chunk of the same generator
    counts = np.bincount(stream[: s.m], minlength=4)
    np.testing.assert_array_equal(counts[s.kept], s.counts)
    assert len(np.unique(stream[: s.m - 1])) == 3  # the last draw was the 4th distinct one


def test_sample_until_stops_at_the_support_when_k_exceeds_it():
    q = np.array([0.5, 0.0, 0.5])
    s = sample_until(q, 3, np.random.default_rng(0))
    assert list(s.kept) == [0, 2]


def test_sample_until_gives_up_clearly():
    q = np.array([1 - 1e-15, 1e-15])
    with pytest.raises(ConfigError, match="distinct"):
        sample_until(q, 2, np.random.default_rng(0), max_draws=5000)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10 ** 6), st.integers(1, 40))
def test_sample_fixed_scales_are_the_reweighting(n, seed, m):
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(n))
    s = sample_fixed(q, m, rng)
    assert s.counts.sum() == m and len(s.kept) <= min(n, m)
    np.testing.assert_allclose(s.scale(q), s.counts / (m * q[s.kept]))
    # averaged over the draws, sum_i scale_i q_i... one draw's weight is 1/(m q): sum over kept of count/(m q) * q == 1
    assert float(np.sum(s.scale(q) * q[s.kept])) == pytest.approx(1.0)
