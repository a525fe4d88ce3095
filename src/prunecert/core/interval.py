"""Sound interval bound propagation through a Network (float64, batched, outward-rounded).

The baseline every tighter method is compared against, and what pruning uses to bound the layer
inputs over the whole domain (beta_hat). Works on any IR op via centre/radius form:
W [c - r, c + r] + b  is contained in  [W c + b - |W| r, W c + b + |W| r].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunecert.core.rounding import margin, widen
from prunecert.network import AffineOp, Layer, Network, TensorLike


@dataclass
class Bounds:
    """Element-wise bounds lower <= v <= upper, tensors of shape (B, *shape)."""

    lower: torch.Tensor
    upper: torch.Tensor

    def relu(self) -> "Bounds":
        return Bounds(self.lower.clamp_min(0), self.upper.clamp_min(0))

    @property
    def width(self) -> torch.Tensor:
        return self.upper - self.lower


def centre_radius(b: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """c, r with [c - r, c + r] containing [lower, upper] despite the rounding of (l+u)/2, (u-l)/2."""
    c = (b.lower + b.upper) / 2
    r = (b.upper - b.lower) / 2
    r = torch.maximum(r, torch.maximum(c - b.lower, b.upper - c))
    return c, torch.nextafter(r, torch.full_like(r, torch.inf))


def affine_interval(op: AffineOp, lower: torch.Tensor, upper: torch.Tensor) -> Bounds:
    """Sound bounds of op(x) for lower <= x <= upper (float64)."""
    c = (lower + upper) / 2
    r = (upper - lower) / 2
    # (l+u)/2 and (u-l)/2 are rounded: enlarge r so [c-r, c+r] still covers [l, u]
    r = torch.maximum(r, torch.maximum(c - lower, upper - c))
    r = torch.nextafter(r, torch.full_like(r, torch.inf))
    bias = op.bias.to(torch.float64)
    centre = op.linear(c) + bias
    radius = op.abs_linear(r)
    err = margin(op.abs_linear(c.abs() + r) + bias.abs(), op.fan_in)
    return Bounds(*widen(centre - radius, centre + radius, err))


def layer_interval(layer: Layer, bounds: Bounds) -> Bounds:
    """Bounds on a layer's pre-activation, given bounds on its input."""
    for op in layer.ops:
        bounds = affine_interval(op, bounds.lower, bounds.upper)
    return bounds


def interval_bounds(net: Network, lower: TensorLike, upper: TensorLike) -> list[Bounds]:
    """Pre-activation bounds of every layer (the last is the logits) for inputs in [lower, upper].

    `lower`/`upper` have shape (*input_shape) or (B, *input_shape); results keep a batch dim.
    """
    lo = torch.as_tensor(lower, dtype=torch.float64)
    hi = torch.as_tensor(upper, dtype=torch.float64)
    if lo.shape == net.input_shape:
        lo, hi = lo.unsqueeze(0), hi.unsqueeze(0)
    out, bounds = [], Bounds(lo, hi)
    for layer in net.layers():
        bounds = layer_interval(layer, bounds)
        out.append(bounds)
        bounds = bounds.relu()
    return out
