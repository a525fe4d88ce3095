"""Regions from the command line's words: centre specs (`mnist5k:test:0-99`, `.npy`), `--eps`/`--norm`,
`--region domain`, `--vnnlib FILE`. Kept apart from `regions` so the region types stay free of parsing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from prunecert.core.regions import NORMS, Box, Domain, L2Ball, Region
from prunecert.data import load_point, parse_point
from prunecert.errors import DataError, RegionError
from prunecert.io.vnnlib import read_vnnlib_box
from prunecert.network import TensorLike

MAX_CENTRES = 100_000  # regions one command line may name (a range is checked before it is expanded)


def expand_center_specs(specs: Sequence[str]) -> list[str]:
    """`mnist5k:test:0-9` -> ten specs `mnist5k:test:0` ... `mnist5k:test:9` (inclusive range).

    A range is checked before it is expanded: its last index must exist in the data set, and all the
    specs together may name at most MAX_CENTRES points.
    """
    out: list[str] = []
    for spec in specs:
        head, _, tail = spec.rpartition(":")
        a, dash, b = tail.partition("-")
        if head and dash and a.isdigit() and b.isdigit():
            if int(b) < int(a):
                raise RegionError(f"centre range {spec!r}: end {b} is before start {a}")
            try:
                load_point(f"{head}:{b}")  # the last index must exist: checked before expanding the range
            except DataError as exc:
                raise RegionError(f"centre range {spec!r}: {exc}") from None
            if len(out) + int(b) - int(a) + 1 > MAX_CENTRES:
                raise RegionError(f"centre range {spec!r}: too many points ({int(b) - int(a) + 1:,}; at most "
                                  f"{MAX_CENTRES:,} regions per command)")
            out.extend(f"{head}:{i}" for i in range(int(a), int(b) + 1))
        else:
            out.append(spec)
        if len(out) > MAX_CENTRES:
            raise RegionError(f"too many centres (at most {MAX_CENTRES:,} regions per command)")
    return out


def regions_from_options(input_shape: Sequence[int], domain_lo: TensorLike, domain_hi: TensorLike, *,
                         centers: Sequence[str] = (),
                         eps: float | None = None, norm: str = "inf", region: str | None = None,
                         vnnlib: str | Path | None = None) -> list[Region]:
    """The regions named by the CLI options (`--center/--eps/--norm`, `--region domain`, `--vnnlib`)."""
    shape = tuple(int(s) for s in input_shape)
    dlo = np.broadcast_to(np.asarray(domain_lo, dtype=np.float64), shape)
    dhi = np.broadcast_to(np.asarray(domain_hi, dtype=np.float64), shape)
    chosen = sum([bool(centers), region is not None, vnnlib is not None])
    if chosen != 1:
        raise RegionError("give exactly one region: --center SPEC --eps E, --region domain, or --vnnlib FILE "
                          f"(got {chosen})")
    if (region is not None or vnnlib is not None) and (norm != "inf" or eps is not None):
        given = f"--norm {norm}" if norm != "inf" else f"--eps {eps:g}"
        raise RegionError(f"{given} applies to --center balls only; --region domain and --vnnlib regions are "
                          "boxes of their own")
    if region is not None:
        if region != "domain":
            raise RegionError(f"--region {region!r}: only 'domain' is supported (use --center/--eps for balls)")
        return [Domain(dlo, dhi)]
    if vnnlib is not None:
        boxes = [read_vnnlib_box(vnnlib, math.prod(shape))]  # one (lo, hi) box: a union is refused there
        return [Box(lo, hi, dlo, dhi, source=f"{vnnlib}" + (f"#{i}" if len(boxes) > 1 else ""))
                for i, (lo, hi) in enumerate(boxes)]
    if eps is None:
        raise RegionError("--center needs --eps (the radius of the ball around the centre)")
    if norm not in NORMS:
        raise RegionError(f"--norm {norm!r}: expected one of {', '.join(NORMS)}")
    out: list[Region] = []
    for spec in expand_center_specs(centers):
        point = parse_point(spec)
        if norm == "inf":
            out.append(Box.around(point, eps, dlo, dhi, source=spec))
        else:
            out.append(L2Ball(point, eps, dlo, dhi, source=spec))
    return out
