"""The error contract under hostile input (issue 12): every case is one line on stderr, exit status 3,
no traceback, no warning before the line, nothing written, and no hang.

Each case builds its hostile file in a fresh folder, runs the real console entry point in-process
(`prunecert.cli.run`, as the `prunecert` script does) under an alarm, and checks the folder holds
nothing new afterwards (validate everything before the first write).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from prunecert.cli import ERROR_EXIT, run
from prunecert.io import save_model
from prunecert.network import mlp

SIZES = (64, 8, 6, 10)  # 64 inputs: the `digits` data set's images, so centres can come from it
TIME_LIMIT_S = 30       # a case that takes longer hangs (the bug was: forever)


def _net(seed: int):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(b, a)) / np.sqrt(a) for a, b in pairwise(SIZES)]
    return mlp(ws, [rng.normal(size=b) * 0.1 for b in SIZES[1:]], name=f"net{seed}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile_models")
    save_model(_net(0), d / "f.pt")
    save_model(_net(1), d / "g.pt")
    save_model(_net(0), d / "f.onnx")
    return d


@contextmanager
def _alarm(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    with _alarm(TIME_LIMIT_S):
        code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error_line(code: int, err: str, fragment: str) -> None:
    """Exit 3 and exactly one non-empty stderr line, `error: ...`, containing `fragment` (a regex)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == ERROR_EXIT, f"exit {code}; stderr:\n{err}"
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err[:3000]}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    import re
    assert re.search(fragment, lines[0]), f"{fragment!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------------------------ hostile files
def _onnx(path: Path, nodes, inits: dict, in_shape=(1, 4), out="y", out_shape=None, raw_inits=()) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()] + list(raw_inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.write_bytes(model.SerializeToString())
    return path


def onnx_cycle(d):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["x"], name="r2")]
    return ["info", _onnx(d / "cycle.onnx", nodes, {}, out="a")]


def onnx_zero_width(d):
    w = np.zeros((4, 0), np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="fc0"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc1")]
    return ["info", _onnx(d / "zero.onnx", nodes, {"W": w, "W2": np.zeros((0, 3), np.float32)})]


def onnx_avgpool_without_kernel(d):
    nodes = [helper.make_node("AveragePool", ["x"], ["y"], name="pool")]
    return ["info", _onnx(d / "pool.onnx", nodes, {}, in_shape=(1, 1, 4, 4))]


def onnx_huge_declared_initializer(d):
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[100000, 100000], raw_data=b"\0" * 16)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")]
    return ["info", _onnx(d / "huge.onnx", nodes, {}, raw_inits=[t])]


def onnx_string_initializer(d):
    t = helper.make_tensor("W", TensorProto.STRING, [4, 2], [b"a"] * 8)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")]
    return ["info", _onnx(d / "str.onnx", nodes, {}, raw_inits=[t])]


def onnx_complex_initializer(d):
    t = numpy_helper.from_array(np.full((4, 2), 1 + 2j, np.complex64), "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")]
    return ["info", _onnx(d / "cplx.onnx", nodes, {}, raw_inits=[t])]


def onnx_div_by_zero(d):
    nodes = [helper.make_node("Div", ["x", "c"], ["s"], name="norm"), helper.make_node("Gemm", ["s", "W"], ["y"])]
    return ["info", _onnx(d / "div0.onnx", nodes, {"c": np.zeros(4, np.float32), "W": np.ones((4, 2), np.float32)})]


def onnx_negative_bn_variance(d):
    c = 2
    inits = {"W": np.ones((c, 1, 1, 1), np.float32), "s": np.ones(c, np.float32), "b": np.zeros(c, np.float32),
             "m": np.zeros(c, np.float32), "v": np.array([1.0, -4.0], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
             helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn")]
    return ["info", _onnx(d / "bn.onnx", nodes, inits, in_shape=(1, 1, 2, 2))]


def _nnet(d, header="2,2,1,3,", sizes="2,3,1,", name="bad.nnet"):
    lines = ["// hostile", header, sizes, "0,", "0,0,", "1,1,", "0,0,0,", "1,1,1,",
             "1,1,", "1,1,", "1,1,", "0,", "0,", "0,", "1,1,1,", "0,"]
    (d / name).write_text("\n".join(lines) + "\n")
    return ["info", d / name]


def nnet_nan_header(d):
    return _nnet(d, header="nan,2,1,2,")


def nnet_inf_header(d):
    return _nnet(d, header="inf,2,1,2,")


def nnet_nan_sizes(d):
    return _nnet(d, sizes="2,nan,1,")


def nnet_fractional_size(d):
    return _nnet(d, sizes="2,2.9,1,")


def nnet_zero_size(d):
    return _nnet(d, sizes="2,0,1,")


def _native(d, name: str, mutate: Callable[[dict], None]):
    from prunecert.io.native import network_to_dict
    obj = network_to_dict(_net(0))
    mutate(obj)
    torch.save(obj, d / name)
    return d / name


def deep_metadata(d):
    return ["info", _native(d, "deep.pt", lambda o: o.update(metadata="[" * 100_000 + "]" * 100_000))]


def deep_ops(d):
    return ["info", _native(d, "deepops.pt", lambda o: o.update(ops="[" * 100_000 + "]" * 100_000))]


def complex_weights(d):
    def mutate(o):
        o["tensors"]["0.weight"] = o["tensors"]["0.weight"].to(torch.complex128) * (1 + 1j)
    return ["info", _native(d, "cplx.pt", mutate)]


def inverted_domain(d):
    def mutate(o):
        o["input_lo"] = torch.ones(64, dtype=torch.float64)
        o["input_hi"] = torch.zeros(64, dtype=torch.float64)
    return ["info", _native(d, "inv.pt", mutate)]


def infinite_domain(d):
    return ["info", _native(d, "inf.pt", lambda o: o.update(input_hi=torch.full((64,), float("inf"))))]


def arch_zero_width(d):
    torch.save({"0.weight": torch.zeros(0, 784), "0.bias": torch.zeros(0), "2.weight": torch.zeros(10, 0),
                "2.bias": torch.zeros(10)}, d / "sd.pt")
    return ["info", d / "sd.pt", "--arch", "mlp:784-0-10"]


def arch_huge_declared(d):
    torch.save({"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "2.weight": torch.zeros(3, 5),
                "2.bias": torch.zeros(3)}, d / "sd.pt")
    return ["info", d / "sd.pt", "--arch", "mlp:100000-100000-10"]


def _vnnlib(d, body: str, n=64) -> Path:
    decl = "\n".join(f"(declare-const X_{i} Real)" for i in range(n)) + "\n(declare-const Y_0 Real)\n"
    (d / "p.vnnlib").write_text(decl + body)
    return d / "p.vnnlib"


def _box(n=64, lo=0.25, hi=0.5) -> str:
    return "\n".join(f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))" for i in range(n))


def vnnlib_or_explosion(d, models):
    ors = " ".join("(or (<= X_0 0.5) (<= X_0 0.6))" for _ in range(30))
    return ["certify", models / "f.pt", models / "g.pt", "--vnnlib", _vnnlib(d, _box() + f"\n(assert (and {ors}))"),
            "-q"]


def vnnlib_deep_nesting(d, models):
    deep = "(and " * 5000 + "(<= X_0 0.5)" + ")" * 5000
    return ["certify", models / "f.pt", models / "g.pt", "--vnnlib", _vnnlib(d, _box() + f"\n(assert {deep})"), "-q"]


# --------------------------------------------------------------------------------------------- the table
MODEL_FILES = [onnx_cycle, onnx_zero_width, onnx_avgpool_without_kernel, onnx_huge_declared_initializer,
               onnx_string_initializer, onnx_complex_initializer, onnx_div_by_zero, onnx_negative_bn_variance,
               nnet_nan_header, nnet_inf_header, nnet_nan_sizes, nnet_fractional_size, nnet_zero_size,
               deep_metadata, deep_ops, complex_weights, inverted_domain, infinite_domain, arch_zero_width,
               arch_huge_declared]
EXPECT = {
    "onnx_cycle": r"cycle.onnx.*(cycle|loop)", "onnx_zero_width": r"zero.onnx.*(empty|zero|no neurons)",
    "onnx_avgpool_without_kernel": r"pool.onnx.*kernel_shape",
    "onnx_huge_declared_initializer": r"huge.onnx.*'W'.*100000", "onnx_string_initializer": r"str.onnx.*'W'.*STRING",
    "onnx_complex_initializer": r"cplx.onnx.*'W'.*COMPLEX", "onnx_div_by_zero": r"div0.onnx.*(divi|zero)",
    "onnx_negative_bn_variance": r"bn.onnx.*variance", "nnet_nan_header": r"bad.nnet.*header.*nan",
    "nnet_inf_header": r"bad.nnet.*header.*inf", "nnet_nan_sizes": r"bad.nnet.*layer sizes.*nan",
    "nnet_fractional_size": r"bad.nnet.*layer sizes.*2\.9", "nnet_zero_size": r"bad.nnet.*layer sizes.*0",
    "deep_metadata": r"deep.pt.*nest", "deep_ops": r"deepops.pt.*nest", "complex_weights": r"cplx.pt.*complex",
    "inverted_domain": r"inv.pt.*input \[0\] has \[1.0, 0.0\]", "infinite_domain": r"inf.pt.*input \[0\] has \[0.0, inf\]",
    "arch_zero_width": r"sd.pt.*mlp:784-0-10.*>= 1", "arch_huge_declared": r"sd.pt.*0.weight.*\(5, 4\)",
}


@pytest.mark.parametrize("make", MODEL_FILES, ids=lambda f: f.__name__)
def test_hostile_model_file_is_one_line_error(tmp_path, capsys, make):
    argv = make(tmp_path)
    before = _files(tmp_path)
    code, out, err = run_cli(capsys, argv)
    assert_error_line(code, err, EXPECT[make.__name__])
    assert _files(tmp_path) == before and out == ""


def _write_regular(d) -> Path:
    (d / "regfile").write_text("not a folder\n")
    return d / "regfile"


# each: (id, argv from (folder, models), expected fragment); the folder must hold nothing new afterwards
CLI_CASES = [
    ("vnnlib-or-explosion", vnnlib_or_explosion, r"p.vnnlib.*10000 boxes"),
    ("vnnlib-deep-nesting", vnnlib_deep_nesting, r"p.vnnlib.*nest"),
    ("milp-time-limit-nan", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain", "--method", "milp",
                                          "--time-limit", "nan", "-q"], r"time limit.*nan"),
    ("lp-time-limit-negative", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain", "--method",
                                             "lp", "--time-limit", "-1", "-q"], r"time limit.*-1"),
    ("seed-too-large", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain", "--seed", str(2**70),
                                     "-q"], r"--seed"),
    ("centre-range-huge", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--center", "digits:test:0-999999999",
                                        "--eps", "0.01", "-q"], r"digits:test:0-999999999.*(out of range|too many)"),
    ("norm-2-with-domain", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain", "--norm", "2",
                                         "-q"], r"--norm"),
    ("json-is-a-folder", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain",
                                       "--json", _mkdir(d / "outdir"), "-q"], r"outdir.*folder"),
    ("json-under-a-file", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain",
                                        "--json", _write_regular(d) / "o.json", "-q"], r"regfile.*not a folder"),
    ("export-onnx-under-a-file", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain",
                                               "--export-onnx", _write_regular(d) / "exp", "-q"],
     r"regfile.*not a folder"),
    ("export-then-bad-json", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--region", "domain", "--export-onnx",
                                           d / "exp", "--json", _write_regular(d) / "o.json", "-q"],
     r"regfile.*not a folder"),
    ("prune-out-is-a-folder", lambda d, m: ["prune", m / "f.pt", "--keep", "3", "--out", _mkdir(d / "outdir"), "-q"],
     r"outdir.*folder"),
    ("prune-epsilon-keeps-everything", lambda d, m: ["prune", m / "f.pt", "--epsilon", "1e-9", "--delta", "0.1",
                                                     "--out", d / "p.pt", "-q"], r"epsilon.*keep"),
    ("prune-epsilon-keeps-all-neurons", lambda d, m: ["prune", m / "f.pt", "--epsilon", "10", "--out", d / "p.pt",
                                                      "-q"], r"--epsilon 10 .*keeps every neuron.*layer 0: 8/8"),
    ("train-out-non-utf8", lambda d, m: ["train", "--data", "digits", "--epochs", "1",
                                         "--out", os.fsdecode(bytes(d) + b"/\xff\xfe.pt"), "-q"], r"UTF-8"),
    ("attack-out-under-a-file", lambda d, m: ["attack", m / "f.pt", m / "g.pt", "--center", "digits:test:0", "--eps",
                                              "0.05", "--out", _write_regular(d) / "cex", "-q"],
     r"regfile.*not a folder"),
    ("audit-eps-empty", lambda d, m: ["audit", m / "f.pt", m / "g.pt", "--data", "digits", "--eps", "",
                                      "--tolerance", "1", "--out", d / "audit", "-q"], r"--eps"),
    ("audit-save-pruned-under-a-file", lambda d, m: ["audit", m / "f.pt", "--keep", "3", "--data", "digits",
                                                     "--regions", "1", "--tolerance", "1", "--out", d / "audit",
                                                     "--save-pruned", _write_regular(d) / "x.pt", "-q"],
     r"regfile.*not a folder"),
    ("audit-out-non-utf8", lambda d, m: ["audit", m / "f.pt", m / "g.pt", "--data", "digits", "--regions", "1",
                                         "--tolerance", "1", "--out", os.fsdecode(bytes(d) + b"/\xff\xfe"), "-q"],
     r"UTF-8"),
    ("audit-bad-option-no-folder", lambda d, m: ["audit", m / "f.pt", m / "g.pt", "--data", "digits",
                                                 "--tolerance", "-1", "--out", d / "audit", "-q"], r"tolerance"),
    ("misspelt-option", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--tolerence", "1"],
     r"--tolerence.*--help"),
    ("bad-type", lambda d, m: ["certify", m / "f.pt", m / "g.pt", "--eps", "abc"], r"--eps.*--help"),
    ("missing-argument", lambda d, m: ["certify"], r"(?i)missing.*--help"),
]


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize("make,fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_hostile_command_line_is_one_line_error(tmp_path, capsys, models, make, fragment):
    argv = make(tmp_path, models)
    before = _files(tmp_path)
    code, out, err = run_cli(capsys, argv)
    assert_error_line(code, err, fragment)
    assert _files(tmp_path) == before, "files were left behind"
    assert out == ""


def test_stale_temp_files_of_killed_runs_are_swept(tmp_path):
    """A run killed between writing and renaming leaves `.NAME.PID.*.tmp`; the next write of NAME removes
    it when PID is gone, and leaves a live process's temp file alone."""
    from prunecert.fileutil import atomic_write_text

    dead, live = tmp_path / ".report.json.999999999.x1.tmp", tmp_path / f".report.json.{os.getpid()}.x2.tmp"
    other = tmp_path / ".other.json.999999999.x3.tmp"
    for p in (dead, live, other):
        p.write_text("partial")
    atomic_write_text(tmp_path / "report.json", "{}\n")
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json", live.name, other.name])


def test_warnings_before_an_error_are_dropped_and_kept_after_success(tmp_path, capsys, monkeypatch, models):
    """A numpy/torch warning on the way to an error must not push the error off its one line."""
    import warnings

    import prunecert.io
    from prunecert.errors import ModelFormatError

    real = prunecert.io.load_model

    def noisy(path, *args, **kwargs):
        warnings.warn("divide by zero encountered in divide", RuntimeWarning, stacklevel=1)
        if "bad" in str(path):
            raise ModelFormatError(f"{path}: broken")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prunecert.io, "load_model", noisy)
    code, _, err = run_cli(capsys, ["info", tmp_path / "bad.pt"])
    assert_error_line(code, err, r"bad.pt: broken")
    code, _, err = run_cli(capsys, ["info", models / "f.pt"])
    assert code == 0 and "divide by zero" in err


def test_export_of_a_killed_run_is_swept(tmp_path, capsys, models):
    stale = tmp_path / "exp" / ".export.999999999.abc.d"
    stale.mkdir(parents=True)
    (stale / "difference.onnx").write_bytes(b"partial")
    code, _, err = run_cli(capsys, ["certify", models / "f.pt", models / "g.pt", "--region", "domain",
                                      "--export-onnx", tmp_path / "exp", "-q"])
    assert code in (0, 1, 2), err
    assert not stale.exists() and (tmp_path / "exp" / "difference.onnx").is_file()
    assert not [p for p in (tmp_path / "exp").iterdir() if p.name.startswith(".")]
