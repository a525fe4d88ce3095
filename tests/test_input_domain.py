"""`--input-domain`: models whose inputs are not [0, 1] (normalised ONNX nets) can be certified, attacked,
pruned and audited; the domain is recorded; box edges within float32 rounding of the domain are accepted."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest

from prunecert.cli import ERROR_EXIT, run
from prunecert.core.regions import Box
from prunecert.errors import ConfigError, RegionError
from prunecert.io import load_model, parse_input_domain, save_model
from prunecert.network import mlp

N_IN = 4


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("domain")
    for name, seed in (("f", 0), ("g", 1)):
        r = np.random.default_rng(seed)
        net = mlp([r.normal(size=(6, N_IN)), r.normal(size=(3, 6))], [r.normal(size=6), r.normal(size=3)])
        save_model(net, d / f"{name}.onnx")  # ONNX carries no domain: loads as [0, 1]
    np.save(d / "pair.npy", np.stack([-np.ones(N_IN), np.ones(N_IN)]))
    return d


def _vnnlib(path, lo, hi):
    lines = [f"(declare-const X_{i} Real)" for i in range(N_IN)] + ["(declare-const Y_0 Real)"]
    for i in range(N_IN):
        lines += [f"(assert (>= X_{i} {lo[i]!r}))", f"(assert (<= X_{i} {hi[i]!r}))"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(capsys, *argv):
    capsys.readouterr()
    code = run([str(a) for a in argv])
    return (code, *capsys.readouterr())


def test_normalised_box_needs_and_accepts_input_domain(onnx_pair, tmp_path, capsys):
    prop = _vnnlib(tmp_path / "p.vnnlib", [-0.5] * N_IN, [0.25] * N_IN)
    code, _, err = _run(capsys, "certify", onnx_pair / "f.onnx", onnx_pair / "g.onnx", "--vnnlib", prop, "-q")
    assert code == ERROR_EXIT and "-0.5 at input [0] is below the domain's 0.0" in err and "--input-domain" in err
    for domain in ("-1,1", str(onnx_pair / "pair.npy")):
        code, _, err = _run(capsys, "certify", onnx_pair / "f.onnx", onnx_pair / "g.onnx", "--vnnlib", prop,
                              "--input-domain", domain, "--json", tmp_path / "c.json", "-q")
        assert code in (0, 1, 2), err
        region = json.loads((tmp_path / "c.json").read_text())["regions"][0]["region"]
        assert region["lower"][0] == -0.5 and region["upper"][0] == 0.25
        assert region["domain"] == {"lower": -1.0, "upper": 1.0, "uniform": True}  # recorded in the result


def test_info_and_prune_record_the_domain(onnx_pair, tmp_path, capsys):
    code, out, err = _run(capsys, "info", onnx_pair / "f.onnx", "--input-domain", "-2,3", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["domain"] == {"lo_min": -2.0, "lo_max": -2.0, "hi_min": 3.0, "hi_max": 3.0}
    assert info["metadata"]["input_domain"]["source"] == "--input-domain"
    code, out, err = _run(capsys, "prune", onnx_pair / "f.onnx", "--keep", "3", "--input-domain", "-2,3",
                          "--out", tmp_path / "p.pt", "-q")
    assert code == 0, err
    lo, hi = load_model(tmp_path / "p.pt").domain()
    assert lo.min() == -2.0 and hi.max() == 3.0  # the pruned model keeps (and its provable bound used) it


@pytest.mark.parametrize("text, message", [
    ("1,0", "LO <= HI"), ("-1", "expected LO,HI"), ("a,b", "two numbers"), ("nan,1", "finite"),
    ("missing.npy", "not a readable .npy"),
])
def test_bad_input_domain_is_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_input_domain(text)


def test_domain_of_the_wrong_shape_is_refused(onnx_pair, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((2, N_IN + 1)))
    code, _, err = _run(capsys, "info", onnx_pair / "f.onnx", "--input-domain", tmp_path / "bad.npy")
    assert code == ERROR_EXIT and "do not fit the input shape (4,)" in err


def test_edges_within_float32_rounding_snap_to_the_domain():
    one_up = float(np.nextafter(np.float32(1.0), np.float32(2.0)))  # 1.0000001192...: float32's next number
    box = Box(np.zeros(N_IN), np.full(N_IN, one_up), np.zeros(N_IN), np.ones(N_IN))
    assert box.hi.max() == 1.0
    below = -1e-7
    assert Box(np.full(N_IN, below), np.ones(N_IN), np.zeros(N_IN), np.ones(N_IN)).lo.min() == 0.0
    # beyond rounding: refused, and the message shows both numbers in full, so they look different
    with pytest.raises(RegionError, match=r"upper bound 1\.00001 at input \[0\] is above the domain's 1\.0"):
        Box(np.zeros(N_IN), np.full(N_IN, 1.00001), np.zeros(N_IN), np.ones(N_IN))
    with pytest.raises(RegionError, match="below the domain's 0.0"):
        Box(np.full(N_IN, -2e-7), np.full(N_IN, -1.5e-7), np.zeros(N_IN), np.ones(N_IN))


def test_audit_records_the_input_domain(tmp_path, capsys):
    rng = np.random.default_rng(0)
    sizes = (64, 8, 10)
    f = mlp([rng.normal(size=(b, a)) / np.sqrt(a) for a, b in pairwise(sizes)], [np.zeros(8), np.zeros(10)])
    save_model(f, tmp_path / "f.onnx")
    code, out, err = _run(capsys, "audit", tmp_path / "f.onnx", "--keep", "4", "--data", "digits", "--regions", "1",
                          "--eps", "0.01", "--no-domain", "--attack-budget", "0.05", "--samples", "8",
                          "--tolerance", "100", "--input-domain", "-0.5,1.5", "--out", tmp_path / "a", "--json-only")
    assert code in (0, 1, 2), err
    report = json.loads(out)
    assert report["settings"]["input_domain"] == {"lo_min": -0.5, "lo_max": -0.5, "hi_min": 1.5, "hi_max": 1.5,
                                                  "source": "--input-domain"}
    assert "--input-domain -0.5,1.5" in report["reproducibility"]["command"]
