"""`prunecert certify`: exit codes, the JSON document against its schema, errors, ONNX/VNN-LIB export."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from pairs import random_pair
from typer.testing import CliRunner

from prunecert.certify import certify
from prunecert.core.regions import Box
from prunecert.certify.result import load_schema
from prunecert.cli import app
from prunecert.io import save_model
from prunecert.network import mlp

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("certify_cli")
    pair = random_pair(np.random.default_rng(0), 4, (8, 6), 3, twin="perturb")
    save_model(pair.f, d / "f.pt")
    save_model(pair.g, d / "g.pt")
    np.save(d / "c.npy", np.full(4, 0.5))
    return d, pair


def _run(*args):
    return runner.invoke(app, ["certify", *map(str, args), "-q"])


def test_certified_exit_0_and_json_matches_the_schema(models, tmp_path):
    d, pair = models
    out = tmp_path / "sub" / "r.json"
    res = _run(d / "f.pt", d / "g.pt", "--center", d / "c.npy", "--eps", 0.05, "--method", "diff-interval",
               "--tolerance", 10, "--json", out)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, load_schema())
    assert doc["verdict"] == "certified" and doc["tolerance"] == 10
    assert doc["regions"][0]["region"]["source"] == str(d / "c.npy")
    assert "certified <=" in res.output and "verdict (tolerance 10): certified" in res.output
    # the file holds the same numbers as the library call
    lo, hi = pair.domain()
    direct = certify(pair, None, [Box.around(np.full(4, 0.5), 0.05, lo, hi)], method="diff-interval", progress=False)
    assert doc["max_abs_logit_deviation"] == pytest.approx(float(direct.max_abs_logit_deviation[0]), rel=1e-12)


def test_violated_exit_1_and_unknown_exit_2(models, tmp_path):
    d, pair = models
    lo, hi = pair.domain()
    r = certify(pair, None, [Box.around(np.full(4, 0.5), 0.2, lo, hi)], method="naive", progress=False)
    found, bound = float(r.sampled_max_abs_logit_deviation[0]), float(r.max_abs_logit_deviation[0])
    assert found < bound
    common = [d / "f.pt", d / "g.pt", "--center", d / "c.npy", "--eps", 0.2, "--method", "naive"]
    res = _run(*common, "--tolerance", found / 2, "--json", tmp_path / "v.json")
    assert res.exit_code == 1, res.output
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["verdict"] == "violated" and len(doc["regions"][0]["counterexample"]) == 4
    res = _run(*common, "--tolerance", (found + bound) / 2)
    assert res.exit_code == 2, res.output


def test_without_tolerance_the_exit_code_is_top1_agreement(models, tmp_path):
    d, pair = models
    res = _run(d / "f.pt", d / "f.pt", "--center", d / "c.npy", "--eps", 0.001, "--method", "diff-interval")
    assert res.exit_code == 0 and "top-1 agreement: proved" in res.output
    swapped = mlp([op.weight.numpy() for op in pair.f.ops[::2]][:-1] + [pair.f.ops[-1].weight.numpy()[[1, 0, 2]]],
                  [op.bias.numpy() for op in pair.f.ops[::2]][:-1] + [pair.f.ops[-1].bias.numpy()[[1, 0, 2]]])
    save_model(swapped, tmp_path / "swapped.pt")
    res = _run(d / "f.pt", tmp_path / "swapped.pt", "--region", "domain", "--method", "diff-interval",
               "--json", tmp_path / "a.json")
    assert res.exit_code == 1, res.output
    assert json.loads((tmp_path / "a.json").read_text())["agreement"]["verdict"] == "refuted"


def test_several_centres_are_certified_together(models, tmp_path):
    d, _ = models
    np.save(tmp_path / "c2.npy", np.full(4, 0.25))
    res = _run(d / "f.pt", d / "g.pt", "--center", d / "c.npy", "--center", tmp_path / "c2.npy", "--eps", 0.05,
               "--norm", "2", "--method", "naive", "--json", tmp_path / "m.json")
    assert res.exit_code in (0, 2), res.output
    doc = json.loads((tmp_path / "m.json").read_text())
    jsonschema.validate(doc, load_schema())
    assert [r["region"]["kind"] for r in doc["regions"]] == ["l2_ball", "l2_ball"]
    assert np.array(doc["layers"][0]["local"]["lower"]).shape == (2, 8)


@pytest.mark.parametrize("extra, message", [
    (["--eps", "-0.1"], "eps must be a finite number >= 0"),
    (["--eps", "0.1", "--tolerance", "-1"], "tolerance must be a finite number > 0"),
    (["--eps", "0.1", "--method", "nope"], "unknown certification method 'nope'"),
    (["--eps", "0.1", "--norm", "1"], "--norm '1'"),
    (["--eps", "0.1", "--region", "domain"], "exactly one region"),
])
def test_bad_options_exit_3_with_one_line_and_no_json(models, tmp_path, extra, message):
    d, _ = models
    out = tmp_path / "never.json"
    res = _run(d / "f.pt", d / "g.pt", "--center", d / "c.npy", *extra, "--json", out)
    assert res.exit_code == 3, res.output
    assert message in res.output and res.output.count("error:") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_models_and_centres_exit_3(models, tmp_path):
    d, _ = models
    other = mlp([np.ones((5, 4)), np.ones((3, 5))], [np.zeros(5), np.zeros(3)])
    save_model(other, tmp_path / "other.pt")
    res = _run(d / "f.pt", tmp_path / "other.pt", "--region", "domain", "--method", "naive")
    assert res.exit_code == 3 and "layer counts differ" in res.output
    np.save(tmp_path / "nan.npy", np.array([0.5, np.nan, 0.5, 0.5]))
    res = _run(d / "f.pt", d / "g.pt", "--center", tmp_path / "nan.npy", "--eps", 0.1, "--method", "naive")
    assert res.exit_code == 3 and "NaN" in res.output
    np.save(tmp_path / "wrong.npy", np.full(7, 0.5))
    res = _run(d / "f.pt", d / "g.pt", "--center", tmp_path / "wrong.npy", "--eps", 0.1, "--method", "naive")
    assert res.exit_code == 3 and "shape (7,)" in res.output
    np.save(tmp_path / "outside.npy", np.full(4, 1.5))
    res = _run(d / "f.pt", d / "g.pt", "--center", tmp_path / "outside.npy", "--eps", 0.1, "--method", "naive")
    assert res.exit_code == 3 and "above the domain" in res.output
    res = _run(d / "f.pt", tmp_path / "missing.pt", "--region", "domain")
    assert res.exit_code == 3 and "missing.pt" in res.output


def test_vnnlib_region(models, tmp_path):
    d, _ = models
    lines = [f"(declare-const X_{i} Real)" for i in range(4)]
    lines += [f"(assert (>= X_{i} 0.4))\n(assert (<= X_{i} 0.6))" for i in range(4)]
    (tmp_path / "p.vnnlib").write_text("\n".join(lines) + "\n")
    res = _run(d / "f.pt", d / "g.pt", "--vnnlib", tmp_path / "p.vnnlib", "--method", "diff-interval",
               "--tolerance", 10, "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    region = json.loads((tmp_path / "v.json").read_text())["regions"][0]["region"]
    assert region["kind"] == "box" and region["lower"] == [0.4] * 4 and region["upper"] == [0.6] * 4


def test_export_onnx_writes_the_difference_network_and_one_property_per_logit(models, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from prunecert.io.vnnlib import read_vnnlib_box
    d, pair = models
    out = tmp_path / "export"
    res = _run(d / "f.pt", d / "g.pt", "--center", d / "c.npy", "--eps", 0.05, "--method", "diff-interval",
               "--tolerance", 0.5, "--export-onnx", out)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["difference.onnx", "instances.csv"] + [f"region0_logit{k}.vnnlib" for k in range(3)]
    sess = ort.InferenceSession(str(out / "difference.onnx"))
    x = np.random.default_rng(0).uniform(0.45, 0.55, size=(6, 4))
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})
    expected = (pair.f.forward(x) - pair.g.forward(x)).numpy()
    np.testing.assert_allclose(y, expected, atol=1e-4)
    lo, hi = read_vnnlib_box(out / "region0_logit1.vnnlib", 4)
    assert np.all(lo <= 0.45) and np.all(hi >= 0.55) and np.all(hi - lo < 0.11)
    text = (out / "region0_logit1.vnnlib").read_text()
    assert "(>= Y_1 0.5)" in text and "(<= Y_1 -0.5)" in text
    assert (out / "instances.csv").read_text().splitlines()[0] == "difference.onnx,region0_logit0.vnnlib,60"


def test_export_refuses_l2_balls_and_leaves_nothing(models, tmp_path):
    d, _ = models
    out = tmp_path / "export"
    res = _run(d / "f.pt", d / "g.pt", "--center", d / "c.npy", "--eps", 0.05, "--norm", "2",
               "--method", "naive", "--export-onnx", out, "--json", tmp_path / "x.json")
    assert res.exit_code == 3 and "use --norm inf" in res.output
    assert not out.exists() and not (tmp_path / "x.json").exists()


def test_dataset_centres_on_a_flat_mnist_network(tmp_path):
    rng = np.random.default_rng(3)
    ws = [rng.normal(0, 0.05, size=(20, 784)), rng.normal(0, 0.2, size=(10, 20))]
    bs = [np.zeros(20), np.zeros(10)]
    save_model(mlp(ws, bs, name="f"), tmp_path / "f.pt")
    save_model(mlp([w.astype(np.float16).astype(np.float64) for w in ws], bs, name="g"), tmp_path / "g.pt")
    res = _run(tmp_path / "f.pt", tmp_path / "g.pt", "--center", "mnist5k:test:0-1", "--eps", 0.01,
               "--method", "diff-interval", "--tolerance", 0.1, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["region"]["source"] for r in doc["regions"]] == ["mnist5k:test:0", "mnist5k:test:1"]
    assert len(doc["regions"][0]["region"]["center"]) == 784
    assert 0 < doc["max_abs_logit_deviation"] < 0.1
