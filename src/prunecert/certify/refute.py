"""The cheap refutation search `certify` runs beside the bounds: sample the region, evaluate both nets.

It finds (a) a point where argmax f != argmax g (refutes agreement) and (b) the largest
max_k |Delta_logit_k| among the samples (refutes a tolerance when above it). The attack module plugs
stronger searches in through `certify(..., search=...)`: any callable with this signature.
Every value is a float64 forward pass of both networks at the returned point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prunecert.core.pair import Pair
from prunecert.core.regions import Region


@dataclass
class SearchResult:
    """Best points found in one region."""

    max_abs_logit_deviation: float
    max_point: np.ndarray
    disagreement: np.ndarray | None = None   # a point where the top classes differ
    class_f: int | None = None
    class_g: int | None = None


def sample_search(pair: Pair, region: Region, n: int = 256, generator: torch.Generator | None = None,
                  recheck: int = 8) -> SearchResult:
    """Evaluate the centre and `n - 1` samples (a quarter on the boundary / at corners).

    All samples are screened in float32 (several times faster on conv nets); the `recheck` most
    promising points for each goal are re-evaluated in float64, and only those values are reported.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    centre = torch.from_numpy(np.asarray(region.center, dtype=np.float64)).reshape(1, *pair.input_shape)
    x = torch.cat([centre, region.sample(max(n - 1, 0), gen).reshape(-1, *pair.input_shape)])
    with torch.no_grad():
        yf, yg = (net.forward(x, torch.float32).reshape(len(x), -1) for net in (pair.f, pair.g))
        dev = (yf - yg).abs().amax(dim=1)
        picks = [dev.topk(min(recheck, len(x))).indices]
        differ = (yf.argmax(1) != yg.argmax(1)).nonzero().flatten()
        if len(differ):
            picks.append(differ[_disagreement_score(yf, yg)[differ].topk(min(recheck, len(differ))).indices])
        idx = torch.unique(torch.cat(picks))
        xs = x[idx]
        yf, yg = (net.forward(xs).reshape(len(xs), -1) for net in (pair.f, pair.g))
    dev = (yf - yg).abs().amax(dim=1)
    best = int(dev.argmax())
    result = SearchResult(float(dev[best]), xs[best].numpy().copy())
    cf, cg = yf.argmax(dim=1), yg.argmax(dim=1)
    differ = (cf != cg).nonzero().flatten()
    if len(differ):
        i = int(differ[int(_disagreement_score(yf, yg)[differ].argmax())])
        result.disagreement = xs[i].numpy().copy()
        result.class_f, result.class_g = int(cf[i]), int(cg[i])
    return result


def _disagreement_score(yf: torch.Tensor, yg: torch.Tensor) -> torch.Tensor:
    """How convincing a disagreement is: the smaller of the two networks' gaps between the two classes."""
    cf, cg = yf.argmax(dim=1, keepdim=True), yg.argmax(dim=1, keepdim=True)
    gap_f = yf.gather(1, cf) - yf.gather(1, cg)
    gap_g = yg.gather(1, cg) - yg.gather(1, cf)
    return torch.minimum(gap_f, gap_g).flatten()
