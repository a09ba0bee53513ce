"""Checkpoint files of the JAX backend: one ``.npz`` with a JSON header and named arrays.

Layout of the zip archive (``numpy.savez``, read with ``allow_pickle=False``):

* ``__header__``: the UTF-8 bytes of a JSON object ``{"format": "combinability-checkpoint",
  "version": 1, "backend": "jax", "architecture", "config", "metadata", "names"}``;
* ``a0``, ``a1``, ...: the arrays, whose names are ``header["names"]`` in the same order.

Files are written atomically: a temporary file in the target directory, then
:func:`os.replace`. This module needs numpy only.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from combinability.checkpoint import FORMAT, VERSION, plain
from combinability.errors import CorruptFileError, IncompatibleModelsError, IncompatibleVersionError
from combinability.files import atomic_path

__all__ = ["FORMAT", "VERSION", "write_checkpoint", "read_checkpoint"]

_HEADER = "__header__"


def write_checkpoint(path: str | Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` with ``header`` (``format``, ``version`` and ``names`` are filled in) atomically.

    Raises
    ------
    TypeError
        If the header (e.g. its metadata) is not JSON-serialisable.
    """
    path = Path(path)
    full = {"format": FORMAT, "version": VERSION, **header, "names": list(arrays)}
    text = json.dumps(plain(full, "header"), sort_keys=True)
    payload = {_HEADER: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)}
    payload.update({f"a{i}": np.asarray(v) for i, v in enumerate(arrays.values())})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **payload)


def read_checkpoint(path: str | Path, *, backend: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a file written by :func:`write_checkpoint`: ``(header, arrays)``.

    Parameters
    ----------
    path : str or Path
    backend : str, optional
        When given, the backend the file must have been written by.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        If the file is not a readable checkpoint (not a zip, truncated, no or bad header,
        arrays missing).
    IncompatibleVersionError
        If the checkpoint's format version is not the one this library reads.
    IncompatibleModelsError
        If ``backend`` is given and the file was written by another backend.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _HEADER not in npz.files:
                raise CorruptFileError(f"{str(path)!r} has no checkpoint header; it is not a combinability checkpoint")
            header = json.loads(npz[_HEADER].tobytes().decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise CorruptFileError(
                    f"{str(path)!r} is not a combinability checkpoint (format {header.get('format')!r}, "
                    f"expected {FORMAT!r})" if isinstance(header, dict) else f"{str(path)!r}: malformed header"
                )
            if header.get("version") != VERSION:
                raise IncompatibleVersionError(
                    f"{str(path)!r} is checkpoint format version {header.get('version')!r}; "
                    f"this library reads version {VERSION}"
                )
            if backend is not None and header.get("backend") != backend:
                raise IncompatibleModelsError(
                    f"{str(path)!r} was written by the {header.get('backend')!r} backend; "
                    f"load it with that backend, not {backend!r}"
                )
            names = header.get("names")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CorruptFileError(f"{str(path)!r}: the header's 'names' is not a list of parameter names")
            missing = [f"a{i}" for i in range(len(names)) if f"a{i}" not in npz.files]
            if missing:
                raise CorruptFileError(f"{str(path)!r} lacks arrays {missing[:5]} named in its header")
            arrays = {name: np.asarray(npz[f"a{i}"]) for i, name in enumerate(names)}
    except (CorruptFileError, IncompatibleVersionError, IncompatibleModelsError):
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{str(path)!r} cannot be read as a checkpoint: {type(exc).__name__}: {exc}") from exc
    return header, arrays
