"""The arguments and options several commands share (one declaration, one help text, one valid range).

Both commands take the same two models and read their regions with
`core.region_options.regions_from_options`; declaring them once keeps their flags and help identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from prunecert.adversarial import METHODS as ATTACK_METHODS
from prunecert.certify.methods import methods_help

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
AttackMethod = Annotated[str, typer.Option(help="Attack method: " + ", ".join(ATTACK_METHODS) + ".")]
