"""Datasets as plugins: :class:`DatasetSpec`, the built-in datasets, and :func:`load_dataset`.

This module is itself a plugin (entry point ``datasets`` of the
``combinability.plugins`` group): its :func:`combinability_register_datasets` hook
returns the built-in specs, exactly as a third-party package registers its own.
Loaders are named by ``"module:attribute"`` strings and imported on first use, so
listing datasets imports neither scikit-learn nor any framework.

Example
-------
>>> from combinability.data import load_dataset
>>> test = load_dataset("digits", "test")
>>> test.x.shape[1:], test.num_classes
((1, 8, 8), 10)
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from combinability.architecture import load_object
from combinability.data.base import ArrayDataset
from combinability.digests import freeze
from combinability.errors import DatasetError, DatasetNotFoundError, PluginError, UnknownNameError
from combinability.hookspecs import hookimpl

__all__ = [
    "SPLITS",
    "check_split",
    "DatasetSpec",
    "BUILTIN_DATASETS",
    "DATASETS",
    "get_spec",
    "load_dataset",
    "download",
    "combinability_register_datasets",
]

#: The splits every dataset provides.
SPLITS: tuple[str, ...] = ("train", "test")

PathLike = str | os.PathLike


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise :class:`UnknownNameError`."""
    if split not in SPLITS:
        raise UnknownNameError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    return split


def _resolve(obj: Callable[..., Any] | str, what: str, name: str) -> Callable[..., Any]:
    target = load_object(obj) if isinstance(obj, str) else obj
    if not callable(target):
        raise PluginError(f"dataset {name!r}: {what} {obj!r} is not callable")
    return target


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"fashion_mnist"``.
    loader : callable or str
        ``loader(split, root=None) -> ArrayDataset``, or the ``"module:attribute"`` of one
        (imported on first use). It reads real files and raises
        :class:`~combinability.errors.DatasetNotFoundError` saying where it looked. A loader
        that also takes ``limit=`` is given the number of examples wanted (it may then
        convert only those); the others are cut after loading.
    description : str
        One line shown by ``combinability plugins``.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        Shape of one example, channels-first (``(1, 28, 28)``).
    downloader : callable or str, optional
        ``downloader(root=None) -> pathlib.Path`` fetching the files to where ``loader``
        finds them, or its ``"module:attribute"``; ``None`` when there is nothing to fetch.
    """

    name: str
    loader: Callable[..., ArrayDataset] | str
    description: str = ""
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()
    downloader: Callable[..., Path] | str | None = None

    def load(
        self, split: str, root: PathLike | None = None, *, limit: int | None = None, download: bool = False
    ) -> ArrayDataset:
        """Load one split; see :func:`load_dataset`."""
        check_split(split)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
            raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
        limit = None if limit is None else int(limit)
        loader = _resolve(self.loader, "loader", self.name)
        kwargs = {"limit": limit} if limit is not None and _takes_limit(loader) else {}
        try:
            data = loader(split, root=root, **kwargs)
        except DatasetNotFoundError:
            if not download or self.downloader is None:
                raise
            self.download(root)
            data = loader(split, root=root, **kwargs)
        if not isinstance(data, ArrayDataset):
            raise PluginError(
                f"dataset {self.name!r}: loader {self.loader!r} returned {type(data).__name__}, "
                f"expected combinability.data.ArrayDataset"
            )
        if not data.name or not data.split:
            data = replace(data, name=data.name or self.name, split=data.split or split)
        return data.subset(limit)

    def download(self, root: PathLike | None = None) -> Path:
        """Fetch the files (see :func:`download`)."""
        if self.downloader is None:
            raise DatasetError(f"dataset {self.name!r} has nothing to download ({self.description})")
        return _resolve(self.downloader, "downloader", self.name)(root=root)


def _takes_limit(loader: Callable[..., Any]) -> bool:
    """Whether ``loader`` accepts a ``limit`` keyword (or any keyword)."""
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return any(p.name == "limit" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               or p.kind is p.VAR_KEYWORD for p in params)


BUILTIN_DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "digits",
        "combinability.data.digits:load_digits",
        description="scikit-learn's bundled 8x8 handwritten digits (1797 images; always available)",
        num_classes=10,
        input_shape=(1, 8, 8),
    ),
    DatasetSpec(
        "fashion_mnist",
        "combinability.data.mnist:load_fashion_mnist",
        description="Fashion-MNIST, 28x28 grey clothing images, 60000 train / 10000 test (IDX files)",
        num_classes=10,
        input_shape=(1, 28, 28),
        downloader="combinability.data.mnist:download_fashion_mnist",
    ),
    DatasetSpec(
        "mnist",
        "combinability.data.mnist:load_mnist",
        description="MNIST, 28x28 grey handwritten digits, 60000 train / 10000 test (IDX files)",
        num_classes=10,
        input_shape=(1, 28, 28),
        downloader="combinability.data.mnist:download_mnist",
    ),
    DatasetSpec(
        "cifar10",
        "combinability.data.cifar:load_cifar10",
        description="CIFAR-10, 32x32 colour images, 50000 train / 10000 test (python pickle batches)",
        num_classes=10,
        input_shape=(3, 32, 32),
        downloader="combinability.data.cifar:download_cifar10",
    ),
    DatasetSpec(
        "cifar100",
        "combinability.data.cifar:load_cifar100",
        description="CIFAR-100 (fine labels), 32x32 colour images, 50000 train / 10000 test",
        num_classes=100,
        input_shape=(3, 32, 32),
        downloader="combinability.data.cifar:download_cifar100",
    ),
    DatasetSpec(
        "jargon",
        "combinability.data.text:load_jargon",
        description="The Jargon File 4.4.7, 64-character windows for next-character prediction (Debian jargon-text)",
        num_classes=155,
        input_shape=(64,),
    ),
)

#: The built-in datasets by name. Plugin datasets live in :mod:`combinability.plugins`.
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in BUILTIN_DATASETS}


@hookimpl
def combinability_register_datasets() -> tuple[DatasetSpec, ...]:
    return BUILTIN_DATASETS


def get_spec(name: str | DatasetSpec, registry: Mapping[str, DatasetSpec] | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` called ``name``.

    Looked up in ``registry`` when given, else among the built-ins, then among the
    datasets registered by plugins. A :class:`DatasetSpec` passes through.

    Raises
    ------
    UnknownNameError
        Listing the valid names.
    """
    if isinstance(name, DatasetSpec):
        return name
    if registry is not None:
        table: Mapping[str, DatasetSpec] = registry
    else:
        if name in DATASETS:
            return DATASETS[name]
        table = dict(DATASETS)
        from combinability import plugins  # core only; imported late to keep this module light

        for plugin_name in plugins.list_datasets():
            table.setdefault(plugin_name, plugins.get_dataset_spec(plugin_name))
    if name not in table:
        raise UnknownNameError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(table))}")
    return table[name]


def load_dataset(
    name: str | DatasetSpec,
    split: str,
    root: PathLike | None = None,
    limit: int | None = None,
    *,
    download: bool = False,
    registry: Mapping[str, DatasetSpec] | None = None,
) -> ArrayDataset:
    """Load one split of a registered dataset.

    Parameters
    ----------
    name : str or DatasetSpec
        ``"digits"``, ``"fashion_mnist"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"`` or a
        plugin's dataset.
    split : {"train", "test"}
    root : path, optional
        A directory searched first for the files (``root`` itself and ``root/<name>``).
    limit : int, optional
        Keep only the first ``limit`` examples.
    download : bool
        When the files are missing, download them (to ``root/<name>``,
        ``$COMBINABILITY_DATA/<name>`` or the platform's cache folder,
        ``pooch.os_cache("combinability")/<name>``) and retry.
    registry : mapping, optional
        Where to look ``name`` up instead of the built-ins and installed plugins.

    Returns
    -------
    ArrayDataset
        float32 channels-first inputs normalised with the training split's per-channel
        mean and standard deviation; int64 labels.

    Raises
    ------
    UnknownNameError
        Unknown dataset or split; the message lists the valid ones.
    DatasetNotFoundError
        The files are missing; the message lists every directory searched and how to get them.
    DatasetError
        The files are truncated or malformed.
    """
    ds = get_spec(name, registry).load(split, root, limit=limit, download=download)
    for array in (ds.x, ds.y):  # the dataset's own arrays: read-only, so that their digest is computed once
        if isinstance(array, np.ndarray):
            freeze(array, views=True)
    return ds


def download(
    name: str | DatasetSpec, root: PathLike | None = None, *, registry: Mapping[str, DatasetSpec] | None = None
) -> Path:
    """Download the files of dataset ``name`` with :mod:`pooch` (checked against their published MD5 sums).

    Files already present with the right checksum are not fetched again; a file whose checksum
    differs is not kept. A progress bar is shown when standard error is a terminal.

    Parameters
    ----------
    name : str or DatasetSpec
    root : path, optional
        Write to ``root/<name>``; by default ``$COMBINABILITY_DATA/<name>`` when that is
        set, else the platform's cache folder, ``pooch.os_cache("combinability")/<name>``
        (``~/.cache/combinability/<name>`` on Linux).

    Returns
    -------
    pathlib.Path
        The directory the files are in; :func:`load_dataset` finds them there.

    Raises
    ------
    DatasetError
        If a file arrived with another checksum than the published one (naming each URL and the folder).
    DatasetNotFoundError
        If no URL of a file could be read (naming each URL, why, and the folder).
    """
    return get_spec(name, registry).download(root)
