"""Counterexamples on disk: x.npz (the point and what it claims), PNGs for images, result.json; replay.

Everything is written atomically (temporary file + rename), so a failure never leaves a half-written
file; `x.npz` is read back with `allow_pickle=False` (it holds only arrays and strings).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from prunecert.adversarial.objectives import parse_objective
from prunecert.adversarial.result import AttackResult, evaluate
from prunecert.core.completion import pair_of
from prunecert.core.pair import Pair
from prunecert.core.regions import Region
from prunecert.errors import DataError
from prunecert.fileutil import atomic_write_bytes
from prunecert.io import weights_sha256
from prunecert.network import Network

SCHEMA = "prunecert.attack/1"
NPZ_KEYS = ("x", "center", "value", "objective", "label", "sha256_original", "sha256_pruned", "region_lo",
            "region_hi", "radius", "method", "seed")


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """(H, W) or (H, W, C) to draw an input as an image, or None when it is not an image.

    (C, H, W) with C in {1, 3}, (H, W), and flat vectors of a square size >= 64 (e.g. MNIST's 784).
    """
    if len(input_shape) == 3 and input_shape[0] in (1, 3) and min(input_shape[1:]) >= 4:
        c, h, w = input_shape
        return (h, w) if c == 1 else (h, w, 3)
    if len(input_shape) == 2 and min(input_shape) >= 4:
        return tuple(input_shape)
    if len(input_shape) == 1 and input_shape[0] >= 64 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        s = math.isqrt(input_shape[0])
        return (s, s)
    return None


def _as_image(a: npt.NDArray[np.float64], shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    if len(shape) == 3:  # (C, H, W) -> (H, W, C)
        return np.moveaxis(a.reshape(3, *shape[:2]), 0, -1)
    return a.reshape(shape)


def _png(image: npt.NDArray[np.float64], title: str, diverging: bool) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if diverging:
        m = float(np.abs(image).max()) or 1.0
        shown = ax.imshow(image if image.ndim == 2 else image.mean(-1), cmap="RdBu_r", vmin=-m, vmax=m)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    elif image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=min(0.0, float(image.min())), vmax=max(1.0, float(image.max())))
    else:
        ax.imshow(np.clip(image, 0, 1))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_counterexample(result: AttackResult, pair: Pair, region: Region, out: str | Path,
                        hashes: tuple[str, str] | None = None, extra: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """Write x.npz, x.png / x_minus_center.png (image inputs) and result.json into `out`.

    `hashes`: weights_sha256 of the original and pruned models as the user gave them (default: of the
    pair's networks). Returns the JSON written to result.json.
    """
    out = Path(out)
    lo, hi = region.bounding_box()
    radius = float(getattr(region, "radius", None) or np.nan)
    center = result.center if result.center is not None else np.full(pair.input_shape, np.nan)
    sha_f, sha_g = hashes if hashes is not None else (weights_sha256(pair.f), weights_sha256(pair.g))
    buf = io.BytesIO()
    np.savez(buf, x=result.x, center=center, value=np.float64(result.value), objective=np.str_(result.objective),
             label=np.int64(-1 if result.label is None else result.label), sha256_original=np.str_(sha_f),
             sha256_pruned=np.str_(sha_g), region_lo=lo, region_hi=hi, radius=np.float64(radius),
             method=np.str_(result.method), seed=np.int64(result.seed))
    files = {"x.npz": buf.getvalue()}  # every payload is made before anything is written
    shape = image_shape(tuple(pair.input_shape))
    if shape is not None:
        files["x.png"] = _png(_as_image(result.x, shape), f"x: {result.sub_objective} = {result.value:.4g}", False)
        if result.center is not None:
            files["x_minus_center.png"] = _png(_as_image(result.x - result.center, shape), "x - centre", True)
    doc = {"schema": SCHEMA, **result.to_json(), "x_path": "x.npz", "images": [k for k in files if k.endswith(".png")],
           "models": {"original": {"sha256": sha_f}, "pruned": {"sha256": sha_g}}, **(extra or {})}
    files["result.json"] = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return doc


@dataclass
class Replay:
    """A saved counterexample re-evaluated against two models."""

    path: str
    objective: str
    saved_value: float
    value: float
    inside: bool
    models_match: bool
    class_f: int
    class_g: int

    @property
    def reproduced(self) -> bool:
        """Same models, x still inside its region, and the float64 value reproduces."""
        tol = 1e-12 * (1.0 + abs(self.saved_value))
        return self.models_match and self.inside and abs(self.value - self.saved_value) <= tol


def load_counterexample(path: str | Path) -> dict[str, npt.NDArray[Any]]:
    """The arrays of a saved x.npz; a missing, foreign or malformed file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: counterexample file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in NPZ_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: not a prunecert counterexample (missing {', '.join(missing)})")
    if data["x"].dtype.kind != "f" or not np.isfinite(data["x"]).all():
        raise DataError(f"{path}: x must be finite floats, got {data['x'].dtype}")
    return data


def replay(path: str | Path, original: Network | Pair, pruned: Network | None = None) -> Replay:
    """Re-evaluate a saved counterexample with a fresh float64 forward pass of (original, pruned)."""
    data = load_counterexample(path)
    pair = pair_of(original, pruned)
    # the hashes of the networks as given (a compact pruned net is hashed before its completion)
    given = (pair.f, pair.g) if isinstance(original, Pair) else (original, pair.g if pruned is None else pruned)
    hashes = (weights_sha256(given[0]), weights_sha256(given[1]))
    x = data["x"].astype(np.float64)
    if x.size != math.prod(pair.input_shape):
        raise DataError(f"{path}: x has {x.size} values ({x.shape}), the models take {tuple(pair.input_shape)}")
    x = x.reshape(pair.input_shape)
    center = data["center"].astype(np.float64)
    label = int(data["label"])
    objective = parse_objective(str(data["objective"])).resolve(
        pair, None if np.isnan(center).any() else center.reshape(pair.input_shape), None if label < 0 else label)
    ev = evaluate(pair, objective, x[None])
    lo, hi = data["region_lo"].reshape(pair.input_shape), data["region_hi"].reshape(pair.input_shape)
    inside = bool(((x >= lo) & (x <= hi)).all())
    radius = float(data["radius"])
    if not math.isnan(radius):
        inside = inside and float(np.linalg.norm((x - center.reshape(x.shape)).reshape(-1))) <= radius
    match = (str(data["sha256_original"]), str(data["sha256_pruned"])) == hashes
    return Replay(str(path), str(data["objective"]), float(data["value"]), float(ev.values[0]), inside, match,
                  int(ev.class_f[0]), int(ev.class_g[0]))
