"""Plugin module of the torch backend (entry point ``combinability.plugins: torch``).

Registering imports no framework: the factory imports torch when the backend is
first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from combinability.hookspecs import hookimpl

if TYPE_CHECKING:
    from combinability.backend import Backend

__all__ = ["combinability_register_backends"]


def _torch_backend() -> Backend:
    from combinability_torch.backend import TorchBackend

    return TorchBackend()


@hookimpl
def combinability_register_backends():
    return {"torch": (_torch_backend, "torch")}
