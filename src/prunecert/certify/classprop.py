"""Class properties: top-1 agreement and delta-top-1 equivalence, as one family with a margin m.

    P(m): for every class c and every x in X with f_c(x) - f_j(x) > m for all j != c,
          g_c(x) >= g_j(x) for all j != c.

- m = 0 is top-1 agreement: wherever f strictly prefers c, g prefers c too (ties -- a set of
  measure zero -- are claimed by neither side, so identical networks agree and a counterexample is
  a point where f strictly prefers c and g strictly prefers another class);
- m = log(delta / (1 - delta)) is delta-top-1 equivalence (VeryDiff): softmax_c(f) > delta implies
  f_c - f_j > log(delta / (1 - delta)) for every j != c (docs/theory.md, "Class properties").

On a (sub-)region with sound bounds, class c is *settled* when its side condition cannot hold
(some j: upper(f_c - f_j) <= m), or g provably keeps c wherever it holds (every j: lower(g_c - g_j) >= 0,
from g's own margins, or from g_c - g_j = (f_c - f_j) - (Delta_c - Delta_j) >= m - upper(Delta_c - Delta_j)).
A counterexample is an input where f's side condition holds for some c and g strictly prefers another class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from prunecert.certify.result import PairBounds
from prunecert.core.pair import Pair
from prunecert.errors import ConfigError


@dataclass(frozen=True)
class ClassProperty:
    """P(m): `name` is "agreement" (m = 0) or "delta-top-1" (m = log(delta / (1 - delta)))."""

    name: str
    margin: float
    delta: float | None = None

    @staticmethod
    def agreement() -> ClassProperty:
        return ClassProperty("agreement", 0.0)

    @staticmethod
    def delta_top1(delta: float) -> ClassProperty:
        d = float(delta)
        if not (0.5 <= d < 1.0) or not math.isfinite(d):
            raise ConfigError(f"delta (softmax confidence) must be in [0.5, 1), got {delta!r}")
        return ClassProperty("delta-top-1", math.log(d / (1.0 - d)), d)


def _rows(b: torch.Tensor, n: int) -> torch.Tensor:
    return b.reshape(n, -1)


def open_classes(bounds: PairBounds, prop: ClassProperty) -> torch.Tensor:
    """(B, C) bool: classes not settled on each region of `bounds` (see the module docstring)."""
    n = bounds.batch
    f_lo, f_hi = _rows(bounds.f[-1].lower, n), _rows(bounds.f[-1].upper, n)
    g_lo, g_hi = _rows(bounds.g[-1].lower, n), _rows(bounds.g[-1].upper, n)
    d_lo, d_hi = _rows(bounds.delta[-1].lower, n), _rows(bounds.delta[-1].upper, n)
    c = f_lo.shape[1]
    eye = torch.eye(c, dtype=torch.bool).expand(n, c, c)
    both = bounds.agreement_margins()                       # [b, c, j] <= min(f_c - f_j, g_c - g_j)
    # upper(f_c - f_j): interval, and -lower(f_j - f_c) from the margins
    f_up = torch.minimum(f_hi[:, :, None] - f_lo[:, None, :], -both.transpose(1, 2))
    side_empty = ((f_up <= prop.margin) & ~eye).any(dim=2)
    # lower(g_c - g_j) on the side set: g's interval margins, the pair margins, m - upper(Delta_c - Delta_j)
    g_low = torch.maximum(g_lo[:, :, None] - g_hi[:, None, :], both)
    g_low = torch.maximum(g_low, prop.margin - (d_hi[:, :, None] - d_lo[:, None, :]))
    g_keeps = ((g_low >= 0) | eye).all(dim=2)
    return ~(side_empty | g_keeps)


def violations(pair: Pair, x: torch.Tensor, prop: ClassProperty) -> torch.Tensor:
    """(N,) bool: at which inputs the property fails (f's side condition holds for its argmax c and
    g strictly prefers another class), by a float64 forward pass of both networks."""
    with torch.no_grad():
        yf = pair.f.forward(x).reshape(len(x), -1)
        yg = pair.g.forward(x).reshape(len(x), -1)
    cf = yf.argmax(1)
    top = yf.gather(1, cf[:, None])
    others = torch.where(torch.nn.functional.one_hot(cf, yf.shape[1]).bool(), torch.inf, top - yf)
    confident = others.min(1).values > prop.margin
    return confident & (yg.max(1).values > yg.gather(1, cf[:, None])[:, 0])


def replay(pair: Pair, x: np.ndarray, prop: ClassProperty) -> tuple[int, int] | None:
    """(class of f, class of g) when x refutes the property, else None."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape)
    if not bool(violations(pair, t, prop)[0]):
        return None
    with torch.no_grad():
        return int(pair.f.forward(t).argmax()), int(pair.g.forward(t).argmax())


def nudge(pair: Pair, x: np.ndarray, c: int, prop: ClassProperty, lo: np.ndarray, hi: np.ndarray
          ) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A refuting input near x, which sits on the closure of f's side condition for class c (an LP or
    solver optimum often lies exactly on it, where f does not *strictly* meet it): small signed
    gradient steps that raise f's smallest margin min_j f_c - f_j, each clipped into the box and
    replayed. None if none refutes."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape).clone().requires_grad_(True)
    yf = pair.f.forward(t).reshape(-1)
    others = torch.cat([yf[:c], yf[c + 1:]])
    (grad,) = torch.autograd.grad((yf[c] - others).min(), t)
    step = np.sign(grad.numpy().reshape(np.shape(x))) * (np.asarray(hi) - np.asarray(lo))
    for size in (1e-9, 1e-7, 1e-5, 1e-3, 1e-2):
        y = np.clip(np.asarray(x) + size * step, lo, hi)
        classes = replay(pair, y, prop)
        if classes is not None:
            return y, classes
    return None


@dataclass
class Settled:
    """The verdict on one region: "proved", "refuted" (point, classes) or "unknown"."""

    verdict: str
    stage: str                                   # "bounds", "search", "input-bab", "relu-bab", "time"
    point: np.ndarray | None = None
    class_f: int | None = None
    class_g: int | None = None
    seconds: float = 0.0
    details: dict[str, float | int | None] = field(default_factory=dict)  # nodes, open leaves / classes, volume left
