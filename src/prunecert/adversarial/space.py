"""The search space of a batch of attacks: one or many regions, each batch element tied to one.

Gradient attacks run restarts x sub-objectives x regions in one torch batch; this module gives them
the batched projection, the step scale (per-coordinate half-widths for L-inf boxes, the radius for L2
balls), uniform starting points, and the final guarantee that every returned point lies in its
region exactly (`region.contains`), shrinking towards the centre where a projection rounded outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from prunecert.core.regions import L2Ball, Region
from prunecert.errors import RegionError


def is_l2(region: Region) -> bool:
    """L2 balls carry a radius; boxes and the whole domain are exactly their bounding box."""
    return isinstance(region, L2Ball)


class SearchSpace:
    """Regions (G of them) for a batch whose element i belongs to region `groups[i]`."""

    def __init__(self, regions: Sequence[Region], input_shape: tuple[int, ...]):
        self.regions = list(regions)
        self.input_shape = tuple(input_shape)
        boxes = [r.bounding_box() for r in self.regions]
        self.lo = torch.stack([torch.as_tensor(np.asarray(b[0], dtype=np.float64)).reshape(self.input_shape)
                               for b in boxes])
        self.hi = torch.stack([torch.as_tensor(np.asarray(b[1], dtype=np.float64)).reshape(self.input_shape)
                               for b in boxes])
        self.l2 = [is_l2(r) for r in self.regions]
        for region_id, r in enumerate(self.regions):
            if isinstance(r, L2Ball):
                if not float(r.radius) > 0:
                    raise RegionError(f"region {_name(r)}: radius {r.radius} gives a region of zero volume, "
                                      f"nothing to search")
            elif getattr(r, "eps", None) == 0 or self._degenerate(region_id):
                raise RegionError(f"region {_name(r)}: the box has zero width (eps 0), a region of zero volume "
                                  f"has nothing to search")

    def _degenerate(self, region_id: int) -> bool:
        """Every coordinate's width is at most a few ulps (e.g. a zero-radius ball rounded outward)."""
        lo, hi = self.lo[region_id].numpy(), self.hi[region_id].numpy()
        return bool((hi - lo <= 4 * np.spacing(np.maximum(np.abs(lo), np.abs(hi)))).all())

    @property
    def n_groups(self) -> int:
        return len(self.regions)

    def center(self, region_id: int) -> torch.Tensor:
        c = getattr(self.regions[region_id], "center", None)
        if c is None:
            return (self.lo[region_id] + self.hi[region_id]) / 2
        return torch.as_tensor(np.asarray(c, dtype=np.float64)).reshape(self.input_shape)

    # ------------------------------------------------------------------ batched geometry
    def project(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Project each x[i] onto region groups[i] (exact clamp for boxes)."""
        x = torch.minimum(torch.maximum(x, self.lo[groups]), self.hi[groups])
        if any(self.l2):
            x = x.clone()
            for region_id, r in enumerate(self.regions):
                if isinstance(r, L2Ball):
                    idx = (groups == region_id).nonzero().flatten()
                    if len(idx):
                        x[idx] = r.project(x[idx]).to(x.dtype)
        return x

    def step(self, grad: torch.Tensor, eta: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """The ascent step of size eta (in units of the region's radius): sign step for boxes,
        normalised gradient for L2 balls."""
        shape = (-1,) + (1,) * len(self.input_shape)
        out = torch.sign(grad) * ((self.hi - self.lo)[groups] / 2) * eta.view(shape)
        if any(self.l2):
            l2 = torch.tensor(self.l2)[groups]
            if l2.any():
                radius = torch.tensor([float(r.radius) if isinstance(r, L2Ball) else 0.0 for r in self.regions],
                                      dtype=grad.dtype)[groups]
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-300)
                l2_step = grad / norm.view(shape) * (radius * eta).view(shape)
                out = torch.where(l2.view(shape), l2_step, out)
        return out

    def sample(self, counts: Sequence[int], generator: torch.Generator | Sequence[torch.Generator]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """counts[i] uniform points of region i; returns (x, groups). `generator`: one for all regions,
        or one per region (then each region's points depend only on its own generator)."""
        xs, gs = [], []
        for region_id, n in enumerate(counts):
            if n <= 0:
                continue
            r = self.regions[region_id]
            gen = generator if isinstance(generator, torch.Generator) else generator[region_id]
            if isinstance(r, L2Ball):
                x = torch.as_tensor(r.sample(n, gen), dtype=torch.float64).reshape(n, *self.input_shape)
            else:
                u = torch.rand((n, *self.input_shape), generator=gen, dtype=torch.float64)
                x = self.lo[region_id] + (self.hi[region_id] - self.lo[region_id]) * u
            xs.append(self.project(x, torch.full((n,), region_id, dtype=torch.long)))
            gs.append(torch.full((n,), region_id, dtype=torch.long))
        return torch.cat(xs), torch.cat(gs)

    # ------------------------------------------------------------------ exact membership
    def ensure_inside(self, x: torch.Tensor, region_id: int) -> torch.Tensor:
        """A copy of the single point `x` that `regions[region_id].contains` accepts exactly."""
        region = self.regions[region_id]
        x = self.project(x[None].to(torch.float64), torch.tensor([region_id]))[0]
        if _contains(region, x):
            return x
        c = self.center(region_id)
        if not _contains(region, c):
            raise RegionError(f"region {region.describe()}: its own centre is not inside it")
        lo_t, hi_t = 0.0, 1.0  # c + t (x - c) is inside for t = lo_t
        for _ in range(60):
            t = (lo_t + hi_t) / 2
            if _contains(region, c + t * (x - c)):
                lo_t = t
            else:
                hi_t = t
        return c + lo_t * (x - c)


def _name(region: Region) -> str:
    d = region.describe()
    return str(d.get("source") or d.get("kind"))


def _contains(region: Region, x: torch.Tensor) -> bool:
    return bool(region.contains(x.detach().numpy()))
