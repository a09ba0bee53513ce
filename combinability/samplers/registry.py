"""The built-in samplers, registered as a plugin like any third-party sampler.

Declared in ``pyproject.toml`` under ``[project.entry-points."combinability.plugins"]``
as ``samplers = "combinability.samplers.registry"``.
"""

from __future__ import annotations

from combinability.hookspecs import hookimpl
from combinability.samplers import BUILTIN_SAMPLERS

__all__ = ["combinability_register_samplers"]


@hookimpl
def combinability_register_samplers() -> list[type]:
    """The sampler classes of the paper (see :mod:`combinability.samplers`)."""
    return list(BUILTIN_SAMPLERS)
