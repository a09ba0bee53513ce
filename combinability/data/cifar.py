"""CIFAR-10 and CIFAR-100 from the standard "python version" pickle batches.

CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``,
``test_batch`` and ``batches.meta``. CIFAR-100: ``cifar-100-python/`` with ``train``,
``test`` and ``meta`` (fine labels are used). The folders are looked for as
described in :mod:`combinability.data.locate` (``root``, ``root/cifar10``,
``$COMBINABILITY_DATA/cifar10``, the platform cache folder (``~/.cache/combinability/cifar10``
on Linux), each also with the archive's folder name appended).

Each batch is a pickled dict: ``data`` a ``(n, 3072)`` uint8 array (1024 red, then
1024 green, then 1024 blue values, row by row) and the labels. Batches are read with
a restricted unpickler that only builds numpy arrays and plain containers, so a
tampered file cannot run code; every length the pickle declares, and the size of every
array, is checked against the file's size before it is read or allocated, so a truncated
or crafted file raises :class:`~combinability.errors.CorruptFileError` naming it (never a
``MemoryError``). A batch that unpickles but holds the wrong things (keys, shapes,
labels) raises :class:`~combinability.errors.DatasetError`.

Pixels are scaled to [0, 1] and normalised per channel with the training split's
mean and standard deviation, stored below as constants (computed once over the 50000
training images).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from combinability.data.base import ArrayDataset
from combinability.data.locate import ENV_VAR, Resource, download_dir, extract_tar, fetch, locate_files
from combinability.data.registry import check_split
from combinability.errors import CorruptFileError, DatasetError

__all__ = [
    "CifarLayout",
    "LAYOUTS",
    "load_cifar",
    "load_cifar10",
    "load_cifar100",
    "download_layout",
    "download_cifar10",
    "download_cifar100",
]

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant keeps what, and how it is normalised."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    archive: Resource


_TORONTO = "https://www.cs.toronto.edu/~kriz/"

#: The two built-in CIFAR variants.
LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=(0.49139968, 0.48215841, 0.44653091),
        std=(0.24703223, 0.24348513, 0.26158784),
        archive=Resource("cifar-10-python.tar.gz", (_TORONTO + "cifar-10-python.tar.gz",),
                         "c58f30108f718f92721af3b95e74349a"),
    ),
    "cifar100": CifarLayout(
        name="cifar100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=(0.50707516, 0.48654887, 0.44091784),
        std=(0.26733429, 0.25643846, 0.27615047),
        archive=Resource("cifar-100-python.tar.gz", (_TORONTO + "cifar-100-python.tar.gz",),
                         "eb9058c3a382ffc7106e4002c42a8d85"),
    ),
}

_SAFE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _declared_bytes(shape: object, dtype: np.dtype) -> int:
    """Bytes an array of ``shape`` and ``dtype`` takes (Python ints: no overflow); ValueError if malformed."""
    dims = shape if isinstance(shape, tuple | list) else (shape,)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"malformed array shape {shape!r}")
    return int(np.prod(dims, dtype=object)) * dtype.itemsize


class _BoundedArray(np.ndarray):
    """An array being unpickled: its declared size is checked against the file's before numpy allocates it.

    Every array of a batch is stored in the file, so none can be larger than the file; a crafted
    shape (a few bytes declaring a terabyte) is refused instead of allocated.
    """

    _limit: int

    def __setstate__(self, state: tuple) -> None:
        shape, dtype = state[-4], state[-3]
        _check_declared(shape, dtype, self._limit)
        super().__setstate__(state)


def _check_declared(shape: object, dtype: object, limit: int) -> None:
    """Refuse (UnpicklingError) an array of objects, or one larger than the file it comes from."""
    dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing an array of Python objects (dtype {dtype}) in a dataset file")
    declared = _declared_bytes(shape, dtype)
    if declared > limit:
        raise pickle.UnpicklingError(
            f"an array declares shape {tuple(shape) if isinstance(shape, tuple | list) else shape} of {dtype} "
            f"({declared} bytes), more than the whole file holds ({limit} bytes)"
        )


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, nothing that can run code.

    Arrays larger than ``limit`` bytes (the file's size) and arrays of Python objects are refused
    before they are allocated.
    """

    def __init__(self, file: io.BytesIO, *, limit: int, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._limit = limit

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core."):  # pickles written by numpy 1
            module = "numpy._core." + module[len("numpy.core."):]
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        if name == "_reconstruct":
            return self._reconstruct
        return super().find_class(module, name)

    def _reconstruct(self, subtype: type, shape: object, dtype: object) -> np.ndarray:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"refusing to build a {subtype!r} from a dataset file")
        dtype = np.dtype(dtype)
        _check_declared(shape, dtype, self._limit)
        array = np.ndarray.__new__(_BoundedArray, shape, dtype)
        array._limit = self._limit
        return array


def _plain_arrays(obj: object) -> object:
    """``obj`` with every unpickled array as a plain :class:`numpy.ndarray`."""
    if isinstance(obj, np.ndarray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return {k: _plain_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain_arrays(v) for v in obj)
    return obj


def _str_keys(obj: dict) -> dict:
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_stream(path_str: str, data: bytes) -> None:
    """Walk the pickle's opcodes (reading no value) and refuse lengths beyond the file, or a cut stream.

    Raises
    ------
    CorruptFileError
        If an opcode declares more bytes than remain in the file (e.g. an 8-byte length of a
        terabyte), or the stream ends before its STOP opcode (a truncated file).
    """
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except (ValueError, EOFError) as exc:  # genops reads each declared length from the bytes it has
        raise CorruptFileError(
            f"{path_str}: not a readable CIFAR pickle batch: the file is truncated or damaged "
            f"({len(data)} bytes; {exc})"
        ) from None


@functools.lru_cache(maxsize=16)
def _unpickle_cached(path_str: str, size: int, mtime_ns: int) -> dict:
    data = Path(path_str).read_bytes()
    _check_stream(path_str, data)
    try:
        unpickler = _SafeUnpickler(io.BytesIO(data), limit=len(data), encoding="latin1")
        obj = _plain_arrays(unpickler.load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CorruptFileError(
            f"{path_str}: not a readable CIFAR pickle batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path_str}: expected a pickled dict, got {type(obj).__name__}")
    return _str_keys(obj)


def _unpickle(path: Path) -> dict:
    path = path.resolve()
    st = path.stat()
    return _unpickle_cached(str(path), st.st_size, st.st_mtime_ns)


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    for key in ("data", layout.label_key):
        if key not in entry:
            raise DatasetError(f"{path}: batch has no {key!r} entry (it has {', '.join(map(repr, entry))})")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (n, {_PIXELS}), got {desc}")
    labels = np.asarray(entry[layout.label_key])
    if labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(
            f"{path}: {len(data)} images but {layout.label_key!r} has shape {labels.shape} ({labels.dtype})"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetError(
            f"{path}: labels must lie in 0..{layout.num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64)


def _class_names(path: Path, layout: CifarLayout) -> tuple[str, ...]:
    meta = _unpickle(path)
    names = meta.get(layout.names_key)
    if names is None or len(names) != layout.num_classes:
        raise DatasetError(f"{path}: expected {layout.num_classes} class names under {layout.names_key!r}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _how_to_get(layout: CifarLayout, root) -> str:
    return (
        "To get the files, either:\n"
        f"  - download them: combinability download {layout.name} "
        f"(or load_dataset('{layout.name}', split, download=True)); they go to "
        f"{download_dir(layout.name, root) / layout.folder}\n"
        f"  - or get {layout.archive.urls[0]} (from https://www.cs.toronto.edu/~kriz/cifar.html), "
        f"extract it and pass its folder as root= or put it under ${ENV_VAR}/{layout.name}/"
    )


def load_cifar(layout: CifarLayout, split: str, root: str | os.PathLike | None = None,
               limit: int | None = None) -> ArrayDataset:
    """Load one split of the CIFAR variant described by ``layout`` (its first ``limit`` images)."""
    check_split(split)
    files = layout.train_files if split == "train" else layout.test_files
    found = locate_files(layout.name, (*files, layout.meta_file), root=root, subdir=layout.folder,
                         compressed_ok=False, how_to_get=_how_to_get(layout, root))
    batches = [_read_batch(found[f], layout) for f in files]
    data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)[:limit]
    labels = np.concatenate([b[1] for b in batches])[:limit]
    mean, std = np.asarray(layout.mean), np.asarray(layout.std)
    lut = ((np.arange(256)[None, :] / 255.0 - mean[:, None]) / std[:, None]).astype(np.float32)  # (3, 256)
    x = np.empty(data.shape, dtype=np.float32)
    for c in range(3):
        x[:, c] = lut[c][data[:, c]]
    return ArrayDataset(x=x, y=labels, num_classes=layout.num_classes, name=layout.name, split=split,
                        classes=_class_names(found[layout.meta_file], layout))


def load_cifar10(split: str, root: str | os.PathLike | None = None, limit: int | None = None) -> ArrayDataset:
    """Load one split of CIFAR-10: ``x`` of shape ``(n, 3, 32, 32)`` float32 normalised, ``y`` int64 in 0..9.

    ``root`` may be the ``cifar-10-batches-py`` folder itself or a folder holding it; ``limit``
    keeps the first images only.
    """
    return load_cifar(LAYOUTS["cifar10"], split, root, limit)


def load_cifar100(split: str, root: str | os.PathLike | None = None, limit: int | None = None) -> ArrayDataset:
    """Load one split of CIFAR-100 with its 100 fine labels; ``root`` and ``limit`` as in :func:`load_cifar10`."""
    return load_cifar(LAYOUTS["cifar100"], split, root, limit)


def download_layout(layout: CifarLayout, root: str | os.PathLike | None = None) -> Path:
    """Download and extract a CIFAR archive (MD5-checked); return the folder holding the batches."""
    directory = download_dir(layout.name, root)
    target = directory / layout.folder
    needed = (*layout.train_files, *layout.test_files, layout.meta_file)
    if all((target / f).is_file() for f in needed):
        return target
    archive = fetch(layout.archive, directory)
    extract_tar(archive, directory, layout.folder)
    archive.unlink()
    return target


def download_cifar10(root: str | os.PathLike | None = None) -> Path:
    """Download CIFAR-10 from Toronto's site into ``root/cifar10`` (or the default place)."""
    return download_layout(LAYOUTS["cifar10"], root)


def download_cifar100(root: str | os.PathLike | None = None) -> Path:
    """Download CIFAR-100 from Toronto's site into ``root/cifar100`` (or the default place)."""
    return download_layout(LAYOUTS["cifar100"], root)
