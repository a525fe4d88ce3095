"""Model loading and saving: prunecert files, torch state_dicts, ONNX, NNet; dispatched by suffix.

Model files are untrusted input: torch files are read with `weights_only=True`, never unpickled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from prunecert.errors import ConfigError, ModelFormatError
from prunecert.io.native import load_native_dict, save_native, weights_sha256
from prunecert.network import Network, not_a_finite_box

__all__ = ["load_model", "parse_input_domain", "save_model", "weights_sha256", "with_input_domain"]

Domain = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def parse_input_domain(text: str | None) -> Domain | None:
    """`--input-domain`: `LO,HI` (two numbers for every input), a .npy file holding an array of shape
    (2, *input_shape) (lo, then hi), or `LO.npy,HI.npy`; None stays None."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1 and parts[0].lower().endswith(".npy"):
        pair = _npy(parts[0])
        if pair.ndim < 1 or pair.shape[0] != 2:
            raise ConfigError(f"--input-domain {parts[0]}: expected an array of shape (2, ...) (lo, hi), got "
                              f"{pair.shape}")
        return pair[0], pair[1]
    if len(parts) != 2:
        raise ConfigError(f"--input-domain {text!r}: expected LO,HI (e.g. -1,1), a .npy pair file or LO.npy,HI.npy")
    if all(p.lower().endswith(".npy") for p in parts):
        return _npy(parts[0]), _npy(parts[1])
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--input-domain {text!r}: expected two numbers LO,HI (e.g. -1,1)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ConfigError(f"--input-domain {text!r}: need finite numbers with LO <= HI, got {lo!r}, {hi!r}")
    return np.asarray(lo), np.asarray(hi)


def _npy(path: str) -> npt.NDArray[np.float64]:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--input-domain {path}: not a readable .npy file ({type(exc).__name__})") from exc
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
        raise ConfigError(f"--input-domain {path}: expected a numeric array, got {getattr(a, 'dtype', type(a))}")
    return a.astype(np.float64)


def with_input_domain(net: Network, domain: Domain | None, source: str = "--input-domain") -> Network:
    """`net` over the input box `domain` = (lo, hi) instead of the one its file gave (ONNX carries none and
    defaults to [0, 1]); recorded in `net.metadata["input_domain"]`. None returns `net` unchanged."""
    if domain is None:
        return net
    lo, hi = (np.asarray(a, dtype=np.float64) for a in domain)
    shape = net.input_shape
    try:
        lo, hi = (np.broadcast_to(a if a.size != math.prod(shape) else a.reshape(shape), shape).copy()
                  for a in (lo, hi))
    except ValueError:
        raise ConfigError(f"{source}: bounds of shape {lo.shape} / {hi.shape} do not fit the input shape "
                          f"{shape} of {net.name}") from None
    problem = not_a_finite_box(lo, hi)
    if problem is not None:
        raise ConfigError(f"{source}: not a finite box: {problem}")
    out = Network(net.ops, shape, lo, hi, name=net.name, metadata=dict(net.metadata))
    out.metadata["input_domain"] = {"source": source, "lo_min": float(lo.min()), "lo_max": float(lo.max()),
                                    "hi_min": float(hi.min()), "hi_max": float(hi.max())}
    return out


def load_model(path: str | os.PathLike[str], arch: str | None = None, input_domain: Domain | None = None) -> Network:
    """Load any supported model file into the IR.

    `arch` describes the architecture for a bare torch state_dict (see `prunecert.io.torch_io`);
    `input_domain` (lo, hi) replaces the input box the file gives (see `with_input_domain`).
    """
    return with_input_domain(_load(Path(path), arch), input_domain)


def _load(path: Path, arch: str | None) -> Network:
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


def save_model(net: Network, path: str | os.PathLike[str]) -> None:
    """Save by suffix: .onnx, .nnet, anything else as a prunecert torch file. Atomic."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        from prunecert.io.onnx_io import save_onnx
        return save_onnx(net, path)
    if suffix == ".nnet":
        from prunecert.io.nnet import save_nnet
        return save_nnet(net, path)
    return save_native(net, path)
