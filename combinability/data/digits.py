"""scikit-learn's bundled 8x8 digits: the dataset that is always there (tests, quick demos).

1797 grey images of 8x8 pixels with values 0..16, ten classes. The split is fixed
and independent of any random generator: within each class, in the order
scikit-learn stores the images, every fifth image (the 5th, 10th, ...) is a test
image, the rest are training images (1442 train / 355 test, stratified).

Pixels are divided by 16 and then normalised with the training split's mean and
standard deviation, stored below as constants (computed once from the training
split; ``tests/test_data.py`` recomputes them).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from combinability.data.base import ArrayDataset
from combinability.data.registry import check_split

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "digits_split_indices", "load_digits"]

#: Mean and standard deviation of the training split's pixels (after dividing by 16).
DIGITS_MEAN = 0.30513582480929263
DIGITS_STD = 0.37615755695544634

_TEST_EVERY = 5


def digits_split_indices(y: np.ndarray, split: str) -> np.ndarray:
    """Indices (increasing) of ``split``: every fifth example of each class is a test example."""
    check_split(split)
    rank = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rank[members] = np.arange(len(members))
    is_test = rank % _TEST_EVERY == _TEST_EVERY - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """Load one split of the digits dataset.

    Parameters
    ----------
    split : {"train", "test"}
    root : ignored
        The data ships with scikit-learn.

    Returns
    -------
    ArrayDataset
        ``x`` of shape ``(n, 1, 8, 8)``, float32, normalised; ``y`` int64 in 0..9.
    """
    images, labels = _raw()
    idx = digits_split_indices(labels, split)
    x = ((images[idx] / 16.0 - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)[:, None]
    return ArrayDataset(
        x=x,
        y=labels[idx].copy(),
        num_classes=10,
        name="digits",
        split=split,
        classes=tuple(str(d) for d in range(10)),
    )
