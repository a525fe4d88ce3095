"""VNN-LIB: input boxes in every form VNN-COMP writes them; deviation properties that say |Y_k| >= tau is unsafe."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunecert.errors import RegionError
from prunecert.io.vnnlib import _parse, read_vnnlib_box, read_vnnlib_boxes, write_deviation_property

DECL = "\n".join([f"(declare-const X_{i} Real)" for i in range(3)] + ["(declare-const Y_0 Real)"]) + "\n"


def _write(tmp_path, body: str, name="p.vnnlib") -> Path:
    (tmp_path / name).write_text(DECL + body)
    return tmp_path / name


@pytest.mark.parametrize("eps", [0.03, 0.05])
def test_vnncomp_fixtures_are_boxes_of_width_2eps(eps, vnncomp):
    folder = vnncomp[0]
    lo, hi = read_vnnlib_box(folder / f"prop_{0 if eps == 0.03 else 1}_{eps}.vnnlib", 784)
    assert lo.shape == hi.shape == (784,)
    assert np.all(lo >= 0) and np.all(hi <= 1) and np.all(lo <= hi)
    assert np.all(hi - lo <= 2 * eps + 1e-7) and (hi - lo).max() > eps  # float32-rounded eps in the file
    with pytest.raises(RegionError, match="declares X_10, but the network has only 10 inputs"):
        read_vnnlib_box(folder / "prop_0_0.03.vnnlib", 10)


def test_conjunctions_negatives_strict_equal_and_reversed_comparisons(tmp_path):
    body = """
    ; inputs in one and-block, with SMT-LIB negative literals and the constant on the left
    (assert (and (>= X_0 (- 0.5)) (<= X_0 -0.25) (< 0.1 X_1) (> 0.2 X_1)))
    (assert (= X_2 0.75))
    (assert (and (<= X_0 0.0) (>= X_0 -1.0)))   ; looser bounds do not widen the box
    (assert (or (and (>= Y_0 1.0)) (and (<= Y_0 -1.0))))
    """
    lo, hi = read_vnnlib_box(_write(tmp_path, body), 3)
    np.testing.assert_array_equal(lo, [-0.5, 0.1, 0.75])
    np.testing.assert_array_equal(hi, [-0.25, 0.2, 0.75])


def test_disjunction_of_input_boxes(tmp_path):
    body = """
    (assert (<= X_2 1.0))
    (assert (>= X_2 0.0))
    (assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (>= Y_0 3))
                (and (>= X_0 2) (<= X_0 3) (>= X_1 -1) (<= X_1 0) (<= Y_0 X_2))))
    """
    path = _write(tmp_path, body.replace("(<= Y_0 X_2)", "(<= Y_0 1)"))
    boxes = read_vnnlib_boxes(path, 3)
    assert len(boxes) == 2
    np.testing.assert_array_equal(boxes[0][0], [0, 0, 0])
    np.testing.assert_array_equal(boxes[1][1], [3, 0, 1])
    with pytest.raises(RegionError, match="union of 2 boxes"):
        read_vnnlib_box(path, 3)
    with pytest.raises(RegionError, match=r"\(<= Y_0 X_2\) is not a bound of one input by a constant"):
        read_vnnlib_boxes(_write(tmp_path, body, "mixed.vnnlib"), 3)


BOX = "(assert (>= X_0 0))(assert (<= X_0 1))(assert (>= X_1 0))(assert (<= X_1 1))(assert (>= X_2 0))(assert (<= X_2 1))"


@pytest.mark.parametrize("body,match", [
    (BOX.replace("(assert (>= X_1 0))", ""), "input X_1 has no lower bound"),
    (BOX.replace("(assert (<= X_2 1))", "(assert (<= X_2 nan))"), "X_2 nan.*not a bound"),
    (BOX + "(assert (<= X_0 X_1))", r"\(<= X_0 X_1\) is not a bound"),
    (BOX + "(assert (<= X_7 1))", "X_7, but the network has only 3 inputs"),
    (BOX + "(assert (>= X_0 2))", "X_0 has lower bound 2.0 above upper bound 1.0"),
    (BOX + "(assert (or (>= X_0 0.5) (>= Y_0 0)))", "leaves them unbounded"),
    (BOX + "(assert (not (>= X_0 0.5)))", "unsupported input constraint"),
    (BOX + "(assert ((<= X_0 1)))", "unsupported input constraint"),  # a list where the operator goes
    (BOX + "(assert (<= X_0 1)", "1 unclosed '\\(' \\(truncated file\\?\\)"),
    (BOX + "))", "unbalanced"),
    ("(assert (>= Y_0 0))", "no input constraints"),
])
def test_malformed_or_non_box_files_name_file_and_variable(tmp_path, body, match):
    path = _write(tmp_path, body, "bad.vnnlib")
    with pytest.raises(RegionError, match=f"bad.vnnlib: .*{match}"):
        read_vnnlib_box(path, 3)


def test_unreadable_file(tmp_path):
    (tmp_path / "bin.vnnlib").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RegionError, match="bin.vnnlib: cannot read"):
        read_vnnlib_box(tmp_path / "bin.vnnlib", 3)
    with pytest.raises(RegionError, match="missing.vnnlib: cannot read"):
        read_vnnlib_box(tmp_path / "missing.vnnlib", 3)


def test_deviation_property_asserts_the_unsafe_region(tmp_path):
    write_deviation_property(tmp_path / "d.vnnlib", [0.0, 0.25], [0.5, 1.0], 2, 0.125, n_outputs=4)
    exprs = _parse((tmp_path / "d.vnnlib").read_text(), "d")
    declared = [e[1] for e in exprs if e[0] == "declare-const"]
    assert declared == ["X_0", "X_1", "Y_0", "Y_1", "Y_2", "Y_3"]
    (output,) = [e[1] for e in exprs if e[0] == "assert" and "Y_2" in str(e)]
    # the asserted (unsafe) region: Y_2 >= tau or Y_2 <= -tau; a verifier proving it empty proves |Y_2| < tau
    assert output == ["or", ["and", [">=", "Y_2", "0.125"]], ["and", ["<=", "Y_2", "-0.125"]]]
    lo, hi = read_vnnlib_box(tmp_path / "d.vnnlib", 2)
    np.testing.assert_array_equal(lo, [0.0, 0.25])
    np.testing.assert_array_equal(hi, [0.5, 1.0])


@pytest.mark.parametrize("args,match", [
    (([0.0], [1.0], 0, 0.0), "tau must be finite and > 0"),
    (([0.0], [1.0], 0, float("nan")), "tau must be finite"),
    (([0.0], [1.0], 3, 0.1, 3), "output index 3 is out of range for 3 outputs"),
    (([0.0, 2.0], [1.0, 1.0], 0, 0.1), r"X_1 has an invalid interval \[2.0, 1.0\]"),
    (([0.0], [1.0, 2.0], 0, 0.1), "equal length"),
])
def test_deviation_property_refuses_bad_arguments(tmp_path, args, match):
    with pytest.raises(RegionError, match=match):
        write_deviation_property(tmp_path / "x.vnnlib", *args)
    assert not (tmp_path / "x.vnnlib").exists()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), tau=st.floats(1e-12, 1e6))
def test_written_box_reads_back_exactly_property(tmp_path_factory, seed, n, tau):
    rng = np.random.default_rng(seed)
    lo = rng.normal(size=n) * 10.0 ** rng.integers(-8, 8, n)
    hi = lo + rng.random(n) * 10.0 ** rng.integers(-8, 3, n)
    path = tmp_path_factory.mktemp("v") / "p.vnnlib"
    write_deviation_property(path, lo, hi, 0, tau)
    lo2, hi2 = read_vnnlib_box(path, n)
    np.testing.assert_array_equal(lo2, lo)
    np.testing.assert_array_equal(hi2, hi)
