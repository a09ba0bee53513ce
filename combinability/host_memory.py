"""Host memory for large allocations: glibc's malloc told to keep freed memory; large arrays mapped at once.

An evaluation loop allocates the same large buffers at every batch: a forward pass's
activations (25 MB a layer for Tiny-10 at width 0.5 on batches of 1,000 images), a cost
matrix, a gathered copy of a layer. glibc's ``malloc`` serves such sizes from ``mmap`` or
from the top of its heap, and gives them back to the kernel when they are freed once
the free top of the heap passes its trim threshold (by default twice the last large
block freed). The next batch then takes fresh pages from the kernel, which zeroes each
one on its first touch. On this project's CPU machine that cost Tiny-10's forward passes
up to a million page faults a sweep, a quarter to a third of their time, and whether it
happened depended on where long-lived objects happened to sit in the heap.

:func:`keep_freed_memory` sets glibc's thresholds once per process so that blocks up to
32 MB (glibc's largest ``mmap`` threshold) come from the heap, and freed heap memory is
kept for reuse (up to 1 GiB free at its top) instead of being returned: what jemalloc
and tcmalloc do by default, and what PyTorch's CPU performance guide gets by preloading
them. The process's resident memory then stays near its peak instead of falling back
after each batch. Larger blocks are still mapped and unmapped each time.

The library calls it when it first evaluates (:class:`combinability.evaluation.Evaluator`)
or matches weights (:func:`combinability.weight_matching`), whatever the device: the host's
share of the work is what it speeds up. It does nothing where the
C library has no ``mallopt`` (macOS, musl), changes nothing under another allocator
preloaded (jemalloc, tcmalloc: glibc's settings then govern no allocation), and is
skipped when the environment sets ``COMBINABILITY_KEEP_FREED_MEMORY=0``.

Blocks larger than that threshold are mapped afresh, and their pages faulted in one by one;
:func:`float32_array` maps such a block's pages in one system call (``MAP_POPULATE``),
several times faster, for long-lived arrays such as weight matching's float32 copies.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading

import numpy as np

__all__ = ["keep_freed_memory", "float32_array", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "ENVIRONMENT_VARIABLE"]

_log = logging.getLogger(__name__)

#: Blocks at least this large are mapped with ``mmap`` (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap beyond this is returned to the kernel.
TRIM_THRESHOLD = 1 << 30
#: Set to ``0`` to leave the C library's allocator as it is.
ENVIRONMENT_VARIABLE = "COMBINABILITY_KEEP_FREED_MEMORY"

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_done: bool | None = None  # None: not tried yet; then whether the thresholds were set


def _mallopt() -> object | None:
    """glibc's ``mallopt``, or ``None`` where the C library has none.

    Looked up among the symbols the process already has (``dlopen(NULL)``): no search for
    the library file, which would start ``ldconfig``.
    """
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Set glibc's trim and ``mmap`` thresholds once per process; return whether they are set.

    Returns
    -------
    bool
        True when this or an earlier call set them; False when the environment opts out
        (``COMBINABILITY_KEEP_FREED_MEMORY=0``) or the C library has no ``mallopt``.
    """
    global _done
    with _lock:
        if _done is not None:
            return _done
        if os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
            _done = False
            return _done
        mallopt = _mallopt()
        if mallopt is None:
            _done = False
            return _done
        _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        _log.debug("glibc malloc keeps freed memory (mmap threshold %d, trim threshold %d): %s",
                   MMAP_THRESHOLD, TRIM_THRESHOLD, _done)
        return _done


def float32_array(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array for long-lived data; at :data:`MMAP_THRESHOLD` bytes or
    more, its pages mapped at once.

    glibc's ``malloc`` maps blocks that large afresh each time (they are never recycled from
    the heap), and the kernel then maps their pages one by one, at the first touch of each
    4 KiB page: weight matching's float32 copies of the largest layers of two ResNet-20 x16
    faulted in at about 2.3 ms a MB on this project's CPU machine, against 0.3 ms a MB for
    an ``mmap`` with ``MAP_POPULATE``, which maps every page in one system call. Smaller
    arrays come from ``numpy.empty`` (the heap, whose freed memory is reused without
    faults, see :func:`keep_freed_memory`), as do all where the platform has no
    ``MAP_POPULATE`` (it is Linux's) or the mapping fails. The memory is returned when the
    array is gone.
    """
    count = int(np.prod(shape, dtype=np.int64))
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is not None and count * 4 >= MMAP_THRESHOLD:
        try:
            region = mmap.mmap(-1, count * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        except (OSError, ValueError):  # no memory to map now: the pages fault in as they are touched
            pass
        else:
            return np.frombuffer(region, np.float32).reshape(shape)
    return np.empty(shape, np.float32)
