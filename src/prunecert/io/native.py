"""prunecert's own model file: a torch.save'd dict of plain tensors, strings and numbers.

It loads with `torch.load(weights_only=True)` (no unpickling of code) and carries the architecture as
JSON, the input domain, and free-form metadata (pruning records, provenance) as a JSON string.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunecert.errors import ModelFormatError, UnsupportedLayerError
from prunecert.fileutil import atomic_path
from prunecert.network import AvgPool2d, Conv2d, Flatten, Linear, Network, Op, ReLU, Scale

FORMAT = "prunecert-network"
VERSION = 1


def network_to_dict(net: Network) -> dict[str, Any]:
    ops: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for i, op in enumerate(net.ops):
        ops.append(op.config())
        for key, t in op.tensors().items():
            tensors[f"{i}.{key}"] = t.detach().to(torch.float64).contiguous()
    lo, hi = net.domain()
    return {
        "format": FORMAT, "version": VERSION, "name": net.name,
        "input_shape": list(net.input_shape), "ops": json.dumps(ops),
        "input_lo": torch.from_numpy(lo), "input_hi": torch.from_numpy(hi),
        "tensors": tensors, "metadata": json.dumps(net.metadata, sort_keys=True),
    }


def network_from_dict(d: dict[str, Any], source: str = "<dict>") -> Network:
    try:
        if d.get("format") != FORMAT:
            raise ModelFormatError(f"{source}: not a prunecert model file (format={d.get('format')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise ModelFormatError(f"{source}: model file version {d['version']} is newer than supported ({VERSION})")
        tensors = d["tensors"]
        ops: list[Op] = []
        for i, cfg in enumerate(json.loads(d["ops"])):
            ops.append(_op_from_config(i, cfg, tensors, source))
        return Network(ops, tuple(d["input_shape"]), d["input_lo"].numpy(), d["input_hi"].numpy(),
                       name=d.get("name", Path(source).stem), metadata=json.loads(d.get("metadata", "{}")))
    except ModelFormatError as exc:
        if str(exc).startswith(source):
            raise
        raise type(exc)(f"{source}: {exc}") from exc
    except RecursionError:
        raise ModelFormatError(f"{source}: malformed prunecert model file (JSON nested too deeply)") from None
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{source}: malformed prunecert model file ({type(exc).__name__}: {exc})") from exc


def _op_from_config(i: int, cfg: dict[str, Any], tensors: dict[str, Any], source: str) -> Op:
    kind, in_shape, name = cfg["kind"], cfg["in_shape"], f"{source} op {i}"

    def t(key: str) -> Any:  # a tensor, if the file is well-formed: the ops check what they get
        return tensors[f"{i}.{key}"]

    if kind == "linear":
        return Linear(t("weight"), t("bias"), name=name)
    if kind == "conv2d":
        return Conv2d(t("weight"), t("bias"), in_shape, cfg["stride"], cfg["padding"], name=name)
    if kind == "avgpool2d":
        return AvgPool2d(cfg["kernel"], in_shape, cfg["stride"], cfg["padding"], name=name)
    if kind == "flatten":
        return Flatten(in_shape)
    if kind == "scale":
        return Scale(t("scale"), t("shift"), in_shape, name=name)
    if kind == "relu":
        return ReLU(in_shape)
    raise UnsupportedLayerError(f"{name}: unknown operator kind {kind!r}")


def save_native(net: Network, path: str | os.PathLike[str]) -> None:
    """Atomic, and byte-for-byte reproducible: saved through a buffer, so the zip's entry names do not
    carry the (random) temporary file name."""
    buffer = io.BytesIO()
    torch.save(network_to_dict(net), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_native_dict(obj: dict[str, Any], path: str) -> Network:
    return network_from_dict(obj, path)


def weights_sha256(net: Network) -> str:
    """Hash of the architecture and the float64 weights (independent of file format and metadata)."""
    h = hashlib.sha256()
    h.update(json.dumps([op.config() for op in net.ops], sort_keys=True).encode())
    for op in net.ops:
        for key, t in sorted(op.tensors().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(t.detach().to(torch.float64).numpy()).tobytes())
    return h.hexdigest()
