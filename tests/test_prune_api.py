"""`prune` end to end: targets, baselines, conv layers, metadata, determinism, bad input, fine-tuning."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pairs import random_conv_pair  # noqa: E402

from prunecert.errors import ConfigError, ModelFormatError, UnsupportedLayerError  # noqa: E402
from prunecert.io import load_model, save_model, weights_sha256  # noqa: E402
from prunecert.network import Linear, Network, ReLU, mlp  # noqa: E402
from prunecert.prune import complete, prune  # noqa: E402
from prunecert.prune.coreset import sensitivities  # noqa: E402
from prunecert.core.surgery import geometry  # noqa: E402


def _net(seed=0, sizes=(6, 20, 12, 4)) -> Network:
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=b) * 0.3 for b in sizes[1:]]
    return mlp(ws, bs, name="net")


def _kept(g):
    return [r["n_kept"] for r in g.metadata["pruning"]["layers"]]


# ----------------------------------------------------------------------------- targets
def test_keep_count_fraction_and_dict():
    f = _net()
    assert _kept(prune(f, keep=5, progress=False)) == [5, 5]
    assert _kept(prune(f, keep=0.25, progress=False)) == [5, 3]
    g = prune(f, keep={1: 4}, progress=False)
    assert _kept(g) == [4] and g.metadata["pruning"]["layers"][0]["index"] == 1
    assert g.ops[0].weight.shape == (20, 6) and g.ops[2].weight.shape == (4, 20)
    assert g.metadata["pruning"]["target"] == {"keep": {"1": 4}}


def test_keep_all_is_exact():
    f = _net()
    g = prune(f, keep=1.0, progress=False)
    x = torch.rand(50, 6, dtype=torch.float64)
    torch.testing.assert_close(g.forward(x), f.forward(x), rtol=0, atol=0)
    assert all(r["eps_max"] == 0.0 and r["m"] == 0 for r in g.metadata["pruning"]["layers"])


def test_compression_target():
    f = _net(sizes=(30, 40, 30, 5))
    g = prune(f, compression=0.8, progress=False)
    rec = g.metadata["pruning"]
    assert rec["compression"] >= 0.8 and rec["pruned_params"] == g.n_params()
    # one more neuron per layer would miss the target: the keep fraction is the largest that fits
    bigger = prune(f, keep={0: _kept(g)[0] + 1, 1: _kept(g)[1] + 1}, method="topk", progress=False)
    assert 1 - bigger.n_params() / f.n_params() < 0.8
    with pytest.raises(ConfigError, match="out of reach"):
        prune(f, compression=0.999, progress=False)


@pytest.mark.parametrize("method", ["coreset", "uniform"])
def test_epsilon_target_meets_the_budget_with_the_fewest_draws(method):
    from prunecert.prune import min_sample_size
    f = _net()
    g = prune(f, method, epsilon=20.0, progress=False)
    for r in g.metadata["pruning"]["layers"]:
        assert r["eps_max"] <= 20.0 and r["draw_rule"] == "fixed_m"
        assert r["n_kept"] == len(r["kept"]) <= r["n_total"]
    r0 = g.metadata["pruning"]["layers"][0]
    geom = geometry(f, 0)
    a = r0["beta_hat"] * np.linalg.norm(geom.points, axis=1)
    q = sensitivities(a, geom.coeffs) if method == "coreset" else np.ones(geom.n)
    q = q / q.sum()
    assert r0["m"] == pytest.approx(min_sample_size(20.0, 0.1, geom.coeffs, a, q), rel=1e-6)


def test_more_draws_for_a_smaller_epsilon():
    f = _net()
    m = [prune(f, epsilon=e, progress=False).metadata["pruning"]["layers"][0]["m"] for e in (40.0, 10.0)]
    assert m[1] > m[0]


# ----------------------------------------------------------------------------- methods
def test_coreset_reweights_the_next_layer_columns():
    f = _net(1)
    g = prune(f, keep={0: 8}, seed=3, progress=False)
    r = g.metadata["pruning"]["layers"][0]
    kept, counts, q = np.array(r["kept"]), np.array(r["counts"]), np.array(r["probabilities"])
    np.testing.assert_allclose(r["scale"], counts / (r["m"] * q), rtol=1e-14)
    assert counts.sum() == r["m"]
    np.testing.assert_allclose(g.ops[2].weight.numpy(), f.ops[2].weight.numpy()[:, kept] * np.array(r["scale"]), rtol=1e-14)
    np.testing.assert_array_equal(g.ops[0].weight.numpy(), f.ops[0].weight.numpy()[kept])
    # the recorded probabilities are the normalised sensitivities of this layer
    geom = geometry(f, 0)
    s = sensitivities(r["beta_hat"] * np.linalg.norm(geom.points, axis=1), geom.coeffs)
    np.testing.assert_allclose(q, (s / s.sum())[kept], rtol=1e-9)
    assert r["t"] == pytest.approx(s.sum(), rel=1e-9)


def test_uniform_uses_uniform_probabilities():
    f = _net(2)
    r = prune(f, "uniform", keep={0: 6}, seed=1, progress=False).metadata["pruning"]["layers"][0]
    np.testing.assert_allclose(r["probabilities"], 1 / 20)
    np.testing.assert_allclose(r["scale"], np.array(r["counts"]) * 20 / r["m"])
    assert r["t"] is None


def test_topk_keeps_the_largest_norms_unscaled():
    f = _net(3)
    g = prune(f, "topk", keep={0: 5}, progress=False)
    r = g.metadata["pruning"]["layers"][0]
    norms = np.linalg.norm(geometry(f, 0).points, axis=1)
    assert r["kept"] == sorted(np.argsort(-norms)[:5].tolist())
    np.testing.assert_array_equal(g.ops[2].weight.numpy(), f.ops[2].weight.numpy()[:, r["kept"]])
    assert r["eps"] is None and g.metadata["pruning"]["provable_bound_valid"] is False
    with pytest.raises(ConfigError, match="topk has no provable bound"):
        prune(f, "topk", epsilon=1.0, progress=False)


def test_magnitude_keeps_the_largest_outgoing_norms_unscaled():
    f = _net(3)
    # make a neuron with the largest incoming norm feed the next layer with almost nothing: top-k keeps
    # it, magnitude (outgoing norm) drops it
    big_in = int(np.argmax(np.linalg.norm(geometry(f, 0).points, axis=1)))
    f.ops[2].weight[:, big_in] *= 1e-3
    g = prune(f, "magnitude", keep={0: 5}, progress=False)
    r = g.metadata["pruning"]["layers"][0]
    out_norms = np.linalg.norm(f.ops[2].weight.numpy(), axis=0)
    assert r["kept"] == sorted(np.argsort(-out_norms)[:5].tolist()) and big_in not in r["kept"]
    assert big_in in prune(f, "topk", keep={0: 5}, progress=False).metadata["pruning"]["layers"][0]["kept"]
    np.testing.assert_array_equal(g.ops[2].weight.numpy(), f.ops[2].weight.numpy()[:, r["kept"]])
    assert r["eps"] is None and g.metadata["pruning"]["provable_bound_valid"] is False
    with pytest.raises(ConfigError, match="magnitude has no provable bound"):
        prune(f, "magnitude", epsilon=1.0, progress=False)


def test_coreset_approximates_better_than_uniform_on_average():
    """On a layer with one dominant neuron, sensitivity sampling keeps the function far better."""
    f = _net(4, sizes=(5, 40, 6, 3))
    f.ops[0].weight[3] *= 30.0
    x = torch.rand(500, 5, dtype=torch.float64)
    err = {m: np.mean([float((prune(f, m, keep={0: 6}, seed=s, progress=False).forward_layers(x)[1]
                             - f.forward_layers(x)[1]).abs().mean()) for s in range(20)])
           for m in ("coreset", "uniform")}
    assert err["coreset"] < err["uniform"]


# ----------------------------------------------------------------------------- conv
@pytest.mark.parametrize("method", ["coreset", "uniform", "topk", "magnitude"])
def test_conv_layers_prune_and_complete(method):
    f = random_conv_pair(np.random.default_rng(5), twin="same").f
    g = prune(f, method, keep={0: 2, 1: 1}, seed=2, progress=False)
    assert g.ops[1].weight.shape[0] == 2 and g.ops[4].weight.shape[:2] == (1, 2)
    assert g.ops[3].in_shape == (2, 6, 6) and g.ops[7].weight.shape == (3, 1)
    x = torch.rand(40, *f.input_shape, dtype=torch.float64)
    c = complete(g, f)
    torch.testing.assert_close(c.forward(x), g.forward(x), rtol=0, atol=1e-12)
    if method not in ("topk", "magnitude"):
        r = g.metadata["pruning"]["layers"][0]
        k = np.array(r["kept"])
        scale = torch.as_tensor(r["scale"])
        # conv next layer: input channel i of the next conv (rows: layer 1's kept channels) is re-scaled
        rows = g.metadata["pruning"]["layers"][1]["kept"]
        torch.testing.assert_close(g.ops[4].weight, f.ops[4].weight[rows][:, k] * scale[None, :, None, None])
        assert len(r["eps"]) == 2  # one bound per next-layer output channel


def test_conv_flatten_linear_columns_are_channel_blocks():
    f = random_conv_pair(np.random.default_rng(6), twin="same").f
    g = prune(f, keep={1: 1}, seed=0, progress=False)
    r = g.metadata["pruning"]["layers"][0]
    i, s = r["kept"][0], r["scale"][0]
    block = f.ops[7].weight.reshape(3, 2, -1)[:, i, :] * s  # channel i's H*W block of columns
    torch.testing.assert_close(g.ops[7].weight, block)


def test_unsupported_op_between_layers_is_refused():
    from prunecert.network import Scale
    w = np.ones((3, 2))
    ops = [Linear(w, np.zeros(3)), ReLU((3,)), Scale(np.ones(3), np.ones(3), (3,)), Linear(np.ones((2, 3)), np.zeros(2))]
    net = Network(ops, (2,), name="odd")
    with pytest.raises(UnsupportedLayerError, match="layer 1 applies scale"):
        prune(net, keep=2, progress=False)


# ----------------------------------------------------------------------------- metadata, determinism
def test_metadata_is_complete_and_json():
    f = _net()
    g = prune(f, keep=0.5, seed=7, delta=0.05, progress=False)
    rec = json.loads(json.dumps(g.metadata))["pruning"]
    assert rec["method"] == "coreset" and rec["seed"] == 7 and rec["delta"] == 0.05
    assert rec["original_weights_sha256"] == weights_sha256(f)
    assert rec["provable_bound_valid"] is True and rec["fine_tune"] is None
    for r, index in zip(rec["layers"], (0, 1)):
        assert r["index"] == index and r["name"] == f"layer{index}:linear"
        assert r["n_total"] == (20, 12)[index] and r["n_kept"] == len(r["kept"]) == len(r["counts"])
        assert len(r["probabilities"]) == r["n_kept"] and r["m"] == sum(r["counts"])
        assert r["draw_rule"] == "until_k_distinct" and r["t"] >= 1.0 and r["beta_hat"] > 1.0
        assert len(r["eps"]) == r["next_neurons"] and r["eps_max"] == max(r["eps"]) > 0
        assert r["delta"] == 0.05
    # layer 1's rows were re-weighted by layer 0's pruning: its bound covers both point sets
    assert rec["layers"][0]["union_point_sets"] == 1 and rec["layers"][1]["union_point_sets"] == 2


def test_same_seed_same_weights_other_seed_differs():
    f = _net()
    a, b = prune(f, keep=0.3, seed=11, progress=False), prune(f, keep=0.3, seed=11, progress=False)
    for oa, ob in zip(a.ops, b.ops):
        for key in oa.tensors():
            assert torch.equal(oa.tensors()[key], ob.tensors()[key])
    kept = {tuple(prune(f, keep=0.3, seed=s, progress=False).metadata["pruning"]["layers"][0]["kept"]) for s in range(6)}
    assert len(kept) > 1


def test_save_load_roundtrip_then_complete(tmp_path):
    f = _net()
    g = prune(f, keep=0.4, progress=False)
    save_model(g, tmp_path / "g.pt")
    g2 = load_model(tmp_path / "g.pt")
    assert g2.metadata["pruning"] == json.loads(json.dumps(g.metadata["pruning"]))
    x = torch.rand(30, 6, dtype=torch.float64)
    torch.testing.assert_close(complete(g2, f).forward(x), g.forward(x), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("keep, match", [
    (0, r"layer 0 .*at least 1"), (21, r"layer 0 .*larger than the layer's 20"), ({1: 13}, r"layer 1 .*12 neurons"),
    ({2: 1}, "not a hidden layer"), (1.5, r"fraction must lie in \(0, 1\]"), (True, "keep must be an int"),
    (-0.2, "fraction"), ({0: 0}, r"layer 0 .*at least 1"),
])
def test_bad_keep(keep, match):
    with pytest.raises(ConfigError, match=match):
        prune(_net(), keep=keep, progress=False)


def test_bad_options():
    f = _net()
    with pytest.raises(ConfigError, match="exactly one target"):
        prune(f, keep=3, compression=0.5, progress=False)
    with pytest.raises(ConfigError, match="exactly one target"):
        prune(f, progress=False)
    with pytest.raises(ConfigError, match="unknown pruning method 'magic'"):
        prune(f, "magic", keep=3, progress=False)
    with pytest.raises(ConfigError, match="delta"):
        prune(f, keep=3, delta=0.0, progress=False)
    with pytest.raises(ConfigError, match="epsilon"):
        prune(f, epsilon=-1.0, progress=False)
    with pytest.raises(ConfigError, match="compression"):
        prune(f, compression=1.0, progress=False)
    with pytest.raises(ConfigError, match="no hidden layer"):
        prune(mlp([np.ones((2, 3))], [np.zeros(2)]), keep=1, progress=False)
    with pytest.raises(ConfigError, match="training data"):
        prune(f, keep=3, fine_tune=1, progress=False)


def test_nan_weights_are_refused():
    f = _net()
    f.ops[2].weight[3, 4] = math.nan
    with pytest.raises(ModelFormatError, match=r"layer 1 op 2 \(linear\) weight has a non-finite value at index \[3, 4\]"):
        prune(f, keep=3, progress=False)


# ----------------------------------------------------------------------------- fine-tuning
def test_fine_tune_voids_the_provable_bound():
    from prunecert.data import load_dataset
    from prunecert.io.torch_io import network_from_module
    from prunecert.train import fit
    from prunecert.train import mlp as mlp_module
    ds = load_dataset("digits")
    torch.manual_seed(0)
    module = fit(mlp_module(64, (40, 20)), ds, epochs=3, seed=0, progress=False)
    f = network_from_module(module, ds.input_shape, name="digits-mlp")
    g = prune(f, keep=0.25, seed=0, fine_tune=2, data=ds, progress=False)
    rec = g.metadata["pruning"]
    assert rec["provable_bound_valid"] is False
    assert all(r["provable_bound_valid"] is False for r in rec["layers"])
    ft = rec["fine_tune"]
    assert ft["epochs"] == 2 and ft["distill"] is True and ft["dataset"] == "digits"
    assert ft["test_accuracy_after"] > ft["test_accuracy_before"]  # 10-5 neurons recover from sampling
    assert [op.weight.shape for op in g.ops if hasattr(op, "weight")] == [(10, 64), (5, 10), (10, 5)]
    x = torch.rand(10, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(complete(g, f).forward(x), g.forward(x), rtol=0, atol=1e-9)
    plain = prune(f, keep=0.25, seed=0, fine_tune=1, data=ds, distill=False, progress=False)
    assert plain.metadata["pruning"]["fine_tune"]["distill"] is False
