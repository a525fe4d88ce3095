"""Shared benchmark fixtures, so the certification and attack benchmarks measure the same pair and boxes.

    lenet_pair()          LeNet-300-100 trained on mnist5k (seed 0, 20 epochs) and its coreset-pruned
                          twin (compression 0.9: 90% of the hidden layers' parameters removed, seed 0)
    mnist_boxes(...)      L-inf boxes around mnist5k test images, clipped to [0, 1]
    EPS                   the radii both benchmarks sweep

Models are cached under benchmarks/.cache/ (git-ignored): built once, then loaded (sha256 checked).
Importing this module sets the process's allocator up as the `prunecert` command does
(`prunecert.scale.keep_freed_memory`), so benchmarks measure what users run; PRUNECERT_BENCH_MALLOC=default
in the environment leaves glibc's defaults (`memory.py` measures both).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from prunecert.io import load_model, save_model, weights_sha256
from prunecert.network import Network
from prunecert.scale import keep_freed_memory

if os.environ.get("PRUNECERT_BENCH_MALLOC", "keep") != "default":
    keep_freed_memory()

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
EPS = (0.005, 0.01, 0.02, 0.05)
TRAIN = dict(arch="lenet300", dataset_spec="mnist5k", epochs=20, seed=0)
PRUNE = dict(method="coreset", compression=0.9, seed=0)


def lenet_pair(progress: bool = True) -> tuple[Network, Network, dict]:
    """(original, compact pruned, description) of the benchmark pair, trained/pruned once and cached."""
    from prunecert.prune import prune
    from prunecert.train import train_model

    CACHE.mkdir(parents=True, exist_ok=True)
    f_path, g_path = CACHE / "lenet300-mnist5k.pt", CACHE / "lenet300-mnist5k-coreset90.pt"
    t0 = time.perf_counter()
    if f_path.is_file():
        f = load_model(f_path)
    else:
        f = train_model(**TRAIN, progress=progress, name="lenet300-mnist5k")
        save_model(f, f_path)
    g = load_model(g_path) if g_path.is_file() else None
    if g is None or g.metadata.get("pruning", {}).get("original_weights_sha256") != weights_sha256(f):
        g = prune(f, **PRUNE, progress=progress)
        save_model(g, g_path)
    info = {"original": {"file": f_path.name, "sha256": weights_sha256(f), "params": f.n_params(),
                         "training": {k: f.metadata.get("training", {}).get(k) for k in
                                      ("arch", "dataset", "epochs", "seed", "test_accuracy")}},
            "pruned": {"file": g_path.name, "sha256": weights_sha256(g), "params": g.n_params(), **PRUNE},
            "seconds_to_build_or_load": round(time.perf_counter() - t0, 2)}
    return f, g, info


def mnist_boxes(input_shape, domain_lo, domain_hi, n_centres: int, eps: float, start: int = 0) -> list:
    """L-inf boxes of radius eps around mnist5k test images start..start+n_centres-1."""
    from prunecert.core.region_options import regions_from_options
    return regions_from_options(input_shape, domain_lo, domain_hi,
                                centers=[f"mnist5k:test:{start}-{start + n_centres - 1}"], eps=eps)


def machine() -> dict:
    import os
    import platform
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
