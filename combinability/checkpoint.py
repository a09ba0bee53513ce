"""What every backend's checkpoint file holds besides its arrays, framework-free.

A checkpoint records ``format`` (:data:`FORMAT`), ``version`` (:data:`VERSION`), the
backend, the architecture, its configuration and user metadata. Backends choose the
container (torch: ``torch.save``; jax: ``.npz`` with a JSON header) and write it with
:func:`combinability.files.atomic_path`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "VERSION", "plain"]

#: Value of the ``format`` key of every checkpoint.
FORMAT = "combinability-checkpoint"
#: Checkpoint layout version written (and the only one read) by this library.
VERSION = 1


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
