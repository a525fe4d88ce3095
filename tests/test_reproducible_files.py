"""Same seed, same bytes: pruned model files (and any saved model) are byte-identical across runs and
output paths; no timings or temporary names end up inside a model file."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from prunecert.cli import run
from prunecert.io import save_model
from prunecert.network import mlp


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    rng = np.random.default_rng(3)
    net = mlp([rng.normal(size=(12, 5)), rng.normal(size=(9, 12)), rng.normal(size=(3, 9))],
              [rng.normal(size=12), rng.normal(size=9), rng.normal(size=3)], name="small")
    save_model(net, d / "m.pt")
    return d / "m.pt"


@pytest.mark.parametrize("target", [["--keep", "0.5"], ["--epsilon", "200"]])
def test_same_seed_same_pruned_bytes(model, tmp_path, capsys, target):
    outs = [tmp_path / "a.pt", tmp_path / "sub" / "b.pt"]
    for out in outs:
        out.parent.mkdir(exist_ok=True)
        assert run(["prune", str(model), *target, "--seed", "7", "--out", str(out), "-q"]) == 0, capsys.readouterr()
    assert outs[0].read_bytes() == outs[1].read_bytes()
    names = zipfile.ZipFile(outs[0]).namelist()
    assert all(n.startswith("archive/") for n in names), names  # not the temporary file's random name
    assert run(["prune", str(model), *target, "--seed", "8", "--out", str(tmp_path / "c.pt"), "-q"]) == 0
    assert (tmp_path / "c.pt").read_bytes() != outs[0].read_bytes()  # the seed does matter


@pytest.mark.parametrize("suffix", [".pt", ".onnx", ".nnet"])
def test_saving_twice_gives_the_same_bytes(model, tmp_path, suffix):
    from prunecert.io import load_model
    net = load_model(model)
    save_model(net, tmp_path / f"x{suffix}")
    save_model(net, tmp_path / f"y{suffix}")
    assert (tmp_path / f"x{suffix}").read_bytes() == (tmp_path / f"y{suffix}").read_bytes()
