"""Architectures as plugins: a name and a layer table, optionally a builder per backend.

An :class:`Architecture` is a small frozen value registered through the
``combinability_register_architectures`` hook. It names a *table function*
``table(width=..., num_classes=..., input_shape=...) -> LayerTable`` (framework-free,
see :mod:`combinability.layers`); every backend builds the network from that table with
its generic builder. An architecture whose nodes need more than the table's operations
may also name, per backend, a builder ``builder(table, seed) -> native model`` whose
state has the table's parameter names and shapes. Targets are ``"module:attribute"``
strings imported only when first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from combinability.errors import ConfigurationError, PluginError

if TYPE_CHECKING:
    from combinability.layers import LayerTable

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
    table : str or callable
        ``"module:function"`` (or the function) returning the :class:`~combinability.layers.LayerTable`
        for keywords ``width``, ``num_classes`` and ``input_shape`` (channels-first).
    description : str
        One line shown by ``combinability plugins``.
    default_width : float
        Width multiplier used when the user gives none.
    paper : str
        Where the architecture is described (for docs and provenance).
    builders : mapping of str to str, optional
        Backend name to ``"module:function"`` of a custom ``builder(table, seed)``; backends
        not named use their generic table builder.
    """

    name: str
    table: str | Callable[..., LayerTable]
    description: str = ""
    default_width: float = 1
    paper: str = ""
    builders: Mapping[str, str] = field(default_factory=dict)

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
