"""Regions from the command line's words: centre specs (`mnist5k:test:0-99`, `.npy`), `--eps`/`--norm`,
`--region domain`, `--vnnlib FILE`. Kept apart from `regions` so the region types stay free of parsing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from prunecert.core.regions import NORMS, Box, Domain, L2Ball, Region
from prunecert.data import parse_point
from prunecert.errors import RegionError
from prunecert.io.vnnlib import read_vnnlib_box


def expand_center_specs(specs: Sequence[str]) -> list[str]:
    """`mnist5k:test:0-9` -> ten specs `mnist5k:test:0` ... `mnist5k:test:9` (inclusive range)."""
    out = []
    for spec in specs:
        head, _, tail = spec.rpartition(":")
        a, dash, b = tail.partition("-")
        if head and dash and a.isdigit() and b.isdigit():
            if int(b) < int(a):
                raise RegionError(f"centre range {spec!r}: end {b} is before start {a}")
            out.extend(f"{head}:{i}" for i in range(int(a), int(b) + 1))
        else:
            out.append(spec)
    return out


def regions_from_options(input_shape: Sequence[int], domain_lo, domain_hi, *, centers: Sequence[str] = (),
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
    if region is not None:
        if region != "domain":
            raise RegionError(f"--region {region!r}: only 'domain' is supported (use --center/--eps for balls)")
        return [Domain(dlo, dhi)]
    if vnnlib is not None:
        boxes = read_vnnlib_box(vnnlib, math.prod(shape))
        if isinstance(boxes, tuple) and len(boxes) == 2 and not isinstance(boxes[0], tuple):
            boxes = [boxes]
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
