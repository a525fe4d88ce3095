"""The arguments and options several commands share (one declaration, one help text, one valid range).

certify and attack take the same two models, and they and prune's certified search the same region
options (read with `core.region_options.regions_from_options`); declaring them once keeps their flags
and help identical. A command's own options are fields of its options dataclass (`cli.command`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional, Protocol, Sequence

import typer

from prunecert.adversarial import attacks_help
from prunecert.certify.methods import methods_help
from prunecert.core.pair import Pair
from prunecert.core.region_options import expand_center_specs, regions_from_options
from prunecert.core.regions import Region
from prunecert.scale.lazy import LazyRegions

MAX_SEED = 2**63 - 1  # torch and numpy generators take 64-bit seeds

Seed = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of every random choice (0 .. 2**63-1); "
                                   "the same seed gives the same results, bit for bit.")]
InputDomain = Annotated[Optional[str], typer.Option(
    "--input-domain", help="The models' input box, replacing the file's own (ONNX has none and gets [0, 1]): LO,HI "
                           "for every input (e.g. -1,1), a .npy of shape (2, *input_shape), or LO.npy,HI.npy.")]
Original = Annotated[Path, typer.Argument(help="The original model file (.pt, .onnx, .nnet).")]
Pruned = Annotated[Path, typer.Argument(help="The pruned (or quantised / fine-tuned) model file.")]
Centers = Annotated[Optional[List[str]], typer.Option(
    "--center", help="Region centre: dataset:split:index, a range dataset:split:A-B (inclusive), or a .npy file; "
                     "repeatable.")]
Eps = Annotated[Optional[float], typer.Option(help="Radius of the ball around each centre.")]
Norm = Annotated[str, typer.Option(help="Ball norm: inf (a box) or 2.")]
RegionName = Annotated[Optional[str], typer.Option(help="'domain': the whole input box (data-independent).")]
Vnnlib = Annotated[Optional[Path], typer.Option(help="A VNN-LIB file whose input box is the region.")]
CertifyMethod = Annotated[str, typer.Option(help="Bound method. " + methods_help())]
AttackMethod = Annotated[str, typer.Option(help="Attack method. " + attacks_help())]

# scale-out and the thread policy (prunecert.scale, prunecert.threads; docs/scale.md)
Workers = Annotated[Optional[int], typer.Option(
    "--workers", help="Worker processes (default: the cores this process may use); 1 runs in this process.")]
Scheduler = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Run chunks on a Dask cluster: its scheduler address (tcp://host:8786), or 'local' for "
                        "an embedded LocalCluster of --workers processes.")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", help="torch threads per worker (default 1: the workers give the parallelism, and results are "
                      "bit-identical across executors for equal --threads; keep workers x threads <= cores).")]


class RegionFields(Protocol):
    """The region options of a command (certify, attack and prune's certified search declare them)."""

    @property
    def center(self) -> list[str] | None: ...
    @property
    def eps(self) -> float | None: ...
    @property
    def norm(self) -> str: ...
    @property
    def region(self) -> str | None: ...
    @property
    def vnnlib(self) -> Path | None: ...


def cli_regions(pair: Pair, o: RegionFields) -> Sequence[Region]:
    """The regions the options name. Centre lists become a `LazyRegions` that builds each region when its
    chunk needs it, so memory does not grow with the number of centres (docs/scale.md)."""
    lo, hi = pair.domain()

    def build(specs: Sequence[str]) -> list[Region]:
        return regions_from_options(pair.input_shape, lo, hi, centers=specs, eps=o.eps, norm=o.norm,
                                    region=o.region, vnnlib=o.vnnlib)

    if not o.center or o.region is not None or o.vnnlib is not None:
        return build(o.center or [])
    specs = expand_center_specs(o.center)
    build(specs[:1])  # a bad option (no --eps, a bad norm) fails here, before any work
    return LazyRegions(len(specs), lambda i: build([specs[i]])[0])
