"""Coreset pruning (Mussay et al., ICLR 2020), baselines, provable bounds and completion.

    prune(network, method="coreset", keep=0.1)      -> compact pruned Network with metadata["pruning"]
    complete(pruned, original)                      -> the pruned net on the original's shape

Modules: `coreset` (Algorithms 1 and 2, sampling), `importance` (pluggable criteria: coreset,
uniform, topk, magnitude), `surgery` (cutting tensors), `bounds` (beta_hat, provable epsilon, sample size),
`targets` (keep / compression / epsilon), `driver` (layer by layer), `finetune`, `complete`.
"""

from __future__ import annotations

from prunecert.data import Dataset
from prunecert.errors import ConfigError
from prunecert.network import Network
from prunecert.prune.bounds import beta_hat, min_sample_size, provable_epsilon
from prunecert.core.completion import complete
from prunecert.prune.coreset import coreset_layer, coreset_neuron
from prunecert.prune.driver import prune_network
from prunecert.prune.finetune import fine_tune as _fine_tune
from prunecert.prune.importance import CRITERIA
from prunecert.prune.targets import Keep

__all__ = ["prune", "complete", "provable_epsilon", "min_sample_size", "beta_hat", "coreset_neuron",
           "coreset_layer", "CRITERIA"]


def prune(network: Network, method: str = "coreset", keep: Keep | None = None, compression: float | None = None,
          epsilon: float | None = None, delta: float = 0.1, seed: int = 0, fine_tune: int = 0,
          data: str | Dataset | None = None, distill: bool = True, progress: bool = True) -> Network:
    """Prune the hidden layers of `network`; returns the compact pruned network with metadata["pruning"].

    method: "coreset" (sensitivity sampling, the paper), "uniform" (uniform sampling, same re-weighting)
    "topk" (largest incoming-weight norms, no re-weighting) or "magnitude" (largest outgoing-weight norms). Exactly one target: `keep` (int count,
    float fraction, or {layer index: count/fraction}), `compression` (fraction of parameters to remove)
    or `epsilon` (provable absolute bound per layer, coreset/uniform only). `delta`: failure probability
    of each layer's bound. `fine_tune` epochs on `data` (distilling from `network` if `distill`)
    afterwards void the provable bound (the record says so).
    """
    if not isinstance(network, Network):
        raise ConfigError(f"prune expects a prunecert Network, got {type(network).__name__}")
    pruned = prune_network(network, method, keep=keep, compression=compression, epsilon=epsilon, delta=delta,
                           seed=seed, progress=progress)
    if fine_tune:
        pruned = _fine_tune(pruned, network, data, fine_tune, seed=seed, distill=distill, progress=progress)
    return pruned
