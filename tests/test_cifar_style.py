"""A CIFAR-style model end to end: 3-channel 32x32 inputs normalised inside the ONNX graph (Sub/Div per
channel), two strided convs, average pooling, two dense layers; pruned, certified (diff-linear and
crown-diff), attacked and audited on a small npz data set the test writes. Small and fast, but every
stage runs on the input shape and normalisation that MNIST models never exercise."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prunecert.adversarial import attack
from prunecert.audit import audit
from prunecert.certify import Box, certify
from prunecert.io import load_model
from prunecert.network import Scale
from prunecert.prune import prune
from prunecert.reports.schema import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (3, 32, 32)


def _cifar_onnx(path, rng) -> None:
    def w(*shape, fan):
        return (rng.normal(0, 1 / np.sqrt(fan), size=shape)).astype(np.float32)
    inits = {"mean": np.float32([0.49, 0.48, 0.45]).reshape(1, 3, 1, 1),
             "std": np.float32([0.25, 0.24, 0.26]).reshape(1, 3, 1, 1),
             "W1": w(6, 3, 3, 3, fan=27), "b1": w(6, fan=9), "W2": w(8, 6, 3, 3, fan=54), "b2": w(8, fan=9),
             "W3": w(16, 128, fan=128), "b3": w(16, fan=4), "W4": w(10, 16, fan=16), "b4": w(10, fan=4)}
    nodes = [helper.make_node("Sub", ["x", "mean"], ["n0"]),
             helper.make_node("Div", ["n0", "std"], ["n1"]),
             helper.make_node("Conv", ["n1", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("AveragePool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W3", "b3"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r3"]),
             helper.make_node("Gemm", ["r3", "W4", "b4"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "cifar_style", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *SHAPE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_cifar_style_model_through_every_stage(tmp_path):
    rng = np.random.default_rng(0)
    _cifar_onnx(tmp_path / "f.onnx", rng)
    f = load_model(tmp_path / "f.onnx")
    assert f.input_shape == SHAPE and isinstance(f.ops[0], Scale)      # Sub/Div folded into one per-channel Scale
    x = rng.uniform(0, 1, size=(60, *SHAPE))
    y = f.predict(x)                                                    # labels the model gets right
    np.savez(tmp_path / "data.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])

    g = prune(f, "coreset", keep=0.5, seed=0, progress=False)
    box = Box(np.clip(x[40] - 0.004, 0, 1), np.clip(x[40] + 0.004, 0, 1))
    dl = certify(f, g, box, method="diff-linear", progress=False, samples=32)
    cd = certify(f, g, box, method="crown-diff", progress=False, samples=32)
    found = attack(f, g, box, method="auto", budget_seconds=1.0, progress=False)
    bound = float(dl.max_abs_logit_deviation[0])
    assert found.value <= bound * (1 + 1e-9) and bound <= float(cd.max_abs_logit_deviation[0])
    assert bound < 1.5 * found.value + 1e-6, (bound, found.value)     # tight on a small box

    report = audit(f, g, out=tmp_path / "audit", tolerance=1.0, data=f"npz:{tmp_path / 'data.npz'}", points=2,
                   eps=(0.004,), domain=True, attack_budget=0.2, certify_budget=2.0, progress=False)
    doc = json.loads((tmp_path / "audit" / "report.json").read_text())
    validate(doc)
    assert len(doc["regions"]) == 3 and doc["settings"]["certify_budget_seconds"] == 2.0
    assert report.verdict.overall in ("certified", "violated", "unknown")
