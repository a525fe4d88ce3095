"""The NNet text format (ACAS Xu, ReluDiff/NeuroDiff benchmarks): fully connected ReLU networks.

Layout: `//` comment lines; `numLayers, inputSize, outputSize, maxLayerSize`; the layer sizes; an
unused flag line; input minimums; input maximums; means (inputs, then output); ranges (inputs, then
output); then per layer the weight rows (one line per output neuron) followed by the biases.

Semantics: the network sees (x - mean_i) / range_i and its raw output y is reported as
y * range_out + mean_out. On import both normalisations are folded into the first and last Linear
layers (exact in real arithmetic; float64 rounding ~1e-15), and [min, max] becomes the input domain.
(NNet readers clip inputs to [min, max]; inside the domain that clipping is the identity.)

Export writes means 0 and ranges 1: the weights already include any normalisation. A first layer of
the form [Scale] [Flatten] Linear (e.g. the input normalisation of an ONNX model) is folded into that
Linear, since NNet holds nothing but fully connected layers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from prunecert.errors import ModelFormatError, PrunecertError, UnsupportedLayerError
from prunecert.fileutil import atomic_write_text
from prunecert.network import Flatten, Layer, Linear, Network, Scale, mlp

MAX_WIDTH = 10_000_000  # neurons per layer (and layers): larger numbers are a corrupt header, not a model


def _numbers(line: str, path: str | os.PathLike[str], what: str) -> list[float]:
    try:
        return [float(v) for v in line.replace(",", " ").split()]
    except ValueError as exc:
        raise ModelFormatError(f"{path}: malformed {what} line: {line.strip()[:80]!r}") from exc


def _sizes(line: str, path: str | os.PathLike[str], what: str) -> list[int]:
    """Whole numbers >= 1 (layer counts and widths): `2.9`, `nan`, `inf`, `0` are refused, not truncated."""
    values = _numbers(line, path, what)
    for v in values:
        if not (math.isfinite(v) and v == int(v) and 1 <= v <= MAX_WIDTH):
            raise ModelFormatError(f"{path}: {what} line {line.strip()[:80]!r}: {v!r} is not a whole number in "
                                   f"1..{MAX_WIDTH:,}")
    return [int(v) for v in values]


def load_nnet(path: str | os.PathLike[str]) -> Network:
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("//")]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: cannot read NNet file ({exc})") from exc
    if len(lines) < 8:
        raise ModelFormatError(f"{path}: truncated NNet file ({len(lines)} non-comment lines)")
    head = _sizes(lines[0], path, "header")
    if len(head) < 3:
        raise ModelFormatError(f"{path}: header must hold numLayers, inputSize, outputSize")
    n_layers, n_in, n_out = head[:3]
    sizes = _sizes(lines[1], path, "layer sizes")
    if len(sizes) != n_layers + 1 or sizes[0] != n_in or sizes[-1] != n_out:
        raise ModelFormatError(f"{path}: layer sizes {sizes} do not match header (layers={n_layers}, "
                               f"in={n_in}, out={n_out})")
    mins, maxs = (np.array(_numbers(lines[i], path, name)) for i, name in ((3, "minimums"), (4, "maximums")))
    means, ranges = (np.array(_numbers(lines[i], path, name)) for i, name in ((5, "means"), (6, "ranges")))
    for arr, name, n in ((mins, "minimums", n_in), (maxs, "maximums", n_in), (means, "means", n_in + 1),
                         (ranges, "ranges", n_in + 1)):
        if arr.size != n:
            raise ModelFormatError(f"{path}: expected {n} input {name}, found {arr.size}")
    if np.any(ranges == 0):
        raise ModelFormatError(f"{path}: a range is zero (cannot normalise)")
    rows = lines[7:]
    need = sum(sizes[i + 1] * 2 for i in range(n_layers))
    if len(rows) < need:
        raise ModelFormatError(f"{path}: truncated NNet file: expected {need} weight/bias lines, found {len(rows)}")
    if len(rows) > need:
        raise ModelFormatError(f"{path}: {len(rows) - need} unexpected lines after the last bias (layer sizes {sizes})")
    weights, biases, pos = [], [], 0
    for i in range(n_layers):
        w = np.array([_numbers(rows[pos + r], path, f"layer {i} weight") for r in range(sizes[i + 1])], dtype=object)
        if any(len(r) != sizes[i] for r in w):
            raise ModelFormatError(f"{path}: layer {i} weight rows must have {sizes[i]} entries")
        weights.append(np.array(w.tolist(), dtype=np.float64))
        pos += sizes[i + 1]
        b = [_numbers(rows[pos + r], path, f"layer {i} bias") for r in range(sizes[i + 1])]
        if any(len(v) != 1 for v in b):
            raise ModelFormatError(f"{path}: layer {i} bias lines must hold one value each")
        biases.append(np.array([v[0] for v in b]))
        pos += sizes[i + 1]
    # fold input normalisation (x - m) / r into the first layer and output scaling into the last
    m, r = means[:n_in], ranges[:n_in]
    biases[0] = biases[0] - weights[0] @ (m / r)
    weights[0] = weights[0] / r
    weights[-1] = weights[-1] * ranges[-1]
    biases[-1] = biases[-1] * ranges[-1] + means[-1]
    if not (np.all(np.isfinite(mins)) and np.all(np.isfinite(maxs))) or np.any(mins > maxs):
        bad = int(np.flatnonzero(~np.isfinite(mins) | ~np.isfinite(maxs) | (mins > maxs))[0])
        raise ModelFormatError(f"{path}: input {bad} has an invalid domain [{mins[bad]}, {maxs[bad]}]")
    try:
        return mlp(weights, biases, mins, maxs, name=path.stem)
    except PrunecertError as exc:  # NaN weights, ...: name the file, not just the layer
        raise ModelFormatError(f"{path}: {exc}") from exc


def save_nnet(net: Network, path: str | os.PathLike[str]) -> None:
    """Write a fully connected network (atomic); means 0 and ranges 1 (see the module docstring)."""
    linears = [_first_linear(net)]
    for layer in net.layers()[1:]:
        if len(layer.ops) != 1 or not isinstance(layer.ops[0], Linear):
            raise _not_fc(net, layer)
        linears.append(layer.ops[0])
    sizes = [net.n_inputs] + [op.out_shape[0] for op in linears]
    lo, hi = (a.reshape(-1) for a in net.domain())

    def fmt(v: Iterable[float]) -> str:
        return ",".join(repr(float(x)) for x in v) + ","  # repr keeps full precision

    out = [f"// {net.name} written by prunecert",
           f"{len(linears)},{sizes[0]},{sizes[-1]},{max(sizes)},", ",".join(map(str, sizes)) + ",", "0,",
           fmt(lo), fmt(hi), fmt(np.zeros(sizes[0] + 1)), fmt(np.ones(sizes[0] + 1))]
    for op in linears:
        out.extend(fmt(row) for row in op.weight.numpy())
        out.extend(f"{float(b)!r}," for b in op.bias.numpy())
    atomic_write_text(path, "\n".join(out) + "\n")


def _first_linear(net: Network) -> Linear:
    """The first layer as one Linear over the flattened input, folding a leading Scale and Flatten."""
    layer = net.layers()[0]
    scale, shift = np.ones(net.n_inputs), np.zeros(net.n_inputs)  # over the flattened input (C order)
    for op in layer.ops[:-1]:
        if isinstance(op, Scale):
            s, t = (np.broadcast_to(v.numpy(), op.in_shape).reshape(-1) for v in (op.scale, op.shift))
            scale, shift = scale * s, shift * s + t
        elif not isinstance(op, Flatten):
            raise _not_fc(net, layer)
    last = layer.ops[-1]
    if not isinstance(last, Linear):
        raise _not_fc(net, layer)
    if len(layer.ops) == 1:
        return last
    w = last.weight.numpy()
    return Linear(w * scale[None, :], last.bias.numpy() + w @ shift, name=f"{net.name} layer 0")


def _not_fc(net: Network, layer: Layer) -> UnsupportedLayerError:
    kinds = "+".join(op.kind for op in layer.ops)
    return UnsupportedLayerError(f"{net.name}: layer {layer.index} ({kinds}) cannot be written as NNet, which holds "
                                 "fully connected layers only")
