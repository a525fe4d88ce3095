"""ONNX import/export: each supported node form agrees with onnxruntime; everything else is refused by name."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from prunecert.errors import ModelFormatError, UnsupportedLayerError
from prunecert.io import load_model
from prunecert.io.onnx_io import load_onnx, save_difference_onnx, save_onnx
from prunecert.network import AvgPool2d, Conv2d, Flatten, Linear, Network, ReLU, Scale, mlp

RNG = np.random.default_rng(2024)


@pytest.fixture(autouse=True)
def _reseed():
    """Each test draws the same numbers whether it runs alone or in the suite."""
    global RNG
    RNG = np.random.default_rng(2024)


def _f32(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _save(tmp_path: Path, nodes, inits, in_shape, out_shape=None, name="m.onnx", outputs=("y",)) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _agrees_with_ort(path: Path, net: Network, batch: int = 1, tol: float = 1e-5) -> None:
    """Our float64 forward equals onnxruntime's float32 result on random inputs."""
    sess = ort.InferenceSession(str(path))
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    x = RNG.random(shape).astype(np.float32)
    want = sess.run(None, {inp.name: x})[0]
    got = net.forward(x.astype(np.float64)).numpy()
    assert got.shape[0] == want.shape[0]
    assert np.abs(got.reshape(want.shape) - want).max() < tol


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_transb_and_row_bias(tmp_path, trans_b):
    w = _f32(4, 6) if trans_b else _f32(6, 4)
    b = _f32(1, 4)  # a (1, N) bias, as some exporters write it
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], alpha=0.5, beta=2.0, transB=trans_b, name="fc")]
    path = _save(tmp_path, nodes, {"W": w, "b": b}, [1, 6], [1, 4])
    net = load_onnx(path)
    assert [op.kind for op in net.ops] == ["linear"]
    _agrees_with_ort(path, net)


def test_matmul_add_with_bias_first_and_constant_node_weights(tmp_path):
    w1, b1, w2 = _f32(5, 7), _f32(7), _f32(7, 3)
    nodes = [helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1)),
             helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["b1", "h"], ["a"], name="add1"),  # bias on the left
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]  # no bias at all
    path = _save(tmp_path, nodes, {"b1": b1, "W2": w2}, [1, 5], [1, 3])
    net = load_onnx(path)
    assert [op.kind for op in net.ops] == ["linear", "relu", "linear"]
    assert float(net.ops[2].bias.abs().max()) == 0.0
    _agrees_with_ort(path, net)


def test_conv_batchnorm_avgpool_and_standalone_batchnorm(tmp_path):
    c = 3
    bn = lambda p, n: {f"{p}s": _f32(n), f"{p}b": _f32(n), f"{p}m": _f32(n),  # noqa: E731
                       f"{p}v": RNG.uniform(0.5, 2, n).astype(np.float32)}
    inits = {"Wc": _f32(c, 2, 3, 3), "bc": _f32(c), "Wf": _f32(c * 3 * 3, 4), "bf": _f32(4), **bn("n1", c),
             **bn("n2", 2)}
    nodes = [helper.make_node("BatchNormalization", ["x", "n2s", "n2b", "n2m", "n2v"], ["x0"], epsilon=1e-3),
             helper.make_node("Conv", ["x0", "Wc", "bc"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c1", "n1s", "n1b", "n1m", "n1v"], ["c2"], name="bn"),
             helper.make_node("Relu", ["c2"], ["c3"]),
             helper.make_node("AveragePool", ["c3"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"])]
    path = _save(tmp_path, nodes, inits, [1, 2, 6, 6], [1, 4])
    net = load_onnx(path)
    # the BN before the conv becomes a per-channel Scale, the one after it is folded into the conv
    assert [type(op) for op in net.ops] == [Scale, Conv2d, ReLU, AvgPool2d, Flatten, Linear]
    _agrees_with_ort(path, net)


def test_normalisation_in_every_supported_form(tmp_path):
    inits = {"c": np.float32([0.5]), "W": _f32(3, 4), "k": np.float32([2.0, -1.0, 0.5, 4.0])}
    nodes = [helper.make_node("Sub", ["c", "x"], ["a"]),  # c - x
             helper.make_node("Mul", ["k", "a"], ["m"]),  # k * (c - x)
             helper.make_node("Add", ["m", "c"], ["d"]),
             helper.make_node("Div", ["d", "k"], ["e"]),
             helper.make_node("Identity", ["e"], ["i"]),
             helper.make_node("Dropout", ["i"], ["o"]),
             helper.make_node("Gemm", ["o", "W"], ["y"], transB=1)]
    path = _save(tmp_path, nodes, inits, [1, 4], [1, 3])
    net = load_onnx(path)
    assert [op.kind for op in net.ops] == ["scale", "linear"]  # four Scales fused into one
    _agrees_with_ort(path, net)


def test_reshape_of_vector_input_and_domain_argument(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    path = _save(tmp_path, nodes, {"shape": np.int64([-1, 12]), "W": _f32(2, 12)}, [1, 3, 2, 2], [1, 2])
    net = load_onnx(path, lo=-1.0, hi=2.0)
    assert net.input_shape == (3, 2, 2) and [op.kind for op in net.ops] == ["flatten", "linear"]
    assert net.domain()[0].min() == -1.0 and net.domain()[1].max() == 2.0
    _agrees_with_ort(path, net)


@pytest.mark.parametrize("op_type,attrs,in_shape", [
    ("Tanh", {}, [1, 4]), ("LeakyRelu", {}, [1, 4]), ("Softmax", {}, [1, 4]),
    ("AveragePool", {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER"}, [1, 1, 4, 4]),
    ("Conv", {"group": 1, "dilations": [2, 2]}, [1, 1, 6, 6]),
])
def test_unsupported_node_forms_are_named(tmp_path, op_type, attrs, in_shape):
    inputs = ["x", "Wc"] if op_type == "Conv" else ["x"]
    nodes = [helper.make_node(op_type, inputs, ["y"], name="the_node", **attrs)]
    path = _save(tmp_path, nodes, {"Wc": _f32(1, 1, 2, 2)} if op_type == "Conv" else {}, in_shape)
    with pytest.raises(UnsupportedLayerError, match=f"m.onnx.*the_node.*{op_type}"):
        load_model(path)


def test_branch_two_outputs_and_matmul_from_the_left_are_refused(tmp_path):
    branch = [helper.make_node("Relu", ["x"], ["r"], name="r1"), helper.make_node("Relu", ["x"], ["s"], name="r2"),
              helper.make_node("Add", ["r", "s"], ["y"], name="join")]
    with pytest.raises(UnsupportedLayerError, match="'x' feeds 2 nodes.*r1.*r2"):
        load_onnx(_save(tmp_path, branch, {}, [1, 4]))
    two = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1), helper.make_node("Relu", ["y"], ["z"])]
    with pytest.raises(ModelFormatError, match="exactly one graph output"):
        load_onnx(_save(tmp_path, two, {"W": _f32(3, 4)}, [1, 4], outputs=("y", "z"), name="two.onnx"))
    left = [helper.make_node("MatMul", ["W", "x"], ["y"], name="wx")]
    with pytest.raises(UnsupportedLayerError, match="wx.*W @ x"):
        load_onnx(_save(tmp_path, left, {"W": _f32(3, 4)}, [4, 1], name="left.onnx"))


def test_nan_initializer_is_refused_with_node_name(tmp_path):
    w = _f32(3, 4)
    w[2, 1] = np.nan
    path = _save(tmp_path, [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc_nan")], {"W": w}, [1, 4])
    with pytest.raises(ModelFormatError, match=r"fc_nan.*non-finite.*\[2, 1\]"):
        load_onnx(path)


def _conv_net() -> Network:
    conv = Conv2d(RNG.normal(size=(3, 2, 3, 3)), RNG.normal(size=3), (2, 7, 7), stride=2, padding=1)
    pool = AvgPool2d(2, conv.out_shape, stride=1)
    flat = Flatten(pool.out_shape)
    ops = [Scale(RNG.uniform(0.5, 2, (2, 1, 1)), RNG.normal(size=(2, 1, 1)), (2, 7, 7)), conv, ReLU(conv.out_shape),
           pool, flat, Linear(RNG.normal(size=(5, flat.out_shape[0])), RNG.normal(size=5))]
    return Network(ops, (2, 7, 7), name="convnet")


def test_conv_net_export_import_dynamic_batch(tmp_path):
    net = _conv_net()
    save_onnx(net, tmp_path / "c.onnx")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left behind
    back = load_onnx(tmp_path / "c.onnx")
    assert [op.kind for op in back.ops] == [op.kind for op in net.ops]
    x = RNG.random((9, 2, 7, 7))
    y = net.forward(x)  # float32 export: agreement to 1e-6 relative to the output scale
    assert float((back.forward(x) - y).abs().max()) < 1e-6 * max(1.0, float(y.abs().max()))
    _agrees_with_ort(tmp_path / "c.onnx", net, batch=9)


def test_difference_network_of_conv_nets_and_shape_check(tmp_path):
    f = _conv_net()
    g = Network(list(f.ops), f.input_shape, name="g")
    g.ops[-1] = Linear(f.ops[-1].weight * 0.9, f.ops[-1].bias + 0.1)
    save_difference_onnx(f, g, tmp_path / "d.onnx")
    x = RNG.random((4, 2, 7, 7)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "d.onnx")).run(None, {"input": x})[0]
    want = (f.forward(x.astype(np.float64)) - g.forward(x.astype(np.float64))).numpy()
    assert np.abs(got - want).max() < 1e-4 and np.abs(want).max() > 1e-2
    other = mlp([np.ones((5, 98))], [np.zeros(5)])
    with pytest.raises(ModelFormatError, match="shapes differ"):
        save_difference_onnx(f, other, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5), seed=st.integers(0, 2**31 - 1))
def test_random_mlp_onnx_roundtrip_property(tmp_path_factory, sizes, seed):
    rng = np.random.default_rng(seed)
    net = mlp([rng.normal(size=(b, a)) for a, b in zip(sizes, sizes[1:])], [rng.normal(size=b) for b in sizes[1:]])
    path = tmp_path_factory.mktemp("onnx") / "r.onnx"
    save_onnx(net, path)
    back = load_onnx(path)
    x = rng.random((6, sizes[0]))
    assert float((back.forward(x) - net.forward(x)).abs().max()) < 1e-6 * (1 + float(net.forward(x).abs().max()))
    _agrees_with_ort(path, net, batch=6, tol=1e-5 * (1 + float(net.forward(x).abs().max())))
