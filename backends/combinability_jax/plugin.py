"""Plugin module of the jax backend (entry point ``combinability.plugins: jax``).

Registering imports no framework: the factory imports jax and flax when the backend is
first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from combinability.hookspecs import hookimpl

if TYPE_CHECKING:
    from combinability.backend import Backend

__all__ = ["combinability_register_backends"]


def _jax_backend() -> Backend:
    from combinability_jax.backend import JaxBackend

    return JaxBackend()


@hookimpl
def combinability_register_backends():
    return {"jax": (_jax_backend, "jax")}
