"""Certification of one chunk of regions, the unit an executor (`prunecert.scale`) ships to a worker.

`CertifySetup` is what every chunk shares (the pair, the method and its options, the search): it is
shipped once per worker. A chunk is `(first_index, regions)`; `certify_chunk` bounds it with one
batched method call, searches each region with that region's own generator (seeded from the run
seed and the region's identity, `prunecert.scale.seeds`), checks the bounds against what the search found, and returns a
`CertifyResult` for the chunk. Chunks are fixed by the region list and `batch_size` alone, so the
results do not depend on which executor ran them or how many workers it had.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from prunecert.certify.refute import SearchResult, sample_search
from prunecert.certify.result import Agreement, CertifyResult, LayerResult, PairBounds
from prunecert.core.pair import Pair
from prunecert.core.regions import L2Ball, Region, stack_boxes
from prunecert.scale import region_generator


@dataclass
class CertifySetup:
    """Everything the chunks of one certify run share (shipped to each worker once)."""

    pair: Pair
    method: str
    fn: Callable[..., PairBounds]
    kwargs: dict
    samples: int
    seed: int
    tolerance: float | None
    search: Callable[..., SearchResult] | None = None
    milp_witness: bool = False  # build the MILP witness attack on the worker (a closure does not pickle)
    _witness: dict = field(default_factory=dict, repr=False)


def region_chunks(regions: list[Region], batch_size: int) -> list[slice]:
    """Consecutive runs of at most `batch_size` regions, all L2 balls or none (so a method that takes
    `l2` gets it for every region of a chunk)."""
    out, start = [], 0
    for i in range(1, len(regions) + 1):
        if i == len(regions) or i - start == batch_size or \
                isinstance(regions[i], L2Ball) != isinstance(regions[start], L2Ball):
            out.append(slice(start, i))
            start = i
    return out


def _l2(regions: list[Region], pair: Pair) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(centres (B, *input_shape), radii (B,)) when every region is an L2 ball, else None."""
    if not all(isinstance(r, L2Ball) for r in regions):
        return None
    centres = torch.from_numpy(np.stack([r.center.reshape(pair.input_shape) for r in regions]))
    return centres, torch.tensor([r.radius for r in regions], dtype=torch.float64)


def certify_chunk(setup: CertifySetup, chunk: tuple[int, list[Region]]) -> CertifyResult:
    """Bound, search and check one chunk; region indices in messages are the run's (first + offset)."""
    first, regions = chunk
    pair = setup.pair
    kwargs = dict(setup.kwargs)
    if setup.milp_witness:
        if "witness" not in setup._witness:
            # imported here because `adversarial` is built on `certify` (the caller injects it otherwise)
            from prunecert.adversarial.witness import milp_witness
            setup._witness["witness"] = milp_witness(pair, seed=setup.seed)
        kwargs["witness"] = setup._witness["witness"]
    lo, hi = stack_boxes(regions)
    lo, hi = lo.reshape(len(regions), *pair.input_shape), hi.reshape(len(regions), *pair.input_shape)
    if "l2" in inspect.signature(setup.fn).parameters:
        l2 = _l2(regions, pair)
        if l2 is not None:
            kwargs["l2"] = l2
    bounds = setup.fn(pair, lo, hi, **kwargs)
    check_finite(bounds, setup.method)
    search = setup.search or sample_search
    found = [search(pair, r, setup.samples, region_generator(setup.seed, r)) for r in regions]
    return make_result(pair, regions, bounds, found, setup.method, setup.tolerance, setup.seed, 0.0, first)


def check_finite(bounds: PairBounds, method: str) -> None:
    for l, (d, loc) in enumerate(zip(bounds.delta, bounds.local)):
        for name, t in (("end-to-end", d.lower), ("end-to-end", d.upper), ("local", loc.lower), ("local", loc.upper)):
            if torch.isnan(t).any():
                raise RuntimeError(f"method {method!r} returned NaN {name} bounds at layer {l}: a bug, please report")


def make_result(pair: Pair, regions: list[Region], bounds: PairBounds, found: list[SearchResult], method: str,
                tolerance: float | None, seed: int, seconds: float, first: int = 0) -> CertifyResult:
    """The CertifyResult of `regions` (the run's regions first, first+1, ...); raises on an unsound bound."""
    layers = [LayerResult(lf.index, lf.name, bounds.local[l].lower.numpy(), bounds.local[l].upper.numpy(),
                          bounds.delta[l].lower.numpy(), bounds.delta[l].upper.numpy())
              for l, lf in enumerate(pair.layers_f)]
    proved, cls = bounds.proved_agreement()
    max_dev = bounds.max_abs_logit_deviation().numpy()
    agreement = []
    for b, res in enumerate(found):
        if res.max_abs_logit_deviation > max_dev[b] * (1 + 1e-9) + 1e-12:
            raise RuntimeError(f"method {method!r} certified max |Delta_logit| <= {max_dev[b]:.6g} on region "
                               f"{first + b} but a sample reaches {res.max_abs_logit_deviation:.6g}: unsound bound, "
                               f"please report")
        if bool(proved[b]) and res.disagreement is not None:
            raise RuntimeError(f"method {method!r} proved top-1 agreement on region {first + b} but at a sampled "
                               f"point f picks {res.class_f} and g picks {res.class_g}: unsound bound, please report")
        if bool(proved[b]):
            agreement.append(Agreement("proved", label=int(cls[b])))
        elif res.disagreement is not None:
            agreement.append(Agreement("refuted", point=res.disagreement, class_f=res.class_f, class_g=res.class_g))
        else:
            agreement.append(Agreement("unknown"))
    return CertifyResult(method, [r.describe() for r in regions], layers, max_dev,
                         np.array([r.max_abs_logit_deviation for r in found]), [r.max_point for r in found],
                         agreement, tolerance, seconds, seed, bounds)


def concat_results(parts: list[CertifyResult], seconds: float) -> CertifyResult:
    """One CertifyResult from the results of consecutive chunks (of the same run)."""
    if len(parts) == 1:
        parts[0].seconds = seconds
        return parts[0]
    first = parts[0]
    layers = [LayerResult(L.index, L.name, *(np.concatenate([getattr(p.layers[l], a) for p in parts])
                                             for a in ("local_lower", "local_upper", "end_to_end_lower",
                                                       "end_to_end_upper")))
              for l, L in enumerate(first.layers)]
    bounds = None if any(p.bounds is None for p in parts) else PairBounds.concat([p.bounds for p in parts])
    return CertifyResult(first.method, [d for p in parts for d in p.regions], layers,
                         np.concatenate([p.max_abs_logit_deviation for p in parts]),
                         np.concatenate([p.sampled_max_abs_logit_deviation for p in parts]),
                         [x for p in parts for x in p.sampled_points], [a for p in parts for a in p.agreement],
                         first.tolerance, seconds, first.seed, bounds)
