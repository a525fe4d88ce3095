"""VNN-LIB: read the input box(es) of a property; write deviation properties for the f - g network.

Reading parses the file as s-expressions (not line patterns), so `(assert (<= X_i c))`,
`(assert (and (>= X_i a) (<= X_i b) ...))` and the disjunctive form VNN-COMP uses for several input
boxes, `(assert (or (and ...X...) (and ...X...)))`, are all understood. Constraints that mention
only outputs Y_j are ignored (prunecert asks its own question about the outputs); a constraint that
is not a bound on one input by a constant (X_0 <= X_1, X_0 <= Y_0) makes the region not a box and is
refused. Strict `<`/`>` are read as `<=`/`>=`: the closed box contains the open one, so certificates
over it remain sound.

Writing: VNN-LIB asserts the *unsafe* region (a verifier proves it empty, "unsat" = holds). For the
difference network's output k and a certified tolerance tau the unsafe region is |Y_k| >= tau.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TypeAlias, cast

import numpy as np
import numpy.typing as npt

from prunecert.errors import RegionError
from prunecert.fileutil import atomic_write_text

MAX_BOXES = 10_000   # input boxes a file may describe (after expanding and/or), at every step of the expansion
MAX_DEPTH = 100      # nesting of parentheses: real properties use 3 or 4 levels
MAX_BYTES = 256 * 2**20  # file size: a 784-input box is ~75 kB; VNN-COMP's largest properties are a few MB
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"([XY])_(\d+)\Z")
_FLIP = {"<=": ">=", ">=": "<=", "<": ">", ">": "<", "=": "="}
_CLOSED = {"<": "<=", ">": ">=", "<=": "<=", ">=": ">=", "=": "="}
Bound = tuple[int, str, float]  # (input index, "<=" / ">=" / "=", constant)
Expr: TypeAlias = str | list["Expr"]  # an s-expression: a token or a parenthesised list
Box = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def read_vnnlib_box(path: str | os.PathLike[str], n_inputs: int) -> Box:
    """The input box [lo, hi] (float64 arrays of length n_inputs) a VNN-LIB file asserts."""
    boxes = read_vnnlib_boxes(path, n_inputs)
    if len(boxes) != 1:
        raise RegionError(f"{path}: the input region is a union of {len(boxes)} boxes, not one box "
                          "(use read_vnnlib_boxes)")
    return boxes[0]


def read_vnnlib_boxes(path: str | os.PathLike[str], n_inputs: int) -> list[Box]:
    """Every input box of a VNN-LIB file (one unless its input constraints contain an `or`)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise RegionError(f"{path}: VNN-LIB file of {path.stat().st_size:,} bytes is larger than the limit "
                              f"({MAX_BYTES:,})")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegionError(f"{path}: cannot read VNN-LIB file ({exc})") from exc
    alternatives: list[list[Bound]] = [[]]  # disjunctive normal form of the input constraints
    for expr in _parse(text, path):
        if not isinstance(expr, list) or not expr:
            raise RegionError(f"{path}: unexpected top-level item {_show(expr)}")
        if expr[0] == "declare-const":
            _check_declaration(expr, path, n_inputs)
        elif expr[0] == "assert":
            if len(expr) != 2:
                raise RegionError(f"{path}: malformed assert {_show(expr)}")
            dnf = _dnf(expr[1], path, n_inputs)
            if dnf is not None:
                alternatives = _product(alternatives, dnf, path)
    if alternatives == [[]]:
        raise RegionError(f"{path}: no input constraints (assert (<= X_i c)) found")
    return [_box(bounds, path, n_inputs) for bounds in alternatives]


def _too_many(path: Path) -> RegionError:
    return RegionError(f"{path}: the input region has more than {MAX_BOXES} boxes (the limit of "
                       "prunecert.io.vnnlib.MAX_BOXES)")


def _product(left: list[list[Bound]], right: list[list[Bound]], path: Path) -> list[list[Bound]]:
    """The conjunction of two disjunctions (every pair of alternatives), refused before it grows too big."""
    if len(left) * len(right) > MAX_BOXES:
        raise _too_many(path)
    return [a + b for a in left for b in right]


# ---------------------------------------------------------------------------------------------- parsing
def _parse(text: str, path: Path) -> list[Expr]:
    text = re.sub(r";[^\n]*", "", text)  # comments
    stack: list[list[Expr]] = [[]]
    for tok in _TOKEN.findall(text):
        if tok == "(":
            if len(stack) > MAX_DEPTH:
                raise RegionError(f"{path}: VNN-LIB expressions nested deeper than {MAX_DEPTH} levels")
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise RegionError(f"{path}: malformed VNN-LIB: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise RegionError(f"{path}: malformed VNN-LIB: {len(stack) - 1} unclosed '(' (truncated file?)")
    return stack[0]


def _show(expr: Expr) -> str:
    s = expr if isinstance(expr, str) else "(" + " ".join(_show(e) for e in expr) + ")"
    return s if len(s) <= 80 else s[:77] + "..."


def _check_declaration(expr: list[Expr], path: Path, n_inputs: int) -> None:
    if len(expr) != 3 or not isinstance(expr[1], str):
        raise RegionError(f"{path}: malformed declaration {_show(expr)}")
    m = _VAR.match(expr[1])
    if m and m.group(1) == "X" and int(m.group(2)) >= n_inputs:
        raise RegionError(f"{path}: declares {expr[1]}, but the network has only {n_inputs} inputs")


def _number(expr: Expr) -> float | None:
    """A numeric literal: `0.5`, `-0.5`, `(- 0.5)`, or None when `expr` is not one."""
    if isinstance(expr, list):
        if len(expr) == 2 and expr[0] == "-":
            v = _number(expr[1])
            return None if v is None else -v
        return None
    try:
        v = float(expr)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _variables(expr: Expr) -> set[str]:
    if isinstance(expr, str):
        return {expr} if _VAR.match(expr) else set()
    return set().union(*(_variables(e) for e in expr)) if expr else set()


def _dnf(expr: Expr, path: Path, n_inputs: int) -> list[list[Bound]] | None:
    """Input constraints of one assertion as a disjunction of conjunctions; None if it has none."""
    if not any(v.startswith("X_") for v in _variables(expr)):
        return None  # output-only: not our concern
    if not isinstance(expr, list) or not expr:
        raise RegionError(f"{path}: cannot read constraint {_show(expr)}")
    head = expr[0]
    if head == "and":
        out: list[list[Bound]] = [[]]
        for part in expr[1:]:
            sub = _dnf(part, path, n_inputs)
            if sub is not None:
                out = _product(out, sub, path)
        return out
    if head == "or":
        out = []
        for part in expr[1:]:
            sub = _dnf(part, path, n_inputs)
            if sub is None:
                raise RegionError(f"{path}: an `or` with a branch that does not bound the inputs leaves them "
                                  f"unbounded: {_show(expr)}")
            out += sub
            if len(out) > MAX_BOXES:
                raise _too_many(path)
        return out
    if isinstance(head, str) and head in _FLIP and len(expr) == 3:
        return [[_bound(expr, path, n_inputs)]]
    raise RegionError(f"{path}: unsupported input constraint {_show(expr)} (expected <=, >=, =, and, or)")


def _bound(expr: list[Expr], path: Path, n_inputs: int) -> Bound:
    head, a, b = expr
    op = cast(str, head)  # _dnf checked: the head is a comparison of _FLIP
    for var, const, rel in ((a, b, op), (b, a, _FLIP[op])):
        m = _VAR.match(var) if isinstance(var, str) else None
        value = _number(const)
        if m and m.group(1) == "X" and value is not None:
            idx = int(m.group(2))
            if idx >= n_inputs:
                raise RegionError(f"{path}: constraint on {var}, but the network has only {n_inputs} inputs")
            return idx, _CLOSED[rel], value
    raise RegionError(f"{path}: {_show(expr)} is not a bound of one input by a constant (not a box)")


def _box(bounds: list[Bound], path: Path, n: int) -> Box:
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    for idx, rel, value in bounds:
        if rel in ("<=", "="):
            hi[idx] = min(hi[idx], value)
        if rel in (">=", "="):
            lo[idx] = max(lo[idx], value)
    missing = np.flatnonzero(~np.isfinite(lo) | ~np.isfinite(hi))
    if missing.size:
        i = int(missing[0])
        side = "lower" if not np.isfinite(lo[i]) else "upper"
        raise RegionError(f"{path}: input X_{i} has no {side} bound ({missing.size} inputs are unbounded)")
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        i = int(bad[0])
        raise RegionError(f"{path}: input X_{i} has lower bound {lo[i]} above upper bound {hi[i]}")
    return lo, hi


# ---------------------------------------------------------------------------------------------- writing
def write_deviation_property(path: str | os.PathLike[str], lo: npt.ArrayLike, hi: npt.ArrayLike, k: int, tau: float,
                             n_outputs: int | None = None) -> None:
    """A VNN-LIB property for the difference network: inputs in [lo, hi], unsafe if |Y_k| >= tau.

    VNN-LIB comparisons are non-strict, so the unsafe region written is Y_k >= tau or Y_k <= -tau;
    proving it empty shows |Y_k| < tau, which implies the certificate |Delta_k| <= tau. Pass
    `n_outputs` so every output Y_0..Y_{n-1} is declared, as verifiers expect. Atomic.
    """
    lo, hi = np.asarray(lo, dtype=np.float64).ravel(), np.asarray(hi, dtype=np.float64).ravel()
    if lo.shape != hi.shape or lo.size == 0:
        raise RegionError(f"{path}: lower bounds ({lo.size}) and upper bounds ({hi.size}) must be non-empty and "
                          "of equal length")
    bad = np.flatnonzero(~np.isfinite(lo) | ~np.isfinite(hi) | (lo > hi))
    if bad.size:
        i = int(bad[0])
        raise RegionError(f"{path}: input X_{i} has an invalid interval [{lo[i]}, {hi[i]}]")
    if not (math.isfinite(tau) and tau > 0):
        raise RegionError(f"{path}: tolerance tau must be finite and > 0, got {tau}")
    n_out = max(n_outputs or 0, k + 1)
    if k < 0 or (n_outputs is not None and k >= n_outputs):
        raise RegionError(f"{path}: output index {k} is out of range for {n_outputs} outputs")
    lines = [f"; prunecert: |Delta_{k}| <= {tau!r} on an input box (difference network f - g)", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(lo.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    lines.append("")
    for i, (a, b) in enumerate(zip(lo, hi)):
        lines.append(f"(assert (<= X_{i} {float(b)!r}))")
        lines.append(f"(assert (>= X_{i} {float(a)!r}))")
    lines += ["", f"(assert (or (and (>= Y_{k} {float(tau)!r})) (and (<= Y_{k} {float(-tau)!r}))))", ""]
    atomic_write_text(path, "\n".join(lines))
