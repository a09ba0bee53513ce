"""Content hashes of numpy arrays, computed once for arrays nobody can write.

Run keys and provenance name the data and models a result was computed from by content
hashes (SHA-256 of the examples, a blake2b fingerprint of each flat parameter vector).
Hashing the 10,000 Fashion-MNIST test images takes about 15 ms, a few percent of a small
sweep; a study runs many sweeps on the same data and models. An array that cannot be
written — read-only, and every array it is a view of read-only too, down to memory it
owns or an immutable ``bytes`` object — cannot change, so its hash is kept (keyed by the
array's identity, dropped when the array is freed) and reused. Any other array is hashed
every time.

The library's own arrays are made read-only where it creates them: the datasets
:func:`combinability.data.load_dataset` returns and their subsets, and the flat
parameter vectors of a :class:`combinability.ModelSet`. (An owner can switch a read-only
array back to writable; an array that is writable again is hashed again.)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["is_frozen", "freeze", "memoized", "in_numpy_memory"]

_memo: dict[tuple[Any, ...], tuple[tuple[weakref.ref, ...], str]] = {}
_lock = threading.Lock()


def is_frozen(array: Any) -> bool:
    """True when ``array`` is a numpy array that neither it nor any array it views can write.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros(3)
    >>> is_frozen(x), is_frozen(freeze(x))
    (False, True)
    >>> view = np.zeros(3)[:2]
    >>> view.flags.writeable = False
    >>> is_frozen(view)  # its base can still be written
    False
    """
    base = array
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return base is None or isinstance(base, bytes)


def in_numpy_memory(array: np.ndarray) -> bool:
    """True when the memory under ``array`` was allocated by numpy (not a ``bytes`` object or a file map).

    Such memory can be shared with a framework (``torch.from_numpy``) even when the array is
    read-only: the flag, not the memory, forbids writing. The library never writes into the
    tensors it makes of its inputs.
    """
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base is None


def freeze(array: np.ndarray, *, views: bool = False) -> np.ndarray:
    """``array`` made read-only, in place; returned for chaining.

    With ``views=True``, so is every array it is a view of (for arrays whose whole
    chain belongs to the caller, such as a loader's result, ``normalised[:, None]``).
    """
    base = array
    while isinstance(base, np.ndarray):
        base.flags.writeable = False
        base = base.base if views else None
    return array


def memoized(tag: str, arrays: Sequence[np.ndarray | None], compute: Callable[[], str]) -> str:
    """``compute()``, remembered for ``(tag, arrays)`` when every given array is frozen.

    Parameters
    ----------
    tag : str
        What is computed (e.g. ``"sha256"``): one array may have several hashes.
    arrays : sequence of numpy.ndarray or None
        The arrays the hash reads (``None`` entries are skipped).
    compute : callable
        Computes the hash of those arrays.

    Returns
    -------
    str
        The remembered hash when all arrays are frozen and were hashed before, else a
        fresh ``compute()`` (remembered when all are frozen).
    """
    present = [a for a in arrays if a is not None]
    if not present or not all(is_frozen(a) for a in present):
        return compute()
    key = (tag, *(id(a) for a in arrays))
    with _lock:
        hit = _memo.get(key)
    if hit is not None and len(hit[0]) == len(present) and all(r() is a for r, a in zip(hit[0], present, strict=True)):
        return hit[1]
    value = compute()

    def forget(_: Any, key: tuple[Any, ...] = key) -> None:
        with _lock:
            _memo.pop(key, None)

    refs = tuple(weakref.ref(a, forget) for a in present)
    with _lock:
        _memo[key] = (refs, value)
    return value
