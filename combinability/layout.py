"""FlatLayout: named arrays to one flat vector and back.

The core works on *flat parameter vectors*: every parameter and buffer of a model,
concatenated in a fixed order. A :class:`FlatLayout` remembers, for every named
array, its shape, dtype, offset into the flat vector and the index of the layer it
belongs to (used by per-layer experiments such as identity stitching).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from combinability.errors import LayoutError

__all__ = ["ParamEntry", "FlatLayout", "check_names", "aligned_empty", "owns_memory"]

#: Byte alignment of flat vectors: what XLA's CPU client needs to use a numpy array's memory
#: in place (``jax.device_put`` of a 64-byte aligned array on the CPU copies nothing).
ALIGNMENT = 64
_OWNERS: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()  # aligned_empty's memory


def aligned_empty(size: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An uninitialised 1-D array of ``size`` elements whose memory starts on a 64-byte boundary.

    numpy's allocations are 16-byte aligned; the jax backend on the CPU copies such a vector
    into every device array made of it, and shares a 64-byte aligned one (a ResNet-20 x16
    sweep's two end models: 527 MB saved). :func:`owns_memory` recognises the result.
    """
    dtype = np.dtype(dtype)
    raw = np.empty(size * dtype.itemsize + ALIGNMENT, np.uint8)
    _OWNERS[id(raw)] = raw
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + size * dtype.itemsize].view(dtype)


def owns_memory(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of memory :func:`aligned_empty` allocated (nobody else's arrays)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return _OWNERS.get(id(base)) is base


@dataclass(frozen=True)
class ParamEntry:
    """One named array inside a flat vector.

    Attributes
    ----------
    name : str
        Parameter name as the backend spells it (``"layers.0.weight"``).
    shape : tuple of int
        Shape of the array.
    dtype : str
        NumPy dtype name of the array (``"float32"``).
    offset : int
        Index of the array's first element in the flat vector.
    layer : int
        Index of the layer the parameter belongs to (0-based, in forward order).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    layer: int

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """One past the index of the array's last element in the flat vector."""
        return self.offset + self.size


@dataclass(frozen=True)
class FlatLayout:
    """The order, shapes, dtypes and layers of named arrays in a flat vector.

    Build one with :meth:`from_arrays`; it is immutable and hashable.

    Examples
    --------
    >>> import numpy as np
    >>> params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    >>> layout = FlatLayout.from_arrays(params)
    >>> flat = layout.flatten(params)
    >>> flat.shape
    (8,)
    >>> bool(np.array_equal(layout.unflatten(flat)["w"], params["w"]))
    True
    """

    entries: tuple[ParamEntry, ...]

    @classmethod
    def from_arrays(
        cls,
        params: Mapping[str, np.ndarray],
        layers: Mapping[str, int] | None = None,
    ) -> FlatLayout:
        """Describe ``params`` in their mapping order.

        Parameters
        ----------
        params : mapping of str to array-like
            Named arrays; their iteration order becomes the flat order.
        layers : mapping of str to int, optional
            Layer index of each name. Missing names get layer 0; when omitted, every
            array gets its own layer, in order.

        Returns
        -------
        FlatLayout
        """
        entries = []
        offset = 0
        for i, (name, value) in enumerate(params.items()):
            arr = np.asarray(value)
            layer = i if layers is None else int(layers.get(name, 0))
            entry = ParamEntry(name, tuple(int(s) for s in arr.shape), arr.dtype.name, offset, layer)
            entries.append(entry)
            offset = entry.stop
        return cls(tuple(entries))

    # -- descriptive properties -------------------------------------------------
    @cached_property
    def _by_name(self) -> dict[str, ParamEntry]:
        return {e.name: e for e in self.entries}

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each entry, in flat order."""
        return tuple(e.size for e in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in flat order."""
        return tuple(e.name for e in self.entries)

    @property
    def size(self) -> int:
        """Total number of elements, the length ``d`` of the flat vector."""
        return self.entries[-1].stop if self.entries else 0

    @property
    def num_layers(self) -> int:
        """Number of distinct layer indices (``max(layer) + 1``)."""
        return max((e.layer for e in self.entries), default=-1) + 1

    @cached_property
    def dtype(self) -> np.dtype:
        """The dtype of the flat vector: the common type of all entries."""
        if not self.entries:
            return np.dtype(np.float32)
        return np.result_type(*[np.dtype(e.dtype) for e in self.entries])

    def __getitem__(self, name: str) -> ParamEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise LayoutError(
                f"no parameter named {name!r} in this layout; known names: {', '.join(self.names)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.entries)

    def slice(self, name: str) -> slice:
        """The slice of the flat vector that holds parameter ``name``."""
        e = self[name]
        return slice(e.offset, e.stop)

    def layer_index(self) -> np.ndarray:
        """Layer index of every element of the flat vector, shape ``(d,)``, int32."""
        out = np.empty(self.size, dtype=np.int32)
        for e in self.entries:
            out[e.offset : e.stop] = e.layer
        return out

    def with_layers(self, layers: Mapping[str, int]) -> FlatLayout:
        """A copy with layer indices taken from ``layers`` (names missing keep theirs)."""
        return FlatLayout(
            tuple(
                ParamEntry(e.name, e.shape, e.dtype, e.offset, int(layers.get(e.name, e.layer))) for e in self.entries
            )
        )

    # -- conversion -------------------------------------------------------------
    def flatten(self, params: Mapping[str, np.ndarray], dtype: np.dtype | None = None) -> np.ndarray:
        """Concatenate ``params`` in layout order into one vector.

        Parameters
        ----------
        params : mapping of str to array-like
            Must hold exactly the layout's names, with the layout's shapes.
        dtype : numpy dtype, optional
            dtype of the result; defaults to :attr:`dtype`.

        Raises
        ------
        LayoutError
            If a name is missing or unexpected, or a shape differs.
        """
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self._by_name]
        if missing or extra:
            raise LayoutError(
                "parameters do not match the layout: "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {extra}" if extra else "")
            )
        out = aligned_empty(self.size, dtype or self.dtype)
        for e in self.entries:
            arr = np.asarray(params[e.name])
            if arr.shape != e.shape:
                raise LayoutError(f"parameter {e.name!r} has shape {arr.shape}, the layout expects {e.shape}")
            out[e.offset : e.stop] = arr.reshape(-1)
        return out

    def unflatten(self, flat: np.ndarray, *, cast: bool = True) -> dict[str, np.ndarray]:
        """Split a flat vector into named arrays (copies, in layout order).

        Parameters
        ----------
        flat : numpy.ndarray, shape ``(d,)``
        cast : bool, default True
            Cast each array back to its recorded dtype.

        Raises
        ------
        LayoutError
            If ``flat`` is not one-dimensional of length :attr:`size`.
        """
        flat = np.asarray(flat)
        if flat.shape != (self.size,):
            raise LayoutError(f"flat vector has shape {flat.shape}, the layout expects ({self.size},)")
        out = {}
        for e in self.entries:
            arr = flat[e.offset : e.stop].reshape(e.shape)
            out[e.name] = arr.astype(e.dtype) if cast else arr.copy()
        return out

    def check_compatible(self, other: FlatLayout) -> None:
        """Raise :class:`LayoutError` unless ``other`` has the same names and shapes."""
        if [(e.name, e.shape) for e in self.entries] != [(e.name, e.shape) for e in other.entries]:
            a = {e.name: e.shape for e in self.entries}
            b = {e.name: e.shape for e in other.entries}
            diffs = [f"{n}: {a.get(n)} vs {b.get(n)}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
            raise LayoutError(
                "the two layouts differ (name: shape vs shape): "
                + ("; ".join(diffs[:8]) if diffs else "same names in a different order")
            )

    # -- serialisation (for results' provenance and checkpoints) ---------------
    def to_records(self) -> list[dict]:
        """A JSON-able description of the layout."""
        return [
            {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "offset": e.offset, "layer": e.layer}
            for e in self.entries
        ]

    @classmethod
    def from_records(cls, records: Sequence[Mapping]) -> FlatLayout:
        """Inverse of :meth:`to_records`."""
        return cls(
            tuple(
                ParamEntry(
                    str(r["name"]),
                    tuple(int(s) for s in r["shape"]),
                    str(r["dtype"]),
                    int(r["offset"]),
                    int(r["layer"]),
                )
                for r in records
            )
        )


def check_names(expected: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]], what: str, *,
                missing: bool = True) -> None:
    """Raise :class:`LayoutError` when the names (or their shapes) of ``given`` and ``expected`` differ.

    Parameters
    ----------
    expected, given : mapping of name to shape
    what : str
        The start of the message (``"params do not match the model"``).
    missing : bool
        Whether names of ``expected`` absent from ``given`` are an error (False: ``given`` may be a subset).

    Examples
    --------
    >>> check_names({"w": (2, 3)}, {"w": (3, 2), "b": (2,)}, "params do not match the model")
    Traceback (most recent call last):
    ...
    combinability.errors.LayoutError: params do not match the model: unknown names ['b']; wrong shapes ['w: (3, 2) \
(model: (2, 3))']
    """
    lost = [k for k in expected if k not in given] if missing else []
    unknown = [k for k in given if k not in expected]
    wrong = [f"{k}: {tuple(given[k])} (model: {tuple(expected[k])})" for k in given
             if k in expected and tuple(given[k]) != tuple(expected[k])]
    if lost or unknown or wrong:
        parts = [lost and f"missing {lost[:8]}", unknown and f"unknown names {unknown[:8]}",
                 wrong and f"wrong shapes {wrong[:8]}"]
        raise LayoutError(f"{what}: " + "; ".join(filter(None, parts)))
