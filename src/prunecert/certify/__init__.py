"""Sound bounds on how far a pruned network g deviates from its original f over input regions.

`certify(original, pruned, regions, method=...)` is the one entry point: it pairs the networks
(`make_pair`), cuts the regions into fixed chunks and maps `chunks.certify_chunk` over them on an
executor (in-process, local workers or Dask: `prunecert.scale`); each chunk is bounded by one batched
call of the method, searched for counterexamples and, when asked, settled (complete verdicts). The
result is a `CertifyResult` (per-layer local and end-to-end bounds, verdicts, `to_json()`), the same
whatever the executor. Each chunk's regions reach the method as one `RegionBatch` (boxes, and L2
balls), built here once per chunk and checked only there; methods share the signature
`(pair, region, ...) -> PairBounds` and are registered in `certify.methods` (unknown options are rejected there). certify imports no attack: the
searches that check a solver (`witness=`, `reach=`) or settle a verdict (`class_search=`) are passed
in by the caller, as picklable objects (`prunecert.adversarial.witness`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from prunecert.certify.chunks import (
    CertifySetup,
    RegionChunk,
    certify_batch_size,
    certify_chunk,
    concat_results,
    executor_items,
    region_chunks,
)
from prunecert.certify.classprop import ClassProperty
from prunecert.certify.formulation import check_encodable
from prunecert.certify.methods import METHODS, BoundMethod, get_method
from prunecert.certify.refute import SearchResult
from prunecert.certify.result import CertifyResult, PairBounds
from prunecert.certify.settle import ClassSearch, check_complete
from prunecert.core.completion import make_pair
from prunecert.core.pair import Pair
from prunecert.core.regions import Box, Domain, L2Ball, Region
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Network
from prunecert.progress import progress_task
from prunecert.scale import Executor, InProcessExecutor, open_executor
from prunecert.stage_budgets import BAB_SECONDS, CERTIFY_SAMPLES

__all__ = ["certify", "certify_stream", "METHODS", "BoundMethod", "get_method", "Pair", "make_pair", "Box", "L2Ball",
           "Domain", "Region", "PairBounds", "CertifyResult"]


ModelPath = str | os.PathLike[str]


def _as_pair(original: Network | Pair | ModelPath, pruned: Network | ModelPath | None) -> Pair:
    if isinstance(original, Pair):
        return original
    if pruned is None:
        raise ConfigError("certify needs the pruned network (or a Pair as `original`)")
    if not isinstance(original, Network) or not isinstance(pruned, Network):
        from prunecert.io import load_model
        original = original if isinstance(original, Network) else load_model(original)
        pruned = pruned if isinstance(pruned, Network) else load_model(pruned)
    return make_pair(original, pruned)


def _check_regions(pair: Pair, given: Region | Iterable[Region]) -> Sequence[Region]:
    # a Sequence (a list, or a LazyRegions that builds regions as chunks need them) is kept as it is
    regions: Sequence[Region] = [given] if isinstance(given, Region) else given if isinstance(given, Sequence) \
        else list(given)
    if not regions:
        raise RegionError("no regions to certify over")
    dlo, dhi = pair.domain()
    for i, r in enumerate(regions):
        if not isinstance(r, Region):
            raise RegionError(f"region {i} is a {type(r).__name__}, not a Box / L2Ball / Domain")
        if math.prod(r.shape) != pair.f.n_inputs:
            raise RegionError(f"region {i} ({r.source or r.describe()['kind']}) has input shape {r.shape}, "
                              f"the networks take {pair.input_shape}")
        lo, hi = (a.reshape(pair.input_shape) for a in r.bounding_box())
        for side, bad in (("below", lo < dlo), ("above", hi > dhi)):
            if bad.any():
                j = tuple(int(v) for v in np.argwhere(bad)[0])
                raise RegionError(f"region {i} ({r.source or r.describe()['kind']}) reaches {side} the networks' "
                                  f"input domain at input {list(j)}: [{lo[j]:g}, {hi[j]:g}] vs "
                                  f"[{dlo[j]:g}, {dhi[j]:g}]")
    return regions


def _check_tolerance(tolerance: float | None) -> float | None:
    if tolerance is None:
        return None
    t = float(tolerance)
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    return t


def certify(original: Network | Pair | ModelPath, pruned: Network | ModelPath | None,
            regions: Region | Sequence[Region], method: str = "diff-linear", tolerance: float | None = None,
            time_limit: float | None = None, progress: bool = True, seed: int = 0, samples: int = CERTIFY_SAMPLES,
            batch_size: int | None = None, search: Callable[..., SearchResult] | None = None,
            logits: Sequence[int] | None = None, delta: float | None = None, complete: float | None = None,
            class_search: ClassSearch | None = None, workers: int | None = 1, scheduler: str | None = None,
            threads: int | None = None, executor: Executor | None = None, **method_options: object) -> CertifyResult:
    """Certify max |a_l^f - a_l^g| per layer (local and end-to-end) and top-1 agreement over regions.

    `original`/`pruned` are Networks (a compact pruned one is completed onto the original) or model
    paths, or `original` is a ready `Pair` and `pruned` None. Regions are processed in chunks of
    `batch_size` (None: `chunks.certify_batch_size`, as many as fit a memory budget, at most 32)
    through the bound method; then `search` (default: `sample_search` with `samples` points per region, each region seeded by `seed` and the region itself) looks for counterexamples.
    Extra keyword options go to the method (e.g. `iterations`; unknown ones are an error).

    Properties: the tolerance verdict is over the `logits` chosen (all by default); `delta` adds
    delta-top-1 equivalence verdicts (softmax_c(f) > delta implies argmax g = c). `complete`:
    seconds per region to settle the class verdicts still unknown after the bounds (`settle.py`:
    search, then branch and bound); `method="bab"` implies it (`time_limit`, default BAB_SECONDS). A
    pair the branch and bound cannot encode (`settle.complete_fits`) is refused up front.
    `class_search` is the counterexample search settle runs first (e.g.
    `prunecert.adversarial.witness.class_search(pair)`); pass `witness=milp_witness(pair)` for milp
    and `reach=reach_search(pair)` for bab the same way (`adversarial.witness.certify_searches` builds all three).

    Chunks run on `executor`, or on one made from `workers` (None: every usable core) / `scheduler`
    (a Dask address or "local"); the result does not depend on which. For many regions,
    `certify_stream` yields chunk results as they come.
    """
    start = time.perf_counter()
    parts = [part for _, part in certify_stream(
        original, pruned, regions, method, tolerance, time_limit, progress, seed, samples, batch_size, search,
        logits, delta, complete, class_search, workers, scheduler, threads, executor, **method_options)]
    return concat_results(parts, time.perf_counter() - start)


def certify_stream(original: Network | Pair | ModelPath, pruned: Network | ModelPath | None,
                   regions: Region | Sequence[Region], method: str = "diff-linear", tolerance: float | None = None,
                   time_limit: float | None = None, progress: bool = True, seed: int = 0,
                   samples: int = CERTIFY_SAMPLES,
                   batch_size: int | None = None, search: Callable[..., SearchResult] | None = None,
                   logits: Sequence[int] | None = None, delta: float | None = None, complete: float | None = None,
                   class_search: ClassSearch | None = None, workers: int | None = 1,
                   scheduler: str | None = None, threads: int | None = None, executor: Executor | None = None,
                   **method_options: object) -> Iterator[tuple[int, CertifyResult]]:
    """`certify`, chunk by chunk: yields (index of the chunk's first region, its CertifyResult) in order,
    holding only a few chunks at a time (write each one out to keep memory flat)."""
    pair = _as_pair(original, pruned)
    regions = _check_regions(pair, regions)
    tolerance = _check_tolerance(tolerance)
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time limit must be a finite number of seconds > 0, got {time_limit!r}")
    checked_logits = pair.checked_logits(logits)
    prop_delta = ClassProperty.delta_top1(delta) if delta is not None else None
    if method == "bab" and complete is None:
        complete = float(time_limit) if time_limit is not None else BAB_SECONDS
    if complete is not None and not (math.isfinite(float(complete)) and float(complete) > 0):
        raise ConfigError(f"complete (seconds per region) must be a finite number > 0, got {complete!r}")
    if batch_size is None:
        batch_size = certify_batch_size(pair)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(samples) < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    registered = get_method(method)
    if registered.encodes_pair:
        check_encodable(pair, f"--method {method}", "use --method diff-linear or crown-diff (they scale to conv nets)")
    if complete is not None:
        check_complete(pair, "--complete", "leave out --complete on this network: its top-1 verdicts then rest on the "
                       "bounds and certify's sampled search (`prunecert attack --objective disagreement` searches further)")
    slices = region_chunks(regions, batch_size)
    with contextlib.ExitStack() as stack:
        if executor is None:
            executor = stack.enter_context(open_executor(workers, scheduler, threads,
                                                         n_items=executor_items(len(regions))))
        in_process = isinstance(executor, InProcessExecutor)
        kwargs = registered.arguments({"time_limit": time_limit, "tolerance": tolerance, "seed": seed,
                                       "progress": progress and in_process, "logits": checked_logits},
                                      method_options)
        setup = CertifySetup(pair, registered, kwargs, int(samples), int(seed), tolerance, search,
                             checked_logits, prop_delta, None if complete is None else float(complete), class_search)
        shared = executor.share(setup)
        chunks = (RegionChunk.of(s.start, list(regions[s]), pair.input_shape) for s in slices)
        with progress_task(f"certify ({method})", len(regions), progress) as task:
            for s, part in zip(slices, executor.map(certify_chunk, shared, chunks)):
                task.advance(s.stop - s.start)
                yield s.start, part
