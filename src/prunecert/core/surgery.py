"""Low-level tensor surgery: what a layer's neurons *are* and how to cut them out of a Network.

This is the only module that knows how IR tensors are laid out (the Torch-Pruning `function.py`
role). Importance criteria and the driver see a layer through `LayerGeometry`:

- points     p_i = [W_l[i, :], b_l[i]]: row i of a Linear, or output channel i's filter + bias of a
             Conv2d (flattened), of the layer's *last* op (whose outputs are the neurons);
- coeffs     the next layer's weights on neuron i, shape (K, n, R): K next-layer neurons (rows of a
             Linear, output channels of a Conv2d), n neurons of this layer, R "offsets" per neuron
             (1 for Linear->Linear, kh*kw for a conv next layer, H*W for conv->Flatten->Linear).

Between a pruned layer's ReLU and the next layer's first weighted op only AvgPool2d and Flatten are
allowed: both map channel i onto channel i (or onto its own block of columns) by a non-negative
convex combination / reshape, so re-scaling or dropping channel i is the same as re-scaling or
dropping the next layer's input channel i.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

from prunecert.errors import ModelFormatError, UnsupportedLayerError
from prunecert.network import AvgPool2d, Conv2d, Flatten, Linear, Network, Op, ReLU


@dataclass(frozen=True)
class LayerSpan:
    """Op indices of a layer in `Network.ops`: ops[start:stop] (the ReLU, if any, is ops[stop])."""

    index: int
    start: int
    stop: int
    relu: bool


def layer_spans(net: Network) -> list[LayerSpan]:
    """Where each layer of `net.layers()` sits in `net.ops`."""
    spans: list[LayerSpan] = []
    start = 0
    for i, op in enumerate(net.ops):
        if isinstance(op, ReLU):
            spans.append(LayerSpan(len(spans), start, i, True))
            start = i + 1
    spans.append(LayerSpan(len(spans), start, len(net.ops), False))
    return spans


def _out_op(net: Network, span: LayerSpan) -> Linear | Conv2d:
    op = net.ops[span.stop - 1]
    if not isinstance(op, (Linear, Conv2d)):
        raise UnsupportedLayerError(
            f"{net.name}: layer {span.index} ends with {op.kind}, not a Linear or Conv2d; only layers whose "
            f"last op carries the neurons can be pruned")
    return op


def _next_in(net: Network, span: LayerSpan) -> tuple[int, list[Op]]:
    """Index of the next layer's first weighted op and the (channel-preserving) ops before it."""
    nxt = layer_spans(net)[span.index + 1]
    pre: list[Op] = []
    for i in range(nxt.start, nxt.stop):
        op = net.ops[i]
        if isinstance(op, (Linear, Conv2d)):
            return i, pre
        if not isinstance(op, (AvgPool2d, Flatten)):
            raise UnsupportedLayerError(
                f"{net.name}: layer {nxt.index} applies {op.kind} before its first weighted op; pruning layer "
                f"{span.index} needs only AvgPool2d/Flatten there (they keep channels apart)")
        pre.append(op)
    raise UnsupportedLayerError(f"{net.name}: layer {nxt.index} has no Linear or Conv2d to absorb the pruning of "
                                f"layer {span.index}")


@dataclass
class LayerGeometry:
    """A hidden layer as the coreset sees it (float64 numpy arrays)."""

    index: int
    name: str
    kind: str              # "linear" or "conv2d"
    points: npt.NDArray[np.float64]     # (n, D + 1)
    coeffs: npt.NDArray[np.float64]     # (K, n, R)

    @property
    def n(self) -> int:
        return int(self.points.shape[0])

    @property
    def next_neurons(self) -> int:
        return int(self.coeffs.shape[0])


def check_finite(net: Network) -> None:
    """Refuse NaN/Inf weights (a Network can be mutated after its checked construction)."""
    spans = layer_spans(net)
    for span in spans:
        for i in range(span.start, span.stop):
            for key, t in net.ops[i].tensors().items():
                if not torch.isfinite(t).all():
                    bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                    raise ModelFormatError(f"{net.name}: layer {span.index} op {i} ({net.ops[i].kind}) {key} has a "
                                           f"non-finite value at index {bad}")


def hidden_layers(net: Network) -> list[int]:
    """Indices of the layers that may be pruned (all but the logits layer)."""
    return [s.index for s in layer_spans(net) if s.relu]


def geometry(net: Network, index: int) -> LayerGeometry:
    """Points and next-layer coefficients of hidden layer `index`."""
    spans = layer_spans(net)
    if not 0 <= index < len(spans) - 1:
        raise UnsupportedLayerError(f"{net.name}: layer {index} is not a hidden layer (hidden: 0..{len(spans) - 2})")
    span = spans[index]
    op = _out_op(net, span)
    w = op.weight.detach().numpy()
    points = np.concatenate([w.reshape(w.shape[0], -1), op._bias.detach().numpy()[:, None]], axis=1)
    j, _ = _next_in(net, span)
    nw = cast(Linear | Conv2d, net.ops[j]).weight.detach().numpy()  # _next_in: ops[j] is Linear/Conv2d
    n = w.shape[0]
    coeffs = nw.reshape(nw.shape[0], n, -1) if nw.ndim == 2 else nw.reshape(nw.shape[0], nw.shape[1], -1)
    if coeffs.shape[1] != n:  # pragma: no cover - Network.validate guarantees the shapes chain
        raise UnsupportedLayerError(f"{net.name}: layer {index + 1} input does not split into {n} channels")
    name = f"layer{index}:{op.kind}"
    return LayerGeometry(index, name, op.kind, points.astype(np.float64), coeffs.astype(np.float64))


def _replace_out(op: Linear | Conv2d, rows: npt.NDArray[np.int64]) -> Linear | Conv2d:
    idx = torch.as_tensor(rows, dtype=torch.long)
    if isinstance(op, Linear):
        return Linear(op.weight[idx], op._bias[idx], name="pruned.linear")
    return Conv2d(op.weight[idx], op._bias[idx], op.in_shape, op.stride, op.padding, name="pruned.conv2d")


def _reshape_pre(op: Op, shape: tuple[int, ...]) -> Op:
    if isinstance(op, AvgPool2d):
        return AvgPool2d(op.kernel, shape, op.stride, op.padding)
    return Flatten(shape)


def _replace_in(op: Linear | Conv2d, shape: tuple[int, ...], n: int, cols: npt.NDArray[np.int64],
                scale: npt.NDArray[np.float64]
                ) -> Linear | Conv2d:
    idx = torch.as_tensor(cols, dtype=torch.long)
    s = torch.as_tensor(scale, dtype=torch.float64)
    if isinstance(op, Linear):
        k_out = op.weight.shape[0]
        w = op.weight.reshape(k_out, n, -1)[:, idx, :] * s[None, :, None]
        return Linear(w.reshape(k_out, -1), op._bias, name="pruned.linear")
    w = op.weight[:, idx] * s[None, :, None, None]
    return Conv2d(w, op._bias, shape, op.stride, op.padding, name="pruned.conv2d")


def cut_layer(net: Network, index: int, kept: npt.ArrayLike, scale: npt.ArrayLike) -> Network:
    """A copy of `net` whose hidden layer `index` keeps only neurons `kept` (sorted, distinct).

    The next layer's input column/channel for kept neuron kept[c] is multiplied by scale[c]
    (the coreset re-weighting u_j(i) / w_j(i)); everything else is unchanged.
    """
    spans = layer_spans(net)
    span = spans[index]
    rows = np.asarray(kept, dtype=np.int64)
    out = _out_op(net, span)
    n = int(out.weight.shape[0])
    ops = list(net.ops)
    ops[span.stop - 1] = new_out = _replace_out(out, rows)
    shape = new_out.out_shape
    ops[span.stop] = ReLU(shape)
    j, pre = _next_in(net, span)
    for i in range(spans[index + 1].start, j):
        ops[i] = _reshape_pre(ops[i], shape)
        shape = ops[i].out_shape
    nxt = cast(Linear | Conv2d, ops[j])  # _next_in: ops[j] is the next layer's Linear/Conv2d
    ops[j] = _replace_in(nxt, shape, n, rows, np.asarray(scale, dtype=np.float64))
    return Network(ops, net.input_shape, net.input_lo, net.input_hi, name=net.name,
                   metadata=copy.deepcopy(net.metadata))

