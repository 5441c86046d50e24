"""Data sets: Fashion-MNIST, ImageNet-style image folders and CIFAR-10, and calibration sampling.

Fashion-MNIST images are read from IDX files (gzip-compressed or not). The search order for the files is:
a directory the caller names, ``$CET_DATA``, the directory of Debian's ``dataset-fashion-mnist``
package, and finally torchvision's download, only when the caller allows the network.

The calibration set that CET uses to estimate Hessians is always drawn from the training split;
the test split is reserved for evaluation.

:func:`load_data_source` reads a data specification of the command line (``fashion-mnist[:DIR]``,
``imagefolder:DIR``, ``cifar10:DIR``) into a :class:`DataSource`: a pool to draw calibration samples
from and an evaluation split.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_SPEC_HELP",
    "DEBIAN_DIR",
    "DataSource",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "DataNotFoundError",
    "calibration_indices",
    "calibration_set",
    "check_calibration_size",
    "draw_calibration_set",
    "find_fashion_mnist",
    "imagenet_evaluation_transform",
    "load_cifar10",
    "load_data_source",
    "load_fashion_mnist",
    "load_image_folder",
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


# Per-channel statistics of ImageNet's training images, as used by torchvision's pretrained weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-channel statistics of CIFAR-10's 50,000 training images, scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_BATCH = "test_batch"

DATA_SPEC_HELP = (
    "fashion-mnist[:DIR] (the four IDX files; without DIR, $CET_DATA or Debian's package), "
    "imagefolder:DIR (one folder per class, ImageNet's validation layout; with DIR/train and DIR/val, "
    "calibration uses train and evaluation val), cifar10:DIR (the python-format batches data_batch_1 "
    "to data_batch_5 and test_batch)"
)


@dataclass(frozen=True)
class DataSource:
    """A data set as the compression steps use it.

    Attributes:
        spec: the specification it was loaded from, e.g. ``imagefolder:/data/imagenet``.
        calibration_pool: the split that calibration samples are drawn from (a training split when
            the data set has one).
        evaluation: the split that accuracy is measured on.
        num_classes: the number of classes, so label values lie in ``range(num_classes)``.
    """

    spec: str
    calibration_pool: Dataset
    evaluation: Dataset
    num_classes: int


def imagenet_evaluation_transform(crop_size: int = 224):
    """Return torchvision's standard ImageNet evaluation transform.

    The shorter side is resized to ``crop_size * 256 / 224`` pixels (256 for the default) with bilinear
    interpolation and antialiasing, the centre ``crop_size`` square is cut out, and each channel is
    normalised with ImageNet's mean and standard deviation. With ``crop_size=224`` this matches the
    transform of torchvision's ``IMAGENET1K_V1`` weights.
    """
    from torchvision import transforms

    if crop_size < 1:
        raise ValueError(f"invalid crop size {crop_size}: must be a positive number of pixels")
    return transforms.Compose([
        transforms.Resize(round(crop_size * 256 / 224), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _image_folder(directory: Path, crop_size: int) -> Dataset:
    from torchvision.datasets import ImageFolder

    if not directory.is_dir():
        raise DataNotFoundError(f"image folder {directory} not found; pass an existing directory with one sub-folder per class")
    try:
        dataset = ImageFolder(str(directory), transform=imagenet_evaluation_transform(crop_size))
    except FileNotFoundError as error:
        raise DataNotFoundError(
            f"image folder {directory} contains no images in class sub-folders ({error}); "
            "expected DIR/<class>/<image>.JPEG, the layout of ImageNet's validation set after sorting into classes"
        ) from error
    return dataset


def load_image_folder(data_dir: str | os.PathLike, crop_size: int = 224) -> tuple[Dataset, Dataset]:
    """Load an ImageNet-style image folder; return the calibration pool and the evaluation split.

    ``data_dir`` either contains one sub-folder per class (ImageNet's validation layout), which then
    serves both for calibration and for evaluation, or ``train`` and ``val`` folders of that layout.
    Classes are numbered in the sorted order of their folder names, as torchvision's ``ImageFolder``
    does. For ImageNet's synset folders (``n01440764`` ...) that order is the class index of
    torchvision's pretrained weights.

    Raises:
        DataNotFoundError: the directory is missing or contains no images in class sub-folders.
    """
    directory = Path(data_dir)
    train, val = directory / "train", directory / "val"
    if train.is_dir() and val.is_dir():
        calibration_pool, evaluation = _image_folder(train, crop_size), _image_folder(val, crop_size)
        if calibration_pool.classes != evaluation.classes:
            raise ValueError(
                f"the class folders of {train} and {val} differ ({len(calibration_pool.classes)} and "
                f"{len(evaluation.classes)} classes); both splits need the same class folders"
            )
        return calibration_pool, evaluation
    # NOTE: without a train folder the calibration samples come from the evaluation images, so the
    # measured accuracy is not on held-out data for those samples.
    dataset = _image_folder(directory, crop_size)
    logger.warning("%s has no train and val folders: calibration samples are drawn from the evaluation images", directory)
    return dataset, dataset


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            # The batches are pickled dictionaries. NOTE: unpickling runs code from the file, so load
            # only batches from a trusted source, as with any pickle.
            batch = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"invalid CIFAR-10 batch {path}: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"invalid CIFAR-10 batch {path}: expected a dictionary with the keys b'data' and b'labels'")
    pixels = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(labels) != len(pixels):
        raise ValueError(
            f"invalid CIFAR-10 batch {path}: data of shape {pixels.shape} and {len(labels)} labels; "
            "expected (N, 3072) and N labels"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() < 10:
        raise ValueError(f"invalid CIFAR-10 labels in {path}: found {labels.min()} to {labels.max()}, expected 0 to 9")
    return pixels, labels


def _cifar_tensors(batches: list[tuple[np.ndarray, np.ndarray]]) -> TensorDataset:
    pixels = np.concatenate([p for p, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([label for _, label in batches])
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return TensorDataset((images - mean) / std, torch.from_numpy(labels))


def load_cifar10(data_dir: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """Load CIFAR-10 from its python-format batches; return the training and test splits, normalised.

    ``data_dir`` contains ``data_batch_1`` to ``data_batch_5`` and ``test_batch``, directly or in the
    ``cifar-10-batches-py`` folder of the published archive.

    Raises:
        DataNotFoundError: the directory or one of the six batch files is missing.
        ValueError: a batch file is not a CIFAR-10 batch.
    """
    directory = Path(data_dir)
    if not (directory / _CIFAR10_TEST_BATCH).is_file() and (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    names = (*_CIFAR10_TRAIN_BATCHES, _CIFAR10_TEST_BATCH)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found in {directory}: missing {', '.join(missing)}. Point cifar10:DIR at the "
            "extracted cifar-10-python.tar.gz, which contains the folder cifar-10-batches-py"
        )
    train = _cifar_tensors([_read_cifar_batch(directory / name) for name in _CIFAR10_TRAIN_BATCHES])
    test = _cifar_tensors([_read_cifar_batch(directory / _CIFAR10_TEST_BATCH)])
    return train, test


def load_data_source(spec: str, image_size: int = 224) -> DataSource:
    """Load the data set named by a specification; see :data:`DATA_SPEC_HELP` for the forms.

    Args:
        spec: ``fashion-mnist``, ``fashion-mnist:DIR``, ``imagefolder:DIR`` or ``cifar10:DIR``.
        image_size: the crop size of the ImageNet evaluation transform (image folders only).

    Raises:
        ValueError: the specification names no known data set, or lacks its directory.
        DataNotFoundError: the data are not where the specification points.
    """
    kind, _, location = spec.partition(":")
    if kind == "fashion-mnist":
        data = load_fashion_mnist(location or None)
        return DataSource(spec, data.train, data.test, len(FASHION_MNIST_CLASSES))
    if kind not in ("imagefolder", "cifar10"):
        raise ValueError(f"invalid data specification {spec!r}: expected one of {DATA_SPEC_HELP}")
    if not location:
        raise ValueError(f"invalid data specification {spec!r}: {kind} needs a directory, as in {kind}:DIR")
    if not Path(location).is_dir():
        raise DataNotFoundError(f"data directory {location} not found; check the path in {spec!r}")
    if kind == "cifar10":
        train, test = load_cifar10(location)
        return DataSource(spec, train, test, 10)
    calibration_pool, evaluation = load_image_folder(location, image_size)
    return DataSource(spec, calibration_pool, evaluation, len(evaluation.classes))


def check_calibration_size(pool: Dataset, size: int) -> None:
    """Raise ValueError unless ``size`` samples can be drawn from ``pool`` without repeats."""
    if not 0 < size <= len(pool):
        raise ValueError(
            f"invalid calibration size {size}: the data provide {len(pool)} samples to draw from; "
            f"choose a calibration size from 1 to {len(pool)}"
        )


def draw_calibration_set(pool: Dataset, size: int, seed: int) -> TensorDataset:
    """Draw ``size`` distinct samples from ``pool`` with a seeded generator, stacked into tensors.

    Works for any map-style data set (image folders load and transform only the drawn images). For a
    ``TensorDataset`` the draw equals :func:`calibration_set`.

    Raises:
        ValueError: ``size`` is not between 1 and the number of samples in ``pool``.
    """
    check_calibration_size(pool, size)
    indices = calibration_indices(len(pool), size, seed)
    if isinstance(pool, TensorDataset):
        images, labels = pool.tensors
        return TensorDataset(images[indices], labels[indices])
    samples = [pool[i] for i in indices.tolist()]
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return TensorDataset(images, labels)
