"""The models of `prunecert audit --demo`: a LeNet-300-100 trained on mnist5k and its coreset-pruned,
distilled twin, each cached (in $PRUNECERT_CACHE, else ~/.cache/prunecert) and reused while it matches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import typer

from prunecert.audit import AuditPlan
from prunecert.data import load_dataset
from prunecert.errors import ModelFormatError, PrunecertError
from prunecert.io import load_model, save_model, weights_sha256
from prunecert.io.torch_io import network_from_module
from prunecert.network import Network
from prunecert.prune import prune
from prunecert.threads import one_torch_thread
import prunecert.train  # train_model through its module: tests replace it to prove no work starts before the checks
from prunecert.train import build_arch


class Demo(TypedDict):
    """What the demo trains, prunes and audits (the options it fills in when not given)."""

    arch: str
    data: str
    epochs: int
    compression: float
    fine_tune: int
    points: int
    eps: str
    tolerance: float
    out: str


DEMO: Demo = {"arch": "lenet300", "data": "mnist5k", "epochs": 10, "compression": 0.9, "fine_tune": 30,
              "points": 10, "eps": "0.01,0.02", "tolerance": 1.0, "out": "reports/demo"}


def cache_dir() -> Path:
    """$PRUNECERT_CACHE, else ~/.cache/prunecert."""
    env = os.environ.get("PRUNECERT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prunecert"


def untrained_demo_model(data: str) -> Network:
    """The demo architecture with random weights (for checking the options before training)."""
    ds = load_dataset(data)
    return network_from_module(build_arch(DEMO["arch"], ds.input_shape, ds.n_classes), ds.input_shape,
                               name=f"{DEMO['arch']}-{ds.name}")


def demo_model(seed: int, progress: bool, data: str | None = None) -> tuple[Network, str | None]:
    """The demo's LeNet-300-100 (on mnist5k unless `data`): from the cache when a matching one is there,
    else trained and cached. Returns (network, cache path or None)."""
    data = data or DEMO["data"]
    path = cache_dir() / f"{DEMO['arch']}-{data.replace(':', '_').replace('/', '_')}-e{DEMO['epochs']}-s{seed}.pt"
    want = {"arch": DEMO["arch"], "dataset": load_dataset(data).name, "epochs": DEMO["epochs"], "seed": seed}
    if path.is_file():
        try:
            net = load_model(path)
            training = net.metadata.get("training", {})
            if all(training.get(k) == v for k, v in want.items()):
                if progress:
                    typer.echo(f"demo: using the cached model {path}", err=True)
                return net, tilde(path)
        except ModelFormatError:
            pass  # a damaged cache entry: train again and replace it
    if progress:
        typer.echo(f"demo: training {DEMO['arch']} on {data} ({DEMO['epochs']} epochs, seed {seed}); "
                   f"cached in {path}", err=True)
    with one_torch_thread():  # small batches: one thread is several times faster on a shared 2-core machine
        net = prunecert.train.train_model(DEMO["arch"], data, epochs=DEMO["epochs"], seed=seed, progress=progress,
                          name=f"{DEMO['arch']}-{data}")
    try:
        save_model(net, path)
    except (PrunecertError, OSError) as exc:
        typer.echo(f"demo: could not cache the model ({exc}); continuing", err=True)
        return net, None
    return net, tilde(path)


def demo_pruned(plan: AuditPlan, progress: bool) -> tuple[Network, str | None]:
    """The demo's pruned (and distilled) model for `plan.prune_options`: from the cache when one was
    made from this very original (weights hash) with these options and seed, else pruned and cached."""
    options = dict(plan.prune_options)
    key = "-".join(f"{k}{v}" for k, v in sorted(options.items()) if v is not None)
    original_hash = weights_sha256(plan.original)
    path = cache_dir() / f"{DEMO['arch']}-{original_hash[:12]}-{key}-s{plan.seed}.pt"
    if path.is_file():
        try:
            net = load_model(path)
            if net.metadata.get("pruning", {}).get("original_weights_sha256") == original_hash:
                if progress:
                    typer.echo(f"demo: using the cached pruned model {path}", err=True)
                return net, tilde(path)
        except PrunecertError:
            pass  # a damaged cache entry: prune again and replace it
    if progress:
        typer.echo(f"demo: pruning ({key}); cached in {path}", err=True)
    with one_torch_thread():   # distillation in small batches: 1 thread was ~10x faster on a busy 2-core machine
        net = prune(plan.original, options.pop("method"), seed=plan.seed, progress=progress,
                    data=plan.dataset if options.get("fine_tune") else None, **options)
    try:
        save_model(net, path)
    except (PrunecertError, OSError) as exc:
        typer.echo(f"demo: could not cache the pruned model ({exc}); continuing", err=True)
        return net, None
    return net, tilde(path)


def tilde(path: Path) -> str:
    """`path` with the home folder written as ~ (reports do not need to show the user's home)."""
    try:
        return str(Path("~") / path.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)
