"""NNet: the raw-input semantics (normalise, run, de-normalise) survive import; export round-trips exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunecert.errors import ModelFormatError, UnsupportedLayerError
from prunecert.io import load_model, save_model, weights_sha256
from prunecert.io.nnet import load_nnet, save_nnet
from prunecert.network import Flatten, Linear, Network, ReLU, Scale, mlp


def _nnet_text(ws, bs, mins, maxs, means, ranges) -> str:
    """An NNet file in the ACAS Xu layout (comments, trailing commas)."""
    sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    row = lambda v: ",".join(f"{x:.17g}" for x in np.ravel(v)) + ","  # noqa: E731
    lines = ["// ACAS-style test network", "// second comment line", f"{len(ws)},{sizes[0]},{sizes[-1]},{max(sizes)},",
             row(sizes), "0,", row(mins), row(maxs), row(means), row(ranges)]
    for w, b in zip(ws, bs):
        lines += [row(r) for r in w] + [row([v]) for v in b]
    return "\n".join(lines) + "\n"


def _reference(x, ws, bs, means, ranges):
    """NNet semantics written out directly: (x - m) / r in, y * r_out + m_out out."""
    h = (x - means[:-1]) / ranges[:-1]
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = h @ w.T + b
        if i < len(ws) - 1:
            h = np.maximum(h, 0)
    return h * ranges[-1] + means[-1]


def test_nontrivial_means_and_ranges_fold_exactly_and_survive_export(tmp_path):
    rng = np.random.default_rng(11)
    sizes = [5, 7, 6, 3]
    ws = [rng.normal(size=(b, a)) for a, b in zip(sizes, sizes[1:])]
    bs = [rng.normal(size=b) for b in sizes[1:]]
    mins, maxs = -rng.random(5) * 3, rng.random(5) * 4 + 1
    means, ranges = rng.normal(size=6), rng.uniform(0.5, 5, 6)
    (tmp_path / "acas.nnet").write_text(_nnet_text(ws, bs, mins, maxs, means, ranges))
    net = load_model(tmp_path / "acas.nnet")
    np.testing.assert_array_equal(net.domain()[0], mins)
    np.testing.assert_array_equal(net.domain()[1], maxs)
    x = mins + rng.random((50, 5)) * (maxs - mins)
    want = _reference(x, ws, bs, means, ranges)
    assert np.abs(net.forward(x).numpy() - want).max() < 1e-10
    save_nnet(net, tmp_path / "again.nnet")  # written with means 0 / ranges 1
    text = (tmp_path / "again.nnet").read_text().splitlines()
    assert text[6] == "0.0," * 6 and text[7] == "1.0," * 6
    back = load_nnet(tmp_path / "again.nnet")
    assert weights_sha256(back) == weights_sha256(net)


def test_leading_scale_and_flatten_fold_into_first_layer(tmp_path):
    rng = np.random.default_rng(12)
    scale = Scale(rng.uniform(0.5, 2, (2, 1, 1)), rng.normal(size=(2, 1, 1)), (2, 2, 2))
    flat = Flatten((2, 2, 2))
    post = Scale(rng.uniform(0.5, 2, 8), rng.normal(size=8), (8,))
    ops = [scale, flat, post, Linear(rng.normal(size=(4, 8)), rng.normal(size=4)), ReLU((4,)),
           Linear(rng.normal(size=(2, 4)), rng.normal(size=2))]
    net = Network(ops, (2, 2, 2), 0.0, 1.0, name="normalised")
    save_model(net, tmp_path / "n.nnet")
    back = load_model(tmp_path / "n.nnet")
    assert back.input_shape == (8,) and [op.kind for op in back.ops] == ["linear", "relu", "linear"]
    x = rng.random((20, 2, 2, 2))
    assert float((back.forward(x) - net.forward(x)).abs().max()) < 1e-12


def test_export_refuses_what_nnet_cannot_hold(tmp_path):
    hidden_scale = Network([Linear(np.ones((3, 2))), ReLU((3,)), Scale(2.0, 1.0, (3,)), Linear(np.ones((1, 3)))], (2,))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(scale\+linear\).*NNet"):
        save_nnet(hidden_scale, tmp_path / "h.nnet")
    assert not (tmp_path / "h.nnet").exists()


def _valid_lines():
    return ["// t", "1,2,1,2,", "2,1,", "0,", "0,0,", "1,1,", "0,0,0,", "1,1,1,", "1.0,2.0,", "0.5,"]


@pytest.mark.parametrize("edit,match", [
    (lambda ln: ln + ["7.0,"], "1 unexpected lines after the last bias"),
    (lambda ln: ln[:1] + ["1,3,1,3,"] + ln[2:], r"layer sizes \[2, 1\] do not match header"),
    (lambda ln: ln[:8] + ["1.0,abc,"] + ln[9:], "malformed layer 0 weight line"),
    (lambda ln: ln[:8] + ["1.0,nan,"] + ln[9:], r"bad\.nnet: .*weight contains a non-finite value"),
    (lambda ln: ln[:7] + ["1,0,1,"] + ln[8:], "a range is zero"),
    (lambda ln: ln[:4] + ["2,0,"] + ln[5:], r"input 0 has an invalid domain \[2.0, 1.0\]"),
    (lambda ln: ln[:6] + ["0,0,"] + ln[7:], "expected 3 input means, found 2"),
    (lambda ln: ln[:8] + ["1.0,"] + ln[9:], "layer 0 weight rows must have 2 entries"),
    (lambda ln: ln[:5], "truncated NNet file"),
])
def test_malformed_files_name_the_problem(tmp_path, edit, match):
    (tmp_path / "ok.nnet").write_text("\n".join(_valid_lines()))
    assert float(load_nnet(tmp_path / "ok.nnet").forward(np.array([[1.0, 1.0]]))[0, 0]) == 3.5
    (tmp_path / "bad.nnet").write_text("\n".join(edit(_valid_lines())))
    with pytest.raises(ModelFormatError, match=match):
        load_model(tmp_path / "bad.nnet")


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 8), min_size=2, max_size=5), seed=st.integers(0, 2**31 - 1))
def test_random_mlp_nnet_roundtrip_is_bit_exact_property(tmp_path_factory, sizes, seed):
    rng = np.random.default_rng(seed)
    lo = rng.normal(size=sizes[0])
    hi = lo + rng.random(sizes[0]) * 3
    net = mlp([rng.normal(size=(b, a)) * 10.0 ** rng.integers(-5, 5) for a, b in zip(sizes, sizes[1:])],
              [rng.normal(size=b) for b in sizes[1:]], lo, hi)
    path = tmp_path_factory.mktemp("nnet") / "r.nnet"
    save_nnet(net, path)
    back = load_nnet(path)
    assert weights_sha256(back) == weights_sha256(net)  # repr() writes every float exactly
    np.testing.assert_array_equal(back.domain()[0], lo)
    np.testing.assert_array_equal(back.domain()[1], hi)
