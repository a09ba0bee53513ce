"""Reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian ``uint32`` per dimension, then the values in C order,
big-endian. Every file is checked against its header; anything that does not match
raises :class:`~combinability.errors.DatasetError` naming the file and what is wrong.

Decoded arrays are cached in memory (keyed by path, size and modification time), so
loading the same split twice in a process reads the disk once. They are returned
read-only: copy before modifying.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from combinability.errors import DatasetError

__all__ = ["IDX_TYPES", "read_idx", "describe_dims"]

#: IDX type code to the big-endian numpy dtype of the values.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def describe_dims(dims: tuple[int, ...]) -> str:
    """Human description of an IDX shape: ``"60000 images of 28x28"``, ``"60000 labels"``."""
    if len(dims) == 1:
        return f"{dims[0]} labels"
    if len(dims) == 3:
        return f"{dims[0]} images of {dims[1]}x{dims[2]}"
    return f"an array of shape {dims}"


def _raw_bytes(path: Path) -> tuple[bytes, str]:
    """The (decompressed) bytes of ``path`` and a word for where they come from."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":  # not gzip (IDX files start with two zero bytes)
        return data, "file holds"
    try:
        return gzip.decompress(data), "decompressed file holds"
    except EOFError as exc:
        raise DatasetError(f"{path}: truncated gzip stream ({exc}); download the file again") from exc
    except (OSError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt gzip stream ({exc}); download the file again") from exc


@functools.lru_cache(maxsize=16)
def _read_cached(path_str: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(path_str)
    data, holds = _raw_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated: {holds} {len(data)} bytes, less than the 4-byte IDX magic number")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{path}: not an IDX file: magic number 0x{data[:4].hex()} "
            f"(an IDX file starts with two zero bytes, a type code and the number of dimensions, "
            f"e.g. 0x00000803 for images and 0x00000801 for labels)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        valid = ", ".join(f"0x{c:02x} ({t.name})" for c, t in IDX_TYPES.items())
        raise DatasetError(f"{path}: unknown IDX type code 0x{code:02x}; valid codes: {valid}")
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{path}: truncated: header declares {ndim} dimensions ({header} header bytes), "
            f"{holds} {len(data)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing data"
        raise DatasetError(
            f"{path}: {what}: header says {describe_dims(dims)} of {dtype.name} "
            f"({expected} bytes), {holds} {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    if not dtype.isnative and dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain, recognised by content) into a read-only array.

    Parameters
    ----------
    path : path
        The file.

    Returns
    -------
    numpy.ndarray
        Shape and dtype from the header, native byte order, read-only.

    Raises
    ------
    DatasetError
        Bad magic number, unknown type code, a size that disagrees with the header,
        or a corrupt / truncated gzip stream. The message names the file.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path).resolve()
    st = path.stat()
    return _read_cached(str(path), st.st_size, st.st_mtime_ns)
