"""`prunecert prune`: the table, the saved file, errors, and the real VNN-COMP ONNX network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prunecert.cli import app
from prunecert.cli.prune import parse_keep
from prunecert.errors import ConfigError
from prunecert.io import load_model, save_model, weights_sha256
from prunecert.network import mlp
from prunecert.prune import complete

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune_cli")
    rng = np.random.default_rng(0)
    net = mlp([rng.normal(size=(16, 5)), rng.normal(size=(10, 16)), rng.normal(size=(3, 10))],
              [rng.normal(size=16), rng.normal(size=10), rng.normal(size=3)], name="small")
    save_model(net, d / "m.pt")
    return d, net


def test_parse_keep():
    assert parse_keep("30") == 30 and parse_keep("0.1") == 0.1 and parse_keep(None) is None
    assert parse_keep("0:30,1:0.5") == {0: 30, 1: 0.5}
    with pytest.raises(ConfigError):
        parse_keep("lots")
    with pytest.raises(ConfigError):
        parse_keep("a:3")


def test_prune_writes_the_model_and_prints_the_table(model, tmp_path):
    d, net = model
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["prune", str(d / "m.pt"), "--keep", "0.5", "--seed", "3", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    g = load_model(out)
    rec = g.metadata["pruning"]
    assert [r["n_kept"] for r in rec["layers"]] == [8, 5] and rec["seed"] == 3
    assert rec["original_weights_sha256"] == weights_sha256(net)
    assert "8/16" in res.output and "5/10" in res.output and "beta_hat" in res.output
    assert f"{rec['layers'][0]['eps_max']:.4g}" in res.output
    x = torch.rand(20, 5, dtype=torch.float64)
    torch.testing.assert_close(complete(g, net).forward(x), g.forward(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("args", [["--method", "topk", "--keep", "3"], ["--compression", "0.5"],
                                  ["--epsilon", "500", "--delta", "0.05"], ["--keep", "1:4"]])
def test_other_targets_and_methods(model, tmp_path, args):
    d, _ = model
    res = runner.invoke(app, ["prune", str(d / "m.pt"), *args, "--out", str(tmp_path / "p.pt"), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.pt").is_file()


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "layer 0"), (["--keep", "17"], "larger than the layer's 16"),
    (["--keep", "3", "--epsilon", "1"], "exactly one target"), (["--method", "random", "--keep", "3"], "unknown pruning method"),
    (["--keep", "3", "--fine-tune", "2"], "--data"), (["--keep", "x"], "neither a neuron count"),
])
def test_bad_input_is_one_line_and_writes_nothing(model, tmp_path, args, message):
    d, _ = model
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["prune", str(d / "m.pt"), *args, "--out", str(out), "-q"])
    assert res.exit_code == 3
    assert message in res.output and res.output.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_model_file(tmp_path):
    res = runner.invoke(app, ["prune", str(tmp_path / "nope.pt"), "--keep", "3", "--out", str(tmp_path / "p.pt")])
    assert res.exit_code == 3 and "not found" in res.output


def test_help_has_an_example():
    res = runner.invoke(app, ["prune", "--help"])
    assert res.exit_code == 0 and "prunecert prune lenet.pt" in res.output


def test_vnncomp_onnx_network_prunes_and_runs(tmp_path, vnncomp):
    folder, widths = vnncomp
    VNNCOMP = folder / "mnist-net_256x2.onnx"
    out = tmp_path / "mnist-pruned.pt"
    res = runner.invoke(app, ["prune", str(VNNCOMP), "--keep", "0.1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    f, g = load_model(VNNCOMP), load_model(out)
    k = round(0.1 * widths[0])
    assert [op.weight.shape for op in g.ops if hasattr(op, "weight")] == [(k, 784), (k, k), (10, k)]
    rec = g.metadata["pruning"]
    assert rec["compression"] > 0.85 and all(r["eps_max"] > 0 for r in rec["layers"])
    x = torch.rand(64, *f.input_shape, dtype=torch.float64)
    c = complete(g, f)
    torch.testing.assert_close(c.forward(x), g.forward(x), rtol=0, atol=1e-10)
    # sanity: the pruned net still computes something finite and of the right shape
    assert torch.isfinite(g.forward(x)).all() and g.forward(x).shape == (64, 10)
