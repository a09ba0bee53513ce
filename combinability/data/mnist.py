"""MNIST and Fashion-MNIST from their IDX files.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are
looked for as described in :mod:`combinability.data.locate`; Fashion-MNIST is also
found where Debian's ``dataset-fashion-mnist`` package installs it.

Pixels are scaled to [0, 1] and normalised with the training split's mean and
standard deviation, stored below as constants (computed once over the 60000
training images; ``tests/test_data.py`` recomputes the Fashion-MNIST ones when the
files are present). Decoding goes through a 256-entry lookup table, and the decoded
files are cached in memory, so loading all 70000 Fashion-MNIST images takes well
under a second after the first gzip read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from combinability.data.base import ArrayDataset
from combinability.data.idx import read_idx
from combinability.data.locate import ENV_VAR, Resource, download_dir, fetch, locate_files
from combinability.data.registry import check_split
from combinability.errors import DatasetError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "NORMALIZATION",
    "RESOURCES",
    "load_fashion_mnist",
    "load_mnist",
    "download_fashion_mnist",
    "download_mnist",
]

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: Training-split pixel mean and standard deviation (pixels scaled to [0, 1]).
NORMALIZATION: dict[str, tuple[float, float]] = {
    "fashion_mnist": (0.28604059698879547, 0.3530242445149226),
    "mnist": (0.1306604762738429, 0.30810780717887876),
}

_FASHION_URLS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
)


def _resources(bases: tuple[str, ...], md5s: dict[str, str]) -> tuple[Resource, ...]:
    return tuple(Resource(f, tuple(b + f for b in bases), md5) for f, md5 in md5s.items())


#: The published files and their MD5 sums (as listed by the datasets' authors and torchvision).
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "fashion_mnist": _resources(_FASHION_URLS, {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "mnist": _resources(_MNIST_URLS, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
}  # fmt: skip

_HOMEPAGE = {
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
_APT = {"fashion_mnist": "dataset-fashion-mnist"}


def _how_to_get(name: str, root: str | os.PathLike | None) -> str:
    lines = [
        "To get the files, either:",
        f"  - download them: combinability download {name} "
        f"(or load_dataset('{name}', split, download=True)); they go to {download_dir(name, root)}",
    ]
    if name in _APT:
        lines.append(f"  - on Debian/Ubuntu: sudo apt-get install {_APT[name]}")
    lines.append(
        f"  - or copy the four files from {_HOMEPAGE[name]} into one of the directories above "
        f"(e.g. into ${ENV_VAR}/{name}/)"
    )
    return "\n".join(lines)


def _load_idx_dataset(name: str, split: str, root, classes: tuple[str, ...], limit: int | None = None) -> ArrayDataset:
    check_split(split)
    image_file, label_file = _FILES[split]
    found = locate_files(name, _FILES[split], root=root, how_to_get=_how_to_get(name, root))
    images = read_idx(found[image_file])
    labels = read_idx(found[label_file])
    image_path, label_path = found[image_file], found[label_file]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{image_path}: expected uint8 images of shape (n, height, width), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{label_path}: expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(classes):
        raise DatasetError(f"{label_path}: label {int(labels.max())} out of range 0..{len(classes) - 1}")
    images, labels = images[:limit], labels[:limit]  # only the kept images are normalised
    mean, std = NORMALIZATION[name]
    lut = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)
    x = lut[images][:, None]
    return ArrayDataset(x=x, y=labels.astype(np.int64), num_classes=len(classes), name=name, split=split,
                        classes=classes)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None, limit: int | None = None) -> ArrayDataset:
    """Load one split of Fashion-MNIST.

    Parameters
    ----------
    split : {"train", "test"}
    root : path, optional
        Searched first (``root`` and ``root/fashion_mnist``), before
        ``$COMBINABILITY_DATA/fashion_mnist``, the platform cache folder
        (``~/.cache/combinability/fashion_mnist`` on Linux) and ``/usr/share/datasets/fashion-mnist``.
    limit : int, optional
        Keep only the first ``limit`` examples (the others are not converted to float32).

    Returns
    -------
    ArrayDataset
        ``x`` of shape ``(n, 1, 28, 28)`` float32 normalised, ``y`` int64 in 0..9.

    Raises
    ------
    DatasetNotFoundError
        Listing the directories searched and how to get the files.
    DatasetError
        A file is truncated or malformed.
    """
    return _load_idx_dataset("fashion_mnist", split, root, FASHION_MNIST_CLASSES, limit)


def load_mnist(split: str, root: str | os.PathLike | None = None, limit: int | None = None) -> ArrayDataset:
    """Load one split of MNIST; as :func:`load_fashion_mnist` (also searches ``/usr/share/datasets/mnist``)."""
    return _load_idx_dataset("mnist", split, root, tuple(str(d) for d in range(10)), limit)


def _download(name: str, root: str | os.PathLike | None) -> Path:
    directory = download_dir(name, root)
    for resource in RESOURCES[name]:
        fetch(resource, directory)
    return directory


def download_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """Download Fashion-MNIST's four ``.gz`` files (MD5-checked) to ``root/fashion_mnist`` or the default place."""
    return _download("fashion_mnist", root)


def download_mnist(root: str | os.PathLike | None = None) -> Path:
    """Download MNIST's four ``.gz`` files (MD5-checked) to ``root/mnist`` or the default place."""
    return _download("mnist", root)
