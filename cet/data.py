"""Fashion-MNIST loading and calibration sampling.

The images are read from IDX files (gzip-compressed or not). The search order for the files is:
a directory the caller names, ``$CET_DATA``, the directory of Debian's ``dataset-fashion-mnist``
package, and finally torchvision's download, only when the caller allows the network.

The calibration set that CET uses to estimate Hessians is always drawn from the training split;
the test split is reserved for evaluation.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "DataNotFoundError",
    "calibration_indices",
    "calibration_set",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

logger = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Directory of Debian's ``dataset-fashion-mnist`` package."""

# Pixel statistics of the 60,000 training images, scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}

# IDX type codes (the third byte of the magic number) that this reader accepts; Fashion-MNIST uses 0x08.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0D: np.dtype(">f4")}


class DataNotFoundError(FileNotFoundError):
    """Raised when no copy of the data set can be found."""


@dataclass(frozen=True)
class FashionMNIST:
    """Both splits of Fashion-MNIST as normalised float32 tensors.

    Attributes:
        train: 60,000 images of shape (1, 28, 28) with their labels.
        test: 10,000 images of shape (1, 28, 28) with their labels.
        source: the directory the files were read from.
    """

    train: TensorDataset
    test: TensorDataset
    source: Path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (as published by LeCun et al. for MNIST), gzip-compressed or not.

    Raises:
        ValueError: the file is not a valid IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"invalid IDX file {path}: the gzip stream is corrupt or truncated ({error})") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"invalid IDX file {path}: bad magic number {data[:4].hex()}")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"invalid IDX file {path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"invalid IDX file {path}: expected {expected} bytes for shape {shape}, found {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _has_all_files(directory: Path) -> bool:
    return all(
        _idx_path(directory, stem) is not None
        for images, labels, _ in _FILES.values()
        for stem in (images, labels)
    )


def _download(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    for train in (True, False):
        TorchvisionFashionMNIST(str(root), train=train, download=True)
    return root / "FashionMNIST" / "raw"


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, download_root: str | os.PathLike | None = None) -> Path:
    """Return the directory that contains the four Fashion-MNIST IDX files.

    Args:
        data_dir: a directory to use. When given, it must contain the files; nothing else is tried.
        download_root: where torchvision may download the data when no local copy is found.
            ``None`` (the default) forbids the network.

    Raises:
        DataNotFoundError: no copy was found; the message lists every way to provide one.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        if not _has_all_files(directory):
            raise DataNotFoundError(
                f"Fashion-MNIST not found in {directory}: expected the files "
                f"{', '.join(s for v in _FILES.values() for s in v[:2])} (optionally .gz). "
                "Point data_dir at a directory containing them, or pass data_dir=None to search the defaults."
            )
        return directory

    candidates: list[tuple[str, Path]] = []
    if os.environ.get("CET_DATA"):
        directory = Path(os.environ["CET_DATA"])
        # A variable the user set on purpose must not be passed over in silence for another copy.
        if not any(_has_all_files(sub) for sub in (directory, directory / "FashionMNIST" / "raw")):
            raise DataNotFoundError(
                f"CET_DATA is set to {directory}, which does not contain the four Fashion-MNIST IDX files; "
                "fix the path, or unset CET_DATA to use the other copies"
            )
        candidates.append(("$CET_DATA", directory))
    candidates.append(("Debian package", DEBIAN_DIR))
    for label, directory in candidates:
        for sub in (directory, directory / "FashionMNIST" / "raw"):
            if _has_all_files(sub):
                logger.info("Reading Fashion-MNIST from %s (%s)", sub, label)
                return sub

    if download_root is not None:
        logger.info("Downloading Fashion-MNIST into %s", download_root)
        return _download(Path(download_root))

    searched = ", ".join(f"{label} ({directory})" for label, directory in candidates)
    raise DataNotFoundError(
        "Fashion-MNIST not found. Searched: " + searched + ". Provide it in one of these ways:\n"
        "  1. pass data_dir=DIR, a directory containing the IDX files, to load_fashion_mnist or find_fashion_mnist,\n"
        "     or set the data_dir parameter of the chapter book/resnet34.ipynb to DIR;\n"
        "  2. set the environment variable CET_DATA to such a directory;\n"
        "  3. install Debian's package: apt-get install -y dataset-fashion-mnist "
        f"(files under {DEBIAN_DIR});\n"
        "  4. allow torchvision to download it (download_root=DIR), where the network is available."
    )


def _load_split(directory: Path, split: str) -> TensorDataset:
    images_stem, labels_stem, count = _FILES[split]
    images = read_idx(_idx_path(directory, images_stem))
    labels = read_idx(_idx_path(directory, labels_stem))
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(
            f"invalid Fashion-MNIST {split} split in {directory}: images {images.shape}, labels {labels.shape}; "
            f"expected ({count}, 28, 28) and ({count},)"
        )
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"invalid Fashion-MNIST {split} split in {directory}: images {images.dtype} and labels {labels.dtype}; "
            "expected unsigned bytes (IDX type 0x08)"
        )
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"invalid Fashion-MNIST labels in {directory}: found class {labels.max()}, expected 0 to 9")
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    pixels = (pixels - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(pixels, torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, download_root: str | os.PathLike | None = None) -> FashionMNIST:
    """Load both splits of Fashion-MNIST, normalised with the training mean and standard deviation.

    See :func:`find_fashion_mnist` for where the files are looked for.
    """
    directory = find_fashion_mnist(data_dir, download_root)
    return FashionMNIST(train=_load_split(directory, "train"), test=_load_split(directory, "test"), source=directory)


def calibration_indices(num_train: int, size: int, seed: int) -> torch.Tensor:
    """Draw ``size`` distinct training indices with a seeded generator, independent of global state."""
    if not 0 < size <= num_train:
        raise ValueError(f"invalid calibration size {size}: must be between 1 and the training set size {num_train}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_train, generator=generator)[:size].sort().values


def calibration_set(train: TensorDataset, size: int, seed: int) -> TensorDataset:
    """Return a seeded random subset of the training split, as tensors, for Hessian estimation."""
    indices = calibration_indices(len(train), size, seed)
    images, labels = train.tensors
    return TensorDataset(images[indices], labels[indices])
