"""Shared pytest fixtures and the hypothesis profile for CI."""

import os
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import settings

from prunecert import threads

# CI checks the same hypothesis examples on every run (reproducible verdicts); local runs stay random
# and keep exploring. A failure prints the example (and a blob) to replay it.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def one_torch_thread():
    """Small tensors: extra torch threads only cost synchronisation (see prunecert.threads)."""
    with threads.one_torch_thread():
        yield


# --------------------------------------------------------------------------- VNN-COMP-style fixtures
SHARED_VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vnncomp2022-mnist_fc"


def write_vnncomp_like(folder: Path, hidden: int = 16, seed: int = 0) -> Path:
    """A small stand-in for VNN-COMP 2022 `mnist_fc`, written the way its files are: an ONNX classifier
    784 -> hidden -> hidden -> 10 with input shape (1, 784, 1) and ops Flatten, Gemm, Relu; and two
    VNN-LIB properties `prop_0_0.03.vnnlib`, `prop_1_0.05.vnnlib` (an L-inf box of float32-rounded radius
    around an image, clipped to [0, 1], one assert per bound, an `or` of output constraints)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = (784, hidden, hidden, 10)
    inits, nodes, value = [], [helper.make_node("Flatten", ["0"], ["7"], axis=1)], "7"
    for i, (a, b) in enumerate(pairwise(sizes)):
        inits += [numpy_helper.from_array((rng.normal(size=(b, a)) / np.sqrt(a)).astype(np.float32), f"layers.{2 * i}.weight"),
                  numpy_helper.from_array((0.1 * rng.normal(size=b)).astype(np.float32), f"layers.{2 * i}.bias")]
        nodes.append(helper.make_node("Gemm", [value, f"layers.{2 * i}.weight", f"layers.{2 * i}.bias"], [f"g{i}"],
                                      transB=1))
        value = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [value], [f"r{i}"]))
            value = f"r{i}"
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("0", TensorProto.FLOAT, [1, 784, 1])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, 10])], inits)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder / "mnist-net_256x2.onnx")
    for k, eps in ((0, 0.03), (1, 0.05)):
        image = [float(v) for v in np.where(rng.random(784) < 0.8, 0.0, rng.random(784))]  # mostly black
        r = float(np.float32(eps))
        lines = [f"; Mnist property with label: {k}.", ""] + [f"(declare-const X_{i} Real)" for i in range(784)]
        lines += [""] + [f"(declare-const Y_{j} Real)" for j in range(10)] + ["", "; Input constraints:"]
        for i, x in enumerate(image):
            lines += [f"(assert (<= X_{i} {min(1.0, x + r)!r}))", f"(assert (>= X_{i} {max(0.0, x - r)!r}))", ""]
        lines += ["; Output constraints:", "(assert (or"] + [f"    (and (>= Y_{j} Y_{k}))" for j in range(10) if j != k]
        lines += ["))"]
        (folder / f"prop_{k}_{eps}.vnnlib").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session", params=["generated", "shared"])
def vnncomp(request, tmp_path_factory) -> tuple[Path, list[int]]:
    """(folder of mnist-net_256x2.onnx + two properties, the network's layer widths): a stand-in written
    here (any clone), and the real VNN-COMP files when ../shared/fixtures holds them (skipped otherwise)."""
    if request.param == "shared":
        if not (SHARED_VNNCOMP / "mnist-net_256x2.onnx").is_file():
            pytest.skip(f"the real VNN-COMP fixture is not present ({SHARED_VNNCOMP})")
        return SHARED_VNNCOMP, [256, 256, 10]
    return write_vnncomp_like(tmp_path_factory.mktemp("vnncomp")), [16, 16, 10]
