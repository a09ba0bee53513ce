"""Plugin discovery: backends, architectures, datasets, samplers, aligners, repairs and metrics by name.

Plugins are found through the ``combinability.plugins`` entry-point group (the
built-ins too, from this project's own ``pyproject.toml``). Discovery is lazy and
cached: nothing is loaded before the first look-up, and listing names imports no
framework (a backend's framework is imported when the backend is first used, an
aligner's module when the aligner is first used).

Hooks are called through pluggy (``pm.hook.combinability_register_...()``). A plugin
that fails to load, whose hook raises, or whose hook returns a value of the wrong type
becomes a :class:`RuntimeWarning` naming it; the other plugins keep working. A plugin
cannot hide a built-in (a module of :data:`BUILTIN_PLUGINS`): when it registers a
built-in's name, the built-in is kept and a warning names both plugins. Between two
third-party plugins, the first registered wins (with a warning).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from combinability import hookspecs
from combinability.architecture import Architecture
from combinability.errors import BackendUnavailableError, PluginError, UnknownNameError
from combinability.hookspecs import Registration

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.data.registry import DatasetSpec

__all__ = [
    "BUILTIN_PLUGINS",
    "KINDS",
    "Registration",
    "plugin_manager",
    "register_plugin",
    "reset_plugins",
    "list_plugins",
    "get_registration",
    "get_backend",
    "use_device",
    "set_backend",
    "list_backends",
    "get_architecture",
    "list_architectures",
    "get_dataset_spec",
    "list_datasets",
    "get_sampler_class",
    "list_samplers",
    "get_aligner",
    "list_aligners",
    "SYMMETRY_KINDS",
    "AlignerRegistration",
    "aligner_kinds",
    "get_repair",
    "list_repairs",
    "get_metric",
    "list_metrics",
]

#: This project's own plugin modules, registered even when the distribution's entry points
#: are not installed (e.g. running from a source checkout). Their registrations cannot be
#: hidden by another plugin, whatever order the plugins load in.
BUILTIN_PLUGINS: dict[str, str] = {
    "torch": "combinability_torch.plugin",
    "jax": "combinability_jax.plugin",
    "zoo": "combinability.zoo",
    "transformers": "combinability.transformer_zoo",
    "datasets": "combinability.data.registry",
    "samplers": "combinability.samplers.registry",
    "aligners": "combinability.align.registry",
    "metrics": "combinability.evaluation",
    "repairs": "combinability.repairs.registry",
}

#: Plugin kinds and the hook that registers each.
KINDS: dict[str, str] = {
    "backends": "combinability_register_backends",
    "architectures": "combinability_register_architectures",
    "datasets": "combinability_register_datasets",
    "samplers": "combinability_register_samplers",
    "aligners": "combinability_register_aligners",
    "repairs": "combinability_register_repairs",
    "metrics": "combinability_register_metrics",
}

#: The kinds whose hooks return :class:`Registration` values.
_REGISTRATION_KINDS = ("aligners", "repairs", "metrics")

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Any]] = {}
_owners: dict[str, dict[str, str]] = {}
_backend_instances: dict[str, Backend] = {}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def _warning(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())


def _warn(what: str, exc: BaseException) -> None:
    _warning(f"combinability plugin {what} failed and is skipped: {type(exc).__name__}: {exc}")


def _warn_plugin(plugin: str, hook: str, message: str) -> None:
    _warning(f"combinability plugin {plugin!r} (hook {hook}) {message}")


def _is_builtin(plugin: object) -> bool:
    """Whether ``plugin`` is one of this project's own plugin modules."""
    return isinstance(plugin, ModuleType) and plugin.__name__ in BUILTIN_PLUGINS.values()


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and filled on first use.

    The built-in modules of :data:`BUILTIN_PLUGINS` are registered first, then the
    other installed entry points of the ``combinability.plugins`` group.
    """
    global _manager
    with _lock:
        if _manager is not None:
            return _manager
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for name, module in BUILTIN_PLUGINS.items():
            try:
                pm.register(importlib.import_module(module), name=name)
            except ModuleNotFoundError as exc:
                if exc.name and module.startswith(exc.name):
                    continue  # not part of this installation
                _warn(f"{name!r} ({module})", exc)
            except Exception as exc:  # a broken plugin must not break the library
                _warn(f"{name!r} ({module})", exc)
        builtin_modules = set(BUILTIN_PLUGINS.values())
        for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if ep.value in builtin_modules:
                continue  # registered above
            try:
                plugin = ep.load()
                # a name taken by another plugin (e.g. a built-in's) is kept apart under the entry point's value
                name = ep.name if not pm.has_plugin(ep.name) else ep.value
                if pm.is_registered(plugin) or pm.has_plugin(name):
                    continue  # the same distribution seen twice on the path
                pm.register(plugin, name=name)
            except Exception as exc:
                _warn(f"{ep.name!r} ({ep.value})", exc)
        _manager = pm
        return pm


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module at run time (mostly for tests and notebooks).

    It ranks after every plugin already registered: it cannot hide a built-in, nor a
    name another plugin registered before it.
    """
    with _lock:
        plugin_manager().register(plugin, name=name)
        _registries.clear()
        _owners.clear()


def reset_plugins() -> None:
    """Forget every discovered plugin; the next look-up rediscovers them."""
    global _manager
    with _lock:
        _manager = None
        _registries.clear()
        _owners.clear()
        _backend_instances.clear()


# -- calling the hooks ------------------------------------------------------------
def _call_each(pm: pluggy.PluginManager, hook_name: str, impls: list[Any]) -> list[tuple[Any, Any]]:
    """Call each plugin's implementation alone (pluggy subset callers); one that raises is a warning."""
    plugins = [impl.plugin for impl in impls]
    out = []
    for impl in impls:
        caller = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in plugins if p is not impl.plugin])
        try:
            results = caller()
        except Exception as exc:
            _warn(f"{impl.plugin_name!r} (hook {hook_name})", exc)
            continue
        out.append((impl, results[0] if results else None))
    return out


def _call_hook(hook_name: str) -> list[tuple[str, bool, Any]]:
    """``(plugin name, is built-in, result)`` of every implementation of ``hook_name``.

    The hook is called once through pluggy. When that raises (one plugin is broken), or
    when its results cannot be told apart (pluggy drops ``None`` results), each plugin is
    called alone, and the ones that raise become warnings. The results are ordered
    built-ins first, then by registration order, so that the first of a name wins.
    """
    pm = plugin_manager()
    caller = getattr(pm.hook, hook_name)
    impls = [impl for impl in caller.get_hookimpls()
             if not (impl.hookwrapper or getattr(impl, "wrapper", False))]
    called = list(reversed(impls))  # pluggy calls the last registered first
    try:
        results: list[Any] | None = caller()
    except Exception:
        results = None  # one plugin is broken: find it by calling each alone
    if results is not None and len(results) == len(called):
        pairs = list(zip(called, results, strict=True))
    else:
        pairs = _call_each(pm, hook_name, called)
    rank = {name: i for i, (name, _) in enumerate(pm.list_name_plugin())}
    pairs.sort(key=lambda pair: (not _is_builtin(pair[0].plugin), rank.get(pair[0].plugin_name, len(rank))))
    return [(impl.plugin_name, _is_builtin(impl.plugin), result) for impl, result in pairs]


# -- checking what the hooks return --------------------------------------------------
def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 63 else text} ({type(value).__name__})"


def _backend_entries(plugin: str, hook: str, result: Any) -> Iterable[tuple[str, Any]]:
    if not isinstance(result, Mapping):
        _warn_plugin(plugin, hook, f"returned {_describe(result)}; expected a dict {{name: (factory, extra)}}; "
                                   "ignored")
        return
    for key, entry in result.items():
        factory, extra = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, key)
        if not isinstance(key, str) or not callable(factory) or not isinstance(extra, str):
            _warn_plugin(plugin, hook, f"registered backend {key!r}: {_describe(entry)}; expected "
                                       "(factory, extra) with a callable factory and a str extra; skipped")
            continue
        yield key, (factory, extra)


def _item_name(kind: str, item: Any) -> str | None:
    """The registry name of one registered item, or ``None`` if it has the wrong type."""
    if kind == "architectures":
        return item.name if isinstance(item, Architecture) else None
    if kind == "datasets":  # a DatasetSpec, duck-typed so that listing imports no data module
        name = getattr(item, "name", None)
        return name if hasattr(item, "loader") else None
    if kind == "samplers":
        return getattr(item, "name", item.__name__.lower()) if isinstance(item, type) else None
    if isinstance(item, Registration) and (isinstance(item.target, str) or callable(item.target)):
        return item.name
    return None


_EXPECTED = {
    "architectures": "a combinability.Architecture",
    "datasets": "a combinability.data.DatasetSpec",
    "samplers": "a sampler class",
    "aligners": "a combinability.hookspecs.Registration whose target is a 'module:callable' string or a callable",
    "repairs": "a combinability.hookspecs.Registration whose target is a 'module:callable' string or a callable",
    "metrics": "a combinability.hookspecs.Registration whose target is a 'module:callable' string or a callable",
}


def _entries(kind: str, plugin: str, result: Any) -> Iterable[tuple[str, Any]]:
    """The ``(name, value)`` pairs of one plugin's hook result; anything malformed is a warning."""
    hook = KINDS[kind]
    if result is None:
        return
    if kind == "backends":
        yield from _backend_entries(plugin, hook, result)
        return
    if isinstance(result, str | bytes | Mapping) or not isinstance(result, Iterable):
        _warn_plugin(plugin, hook, f"returned {_describe(result)}; expected a list, each item {_EXPECTED[kind]}; "
                                   "ignored")
        return
    for item in result:
        name = _item_name(kind, item)
        if isinstance(item, Registration) and name is None:
            _warn_plugin(plugin, hook, f"registered {kind[:-1]} {item.name!r} with target {_describe(item.target)}; "
                                       "expected a 'module:callable' string or a callable; skipped")
            continue
        if not isinstance(name, str) or not name:
            _warn_plugin(plugin, hook, f"registered {_describe(item)}; expected {_EXPECTED[kind]}; skipped")
            continue
        yield name, item


def _kind(kind: str) -> str:
    """Normalise ``"aligner"`` / ``"aligners"`` to the registry's plural kind."""
    plural = kind if kind.endswith("s") else kind + "s"
    if plural not in KINDS:
        raise UnknownNameError(f"unknown plugin kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return plural


def _registry(kind: str) -> dict[str, Any]:
    with _lock:
        if kind in _registries:
            return _registries[kind]
        table: dict[str, Any] = {}
        owners: dict[str, str] = {}
        builtin: set[str] = set()
        for plugin, is_builtin, result in _call_hook(KINDS[kind]):
            for key, value in _entries(kind, plugin, result):
                if key in table:
                    first = owners[key]
                    which = f"the built-in from {first!r}" if key in builtin else f"the one from {first!r}"
                    _warning(f"{kind[:-1]} {key!r} registered by both {first!r} and {plugin!r}; keeping {which}")
                    continue
                table[key] = value
                owners[key] = plugin
                if is_builtin:
                    builtin.add(key)
        _registries[kind] = table
        _owners[kind] = owners
        return table


def _unknown(kind: str, name: str, table: dict[str, Any]) -> UnknownNameError:
    valid = ", ".join(sorted(table)) or "none installed"
    return UnknownNameError(f"unknown {kind} {name!r}; installed {kind}s: {valid}")


# -- any kind -----------------------------------------------------------------------
def list_plugins(kind: str) -> list[str]:
    """Names registered for ``kind`` (``"backends"``, ..., ``"aligners"``, ``"repairs"``, ``"metrics"``).

    Imports no framework and none of the registered callables.

    Raises
    ------
    UnknownNameError
        If ``kind`` is not one of :data:`KINDS` (singular forms are accepted too).
    """
    return sorted(_registry(_kind(kind)))


def get_registration(kind: str, name: str) -> Registration:
    """The :class:`Registration` of the aligner, repair or metric ``name`` (its target not imported).

    Parameters
    ----------
    kind : {"aligners", "repairs", "metrics"}
        Singular forms (``"aligner"``) are accepted too.
    name : str

    Raises
    ------
    UnknownNameError
        If ``kind`` is not a kind registered by :class:`Registration` values, or no
        plugin registers ``name``; the message lists the valid kinds or installed names.
    """
    kind = _kind(kind)
    if kind not in _REGISTRATION_KINDS:
        raise UnknownNameError(f"plugin kind {kind!r} is not registered by Registration values; "
                               f"valid kinds: {', '.join(_REGISTRATION_KINDS)} (use get_backend, ... for the others)")
    table = _registry(kind)
    if name not in table:
        raise _unknown(kind[:-1], name, table)
    return table[name]


def _load_callable(kind: str, name: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(name) and not isinstance(name, str):
        return name
    reg = get_registration(kind, name)
    owner = _owners.get(kind, {}).get(name, "?")
    try:
        obj = reg.load()
    except BackendUnavailableError:
        raise
    except PluginError as exc:
        raise PluginError(f"{kind[:-1]} {name!r} of plugin {owner!r}: {exc}") from exc
    if not callable(obj):
        raise PluginError(f"{kind[:-1]} {name!r} of plugin {owner!r}: {reg.target!r} is {_describe(obj)}, "
                          "not a callable")
    return obj


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
        factory: Callable[[], Backend]
        factory, extra = table[name]
        try:
            backend = factory()
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend {name!r} is registered but its framework is not installed ({exc}); "
                f"install it with: pip install 'combinability[{extra}]'"
            ) from exc
        _backend_instances[name] = backend
        return backend


def use_device(name: str, device: str | None) -> Backend:
    """Make :func:`get_backend` return backend ``name`` on ``device`` from now on; return it.

    ``device=None`` keeps the backend's default (CUDA when available, else the CPU).
    Returns the backend in use, so a caller can put the previous one back with
    :func:`set_backend`.

    Raises
    ------
    ConfigurationError
        If the device is not available to the backend; the message lists the valid ones.
    """
    backend = get_backend(name)
    if device is None:
        return backend
    moved = backend.on_device(device)
    set_backend(name, moved)
    return moved


def set_backend(name: str, backend: Backend) -> None:
    """Make :func:`get_backend(name) <get_backend>` return ``backend`` (an instance of a registered backend)."""
    with _lock:
        _backend_instances[name] = backend


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


# -- aligners, repairs, metrics ----------------------------------------------------
def list_aligners() -> list[str]:
    """Names of the registered aligners (imports none of them)."""
    return sorted(_registry("aligners"))


def get_aligner(name: str | Callable[..., Any]) -> Callable[..., Any]:
    """The aligner registered as ``name``, imported on first use (a callable passes through).

    An aligner is ``aligner(task, **options) -> Permutation``; see
    :func:`combinability.align.align`, which also checks what it returns.

    Raises
    ------
    UnknownNameError
        If no plugin registers ``name``; the message lists the installed aligners.
    PluginError
        If the registration's target cannot be found or is not callable.
    BackendUnavailableError
        If its module needs a framework that is not installed (names the pip extra).
    """
    return _load_callable("aligners", name)


#: The symmetry kinds an aligner may declare it handles (:class:`AlignerRegistration`): plain neuron
#: permutations, block permutations (attention heads, experts), orthogonal maps (a residual stream) and
#: packed axes (segments of one axis that move separately, e.g. stacked query/key/value rows or
#: concatenated channels) and invertible maps inside attention heads (``symmetries="invertible"``).
SYMMETRY_KINDS: tuple[str, ...] = ("neuron", "blocks", "orthogonal", "packed", "invertible")


@dataclass(frozen=True)
class AlignerRegistration(Registration):
    """The :class:`Registration` of an aligner that declares which symmetry kinds it handles.

    Parameters
    ----------
    kinds : tuple of str
        A subset of :data:`SYMMETRY_KINDS`. :func:`combinability.align.align` refuses, before
        any work, a spec with a kind the aligner does not list. A plain :class:`Registration`
        (any plugin's aligner that declares nothing) handles ``("neuron",)`` only.
    acts_on : tuple of str
        Kinds of which a spec must have one for the aligner to have work (``"maps"``, which
        trains the continuous maps: ``("orthogonal", "invertible")``); empty: any spec.
    reads_points : bool
        Whether the aligner reads each transformation's units at its feature point
        (activation matching): it then handles block permutations only where each has one
        (a GroupNorm's groups, not attention heads), and is refused before any work otherwise.

    Examples
    --------
    >>> reg = AlignerRegistration("any", "combinability.align.builtin:weight", kinds=SYMMETRY_KINDS)
    >>> sorted(aligner_kinds(reg))
    ['blocks', 'invertible', 'neuron', 'orthogonal', 'packed']
    >>> sorted(aligner_kinds(Registration("plain", "combinability.align.builtin:weight")))
    ['neuron']
    """

    kinds: tuple[str, ...] = ("neuron",)
    reads_points: bool = False
    acts_on: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        unknown = [k for k in kinds if k not in SYMMETRY_KINDS]
        if unknown or "neuron" not in kinds:
            raise PluginError(f"aligner {self.name!r}: kinds must include 'neuron' and be among "
                              f"{', '.join(SYMMETRY_KINDS)}; got {self.kinds!r}")
        acts_on = (self.acts_on,) if isinstance(self.acts_on, str) else tuple(self.acts_on)
        if any(k not in kinds for k in acts_on):
            raise PluginError(f"aligner {self.name!r}: acts_on must be among its kinds {kinds}; got {self.acts_on!r}")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "acts_on", acts_on)


def aligner_kinds(aligner: str | Registration | Callable[..., Any]) -> frozenset[str]:
    """The symmetry kinds an aligner handles (see :data:`SYMMETRY_KINDS`).

    Read off its :class:`AlignerRegistration` (by name or given), or, for a callable passed
    as it is, off its ``kinds`` attribute; anything that declares nothing handles neuron
    permutations only. Imports no aligner.
    """
    if isinstance(aligner, str):
        aligner = get_registration("aligners", aligner)
    declared = getattr(aligner, "kinds", ("neuron",))
    if isinstance(declared, str):
        declared = (declared,)
    try:
        kinds = frozenset(declared) & frozenset(SYMMETRY_KINDS)
    except TypeError:  # a callable whose ``kinds`` attribute is something else
        return frozenset({"neuron"})
    return kinds | {"neuron"}


def list_repairs() -> list[str]:
    """Names of the registered repairs (imports none of them)."""
    return sorted(_registry("repairs"))


def get_repair(name: str | Callable[..., Any]) -> Callable[..., Any]:
    """The repair registered as ``name``: ``repair(theta, context) -> theta`` (a callable passes through).

    Raises as :func:`get_aligner` does.
    """
    return _load_callable("repairs", name)


def list_metrics() -> list[str]:
    """Names of the registered metrics (imports none of them)."""
    return sorted(_registry("metrics"))


def get_metric(name: str | Callable[..., Any]) -> Callable[..., Any]:
    """The metric registered as ``name`` (see :mod:`combinability.evaluation` for the metric protocol).

    Raises as :func:`get_aligner` does.
    """
    return _load_callable("metrics", name)
