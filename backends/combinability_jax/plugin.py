"""The ``combinability.plugins`` entry point of the JAX backend.

This module must stay light: it imports neither jax nor flax. The factory imports
:mod:`combinability_jax.backend` when the backend is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from combinability.hookspecs import hookimpl

if TYPE_CHECKING:
    from combinability_jax.backend import JaxBackend

__all__ = ["make_backend", "combinability_register_backends"]


def make_backend() -> JaxBackend:
    """Import jax/flax/optax and return a :class:`~combinability_jax.backend.JaxBackend`.

    Raises
    ------
    ImportError
        If jax, flax or optax is not installed (``pip install combinability[jax]``).
    """
    from combinability_jax.backend import JaxBackend

    return JaxBackend()


@hookimpl
def combinability_register_backends() -> dict:
    return {"jax": (make_backend, "jax")}
