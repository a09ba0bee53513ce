"""Repairs: corrections applied to a combined model's weights before it is evaluated.

A repair is ``repair(theta, context) -> theta``: it takes a flat weight vector and a
context describing the model and returns the repaired vector (e.g. re-estimated
BatchNorm statistics). Repairs are registered by plugins through the
``combinability_register_repairs`` hook (see :mod:`combinability.hookspecs`) and found
by name here. This module holds only the registry access.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from combinability.plugins import get_repair, list_repairs

__all__ = ["Repair", "RepairContext", "get_repair", "list_repairs"]

#: A repair: ``repair(theta, context) -> theta``.
Repair = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class RepairContext:
    """What a repair sees besides the combined vector.

    Attributes
    ----------
    backend : Backend
        The evaluation backend (``backend.xp()`` for array-API maths on the device).
    template : native model
        A model of the architecture (for the backend's ``prepare``).
    layout : FlatLayout
        How the flat vectors map onto named arrays.
    ends : sequence of device arrays
        The flat vectors of the combined models (A, B[, C]) on the device.
    coefficients : device array, pair of device arrays, or None
        The coefficient vector ``v`` (B's weight) of this combination; ``(v_B, v_C)`` for a
        three-model combination; None in ``validate``.
    data : ArrayDataset or None
        ``repair_data`` given to the sweep (e.g. training images for BatchNorm statistics).
    table : LayerTable or None
        The models' layer table (None for a user's own model).
    cache : dict
        Per-sweep scratch space (e.g. the endpoints' statistics, computed once).
    """

    backend: Any
    template: Any
    layout: Any
    ends: Sequence[Any]
    coefficients: Any = None
    data: Any = None
    table: Any = None
    cache: dict = field(default_factory=dict)
