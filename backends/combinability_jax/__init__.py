"""JAX/Flax backend of combinability.

Importing this package imports no framework: :mod:`combinability_jax.plugin` registers
the backend through a factory that imports :mod:`combinability_jax.backend` (and with
it jax and flax) only when the backend is first used.
"""

from __future__ import annotations

__all__: list[str] = []
