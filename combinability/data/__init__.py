"""Datasets: a registry of named datasets and loaders that read real files.

Every loader returns a :class:`~combinability.data.base.ArrayDataset` (float32
channels-first inputs normalised with the training split's statistics, int64
labels). Built-in datasets: ``digits`` (scikit-learn's, always available),
``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``; more come from plugins
(:func:`~combinability.hookspecs.combinability_register_datasets`).

>>> from combinability.data import load_dataset
>>> load_dataset("digits", "train").input_shape
(1, 8, 8)
"""

from __future__ import annotations

from combinability.data.base import ArrayDataset
from combinability.data.registry import (
    BUILTIN_DATASETS,
    DATASETS,
    SPLITS,
    DatasetSpec,
    check_split,
    download,
    get_spec,
    load_dataset,
)

__all__ = [
    "ArrayDataset",
    "BUILTIN_DATASETS",
    "DATASETS",
    "SPLITS",
    "DatasetSpec",
    "check_split",
    "download",
    "get_spec",
    "load_dataset",
]
