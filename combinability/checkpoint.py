"""One checkpoint format for every backend: a safetensors file, framework-free.

A checkpoint (format version :data:`VERSION`) is a `safetensors <https://huggingface.co/docs/safetensors>`_
file: the tensors by name, plus a string-to-string header (the safetensors ``__metadata__``) holding

``format``
    :data:`FORMAT`;
``version``
    ``"2"``;
``backend``
    the backend that wrote it (absent when none was given);
``config``
    JSON of the model configuration (``{"architecture": "mlp", "width": 1, ...}``);
``metadata``
    JSON of the user metadata (plain values only, see :func:`plain`);
``names``
    JSON list of the tensor names in the order they were given, so that they load in that order;
``library_version``
    the version of combinability that wrote the file;
``sha256``
    :func:`payload_sha256` of the tensors;
``header_sha256``
    SHA-256 of the other header entries: the UTF-8 bytes of
    ``json.dumps(entries, sort_keys=True, separators=(",", ":"))``.

On load both hashes are recomputed, so a flipped bit anywhere in the file (data, tensor header or
these entries), a truncated file or a file of another kind raises :class:`~combinability.errors.CorruptFileError`.
The tensor header is checked against the file's size before any array is read, so a header that
declares more data than the file holds is refused without allocating it; :func:`read_metadata`
reads the header alone (backend, config, metadata, tensor shapes and dtypes).

:func:`load_checkpoint` also reads, detecting the kind of file by its content (never by its suffix):

* safetensors files from elsewhere (version 0: no hash check, their header entries as metadata);
* plain PyTorch ``state_dict`` files written by ``torch.save`` (version 0; needs torch);
* the version-1 files of this library: a ``torch.save`` dictionary (torch backend) or an ``.npz``
  archive with a JSON ``__header__`` (jax backend);
* flax's own: an Orbax checkpoint folder and a ``flax.serialization.to_bytes`` (msgpack) file
  (version 0; need orbax or flax), their trees' paths as names (``"fc1/kernel"``);
* a Hugging Face model folder (``save_pretrained``): its one weights file, or its shards by their
  index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``; the index file itself
  may be given), read one shard at a time (version 0).

This module needs numpy and safetensors only; the readers of ``torch.save`` files and ``.npz``
archives live in :mod:`combinability.checkpoint_readers`, which imports torch only to read the former.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from combinability.errors import (
    BackendUnavailableError,
    CorruptFileError,
    IncompatibleModelsError,
    IncompatibleVersionError,
    OutputExistsError,
)
from combinability.files import atomic_path

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_state_dict",
    "read_metadata",
    "check_overwrite",
    "metadata_differences",
    "non_float_parameters",
    "payload_sha256",
    "plain",
]

#: Value of the ``format`` key of every checkpoint.
FORMAT = "combinability-checkpoint"
#: Checkpoint layout version written by this library (version 1 files, and files from elsewhere, are read too).
VERSION = 2
#: The version of the legacy files (``torch.save`` dictionaries and ``.npz`` archives) still read.
LEGACY_VERSION = 1

_READABLE = (
    f"this version of combinability reads version {VERSION} (safetensors) and version {LEGACY_VERSION} "
    "(torch.save / .npz) checkpoints"
)
_NPZ_HEADER = "__header__"
_ZIP_MAGIC = b"PK\x03\x04"
# numpy dtype name -> safetensors dtype code, for the dtypes a checkpoint may hold.
_SAVE_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
    "bool": "BOOL", "complex64": "C64",
}  # fmt: skip
_LOAD_DTYPES = {code: np.dtype(name).newbyteorder("<") for name, code in _SAVE_DTYPES.items()}
# Bytes per element of every safetensors dtype code (including those numpy cannot hold).
_ITEMSIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "C64": 8, "C128": 16,
}  # fmt: skip
# safetensors dtype code -> the dtype name read_metadata reports (the numpy name where there is one).
_DTYPE_NAMES = {**{code: name for name, code in _SAVE_DTYPES.items()}, "BF16": "bfloat16", "F8_E4M3": "float8_e4m3",
                "F8_E5M2": "float8_e5m2", "C128": "complex128"}


@dataclass(frozen=True)
class Checkpoint:
    """The content of a checkpoint file, as read by :func:`load_checkpoint`.

    Attributes
    ----------
    state : dict of str to numpy.ndarray
        Every tensor, by name, in the order they were written.
    config : dict
        The model configuration (e.g. ``{"architecture": "mlp", "width": 1, "num_classes": 10,
        "input_shape": [1, 28, 28]}``); ``{}`` when the file records none.
    metadata : dict
        User metadata (plain JSON values); for a safetensors file from elsewhere, its header entries.
    backend : str or None
        The backend that wrote the file, or None for files from elsewhere.
    version : int
        :data:`VERSION` for this format, 1 for legacy files of this library, 0 for files from
        elsewhere (a plain ``state_dict`` or a foreign safetensors file).
    path : Path
        The file it was read from.
    """

    state: dict[str, np.ndarray]
    config: dict[str, Any]
    metadata: dict[str, Any]
    backend: str | None
    version: int
    path: Path


def plain(value: Any, where: str = "metadata") -> Any:
    """``value`` as plain Python (dict, list, tuple, str, int, float, bool, None).

    NumPy scalars and arrays become Python numbers and lists, paths become strings.

    Raises
    ------
    TypeError
        For any other type, naming where it was found.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {k!r}")
            out[k] = plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, tuple):
        return tuple(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, list):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} holds a {type(value).__name__} ({value!r:.60}); checkpoint metadata may hold only "
        "dicts with str keys, lists, tuples, str, int, float, bool, None and numpy numbers/arrays"
    )


# -- hashes ------------------------------------------------------------------------------------
def payload_sha256(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a set of named tensors, independent of their order and memory layout.

    The tensors are hashed in sorted name order; for each, the hash is fed the UTF-8 bytes of
    the name, the dtype (``str(dtype)``, e.g. ``"float32"``) and the shape (``json.dumps(list(shape))``,
    e.g. ``"[2, 3]"``, ``"[]"`` for a 0-d array), each followed by a NUL byte, then the array's
    C-contiguous little-endian bytes.

    Parameters
    ----------
    state : mapping of str to array-like

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        array = _little_endian(np.asarray(state[name]))
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(str(array.dtype).encode("ascii") + b"\0")
        digest.update(json.dumps([int(n) for n in array.shape]).encode("ascii") + b"\0")
        digest.update(array.tobytes(order="C"))
    return digest.hexdigest()


def _header_sha256(entries: Mapping[str, str]) -> str:
    """SHA-256 (hex) of the header entries other than ``header_sha256`` itself."""
    rest = {k: v for k, v in entries.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` C-contiguous with a little-endian (or byte-order-free) dtype."""
    if array.dtype.byteorder not in ("<", "|") and array.dtype.newbyteorder("<") != array.dtype:
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _library_version() -> str:
    try:
        import combinability

        return str(getattr(combinability, "__version__", "unknown"))
    except ImportError:  # pragma: no cover - only while the package itself is half-imported
        return "unknown"


# -- writing -----------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    state: Mapping[str, np.ndarray],
    *,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    backend: str | None = None,
) -> None:
    """Write a checkpoint (a safetensors file, see the module docstring) atomically.

    Parameters
    ----------
    path : str or Path
        The file to write; its directory is created if needed. The file is written to a temporary
        file beside it, then renamed over it: it is never left half-written.
    state : mapping of str to numpy.ndarray
        The tensors, by name. Dtypes: bool, (u)int8 to (u)int64, float16/32/64, complex64; any shape,
        0-d included.
    config : mapping, optional
        The model configuration (plain values).
    metadata : mapping, optional
        User metadata (plain values, see :func:`plain`).
    backend : str, optional
        The name of the backend writing the file.

    Raises
    ------
    TypeError
        If ``config`` or ``metadata`` holds a value that is not plain (naming where), a name is not a
        str, or a tensor has an unsupported dtype; nothing is written then.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must map names to arrays, got a {type(state).__name__}")
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got a {type(config).__name__}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got a {type(metadata).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got a {type(backend).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"state: tensor names must be non-empty str, got {name!r}")
        array = _little_endian(np.asarray(value))
        if array.dtype.name not in _SAVE_DTYPES:
            raise TypeError(
                f"state[{name!r}] has dtype {array.dtype}; a checkpoint holds only "
                f"{', '.join(_SAVE_DTYPES)} (cast it, e.g. to float32)"
            )
        arrays[name] = array
    entries = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(plain(dict(config or {}), "config"), sort_keys=True),
        "metadata": json.dumps(plain(dict(metadata or {}), "metadata"), sort_keys=True),
        "names": json.dumps(list(arrays)),
        "library_version": _library_version(),
        "sha256": payload_sha256(arrays),
    }
    if backend is not None:
        entries["backend"] = backend
    entries["header_sha256"] = _header_sha256(entries)

    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(arrays, tmp, metadata=entries)


# -- reading -----------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint of any supported kind (see the module docstring).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        If the file is truncated, damaged (a hash does not match), or not a checkpoint at all.
    IncompatibleVersionError
        If it is a combinability checkpoint of a version this library does not read.
    IncompatibleModelsError
        If it is a readable ``torch.save`` file that holds something else than a state dict.
    BackendUnavailableError
        If it is a ``torch.save`` file and torch is not installed.
    """
    from combinability.checkpoint_readers import (
        ORBAX_MARKERS,
        load_folder,
        load_msgpack,
        load_npz,
        load_orbax,
        load_sharded,
        load_torch,
    )

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.is_dir():
        if any((path / marker).exists() for marker in ORBAX_MARKERS):
            return load_orbax(path)
        return load_folder(path)  # a Hugging Face model folder
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise CorruptFileError(f"{str(path)!r} is empty; it is not a checkpoint")
    if head[:1] == b"{" and head[8:9] != b"{":  # JSON, not a safetensors header: the index of a model's shards
        return load_sharded(path)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CorruptFileError(
                f"{str(path)!r} is a truncated or damaged zip archive ({type(exc).__name__}: {exc})"
            ) from exc
        if f"{_NPZ_HEADER}.npy" in members:
            return load_npz(path)
        if not any(m == "data.pkl" or m.endswith("/data.pkl") for m in members):
            raise CorruptFileError(
                f"{str(path)!r} is a zip archive but neither a torch.save file nor a combinability .npz checkpoint"
            )
        return load_torch(path)
    if len(head) == 9 and head[8:9] == b"{":
        return _load_safetensors(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # torch.save's legacy format
        return load_torch(path)
    if 0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # a msgpack map: flax.serialization.to_bytes
        return load_msgpack(path)
    raise CorruptFileError(
        f"{str(path)!r} is not a checkpoint: it is neither a safetensors file, a torch.save file, an .npz archive "
        "nor a flax msgpack file"
    )


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of any file :func:`load_checkpoint` reads, by name, and nothing else.

    Raises
    ------
    FileNotFoundError, CorruptFileError, IncompatibleVersionError, IncompatibleModelsError, BackendUnavailableError
        As :func:`load_checkpoint`.
    """
    return load_checkpoint(path).state


def read_metadata(path: str | Path) -> dict[str, Any]:
    """What a checkpoint says about itself, read from its header alone (no array is read).

    Parameters
    ----------
    path : str or Path
        A file :func:`load_checkpoint` reads.

    Returns
    -------
    dict
        ``"backend"`` (str or None), ``"config"`` (dict, ``{}`` when unknown), ``"metadata"`` (dict),
        ``"version"`` (int: :data:`VERSION`, 1 for legacy files, 0 for files from elsewhere) and
        ``"tensors"``: ``{name: {"dtype": str, "shape": tuple}}`` in the file's order. For a
        safetensors file only the header is read (its header hash is checked, the payload hash is
        not); the other kinds (``torch.save`` files, ``.npz`` archives) have no separate header and are
        read whole.

    Raises
    ------
    FileNotFoundError, CorruptFileError, IncompatibleVersionError, IncompatibleModelsError, BackendUnavailableError
        As :func:`load_checkpoint`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    head = b""
    if path.is_file():  # a folder (Orbax, a model's shards) is read whole
        with open(path, "rb") as fh:
            head = fh.read(9)
    if len(head) != 9 or head[8:9] != b"{":
        ckpt = load_checkpoint(path)
        tensors = {k: {"dtype": v.dtype.name, "shape": tuple(v.shape)} for k, v in ckpt.state.items()}
        return {"backend": ckpt.backend, "config": ckpt.config, "metadata": ckpt.metadata,
                "version": ckpt.version, "tensors": tensors}
    entries, header = _read_safetensors_header(path)
    tensors = {k: {"dtype": _DTYPE_NAMES.get(t.dtype, t.dtype), "shape": t.shape} for k, t in header.items()}
    if entries.get("format") != FORMAT and "header_sha256" not in entries:
        return {"backend": None, "config": {}, "metadata": dict(entries), "version": 0, "tensors": tensors}
    config, metadata, names = _library_entries(path, entries)
    if not all(isinstance(n, str) for n in names) or sorted(names) != sorted(tensors):
        raise _corrupt(path, "the header's list of names does not match its tensors: the file is corrupt")
    return {"backend": entries.get("backend"), "config": config, "metadata": metadata, "version": VERSION,
            "tensors": {name: tensors[name] for name in names}}


def metadata_differences(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The entries in which two metadata mappings differ, as ``"key: <stored> in the file, <new> now"``.

    Both are compared as they read back from a checkpoint (plain JSON values: tuples become lists).
    """
    old, now = _json_plain(dict(stored), "metadata"), _json_plain(dict(new), "metadata")
    missing = "(absent)"
    out = []
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key, missing), now.get(key, missing)
        if a == b:
            continue
        fields_a, fields_b = _repr_fields(a), _repr_fields(b)
        if fields_a is not None and fields_b is not None and set(fields_a) == set(fields_b):
            # a recipe's repr, ``TrainRecipe(epochs=5, lr=0.1, ...)``: the fields that differ, whole
            out += [f"{key}.{f}: {fields_a[f]} in the file, {fields_b[f]} now" for f in fields_a
                    if fields_a[f] != fields_b[f]]
        else:
            out.append(f"{key}: {_shown(a)} in the file, {_shown(b)} now")
    return out


def _repr_fields(value: Any) -> dict[str, str] | None:
    """The fields of a dataclass's repr (``"TrainRecipe(epochs=5, lr=0.1)"``), by name; None for anything else.

    >>> _repr_fields("TrainRecipe(epochs=5, lr=0.1, schedule='step')")
    {'epochs': '5', 'lr': '0.1', 'schedule': "'step'"}
    """
    match = re.fullmatch(r"(\w+)\((.*)\)", value) if isinstance(value, str) else None
    if match is None or not match.group(2):
        return None
    parts = re.split(r", (?=\w+=)", match.group(2))
    if not all(re.match(r"\w+=", p) for p in parts):
        return None
    return dict(p.split("=", 1) for p in parts)


def _shown(value: Any) -> str:
    """``value`` as a message shows it: its repr, shortened to 80 characters with an ellipsis."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_overwrite(path: str | Path, metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False,
                    what: str = "checkpoint") -> None:
    """Refuse, before any work, to replace a file this run did not write.

    Nothing is refused when ``overwrite`` is true or ``path`` does not exist. Otherwise ``path``
    must be a checkpoint of this library whose metadata equal ``metadata`` (the same run's file).

    Raises
    ------
    OutputExistsError
        If ``path`` exists and is not a checkpoint of this library, or its metadata differ from
        ``metadata`` (another run's result); the message names the path and the entries that differ.
    """
    path = Path(path)
    if overwrite or not path.exists() or path.is_dir():  # a folder: files.check_writable says so
        return
    advice = "pass overwrite=True (--overwrite) to replace it, or choose another path"
    try:
        info = read_metadata(path)
    except (CorruptFileError, IncompatibleVersionError, IncompatibleModelsError, BackendUnavailableError) as exc:
        raise OutputExistsError(f"the {what} path {path} holds a file that is not a readable checkpoint of this "
                                f"library ({exc}); refusing to replace it: {advice}") from None
    if info["version"] == 0:
        raise OutputExistsError(f"the {what} path {path} holds a model file from elsewhere (not written by "
                                f"combinability); refusing to replace it: {advice}")
    differ = metadata_differences(info["metadata"], metadata or {})
    if differ:
        raise OutputExistsError(f"the {what} path {path} holds another run's checkpoint (its metadata differ: "
                                f"{'; '.join(differ)}); refusing to replace it: {advice}")


def non_float_parameters(expected: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """The floating-point parameters of ``expected`` that ``state`` holds with a non-float dtype.

    Parameters
    ----------
    expected : mapping of name to dtype (or anything with a ``dtype``)
        The model's own parameters; only those with a floating dtype are checked, so integer
        buffers (BatchNorm's ``num_batches_tracked``) may stay integers.
    state : mapping of name to array-like (or dtype)
        What is to be loaded into them.

    Returns
    -------
    list of str
        ``"name (dtype)"`` for each floating parameter given as an integer, bool or complex array
        (which copying into the model would silently truncate or cast), in ``expected``'s order.
    """

    bad = []
    for name, reference in expected.items():
        if name in state and _is_float(reference)[0]:
            is_float, dtype = _is_float(state[name])
            if not is_float:
                bad.append(f"{name} ({dtype})")
    return bad


def _is_float(value: Any) -> tuple[bool, str]:
    """Whether an array, a dtype or a dtype's name is floating point, and the dtype's name."""
    dtype = value if isinstance(value, str | np.dtype | type) else getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    if isinstance(dtype, str) and dtype.startswith(("float", "bfloat")):  # read_metadata's names, bfloat16 too
        return True, dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a framework's dtype (torch.float32): its name says it
        name = str(dtype).rpartition(".")[2]
        return name.startswith(("float", "bfloat", "half", "double")), name
    # ml_dtypes' bfloat16 and float8 types (jax's) are floats that numpy does not class as np.floating
    return bool(np.issubdtype(dtype, np.floating)) or dtype.name.startswith(("bfloat", "float")), dtype.name


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{str(path)!r}: {what}")


@dataclass(frozen=True)
class _TensorHeader:
    """One tensor's entry in a safetensors header: dtype code, shape and byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, _TensorHeader]]:
    """The ``__metadata__`` entries and the tensor entries of a safetensors file, reading no array.

    Every declared size is checked against the file's size before anything that size is read
    or allocated: the header length, and each tensor's byte range (which must also agree with
    its shape and dtype).

    Raises
    ------
    CorruptFileError
        If the header is not valid (an unknown dtype code included), or declares more bytes than
        the file holds.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"not a readable safetensors file: it has {file_size} bytes, less than the "
                                 "8-byte header length")
        size = int.from_bytes(head, "little")
        if size > file_size - 8:
            raise _corrupt(path, f"not a readable safetensors file (truncated or damaged?): its header claims "
                                 f"{size} bytes, but the file has only {file_size - 8} after the length")
        raw = fh.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(path, f"not a readable safetensors file (truncated or damaged?): {exc}") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "not a readable safetensors file: its header is not a JSON object")
    entries = header.pop("__metadata__", None) or {}
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise _corrupt(path, "not a readable safetensors file: its __metadata__ is not a mapping of str to str")
    data_size = file_size - 8 - size
    tensors = {name: _tensor_header(path, name, entry, data_size) for name, entry in header.items()}
    return entries, dict(sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)))


def _tensor_header(path: Path, name: str, entry: Any, data_size: int) -> _TensorHeader:
    """One validated tensor entry of a safetensors header (see :func:`_read_safetensors_header`)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _corrupt(path, f"not a readable safetensors file: the header entry of tensor {name!r} lacks "
                             "'dtype', 'shape' or 'data_offsets'")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if (not isinstance(shape, list) or not all(map(count, shape)) or not isinstance(offsets, list)
            or len(offsets) != 2 or not all(map(count, offsets)) or offsets[0] > offsets[1]):
        raise _corrupt(path, f"not a readable safetensors file: tensor {name!r} has the malformed shape {shape!r} "
                             f"or data offsets {offsets!r}")
    if code not in _ITEMSIZES:
        raise _corrupt(path, f"not a readable safetensors file: tensor {name!r} has the unknown dtype {code!r} "
                             f"(safetensors dtypes: {', '.join(_ITEMSIZES)})")
    nbytes = _ITEMSIZES[code] * int(np.prod(shape, dtype=object))  # Python ints: no overflow
    begin, end = offsets
    if end - begin != nbytes:
        raise _corrupt(path, f"tensor {name!r} declares shape {tuple(shape)} of {code} ({nbytes} bytes) but its "
                             f"data offsets span {end - begin} bytes: the file is corrupt or crafted")
    if end > data_size:
        raise _corrupt(path, f"tensor {name!r} declares shape {tuple(shape)} of {code}, bytes {begin}..{end} of "
                             f"the data, but the file holds only {data_size} bytes of data: it is truncated, "
                             "or its header was crafted")
    return _TensorHeader(code, tuple(shape), begin, end)


def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, deserialize

    # Sizes are checked against the file before the file is read (see _read_safetensors_header).
    entries, header = _read_safetensors_header(path)
    order = list(header)
    try:
        views = dict(deserialize(path.read_bytes()))
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(path, f"not a readable safetensors file (truncated or damaged?): {exc}") from exc
    if set(order) != set(views):
        raise _corrupt(path, "its tensor header is inconsistent: the file is corrupt")
    # Raw views of the file's bytes (hashed as they are), then owned, writable, native-order copies.
    raw = {name: _safetensors_array(path, name, views[name]) for name in order}
    state = {name: array.astype(array.dtype.newbyteorder("="), copy=True) for name, array in raw.items()}

    if entries.get("format") != FORMAT and "header_sha256" not in entries:
        return Checkpoint(state=state, config={}, metadata=dict(entries), backend=None, version=0, path=path)

    config, metadata, names = _library_entries(path, entries)
    if not all(isinstance(n, str) for n in names) or sorted(names) != sorted(state) or len(set(names)) != len(names):
        raise _corrupt(path, "the header's list of names does not match its tensors: the file is corrupt")
    if entries["sha256"] != payload_sha256(raw):
        raise _corrupt(path, "payload SHA-256 does not match: the file is corrupt")
    return Checkpoint(
        state={name: state[name] for name in names},
        config=config,
        metadata=metadata,
        backend=entries.get("backend"),
        version=VERSION,
        path=path,
    )


def _library_entries(path: Path, entries: Mapping[str, str]) -> tuple[dict, dict, list]:
    """``config``, ``metadata`` and ``names`` of a library checkpoint's header, checked (header hash, version)."""
    if entries.get("header_sha256") != _header_sha256(entries):
        raise _corrupt(path, "header SHA-256 does not match: the file is corrupt")
    version = entries.get("version")
    if version is None or not (version.isascii() and version.isdigit()):
        raise _corrupt(path, f"checkpoint version must be an integer, found {version!r}")
    if int(version) != VERSION:
        raise IncompatibleVersionError(
            f"{str(path)!r} is a version-{int(version)} safetensors checkpoint; {_READABLE}"
            + (" (upgrade combinability to read it)" if int(version) > VERSION else "")
        )
    missing = [k for k in ("config", "metadata", "names", "sha256") if k not in entries]
    if missing:
        raise _corrupt(path, f"the checkpoint header lacks the entries {missing}")
    return (_json_entry(path, entries, "config", dict), _json_entry(path, entries, "metadata", dict),
            _json_entry(path, entries, "names", list))


def _safetensors_array(path: Path, name: str, view: Mapping[str, Any]) -> np.ndarray:
    """A view of a tensor's bytes as numpy (bfloat16, found in foreign files only, as float32)."""
    code, shape, raw = view["dtype"], tuple(view["shape"]), view["data"]
    if code == "BF16":  # the top half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if code not in _LOAD_DTYPES:
        raise IncompatibleModelsError(
            f"{str(path)!r}: tensor {name!r} has safetensors dtype {code}, which numpy cannot hold; "
            f"readable: {', '.join(_LOAD_DTYPES)}, BF16"
        )
    return np.frombuffer(raw, dtype=_LOAD_DTYPES[code]).reshape(shape)


def _json_entry(path: Path, entries: Mapping[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(entries[key])
    except ValueError as exc:
        raise _corrupt(path, f"the header entry {key!r} is not valid JSON ({exc}): the file is corrupt") from exc
    if not isinstance(value, kind):
        raise _corrupt(path, f"the header entry {key!r} must be a JSON {kind.__name__}, found {type(value).__name__}")
    return value


def _json_plain(value: Any, where: str) -> Any:
    """``value`` as it would read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(plain(value, where)))
