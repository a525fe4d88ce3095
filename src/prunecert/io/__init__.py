"""Model loading and saving: prunecert files, torch state_dicts, ONNX, NNet; dispatched by suffix.

Model files are untrusted input: torch files are read with `weights_only=True`, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from prunecert.errors import ModelFormatError
from prunecert.io.native import load_native_dict, save_native, weights_sha256
from prunecert.network import Network

__all__ = ["load_model", "save_model", "weights_sha256"]


def load_model(path: str | os.PathLike, arch: str | None = None) -> Network:
    """Load any supported model file into the IR.

    `arch` describes the architecture for a bare torch state_dict (see `prunecert.io.torch_io`).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: model file not found")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from prunecert.io.onnx_io import load_onnx
        return load_onnx(path)
    if suffix == ".nnet":
        from prunecert.io.nnet import load_nnet
        return load_nnet(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise ModelFormatError(f"{path}: not a readable torch model file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(obj, dict) and obj.get("format") == "prunecert-network":
        return load_native_dict(obj, str(path))
    from prunecert.io.torch_io import network_from_state_dict
    return network_from_state_dict(obj, arch, source=str(path))


def save_model(net: Network, path: str | os.PathLike) -> None:
    """Save by suffix: .onnx, .nnet, anything else as a prunecert torch file. Atomic."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        from prunecert.io.onnx_io import save_onnx
        return save_onnx(net, path)
    if suffix == ".nnet":
        from prunecert.io.nnet import save_nnet
        return save_nnet(net, path)
    return save_native(net, path)
