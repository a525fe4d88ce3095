"""Sound bounds on how far a pruned network g deviates from its original f over input regions.

`certify(original, pruned, regions, method=...)` is the one entry point: it pairs the networks
(`make_pair`), runs a bound method over all regions at once (batched), searches each region for
counterexamples, and returns a `CertifyResult` (per-layer local and end-to-end bounds, verdicts,
`to_json()`). Methods share the signature `(pair, lo, hi, ...) -> PairBounds` and are imported
lazily, so a method whose module is missing or broken does not take the others down.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from prunecert.certify.chunks import CertifySetup, certify_chunk, concat_results, region_chunks
from prunecert.certify.refute import SearchResult
from prunecert.certify.result import CertifyResult, PairBounds
from prunecert.core.completion import make_pair
from prunecert.core.pair import Pair
from prunecert.core.regions import Box, Domain, L2Ball, Region
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Network
from prunecert.progress import progress_task
from prunecert.scale import Executor, InProcessExecutor, open_executor

__all__ = ["certify", "certify_stream", "METHODS", "get_method", "Pair", "make_pair", "Box", "L2Ball", "Domain",
           "Region", "PairBounds", "CertifyResult"]

METHODS: dict[str, str] = {
    "naive": "prunecert.certify.naive:naive_bounds",
    "diff-interval": "prunecert.certify.diff_interval:diff_interval_bounds",
    "diff-linear": "prunecert.certify.diff_linear:diff_linear_bounds",
    "lp": "prunecert.certify.lp:lp_bounds",
    "milp": "prunecert.certify.milp:milp_bounds",
    "bab": "prunecert.certify.bab:bab_bounds",
}

# options certify() forwards to a method only when its signature names them
_FORWARDED = ("time_limit", "tolerance", "seed", "progress")


def get_method(name: str) -> Callable[..., PairBounds]:
    """The bound function registered as `name` (ConfigError if unknown or not installed)."""
    if name not in METHODS:
        raise ConfigError(f"unknown certification method {name!r}; valid: {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise ConfigError(f"method {name!r} is not available: module {module} is missing") from exc
        raise
    except AttributeError as exc:
        raise ConfigError(f"method {name!r} is not available: {module} has no {attr}") from exc


def _as_pair(original, pruned) -> Pair:
    if isinstance(original, Pair):
        return original
    if isinstance(original, (str, os.PathLike)) or isinstance(pruned, (str, os.PathLike)):
        from prunecert.io import load_model
        original = load_model(original) if not isinstance(original, Network) else original
        pruned = load_model(pruned) if not isinstance(pruned, Network) else pruned
    return make_pair(original, pruned)


def _check_regions(pair: Pair, regions) -> Sequence[Region]:
    # a Sequence (a list, or a LazyRegions that builds regions as chunks need them) is kept as it is
    regions = [regions] if isinstance(regions, Region) else regions if isinstance(regions, Sequence) \
        else list(regions)
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


def _method_kwargs(fn: Callable, options: dict) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params and v is not None}


def certify(original: Network | Pair | str | os.PathLike, pruned: Network | str | os.PathLike | None,
            regions: Region | Sequence[Region], method: str = "diff-linear", tolerance: float | None = None,
            time_limit: float | None = None, progress: bool = True, seed: int = 0, samples: int = 256,
            batch_size: int = 32, search: Callable[..., SearchResult] | None = None, workers: int | None = 1,
            scheduler: str | None = None, threads: int | None = None, executor: Executor | None = None,
            **method_options) -> CertifyResult:
    """Certify max |a_l^f - a_l^g| per layer (local and end-to-end) and top-1 agreement over regions.

    `original`/`pruned` are Networks (a compact pruned one is completed onto the original) or model
    paths, or `original` is a ready `Pair` and `pruned` None. Regions are processed in chunks of
    `batch_size` through the bound method; then `search` (default: `sample_search` with `samples`
    points per region, each region seeded by `seed` and the region itself) looks for counterexamples.
    Chunks run on `executor`, or on one made from `workers` (None: every usable core) / `scheduler`
    (a Dask address or "local"); the result does not depend on which. Extra keyword options go to the
    method (e.g. `iterations`). For many regions, `certify_stream` yields chunk results as they come.
    """
    start = time.perf_counter()
    parts = [part for _, part in certify_stream(original, pruned, regions, method, tolerance, time_limit, progress,
                                                seed, samples, batch_size, search, workers, scheduler, threads,
                                                executor, **method_options)]
    return concat_results(parts, time.perf_counter() - start)


def certify_stream(original: Network | Pair | str | os.PathLike, pruned: Network | str | os.PathLike | None,
                   regions: Region | Sequence[Region], method: str = "diff-linear", tolerance: float | None = None,
                   time_limit: float | None = None, progress: bool = True, seed: int = 0, samples: int = 256,
                   batch_size: int = 32, search: Callable[..., SearchResult] | None = None,
                   workers: int | None = 1, scheduler: str | None = None, threads: int | None = None,
                   executor: Executor | None = None, **method_options) -> Iterator[tuple[int, CertifyResult]]:
    """`certify`, chunk by chunk: yields (index of the chunk's first region, its CertifyResult) in order,
    holding only a few chunks at a time (write each one out to keep memory flat)."""
    pair = _as_pair(original, pruned)
    regions = _check_regions(pair, regions)
    tolerance = _check_tolerance(tolerance)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(samples) < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    fn = get_method(method)
    slices = region_chunks(regions, batch_size)
    with contextlib.ExitStack() as stack:
        if executor is None:
            executor = stack.enter_context(open_executor(workers, scheduler, threads, n_items=len(slices)))
        in_process = isinstance(executor, InProcessExecutor)
        auto_witness = method == "milp" and "witness" not in method_options
        kwargs = _method_kwargs(fn, {"time_limit": time_limit, "tolerance": tolerance, "seed": seed,
                                     "progress": progress and in_process, **method_options})
        setup = CertifySetup(pair, method, fn, kwargs, int(samples), int(seed), tolerance, search, auto_witness)
        shared = executor.share(setup)
        chunks = ((s.start, regions[s]) for s in slices)
        with progress_task(f"certify ({method})", len(regions), progress) as task:
            for s, part in zip(slices, executor.map(certify_chunk, shared, chunks)):
                task.advance(s.stop - s.start)
                yield s.start, part
