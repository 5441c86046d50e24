"""Tests of cet.data: IDX reading, the Fashion-MNIST search order, loading and calibration sampling."""

import gzip

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import cet.data
from cet.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataNotFoundError,
    calibration_indices,
    calibration_set,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">f4"): 0x0D}

# Split sizes small enough to write in a test. The small_splits fixture patches _FILES to expect them.
SMALL_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 6),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 3),
}


def idx_bytes(array):
    """Encode ``array`` in the IDX format: magic (0, 0, type, ndim), big-endian uint32 dims, data."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.tobytes()


def write_idx(path, array):
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def write_small_fashion_mnist(directory, compressed=False, label_offset=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compressed else ""
    for images_stem, labels_stem, count in SMALL_FILES.values():
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 255
        labels = (np.arange(count) % 10 + label_offset).astype(np.uint8)
        write_idx(directory / (images_stem + suffix), images)
        write_idx(directory / (labels_stem + suffix), labels)


@pytest.fixture
def no_default_sources(monkeypatch, tmp_path):
    """Remove $CET_DATA and point the Debian directory at an empty folder."""
    empty = tmp_path / "no-debian-package"
    empty.mkdir()
    monkeypatch.delenv("CET_DATA", raising=False)
    monkeypatch.setattr(cet.data, "DEBIAN_DIR", empty)
    return empty


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setattr(cet.data, "_FILES", SMALL_FILES)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(5 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(5, 28, 28),
        np.array([9, 0, 3, 7], dtype=np.uint8),
        np.array([[-128, 5], [127, 0]], dtype=np.int8),
        np.array([1.5, -2.25, 3e-3], dtype=">f4"),
    ],
    ids=["images", "labels", "int8", "float32"],
)
def test_read_idx_round_trip(tmp_path, suffix, array):
    path = tmp_path / ("data.idx" + suffix)
    write_idx(path, array)

    result = read_idx(path)

    assert result.dtype == array.dtype
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated_raises(tmp_path, suffix):
    path = tmp_path / ("images.idx" + suffix)
    data = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))[:-1]
    if suffix:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)

    with pytest.raises(ValueError, match="expected"):
        read_idx(path)


def test_read_idx_truncated_header_raises(tmp_path):
    path = tmp_path / "header.idx"
    path.write_bytes(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))[:9])

    with pytest.raises(ValueError, match="invalid IDX file"):
        read_idx(path)


def test_read_idx_trailing_bytes_raise(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00")

    with pytest.raises(ValueError, match="expected"):
        read_idx(path)


@pytest.mark.parametrize(
    "magic",
    [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x0f\x01", b"\x1f\x8b\x08\x00", b"\x00\x00"],
    ids=["first-byte", "second-byte", "unknown-type", "gzip-without-suffix", "too-short"],
)
def test_read_idx_bad_magic_raises(tmp_path, magic):
    path = tmp_path / "bad.idx"
    path.write_bytes(magic + (4).to_bytes(4, "big") + bytes(4))

    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(path)


def test_find_in_empty_data_dir_raises(tmp_path, no_default_sources):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DataNotFoundError, match="not found in"):
        find_fashion_mnist(empty)


def test_data_not_found_is_file_not_found():
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_explicit_data_dir_skips_defaults(tmp_path, monkeypatch, no_default_sources):
    # A data_dir that lacks the files must fail even when $CET_DATA contains them.
    complete = tmp_path / "complete"
    write_small_fashion_mnist(complete)
    monkeypatch.setenv("CET_DATA", str(complete))
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DataNotFoundError):
        find_fashion_mnist(empty)


def test_not_found_message_lists_options(no_default_sources):
    with pytest.raises(DataNotFoundError) as raised:
        find_fashion_mnist()

    message = str(raised.value)
    assert "data_dir=" in message
    assert "CET_DATA" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "download_root=" in message
    assert str(no_default_sources) in message


@pytest.mark.parametrize("compressed", [False, True])
def test_find_uses_cet_data(tmp_path, monkeypatch, no_default_sources, compressed):
    directory = tmp_path / "fashion"
    write_small_fashion_mnist(directory, compressed=compressed)
    monkeypatch.setenv("CET_DATA", str(directory))

    assert find_fashion_mnist() == directory


def test_find_uses_torchvision_layout(tmp_path, monkeypatch, no_default_sources):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    write_small_fashion_mnist(raw)
    monkeypatch.setenv("CET_DATA", str(tmp_path / "root"))

    assert find_fashion_mnist() == raw


def test_find_uses_debian_dir(tmp_path, monkeypatch, no_default_sources):
    debian = tmp_path / "debian"
    write_small_fashion_mnist(debian, compressed=True)
    monkeypatch.setattr(cet.data, "DEBIAN_DIR", debian)

    assert find_fashion_mnist() == debian


def test_find_requires_all_four_files(tmp_path, monkeypatch, no_default_sources):
    directory = tmp_path / "partial"
    write_small_fashion_mnist(directory)
    (directory / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setenv("CET_DATA", str(directory))

    with pytest.raises(DataNotFoundError):
        find_fashion_mnist()


@pytest.mark.parametrize("compressed", [False, True])
def test_load_small_splits(tmp_path, monkeypatch, no_default_sources, small_splits, compressed):
    directory = tmp_path / "fashion"
    write_small_fashion_mnist(directory, compressed=compressed)
    monkeypatch.setenv("CET_DATA", str(directory))

    data = load_fashion_mnist()

    train_images, train_labels = data.train.tensors
    test_images, test_labels = data.test.tensors
    assert data.source == directory
    assert train_images.shape == (6, 1, 28, 28)
    assert test_images.shape == (3, 1, 28, 28)
    assert train_images.dtype == torch.float32
    assert train_labels.dtype == torch.int64
    assert train_labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert test_labels.tolist() == [0, 1, 2]
    expected_white = (1.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert train_images[0, 0, 0, 0].item() == pytest.approx(expected_white, rel=1e-6)


def test_load_rejects_wrong_count(tmp_path, monkeypatch, no_default_sources):
    # Without the patched sizes the loader expects 60,000 training images and finds 6.
    directory = tmp_path / "fashion"
    write_small_fashion_mnist(directory)
    monkeypatch.setenv("CET_DATA", str(directory))

    with pytest.raises(ValueError, match="invalid Fashion-MNIST train split"):
        load_fashion_mnist()


def test_load_rejects_label_out_of_range(tmp_path, monkeypatch, no_default_sources, small_splits):
    directory = tmp_path / "fashion"
    write_small_fashion_mnist(directory, label_offset=5)
    monkeypatch.setenv("CET_DATA", str(directory))

    with pytest.raises(ValueError, match="invalid Fashion-MNIST labels"):
        load_fashion_mnist()


def test_calibration_indices_deterministic():
    first = calibration_indices(1000, 50, seed=3)
    second = calibration_indices(1000, 50, seed=3)

    assert torch.equal(first, second)


@pytest.mark.parametrize(("num_train", "size"), [(1000, 50), (10, 10), (5, 1)])
def test_calibration_indices_valid(num_train, size):
    indices = calibration_indices(num_train, size, seed=4)

    assert indices.shape == (size,)
    assert len(set(indices.tolist())) == size
    assert torch.equal(indices, indices.sort().values)
    assert indices.min().item() >= 0
    assert indices.max().item() < num_train


def test_calibration_indices_depend_on_seed():
    assert not torch.equal(calibration_indices(1000, 50, seed=0), calibration_indices(1000, 50, seed=1))


def test_calibration_indices_ignore_global_seed():
    torch.manual_seed(0)
    first = calibration_indices(1000, 50, seed=5)
    torch.manual_seed(1)
    second = calibration_indices(1000, 50, seed=5)

    assert torch.equal(first, second)


@pytest.mark.parametrize("size", [0, -1, 11])
def test_calibration_indices_invalid_size(size):
    with pytest.raises(ValueError, match="invalid calibration size"):
        calibration_indices(10, size, seed=0)


def test_calibration_set_keeps_pairs():
    images = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    labels = torch.arange(20) * 10
    train = TensorDataset(images, labels)

    subset = calibration_set(train, 5, seed=6)

    subset_images, subset_labels = subset.tensors
    expected = calibration_indices(20, 5, seed=6)
    assert torch.equal(subset_images.reshape(-1).long(), expected)
    assert torch.equal(subset_labels, expected * 10)
