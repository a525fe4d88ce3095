"""Optional fine-tuning of a compact pruned network (plain training, or distillation from the original).

Fine-tuning changes the weights, so afterwards the coreset guarantee no longer describes the network:
the record keeps the sampling numbers (what the data-free step gave) but flags
`provable_bound_valid: false` at the top and on every layer, and stores the accuracy before/after.
Certification (`prunecert certify`) still applies: it bounds the deviation of whatever weights g has.

Settings are chosen on purpose (measured on LeNet-300-100 / mnist5k at keep 10 %, see
benchmarks/results/pruning.md): at 5-10 epochs plain cross-entropy, T = 1 and T = 4 distillation are
within seed noise of each other (another engineer saw T = 4, alpha = 0.5 lose to plain CE at 5
epochs); at 30-100 epochs distillation with T = 4 and alpha = 0.9 (mostly the soft targets) recovered
the most (7.6 % vs 8.3-9.0 % test error for plain CE), so that is the default. Adam lr 1e-3 with cosine
decay, batch 64.
"""

from __future__ import annotations

from prunecert.errors import ConfigError
from prunecert.network import Network

FINE_TUNE = {"lr": 1e-3, "batch_size": 64, "temperature": 4.0, "alpha": 0.9}


def fine_tune(pruned: Network, original: Network, data, epochs: int, seed: int = 0, distill: bool = True,
              progress: bool = True, **overrides) -> Network:
    """Train the compact `pruned` network for `epochs` on `data` (a spec like 'mnist5k' or a Dataset)."""
    from prunecert.data import Dataset, load_dataset
    from prunecert.io.torch_io import network_from_module, network_to_module
    from prunecert.train import evaluate, fit

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"fine_tune must be a positive number of epochs, got {epochs!r}")
    if data is None:
        raise ConfigError("fine-tuning needs training data: pass data='mnist5k' (or another data set spec)")
    unknown = set(overrides) - set(FINE_TUNE)
    if unknown:
        raise ConfigError(f"unknown fine-tuning settings {sorted(unknown)}; known: {sorted(FINE_TUNE)}")
    settings = {**FINE_TUNE, **overrides}
    ds = data if isinstance(data, Dataset) else load_dataset(str(data))
    before = evaluate(pruned, ds.x_test, ds.y_test)
    module = network_to_module(pruned)
    fit(module, ds, epochs=epochs, lr=settings["lr"], batch_size=settings["batch_size"], seed=seed,
        teacher=original if distill else None, temperature=settings["temperature"], alpha=settings["alpha"],
        progress=progress)
    tuned = network_from_module(module, pruned.input_shape, pruned.input_lo, pruned.input_hi, name=pruned.name)
    meta = dict(pruned.metadata)
    rec = dict(meta["pruning"])
    rec["layers"] = [{**r, "provable_bound_valid": False} for r in rec["layers"]]
    rec["provable_bound_valid"] = False
    rec["fine_tune"] = {
        "epochs": int(epochs), "seed": int(seed), "dataset": ds.name, "distill": bool(distill),
        **({k: settings[k] for k in ("temperature", "alpha")} if distill else {}),
        "lr": settings["lr"], "batch_size": settings["batch_size"], "optimizer": "adam+cosine",
        "test_accuracy_before": before, "test_accuracy_after": evaluate(tuned, ds.x_test, ds.y_test),
        "note": "weights changed after sampling: the coreset provable bound no longer applies",
    }
    meta["pruning"] = rec
    tuned.metadata = meta
    return tuned
