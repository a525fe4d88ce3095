"""Where to attack first: the regions whose centre the pruned model is least sure of.

Top-1 disagreements between f and its pruned twin g cluster on inputs where g's margin for f's class
is small, so a disagreement search over many test points spends its budget best on the points of
smallest margin (`prunecert attack --center mnist5k:test:0-999 --lowest-margin 20`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from prunecert.core.pair import Pair
from prunecert.core.regions import Region
from prunecert.errors import ConfigError


def agreement_margin(pair: Pair, x: torch.Tensor) -> torch.Tensor:
    """(B,) g_y(x) - max_{j != y} g_j(x) with y = argmax f(x): negative where f and g already disagree."""
    if pair.n_classes < 2:
        raise ConfigError(f"a margin needs at least 2 classes, the pair has {pair.n_classes}")
    with torch.no_grad():
        yf = pair.f.forward(x).reshape(len(x), -1)
        yg = pair.g.forward(x).reshape(len(x), -1)
    label = yf.argmax(1)
    own = yg.gather(1, label[:, None])[:, 0]
    others = yg.scatter(1, label[:, None], -torch.inf).max(1).values
    return own - others


def lowest_margin(pair: Pair, regions: Sequence[Region], k: int) -> list[Region]:
    """The `k` regions whose centres have the smallest agreement margin, smallest first (ties: given order)."""
    regions = list(regions)
    if not 1 <= k <= len(regions):
        raise ConfigError(f"lowest margin: k must be between 1 and the number of regions ({len(regions)}), got {k}")
    centres = torch.from_numpy(np.stack([np.asarray(r.center, dtype=np.float64).reshape(pair.input_shape)
                                         for r in regions]))
    order = torch.argsort(agreement_margin(pair, centres), stable=True)[:k]
    return [regions[i] for i in order.tolist()]
