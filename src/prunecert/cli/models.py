"""`prunecert train` and `prunecert info`: make a model to prune, and look inside any model file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from prunecert.cli.command import Options, command
from prunecert.cli.options import InputDomain, Seed
from prunecert.fileutil import check_output_file
import prunecert.io  # load_model through its module: tests replace it (tests/test_hostile_inputs.py)
from prunecert.io import parse_input_domain, save_model, weights_sha256
from prunecert.network import Network
from prunecert.threads import apply_thread_policy, threads_per_worker
from prunecert.train import train_model


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Options):
    """`prunecert train`'s command line (the fields, in --help order)."""

    arch: Annotated[str, typer.Option(
        help="Architecture: lenet300 (784-300-100-10) or vgg-small (a small CNN).")] = "lenet300"
    data: Annotated[str, typer.Option(help="Data set: mnist5k, digits, fashion, idx:DIR or npz:FILE.")] = "mnist5k"
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20
    seed: Seed = 0
    lr: Annotated[float, typer.Option(help="Adam learning rate (cosine-annealed to 0).")] = 1e-3
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64
    out: Annotated[Path, typer.Option(help="Output model file (.pt native; .onnx and .nnet by suffix).")]
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="torch threads (default 1, the policy of every command: mini-batches of small nets run "
                          "fastest on one thread; raise it for large models).")] = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False

    def checked(self) -> TrainOptions:
        check_output_file(self.out, "--out")
        threads_per_worker(1, self.threads)
        return self


@command("train", TrainOptions)
def train(o: TrainOptions) -> int:
    """Train a ReLU network on a data set and save it (atomically) as a model file.

    Example: prunecert train --arch lenet300 --data mnist5k --epochs 20 --seed 0 --out lenet.pt
    """
    apply_thread_policy(1, o.threads)
    net = train_model(o.arch, o.data, epochs=o.epochs, seed=o.seed, lr=o.lr, batch_size=o.batch_size,
                      progress=not o.quiet, name=o.out.stem)
    save_model(net, o.out)
    record = net.metadata["training"]
    typer.echo(f"test accuracy {record['test_accuracy']:.4f} (train {record['train_accuracy']:.4f}) "
               f"on {record['dataset']}; {net.n_params():,} parameters; saved {o.out}")
    return 0


@dataclass(frozen=True, kw_only=True)
class InfoOptions(Options):
    """`prunecert info`'s command line."""

    model: Annotated[Path, typer.Argument(
        help="Model file (.pt, .onnx, .nnet, or a torch state_dict with --arch).")]
    arch: Annotated[Optional[str], typer.Option(
        help="Architecture of a bare torch state_dict: mlp:784-300-100-10 or a JSON file (see "
             "prunecert.io.torch_io).")] = None
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON instead of tables.")] = False
    input_domain: InputDomain = None


@command("info", InfoOptions)
def info(o: InfoOptions) -> int:
    """Show a model's layers, size, input domain and metadata (training and pruning records).

    Example: prunecert info lenet.pt
    """
    net = prunecert.io.load_model(o.model, o.arch, parse_input_domain(o.input_domain))
    summary = describe_model(net)
    summary["weights_sha256"] = weights_sha256(net)
    if o.as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        _print_summary(str(o.model), summary)
    return 0


def describe_model(net: Network) -> dict[str, Any]:
    """Everything `info` shows, as JSON-able data (layers, totals, domain, metadata)."""
    lo, hi = net.domain()
    return {
        "name": net.name, "input_shape": list(net.input_shape), "output_shape": list(net.output_shape),
        "layers": net.describe(), "params": net.n_params(), "flops": net.flops(),
        "domain": {"lo_min": float(np.min(lo)), "lo_max": float(np.max(lo)),
                   "hi_min": float(np.min(hi)), "hi_max": float(np.max(hi))},
        "metadata": net.metadata,
    }


def _fmt_range(a: float, b: float) -> str:
    return f"{a:g}" if a == b else f"{a:g}..{b:g}"


def _short(value: object, limit: int = 70) -> str:
    """A one-line rendering of a metadata value: scalars as is, containers summarised."""
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_short(v, 20)}" for k, v in value.items() if not isinstance(v, (dict, list)))
        nested = [k for k, v in value.items() if isinstance(v, (dict, list))]
        if nested:
            text += (", " if text else "") + "+" + ",".join(nested)
    elif isinstance(value, list):
        text = f"[{len(value)} items]" if len(value) > 4 or any(isinstance(v, (dict, list)) for v in value) \
            else ", ".join(_short(v, 20) for v in value)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_SHORT_OPS = {"conv2d": "conv", "avgpool2d": "pool", "flatten": "flat", "linear": "fc"}


def _print_summary(source: str, s: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"{source}  ({s['name']})")
    for col in ("#", "name", "ops", "in", "out", "neurons", "params"):  # only ops wraps
        table.add_column(col, justify="right" if col in ("#", "neurons", "params") else "left", no_wrap=col != "ops",
                         overflow="fold")
    for row in s["layers"]:  # every layer but the logits is followed by a ReLU (the IR's rule)
        table.add_row(str(row["index"]), row["name"], "+".join(_SHORT_OPS.get(k, k) for k in row["ops"]),
                      "x".join(map(str, row["in_shape"])), "x".join(map(str, row["out_shape"])),
                      f"{row['neurons']:,}", f"{row['params']:,}")
    console.print(table)
    d = s["domain"]
    console.print(f"total params {s['params']:,}   FLOPs (MACs) {s['flops']:,}   "
                  f"input {'x'.join(map(str, s['input_shape']))} in "
                  f"[{_fmt_range(d['lo_min'], d['lo_max'])}, {_fmt_range(d['hi_min'], d['hi_max'])}]")
    console.print(f"weights sha256 {s['weights_sha256']}")
    if s["metadata"]:
        meta = Table(title="metadata", show_header=False)
        meta.add_column("key", style="bold")
        meta.add_column("value")
        for key, value in _meta_rows("", s["metadata"]):
            meta.add_row(key, value)
        console.print(meta)


def _meta_rows(prefix: str, value: object, depth: int = 0) -> list[tuple[str, str]]:
    """Flatten metadata two levels deep; a short list of records (e.g. per-layer pruning) gets a row each."""
    if isinstance(value, dict) and value and depth < 2:
        return [row for k, v in value.items() for row in _meta_rows(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)]
    if isinstance(value, list) and 0 < len(value) <= 32 and all(isinstance(v, dict) for v in value):
        return [(f"{prefix}[{i}]", _short(v, 100)) for i, v in enumerate(value)]
    return [(prefix, _short(value))]
