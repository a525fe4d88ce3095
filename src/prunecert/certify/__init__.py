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
from prunecert.certify.classprop import ClassProperty, open_classes, replay
from prunecert.certify.refute import SearchResult, sample_search
from prunecert.certify.settle import ClassSearch, settle
from prunecert.core.regions import Box, Domain, L2Ball, Region, stack_boxes
from prunecert.certify.formulation import check_encodable
from prunecert.certify.result import Agreement, CertifyResult, LayerResult, PairBounds, truncated_regions
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Network

__all__ = ["certify", "METHODS", "BoundMethod", "get_method", "Pair", "make_pair", "Box", "L2Ball", "Domain", "Region",
           "PairBounds", "CertifyResult"]

BAB_SECONDS = 10.0   # per region, for --method bab's complete verdicts when no time limit is given


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
            logits: Sequence[int] | None = None, delta: float | None = None, complete: float | None = None,
            class_search: Callable[[Pair], ClassSearch] | None = None, **method_options) -> CertifyResult:
    """Certify max |a_l^f - a_l^g| per layer (local and end-to-end) and top-1 agreement over regions.

    `original`/`pruned` are Networks (a compact pruned one is completed onto the original) or model
    paths, or `original` is a ready `Pair` and `pruned` None. Regions are processed `batch_size` at a
    time through the bound method; then `search` (default: `sample_search` with `samples` points per
    region) looks for counterexamples. Extra keyword options go to the method (e.g. `iterations`).

    Properties: the tolerance verdict is over the `logits` chosen (all by default); `delta` adds
    delta-top-1 equivalence verdicts (softmax_c(f) > delta implies argmax g = c). `complete`:
    seconds per region to settle the class verdicts still unknown after the bounds (`settle.py`:
    search, then branch and bound); `method="bab"` implies it (`time_limit`, default BAB_SECONDS).
    `class_search(pair)` builds the counterexample search settle runs first (e.g.
    `prunecert.adversarial.witness.class_search`). certify does not import the attacks: pass
    `witness=milp_witness(pair)` for milp and `reach=reach_search(pair)` for bab the same way
    (the CLI and the audit do).
    """
    start = time.perf_counter()
    pair = _as_pair(original, pruned)
    regions = _check_regions(pair, regions)
    tolerance = _check_tolerance(tolerance)
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time limit must be a finite number of seconds > 0, got {time_limit!r}")
    logits = _check_logits(pair, logits)
    prop_delta = ClassProperty.delta_top1(delta) if delta is not None else None
    if method == "bab" and complete is None:
        complete = float(time_limit) if time_limit is not None else BAB_SECONDS
    if complete is not None and not (math.isfinite(float(complete)) and float(complete) > 0):
        raise ConfigError(f"complete (seconds per region) must be a finite number > 0, got {complete!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    registered = get_method(method)
    if registered.encodes_pair:
        check_encodable(pair, f"--method {method}", "use --method diff-linear or crown-diff (they scale to conv nets)")
    fn = registered.bounds
    kwargs = registered.arguments({"time_limit": time_limit, "tolerance": tolerance, "seed": seed,
                                   "progress": progress, "logits": logits}, method_options)
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
    found = [_with_method_point(pair, r, info) for r, info in
             zip(found, _concat_info(chunks, "bab") or [None] * len(found))]
    result = _result(pair, regions, bounds, found, method, tolerance, seed, time.perf_counter() - start, logits)
    result.truncated = truncated
    finder = class_search(pair) if class_search is not None else None
    if prop_delta is not None:
        result.delta, result.delta_top1 = prop_delta.delta, class_verdicts(pair, lo, hi, bounds, prop_delta)
    if complete is not None:
        with _progress(progress) as bar:
            task = bar.add_task("complete verdicts (branch and bound)", total=len(regions))
            for b in range(len(regions)):
                _settle_region(pair, lo[b], hi[b], bounds.select(slice(b, b + 1)), result, b, float(complete),
                               finder, regions[b])
                bar.advance(task)
    result.seconds = time.perf_counter() - start
    return result


def _concat_info(chunks: list[PairBounds], key: str) -> list[dict] | None:
    """Per-region details a method left in `info[key]` (e.g. bab's reached point), over all chunks."""
    if not all(key in c.info for c in chunks):
        return None
    return [d for c in chunks for d in c.info[key]]


def _with_method_point(pair: Pair, res: SearchResult, info: dict | None) -> SearchResult:
    """The search's result, or the method's own reached point (bab's attack) when that goes further:
    re-evaluated here by a float64 forward pass, so a tolerance it exceeds is refuted with that input."""
    point = None if info is None else info.get("point")
    if point is None:
        return res
    x = torch.as_tensor(np.asarray(point, dtype=np.float64)).reshape(1, *pair.input_shape)
    with torch.no_grad():
        value = float(pair.deltas(x)[-1].abs().max())
    if value <= res.max_abs_logit_deviation:
        return res
    return SearchResult(value, x[0].numpy().copy(), res.disagreement, res.class_f, res.class_g)


def _check_logits(pair: Pair, logits: Sequence[int] | None) -> list[int] | None:
    if logits is None:
        return None
    out = sorted({int(k) for k in logits})
    if not out or out[0] < 0 or out[-1] >= pair.n_classes:
        raise ConfigError(f"logits must be indices in 0..{pair.n_classes - 1}, got {list(logits)}")
    return out


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
                   b: int, seconds: float, finder, region: Region) -> None:
    """Settle region b's open class verdicts (agreement, and delta-top-1 when asked) in place."""
    if isinstance(region, L2Ball):
        return   # the complete stage works on boxes; an L2 ball keeps the bounds' verdict
    lists = [(result.agreement, ClassProperty.agreement())]
    if result.delta_top1 is not None:
        lists.append((result.delta_top1, ClassProperty.delta_top1(result.delta)))
    for verdicts, prop in lists:
        if verdicts[b].verdict != "unknown":
            continue
        s = settle(pair, lo.numpy(), hi.numpy(), prop, seconds, bounds, finder)
        point = None if s.point is None else s.point.reshape(-1)
        verdicts[b] = Agreement(s.verdict, point=point, class_f=s.class_f, class_g=s.class_g, stage=s.stage,
                                seconds=s.seconds, details=s.details)


def _check_finite(bounds: PairBounds, method: str) -> None:
    for l, (d, loc) in enumerate(zip(bounds.delta, bounds.local)):
        for name, t in (("end-to-end", d.lower), ("end-to-end", d.upper), ("local", loc.lower), ("local", loc.upper)):
            if torch.isnan(t).any():
                raise RuntimeError(f"method {method!r} returned NaN {name} bounds at layer {l}: a bug, please report")


def _result(pair: Pair, regions: list[Region], bounds: PairBounds, found: list[SearchResult], method: str,
            tolerance: float | None, seed: int, seconds: float, logits: list[int] | None = None) -> CertifyResult:
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
            raise RuntimeError(f"method {method!r} certified max |Delta_logit| <= {max_dev[b]:.6g} on region {b} "
                               f"but a sample reaches {res.max_abs_logit_deviation:.6g}: unsound bound, please report")
        if bool(proved[b]) and res.disagreement is not None:
            raise RuntimeError(f"method {method!r} proved top-1 agreement on region {b} but at a sampled point "
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
