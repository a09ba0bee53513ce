"""Plugin discovery: backends, architectures, datasets and samplers by name.

Plugins are found through the ``combinability.plugins`` entry-point group (the
built-ins too, from this project's own ``pyproject.toml``). Discovery is lazy and
cached: nothing is loaded before the first look-up, and listing names imports no
framework (a backend's framework is imported when the backend is first used).

A plugin that fails to load, or whose hook raises, becomes a :class:`RuntimeWarning`
naming it; the other plugins keep working.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from combinability import hookspecs
from combinability.architecture import Architecture
from combinability.errors import BackendUnavailableError, PluginError, UnknownNameError

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.data.registry import DatasetSpec

__all__ = [
    "plugin_manager",
    "register_plugin",
    "reset_plugins",
    "get_backend",
    "list_backends",
    "get_architecture",
    "list_architectures",
    "get_dataset_spec",
    "list_datasets",
    "get_sampler_class",
    "list_samplers",
]

#: Modules registered even when the distribution's entry points are not installed
#: (e.g. running from a source checkout); an installed entry point takes precedence.
BUILTIN_PLUGINS: dict[str, str] = {
    "torch": "combinability_torch.plugin",
    "jax": "combinability_jax.plugin",
    "zoo": "combinability.zoo",
    "datasets": "combinability.data.registry",
    "samplers": "combinability.samplers.registry",
}

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Any]] = {}
_backend_instances: dict[str, Backend] = {}


def _warn(what: str, exc: BaseException) -> None:
    warnings.warn(f"combinability plugin {what} failed and is skipped: {type(exc).__name__}: {exc}",
                  RuntimeWarning, stacklevel=3)


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and filled on first use."""
    global _manager
    with _lock:
        if _manager is not None:
            return _manager
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        loaded_values = set()
        for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if pm.has_plugin(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
                loaded_values.add(ep.value)
            except Exception as exc:  # a broken plugin must not break the library
                _warn(f"{ep.name!r} ({ep.value})", exc)
        for name, module in BUILTIN_PLUGINS.items():
            if module in loaded_values or pm.has_plugin(name):
                continue
            try:
                pm.register(importlib.import_module(module), name=name)
            except ModuleNotFoundError as exc:
                if exc.name and module.startswith(exc.name):
                    continue  # not part of this installation
                _warn(f"{name!r} ({module})", exc)
            except Exception as exc:
                _warn(f"{name!r} ({module})", exc)
        _manager = pm
        return pm


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module at run time (mostly for tests and notebooks)."""
    with _lock:
        plugin_manager().register(plugin, name=name)
        _registries.clear()


def reset_plugins() -> None:
    """Forget every discovered plugin; the next look-up rediscovers them."""
    global _manager
    with _lock:
        _manager = None
        _registries.clear()
        _backend_instances.clear()


def _collect(hook_name: str) -> list[tuple[str, Any]]:
    """Call every implementation of ``hook_name`` one by one, warning about those that raise."""
    pm = plugin_manager()
    results = []
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order
        try:
            results.append((impl.plugin_name, impl.function()))
        except Exception as exc:
            _warn(f"{impl.plugin_name!r} (hook {hook_name})", exc)
    return results


def _registry(kind: str) -> dict[str, Any]:
    with _lock:
        if kind in _registries:
            return _registries[kind]
        table: dict[str, Any] = {}
        owners: dict[str, str] = {}

        def put(key: str, value: Any, plugin: str) -> None:
            if key in table:
                warnings.warn(f"{kind[:-1]} {key!r} registered by both {owners[key]!r} and {plugin!r}; "
                              f"keeping the one from {owners[key]!r}", RuntimeWarning, stacklevel=4)
                return
            table[key] = value
            owners[key] = plugin

        if kind == "backends":
            for plugin, result in _collect("combinability_register_backends"):
                for key, value in (result or {}).items():
                    put(key, value, plugin)
        elif kind == "architectures":
            for plugin, result in _collect("combinability_register_architectures"):
                for arch in result or ():
                    if not isinstance(arch, Architecture):
                        _warn(repr(plugin), PluginError(f"registered {arch!r}, not an Architecture"))
                        continue
                    put(arch.name, arch, plugin)
        elif kind == "datasets":
            for plugin, result in _collect("combinability_register_datasets"):
                for spec in result or ():
                    put(spec.name, spec, plugin)
        elif kind == "samplers":
            for plugin, result in _collect("combinability_register_samplers"):
                for cls in result or ():
                    put(getattr(cls, "name", cls.__name__.lower()), cls, plugin)
        _registries[kind] = table
        return table


def _unknown(kind: str, name: str, table: dict[str, Any]) -> UnknownNameError:
    valid = ", ".join(sorted(table)) or "none installed"
    return UnknownNameError(f"unknown {kind} {name!r}; installed {kind}s: {valid}")


# -- backends -------------------------------------------------------------------
def list_backends() -> list[str]:
    """Names of the registered backends (imports no framework)."""
    return sorted(_registry("backends"))


def get_backend(name: str | Backend) -> Backend:
    """The backend instance registered as ``name`` (created on first use, then cached).

    Raises
    ------
    UnknownNameError
        If no plugin registers ``name``; the message lists the installed backends.
    BackendUnavailableError
        If the backend is known but its framework is not installed; the message
        names the pip extra.
    """
    if not isinstance(name, str):
        return name
    with _lock:
        if name in _backend_instances:
            return _backend_instances[name]
        table = _registry("backends")
        if name not in table:
            raise _unknown("backend", name, table)
        entry = table[name]
        factory: Callable[[], Backend]
        factory, extra = entry if isinstance(entry, tuple) else (entry, name)
        try:
            backend = factory()
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend {name!r} is registered but its framework is not installed ({exc}); "
                f"install it with: pip install 'combinability[{extra}]'"
            ) from exc
        _backend_instances[name] = backend
        return backend


# -- architectures --------------------------------------------------------------
def list_architectures() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_registry("architectures"))


def get_architecture(name: str | Architecture) -> Architecture:
    """The :class:`Architecture` registered as ``name`` (an Architecture passes through)."""
    if isinstance(name, Architecture):
        return name
    table = _registry("architectures")
    if name not in table:
        raise _unknown("architecture", name, table)
    return table[name]


# -- datasets -------------------------------------------------------------------
def list_datasets() -> list[str]:
    """Names of the registered datasets."""
    return sorted(_registry("datasets"))


def get_dataset_spec(name: str) -> DatasetSpec:
    """The dataset description registered as ``name``."""
    table = _registry("datasets")
    if name not in table:
        raise _unknown("dataset", name, table)
    return table[name]


# -- samplers -------------------------------------------------------------------
def list_samplers() -> list[str]:
    """Names of the registered coefficient samplers."""
    return sorted(_registry("samplers"))


def get_sampler_class(name: str) -> type:
    """The sampler class registered as ``name``."""
    table = _registry("samplers")
    if name not in table:
        raise _unknown("sampler", name, table)
    return table[name]
