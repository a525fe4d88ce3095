"""beta_hat soundness, the provable epsilon formula, min_sample_size, and the Monte-Carlo check.

The Monte-Carlo test re-runs the tool's own procedure (`prune(..., keep=...)`: sensitivity sampling
until k distinct neurons, the recorded eps) many times and checks that the recorded bound holds at the
worst deviation found (random directions plus projected gradient ascent on the sphere) in at least
(1 - delta) of the repetitions. It also measures how loose the bound is.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pairs import random_conv_pair  # noqa: E402

from prunecert.errors import ConfigError  # noqa: E402
from prunecert.network import mlp  # noqa: E402
from prunecert.prune import beta_hat, complete, min_sample_size, prune, provable_epsilon  # noqa: E402
from prunecert.core.surgery import layer_spans  # noqa: E402


def _mlp(rng, sizes, lo=0.0, hi=1.0):
    ws = [rng.normal(size=(b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=b) * 0.3 for b in sizes[1:]]
    return mlp(ws, bs, lo=lo, hi=hi)


# ----------------------------------------------------------------------------- beta_hat
def test_beta_hat_first_layer_is_the_domain_corner():
    net = _mlp(np.random.default_rng(0), [5, 4, 3], lo=-2.0, hi=1.0)
    b = beta_hat(net, 0)
    exact = math.sqrt(5 * 4.0 + 1.0)  # the farthest corner of [-2, 1]^5, plus the constant 1
    assert exact <= b <= exact * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_beta_hat_bounds_every_sampled_hidden_input(seed):
    rng = np.random.default_rng(seed)
    net = _mlp(rng, [4, 9, 7, 3])
    x = torch.rand(4000, 4, dtype=torch.float64)
    x[:500] = torch.round(x[:500])  # corners too
    pre = net.forward_layers(x)
    for index in (1, 2):
        h = torch.relu(pre[index - 1])
        norms = torch.sqrt((h ** 2).sum(1) + 1.0)
        assert float(norms.max()) <= beta_hat(net, index)


def test_beta_hat_bounds_every_conv_patch():
    f = random_conv_pair(np.random.default_rng(1), twin="same").f
    x = torch.rand(500, *f.input_shape, dtype=torch.float64)
    spans = layer_spans(f)
    for index in (0, 1):
        h = x
        for op in f.ops[: spans[index].stop - 1]:  # everything before the layer's conv
            h = op.forward(h)
        conv = f.ops[spans[index].stop - 1]
        kh, kw = conv.weight.shape[2:]
        patches = torch.nn.functional.unfold(h, (kh, kw), padding=conv.padding, stride=conv.stride)
        norms = torch.sqrt((patches ** 2).sum(1) + 1.0)
        assert float(norms.max()) <= beta_hat(f, index)


# ----------------------------------------------------------------------------- provable epsilon
def test_provable_epsilon_formula_by_hand():
    coeffs = np.array([[[1.0], [-2.0]]])  # K = 1, n = 2, R = 1
    a = np.array([1.0, 1.0])
    q = np.array([0.5, 0.5])
    m, delta = 16, 0.1
    # V = 1/0.5 + 4/0.5 = 10; range c = max P/q + max N/q = 2 + 4 = 6; log term ln(1/0.1)
    want = (4 * math.sqrt(10) + 6 * math.sqrt(math.log(10) / 2)) / 4
    got = provable_epsilon(m, delta, coeffs, a, q)[0]
    assert want <= got <= want * (1 + 1e-6)
    # union over 2 point sets and a stopping time cost only log terms
    seq = provable_epsilon(m, delta, coeffs, a, q, union=2, sequential=True)[0]
    want_seq = (4 * math.sqrt(10) + 6 * math.sqrt(math.log(2 * math.pi ** 2 * m * m / (6 * delta)) / 2)) / 4
    assert want_seq <= seq <= want_seq * (1 + 1e-6)
    assert provable_epsilon(0, delta, coeffs, a, q)[0] == 0.0


def test_provable_epsilon_shrinks_like_one_over_sqrt_m():
    rng = np.random.default_rng(0)
    coeffs, a = rng.normal(size=(3, 10, 2)), rng.uniform(0.5, 2, size=10)
    q = rng.dirichlet(np.ones(10))
    e1, e4 = provable_epsilon(100, 0.1, coeffs, a, q), provable_epsilon(400, 0.1, coeffs, a, q)
    np.testing.assert_allclose(e4, e1 / 2, rtol=1e-6)


def test_min_sample_size_is_the_smallest():
    rng = np.random.default_rng(1)
    coeffs, a = rng.normal(size=(4, 12, 1)), rng.uniform(0.1, 3, size=12)
    q = rng.dirichlet(np.ones(12))
    for eps in (0.5, 2.0, 10.0, 1e3):
        m = min_sample_size(eps, 0.05, coeffs, a, q)
        assert provable_epsilon(m, 0.05, coeffs, a, q).max() <= eps
        if m > 1:
            assert provable_epsilon(m - 1, 0.05, coeffs, a, q).max() > eps
    with pytest.raises(ConfigError, match="epsilon"):
        min_sample_size(-1.0, 0.1, coeffs, a, q)
    with pytest.raises(ConfigError, match="delta"):
        min_sample_size(1.0, 1.5, coeffs, a, q)


def test_coreset_needs_fewer_samples_than_uniform_on_skewed_layers():
    """Sensitivity sampling is what makes the bound small: one heavy neuron among many light ones."""
    net = _mlp(np.random.default_rng(2), [4, 30, 5])
    net.ops[0].weight[0] *= 50.0  # neuron 0 dominates every next-layer neuron
    c = prune(net, "coreset", epsilon=5.0, progress=False).metadata["pruning"]["layers"][0]
    u = prune(net, "uniform", epsilon=5.0, progress=False).metadata["pruning"]["layers"][0]
    assert c["eps_max"] <= 5.0 and u["eps_max"] <= 5.0
    assert c["m"] < u["m"]


# ----------------------------------------------------------------------------- Monte Carlo
def _signed_sups(points: np.ndarray, c: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    """(J, 2): sup and -inf over ||z|| <= beta of h_j(z) = sum_i c[j, i] relu(p_i . z), searched
    (lower bounds on the true values; both >= 0 since h_j(0) = 0).

    h_j is positively homogeneous in z, so its sup is beta times the sup on the unit sphere:
    1000 random directions, then projected gradient ascent (batched) from the 8 best per sign.
    """
    d = points.shape[1]
    z0 = rng.normal(size=(1000, d))
    z0 /= np.linalg.norm(z0, axis=1, keepdims=True)
    out = np.zeros((c.shape[0], 2))
    for j in range(c.shape[0]):
        vals = np.maximum(z0 @ points.T, 0) @ c[j]
        for s, sign in enumerate((1.0, -1.0)):
            z = z0[np.argsort(-sign * vals)[:8]].copy()
            val = sign * (np.maximum(z @ points.T, 0) @ c[j])
            for step in 2.0 * 0.8 ** np.arange(50):  # ascent with accept-if-better steps
                act = (z @ points.T > 0).astype(float)
                grad = sign * (act * c[j]) @ points
                z_new = z + step * grad / (np.linalg.norm(grad, axis=1, keepdims=True) + 1e-300)
                z_new /= np.linalg.norm(z_new, axis=1, keepdims=True)
                val_new = sign * (np.maximum(z_new @ points.T, 0) @ c[j])
                better = val_new > val
                z[better], val[better] = z_new[better], val_new[better]
            out[j, s] = max(float((sign * vals).max()), float(val.max()), 0.0) * beta
    return out


def _worst_deviation(points: np.ndarray, c: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    """max_j sup_{||z|| <= beta} |sum_i c[j, i] relu(p_i . z)|, searched (a lower bound on the true sup)."""
    return _signed_sups(points, c, beta, rng).max(axis=1)


@pytest.mark.parametrize("method", ["coreset", "uniform"])
def test_provable_bound_holds_in_monte_carlo(method):
    rng = np.random.default_rng(0)
    f = _mlp(rng, [3, 12, 4])
    points = np.concatenate([f.ops[0].weight.numpy(), f.ops[0].bias.numpy()[:, None]], axis=1)
    delta, reps = 0.1, 200
    held, ratios = 0, []
    for seed in range(reps):
        g = prune(f, method, keep={0: 5}, delta=delta, seed=seed, progress=False)
        rec = g.metadata["pruning"]["layers"][0]
        c = f.ops[2].weight.numpy() - complete(g, f).ops[2].weight.numpy()  # w_j(i) - u_j(i)
        worst = _worst_deviation(points, c, rec["beta_hat"], rng)
        eps = np.asarray(rec["eps"])
        held += bool(np.all(worst <= eps))
        ratios.append(float(np.min(eps / np.maximum(worst, 1e-300))))
    assert held >= (1 - delta) * reps
    # the search finds real deviations (the check has teeth): the bound is loose but not astronomically
    ratios = np.array(ratios)
    print(f"{method}: bound / worst found: median {np.median(ratios):.1f}x, min {ratios.min():.1f}x")
    assert 1.0 < np.median(ratios) < 100.0


def test_worst_deviation_search_finds_the_known_maximum():
    """Sanity of the Monte-Carlo search on a case with a closed form: one neuron, sup = beta |c| ||p||."""
    p = np.array([[1.0, 2.0, -2.0, 0.0]])
    c = np.array([[-1.5]])
    got = _worst_deviation(p, c, 2.0, np.random.default_rng(0))
    assert got[0] == pytest.approx(2.0 * 1.5 * 3.0, rel=1e-6)


def test_provable_bound_of_the_second_pruned_layer_holds_in_monte_carlo():
    """Layer 2 is pruned on g as built so far (its rows carry layer 1's re-scaled columns): its
    recorded eps must bound the deviation for f's rows and for g's rows alike (the union bound over
    the two point sets), in at least 1 - delta of the repetitions."""
    rng = np.random.default_rng(1)
    f = _mlp(rng, [3, 12, 10, 4])
    w2, b2 = f.ops[2].weight.numpy(), f.ops[2].bias.numpy()
    delta, reps = 0.1, 100
    held, ratios = 0, []
    for seed in range(reps):
        g = prune(f, "coreset", keep={0: 6, 1: 4}, delta=delta, seed=seed, progress=False)
        first, second = g.metadata["pruning"]["layers"]
        assert second["union_point_sets"] == 2
        kept0, scale0 = np.asarray(first["kept"]), np.asarray(first["scale"])
        points_f = np.concatenate([w2, b2[:, None]], axis=1)                   # f's layer-2 rows
        points_g = np.concatenate([w2[:, kept0] * scale0, b2[:, None]], axis=1)  # g's rows before layer 2's cut
        kept1 = np.asarray(second["kept"])
        np.testing.assert_allclose(g.ops[2].weight.numpy(), points_g[kept1, :-1], rtol=1e-15)  # same rows as g's
        c = f.ops[4].weight.numpy() - complete(g, f).ops[4].weight.numpy()     # w_j(i) - u_j(i)
        eps = np.asarray(second["eps"])
        worst = np.maximum(_worst_deviation(points_f, c, second["beta_hat"], rng),
                           _worst_deviation(points_g, c, second["beta_hat"], rng))
        held += bool(np.all(worst <= eps))
        ratios.append(float(np.min(eps / np.maximum(worst, 1e-300))))
    assert held >= (1 - delta) * reps
    print(f"second layer: bound / worst found: median {np.median(ratios):.1f}x, min {min(ratios):.1f}x")
    assert 1.0 < np.median(ratios) < 100.0   # the search finds real deviations: the check has teeth


def _conv_net(rng, channels: int = 12):
    """Conv(1->channels, 3x3, pad 1) -> ReLU -> Conv(channels->4, 3x3) -> ReLU -> Flatten -> Linear(->3)."""
    from prunecert.network import Conv2d, Flatten, Linear, Network, ReLU
    c1 = Conv2d(rng.normal(size=(channels, 1, 3, 3)) / 3, rng.normal(size=channels) * 0.3, (1, 6, 6), padding=1)
    c2 = Conv2d(rng.normal(size=(4, channels, 3, 3)) / np.sqrt(9 * channels), rng.normal(size=4) * 0.3,
                c1.out_shape)
    flat = Flatten(c2.out_shape)
    fc = Linear(rng.normal(size=(3, flat.out_shape[0])) / 4, rng.normal(size=3) * 0.3)
    return Network([c1, ReLU(c1.out_shape), c2, ReLU(c2.out_shape), flat, fc], (1, 6, 6), 0.0, 1.0, name="conv")


def test_provable_bound_of_a_conv_layer_holds_in_monte_carlo():
    """A pruned conv layer read by a conv layer: G_j sums over the kh*kw places r where channel j
    reads neuron i, each with its own patch z_r in the ball, so sup |G_j - G'_j| is the larger of
    sum_r sup_r and sum_r (-inf_r) (the patches are independent). The recorded eps must bound it in
    at least 1 - delta of the repetitions."""
    from prunecert.core.surgery import geometry
    rng = np.random.default_rng(2)
    f = _conv_net(rng)
    geo_f = geometry(f, 0)
    delta, reps = 0.1, 40
    held, ratios = 0, []
    for seed in range(reps):
        g = prune(f, "coreset", keep={0: 5}, delta=delta, seed=seed, progress=False)
        rec = g.metadata["pruning"]["layers"][0]
        c = geo_f.coeffs - geometry(complete(g, f), 0).coeffs          # (K, n, R): w_j(i, r) - u_j(i, r)
        sups = np.stack([_signed_sups(geo_f.points, c[:, :, r], rec["beta_hat"], rng) for r in range(c.shape[2])])
        worst = sups.sum(axis=0).max(axis=1)                            # (K,)
        eps = np.asarray(rec["eps"])
        held += bool(np.all(worst <= eps))
        ratios.append(float(np.min(eps / np.maximum(worst, 1e-300))))
    assert held >= (1 - delta) * reps
    print(f"conv layer: bound / worst found: median {np.median(ratios):.1f}x, min {min(ratios):.1f}x")
    assert 1.0 < np.median(ratios) < 100.0   # the search finds real deviations: the check has teeth
