"""Turn the user's target (keep / compression / epsilon) into one `Target` per hidden layer.

- keep: an int (neurons) or a float in (0, 1] (fraction of the layer, rounded, at least 1), for every
  hidden layer, or a dict {layer index: int | float} for the layers named (others are not pruned).
- compression: the fraction of parameters to remove overall, in (0, 1); turned into one keep
  fraction f shared by all hidden layers, the largest f whose compact network is at least that small.
- epsilon: the provable per-layer bound to meet (absolute, in the next layer's pre-activation units).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TypedDict

import numpy as np

from prunecert.errors import ConfigError
from prunecert.network import Network
from prunecert.prune.importance import Target
from prunecert.core.surgery import cut_layer, geometry, hidden_layers

# keep: neurons (int) or a fraction (float) for every hidden layer, or per layer {index: int | float}
Keep = float | Mapping[int, float] | Mapping[str, float]


class TargetSpec(TypedDict, total=False):
    """What was asked, as the pruning record stores it (exactly one key)."""

    keep: float | dict[str, float]
    compression: float
    epsilon: float


def _count(value: object, n: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: keep must be an int (neurons) or a float fraction in (0, 1], got {value!r}")
    if isinstance(value, numbers.Integral):
        k = int(value)
    else:
        f = float(value)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise ConfigError(f"{where}: keep fraction must lie in (0, 1], got {value!r}")
        k = max(1, int(math.floor(f * n + 0.5)))
    if k < 1:
        raise ConfigError(f"{where}: keep must be at least 1 neuron, got {value!r}")
    if k > n:
        raise ConfigError(f"{where}: keep {value!r} is larger than the layer's {n} neurons")
    return k


def _layer_label(net: Network, index: int) -> str:
    return f"{net.name} layer {index} ({net.layers()[index].name}, {geometry(net, index).n} neurons)"


def keep_targets(net: Network, keep: Keep) -> dict[int, Target]:
    hidden = hidden_layers(net)
    if isinstance(keep, Mapping):
        out: dict[int, Target] = {}
        for key, value in keep.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{net.name}: keep keys must be layer indices, got {key!r}") from None
            if index not in hidden:
                raise ConfigError(f"{net.name}: layer {key!r} is not a hidden layer (hidden layers: {hidden}); "
                                  f"the logits layer is never pruned")
            out[index] = Target(keep=_count(value, geometry(net, index).n, _layer_label(net, index)))
        return out
    return {i: Target(keep=_count(keep, geometry(net, i).n, _layer_label(net, i))) for i in hidden}


def params_for_fraction(net: Network, fraction: float) -> tuple[int, dict[int, int]]:
    """Parameters of the compact network keeping round(fraction * n_l) (>= 1) neurons of each hidden layer."""
    keeps = {i: max(1, int(math.floor(fraction * geometry(net, i).n + 0.5))) for i in hidden_layers(net)}
    g = net
    for i, k in keeps.items():
        g = cut_layer(g, i, np.arange(k), np.ones(k))
    return g.n_params(), keeps


def compression_targets(net: Network, compression: float) -> dict[int, Target]:
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real) \
            or not (0.0 < float(compression) < 1.0):
        raise ConfigError(f"compression must be a fraction of parameters to remove in (0, 1), got {compression!r}")
    budget = (1.0 - float(compression)) * net.n_params()
    smallest, keeps = params_for_fraction(net, 0.0)
    if smallest > budget:
        raise ConfigError(f"{net.name}: compression {compression} is out of reach; keeping one neuron per hidden "
                          f"layer leaves {smallest} of {net.n_params()} parameters "
                          f"({1 - smallest / net.n_params():.4f} removed)")
    lo, hi = 0.0, 1.0  # params(lo) <= budget < params(hi) unless hi fits too
    if params_for_fraction(net, hi)[0] <= budget:
        lo = hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if params_for_fraction(net, mid)[0] <= budget:
            lo = mid
        else:
            hi = mid
    _, keeps = params_for_fraction(net, lo)
    return {i: Target(keep=k) for i, k in keeps.items()}


def epsilon_targets(net: Network, epsilon: float) -> dict[int, Target]:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) \
            or not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
        raise ConfigError(f"epsilon must be a positive number, got {epsilon!r}")
    return {i: Target(epsilon=float(epsilon)) for i in hidden_layers(net)}


def resolve_targets(net: Network, keep: Keep | None = None, compression: float | None = None,
                    epsilon: float | None = None) -> tuple[dict[int, Target], TargetSpec]:
    """Per-layer targets and a JSON-able description of what was asked."""
    given = [name for name, v in (("keep", keep), ("compression", compression), ("epsilon", epsilon)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one target (keep, compression or epsilon); got {given or 'none'}")
    if not hidden_layers(net):
        raise ConfigError(f"{net.name}: no hidden layer to prune (a single affine layer)")
    if keep is not None:
        spec = {str(k): v for k, v in keep.items()} if isinstance(keep, Mapping) else keep
        return keep_targets(net, keep), TargetSpec(keep=spec)
    if compression is not None:
        return compression_targets(net, compression), TargetSpec(compression=float(compression))
    assert epsilon is not None  # exactly one of the three was given (checked above)
    return epsilon_targets(net, epsilon), TargetSpec(epsilon=float(epsilon))
