"""The built-in repairs, registered as a plugin like any third-party repair.

Declared in ``pyproject.toml`` under ``[project.entry-points."combinability.plugins"]``
as ``repairs = "combinability.repairs.registry"``. The targets are strings, so listing
the repairs imports nothing of :mod:`combinability.repairs.batchnorm`.
"""

from __future__ import annotations

from combinability.hookspecs import Registration, hookimpl

__all__ = ["BUILTIN_REPAIRS", "combinability_register_repairs"]

#: The repairs this library ships.
BUILTIN_REPAIRS: tuple[Registration, ...] = (
    Registration("reset", "combinability.repairs.batchnorm:reset",
                 "recompute the BatchNorm running statistics of each combination on repair_data", needs=("data",)),
    Registration("repair", "combinability.repairs.batchnorm:repair",
                 "REPAIR (Jordan et al., 2023): renormalise each norm layer's channels to the interpolated "
                 "statistics of the end models", needs=("data",)),
)


@hookimpl
def combinability_register_repairs() -> list[Registration]:
    """The built-in repairs of :mod:`combinability.repairs.batchnorm`."""
    return list(BUILTIN_REPAIRS)
