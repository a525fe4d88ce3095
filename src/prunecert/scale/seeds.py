"""Per-region seeds and fixed chunks: what makes results independent of how the work is spread.

A region's random choices (certify's samples, an attack's starting points) come from a generator
seeded by the run seed and the region's *identity*: a hash of its exact bounds (and radius), i.e.
its index in the space of all regions rather than its position in one run's list. So the same
region gets the same samples whether it is certified alone, in a 10,000-region run, on any worker,
or in any shard of a sharded run, and merged shards equal the single run exactly.
"""

from __future__ import annotations

import hashlib

from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch


class Boxed(Protocol):
    """What a region's identity is made of (`prunecert.core.regions.Region`, a floor above this one)."""

    def bounding_box(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...


def region_seed(seed: int, index: int) -> int:
    """A 63-bit seed for region `index` of a run seeded `seed` (numpy SeedSequence: well mixed,
    so neighbouring regions and neighbouring run seeds get unrelated streams)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def region_key(region: Boxed) -> int:
    """A 63-bit identity of a region: sha256 of its float64 bounding box (and radius for L2 balls)."""
    lo, hi = (np.ascontiguousarray(a, dtype=np.float64) for a in region.bounding_box())
    h = hashlib.sha256(lo.tobytes() + hi.tobytes())
    radius = getattr(region, "radius", None)  # L2 balls
    if radius is not None:
        h.update(np.float64(radius).tobytes())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def region_generator(seed: int, region: Boxed) -> torch.Generator:
    """The torch generator of `region` in a run seeded `seed` (every random choice made for that
    region comes from it); see the module docstring."""
    return torch.Generator().manual_seed(region_seed(seed, region_key(region)))


def chunk_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` out of range(n): the unit of work an executor maps."""
    size = max(1, int(size))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]
