"""certify(): dispatch, batching, verdicts, agreement, JSON schema, errors, NNet pairs."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from pairs import random_conv_pair, random_pair

from prunecert.certify import METHODS, BoundMethod, certify, get_method
from prunecert.certify.naive import naive_bounds
from prunecert.core.pair import Pair
from prunecert.core.regions import Box, Domain, L2Ball
from prunecert.certify.result import load_schema
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Linear, Network

SPY: list[dict] = []


def spy_bounds(pair, region, time_limit=None):
    """A registered test method: records what certify() passed, returns naive bounds."""
    SPY.append(dict(lo=region.lo, hi=region.hi, l2=region.l2, time_limit=time_limit))
    return naive_bounds(pair, region)


def unsound_bounds(pair, region):
    """A broken method claiming Delta = 0 everywhere (certify() must catch it)."""
    b = naive_bounds(pair, region)
    for d in b.delta:
        d.lower.zero_(), d.upper.zero_()
    return b


@pytest.fixture
def pair():
    return random_pair(np.random.default_rng(0), 4, (8, 6), 3, twin="perturb")


def _boxes(pair, n, eps=0.05, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = pair.domain()
    return [Box.around(rng.uniform(0.1, 0.9, size=4), eps, lo, hi, source=f"point{i}") for i in range(n)]


@pytest.mark.parametrize("method", ["naive", "diff-interval"])
def test_batched_certify_matches_one_region_at_a_time(pair, method):
    regions = _boxes(pair, 5)
    whole = certify(pair, None, regions, method=method, progress=False, batch_size=2)
    assert whole.n_regions == 5 and len(whole.layers) == pair.n_layers
    for i, r in enumerate(regions):
        one = certify(pair, None, [r], method=method, progress=False)
        # equal up to BLAS summation order (which depends on the batch size), each side sound
        for a, b in zip(whole.layers, one.layers):
            np.testing.assert_allclose(a.end_to_end_upper[i], b.end_to_end_upper[0], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(a.local_lower[i], b.local_lower[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(whole.max_abs_logit_deviation[i], one.max_abs_logit_deviation[0], rtol=1e-12)


def test_result_is_sound_json_valid_and_reproducible(pair):
    regions = _boxes(pair, 3) + [Domain(*pair.domain())]
    a = certify(pair, None, regions, method="diff-interval", tolerance=0.3, progress=False, seed=4)
    doc = a.to_json()
    jsonschema.validate(doc, load_schema())
    json.dumps(doc, allow_nan=False)
    assert doc["schema"] == "prunecert.certify/1" and doc["method"] == "diff-interval"
    assert [r["region"]["kind"] for r in doc["regions"]] == ["linf_ball"] * 3 + ["domain"]
    assert np.array(doc["layers"][-1]["end_to_end"]["upper"]).shape == (4, 3)
    # sampled values never exceed the certified bound, and the bound is attained within a factor
    assert (a.sampled_max_abs_logit_deviation <= a.max_abs_logit_deviation).all()
    b = certify(pair, None, regions, method="diff-interval", tolerance=0.3, progress=False, seed=4)
    doc_b = b.to_json()
    doc.pop("seconds"), doc_b.pop("seconds")
    assert doc == doc_b


def test_verdicts_against_the_tolerance(pair):
    regions = _boxes(pair, 2, eps=0.1)
    r = certify(pair, None, regions, method="diff-interval", progress=False)
    bound, found = r.max_abs_logit_deviation, r.sampled_max_abs_logit_deviation
    assert r.verdicts == [None, None] and r.verdict is None
    assert certify(pair, None, regions, method="diff-interval", tolerance=float(bound.max()) * 1.01,
                   progress=False).verdict == "certified"
    low = float(found.min()) * 0.5
    violated = certify(pair, None, regions, method="diff-interval", tolerance=low, progress=False)
    assert violated.verdicts == ["violated", "violated"] and violated.verdict == "violated"
    for b, point in enumerate(violated.sampled_points):  # the counterexample really violates
        assert regions[b].contains(point)
        dev = (pair.f.forward(point[None]) - pair.g.forward(point[None])).abs().max()
        assert float(dev) > low
    assert "counterexample" in violated.to_json()["regions"][0]
    i = int(np.argmax(bound - found))
    assert bound[i] > found[i] * 1.05, "test needs a gap between the bound and the samples"
    middle = float(found[i] + bound[i]) / 2
    unknown = certify(pair, None, [regions[i]], method="diff-interval", tolerance=middle, progress=False)
    assert unknown.verdicts == ["unknown"] and unknown.verdict == "unknown"


def test_agreement_proved_on_identical_networks_and_refuted_when_classes_swap():
    f = random_pair(np.random.default_rng(1), 3, (6, 6), 3, twin="same").f
    lo, hi = f.domain()
    x = torch.rand(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = f.forward(x)
    top = y.topk(2, dim=1).values
    centre = x[int((top[:, 0] - top[:, 1]).argmax())].numpy()
    proved = certify(f, f, [Box.around(centre, 1e-3, lo, hi)], method="diff-interval", progress=False)
    assert proved.agreement[0].verdict == "proved"
    assert proved.agreement[0].label == int(f.forward(centre[None]).argmax())
    # g: the last layer's rows for classes 0 and 1 swapped, so g's top class differs wherever f's is 0 or 1
    last = f.ops[-1]
    perm = [1, 0, 2]
    g = Network(f.ops[:-1] + [Linear(last.weight[perm], last.bias[perm])], f.input_shape, 0.0, 1.0, name="swapped")
    refuted = certify(f, g, [Domain(lo, hi)], method="diff-interval", progress=False)
    a = refuted.agreement[0]
    assert a.verdict == "refuted"
    assert int(f.forward(a.point[None]).argmax()) == a.class_f != a.class_g == int(g.forward(a.point[None]).argmax())
    doc = refuted.to_json()
    assert doc["agreement"]["verdict"] == "refuted" and len(doc["agreement"]["point"]) == 3


def test_l2_regions_reach_the_methods_in_the_batch(pair, monkeypatch):
    monkeypatch.setitem(METHODS, "spy", BoundMethod("spy", spy_bounds, "records its calls"))
    SPY.clear()
    lo, hi = pair.domain()
    balls = [L2Ball(np.full(4, c), 0.1, lo, hi) for c in (0.3, 0.6)]
    r = certify(pair, None, balls, method="spy", time_limit=5.0, progress=False)
    centres, radii = SPY[-1]["l2"]
    torch.testing.assert_close(centres[1], torch.full((4,), 0.6, dtype=torch.float64))
    assert radii.tolist() == [0.1, 0.1] and SPY[-1]["time_limit"] == 5.0
    assert r.regions[0]["kind"] == "l2_ball"
    # mixed lists are cut into runs of balls and of boxes: each ball run gets its centres and radii
    SPY.clear()
    mixed = [balls[0], *_boxes(pair, 2), balls[1]]
    r = certify(pair, None, mixed, method="spy", progress=False, batch_size=8)
    assert [c["lo"].shape[0] for c in SPY] == [1, 2, 1]
    assert SPY[1]["l2"] is None
    torch.testing.assert_close(SPY[2]["l2"][0][0], torch.full((4,), 0.6, dtype=torch.float64))
    assert [d["kind"] for d in r.regions] == ["l2_ball", "linf_ball", "linf_ball", "l2_ball"]


def test_an_unsound_method_is_caught(pair, monkeypatch):
    monkeypatch.setitem(METHODS, "broken", BoundMethod("broken", unsound_bounds, "too tight"))
    with pytest.raises(RuntimeError, match="unsound bound"):
        certify(pair, None, _boxes(pair, 1, eps=0.2), method="broken", progress=False)


def test_conv_pairs_certify():
    pair = random_conv_pair(np.random.default_rng(2), twin="prune")
    lo, hi = pair.domain()
    regions = [Box.around(np.full((1, 6, 6), c), 0.05, lo, hi) for c in (0.3, 0.7)]
    r = certify(pair, None, regions, method="diff-interval", progress=False)
    assert r.layers[0].end_to_end_upper.shape == (2, 3, 6, 6)
    jsonschema.validate(r.to_json(), load_schema())


@pytest.mark.parametrize("kwargs, error, message", [
    ({"method": "magic"}, ConfigError, "unknown certification method 'magic'"),
    ({"tolerance": 0.0}, ConfigError, "tolerance must be a finite number > 0"),
    ({"tolerance": float("nan")}, ConfigError, "tolerance must be a finite number > 0"),
    ({"batch_size": 0}, ConfigError, "batch_size must be >= 1"),
])
def test_bad_options(pair, kwargs, error, message):
    with pytest.raises(error, match=None) as info:
        certify(pair, None, _boxes(pair, 1), progress=False, **{"method": "naive", **kwargs})
    assert message in str(info.value)


def test_bad_regions(pair):
    with pytest.raises(RegionError, match=r"input shape \(5,\), the networks take \(4,\)"):
        certify(pair, None, Box.around(np.full(5, 0.5), 0.1, 0.0, 1.0), method="naive", progress=False)
    outside = Box.around(np.full(4, 0.5), 0.8, -1.0, 2.0)  # built against a larger domain
    with pytest.raises(RegionError, match="reaches below the networks' input domain at input \\[0\\]"):
        certify(pair, None, outside, method="naive", progress=False)
    with pytest.raises(RegionError, match="no regions"):
        certify(pair, None, [], method="naive", progress=False)


def test_registry_rejects_options_a_method_does_not_take(pair):
    assert get_method("naive").bounds is naive_bounds
    with pytest.raises(ConfigError, match=r"method 'diff-linear' takes no option 'itertions'; its options: .*iterations"):
        certify(pair, None, _boxes(pair, 1), method="diff-linear", progress=False, itertions=5)
    # certify's own arguments reach only the methods that take them (naive has no time limit)
    assert get_method("naive").arguments({"time_limit": 1.0, "seed": None}, {}) == {}
    assert get_method("milp").arguments({"time_limit": 1.0, "seed": 3}, {"layers": [0]}) == \
        {"time_limit": 1.0, "layers": [0]}


def test_a_method_must_take_pair_region():
    with pytest.raises(TypeError, match=r"must start \(pair, region\)"):
        BoundMethod("odd", lambda region, pair: None, "wrong order")
    with pytest.raises(TypeError, match=r"must start \(pair, region\)"):
        BoundMethod("old", lambda pair, lo, hi: None, "raw boxes")


def test_paths_and_compact_models_load(tmp_path, pair):
    from prunecert.io import save_model
    save_model(pair.f, tmp_path / "f.pt")
    save_model(pair.g, tmp_path / "g.pt")
    r = certify(tmp_path / "f.pt", str(tmp_path / "g.pt"), _boxes(pair, 1), method="naive", progress=False)
    direct = certify(pair, None, _boxes(pair, 1), method="naive", progress=False)
    np.testing.assert_array_equal(r.max_abs_logit_deviation, direct.max_abs_logit_deviation)


def test_nnet_pair_against_its_float16_twin(tmp_path):
    nnet = pytest.importorskip("prunecert.io.nnet", reason="prunecert.io.nnet (NNet import) not built yet")
    from prunecert.io import load_model, save_model
    f = random_pair(np.random.default_rng(7), 5, (10, 8), 3, twin="same").f
    rounded = [Linear(op.weight.to(torch.float16).to(torch.float64), op.bias.to(torch.float16).to(torch.float64))
               if isinstance(op, Linear) else op for op in f.ops]
    g = Network(rounded, f.input_shape, 0.0, 1.0, name="f16")
    save_model(f, tmp_path / "f.nnet")
    save_model(g, tmp_path / "g.nnet")
    assert hasattr(nnet, "load_nnet")
    fl, gl = load_model(tmp_path / "f.nnet"), load_model(tmp_path / "g.nnet")
    lo, hi = fl.domain()
    r = certify(fl, gl, [Box.around(np.full(5, 0.5), 0.1, lo, hi)], method="diff-interval", progress=False)
    # float16 rounding changes weights by about 2^-11 relative: the certified deviation is small but not 0
    assert 0 < float(r.max_abs_logit_deviation[0]) < 0.05
    assert r.sampled_max_abs_logit_deviation[0] <= r.max_abs_logit_deviation[0]


def test_a_pair_must_be_given_with_pruned_none(pair):
    # original may be a ready Pair; a Pair's networks are used as they are
    r = certify(Pair(pair.f, pair.f), None, _boxes(pair, 1), method="diff-interval", progress=False)
    assert float(r.max_abs_logit_deviation[0]) < 1e-250
