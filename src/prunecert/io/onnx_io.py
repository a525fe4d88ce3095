"""ONNX import and export of sequential ReLU networks.

Import walks the graph from its single input along a chain of nodes. Supported: Gemm (transA/transB,
alpha, beta), MatMul followed by Add, Relu, Conv (group 1, no dilation), Flatten, Reshape (to flat),
BatchNormalization (folded into the preceding Gemm/Conv, or a `Scale`), AveragePool, and the input
normalisation benchmark models carry (Sub/Div/Mul/Add by constants, becoming `Scale`). Any other
operator, a branch, or a non-ReLU activation is refused with the node's name and op_type.

Export writes float32 ONNX with a dynamic batch dimension; `save_difference_onnx` writes one network
computing f(x) - g(x) so an external verifier can cross-check a certificate.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from prunecert.errors import ModelFormatError, PrunecertError, UnsupportedLayerError
from prunecert.fileutil import atomic_path
from prunecert.network import AvgPool2d, Conv2d, Flatten, Linear, Network, Op, ReLU, Scale

OPSET = 13


# ---------------------------------------------------------------------------------------------- import
class _Graph:
    """Index of an ONNX graph: constants by name, consumers of each value."""

    def __init__(self, model: onnx.ModelProto, source: str):
        self.source = source
        g = model.graph
        self.consts: dict[str, npt.NDArray[Any]] = {t.name: _initializer(t, source) for t in g.initializer}
        self.nodes: list[onnx.NodeProto] = []
        for node in g.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = _constant_value(node, source)
            else:
                self.nodes.append(node)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ModelFormatError(f"{source}: expected exactly one graph input, found {[i.name for i in inputs]}")
        self.input = inputs[0]
        self.outputs = {o.name for o in g.output}

    def const(self, node: onnx.NodeProto, idx: int) -> npt.NDArray[np.float64]:
        if idx >= len(node.input) or node.input[idx] not in self.consts:
            raise UnsupportedLayerError(f"{self.source}: node {node.name!r} ({node.op_type}) needs a constant "
                                        f"input #{idx}; only sequential networks with constant weights are supported")
        return self.consts[node.input[idx]].astype(np.float64)

    def next_node(self, value: str) -> onnx.NodeProto | None:
        users = self.consumers.get(value, [])
        if len(users) > 1:
            raise UnsupportedLayerError(f"{self.source}: value {value!r} feeds {len(users)} nodes "
                                        f"({', '.join(n.name or n.op_type for n in users)}); only chains are supported")
        return users[0] if users else None


_REAL_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8,
               TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16,
               TensorProto.UINT32, TensorProto.UINT64}


def _initializer(t: onnx.TensorProto, source: str) -> npt.NDArray[Any]:
    """A constant tensor as numpy, after checking its element type and that its data fills its declared shape
    (a header declaring 100000x100000 over 16 bytes must not reach numpy)."""
    kind = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
    if t.data_type not in _REAL_TYPES:
        raise ModelFormatError(f"{source}: tensor {t.name!r} has element type {kind}; only real numbers are "
                               "supported")
    if any(d < 0 for d in t.dims):
        raise ModelFormatError(f"{source}: tensor {t.name!r} has a negative dimension {list(t.dims)}")
    declared = math.prod(t.dims)
    if t.data_location != TensorProto.EXTERNAL:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        held = len(t.raw_data) // itemsize if t.HasField("raw_data") else max(
            len(t.float_data), len(t.double_data), len(t.int32_data), len(t.int64_data), len(t.uint64_data))
        if held != declared:
            raise ModelFormatError(f"{source}: tensor {t.name!r} declares shape {list(t.dims)} ({declared:,} values) "
                                   f"but holds {held:,}")
    try:
        return numpy_helper.to_array(t, base_dir=str(Path(source).parent))
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        raise ModelFormatError(f"{source}: tensor {t.name!r} cannot be read ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from exc


def _constant_value(node: onnx.NodeProto, source: str) -> npt.NDArray[Any]:
    for attr in node.attribute:
        if attr.name == "value":
            return _initializer(attr.t, source)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    raise UnsupportedLayerError(f"{source}: Constant node {node.name!r} has no supported value attribute")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input_shape(g: _Graph) -> tuple[int, ...]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in g.input.type.tensor_type.shape.dim]
    if not dims:
        raise ModelFormatError(f"{g.source}: graph input {g.input.name!r} has no shape")
    shape = dims[1:] if len(dims) > 1 else dims  # the first dim is the batch, unless the input is a vector
    if any(d is None or d <= 0 for d in shape):
        raise ModelFormatError(f"{g.source}: graph input {g.input.name!r} has unknown non-batch dims {dims}")
    return tuple(int(d) for d in shape if d is not None)  # (None was refused just above)


def load_onnx(path: str | os.PathLike[str], lo: float | npt.NDArray[np.floating[Any]] = 0.0,
              hi: float | npt.NDArray[np.floating[Any]] = 1.0) -> Network:
    """Import a sequential ReLU network; ONNX carries no input domain, so it is [lo, hi] (default [0, 1])."""
    source = str(path)
    try:
        model = onnx.load(source)
    except Exception as exc:  # protobuf raises DecodeError and others on foreign files
        raise ModelFormatError(f"{source}: not a readable ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node:
        raise ModelFormatError(f"{source}: ONNX graph has no nodes")
    g = _Graph(model, source)
    in_shape = _input_shape(g)
    ops: list[Op] = []
    shape = in_shape
    value = g.input.name
    node = g.next_node(value)
    seen: set[int] = set()
    while node is not None:
        if id(node) in seen:  # a graph is acyclic; following a cycle would never end
            raise ModelFormatError(f"{source}: the graph has a cycle through node {node.name or node.op_type!r} "
                                   f"({node.op_type}); only feed-forward chains are supported")
        seen.add(id(node))
        new_ops, consumed = _convert(g, node, shape, ops)
        seen.add(id(consumed))
        for op in new_ops:
            ops.append(op)
            shape = op.out_shape
        value = consumed.output[0]
        node = g.next_node(value)
    if len(g.outputs) != 1:
        raise ModelFormatError(f"{source}: expected exactly one graph output, found {sorted(g.outputs)}")
    if value not in g.outputs:
        raise ModelFormatError(f"{source}: the node chain ends at {value!r}, which is not a graph output")
    ops = _merge_scales(ops)
    try:
        return Network(ops, in_shape, lo, hi, name=Path(source).stem)
    except PrunecertError as exc:  # an empty layer, a bad domain: name the file, not just its stem
        raise type(exc)(f"{source}: {exc}") from exc


def _convert(g: _Graph, node: onnx.NodeProto, shape: tuple[int, ...], ops: list[Op]
             ) -> tuple[list[Op], onnx.NodeProto]:
    """Translate one node (or a MatMul+Add pair); returns (new ops, last node consumed)."""
    t, a, name = node.op_type, _attrs(node), f"{g.source} node {node.name or node.op_type!r} ({node.op_type})"
    if t == "Gemm":
        if a.get("transA", 0):
            raise UnsupportedLayerError(f"{name}: transA=1 is not supported (the chained value must be A)")
        w = g.const(node, 1) * a.get("alpha", 1.0)
        if not a.get("transB", 0):
            w = w.T
        b = _vector(g.const(node, 2) * a.get("beta", 1.0), w.shape[0], name) \
            if len(node.input) > 2 and node.input[2] else None
        return _flatten_then(shape, Linear(w, b, name=name)), node
    if t == "MatMul":
        if node.input[0] in g.consts:
            raise UnsupportedLayerError(f"{name}: only `x @ W` is supported, not `W @ x`")
        w = g.const(node, 1)
        if w.ndim != 2 or (len(shape) > 1 and math.prod(shape[:-1]) != 1) or shape[-1] != w.shape[0]:
            raise UnsupportedLayerError(f"{name}: MatMul of input shape {shape} by weight {w.shape} is not a "
                                        "fully connected layer")
        w = w.T
        nxt = g.next_node(node.output[0])
        if nxt is not None and nxt.op_type == "Add":
            other = [v for v in nxt.input if v != node.output[0]]
            if len(other) == 1 and other[0] in g.consts:
                b = _vector(g.consts[other[0]].astype(np.float64), w.shape[0], f"{name} + {nxt.name!r} (Add)")
                return _flatten_then(shape, Linear(w, b, name=name)), nxt
        return _flatten_then(shape, Linear(w, None, name=name)), node
    if t in ("Identity", "Dropout"):
        if t == "Dropout" and len(node.input) > 2 and node.input[2] and \
                np.any(g.consts.get(node.input[2], np.array(True))):
            raise UnsupportedLayerError(f"{name}: Dropout in training mode is not deterministic")
        return [], node
    if t == "Relu":
        return [ReLU(shape)], node
    if t == "Conv":
        if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise UnsupportedLayerError(f"{name}: grouped or dilated convolutions are not supported")
        pads = a.get("pads", [0, 0, 0, 0])
        if _auto_pad(a) == "VALID":
            pads = [0, 0, 0, 0]
        elif _auto_pad(a) != "NOTSET" or pads[0] != pads[2] or pads[1] != pads[3]:
            raise UnsupportedLayerError(f"{name}: only explicit symmetric padding is supported (pads={pads})")
        b = g.const(node, 2) if len(node.input) > 2 and node.input[2] else None
        return [Conv2d(g.const(node, 1), b, shape, a.get("strides", [1, 1]), pads[:2], name=name)], node
    if t in ("Flatten", "Reshape"):
        if t == "Flatten" and a.get("axis", 1) != 1:
            raise UnsupportedLayerError(f"{name}: Flatten axis {a['axis']} is not supported (only 1)")
        if t == "Reshape":
            target = g.const(node, 1).astype(np.int64).tolist()
            if len(target) != 2 or target[1] not in (-1, math.prod(shape)):
                raise UnsupportedLayerError(f"{name}: only a reshape to (batch, -1) is supported, got {target}")
        return ([Flatten(shape)] if len(shape) > 1 else []), node
    if t == "BatchNormalization":
        scale, bias, mean, var = (g.const(node, i) for i in range(1, 5))
        var = var + a.get("epsilon", 1e-5)
        if np.any(~(var > 0)):
            i = int(np.flatnonzero(~(var > 0))[0])
            raise ModelFormatError(f"{name}: variance + epsilon of channel {i} is {float(var.reshape(-1)[i])!r} "
                                   "(must be > 0)")
        k = scale / np.sqrt(var)
        c = bias - k * mean
        prev = ops[-1] if ops else None
        if isinstance(prev, Linear):
            ops.pop()
            return [Linear(prev.weight.numpy() * k[:, None], prev.bias.numpy() * k + c, name=name)], node
        if isinstance(prev, Conv2d):
            ops.pop()
            return [Conv2d(prev.weight.numpy() * k[:, None, None, None], prev._bias.numpy() * k + c,
                           prev.in_shape, prev.stride, prev.padding, name=name)], node
        view = (-1,) + (1,) * (len(shape) - 1)
        return [Scale(k.reshape(view), c.reshape(view), shape, name=name)], node
    if t == "AveragePool":
        pads = a.get("pads", [0, 0, 0, 0])
        if _auto_pad(a) != "NOTSET" or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise UnsupportedLayerError(f"{name}: auto_pad {_auto_pad(a)} / dilations are not supported for pooling")
        if a.get("ceil_mode", 0) or (any(pads) and not a.get("count_include_pad", 0)) or pads[0] != pads[2] or pads[1] != pads[3]:
            raise UnsupportedLayerError(f"{name}: only floor-mode, symmetric, pad-inclusive average pooling is supported")
        if "kernel_shape" not in a:
            raise ModelFormatError(f"{name}: AveragePool has no kernel_shape attribute (required by ONNX)")
        return [AvgPool2d(a["kernel_shape"], shape, a.get("strides", a["kernel_shape"]), pads[:2], name=name)], node
    if t in ("Sub", "Add", "Mul", "Div"):
        x_first = node.input[1] in g.consts and node.input[0] not in g.consts
        if not x_first and not (node.input[0] in g.consts and node.input[1] not in g.consts and t != "Div"):
            raise UnsupportedLayerError(f"{name}: only `x {t} constant`"
                                        + ("" if t == "Div" else f" or `constant {t} x`") + " is supported")
        c = _broadcast_const(g.const(node, 1 if x_first else 0), shape, name)
        if t == "Div" and np.any(c == 0):
            raise ModelFormatError(f"{name}: divides by a constant holding zero at index "
                                   f"{[int(i) for i in np.argwhere(c == 0)[0]]}")
        one, zero = np.ones_like(c), np.zeros_like(c)
        if t == "Sub":
            scale, shift = (one, -c) if x_first else (-one, c)
        else:
            scale, shift = {"Add": (one, c), "Mul": (c, zero), "Div": (1.0 / c, zero)}[t]
        return [Scale(scale, shift, shape, name=name)], node
    raise UnsupportedLayerError(f"{name}: unsupported ONNX operator {t} (supported: Gemm, MatMul+Add, Relu, Conv, "
                                "Flatten, Reshape, BatchNormalization, AveragePool, Sub/Add/Mul/Div by constants, "
                                "Identity, Dropout)")


def _auto_pad(a: dict[str, Any]) -> str:
    v = a.get("auto_pad", "NOTSET")
    return v.decode() if isinstance(v, bytes) else str(v)


def _vector(c: npt.NDArray[Any], n: int, name: str) -> npt.NDArray[np.float64]:
    """A bias given as a scalar, (n,) or (1, n) constant, as a vector of length n."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == n:
        return c.reshape(n)
    if c.size == 1:
        return np.full(n, float(c.reshape(())))
    raise UnsupportedLayerError(f"{name}: bias of shape {c.shape} does not fit {n} outputs")


def _broadcast_const(c: npt.NDArray[Any], shape: tuple[int, ...], name: str) -> npt.NDArray[np.float64]:
    c = np.asarray(c, dtype=np.float64)
    while c.ndim > len(shape) and c.shape[0] == 1:
        c = c[0]  # drop a leading batch dim of 1
    try:
        np.broadcast_shapes(c.shape, tuple(shape))
    except ValueError as exc:
        raise UnsupportedLayerError(f"{name}: constant of shape {c.shape} does not broadcast to {shape}") from exc
    return c


def _flatten_then(shape: tuple[int, ...], op: Linear) -> list[Op]:
    return [Flatten(shape), op] if len(shape) > 1 else [op]


def _merge_scales(ops: list[Op]) -> list[Op]:
    """Fuse consecutive Scale ops ((x - mean) / std becomes one op)."""
    out: list[Op] = []
    for op in ops:
        prev = out[-1] if out else None
        if isinstance(op, Scale) and isinstance(prev, Scale):
            out.pop()
            op = Scale(prev.scale * op.scale, prev.shift * op.scale + op.shift, op.in_shape)
        out.append(op)
    return out


# ---------------------------------------------------------------------------------------------- export
class _Writer:
    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{self.prefix}{base}_{self.n}"

    def const(self, base: str, value: npt.NDArray[Any]) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _emit(net: Network, w: _Writer, value: str) -> str:
    for op in net.ops:
        if isinstance(op, Linear):
            value = w.node("Gemm", [value, w.const("W", op.weight.numpy()), w.const("b", op.bias.numpy())], transB=1)
        elif isinstance(op, Conv2d):
            pads = list(op.padding) * 2
            value = w.node("Conv", [value, w.const("W", op.weight.numpy()), w.const("b", op._bias.numpy())],
                           strides=list(op.stride), pads=pads, kernel_shape=list(op.weight.shape[2:]))
        elif isinstance(op, ReLU):
            value = w.node("Relu", [value])
        elif isinstance(op, Flatten):
            value = w.node("Flatten", [value], axis=1)
        elif isinstance(op, AvgPool2d):
            value = w.node("AveragePool", [value], kernel_shape=list(op.kernel), strides=list(op.stride),
                           pads=list(op.padding) * 2, count_include_pad=1)
        elif isinstance(op, Scale):
            value = w.node("Mul", [value, w.const("scale", op.scale.numpy())])
            value = w.node("Add", [value, w.const("shift", op.shift.numpy())])
        else:  # pragma: no cover - validate() admits only the kinds above
            raise UnsupportedLayerError(f"{net.name}: cannot export {op.kind} to ONNX")
    return value


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], in_shape: tuple[int, ...],
           out_shape: tuple[int, ...], input_name: str, output_value: str, doc: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *in_shape])
    y = helper.make_tensor_value_info(output_value, TensorProto.FLOAT, ["batch", *out_shape])
    graph = helper.make_graph(nodes, "prunecert", [x], [y], inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="prunecert")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _write(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def save_onnx(net: Network, path: str | os.PathLike[str]) -> None:
    """Write `net` as float32 ONNX (input name `input`, dynamic batch). Atomic."""
    w = _Writer()
    out = _emit(net, w, "input")
    _write(_model(w.nodes, w.inits, net.input_shape, net.output_shape, "input", out, net.name), path)


def save_difference_onnx(f: Network, g: Network, path: str | os.PathLike[str]) -> None:
    """One ONNX network computing f(x) - g(x) from a shared input (for external verifiers). Atomic."""
    if f.input_shape != g.input_shape or f.output_shape != g.output_shape:
        raise ModelFormatError(f"cannot build f - g: shapes differ (inputs {f.input_shape} vs {g.input_shape}, "
                               f"outputs {f.output_shape} vs {g.output_shape})")
    wf, wg = _Writer("f_"), _Writer("g_")
    out_f, out_g = _emit(f, wf, "input"), _emit(g, wg, "input")
    diff = helper.make_node("Sub", [out_f, out_g], ["delta"], name="delta")
    model = _model(wf.nodes + wg.nodes + [diff], wf.inits + wg.inits, f.input_shape, f.output_shape,
                   "input", "delta", f"{f.name} - {g.name}")
    _write(model, path)
