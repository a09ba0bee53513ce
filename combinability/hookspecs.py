"""Hook specifications: the plugin door of combinability.

Every plugin is a module (or object) found through the ``combinability.plugins``
entry-point group. It implements any of the hooks below, decorated with
:data:`hookimpl`. The built-in torch and jax backends, the reference architectures,
the datasets, the samplers and the aligners register through these same hooks,
exactly as a third-party package would.

Registration hooks return plain values (classes, small frozen descriptions); they
must not import a framework: :func:`combinability_register_backends` returns a
*factory* that is only called when the backend is first used, and a
:class:`Registration` names its callable by a ``"module:callable"`` string imported
only when the callable is first used.

The hooks are called through pluggy (``pm.hook.combinability_register_...()``) by
:mod:`combinability.plugins`, which turns a hook that raises, or that returns a value
of the wrong type, into a :class:`RuntimeWarning` naming the plugin; the other plugins
keep working. A plugin cannot hide a built-in: a name the library itself registers
keeps its built-in meaning, and a warning names both plugins. When two third-party
plugins register the same name, the first registered wins (with a warning).

Example
-------
A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."combinability.plugins"]
    my_plugin = "my_package.plugin"

and ``my_package/plugin.py`` contains::

    from combinability import Architecture, hookimpl
    from combinability.hookspecs import Registration

    @hookimpl
    def combinability_register_architectures():
        return [Architecture("my_net", modules={"torch": "my_package.torch_impl:my_net"})]

    @hookimpl
    def combinability_register_aligners():
        return [Registration("greedy", "my_package.align:greedy", "greedy unit matching")]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from combinability.architecture import Architecture
    from combinability.backend import Backend
    from combinability.data.registry import DatasetSpec

__all__ = [
    "PROJECT",
    "ENTRY_POINT_GROUP",
    "hookspec",
    "hookimpl",
    "Registration",
    "combinability_register_backends",
    "combinability_register_architectures",
    "combinability_register_datasets",
    "combinability_register_samplers",
    "combinability_register_aligners",
    "combinability_register_repairs",
    "combinability_register_metrics",
]

PROJECT = "combinability"
ENTRY_POINT_GROUP = "combinability.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator that marks a plugin's hook implementation.
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Registration:
    """One named extension, as returned by the ``combinability_register_*`` hooks.

    Its kind (aligner, repair, metric) is implied by the hook that returns it.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"weight"``.
    target : str or callable
        The callable itself, or its ``"package.module:attribute"``, imported only when
        the extension is first used (so listing names imports nothing heavy).
    description : str
        One line shown by ``combinability plugins``.
    needs : tuple of str
        What a caller must provide for the extension to work, e.g. ``("data",)`` for an
        aligner that correlates activations. Informational: callers check it to give a
        clear error before calling.
    extra : str
        The pip extra that installs what ``target`` imports (``"torch"``); when importing
        the target fails, the error names it (``pip install 'combinability[torch]'``).

    Examples
    --------
    >>> reg = Registration("identity", "combinability.align.builtin:identity", "no-op")
    >>> reg.load().__name__
    'identity'
    """

    name: str
    target: str | Callable[..., Any]
    description: str = ""
    needs: tuple[str, ...] = ()
    extra: str = ""

    def load(self) -> Any:
        """The registered object: ``target`` itself, or the attribute its string names.

        Raises
        ------
        PluginError
            If the ``"module:attribute"`` string is malformed or names no attribute.
        BackendUnavailableError
            If importing the module fails and :attr:`extra` names the pip extra to install.
        ImportError
            If importing the module fails and no extra is given.
        """
        if not isinstance(self.target, str):
            return self.target
        from combinability.architecture import load_object

        try:
            return load_object(self.target)
        except ImportError as exc:
            if not self.extra:
                raise
            from combinability.errors import BackendUnavailableError

            raise BackendUnavailableError(
                f"{self.name!r} ({self.target}) cannot be imported ({exc}); "
                f"install what it needs with: pip install 'combinability[{self.extra}]'"
            ) from exc


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

    Example
    -------
    ::

        @hookimpl
        def combinability_register_backends():
            def factory():
                from my_package.backend import MyBackend  # imports the framework

                return MyBackend()

            return {"myfw": (factory, "myfw")}
    """


@hookspec
def combinability_register_architectures() -> Sequence[Architecture]:
    """Register architectures.

    Return a sequence of :class:`combinability.Architecture` values. Each names, per
    backend, the ``"module:attribute"`` of its implementation, which is imported only
    when first used.

    Example
    -------
    ::

        @hookimpl
        def combinability_register_architectures():
            return [Architecture("my_net", modules={"torch": "my_package.torch_impl:my_net"})]
    """


@hookspec
def combinability_register_datasets() -> Sequence[DatasetSpec]:
    """Register datasets.

    Return a sequence of :class:`combinability.data.DatasetSpec`, each with a name and a
    loader ``loader(split, root=None) -> ArrayDataset`` that reads real files and raises
    :class:`combinability.DatasetNotFoundError` saying where it looked when they are missing.

    Example
    -------
    ::

        @hookimpl
        def combinability_register_datasets():
            return [DatasetSpec("my_data", "my_package.data:load", num_classes=10, input_shape=(1, 8, 8))]
    """


@hookspec
def combinability_register_samplers() -> Sequence[type]:
    """Register coefficient samplers.

    Return a sequence of sampler classes (frozen dataclasses with a ``parameter`` name,
    a default ``grid`` and a ``draw`` method; see :mod:`combinability.samplers`). They
    become available by name in :func:`combinability.get_sampler` and the command line.

    Example
    -------
    ::

        @hookimpl
        def combinability_register_samplers():
            from my_package.samplers import Corner

            return [Corner]
    """


@hookspec
def combinability_register_aligners() -> Sequence[Registration]:
    """Register aligners: procedures that find the permutation re-basing one model onto another.

    Return a sequence of :class:`Registration`. Each target is an *aligner*,
    ``aligner(task, **options) -> combinability.Permutation``, where ``task`` is a
    :class:`combinability.align.AlignTask` (the permutation spec, the reference and the
    other model's named arrays, a seed, and, when the caller has data, a ``features``
    callable giving both models' activations). The aligner returns the permutation
    ``π`` such that ``apply_permutation(task.spec, π, task.other)`` lives in the
    reference's basin. It must accept (and may ignore) unknown keyword options.

    Set ``needs=("data",)`` for an aligner that uses ``task.features``; it should raise
    :class:`combinability.errors.ConfigurationError` when ``task.features`` is ``None``.

    Aligners are used by name through :func:`combinability.align.align` and
    ``ModelPair.align(method=...)``; the built-ins are ``"weight"``, ``"activation"``
    and ``"identity"`` (:mod:`combinability.align.builtin`), which a plugin cannot hide.

    Example
    -------
    ::

        @hookimpl
        def combinability_register_aligners():
            return [Registration("sinkhorn", "my_package.align:sinkhorn",
                                 "entropic (Sinkhorn) weight matching")]

    with, in ``my_package/align.py``::

        def sinkhorn(task, *, epsilon=0.1, **_):
            ...
            return combinability.Permutation({...}, method="sinkhorn")
    """


@hookspec
def combinability_register_repairs() -> Sequence[Registration]:
    """Register repairs: corrections applied to a combined model's weights before it is evaluated.

    Return a sequence of :class:`Registration`. Each target is a *repair*,
    ``repair(theta, context) -> theta``, taking a flat weight vector (numpy array) and a
    context describing the model (its layout, backend and data where available) and
    returning the repaired flat vector, e.g. re-estimated BatchNorm statistics.

    Repairs are found by name with :func:`combinability.plugins.get_repair` (or
    :func:`combinability.repairs.get_repair`).

    Example
    -------
    ::

        @hookimpl
        def combinability_register_repairs():
            return [Registration("rescale", "my_package.repair:rescale", "restore each layer's norm",
                                 needs=("data",))]
    """


@hookspec
def combinability_register_metrics() -> Sequence[Registration]:
    """Register metrics: quantities measured on combined models.

    Return a sequence of :class:`Registration` whose targets follow the metric protocol
    (see :mod:`combinability.evaluation` for the metric protocol). Metrics are found by
    name with :func:`combinability.plugins.get_metric`.

    Example
    -------
    ::

        @hookimpl
        def combinability_register_metrics():
            return [Registration("ece", "my_package.metrics:expected_calibration_error",
                                 "expected calibration error", needs=("data",))]
    """
