"""An (original, pruned) pair of networks with identical architecture, neuron by neuron.

Every certification and attack method works on a `Pair`: because both networks have the same ops
and shapes, Delta_l = a_l^f - a_l^g is defined coordinate-wise for every layer l. A compact pruned
network (physically fewer neurons) is first *completed* onto the original's shape
(`prunecert.core.completion`: removed neurons keep their incoming weights, get zero outgoing weights),
so pruning, quantisation and fine-tuning are all "how far can g drift from f?".
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from prunecert.errors import ConfigError, PairingError
from prunecert.network import Layer, Network, Op, TensorLike

# attributes (besides kind and shapes) that must agree for two ops to be the same operator
_STRUCTURAL = ("stride", "padding", "kernel")


def _op_signature(op: Op) -> tuple[Any, ...]:
    sig: list[Any] = [op.kind, tuple(op.in_shape), tuple(op.out_shape)]
    for attr in _STRUCTURAL:
        if hasattr(op, attr):
            sig.append((attr, tuple(getattr(op, attr))))
    if hasattr(op, "weight"):
        sig.append(("weight", tuple(op.weight.shape)))
    return tuple(sig)


def architecture_mismatch(f: Network, g: Network) -> str | None:
    """Why `f` and `g` cannot be paired op by op, or None if they can. The message names the layer."""
    if tuple(f.input_shape) != tuple(g.input_shape):
        return f"input shapes differ: {f.name} {f.input_shape} vs {g.name} {g.input_shape}"
    lf, lg = f.layers(), g.layers()
    if len(lf) != len(lg):
        return f"layer counts differ: {f.name} has {len(lf)} layers, {g.name} has {len(lg)}"
    for a, b in zip(lf, lg):
        if len(a.ops) != len(b.ops):
            return (f"layer {a.index} ({a.name}): {len(a.ops)} ops in {f.name} vs {len(b.ops)} in {g.name} "
                    f"({[o.kind for o in a.ops]} vs {[o.kind for o in b.ops]})")
        for j, (oa, ob) in enumerate(zip(a.ops, b.ops)):
            sa, sb = _op_signature(oa), _op_signature(ob)
            if sa != sb:
                differ = [f"{x[0]} {x[1]} vs {y[1]}" for x, y in zip(sa[3:], sb[3:]) if x != y and x[0] == y[0]]
                detail = f" ({'; '.join(differ)})" if differ and sa[:3] == sb[:3] else ""
                return (f"layer {a.index} ({a.name}) op {j}: {oa.kind} {oa.in_shape}->{oa.out_shape} in {f.name} "
                        f"vs {ob.kind} {ob.in_shape}->{ob.out_shape} in {g.name}{detail}")
    flo, fhi = f.domain()
    glo, ghi = g.domain()
    if not (np.array_equal(flo, glo) and np.array_equal(fhi, ghi)):
        return (f"input domains differ: {f.name} [{flo.min():g}, {fhi.max():g}] vs "
                f"{g.name} [{glo.min():g}, {ghi.max():g}] (elementwise)")
    return None


@dataclass(eq=False)
class Pair:
    """Original `f` and its twin `g` with identical architecture (validated on construction)."""

    f: Network
    g: Network
    layers_f: list[Layer] = field(init=False, repr=False)
    layers_g: list[Layer] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problem = architecture_mismatch(self.f, self.g)
        if problem is not None:
            raise PairingError(f"cannot pair {self.f.name} with {self.g.name}: {problem}")
        self.layers_f = self.f.layers()
        self.layers_g = self.g.layers()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.f.input_shape

    @property
    def n_layers(self) -> int:
        return len(self.layers_f)

    @property
    def n_classes(self) -> int:
        return int(np.prod(self.f.output_shape))

    def domain(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return self.f.domain()

    def layer_pairs(self) -> list[tuple[Layer, Layer]]:
        return list(zip(self.layers_f, self.layers_g))

    def checked_logits(self, logits: Sequence[int] | None) -> list[int] | None:
        """The chosen logits (certify's --logits, a method's `logits`) sorted without repeats, or None
        for all; a ConfigError names an empty choice or an index outside 0..n_classes - 1."""
        if logits is None:
            return None
        out = sorted({int(k) for k in logits})
        if not out or out[0] < 0 or out[-1] >= self.n_classes:
            raise ConfigError(f"logits must be indices in 0..{self.n_classes - 1}, got {list(logits)}")
        return out

    def activations_per_input(self) -> int:
        """Values one input point carries through the pair when every value is kept (autograd, bound
        state): the input and every op's output (and ReLU output) of f and of g. Memory budgets
        (attack chunks, certify chunks, evaluation batches) are counted in these."""
        n = math.prod(self.input_shape)
        for layers in (self.layers_f, self.layers_g):
            for layer in layers:
                n += sum(math.prod(op.out_shape) for op in layer.ops)
                if layer.relu:
                    n += math.prod(layer.out_shape)
        return n

    # ------------------------------------------------------------------ concrete evaluation
    def forward_layers(self, x: TensorLike, dtype: torch.dtype = torch.float64
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-activations of every layer of f and of g at the batch `x`."""
        return self.f.forward_layers(x, dtype), self.g.forward_layers(x, dtype)

    def deltas(self, x: TensorLike, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """End-to-end deviations a_l^f(x) - a_l^g(x), one (B, *out_shape_l) tensor per layer."""
        af, ag = self.forward_layers(x, dtype)
        return [a - b for a, b in zip(af, ag)]

    def local_deltas(self, x: TensorLike, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """Local deviations a_l^f(x) - L_l^g(h_{l-1}^f(x)): g's layer l fed with f's layer input."""
        af = self.f.forward_layers(x, dtype)
        h = self.f._prepare(x, dtype)
        out = []
        for l, lg in enumerate(self.layers_g):
            out.append(af[l] - lg.forward(h))
            h = torch.relu(af[l])
        return out
