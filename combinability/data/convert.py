"""Data a user brings: ``(x, y)`` arrays, ``{split: (x, y)}``, or a ``torch.utils.data.DataLoader``.

:func:`as_dataset` turns any of them (numpy arrays or framework tensors) into the
:class:`~combinability.data.base.ArrayDataset` the library evaluates on; a registered
dataset name loads that dataset's split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from combinability.data.base import ArrayDataset, input_dtype
from combinability.errors import DatasetError

__all__ = ["as_dataset", "as_datasets", "to_numpy", "check_labels", "check_seed"]


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**64)``, the range every random stream of the library takes.

    Raises
    ------
    ConfigurationError
        For a negative seed, one of ``2**64`` or more, or a non-integer.
    """
    from combinability.errors import ConfigurationError

    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**64:
        raise ConfigurationError(f"{what} must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def check_labels(data: ArrayDataset, num_classes: int) -> None:
    """Raise :class:`DatasetError` unless every label of ``data`` is in ``[0, num_classes)``.

    Labels such as ``-100`` (torch's "ignore") would otherwise be silently skipped or wrong.
    """
    y = np.asarray(data.y)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise DatasetError(f"{int(bad.sum())} label(s) of {data.name or 'the data'} ({data.split or 'split'}) lie "
                           f"outside [0, {num_classes}), e.g. {sorted(set(y[bad].tolist()))[:5]}; the models have "
                           f"{num_classes} classes")


def to_numpy(array: Any) -> np.ndarray:
    """A numpy copy of a numpy array, torch tensor (any device) or jax array."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _is_loader(obj: Any) -> bool:
    return hasattr(obj, "__iter__") and hasattr(obj, "dataset") and hasattr(obj, "batch_size")


def as_dataset(data: Any, split: str = "test", *, name: str = "data", num_classes: int | None = None,
               input_shape: tuple[int, ...] | None = None, limit: int | None = None) -> ArrayDataset:
    """An :class:`ArrayDataset` from what a user passes as ``data``.

    Parameters
    ----------
    data : str, ArrayDataset, (x, y), or DataLoader
        A registered dataset's name (its ``split`` is loaded), a dataset, a pair of arrays
        (numpy or tensors; ``y`` integer labels) or a loader yielding ``(x, y)`` batches.
    split : str
        Split of a named dataset.
    name : str
        Name recorded for arrays and loaders.
    num_classes : int, optional
        Default: ``max(y) + 1``.
    input_shape : tuple of int, optional
        When given, the shape every example must have (checked here, before any work).
    limit : int, optional
        Of a named dataset, load only the first ``limit`` examples (the loader converts
        no more; other data is returned whole, for the caller to cut).

    Raises
    ------
    DatasetError
        If ``x`` and ``y`` differ in length, ``y`` is not integer labels, the data is empty,
        or the examples do not have ``input_shape``.
    """
    if isinstance(data, str) and data.endswith(".npz"):
        ds = _from_npz(data, split)
    elif isinstance(data, str):
        from combinability.data import load_dataset

        ds = load_dataset(data, split, limit=limit)
    elif isinstance(data, ArrayDataset):
        ds = data
    else:
        if _is_loader(data):
            xs, ys = [], []
            for batch in data:
                if not isinstance(batch, list | tuple) or len(batch) < 2:
                    raise DatasetError("a DataLoader must yield (x, y) batches")
                xs.append(to_numpy(batch[0]))
                ys.append(to_numpy(batch[1]))
            if not xs:
                raise DatasetError("the DataLoader yielded no batches")
            x, y = np.concatenate(xs), np.concatenate(ys)
        elif isinstance(data, tuple | list) and len(data) == 2:
            x, y = to_numpy(data[0]), to_numpy(data[1])
        else:
            raise DatasetError(f"data must be a dataset name, an ArrayDataset, an (x, y) pair of arrays or a "
                               f"DataLoader, got {type(data).__name__}")
        if len(x) != len(y):
            raise DatasetError(f"x has {len(x)} examples but y has {len(y)}")
        if len(y) == 0:
            raise DatasetError("the data is empty")
        if y.ndim < 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"y must be integer class labels, one per example (n,) or one per position (a "
                               f"sequence's (n, T), a segmentation's (n, H, W)), got {y.dtype} of shape {y.shape}")
        classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
        ds = ArrayDataset(np.ascontiguousarray(x, dtype=input_dtype(x)), y.astype(np.int64), classes, name=name,
                          split=split)
    if input_shape is not None and tuple(ds.input_shape) != tuple(input_shape):
        raise DatasetError(f"the data's examples have shape {ds.input_shape}, the models take {tuple(input_shape)}")
    return ds


def _from_npz(path: str, split: str) -> ArrayDataset:
    """``x``/``y`` (or ``x_<split>``/``y_<split>``) arrays of an ``.npz`` file."""
    from pathlib import Path

    if not Path(path).is_file():
        raise DatasetError(f"no data file {path}")
    with np.load(path, allow_pickle=False) as f:
        splits = [k[2:] for k in f.files if k.startswith("x_") and f"y_{k[2:]}" in f]
        keys = ("x", "y") if "x" in f or not splits else (f"x_{split if split in splits else splits[0]}",
                                                           f"y_{split if split in splits else splits[0]}")
        if keys[0] not in f or keys[1] not in f:
            raise DatasetError(f"{path} holds {sorted(f.files)}; expected arrays 'x' and 'y' (or 'x_{split}', "
                               f"'y_{split}')")
        return as_dataset((f[keys[0]], f[keys[1]]), split, name=Path(path).stem)


def as_datasets(data: Any, splits: tuple[str, ...] | list[str] = ("train", "test"), *,
                input_shape: tuple[int, ...] | None = None, limit: int | None = None) -> dict[str, ArrayDataset]:
    """``{split: ArrayDataset}`` from a name (its ``splits``), a mapping of splits, or one dataset.

    ``limit`` reaches the loader of a named dataset (see :func:`as_dataset`).
    """
    if isinstance(data, str) and data.endswith(".npz"):
        with np.load(data, allow_pickle=False) as f:
            present = [s for s in splits if f"x_{s}" in f]
        if not present:
            return {"test": as_dataset(data, "test", input_shape=input_shape)}
        return {s: as_dataset(data, s, input_shape=input_shape) for s in present}
    if isinstance(data, str):
        return {s: as_dataset(data, s, input_shape=input_shape, limit=limit) for s in splits}
    if isinstance(data, Mapping):
        return {str(k): as_dataset(v, str(k), input_shape=input_shape) for k, v in data.items()}
    ds = as_dataset(data, "test", input_shape=input_shape)
    return {ds.split or "data": ds}
