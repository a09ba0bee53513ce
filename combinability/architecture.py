"""Architectures as plugins: a name, one implementation per backend, imported lazily.

An :class:`Architecture` is a small frozen value registered through the
``combinability_register_architectures`` hook. It names, for every backend that
implements it, a ``"module:attribute"`` string; the attribute is imported only when
that backend first uses the architecture and must be an :class:`ArchitectureImpl`
(an object, a class or a module with the attributes below).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from combinability.errors import PluginError, UnknownNameError

if TYPE_CHECKING:
    import numpy as np

    from combinability.permutation import PermutationSpec

__all__ = ["Architecture", "ArchitectureImpl", "load_object"]


class ArchitectureImpl(Protocol):
    """What an architecture gives one backend.

    Every method takes the model's configuration as keywords: ``width`` (the width
    multiplier), ``num_classes`` and ``input_shape`` (channels-first, e.g. ``(1, 28, 28)``
    or ``(64,)``), so that the spec and layers always describe the model that
    :meth:`build` returns.
    """

    def build(self, *, width: int, num_classes: int, input_shape: tuple[int, ...], seed: int) -> Any:
        """A freshly initialised native model."""
        ...

    def spec(self, *, width: int, num_classes: int, input_shape: tuple[int, ...]) -> PermutationSpec:
        """The permutation spec, in the backend's parameter names and axis convention."""
        ...

    def layers(self, *, width: int, num_classes: int, input_shape: tuple[int, ...]) -> dict[str, int]:
        """Layer index (0-based, forward order) of every parameter and buffer name."""
        ...

    def layer_names(self, *, width: int, num_classes: int, input_shape: tuple[int, ...]) -> list[str]:
        """Human-readable name of each layer index, e.g. ``["layer1", ..., "head"]``."""
        ...

    def activation_points(self, *, width: int, num_classes: int, input_shape: tuple[int, ...]) -> dict[str, str]:
        """For each permutation name, the point whose activations its units produce."""
        ...

    def to_reference(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Convert this backend's named arrays to the reference (torch) names and axes."""
        ...

    def from_reference(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inverse of :meth:`to_reference`."""
        ...


def load_object(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises
    ------
    PluginError
        If the string is malformed or the attribute does not exist.
    ImportError
        If the module cannot be imported (e.g. its framework is missing).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"expected 'package.module:attribute', got {target!r}")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{module_name!r} has no attribute {attr!r} (from {target!r})") from None
    return obj


@dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    Parameters
    ----------
    name : str
        Registry name (``"mlp"``, ``"resnet20"``).
    implementations : mapping of str to str
        Backend name to ``"module:attribute"`` of its :class:`ArchitectureImpl`.
    description : str
        One line shown by ``combinability plugins``.
    default_width : int
        Width multiplier used when the user gives none.
    paper : str
        Where the architecture is described (for docs and provenance).
    """

    name: str
    implementations: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    default_width: int = 1
    paper: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        """Names of the backends that implement this architecture."""
        return tuple(self.implementations)

    def implementation(self, backend: str) -> ArchitectureImpl:
        """Import and return the implementation for ``backend``.

        Raises
        ------
        UnknownNameError
            If this architecture has no implementation for ``backend``.
        """
        try:
            target = self.implementations[backend]
        except KeyError:
            raise UnknownNameError(
                f"architecture {self.name!r} has no implementation for backend {backend!r}; "
                f"it is implemented for: {', '.join(self.backends) or 'no backend'}"
            ) from None
        return load_object(target)
