"""PyTorch interop: nn.Sequential <-> Network, and bare state_dicts with an architecture description.

A full pickled nn.Module cannot be loaded safely (`weights_only=True` refuses code), so on disk we
accept only state_dicts. Their architecture comes from `arch`:

- `"mlp:784-300-100-10"`: Linear layers with ReLU between (keys `0.weight`, `0.bias`, `2.weight`, ...
  as `nn.Sequential(Linear, ReLU, Linear, ...)` numbers them; a leading `Flatten` shifting the indices
  by one is recognised too);
- a path to a JSON file: `{"input_shape": [1, 28, 28], "input_lo": 0, "input_hi": 1, "layers": [
  {"type": "conv2d", "out_channels": 16, "kernel": 3, "stride": 1, "padding": 1}, {"type": "relu"},
  {"type": "avgpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "out_features": 10},
  {"type": "batchnorm"}]}` — one entry per nn.Sequential index, in order;
- `None`: inferred when the state_dict is a plain chain of 2-D Linear weights (ReLU between).

A training checkpoint `{"state_dict": {...}, ...}` (or `"model_state_dict"`) is unwrapped. Keys are
matched by name and the module is filled in float64, so the IR holds the file's exact values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from prunecert.errors import ModelFormatError, PrunecertError, UnsupportedLayerError
from prunecert.network import AvgPool2d, Conv2d, Flatten, Linear, Network, Op, ReLU, Scale

_IGNORED = (nn.Identity, nn.Dropout)


class ScaleModule(nn.Module):
    """x * scale + shift with fixed buffers: the torch twin of the IR's `Scale` op."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.to(torch.float32).clone())
        self.register_buffer("shift", shift.to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _flat_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out.extend(_flat_modules(child, f"{prefix}{name}."))
        return out
    return [(prefix.rstrip("."), module)]


def _fold_batchnorm(op: Op | None, bn: nn.BatchNorm1d | nn.BatchNorm2d, shape: tuple[int, ...], where: str) -> Op:
    """BN(y) = gamma (y - mean) / sqrt(var + eps) + beta, folded into the affine op before it."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedLayerError(f"{where}: BatchNorm without running statistics cannot be folded")
    var = bn.running_var.detach().double()
    a = (bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    c = beta - a * bn.running_mean.detach().double()
    if isinstance(op, Linear):
        return Linear(op.weight * a[:, None], op.bias * a + c, name=where)
    if isinstance(op, Conv2d):
        return Conv2d(op.weight * a[:, None, None, None], op._bias * a + c, op.in_shape, op.stride, op.padding, name=where)
    view = (-1,) + (1,) * (len(shape) - 1)
    return Scale(a.view(view), c.view(view), shape, name=where)


def network_from_module(module: nn.Module, input_shape: Sequence[int], lo: float | npt.NDArray[np.floating[Any]] = 0.0,
                        hi: float | npt.NDArray[np.floating[Any]] = 1.0, name: str = "network") -> Network:
    """Convert an (eval-mode semantics) nn.Sequential into the IR; BatchNorm is folded."""
    shape = tuple(int(s) for s in input_shape)
    ops: list[Op] = []
    op: Op
    for where, m in _flat_modules(module):
        label = f"{name} module {where or '0'} ({type(m).__name__})"
        if isinstance(m, _IGNORED):
            continue
        if isinstance(m, nn.Linear):
            if len(shape) != 1:
                ops.append(Flatten(shape))
                shape = ops[-1].out_shape
            op = Linear(m.weight, m.bias, name=label)
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise UnsupportedLayerError(f"{label}: only plain Conv2d (groups=1, dilation=1, numeric zero padding)")
            op = Conv2d(m.weight, m.bias, shape, m.stride, m.padding, name=label)
        elif isinstance(m, nn.ReLU):
            op = ReLU(shape)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedLayerError(f"{label}: only Flatten(start_dim=1) is supported")
            op = Flatten(shape)
        elif isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or not m.count_include_pad or m.divisor_override:
                raise UnsupportedLayerError(f"{label}: only AvgPool2d with floor mode and count_include_pad")
            op = AvgPool2d(m.kernel_size, shape, m.stride, m.padding, name=label)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            prev = ops.pop() if ops and isinstance(ops[-1], (Linear, Conv2d)) else None
            op = _fold_batchnorm(prev, m, shape, label)
        elif isinstance(m, ScaleModule):
            op = Scale(m.scale, m.shift, shape, name=label)
        else:
            raise UnsupportedLayerError(f"{label}: unsupported layer type {type(m).__name__} "
                                        "(supported: Linear, Conv2d, ReLU, Flatten, AvgPool2d, BatchNorm)")
        ops.append(op)
        shape = op.out_shape
    return Network(ops, tuple(int(s) for s in input_shape), lo, hi, name=name)


def network_to_module(net: Network) -> nn.Sequential:
    """A float32 nn.Sequential computing the same function (trainable copy)."""
    mods: list[nn.Module] = []
    m: nn.Module
    for op in net.ops:
        if isinstance(op, Linear):
            m = nn.Linear(op.in_shape[0], op.out_shape[0])
            m.weight.data.copy_(op.weight)
            m.bias.data.copy_(op.bias)
        elif isinstance(op, Conv2d):
            w = op.weight
            m = nn.Conv2d(w.shape[1], w.shape[0], (w.shape[2], w.shape[3]), op.stride, op.padding)
            m.weight.data.copy_(w)
            cast(torch.Tensor, m.bias).data.copy_(op._bias)  # built with a bias (the default bias=True)
        elif isinstance(op, ReLU):
            m = nn.ReLU()
        elif isinstance(op, Flatten):
            m = nn.Flatten()
        elif isinstance(op, AvgPool2d):
            m = nn.AvgPool2d(op.kernel, op.stride, op.padding)
        elif isinstance(op, Scale):
            m = ScaleModule(op.scale, op.shift)
        else:  # pragma: no cover - Network.validate admits only the kinds above
            raise UnsupportedLayerError(f"{net.name}: cannot convert {op.kind} to torch")
        mods.append(m)
    return nn.Sequential(*mods)


def network_from_state_dict(obj: object, arch: str | None, source: str) -> Network:
    """Build a Network from a bare nn.Sequential state_dict plus `arch` (see module docstring).

    The module is built and filled in float64, so the IR holds the file's own values (BatchNorm
    folding included) with no float32 round trip; keys are matched by name, never by position.
    """
    obj = _unwrap_checkpoint(obj)
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ModelFormatError(f"{source}: neither a prunecert model file nor a state_dict of tensors")
    spec = _arch_spec(obj, arch, source)
    with torch.device("meta"):  # shapes only: a declared mlp:100000-100000-10 allocates nothing
        expected = _module_from_spec(spec, source).state_dict()
    missing = sorted(set(expected) - set(obj))
    extra = sorted(set(obj) - set(expected))
    if missing or extra:
        raise ModelFormatError(f"{source}: state_dict does not match the architecture "
                               f"(missing keys {missing[:5]}, unexpected keys {extra[:5]})")
    for key, value in expected.items():
        if tuple(obj[key].shape) != tuple(value.shape):
            raise ModelFormatError(f"{source}: key {key} has shape {tuple(obj[key].shape)}, "
                                   f"the architecture expects {tuple(value.shape)}")
    module = _module_from_spec(spec, source).double()  # now the file's own tensors bound its size
    module.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in obj.items()})
    try:
        return network_from_module(module, spec["input_shape"], spec.get("input_lo", 0.0), spec.get("input_hi", 1.0),
                                   name=Path(source).stem)
    except PrunecertError as exc:  # NaN weights, bad shapes: name the file, not just its stem
        raise type(exc)(f"{source}: {exc}") from exc


def _unwrap_checkpoint(obj: object) -> object:
    """Training checkpoints often nest the weights: {"state_dict": {...}, "epoch": 3, ...}."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(torch.is_tensor(v) for v in inner.values()):
                return inner
    return obj


def _arch_spec(sd: dict[str, torch.Tensor], arch: str | None, source: str) -> dict[str, Any]:
    if arch is None:
        return _infer_mlp(sd, source)
    if arch.startswith("mlp:"):
        try:
            sizes = [int(s) for s in arch[4:].split("-")]
        except ValueError as exc:
            raise ModelFormatError(f"{source}: bad architecture {arch!r} (expected e.g. mlp:784-300-100-10)") from exc
        if len(sizes) < 2 or min(sizes) < 1:
            raise ModelFormatError(f"{source}: architecture {arch!r} needs at least two sizes, each >= 1")
        return _mlp_spec(sizes, flatten=any(k.startswith("1.") for k in sd) and "0.weight" not in sd)
    path = Path(arch)
    if not path.is_file():
        raise ModelFormatError(f"{source}: architecture {arch!r} is neither 'mlp:N-N-...' nor a JSON file")
    try:
        spec: dict[str, Any] = json.loads(path.read_text())  # not a dict: TypeError below
        spec["input_shape"] = [int(s) for s in spec["input_shape"]]
        spec["layers"] = list(spec["layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{arch}: malformed architecture JSON ({exc})") from exc
    return spec


def _mlp_spec(sizes: list[int], flatten: bool) -> dict[str, Any]:
    layers: list[dict[str, Any]] = [{"type": "flatten"}] if flatten else []
    for i, n in enumerate(sizes[1:]):
        if i:
            layers.append({"type": "relu"})
        layers.append({"type": "linear", "out_features": n})
    return {"input_shape": [sizes[0]], "layers": layers}


def _infer_mlp(sd: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    keys = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"(\d+)\.weight", k))})
    weights = [sd[f"{i}.weight"] for i in keys]
    if not weights or any(w.ndim != 2 for w in weights):
        raise ModelFormatError(f"{source}: cannot infer the architecture of this state_dict; pass --arch "
                               "(e.g. mlp:784-300-100-10 or a JSON file)")
    sizes = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
    for a, b, i in zip(weights, weights[1:], keys[1:]):
        if a.shape[0] != b.shape[1]:
            raise ModelFormatError(f"{source}: {i}.weight has {b.shape[1]} inputs but the layer before has "
                                   f"{a.shape[0]} outputs")
    return _mlp_spec(sizes, flatten=keys[0] == 1)


def _module_from_spec(spec: dict[str, Any], source: str) -> nn.Sequential:
    shape = list(spec["input_shape"])
    mods: list[nn.Module] = []
    m: nn.Module
    for i, layer in enumerate(spec["layers"]):
        kind = layer.get("type") if isinstance(layer, dict) else None
        try:
            for key in ("out_features", "out_channels"):
                if key in layer and int(layer[key]) < 1:
                    raise ValueError(f"{key} must be >= 1, got {layer[key]!r}")
            if kind == "linear":
                n_in = int(np.prod(shape))
                mods.append(nn.Linear(n_in, int(layer["out_features"]), bias=layer.get("bias", True)))
                shape = [int(layer["out_features"])]
            elif kind == "conv2d":
                m = nn.Conv2d(shape[0], int(layer["out_channels"]), layer["kernel"], layer.get("stride", 1),
                              layer.get("padding", 0), bias=layer.get("bias", True))
                mods.append(m)
                shape = list(m(torch.zeros(1, *shape)).shape[1:])
            elif kind == "relu":
                mods.append(nn.ReLU())
            elif kind == "flatten":
                mods.append(nn.Flatten())
                shape = [int(np.prod(shape))]
            elif kind == "avgpool2d":
                m = nn.AvgPool2d(layer["kernel"], layer.get("stride"), layer.get("padding", 0))
                mods.append(m)
                shape = list(m(torch.zeros(1, *shape)).shape[1:])
            elif kind == "batchnorm":
                mods.append(nn.BatchNorm1d(shape[0]) if len(shape) == 1 else nn.BatchNorm2d(shape[0]))
            else:
                raise UnsupportedLayerError(f"{source}: architecture layer {i} has unsupported type {kind!r}")
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"{source}: architecture layer {i} ({kind}) is invalid for input shape "
                                   f"{shape}: {exc}") from exc
    seq = nn.Sequential(*mods)
    seq.eval()
    return seq
