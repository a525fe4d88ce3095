"""Input regions to certify over: a box (an L-inf ball clipped to the domain), an L2 ball, the domain.

Every region is a subset of the network's input domain, given in float64. Bound methods see its
`bounding_box()`; methods that handle L2 balls natively (linear bounds, LP) also get centre and
radius. Attacks use `project` (stay inside) and `sample` (starting points, refutation search).

Soundness: an L-inf ball [c - eps, c + eps] computed in float64 is rounded one ulp *outward*, so the
box we certify contains the real-number ball the user asked for, never less.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from prunecert.errors import RegionError
from prunecert.network import TensorLike

NORMS = ("inf", "2")
Array = npt.NDArray[np.float64]


def _array(value: TensorLike, name: str, shape: tuple[int, ...] | None = None, broadcast: bool = False) -> Array:
    """float64 copy of `value`, reshaped to `shape` when the sizes match (or a scalar broadcast to it,
    if `broadcast`); RegionError otherwise."""
    a = value.detach().cpu().numpy() if torch.is_tensor(value) else value
    try:
        a = np.array(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RegionError(f"{name}: not numeric ({exc})") from exc
    if shape is not None and a.shape != tuple(shape):
        if a.size == math.prod(shape):
            a = a.reshape(shape)
        elif a.size == 1 and broadcast:
            a = np.full(shape, float(a.reshape(-1)[0]))
        else:
            raise RegionError(f"{name}: shape {a.shape} ({a.size} values) does not match the input shape "
                              f"{tuple(shape)} ({math.prod(shape)} values)")
    if not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise RegionError(f"{name}: non-finite value {float(a[idx])!r} at index {list(idx)}")
    return a


def _first_violation(mask: npt.NDArray[np.bool_]) -> list[int]:
    return [int(i) for i in np.argwhere(mask)[0]]


def _check_inside(lo: Array, hi: Array, dlo: Array, dhi: Array, what: str,
                  point: bool = False) -> None:
    low, high = ("value", "value") if point else ("lower bound", "upper bound")
    if (lo < dlo).any():
        i = _first_violation(lo < dlo)
        raise RegionError(f"{what}: {low} {float(lo[tuple(i)])!r} at input {i} is below the domain's "
                          f"{float(dlo[tuple(i)])!r}; the region must lie inside the input domain (see --input-domain)")
    if (hi > dhi).any():
        i = _first_violation(hi > dhi)
        raise RegionError(f"{what}: {high} {float(hi[tuple(i)])!r} at input {i} is above the domain's "
                          f"{float(dhi[tuple(i)])!r}; the region must lie inside the input domain (see --input-domain)")


FLOAT32_SLACK = 2.0 ** -23  # float32's relative rounding step: box edges written by float32 tools


def snap_to_domain(lo: Array, hi: Array, dlo: Array, dhi: Array) -> tuple[Array, Array]:
    """Box edges outside the domain by no more than float32 rounding (FLOAT32_SLACK * max(1, |edge|)) are
    moved onto the domain's edge: a VNN-LIB bound 1.0000001 written from float32 means the domain's 1.0.
    Farther edges are left alone for `_check_inside` to refuse. (The box shrinks only by points outside
    the domain, where the network makes no claim, so certificates stay sound.)"""
    slack_lo = FLOAT32_SLACK * np.maximum(1.0, np.abs(dlo))
    slack_hi = FLOAT32_SLACK * np.maximum(1.0, np.abs(dhi))
    lo = np.where((lo < dlo) & (lo >= dlo - slack_lo), dlo, lo)
    hi = np.where((hi > dhi) & (hi <= dhi + slack_hi), dhi, hi)
    return lo, hi


def _flat(a: Array) -> list[float]:
    return [float(v) for v in a.reshape(-1)]


def _gen(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


class Region:
    """Base: a subset of the input box [domain_lo, domain_hi] (float64 arrays of the input shape)."""

    domain_lo: Array
    domain_hi: Array
    source: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.domain_lo.shape)

    @property
    def center(self) -> Array:  # pragma: no cover - overridden
        raise NotImplementedError

    def bounding_box(self) -> tuple[Array, Array]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _points(self, x: TensorLike) -> torch.Tensor:
        """`x` as a float64 batch (N, *shape); a single point gets a batch dim."""
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float64)
        if tuple(t.shape) == self.shape:
            return t.unsqueeze(0)
        if t.ndim >= 1 and math.prod(t.shape[1:]) == math.prod(self.shape):
            return t.reshape(t.shape[0], *self.shape)
        raise RegionError(f"point of shape {tuple(t.shape)} does not match the region's input shape {self.shape}")

    def contains(self, x: TensorLike, atol: float = 0.0) -> bool:
        """Whether every point of `x` (one point or a batch) lies in the region (up to `atol`)."""
        p = self._points(x)
        lo, hi = (torch.from_numpy(a) for a in self.bounding_box())
        return bool(((p >= lo - atol) & (p <= hi + atol)).all())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A point of the region for each point of the batch `x` (N, *shape); same dtype."""
        lo, hi = (torch.from_numpy(a).to(x.dtype) for a in self.bounding_box())
        return torch.maximum(torch.minimum(x, hi), lo)

    def sample(self, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """`n` float64 points of the region: a quarter on its boundary (box corners), the rest inside."""
        gen = _gen(generator)
        lo, hi = (torch.from_numpy(a) for a in self.bounding_box())
        n_corner = n // 4
        u = torch.rand((n, *self.shape), generator=gen, dtype=torch.float64)
        u = torch.cat([(u[:n_corner] < 0.5).to(torch.float64), u[n_corner:]])
        return torch.maximum(torch.minimum(lo + (hi - lo) * u, hi), lo)

    def describe(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _domain_description(self) -> dict[str, Any]:
        lo, hi = self.domain_lo, self.domain_hi
        return {"lower": float(lo.min()), "upper": float(hi.max()),
                "uniform": bool(lo.min() == lo.max() and hi.min() == hi.max())}

    def __repr__(self) -> str:
        d = self.describe()
        extra = f", eps={d['eps']:g}" if "eps" in d else ""
        return f"{type(self).__name__}(shape={self.shape}{extra}{', source=' + repr(self.source) if self.source else ''})"


def _domain_arrays(shape: tuple[int, ...], domain_lo: TensorLike, domain_hi: TensorLike) -> tuple[Array, Array]:
    dlo = _array(domain_lo, "domain lower bound", shape, broadcast=True)
    dhi = _array(domain_hi, "domain upper bound", shape, broadcast=True)
    if (dlo > dhi).any():
        i = _first_violation(dlo > dhi)
        raise RegionError(f"domain: lower {float(dlo[tuple(i)])!r} > upper {float(dhi[tuple(i)])!r} at input {i}")
    return dlo, dhi


def _target_shape(domain_lo: TensorLike | None) -> tuple[int, ...] | None:
    """The input shape implied by an array-valued domain bound (None for a scalar)."""
    if domain_lo is None:
        return None
    a = domain_lo.detach().cpu().numpy() if torch.is_tensor(domain_lo) else np.asarray(domain_lo)
    return tuple(a.shape) if a.ndim else None


def _centre(center: TensorLike, domain_lo: TensorLike, domain_hi: TensorLike, source: str | None
            ) -> tuple[Array, Array, Array]:
    what = f"centre {source}" if source else "centre"
    c = _array(center, what, _target_shape(domain_lo))
    dlo, dhi = _domain_arrays(c.shape, domain_lo, domain_hi)
    _check_inside(c, c, dlo, dhi, what, point=True)
    return c, dlo, dhi


class Box(Region):
    """The box [lo, hi] inside the domain (default: the box is its own domain).

    Built by `Box.around(center, eps, domain_lo, domain_hi)` it is the L-inf ball clipped to the
    domain, and remembers `eps` and the centre.
    """

    def __init__(self, lo: TensorLike, hi: TensorLike, domain_lo: TensorLike | None = None,
                 domain_hi: TensorLike | None = None, *, eps: float | None = None, center: TensorLike | None = None,
                 source: str | None = None):
        self.source = source
        name = f"box {source}" if source else "box"
        self.lo = _array(lo, f"{name} lower bound", _target_shape(domain_lo))
        self.hi = _array(hi, f"{name} upper bound", self.lo.shape)
        if (self.lo > self.hi).any():
            i = _first_violation(self.lo > self.hi)
            raise RegionError(f"{name}: lower {float(self.lo[tuple(i)])!r} > upper {float(self.hi[tuple(i)])!r} at input {i}")
        self.domain_lo, self.domain_hi = _domain_arrays(
            self.lo.shape, self.lo if domain_lo is None else domain_lo, self.hi if domain_hi is None else domain_hi)
        lo, hi = snap_to_domain(self.lo, self.hi, self.domain_lo, self.domain_hi)
        # a box just outside the domain (within the slack) snaps to lo > hi: check the unsnapped side
        _check_inside(np.where(lo > hi, self.lo, lo), np.where(lo > hi, self.hi, hi), self.domain_lo,
                      self.domain_hi, name)
        self.lo, self.hi = lo, hi
        self.eps = eps
        self._center = None if center is None else _array(center, f"{name} centre", self.lo.shape)

    @classmethod
    def around(cls, center: TensorLike, eps: float, domain_lo: TensorLike, domain_hi: TensorLike,
               source: str | None = None) -> "Box":
        """The L-inf ball of radius `eps` around `center`, intersected with the domain box."""
        eps = _check_radius(eps, "eps")
        c, dlo, dhi = _centre(center, domain_lo, domain_hi, source)
        lo = np.maximum(np.nextafter(c - eps, -np.inf), dlo)
        hi = np.minimum(np.nextafter(c + eps, np.inf), dhi)
        return cls(lo, hi, dlo, dhi, eps=eps, center=c, source=source)

    @property
    def center(self) -> Array:
        return self._center if self._center is not None else (self.lo + self.hi) / 2

    def bounding_box(self) -> tuple[Array, Array]:
        return self.lo.copy(), self.hi.copy()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "box", "shape": list(self.shape), "domain": self._domain_description()}
        if self.source:
            d["source"] = self.source
        if self.eps is not None:
            d.update(kind="linf_ball", norm="inf", eps=float(self.eps), center=_flat(self.center))
        else:
            d.update(lower=_flat(self.lo), upper=_flat(self.hi))
        return d


class L2Ball(Region):
    """{x : ||x - center||_2 <= radius} intersected with the domain box."""

    def __init__(self, center: TensorLike, radius: float, domain_lo: TensorLike, domain_hi: TensorLike, *,
                 source: str | None = None):
        self.source = source
        self.radius = _check_radius(radius, "radius")
        self._center, self.domain_lo, self.domain_hi = _centre(center, domain_lo, domain_hi, source)

    @property
    def center(self) -> Array:
        return self._center

    def bounding_box(self) -> tuple[Array, Array]:
        c, r = self._center, self.radius
        return (np.maximum(np.nextafter(c - r, -np.inf), self.domain_lo),
                np.minimum(np.nextafter(c + r, np.inf), self.domain_hi))

    def contains(self, x: TensorLike, atol: float = 0.0) -> bool:
        p = self._points(x)
        dist = (p - torch.from_numpy(self._center)).reshape(p.shape[0], -1).norm(dim=1)
        return bool((dist <= self.radius + atol).all()) and super().contains(p, atol)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Onto the ball, then clipped to the domain: feasible (clipping moves no coordinate away from
        the centre, which lies in the domain), though not always the nearest point of the intersection.
        Points are pulled in by a relative 2^-20 so that, after rounding, `contains` holds for them."""
        c = torch.from_numpy(self._center).to(x.dtype)
        y = x
        for _ in range(4):  # c + d is rounded: re-measure and shrink until the computed norm fits
            d = y - c
            norm = d.reshape(d.shape[0], -1).norm(dim=1)
            if not (norm > self.radius).any():
                break
            factor = self.radius * (1 - 2.0 ** -20) / norm.clamp_min(torch.finfo(x.dtype).tiny)
            view = (-1, *([1] * (d.ndim - 1)))
            y = torch.where((norm > self.radius).view(view), c + d * factor.view(view), y)
        else:
            outside = (y - c).reshape(y.shape[0], -1).norm(dim=1) > self.radius
            y = torch.where(outside.view(-1, *([1] * (y.ndim - 1))), c.expand_as(y), y)
        lo, hi = torch.from_numpy(self.domain_lo).to(x.dtype), torch.from_numpy(self.domain_hi).to(x.dtype)
        return torch.maximum(torch.minimum(y, hi), lo)

    def sample(self, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """Uniform in the ball (a quarter on the sphere), then clipped to the domain."""
        gen = _gen(generator)
        d = math.prod(self.shape)
        direction = torch.randn((n, d), generator=gen, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
        rad = torch.rand(n, generator=gen, dtype=torch.float64) ** (1.0 / d)
        rad[: n // 4] = 1.0
        offset = (direction * rad.unsqueeze(1)).reshape(n, *self.shape) * self.radius
        return self.project(torch.from_numpy(self._center) + offset)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "l2_ball", "norm": "2", "shape": list(self.shape), "eps": float(self.radius),
             "center": _flat(self._center), "domain": self._domain_description()}
        if self.source:
            d["source"] = self.source
        return d


class Domain(Region):
    """The whole input box: the paper's data-independent setting."""

    def __init__(self, lo: TensorLike, hi: TensorLike):
        self.source = "domain"
        lo_a = _array(lo, "domain lower bound")
        self.domain_lo, self.domain_hi = _domain_arrays(lo_a.shape, lo_a, hi)

    @property
    def center(self) -> Array:
        return (self.domain_lo + self.domain_hi) / 2

    def bounding_box(self) -> tuple[Array, Array]:
        return self.domain_lo.copy(), self.domain_hi.copy()

    def describe(self) -> dict[str, Any]:
        return {"kind": "domain", "shape": list(self.shape), "domain": self._domain_description()}


def _check_radius(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise RegionError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v) or v < 0:
        raise RegionError(f"{name} must be a finite number >= 0, got {value!r}")
    return v
