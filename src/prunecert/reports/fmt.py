"""Number formatting shared by the HTML and Markdown renderers (so both show the same digits)."""

from __future__ import annotations

import math

DASH = "—"
TINY = 1e-300  # below this a bound is nothing but outward rounding (core.rounding.TINY is ~8.9e-308)


def num(x: float | int | None, digits: int = 4) -> str:
    """A deviation or bound: `digits` significant digits, "0" for exact zero, a dash for None."""
    if x is None:
        return DASH
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf" if x < 0 else "nan"
    if x == 0:
        return "0"  # also -0.0: a bound printed as "-0" reads like a sign error
    if abs(x) < TINY:
        return f"<{TINY:g}" if x > 0 else f">-{TINY:g}"  # only the rounding margin: not 8.9e-308
    return f"{x:.{digits}g}"


def ratio(x: float | None) -> str:
    return DASH if x is None else f"{num(x, 3)}×"


def pct(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{100.0 * x:.{digits}f}%"


def seconds(x: float) -> str:
    return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def kept(kept: int, total: int) -> str:
    return f"{kept:,}/{total:,}"
