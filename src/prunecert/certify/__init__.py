"""Sound bounds on how far a pruned network g deviates from its original f over input regions.

`certify(original, pruned, regions, method=...)` is the one entry point: it pairs the networks
(`make_pair`), runs a bound method over all regions at once (batched), searches each region for
counterexamples, and returns a `CertifyResult` (per-layer local and end-to-end bounds, verdicts,
`to_json()`). Methods share the signature `(pair, lo, hi, ...) -> PairBounds` and are registered
in `certify.methods` (unknown options are rejected there).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch

from prunecert.core.completion import make_pair
from prunecert.core.pair import Pair
from prunecert.certify.methods import METHODS, BoundMethod, get_method
from prunecert.certify.refute import SearchResult, sample_search
from prunecert.core.regions import Box, Domain, L2Ball, Region, stack_boxes
from prunecert.certify.formulation import check_encodable
from prunecert.certify.result import Agreement, CertifyResult, LayerResult, PairBounds, truncated_regions
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Network

__all__ = ["certify", "METHODS", "BoundMethod", "get_method", "Pair", "make_pair", "Box", "L2Ball", "Domain", "Region",
           "PairBounds", "CertifyResult"]

def _as_pair(original, pruned) -> Pair:
    if isinstance(original, Pair):
        return original
    if isinstance(original, (str, os.PathLike)) or isinstance(pruned, (str, os.PathLike)):
        from prunecert.io import load_model
        original = load_model(original) if not isinstance(original, Network) else original
        pruned = load_model(pruned) if not isinstance(pruned, Network) else pruned
    return make_pair(original, pruned)


def _check_regions(pair: Pair, regions) -> list[Region]:
    regions = [regions] if isinstance(regions, Region) else list(regions)
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


def _chunks(regions: list[Region], batch_size: int) -> list[slice]:
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


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.console import Console
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def certify(original: Network | Pair | str | os.PathLike, pruned: Network | str | os.PathLike | None,
            regions: Region | Sequence[Region], method: str = "diff-linear", tolerance: float | None = None,
            time_limit: float | None = None, progress: bool = True, seed: int = 0, samples: int = 256,
            batch_size: int = 32, search: Callable[..., SearchResult] | None = None,
            **method_options) -> CertifyResult:
    """Certify max |a_l^f - a_l^g| per layer (local and end-to-end) and top-1 agreement over regions.

    `original`/`pruned` are Networks (a compact pruned one is completed onto the original) or model
    paths, or `original` is a ready `Pair` and `pruned` None. Regions are processed `batch_size` at a
    time through the bound method; then `search` (default: `sample_search` with `samples` points per
    region) looks for counterexamples. Extra keyword options go to the method (e.g. `iterations`).
    """
    start = time.perf_counter()
    pair = _as_pair(original, pruned)
    regions = _check_regions(pair, regions)
    tolerance = _check_tolerance(tolerance)
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time limit must be a finite number of seconds > 0, got {time_limit!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    registered = get_method(method)
    if registered.encodes_pair:
        check_encodable(pair, f"--method {method}", "use --method diff-linear or crown-diff (they scale to conv nets)")
    fn = registered.bounds
    kwargs = registered.arguments({"time_limit": time_limit, "tolerance": tolerance, "seed": seed,
                                   "progress": progress}, method_options)
    takes_l2 = "l2" in registered.options
    lo, hi = stack_boxes(regions)
    lo, hi = lo.reshape(len(regions), *pair.input_shape), hi.reshape(len(regions), *pair.input_shape)
    search = search or sample_search
    gen = torch.Generator().manual_seed(int(seed))
    chunks, found, truncated = [], [], []
    with _progress(progress) as bar:
        task = bar.add_task(f"certify ({method})", total=len(regions))
        for part in _chunks(regions, batch_size):
            l2 = _l2(regions[part], pair) if takes_l2 else None
            chunks.append(fn(pair, lo[part], hi[part], **kwargs, **({"l2": l2} if l2 is not None else {})))
            truncated += truncated_regions(chunks[-1].info, part.stop - part.start)
            bar.advance(task, part.stop - part.start)
        task = bar.add_task("counterexample search", total=len(regions))
        for r in regions:
            found.append(search(pair, r, samples, gen))
            bar.advance(task)
    bounds = chunks[0] if len(chunks) == 1 else PairBounds.concat(chunks)
    _check_finite(bounds, method)
    result = _result(pair, regions, bounds, found, method, tolerance, seed, time.perf_counter() - start)
    result.truncated = truncated
    return result


def _check_finite(bounds: PairBounds, method: str) -> None:
    for l, (d, loc) in enumerate(zip(bounds.delta, bounds.local)):
        for name, t in (("end-to-end", d.lower), ("end-to-end", d.upper), ("local", loc.lower), ("local", loc.upper)):
            if torch.isnan(t).any():
                raise RuntimeError(f"method {method!r} returned NaN {name} bounds at layer {l}: a bug, please report")


def _result(pair: Pair, regions: list[Region], bounds: PairBounds, found: list[SearchResult], method: str,
            tolerance: float | None, seed: int, seconds: float) -> CertifyResult:
    layers = [LayerResult(lf.index, lf.name, bounds.local[l].lower.numpy(), bounds.local[l].upper.numpy(),
                          bounds.delta[l].lower.numpy(), bounds.delta[l].upper.numpy())
              for l, lf in enumerate(pair.layers_f)]
    proved, cls = bounds.proved_agreement()
    max_dev = bounds.max_abs_logit_deviation().numpy()
    agreement = []
    for b, res in enumerate(found):
        if res.max_abs_logit_deviation > max_dev[b] * (1 + 1e-9) + 1e-12:
            raise RuntimeError(f"method {method!r} certified max |Delta_logit| <= {max_dev[b]:.6g} on region {b} "
                               f"but a sample reaches {res.max_abs_logit_deviation:.6g}: unsound bound, please report")
        if bool(proved[b]) and res.disagreement is not None:
            raise RuntimeError(f"method {method!r} proved top-1 agreement on region {b} but at a sampled point "
                               f"f picks {res.class_f} and g picks {res.class_g}: unsound bound, please report")
        if bool(proved[b]):
            agreement.append(Agreement("proved", label=int(cls[b])))
        elif res.disagreement is not None:
            agreement.append(Agreement("refuted", point=res.disagreement, class_f=res.class_f, class_g=res.class_g))
        else:
            agreement.append(Agreement("unknown"))
    return CertifyResult(method, [r.describe() for r in regions], layers, max_dev,
                         np.array([r.max_abs_logit_deviation for r in found]), [r.max_point for r in found],
                         agreement, tolerance, seconds, seed, bounds)
