"""Certification of one chunk of regions, the unit an executor (`prunecert.scale`) ships to a worker.

`CertifySetup` is what every chunk shares (the pair, the method and its options, the search): it is
shipped once per worker. A chunk (`RegionChunk`) is the index of its first region, the regions and
their `RegionBatch`, built once where the chunk is cut; `certify_chunk` bounds it with one batched
method call, searches each region with that region's own generator (seeded from the run
seed and the region's identity, `prunecert.scale.seeds`), checks the bounds against what the search found, and returns a
`CertifyResult` for the chunk. Chunks are fixed by the region list and `batch_size` alone, so the
results do not depend on which executor ran them or how many workers it had.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prunecert.certify.classprop import ClassProperty, open_classes, replay
from prunecert.certify.methods import BoundMethod
from prunecert.certify.refute import SearchResult, sample_search
from prunecert.certify.result import BabRegionInfo, CertifyResult, LayerResult, PairBounds, truncated_regions
from prunecert.certify.settle import ClassSearch, settle
from prunecert.certify.verdicts import Agreement
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch
from prunecert.core.regions import L2Ball, Region
from prunecert.scale import region_generator


@dataclass
class CertifySetup:
    """Everything the chunks of one certify run share (shipped to each worker once, so every object in
    it pickles: the method by reference, the searches as `prunecert.adversarial.witness` objects)."""

    pair: Pair
    method: BoundMethod
    kwargs: dict[str, object]                  # the method's options (`BoundMethod.arguments`)
    samples: int
    seed: int
    tolerance: float | None
    search: Callable[..., SearchResult] | None = None
    logits: list[int] | None = None            # the tolerance verdict's logits (None: all)
    delta: ClassProperty | None = None         # delta-top-1 equivalence, when asked
    complete: float | None = None              # seconds per region to settle open class verdicts
    class_search: ClassSearch | None = None    # the search settle runs before branch and bound


@dataclass(frozen=True)
class RegionChunk:
    """Consecutive regions of a run, from region `first` on, and the batch the bound method sees."""

    first: int
    regions: list[Region]
    batch: RegionBatch

    @classmethod
    def of(cls, first: int, regions: list[Region], input_shape: tuple[int, ...]) -> RegionChunk:
        return cls(first, regions, RegionBatch.of_regions(regions, input_shape))


CHUNK_MEMORY = 256 * 2**20   # bytes of per-region bound state one chunk may hold (10 vgg-small regions)
BYTES_PER_ACTIVATION = 192   # per region and activation of the pair: measured 140-190 on vgg-small
MAX_BATCH = 32               # regions per chunk at most: small nets batch this many (as before the budget)


def certify_batch_size(pair: Pair, budget: int = CHUNK_MEMORY) -> int:
    """Regions per certify chunk: as many as keep the per-region state of the bound method within
    `budget` bytes, at most MAX_BATCH, at least 1. That state is the bounds, relaxations and op
    magnitudes of every activation of f and g; the slope searches and the walks hold their own
    working sets in groups of a fixed size (`alpha.REGION_BUDGET`, `rows.ROW_BUDGET`), whatever the
    chunk. On vgg-small diff-linear (one process, 10 boxes, interleaved runs) peaked at 619-627 MB in
    chunks of 2 and 778-829 MB in chunks of 10, at 4-10 % less CPU per region (medians;
    benchmarks/results/memory-batch.md). Before the searches optimised only the rows that can carry the reported maximum, they held
    all 2 x classes logit rows per region (48 bytes per row and activation; 2 regions per chunk)."""
    per_region = pair.activations_per_input() * BYTES_PER_ACTIVATION
    return max(1, min(MAX_BATCH, budget // per_region))


def executor_items(n_regions: int) -> int:
    """Work items to open an executor for, for a run of `n_regions` regions: runs of at most MAX_BATCH
    regions count as one item and so stay in the calling process (spawning workers, ~4 s each at
    load 4, costs more than a few chunks of work save), whatever the chunk size."""
    return math.ceil(n_regions / MAX_BATCH)


def region_chunks(regions: Sequence[Region], batch_size: int) -> list[slice]:
    """Consecutive runs of at most `batch_size` regions, all L2 balls or none (so a chunk's batch
    carries a ball for every region, or none)."""
    out: list[slice] = []
    start = 0
    for i in range(1, len(regions) + 1):
        if i == len(regions) or i - start == batch_size or \
                isinstance(regions[i], L2Ball) != isinstance(regions[start], L2Ball):
            out.append(slice(start, i))
            start = i
    return out


def certify_chunk(setup: CertifySetup, chunk: RegionChunk) -> CertifyResult:
    """Bound, search, check and (when asked) settle one chunk; region indices in messages are the run's."""
    first, regions, batch = chunk.first, chunk.regions, chunk.batch
    pair = setup.pair
    lo, hi = batch.lo, batch.hi
    bounds = setup.method.bounds(pair, batch, **setup.kwargs)
    check_finite(bounds, setup.method.name)
    search = setup.search or sample_search
    found = [search(pair, r, setup.samples, region_generator(setup.seed, r)) for r in regions]
    if "bab" in bounds.info:
        found = [_with_method_point(pair, region, r, info) for region, r, info in zip(regions, found, bounds.info["bab"])]
    result = make_result(pair, regions, bounds, found, setup.method.name, setup.tolerance, setup.seed, 0.0, first,
                         setup.logits)
    result.truncated = truncated_regions(bounds.info, len(regions))
    if setup.delta is not None:
        result.delta, result.delta_top1 = setup.delta.delta, class_verdicts(pair, lo, hi, bounds, setup.delta)
    if setup.complete is not None:
        for b in range(len(regions)):
            _settle_region(pair, lo[b], hi[b], bounds.select(slice(b, b + 1)), result, b, setup.complete,
                           setup.class_search, regions[b])
    return result


def _with_method_point(pair: Pair, region: Region, res: SearchResult, info: BabRegionInfo) -> SearchResult:
    """The search's result, or the method's own reached point (bab's attack) when that goes further:
    re-evaluated here by a float64 forward pass, so a tolerance it exceeds is refuted with that input.
    Only a point of the region counts: bab searches an L2 ball's bounding box."""
    point = info.get("point")
    if point is None:
        return res
    x = torch.as_tensor(np.asarray(point, dtype=np.float64)).reshape(1, *pair.input_shape)
    if not region.contains(x.reshape(1, *region.shape)):
        return res
    with torch.no_grad():
        value = float(pair.deltas(x)[-1].abs().max())
    if value <= res.max_abs_logit_deviation:
        return res
    return SearchResult(value, x[0].numpy().copy(), res.disagreement, res.class_f, res.class_g)


def class_verdicts(pair: Pair, lo: torch.Tensor, hi: torch.Tensor, bounds: PairBounds,
                   prop: ClassProperty) -> list[Agreement]:
    """Per region, a class property decided by the bounds alone (else by the box centre, else unknown)."""
    still = open_classes(bounds, prop).any(dim=1)
    out = []
    for b in range(len(still)):
        if not bool(still[b]):
            out.append(Agreement("proved", stage="bounds"))
            continue
        centre = ((lo[b] + hi[b]) / 2).numpy()
        classes = replay(pair, centre, prop)
        out.append(Agreement("unknown") if classes is None else
                   Agreement("refuted", point=centre.reshape(-1), class_f=classes[0], class_g=classes[1], stage="search"))
    return out


def _settle_region(pair: Pair, lo: torch.Tensor, hi: torch.Tensor, bounds: PairBounds, result: CertifyResult,
                   b: int, seconds: float, finder: ClassSearch | None, region: Region) -> None:
    """Settle region b's open class verdicts (agreement, and delta-top-1 when asked) in place."""
    if isinstance(region, L2Ball):
        return   # the complete stage works on boxes; an L2 ball keeps the bounds' verdict
    lists = [(result.agreement, ClassProperty.agreement())]
    if result.delta_top1 is not None and result.delta is not None:
        lists.append((result.delta_top1, ClassProperty.delta_top1(result.delta)))
    for verdicts, prop in lists:
        if verdicts[b].verdict != "unknown":
            continue
        s = settle(pair, lo.numpy(), hi.numpy(), prop, seconds, bounds, finder)
        point = None if s.point is None else s.point.reshape(-1)
        verdicts[b] = Agreement(s.verdict, point=point, class_f=s.class_f, class_g=s.class_g, stage=s.stage,
                                seconds=s.seconds, details=s.details)


def check_finite(bounds: PairBounds, method: str) -> None:
    for l, (d, loc) in enumerate(zip(bounds.delta, bounds.local)):
        for name, t in (("end-to-end", d.lower), ("end-to-end", d.upper), ("local", loc.lower), ("local", loc.upper)):
            if torch.isnan(t).any():
                raise RuntimeError(f"method {method!r} returned NaN {name} bounds at layer {l}: a bug, please report")


def make_result(pair: Pair, regions: list[Region], bounds: PairBounds, found: list[SearchResult], method: str,
                tolerance: float | None, seed: int, seconds: float, first: int = 0,
                logits: list[int] | None = None) -> CertifyResult:
    """The CertifyResult of `regions` (the run's regions first, first+1, ...); raises on an unsound bound."""
    layers = [LayerResult(lf.index, lf.name, bounds.local[l].lower.numpy(), bounds.local[l].upper.numpy(),
                          bounds.delta[l].lower.numpy(), bounds.delta[l].upper.numpy())
              for l, lf in enumerate(pair.layers_f)]
    proved, cls = bounds.proved_agreement()
    max_dev = bounds.max_abs_logit_deviation(logits).numpy()
    if logits is not None:   # the search maximised all logits: its points, re-read on the chosen ones
        found = [_on_logits(pair, r, logits) for r in found]
    agreement = []
    for b, res in enumerate(found):
        if res.max_abs_logit_deviation > max_dev[b] * (1 + 1e-9) + 1e-12:
            raise RuntimeError(f"method {method!r} certified max |Delta_logit| <= {max_dev[b]:.6g} on region {first + b} "
                               f"but a sample reaches {res.max_abs_logit_deviation:.6g}: unsound bound, please report")
        if bool(proved[b]) and res.disagreement is not None:
            raise RuntimeError(f"method {method!r} proved top-1 agreement on region {first + b} but at a sampled point "
                               f"f picks {res.class_f} and g picks {res.class_g}: unsound bound, please report")
        if bool(proved[b]):
            agreement.append(Agreement("proved", label=int(cls[b]), stage="bounds"))
        elif res.disagreement is not None:
            agreement.append(Agreement("refuted", point=res.disagreement, class_f=res.class_f, class_g=res.class_g,
                                       stage="search"))
        else:
            agreement.append(Agreement("unknown"))
    return CertifyResult(method, [r.describe() for r in regions], layers, max_dev,
                         np.array([r.max_abs_logit_deviation for r in found]), [r.max_point for r in found],
                         agreement, tolerance, seconds, seed, bounds, logits=logits)


def _on_logits(pair: Pair, res: SearchResult, logits: list[int]) -> SearchResult:
    x = torch.as_tensor(res.max_point).reshape(1, *pair.input_shape)
    with torch.no_grad():
        d = pair.deltas(x)[-1].reshape(-1)[logits]
    return SearchResult(float(d.abs().max()), res.max_point, res.disagreement, res.class_f, res.class_g)


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
    known = [p.bounds for p in parts if p.bounds is not None]
    bounds = PairBounds.concat(known) if len(known) == len(parts) else None
    delta_top1 = None if first.delta_top1 is None else [a for p in parts for a in p.delta_top1 or []]
    return CertifyResult(first.method, [d for p in parts for d in p.regions], layers,
                         np.concatenate([p.max_abs_logit_deviation for p in parts]),
                         np.concatenate([p.sampled_max_abs_logit_deviation for p in parts]),
                         [x for p in parts for x in p.sampled_points], [a for p in parts for a in p.agreement],
                         first.tolerance, seconds, first.seed, bounds,
                         truncated=[t for p in parts for t in p.truncated], logits=first.logits, delta=first.delta,
                         delta_top1=delta_top1)
