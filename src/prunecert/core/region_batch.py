"""The regions a bound method works on: one batch object, built and checked once, carried to concretisation.

`core.regions` describes one region as the user gave it (Box, L2Ball, Domain: each checks itself).
A bound method sees B of them at once, as a `RegionBatch`: float64 boxes lo <= hi of shape
(B, *input_shape) -- each region's bounding box -- and, when every region is an L2 ball, the balls'
centres and radii (the region is then box intersected with ball). The batch checks those invariants
in its constructor; nothing downstream checks them again. certify builds one per chunk of regions
(`RegionBatch.of_regions`); a caller holding raw boxes builds one with `RegionBatch.of_boxes`, which
is also what `boxes_or_batch` does for the methods called as `method(pair, lo, hi, l2=...)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import torch

from prunecert.core.interval import Bounds, centre_radius
from prunecert.core.pair import Pair
from prunecert.core.regions import L2Ball, Region
from prunecert.errors import RegionError
from prunecert.network import TensorLike

L2 = tuple[torch.Tensor, torch.Tensor]   # centres (B, *input_shape), radii (B,)


@dataclass(frozen=True, eq=False)
class RegionBatch:
    """B regions: boxes [lo, hi] (float64, (B, *input_shape)), each intersected with an L2 ball when
    `l2` = (centres, radii) is given. Checked here: shapes, finiteness, lo <= hi, radii >= 0."""

    lo: torch.Tensor
    hi: torch.Tensor
    l2: L2 | None = None

    def __post_init__(self) -> None:
        lo, hi = self.lo, self.hi
        if not (torch.is_tensor(lo) and torch.is_tensor(hi)) or lo.dtype != torch.float64 or hi.dtype != torch.float64:
            raise RegionError("region batch: lo and hi must be float64 tensors")
        if lo.shape != hi.shape or lo.ndim < 2 or lo.shape[0] < 1:
            raise RegionError(f"region batch: box bounds of shape {tuple(lo.shape)} / {tuple(hi.shape)} are not "
                              f"one batch (B >= 1, *input_shape)")
        _check_finite(lo, "lower bound")
        _check_finite(hi, "upper bound")
        if (lo > hi).any():
            i = [int(v) for v in torch.nonzero(lo > hi)[0]]
            raise RegionError(f"region {i[0]}: lower {float(lo[tuple(i)])!r} > upper {float(hi[tuple(i)])!r} "
                              f"at input {i[1:]}")
        if self.l2 is not None:
            centres, radii = self.l2
            if centres.dtype != torch.float64 or centres.shape != lo.shape:
                raise RegionError(f"l2 centres of shape {tuple(centres.shape)} do not match {lo.shape[0]} regions of "
                                  f"input shape {tuple(lo.shape[1:])}")
            if radii.dtype != torch.float64 or tuple(radii.shape) != (lo.shape[0],) or \
                    not torch.isfinite(radii).all() or (radii < 0).any():
                raise RegionError(f"l2 radii must be {lo.shape[0]} finite values >= 0, got {radii.tolist()[:8]}")
            if not torch.isfinite(centres).all():
                raise RegionError("l2 centres contain a non-finite value")

    # ------------------------------------------------------------------ builders
    @classmethod
    def of_regions(cls, regions: Sequence[Region], input_shape: Sequence[int]) -> RegionBatch:
        """The bounding boxes of `regions` (Box / L2Ball / Domain, each checked when built, and against
        the networks by certify), reshaped to the input shape, with the balls when all are L2 balls."""
        shape = tuple(input_shape)
        boxes = [r.bounding_box() for r in regions]
        lo = torch.from_numpy(np.stack([b[0].reshape(shape) for b in boxes]))
        hi = torch.from_numpy(np.stack([b[1].reshape(shape) for b in boxes]))
        l2 = None
        balls = [r for r in regions if isinstance(r, L2Ball)]
        if balls and len(balls) == len(regions):
            l2 = (torch.from_numpy(np.stack([r.center.reshape(shape) for r in balls])),
                  torch.tensor([r.radius for r in balls], dtype=torch.float64))
        return cls(lo, hi, l2)

    @classmethod
    def of_boxes(cls, input_shape: Sequence[int], lo: TensorLike, hi: TensorLike,
                 l2: tuple[TensorLike, TensorLike] | None = None) -> RegionBatch:
        """From raw boxes: one box of the input shape or a batch (B, *input_shape), numpy or torch;
        `l2` = (centres, radii) with B centres of the input's size and B radii."""
        shape = tuple(input_shape)
        lo_t = torch.as_tensor(lo, dtype=torch.float64)
        hi_t = torch.as_tensor(hi, dtype=torch.float64)
        if tuple(lo_t.shape) == shape:
            lo_t, hi_t = lo_t.unsqueeze(0), hi_t.unsqueeze(0)
        if tuple(lo_t.shape[1:]) != shape or lo_t.shape != hi_t.shape:
            raise RegionError(f"box bounds of shape {tuple(lo_t.shape)} / {tuple(hi_t.shape)} do not match "
                              f"(B, {', '.join(map(str, shape))})")
        if l2 is None:
            return cls(lo_t, hi_t)
        try:
            centre, radius = l2
        except (TypeError, ValueError) as exc:
            raise RegionError(f"l2 must be a (centres, radii) pair, got {type(l2).__name__}") from exc
        b = lo_t.shape[0]
        c = torch.as_tensor(centre, dtype=torch.float64)
        if c.numel() != b * math.prod(shape):
            raise RegionError(f"l2 centres of shape {tuple(c.shape)} do not match {b} regions of input shape {shape}")
        return cls(lo_t, hi_t, (c.reshape(b, *shape), torch.as_tensor(radius, dtype=torch.float64).reshape(-1)))

    # ------------------------------------------------------------------ views
    @property
    def batch(self) -> int:
        return int(self.lo.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.lo.shape[1:])

    def bounding_boxes(self) -> RegionBatch:
        """The same boxes without the balls: a superset of every region, for methods that encode boxes only."""
        return self if self.l2 is None else RegionBatch(self.lo, self.hi)

    def select(self, idx: slice | torch.Tensor) -> RegionBatch:
        l2 = None if self.l2 is None else (self.l2[0][idx], self.l2[1][idx])
        return RegionBatch(self.lo[idx], self.hi[idx], l2)

    def to(self, dtype: torch.dtype) -> RegionBatch:
        """A copy in another dtype, for searches only (alpha's float32 Adam steps): its numbers bound
        nothing, so it skips the float64 check of the constructor."""
        out = object.__new__(RegionBatch)
        l2 = None if self.l2 is None else (self.l2[0].to(dtype), self.l2[1].to(dtype))
        for name, value in (("lo", self.lo.to(dtype)), ("hi", self.hi.to(dtype)), ("l2", l2)):
            object.__setattr__(out, name, value)
        return out

    # ------------------------------------------------------------------ concretisation (computed once)
    @cached_property
    def _centre_radius(self) -> tuple[torch.Tensor, torch.Tensor]:
        return centre_radius(Bounds(self.lo, self.hi))

    @property
    def c(self) -> torch.Tensor:
        """Box centres, with `r` rounded so that [c - r, c + r] contains [lo, hi]."""
        return self._centre_radius[0]

    @property
    def r(self) -> torch.Tensor:
        """Box radii (rounded up, see `c`)."""
        return self._centre_radius[1]

    @cached_property
    def rc(self) -> torch.Tensor:
        """(B, n, 2): r and |c| + r, flattened side by side (what concretisation dots |lam| with)."""
        r = self.r.flatten(1)
        return torch.stack([r, self.c.abs().flatten(1) + r], dim=2)


def _check_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        i = [int(v) for v in torch.nonzero(bad)[0]]
        raise RegionError(f"region {i[0]}: non-finite {what} {float(t[tuple(i)])!r} at input {i[1:]}")


R = TypeVar("R")


def boxes_or_batch(method: Callable[..., R]) -> Callable[..., R]:
    """Let a bound method `method(pair, region, **options)` also be called with raw boxes,
    `method(pair, lo, hi, l2=None, **options)` (tests, scripts): the batch is built (and checked)
    here by `RegionBatch.of_boxes`. A RegionBatch goes straight through, unchecked again."""
    @functools.wraps(method)
    def call(pair: Pair, region: RegionBatch | TensorLike, hi: TensorLike | None = None, /, **options: Any) -> R:
        if not isinstance(region, RegionBatch):
            if hi is None:
                raise TypeError(f"{method.__name__}(pair, lo, hi): the upper bounds are missing")
            l2 = options.pop("l2", None)
            region = RegionBatch.of_boxes(pair.input_shape, region, hi, l2)
        elif hi is not None or "l2" in options:
            raise TypeError(f"{method.__name__}(pair, region): a RegionBatch carries its own boxes and balls")
        return method(pair, region, **options)
    return call
