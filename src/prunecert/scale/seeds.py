"""Per-region seeds and fixed chunks: what makes results independent of how the work is spread."""

from __future__ import annotations

import numpy as np
import torch


def region_seed(seed: int, index: int) -> int:
    """A 63-bit seed for region `index` of a run seeded `seed` (numpy SeedSequence: well mixed,
    so neighbouring regions and neighbouring run seeds get unrelated streams)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def region_generator(seed: int, index: int) -> torch.Generator:
    """The torch generator of region `index` (every random choice made for that region comes from it)."""
    return torch.Generator().manual_seed(region_seed(seed, index))


def chunk_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` out of range(n): the unit of work an executor maps."""
    size = max(1, int(size))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]
