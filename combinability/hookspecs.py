"""Hook specifications: the plugin door of combinability.

Every plugin is a module (or object) found through the ``combinability.plugins``
entry-point group. It implements any of the hooks below, decorated with
:data:`hookimpl`. The built-in torch and jax backends, the reference architectures,
the datasets and the samplers register through these same hooks, exactly as a
third-party package would.

Registration hooks return plain values (classes, small frozen descriptions); they
must not import a framework: :func:`combinability_register_backends` returns a
*factory* that is only called when the backend is first used.

Example
-------
A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."combinability.plugins"]
    my_arch = "my_package.plugin"

and ``my_package/plugin.py`` contains::

    from combinability import Architecture, hookimpl

    @hookimpl
    def combinability_register_architectures():
        return [Architecture("my_net", {"torch": "my_package.torch_impl:MyNet"})]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from combinability.architecture import Architecture
    from combinability.backend import Backend
    from combinability.data.registry import DatasetSpec

PROJECT = "combinability"
ENTRY_POINT_GROUP = "combinability.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator that marks a plugin's hook implementation.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def combinability_register_backends() -> dict[str, tuple[Callable[[], Backend], str]]:
    """Register framework backends.

    Return a mapping ``{name: (factory, extra)}``. ``factory()`` takes no argument
    and returns a :class:`combinability.Backend`; it may import its framework, and is
    called only when the backend is first used. ``extra`` names the pip extra that
    installs the framework (``"torch"``), used in the error a user sees when the
    framework is missing.

    A factory that raises :class:`ImportError` marks its backend as known but not
    installed.
    """


@hookspec
def combinability_register_architectures() -> Sequence[Architecture]:
    """Register architectures.

    Return a sequence of :class:`combinability.Architecture` values. Each names, per
    backend, the ``"module:attribute"`` of its implementation, which is imported only
    when first used. When two plugins register the same name, the first registered
    wins and a :class:`RuntimeWarning` names both.
    """


@hookspec
def combinability_register_datasets() -> Sequence[DatasetSpec]:
    """Register datasets.

    Return a sequence of :class:`combinability.data.DatasetSpec`, each with a name and a
    loader ``loader(split, root=None) -> ArrayDataset`` that reads real files and raises
    :class:`combinability.DatasetNotFoundError` saying where it looked when they are missing.
    """


@hookspec
def combinability_register_samplers() -> Sequence[type]:
    """Register coefficient samplers.

    Return a sequence of sampler classes (frozen dataclasses with a ``parameter`` name,
    a default ``grid`` and a ``draw`` method; see :mod:`combinability.samplers`). They
    become available by name in :func:`combinability.get_sampler` and the command line.
    """
