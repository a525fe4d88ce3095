"""Outward rounding for float64 bound computations.

A sum of n floating-point products, in any order, differs from the exact real sum by at most
gamma_n * sum |terms|, with gamma_n = n u / (1 - n u) and u = 2^-53 (Higham, "Accuracy and Stability
of Numerical Algorithms", Lemma 3.1 / eq. 3.5). Every bound routine computes, beside its value, the
magnitude M = |W| (|c| + r) + |b| that dominates all intermediate terms, and widens its result by
gamma_{n+4} * M (n = fan-in; +4 covers the bias addition and the centre/radius combination) plus the
smallest normal number (underflow of products). `docs/theory.md` states the derivation.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = 2.0 ** -53
UNIT_ROUNDOFF_32 = 2.0 ** -24   # float32 (the conv transposes of `certify.layout` may run in it)
TINY = 2.2250738585072014e-308 * 4  # a few times the smallest normal float64: covers underflow


def gamma(n: int, unit: float = UNIT_ROUNDOFF) -> float:
    """Higham's gamma_n for float64 (or the format of unit roundoff `unit`); valid while n * u < 1."""
    nu = n * unit
    return nu / (1.0 - nu)


def margin(magnitude: torch.Tensor, fan_in: int, unit: float = UNIT_ROUNDOFF) -> torch.Tensor:
    """Absolute error bound of an affine op whose terms sum to at most `magnitude` in absolute value
    (computed in the format of unit roundoff `unit`; its underflow is the caller's to add)."""
    # one extra relative ulp so that computing the margin itself (a product) cannot round it down
    return magnitude * (gamma(fan_in + 4, unit) * (1.0 + 4 * UNIT_ROUNDOFF)) + TINY


_INF = {dt: torch.tensor(torch.inf, dtype=dt) for dt in (torch.float64, torch.float32)}


def up(x: torch.Tensor) -> torch.Tensor:
    """One ulp toward +inf: covers the rounding of the operation that produced `x`."""
    return torch.nextafter(x, _INF[x.dtype])


def widen(lower: torch.Tensor, upper: torch.Tensor, err: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract/add `err` and step one ulp outward, so the final subtraction's rounding is covered too."""
    lo = torch.nextafter(lower - err, torch.full_like(lower, -torch.inf))
    hi = torch.nextafter(upper + err, torch.full_like(upper, torch.inf))
    return lo, hi
