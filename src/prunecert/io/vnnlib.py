"""VNN-LIB: read the input box of a property; write deviation properties for the f - g network.

Only what prunecert needs: input constraints of the form `(assert (<= X_i c))` / `(assert (>= X_i c))`
(output constraints are ignored when reading), and a property whose *unsafe* region — VNN-LIB
asserts the region a verifier must prove empty — is |Y_k| > tau for output k of the difference network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from prunecert.errors import RegionError
from prunecert.fileutil import atomic_write_text

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOUND = re.compile(rf"\(\s*assert\s*\(\s*(<=|>=)\s+X_(\d+)\s+({_NUM})\s*\)\s*\)")
_BOUND_REV = re.compile(rf"\(\s*assert\s*\(\s*(<=|>=)\s+({_NUM})\s+X_(\d+)\s*\)\s*\)")


def read_vnnlib_box(path: str | os.PathLike, n_inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """The input box [lo, hi] (float64 arrays of length n_inputs) a VNN-LIB file asserts."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegionError(f"{path}: cannot read VNN-LIB file ({exc})") from exc
    text = re.sub(r";[^\n]*", "", text)  # comments
    lo = np.full(n_inputs, -np.inf)
    hi = np.full(n_inputs, np.inf)
    found = 0
    for op, idx, val in _BOUND.findall(text):
        found += _apply(path, lo, hi, op, int(idx), float(val), n_inputs)
    for op, val, idx in _BOUND_REV.findall(text):  # (<= c X_i) means X_i >= c
        found += _apply(path, lo, hi, ">=" if op == "<=" else "<=", int(idx), float(val), n_inputs)
    if not found:
        raise RegionError(f"{path}: no input constraints (assert (<= X_i c)) found")
    missing = np.flatnonzero(~np.isfinite(lo) | ~np.isfinite(hi))
    if missing.size:
        raise RegionError(f"{path}: input X_{missing[0]} is unbounded ({missing.size} inputs lack a lower or upper bound)")
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        raise RegionError(f"{path}: input X_{bad[0]} has lower bound {lo[bad[0]]} above upper bound {hi[bad[0]]}")
    return lo, hi


def _apply(path, lo, hi, op, idx, val, n) -> int:
    if idx >= n:
        raise RegionError(f"{path}: constraint on X_{idx}, but the network has only {n} inputs")
    if op == "<=":
        hi[idx] = min(hi[idx], val)
    else:
        lo[idx] = max(lo[idx], val)
    return 1


def write_deviation_property(path: str | os.PathLike, lo, hi, k: int, tau: float, n_outputs: int | None = None) -> None:
    """A VNN-LIB property for the difference network: inputs in [lo, hi], unsafe if |Y_k| > tau.

    VNN-LIB properties are non-strict, so the unsafe region written is Y_k >= tau or Y_k <= -tau;
    proving it empty shows |Y_k| < tau, which implies the certificate |Delta_k| <= tau. Pass
    `n_outputs` so every output Y_0..Y_{n-1} is declared, as verifiers expect.
    """
    lo, hi = np.asarray(lo, dtype=np.float64).ravel(), np.asarray(hi, dtype=np.float64).ravel()
    if tau <= 0:
        raise RegionError(f"tolerance tau must be > 0, got {tau}")
    lines = [f"; prunecert: |Delta_{k}| <= {tau!r} on an input box (difference network f - g)", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(lo.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(max(n_outputs or 0, k + 1))]
    lines.append("")
    for i, (a, b) in enumerate(zip(lo, hi)):
        lines.append(f"(assert (<= X_{i} {float(b)!r}))")
        lines.append(f"(assert (>= X_{i} {float(a)!r}))")
    lines += ["", f"(assert (or (and (>= Y_{k} {float(tau)!r})) (and (<= Y_{k} {float(-tau)!r}))))", ""]
    atomic_write_text(path, "\n".join(lines))
