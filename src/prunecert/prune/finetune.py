"""Optional fine-tuning of a compact pruned network (plain training, or distillation from the original).

Fine-tuning changes the weights, so afterwards the coreset guarantee no longer describes the network:
the record keeps the sampling numbers (what the data-free step gave) but flags
`provable_bound_valid: false` at the top and on every layer, and stores the accuracy before/after.
Certification (`prunecert certify`) still applies: it bounds the deviation of whatever weights g has.

Settings are chosen on purpose, from measurements on LeNet-300-100 / mnist5k (benchmarks/results/
pruning.md). At 10 epochs, distillation (T = 4, alpha = 0.9) and plain cross-entropy are within seed
noise for coreset and uniform pruning, but distillation is clearly worse for top-k at 5-10 % kept
(23.9 vs 20.9 %, 13.9 vs 10.1 % test error); another engineer saw T = 4, alpha = 0.5 lose to plain
CE at 5 epochs, T = 1 match it. In longer side runs on coreset-pruned nets, distillation won 2 of 3
(30 epochs: 7.8 vs 9.0 %; 100 epochs: 7.6 vs 8.3 %, 7.5 vs 7.3 %) and reached 7.4 % at keep 10 %
after 100 epochs over 5 seeds. So distillation with T = 4, alpha = 0.9 is the default for the
method the tool is about (coreset) and long schedules -- a weak preference, not a settled one; pass
distill=False for plain CE (advisable for top-k and short schedules). Adam lr 1e-3, cosine, batch 64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunecert.data import Dataset, load_dataset
from prunecert.errors import ConfigError
from prunecert.io.torch_io import network_from_module, network_to_module
from prunecert.network import Network
from prunecert.objectives import Adversarial
from prunecert.train import evaluate, fit

FINE_TUNE: dict[str, float] = {"lr": 1e-3, "batch_size": 64, "temperature": 4.0, "alpha": 0.9}


def fine_tune(pruned: Network, original: Network, data: str | Dataset | None, epochs: int, seed: int = 0,
              distill: bool = True, progress: bool = True, augment: str | None = None,
              adversarial: Adversarial | dict[str, Any] | None = None, **overrides: float) -> Network:
    """Train the compact `pruned` network for `epochs` on `data` (a spec like 'mnist5k' or a Dataset).

    `adversarial`: an `Adversarial` (or a dict of its fields: eps, steps, weight) for deviation-aware
    distillation; `augment`: 'shift' or 'shift-flip'."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"fine_tune must be a positive number of epochs, got {epochs!r}")
    if data is None:
        raise ConfigError("fine-tuning needs training data: pass data='mnist5k' (or another data set spec)")
    unknown = set(overrides) - set(FINE_TUNE)
    if unknown:
        raise ConfigError(f"unknown fine-tuning settings {sorted(unknown)}; known: {sorted(FINE_TUNE)}")
    settings = {**FINE_TUNE, **overrides}
    if isinstance(adversarial, dict):
        adversarial = Adversarial(**adversarial)
    if adversarial is not None and not distill:
        raise ConfigError("adversarial fine-tuning distils from the original: it cannot be combined with distill=False")
    ds = data if isinstance(data, Dataset) else load_dataset(str(data))
    before = evaluate(pruned, ds.x_test, ds.y_test)
    module = network_to_module(pruned)
    fit(module, ds, epochs=epochs, lr=settings["lr"], batch_size=int(settings["batch_size"]), seed=seed,
        teacher=original if distill else None, temperature=settings["temperature"], alpha=settings["alpha"],
        progress=progress, augment=augment, adversarial=adversarial,
        input_range=(float(np.min(original.domain()[0])), float(np.max(original.domain()[1]))))
    tuned = network_from_module(module, pruned.input_shape, pruned.input_lo, pruned.input_hi, name=pruned.name)
    meta = dict(pruned.metadata)
    rec = dict(meta["pruning"])
    rec["layers"] = [{**r, "provable_bound_valid": False} for r in rec["layers"]]
    rec["provable_bound_valid"] = False
    rec["fine_tune"] = {
        "epochs": int(epochs), "seed": int(seed), "dataset": ds.name, "distill": bool(distill),
        "mode": "adversarial-distill" if adversarial is not None else ("distill" if distill else "plain"),
        "augment": augment, "adversarial": None if adversarial is None else vars(adversarial),
        **({k: settings[k] for k in ("temperature", "alpha")} if distill else {}),
        "lr": settings["lr"], "batch_size": settings["batch_size"], "optimizer": "adam+cosine",
        "test_accuracy_before": before, "test_accuracy_after": evaluate(tuned, ds.x_test, ds.y_test),
        "note": "weights changed after sampling: the coreset provable bound no longer applies",
    }
    meta["pruning"] = rec
    tuned.metadata = meta
    return tuned
