"""Model I/O: every import/export path round-trips; foreign, truncated and unsupported files fail clearly."""


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from prunecert.errors import ModelFormatError, ShapeMismatchError, UnsupportedLayerError
from prunecert.io import load_model, save_model, weights_sha256
from prunecert.io.onnx_io import save_difference_onnx
from prunecert.io.torch_io import network_from_module, network_to_module
from prunecert.io.vnnlib import read_vnnlib_box, write_deviation_property
from prunecert.network import Linear, mlp


def _random_mlp(seed=0, sizes=(6, 8, 5, 3), lo=0.0, hi=1.0):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(b, a)) for a, b in zip(sizes, sizes[1:])]
    bs = [rng.normal(size=b) for b in sizes[1:]]
    return mlp(ws, bs, lo, hi)


def _conv_module(seed=0, batchnorm=True):
    torch.manual_seed(seed)
    mods = [nn.Conv2d(1, 4, 3, padding=1)]
    if batchnorm:
        mods.append(nn.BatchNorm2d(4))
    mods += [nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 10)]
    m = nn.Sequential(*mods)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.normal_()
            bn.bias.data.normal_()
    return m.eval().double()


def _max_diff(a, b, x):
    return float((a.forward(x) - b.forward(x)).abs().max())


def test_native_roundtrip_keeps_weights_and_metadata(tmp_path):
    net = _random_mlp()
    net.metadata = {"pruning": {"method": "coreset"}}
    save_model(net, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert back.metadata == net.metadata
    assert weights_sha256(back) == weights_sha256(net)
    assert _max_diff(net, back, np.random.default_rng(1).random((20, 6))) == 0.0


def test_torch_module_with_batchnorm_avgpool_roundtrip():
    m = _conv_module()
    net = network_from_module(m, (1, 12, 12))
    x = torch.rand(7, 1, 12, 12, dtype=torch.float64)
    assert float((net.forward(x) - m(x)).detach().abs().max()) < 1e-10
    back = network_from_module(network_to_module(net).double(), (1, 12, 12))
    assert _max_diff(net, back, x) < 1e-6


def test_state_dict_with_inferred_and_explicit_arch(tmp_path):
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    x = torch.rand(5, 16, dtype=torch.float64)
    for arch in (None, "mlp:16-9-4"):
        net = load_model(tmp_path / "sd.pt", arch=arch)
        assert float((net.forward(x) - m(x).detach()).abs().max()) < 1e-12
    with pytest.raises(ModelFormatError, match=r"1\.weight.*\(9, 16\).*\(8, 16\)"):
        load_model(tmp_path / "sd.pt", arch="mlp:16-8-4")


def test_state_dict_with_json_arch(tmp_path):
    m = _conv_module(batchnorm=False).float()
    torch.save(m.state_dict(), tmp_path / "cnn.pt")
    (tmp_path / "arch.json").write_text(
        '{"input_shape": [1, 12, 12], "layers": [{"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 1},'
        '{"type": "relu"}, {"type": "avgpool2d", "kernel": 2}, {"type": "conv2d", "out_channels": 3, "kernel": 3,'
        '"stride": 2}, {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out_features": 10}]}')
    net = load_model(tmp_path / "cnn.pt", arch=str(tmp_path / "arch.json"))
    x = torch.rand(3, 1, 12, 12)
    assert float((net.forward(x, torch.float32) - m(x).detach()).abs().max()) < 1e-5


def test_onnx_export_import_and_onnxruntime_agree(tmp_path):
    for net in (_random_mlp(), network_from_module(_conv_module(), (1, 12, 12))):
        save_model(net, tmp_path / "m.onnx")
        back = load_model(tmp_path / "m.onnx")
        x = np.random.default_rng(2).random((4, *net.input_shape))
        assert _max_diff(net, back, x) < 1e-6
        sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
        got = sess.run(None, {"input": x.astype(np.float32)})[0]
        assert np.abs(got - net.forward(x).numpy()).max() < 1e-5


def test_vnncomp_network_imports_and_matches_onnxruntime(vnncomp):
    folder, widths = vnncomp
    net = load_model(folder / "mnist-net_256x2.onnx")
    assert [layer.n_neurons for layer in net.layers()] == widths
    x = np.random.default_rng(3).random((6, 784, 1)).astype(np.float32)
    sess = ort.InferenceSession(str(folder / "mnist-net_256x2.onnx"))
    want = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(6)])
    assert np.abs(want - net.forward(x.astype(np.float64)).numpy()).max() < 1e-5


def test_onnx_input_normalisation_becomes_scale(tmp_path):
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["d"]),
             helper.make_node("Gemm", ["d", "W", "b"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.float32([0.1307]), "mean"), numpy_helper.from_array(np.float32([0.3081]), "std"),
             numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "norm.onnx")
    net = load_model(tmp_path / "norm.onnx")
    assert [op.kind for op in net.ops] == ["scale", "linear"]
    x = rng.random((4, 5))
    want = ((x - np.float32(0.1307)) / np.float32(0.3081)) @ w.T.astype(np.float64) + b
    assert np.abs(net.forward(x).numpy() - want).max() < 1e-6


@pytest.mark.parametrize("op_type", ["Sigmoid", "MaxPool"])
def test_onnx_unsupported_node_is_named(tmp_path, op_type):
    attrs = {"kernel_shape": [2, 2]} if op_type == "MaxPool" else {}
    nodes = [helper.make_node(op_type, ["x"], ["y"], name="bad_node", **attrs)]
    shape = [1, 1, 4, 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedLayerError, match=f"bad_node.*{op_type}"):
        load_model(tmp_path / "bad.onnx")


def test_nnet_roundtrip_and_normalisation(tmp_path):
    net = _random_mlp(lo=-np.ones(6), hi=np.arange(6) + 1.0)
    save_model(net, tmp_path / "m.nnet")
    back = load_model(tmp_path / "m.nnet")
    x = np.random.default_rng(5).random((9, 6))
    assert _max_diff(net, back, x) < 1e-12
    np.testing.assert_array_equal(back.domain()[1], np.arange(6) + 1.0)
    # a file with non-trivial means/ranges: raw semantics (x - m) / r in, y * r_out + m_out out
    text = "\n".join(["// test", "1,2,1,2,", "2,1,", "0,", "0,0,", "10,10,", "1,2,5,", "2,4,3,",
                      "1.5,-2.0,", "0.25,"])
    (tmp_path / "n.nnet").write_text(text)
    n = load_model(tmp_path / "n.nnet")
    x = np.array([[3.0, 7.0]])
    want = (1.5 * (3 - 1) / 2 - 2.0 * (7 - 2) / 4 + 0.25) * 3 + 5
    assert abs(float(n.forward(x)[0, 0]) - want) < 1e-12


def test_nnet_refuses_conv_and_truncation(tmp_path):
    with pytest.raises(UnsupportedLayerError, match="NNet"):
        save_model(network_from_module(_conv_module(), (1, 12, 12)), tmp_path / "c.nnet")
    save_model(_random_mlp(), tmp_path / "m.nnet")
    lines = (tmp_path / "m.nnet").read_text().splitlines()
    (tmp_path / "t.nnet").write_text("\n".join(lines[:-3]))
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(tmp_path / "t.nnet")


def test_difference_onnx_computes_f_minus_g(tmp_path):
    f, g = _random_mlp(0), _random_mlp(1)
    save_difference_onnx(f, g, tmp_path / "d.onnx")
    x = np.random.default_rng(6).random((5, 6))
    got = ort.InferenceSession(str(tmp_path / "d.onnx")).run(None, {"input": x.astype(np.float32)})[0]
    assert np.abs(got - (f.forward(x) - g.forward(x)).numpy()).max() < 1e-4


def test_vnnlib_fixture_box_and_deviation_property(tmp_path, vnncomp):
    lo, hi = read_vnnlib_box(vnncomp[0] / "prop_0_0.03.vnnlib", 784)
    assert lo.shape == (784,) and np.all(lo >= 0) and np.all(hi <= 1) and np.all(hi - lo <= 2 * 0.03 + 1e-7)
    write_deviation_property(tmp_path / "p.vnnlib", lo, hi, 3, 0.25, n_outputs=10)
    text = (tmp_path / "p.vnnlib").read_text()
    assert "(declare-const Y_9 Real)" in text and "(>= Y_3 0.25)" in text and "(<= Y_3 -0.25)" in text
    lo2, hi2 = read_vnnlib_box(tmp_path / "p.vnnlib", 784)
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)
    with pytest.raises(Exception, match="X_783"):
        (tmp_path / "partial.vnnlib").write_text("\n".join(text.splitlines()[:-4]).replace("(assert (>= X_783", ";"))
        read_vnnlib_box(tmp_path / "partial.vnnlib", 784)


@pytest.mark.parametrize("suffix", [".pt", ".onnx", ".nnet"])
def test_foreign_and_truncated_files_fail_clearly(tmp_path, suffix):
    (tmp_path / f"text{suffix}").write_text("this is not a model\n")
    with pytest.raises(ModelFormatError, match=f"text{suffix}"):
        load_model(tmp_path / f"text{suffix}")
    save_model(_random_mlp(), tmp_path / f"m{suffix}")
    data = (tmp_path / f"m{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=f"cut{suffix}"):
        load_model(tmp_path / f"cut{suffix}")


def test_missing_file_nan_weights_and_shape_mismatch(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        load_model(tmp_path / "nope.pt")
    w = np.ones((3, 4))
    w[1, 2] = np.nan
    with pytest.raises(ModelFormatError, match=r"non-finite.*\[1, 2\]"):
        Linear(w)
    with pytest.raises(ShapeMismatchError, match="expects input shape"):
        mlp([np.ones((3, 4)), np.ones((2, 5))], [np.zeros(3), np.zeros(2)])
