"""Architectures as plugins: a name and a layer table, optionally a builder per backend.

An :class:`Architecture` is a small frozen value registered through the
``combinability_register_architectures`` hook. It names a *table function*
``table(width=..., num_classes=..., input_shape=...) -> LayerTable`` (framework-free,
see :mod:`combinability.layers`); every backend builds the network from that table with
its generic builder. An architecture whose nodes need more than the table's operations
may also name, per backend, a builder ``builder(table, seed) -> native model`` whose
state has the table's parameter names and shapes.

An architecture may instead have no table and name, per backend, a *module factory*
``factory(width=..., num_classes=..., input_shape=..., seed=...) -> native model``: a model
written in the framework's own terms (a transformer, say), whose parameter names are the
backend's own and whose symmetries are traced from an example input, as for a user's
module. Such models train, save and load through :func:`combinability.train` like the
others; a checkpoint loads into the backend that wrote it. Targets are
``"module:attribute"`` strings imported only when first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from combinability.errors import ConfigurationError, PluginError

if TYPE_CHECKING:
    from combinability.layers import LayerTable
    from combinability.training import TrainRecipe

__all__ = ["Architecture", "load_object"]


def load_object(target: str | Callable) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute (a callable passes through).

    Raises
    ------
    PluginError
        If the string is malformed or the attribute does not exist.
    ImportError
        If the module cannot be imported (e.g. its framework is missing).
    """
    if callable(target):
        return target
    module_name, sep, attr = str(target).partition(":")
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
    table : str or callable, optional
        ``"module:function"`` (or the function) returning the :class:`~combinability.layers.LayerTable`
        for keywords ``width``, ``num_classes`` and ``input_shape`` (channels-first). None for an
        architecture built by ``modules``.
    description : str
        One line shown by ``combinability plugins``.
    default_width : float
        Width multiplier used when the user gives none.
    paper : str
        Where the architecture is described (for docs and provenance).
    builders : mapping of str to str, optional
        Backend name to ``"module:function"`` of a custom ``builder(table, seed)``; backends
        not named use their generic table builder.
    modules : mapping of str to str, optional
        For an architecture without a table: backend name to ``"module:function"`` of a
        ``factory(width=, num_classes=, input_shape=, seed=)`` returning a freshly initialised
        native model (seeded, the global random state untouched).
    recipe : TrainRecipe, optional
        How :func:`combinability.train` trains it when the caller gives no recipe (default: the
        library's recipe for the name, else a plain :class:`~combinability.training.TrainRecipe`).

    Raises
    ------
    PluginError
        If it has both or neither of ``table`` and ``modules``.
    """

    name: str
    table: str | Callable[..., LayerTable] | None = None
    description: str = ""
    default_width: float = 1
    paper: str = ""
    builders: Mapping[str, str] = field(default_factory=dict)
    modules: Mapping[str, str] = field(default_factory=dict)
    recipe: TrainRecipe | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (not self.modules):
            raise PluginError(f"architecture {self.name!r} needs either a table function (table=) or module "
                              f"factories per backend (modules=), not {'both' if self.modules else 'neither'}")

    @property
    def has_table(self) -> bool:
        """Whether its models are described by a layer table (else built by a module factory)."""
        return self.table is not None

    def layer_table(self, *, width: float | None = None, num_classes: int, input_shape: tuple[int, ...]) -> LayerTable:
        """The layer table of this architecture for one configuration.

        Raises
        ------
        ConfigurationError
            If the configuration is invalid (e.g. an image network given a vector shape).
        PluginError
            If the table function does not return a LayerTable.
        """
        from combinability.layers import LayerTable

        if self.table is None:
            raise ConfigurationError(
                f"architecture {self.name!r} has no layer table: its models are built by a module factory "
                f"({', '.join(sorted(self.modules))}) and their symmetries are traced; pass example_input= to "
                "cb.ModelPair instead of relying on a table")
        width = self.default_width if width is None else width
        if int(num_classes) < 1:
            raise ConfigurationError(f"num_classes must be >= 1, got {num_classes!r}")
        shape = tuple(int(s) for s in input_shape)
        table = load_object(self.table)(width=width, num_classes=int(num_classes), input_shape=shape)
        if not isinstance(table, LayerTable):
            raise PluginError(f"architecture {self.name!r}: its table function returned {type(table).__name__}, "
                              "not a combinability.layers.LayerTable")
        config = {"architecture": self.name, "width": width, "num_classes": int(num_classes), "input_shape": shape}
        object.__setattr__(table, "config", config)
        return table

    def builder(self, backend: str) -> Callable | None:
        """The custom builder for ``backend``, or None to use the backend's generic one."""
        target = self.builders.get(backend)
        return None if target is None else load_object(target)

    def factory(self, backend: str) -> Callable[..., Any]:
        """The module factory for ``backend`` (architectures without a table).

        Raises
        ------
        ConfigurationError
            If the architecture has a table, or no factory for ``backend`` (the message lists those it has).
        """
        if not self.modules:
            raise ConfigurationError(f"architecture {self.name!r} is built from its layer table, not a module factory")
        if backend not in self.modules:
            raise ConfigurationError(f"architecture {self.name!r} has no model for backend {backend!r}; it has "
                                     f"models for: {', '.join(sorted(self.modules))}")
        return load_object(self.modules[backend])
