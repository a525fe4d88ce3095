"""`prunecert train` and `prunecert info`: make a model to prune, and look inside any model file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from prunecert.cli import app
from prunecert.cli.options import InputDomain, Seed


@app.command()
def train(
    arch: str = typer.Option("lenet300", help="Architecture: lenet300 (784-300-100-10) or vgg-small (a small CNN)."),
    data: str = typer.Option("mnist5k", help="Data set: mnist5k, digits, fashion, idx:DIR or npz:FILE."),
    epochs: int = typer.Option(20, help="Training epochs."),
    seed: Seed = 0,
    lr: float = typer.Option(1e-3, help="Adam learning rate (cosine-annealed to 0)."),
    batch_size: int = typer.Option(64, help="Mini-batch size."),
    out: Path = typer.Option(..., help="Output model file (.pt native; .onnx and .nnet by suffix)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default 1, the policy of every "
                                          "command: mini-batches of small nets run fastest on one thread; raise it "
                                          "for large models)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a ReLU network on a data set and save it (atomically) as a model file.

    Example: prunecert train --arch lenet300 --data mnist5k --epochs 20 --seed 0 --out lenet.pt
    """
    from prunecert.fileutil import check_output_file
    from prunecert.io import save_model
    from prunecert.threads import apply_thread_policy
    from prunecert.train import train_model

    check_output_file(out, "--out")
    apply_thread_policy(1, threads)
    net = train_model(arch, data, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, progress=not quiet,
                      name=out.stem)
    save_model(net, out)
    record = net.metadata["training"]
    typer.echo(f"test accuracy {record['test_accuracy']:.4f} (train {record['train_accuracy']:.4f}) "
               f"on {record['dataset']}; {net.n_params():,} parameters; saved {out}")


@app.command()
def info(
    model: Path = typer.Argument(..., help="Model file (.pt, .onnx, .nnet, or a torch state_dict with --arch)."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a bare torch state_dict: mlp:784-300-100-10 or a JSON file (see prunecert.io.torch_io)."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON instead of tables."),
    input_domain: InputDomain = None,
) -> None:
    """Show a model's layers, size, input domain and metadata (training and pruning records).

    Example: prunecert info lenet.pt
    """
    from prunecert.io import load_model, parse_input_domain, weights_sha256

    net = load_model(model, arch, parse_input_domain(input_domain))
    summary = describe_model(net)
    summary["weights_sha256"] = weights_sha256(net)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return
    _print_summary(str(model), summary)


def describe_model(net) -> dict:
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


def _short(value, limit: int = 70) -> str:
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


def _print_summary(source: str, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{source}  ({s['name']})")
    for col, justify in (("#", "right"), ("name", "left"), ("ops", "left"), ("in", "left"), ("out", "left"),
                         ("neurons", "right"), ("params", "right")):
        table.add_column(col, justify=justify, no_wrap=col != "ops", overflow="fold")  # only ops wraps
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


def _meta_rows(prefix: str, value, depth: int = 0) -> list[tuple[str, str]]:
    """Flatten metadata two levels deep; a short list of records (e.g. per-layer pruning) gets a row each."""
    if isinstance(value, dict) and value and depth < 2:
        return [row for k, v in value.items() for row in _meta_rows(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)]
    if isinstance(value, list) and 0 < len(value) <= 32 and all(isinstance(v, dict) for v in value):
        return [(f"{prefix}[{i}]", _short(v, 100)) for i, v in enumerate(value)]
    return [(prefix, _short(value))]
