"""The canonical network IR: a sequence of affine operators with ReLUs between them.

Every model that enters prunecert (torch, ONNX, NNet, our own files) is turned into a `Network`.
Weights are held as float64 torch tensors; `forward` runs in the dtype of its input (float32 for
speed, float64 for certification). Every affine operator offers, besides `forward`:

- `linear(x)`     the operator without its constant term (W x),
- `abs_linear(x)` the operator with entry-wise absolute weights (|W| x), for interval arithmetic,
- `backward(A)`   the transpose (W^T) applied to a batch of row vectors, for back-substitution,
- `bias`          the constant term over the output shape,

so that certification works on conv nets without materialising dense matrices.

A *layer* (what the user and the reports call layer l) is a maximal run of affine operators; its
output is the pre-activation a_l. Hidden layers are followed by a ReLU, the last one gives the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from prunecert.errors import ModelFormatError, ShapeMismatchError, UnsupportedLayerError

Shape = tuple[int, ...]
# weights as given by a loader: a torch tensor, a numpy array or nested lists
TensorLike = torch.Tensor | npt.ArrayLike
# a kernel size, stride or padding: one int for both spatial axes, or one per axis
IntPair = int | tuple[int, ...] | list[int]


def _as_tensor(value: TensorLike, name: str) -> torch.Tensor:
    if (torch.is_tensor(value) and value.is_complex()) or (not torch.is_tensor(value) and np.iscomplexobj(value)):
        raise ModelFormatError(f"{name} holds complex numbers; weights must be real")
    t = value if torch.is_tensor(value) else torch.from_numpy(np.array(value, dtype=np.float64))
    t = t.detach().to(torch.float64).clone()
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ModelFormatError(f"{name} contains a non-finite value (NaN/Inf) at index {bad}")
    return t


class Op:
    """Base of all IR operators."""

    kind: str = "op"
    in_shape: Shape
    out_shape: Shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named parameter tensors (for saving and hashing)."""
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-able description of everything but the tensors."""
        return {"kind": self.kind, "in_shape": list(self.in_shape)}


class AffineOp(Op):
    """An affine map x -> W x + b over tensors of shape `in_shape` -> `out_shape`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias.to(x.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Apply W^T: `a` has shape (K, *out_shape), the result (K, *in_shape)."""
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def fan_in(self) -> int:
        """Most terms summed into one output (bounds floating-point rounding of `linear`)."""
        return 1


class ReLU(Op):
    kind = "relu"

    def __init__(self, shape: Sequence[int]):
        self.in_shape = self.out_shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class Linear(AffineOp):
    kind = "linear"

    def __init__(self, weight: TensorLike, bias: TensorLike | None = None, name: str = "linear"):
        self.weight = _as_tensor(weight, f"{name}.weight")
        if self.weight.ndim != 2:
            raise ShapeMismatchError(f"{name}: weight must be 2-D (out, in), got shape {tuple(self.weight.shape)}")
        out_f, in_f = self.weight.shape
        self._bias = _as_tensor(bias, f"{name}.bias") if bias is not None else torch.zeros(out_f, dtype=torch.float64)
        if self._bias.shape != (out_f,):
            raise ShapeMismatchError(f"{name}: bias shape {tuple(self._bias.shape)} does not match weight rows {out_f}")
        self.in_shape, self.out_shape = (in_f,), (out_f,)
        self._cache: dict[tuple[torch.dtype, bool], tuple[torch.Tensor, int, torch.Tensor]] = {}

    @property
    def bias(self) -> torch.Tensor:
        return self._bias

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}    # the cache is rebuilt on use, never shipped

    def _weight(self, dtype: torch.dtype, absolute: bool = False) -> torch.Tensor:
        """W (or |W|) in `dtype`, cached while `weight` is the same, unmodified tensor (bound methods
        apply a layer hundreds of times per call)."""
        w = self.weight
        hit = self._cache.get((dtype, absolute))
        if hit is None or hit[0] is not w or hit[1] != w._version:
            hit = (w, w._version, (w.abs() if absolute else w).to(dtype))
            self._cache[(dtype, absolute)] = hit
        return hit[2]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._weight(x.dtype).T

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._weight(x.dtype, True).T

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self._weight(a.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self._bias}

    @property
    def fan_in(self) -> int:
        return int(self.weight.shape[1])


class Conv2d(AffineOp):
    kind = "conv2d"

    def __init__(self, weight: TensorLike, bias: TensorLike | None, in_shape: Sequence[int],
                 stride: IntPair = 1, padding: IntPair = 0, name: str = "conv2d"):
        self.weight = _as_tensor(weight, f"{name}.weight")
        if self.weight.ndim != 4:
            raise ShapeMismatchError(f"{name}: conv weight must be 4-D (C_out, C_in, kh, kw), got {tuple(self.weight.shape)}")
        c_out, c_in, kh, kw = self.weight.shape
        self._bias = _as_tensor(bias, f"{name}.bias") if bias is not None else torch.zeros(c_out, dtype=torch.float64)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.in_shape = tuple(int(s) for s in in_shape)
        if len(self.in_shape) != 3 or self.in_shape[0] != c_in:
            raise ShapeMismatchError(f"{name}: input shape {self.in_shape} does not match conv weight with C_in={c_in}")
        h = (self.in_shape[1] + 2 * self.padding[0] - kh) // self.stride[0] + 1
        w = (self.in_shape[2] + 2 * self.padding[1] - kw) // self.stride[1] + 1
        if h <= 0 or w <= 0:
            raise ShapeMismatchError(f"{name}: kernel {kh}x{kw} does not fit input {self.in_shape}")
        self.out_shape = (c_out, h, w)

    @property
    def bias(self) -> torch.Tensor:
        return self._bias.view(-1, 1, 1).expand(self.out_shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.abs().to(x.dtype), None, self.stride, self.padding)

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        kh, kw = self.weight.shape[2:]
        # output_padding recovers input rows/cols that the forward stride skipped over
        oph = self.in_shape[1] - ((self.out_shape[1] - 1) * self.stride[0] - 2 * self.padding[0] + kh)
        opw = self.in_shape[2] - ((self.out_shape[2] - 1) * self.stride[1] - 2 * self.padding[1] + kw)
        return F.conv_transpose2d(a, self.weight.to(a.dtype), None, self.stride, self.padding, (oph, opw))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self._bias}

    @property
    def fan_in(self) -> int:
        return int(self.weight[0].numel())

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stride": list(self.stride), "padding": list(self.padding)}


class AvgPool2d(AffineOp):
    kind = "avgpool2d"

    def __init__(self, kernel: IntPair, in_shape: Sequence[int], stride: IntPair | None = None,
                 padding: IntPair = 0, name: str = "avgpool2d"):
        self.kernel = _pair(kernel)
        self.stride = _pair(stride if stride is not None else kernel)
        self.padding = _pair(padding)
        self.in_shape = tuple(int(s) for s in in_shape)
        if len(self.in_shape) != 3:
            raise ShapeMismatchError(f"{name}: avgpool needs a (C, H, W) input, got {self.in_shape}")
        c = self.in_shape[0]
        h = (self.in_shape[1] + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
        w = (self.in_shape[2] + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1
        if h <= 0 or w <= 0:
            raise ShapeMismatchError(f"{name}: pool kernel {self.kernel} does not fit input {self.in_shape}")
        self.out_shape = (c, h, w)
        # as a depthwise conv: count_include_pad semantics (the ONNX and torch default)
        self._kernel = torch.full((c, 1, *self.kernel), 1.0 / (self.kernel[0] * self.kernel[1]), dtype=torch.float64)

    @property
    def bias(self) -> torch.Tensor:
        return torch.zeros(self.out_shape, dtype=torch.float64)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._kernel.to(x.dtype), None, self.stride, self.padding, groups=self.in_shape[0])

    abs_linear = linear  # non-negative weights

    @property
    def fan_in(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def tiles(self) -> bool:
        """Whether the windows are disjoint (stride = kernel, no padding): `repeat_backward` applies."""
        return self.stride == self.kernel and self.padding == (0, 0)

    def repeat_backward(self, a: torch.Tensor) -> torch.Tensor:
        """The transpose of a tiling pool on (N, C, h, w), without the rows/columns no window covers:
        (N, C, h kh, w kw), each entry the one product a * (1 / (kh kw)) conv_transpose2d computes (the
        same float), by repeating instead (float64: 3-4x faster on CPU, which has no vectorised
        float64 conv; float32's conv is as fast, so `backward` keeps it there)."""
        (kh, kw), (n, c, h, w) = self.kernel, a.shape
        scaled = a * self._kernel[0, 0, 0, 0].to(a.dtype)
        return scaled.reshape(n, c, h, 1, w, 1).expand(n, c, h, kh, w, kw).reshape(n, c, h * kh, w * kw)

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dtype == torch.float64 and self.tiles:
            up = self.repeat_backward(a)
            pad_h, pad_w = self.in_shape[1] - up.shape[2], self.in_shape[2] - up.shape[3]
            return F.pad(up, (0, pad_w, 0, pad_h)) if pad_h or pad_w else up
        oph = self.in_shape[1] - ((self.out_shape[1] - 1) * self.stride[0] - 2 * self.padding[0] + self.kernel[0])
        opw = self.in_shape[2] - ((self.out_shape[2] - 1) * self.stride[1] - 2 * self.padding[1] + self.kernel[1])
        return F.conv_transpose2d(a, self._kernel.to(a.dtype), None, self.stride, self.padding, (oph, opw),
                                  groups=self.in_shape[0])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding)}


class Flatten(AffineOp):
    kind = "flatten"

    def __init__(self, in_shape: Sequence[int]):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = (math.prod(self.in_shape),)

    @property
    def bias(self) -> torch.Tensor:
        return torch.zeros(self.out_shape, dtype=torch.float64)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    abs_linear = linear

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], *self.in_shape)


class Scale(AffineOp):
    """Element-wise (or per-channel) affine map x * scale + shift.

    Input normalisation ((x - mean) / std) and a BatchNorm with no preceding affine op land here.
    `scale` and `shift` broadcast against `in_shape` (e.g. shape (C, 1, 1) for per-channel).
    """

    kind = "scale"

    def __init__(self, scale: TensorLike, shift: TensorLike, in_shape: Sequence[int], name: str = "scale"):
        self.in_shape = self.out_shape = tuple(int(s) for s in in_shape)
        self.scale = _as_tensor(scale, f"{name}.scale")
        self.shift = _as_tensor(shift, f"{name}.shift")
        try:
            torch.broadcast_shapes(self.scale.shape, self.in_shape)
            torch.broadcast_shapes(self.shift.shape, self.in_shape)
        except RuntimeError as exc:
            raise ShapeMismatchError(f"{name}: scale {tuple(self.scale.shape)} / shift {tuple(self.shift.shape)} "
                                     f"do not broadcast to input shape {self.in_shape}") from exc

    @property
    def bias(self) -> torch.Tensor:
        return self.shift.expand(self.in_shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.abs().to(x.dtype)

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.scale.to(a.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "shift": self.shift}


def _pair(v: IntPair) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ShapeMismatchError(f"expected a pair of ints, got {v}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


@dataclass
class Layer:
    """One layer: affine ops producing the pre-activation a_l, then (for hidden layers) a ReLU."""

    index: int
    name: str
    ops: list[AffineOp]
    relu: bool

    @property
    def in_shape(self) -> Shape:
        return self.ops[0].in_shape

    @property
    def out_shape(self) -> Shape:
        return self.ops[-1].out_shape

    @property
    def main(self) -> AffineOp:
        """The op carrying the layer's neurons (its Linear or Conv2d); the last op with weights."""
        weighted = [op for op in self.ops if isinstance(op, (Linear, Conv2d))]
        return weighted[-1] if weighted else self.ops[-1]

    @property
    def n_neurons(self) -> int:
        """Neurons in the coreset sense: rows of a Linear, output channels of a Conv2d."""
        main = self.main
        return int(main.weight.shape[0]) if isinstance(main, (Linear, Conv2d)) else math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op.forward(x)
        return x

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            a = op.backward(a)
        return a


def not_a_finite_box(lo: npt.NDArray[np.float64], hi: npt.NDArray[np.float64]) -> str | None:
    """None if every [lo_i, hi_i] is a finite interval, else a short description of the first one that is
    not (its index and values, never the whole array) and how many are bad."""
    bad = ~np.isfinite(lo) | ~np.isfinite(hi) | ~(lo <= hi)
    if not bad.any():
        return None
    at = tuple(int(v) for v in np.argwhere(bad)[0])
    return f"input {list(at)} has [{float(lo[at])!r}, {float(hi[at])!r}] ({int(bad.sum())} inputs bad)"


@dataclass
class Network:
    """A sequential ReLU network over inputs of shape `input_shape` in the box [input_lo, input_hi]."""

    ops: list[Op]
    input_shape: Shape
    input_lo: float | npt.NDArray[np.floating[Any]] = 0.0
    input_hi: float | npt.NDArray[np.floating[Any]] = 1.0
    name: str = "network"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.validate()

    # ------------------------------------------------------------------ structure
    def validate(self) -> None:
        """Shapes chain, ReLUs sit between affine ops, every op is a known kind."""
        if not self.ops:
            raise ModelFormatError(f"{self.name}: network has no operators")
        shape = self.input_shape
        for i, op in enumerate(self.ops):
            if not isinstance(op, (AffineOp, ReLU)):
                raise UnsupportedLayerError(f"{self.name}: op {i} has unsupported type {type(op).__name__}")
            if tuple(op.in_shape) != tuple(shape):
                raise ShapeMismatchError(
                    f"{self.name}: op {i} ({op.kind}) expects input shape {op.in_shape} but receives {shape}")
            shape = op.out_shape
            if math.prod(shape) == 0:
                raise ModelFormatError(f"{self.name}: op {i} ({op.kind}) has an empty output of shape {shape}; "
                                       "every layer needs at least one neuron")
        if isinstance(self.ops[0], ReLU) or isinstance(self.ops[-1], ReLU):
            raise ModelFormatError(f"{self.name}: a network must start and end with an affine op, not a ReLU")
        for i in range(1, len(self.ops)):
            if isinstance(self.ops[i], ReLU) and isinstance(self.ops[i - 1], ReLU):
                raise ModelFormatError(f"{self.name}: two ReLUs in a row at ops {i - 1}, {i}")
        try:
            lo, hi = self.domain()
        except ValueError as exc:
            raise ModelFormatError(f"{self.name}: input domain does not fit the input shape {self.input_shape} "
                                   f"({exc})") from None
        problem = not_a_finite_box(lo, hi)
        if problem is not None:
            raise ModelFormatError(f"{self.name}: input domain is not a finite box: {problem}")

    def layers(self) -> list[Layer]:
        """Group the ops into layers (see module docstring)."""
        layers: list[Layer] = []
        current: list[AffineOp] = []
        for op in self.ops:
            if isinstance(op, ReLU):
                layers.append(Layer(len(layers), "", current, True))
                current = []
            else:
                current.append(cast(AffineOp, op))  # validate() admits only AffineOp and ReLU
        layers.append(Layer(len(layers), "", current, False))
        for layer in layers:
            kind = layer.main.kind
            layer.name = f"layer{layer.index}:{kind}" + ("" if layer.relu else ":logits")
        return layers

    @property
    def output_shape(self) -> Shape:
        return self.ops[-1].out_shape

    @property
    def n_inputs(self) -> int:
        return math.prod(self.input_shape)

    def domain(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The input box as two float64 arrays of shape `input_shape`."""
        lo = np.broadcast_to(np.asarray(self.input_lo, dtype=np.float64), self.input_shape).copy()
        hi = np.broadcast_to(np.asarray(self.input_hi, dtype=np.float64), self.input_shape).copy()
        return lo, hi

    def n_params(self) -> int:
        return int(sum(t.numel() for op in self.ops for t in op.tensors().values()))

    def flops(self) -> int:
        """Multiply-accumulates of one forward pass (Linear/Conv2d only)."""
        total = 0
        for op in self.ops:
            if isinstance(op, Linear):
                total += op.weight.numel()
            elif isinstance(op, Conv2d):
                total += op.weight[0].numel() * math.prod(op.out_shape)
        return int(total)

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: TensorLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Logits for a batch `x` of shape (B, *input_shape) (numpy or torch). Keeps no intermediate layer
        (`forward_layers` keeps them all: ~0.6 MB per point on vgg-small)."""
        t = self._prepare(x, dtype)
        for op in self.ops:
            t = op.forward(t)
        return t

    def forward_layers(self, x: TensorLike, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """Pre-activations a_l of every layer (the last one is the logits)."""
        t = self._prepare(x, dtype)
        outs = []
        for op in self.ops:
            if isinstance(op, ReLU):
                outs.append(t)
            t = op.forward(t)
        outs.append(t)
        return outs

    def _prepare(self, data: TensorLike, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(data, np.ndarray) and not data.flags.writeable:
            data = data.copy()  # e.g. a memory-mapped or read-only data set: torch wants writable memory
        x = torch.as_tensor(data)
        if not x.is_floating_point():
            x = x.to(torch.float64)
        x = x.to(dtype)
        if tuple(x.shape[1:]) != self.input_shape:
            if x.ndim >= 1 and math.prod(x.shape[1:]) == self.n_inputs:
                x = x.reshape(x.shape[0], *self.input_shape)
            else:
                raise ShapeMismatchError(f"{self.name}: input of shape {tuple(x.shape)} does not match "
                                         f"(batch, {', '.join(map(str, self.input_shape))})")
        return x

    def predict(self, x: npt.NDArray[Any] | torch.Tensor, batch_size: int = 4096) -> npt.NDArray[np.int64]:
        """Arg-max classes, computed in float32 batches (for accuracy measurements)."""
        preds = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                preds.append(self.forward(x[i:i + batch_size], torch.float32).argmax(1).numpy())
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)

    def describe(self) -> list[dict[str, Any]]:
        """One row per layer for `prunecert info`."""
        rows: list[dict[str, Any]] = []
        for layer in self.layers():
            rows.append({
                "index": layer.index, "name": layer.name, "ops": [op.kind for op in layer.ops],
                "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
                "neurons": layer.n_neurons, "relu": layer.relu,
                "params": int(sum(t.numel() for op in layer.ops for t in op.tensors().values())),
            })
        return rows


def relu_between(ops: Sequence[AffineOp]) -> list[Op]:
    """Interleave ReLUs between consecutive layers given as single affine ops."""
    out: list[Op] = []
    for i, op in enumerate(ops):
        if i:
            out.append(ReLU(out[-1].out_shape))
        out.append(op)
    return out


def mlp(weights: Sequence[TensorLike], biases: Sequence[TensorLike], lo: float | npt.NDArray[np.floating[Any]] = 0.0,
        hi: float | npt.NDArray[np.floating[Any]] = 1.0, name: str = "mlp") -> Network:
    """A fully connected ReLU network from weight matrices (out, in) and bias vectors."""
    ops = [Linear(w, b, name=f"{name}.fc{i}") for i, (w, b) in enumerate(zip(weights, biases))]
    return Network(relu_between(ops), (ops[0].in_shape[0],), lo, hi, name=name)
