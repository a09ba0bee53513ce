"""Data a user brings: ``(x, y)`` arrays, ``{split: (x, y)}``, or a ``torch.utils.data.DataLoader``.

:func:`as_dataset` turns any of them (numpy arrays or framework tensors) into the
:class:`~combinability.data.base.ArrayDataset` the library evaluates on; a registered
dataset name loads that dataset's split.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from combinability.data.base import IGNORE_INDEX, ArrayDataset, input_dtype, labelled_targets
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

    Targets labelled :data:`~combinability.data.base.IGNORE_INDEX` (``-100``, torch's and Hugging
    Face's "ignore") are not scored and pass; any other label outside the classes would be
    silently wrong (clamped by jax), and so is refused, as is data without one scored target.
    """
    y = np.asarray(data.y)
    bad = ((y < 0) | (y >= num_classes)) & (y != IGNORE_INDEX)
    what = f"{data.name or 'the data'} ({data.split or 'split'})"
    if bad.any():
        raise DatasetError(f"{int(bad.sum())} label(s) of {what} lie outside [0, {num_classes}), e.g. "
                           f"{sorted(set(y[bad].tolist()))[:5]}; the models have {num_classes} classes (a target "
                           f"that is not to be scored is labelled {IGNORE_INDEX})")
    if y.size and not labelled_targets(y):
        raise DatasetError(f"every label of {what} is {IGNORE_INDEX} (not scored): there is nothing to evaluate")


def to_numpy(array: Any) -> np.ndarray:
    """A numpy copy of a numpy array, torch tensor (any device) or jax array."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


#: Keys of a dict batch (Hugging Face's and torchvision-style datasets') that hold the labels, and the inputs
LABEL_KEYS = ("labels", "label", "y", "target", "targets")
INPUT_KEYS = ("input_ids", "pixel_values", "x", "image", "images", "img", "input", "inputs", "features")


def _is_loader(obj: Any) -> bool:
    return hasattr(obj, "__iter__") and hasattr(obj, "dataset") and hasattr(obj, "batch_size")


def _is_named_arrays(obj: Any) -> bool:
    """A dict of a dataset's arrays by name (``{"input_ids": ..., "labels": ...}``), not of splits."""
    return isinstance(obj, Mapping) and any(k in obj for k in LABEL_KEYS)


def _is_map_dataset(obj: Any) -> bool:
    """A ``torch.utils.data.Dataset`` indexed by example (a ``TensorDataset``, a user's ``Dataset`` class)."""
    torch_data = sys.modules.get("torch.utils.data")
    return (torch_data is not None and isinstance(obj, torch_data.Dataset) and hasattr(obj, "__len__")
            and not isinstance(obj, torch_data.IterableDataset))


def _split_batch(batch: Any, what: str) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one batch (or example): an ``(x, y, ...)`` sequence, or a dict whose keys name
    them (``{"input_ids": ..., "labels": ...}``, ``{"image": ..., "label": ...}``)."""
    if isinstance(batch, Mapping):
        labels = [k for k in LABEL_KEYS if k in batch]
        inputs = [k for k in INPUT_KEYS if k in batch]
        if len(batch) == 2 and len(labels) == 1 and not inputs:  # {"tokens": ..., "labels": ...}
            inputs = [k for k in batch if k != labels[0]]
        if len(labels) != 1 or len(inputs) != 1:
            raise DatasetError(f"{what} yields dicts with keys {sorted(batch)}: the library needs one key of the "
                               f"inputs (one of {list(INPUT_KEYS)}) and one of the labels (one of {list(LABEL_KEYS)})"
                               f"; pass (x, y) arrays instead where the keys are others")
        extra = sorted(k for k in batch if k not in (*labels, *inputs))
        _check_extra_keys(batch, extra, what)
        return batch[inputs[0]], batch[labels[0]]
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise DatasetError(f"{what} must yield (x, y) pairs or dicts of inputs and labels, got "
                           f"{type(batch).__name__}")
    return batch[0], batch[1]


def _check_extra_keys(batch: Mapping[str, Any], extra: list[str], what: str) -> None:
    """Entries beside the inputs and labels are left out, which is safe only for an attention mask that
    masks nothing: the model is given the inputs alone."""
    for key in extra:
        if key == "attention_mask" and bool(np.all(to_numpy(batch[key]) != 0)):
            continue
        raise DatasetError(
            f"{what} yields {key!r} beside the inputs and labels, which the library would not pass to the model "
            f"(it calls model(inputs)): drop it where the model does not need it, or, for a padding mask, pad "
            f"sequences on the right and label the padded positions {IGNORE_INDEX} (a causal model's scored "
            f"positions never see them)")


def _gathered(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a DataLoader (batches) or a map-style dataset (examples), as ``(x, y)`` arrays."""
    loader = _is_loader(data)
    what = "the DataLoader" if loader else f"the {type(data).__name__}"
    xs, ys = [], []
    for item in data if loader else (data[i] for i in range(len(data))):
        x, y = _split_batch(item, what)
        xs.append(to_numpy(x))
        ys.append(to_numpy(y))
    if not xs:
        raise DatasetError(f"{what} yielded no {'batches' if loader else 'examples'}")
    shapes = sorted({a.shape[1:] if loader else a.shape for a in xs}, key=str)
    if len(shapes) > 1 or len({a.shape[1:] if loader else a.shape for a in ys}) > 1:
        raise DatasetError(f"{what} yields inputs of several shapes ({', '.join(map(str, shapes[:3]))} ...) or labels "
                           f"of several: every example must have one shape; pad sequences to one length (labels "
                           f"{IGNORE_INDEX} at the padded positions)")
    if loader:
        return np.concatenate(xs), np.concatenate(ys)
    return np.stack(xs), np.stack([np.asarray(v) for v in ys])


def as_dataset(data: Any, split: str = "test", *, name: str = "data", num_classes: int | None = None,
               input_shape: tuple[int, ...] | None = None, limit: int | None = None) -> ArrayDataset:
    """An :class:`ArrayDataset` from what a user passes as ``data``.

    Parameters
    ----------
    data : str, ArrayDataset, (x, y), DataLoader, torch Dataset or mapping of splits
        A registered dataset's name (its ``split`` is loaded), a mapping of split names to any of
        these (``{"test": (x, y), "train": ...}``: its ``split`` is taken), a dataset, a pair of arrays
        (numpy or tensors; ``y`` integer labels, :data:`~combinability.data.base.IGNORE_INDEX`
        for a target not scored), a loader yielding ``(x, y)`` batches or dicts that name them
        (``{"input_ids": ..., "labels": ...}``; an all-ones ``attention_mask`` beside them is
        left out), such a dict of the arrays themselves, or a map-style ``torch.utils.data.Dataset``
        of such examples.
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
    elif isinstance(data, Mapping) and not _is_named_arrays(data) and data and \
            all(isinstance(k, str) for k in data):  # {"test": (x, y), "train": ...}, as sweeps take it: its split
        if split not in data:
            raise DatasetError(f"the data maps splits {sorted(data)} to their examples, and has no {split!r} "
                               f"split to evaluate: pass split= one of them, or give {split!r}")
        return as_dataset(data[split], split, name=name, num_classes=num_classes, input_shape=input_shape,
                          limit=limit)
    else:
        if _is_loader(data) or _is_map_dataset(data):
            x, y = _gathered(data)
        elif isinstance(data, tuple | list) and len(data) == 2:
            x, y = to_numpy(data[0]), to_numpy(data[1])
        elif _is_named_arrays(data):
            x, y = (to_numpy(a) for a in _split_batch(data, "the data"))
        else:
            raise DatasetError(f"data must be a dataset name, an ArrayDataset, an (x, y) pair of arrays, a "
                               f"DataLoader or a torch Dataset, got {type(data).__name__}")
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
        try:
            return as_dataset((f[keys[0]], f[keys[1]]), split, name=Path(path).stem)
        except DatasetError as exc:  # say which file and arrays
            raise DatasetError(f"{path} ({keys[0]!r}, {keys[1]!r}): {exc}") from None


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
    if isinstance(data, Mapping) and not _is_named_arrays(data):
        return {str(k): as_dataset(v, str(k), input_shape=input_shape) for k, v in data.items()}
    ds = as_dataset(data, "test", input_shape=input_shape)
    return {ds.split or "data": ds}
