"""Flax NNX models in the jax backend: an ``nnx.Module`` seen as a linen ``(module, variables)`` pair.

The backend and its tracers speak linen: ``module.apply(variables, x)``, variables as
``{"params": ..., "batch_stats": ...}`` trees, method interceptors naming each call of a
``Dense``, ``Conv`` or norm by its path. :func:`from_nnx` gives an NNX model that shape,
without copying its arrays:

* its ``nnx.Param`` and ``nnx.BatchStat`` variables become the ``params`` and
  ``batch_stats`` collections, keyed by their NNX paths (``layers/0/kernel``: list
  indices as strings). NNX's leaves are named as linen's (``kernel``, ``bias``,
  ``scale``, ``mean``, ``var``, ``embedding``), so these are the names a linen model of
  the same layers would have. Other variables (``Rngs`` keys and counts, caches) stay
  constants of the computation;
* :class:`NnxModule`, a linen module, rebuilds the NNX model from those variables
  (``nnx.merge``) at every call, in ``eval()`` mode or, with ``train=True``, in
  ``train()`` mode, its rng streams reseeded from the call's ``"dropout"`` rng when one is
  given (a training step's), writing BatchNorm's updated statistics back when
  ``batch_stats`` is mutable;
* during its call, each submodule's ``__call__`` is seen by the interceptor of
  :func:`intercepting` (the tracers' linen interceptor) with a context naming its path,
  and a ``Linear``, ``Conv``, ``ConvTranspose``, ``BatchNorm``, ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``InstanceNorm`` or ``Embed`` presented as the linen module
  of the same settings (:func:`linen_twin`); its output is sown as linen's
  ``capture_intermediates`` would (feature points ``layers/0``).

:func:`to_nnx` turns a model of the library (an aligned or combined one) back into an
NNX module.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

__all__ = ["NnxCall", "NnxModule", "call_path", "from_nnx", "intercepting", "is_nnx", "linen_twin", "to_nnx"]

#: NNX variable types that are the model's state, and their linen collection.
COLLECTIONS: tuple[tuple[type, str], ...] = ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats"))

_INTERCEPTOR: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("nnx_interceptor", default=None)


def is_nnx(model: Any) -> bool:
    """Whether ``model`` is a flax NNX module."""
    return isinstance(model, nnx.Module)


@dataclass(frozen=True)
class NnxCall:
    """What a linen interceptor is given for one call of an NNX submodule.

    ``module`` is :func:`linen_twin` of the submodule (a linen module of the same
    settings) or, for any other module, the NNX module itself; ``path`` its path of
    strings (``("layers", "0")``).
    """

    module: Any
    path: tuple[str, ...]
    method_name: str = "__call__"


def call_path(context: Any) -> tuple[str, ...]:
    """The module path of an interceptor's ``context``: a linen call's or an :class:`NnxCall`'s."""
    return context.path if isinstance(context, NnxCall) else tuple(context.module.path)


@contextlib.contextmanager
def intercepting(interceptor: Callable) -> Iterator[None]:
    """Show the submodule calls of every :class:`NnxModule` run inside to ``interceptor``
    (called as a linen interceptor: ``(next_fun, args, kwargs, context)``)."""
    token = _INTERCEPTOR.set(interceptor)
    try:
        yield
    finally:
        _INTERCEPTOR.reset(token)


def linen_twin(m: Any) -> nn.Module | None:
    """The (unbound) linen module computing as the NNX leaf ``m``, or None for any other module.

    Only its settings are read (by the tracers); its parameters are ``m``'s, under the same
    names.
    """
    if isinstance(m, nnx.Linear):
        return nn.Dense(features=m.out_features, use_bias=m.use_bias, parent=None)
    if isinstance(m, nnx.Conv):
        if getattr(m, "mask", None) is not None:
            return None
        return nn.Conv(features=m.out_features, kernel_size=m.kernel_size, strides=m.strides, padding=m.padding,
                       input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
                       feature_group_count=m.feature_group_count, use_bias=m.use_bias, parent=None)
    if isinstance(m, nnx.ConvTranspose):
        if getattr(m, "mask", None) is not None:
            return None
        return nn.ConvTranspose(features=m.out_features, kernel_size=m.kernel_size, strides=m.strides,
                                padding=m.padding, kernel_dilation=m.kernel_dilation, use_bias=m.use_bias,
                                transpose_kernel=m.transpose_kernel, parent=None)
    if isinstance(m, nnx.BatchNorm):
        return nn.BatchNorm(use_running_average=m.use_running_average, axis=m.axis, momentum=m.momentum,
                            epsilon=m.epsilon, use_bias=m.use_bias, use_scale=m.use_scale, parent=None)
    if isinstance(m, nnx.LayerNorm):
        return nn.LayerNorm(epsilon=m.epsilon, use_bias=m.use_bias, use_scale=m.use_scale,
                            reduction_axes=m.reduction_axes, feature_axes=m.feature_axes, parent=None)
    if isinstance(m, nnx.RMSNorm):
        return nn.RMSNorm(epsilon=m.epsilon, use_scale=m.use_scale, reduction_axes=m.reduction_axes,
                          feature_axes=m.feature_axes, parent=None)
    if isinstance(m, nnx.GroupNorm):
        return nn.GroupNorm(num_groups=m.num_groups, group_size=None if m.num_groups else m.group_size,
                            epsilon=m.epsilon, use_bias=m.use_bias, use_scale=m.use_scale,
                            reduction_axes=m.reduction_axes, parent=None)
    if isinstance(m, nnx.InstanceNorm):
        return nn.InstanceNorm(epsilon=m.epsilon, use_bias=m.use_bias, use_scale=m.use_scale,
                               feature_axes=m.feature_axes, parent=None)
    if isinstance(m, nnx.Embed):
        return nn.Embed(num_embeddings=m.num_embeddings, features=m.features, parent=None)
    return None


def _key(path: tuple) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


class NnxModule(nn.Module):
    """A linen module running an NNX model rebuilt from its variables (see the module's docstring).

    Attributes
    ----------
    graphdef : nnx.GraphDef
        The NNX model's structure and settings.
    template : tuple
        ``(collection, NNX path, abstract Variable)`` of each state variable, in order.
    others : nnx.State
        The variables that are not state (rng keys and counts, caches), as constants.
    """

    graphdef: Any
    template: tuple
    others: Any

    def merged(self, variables: Mapping[str, Any]) -> nnx.Module:
        """The NNX model holding ``variables`` (linen collections of string-keyed trees)."""
        flat = []
        for collection, path, var in self.template:
            value = variables[collection]
            for k in _key(path):
                value = value[k]
            flat.append((path, var.replace(value)))
        others = jax.tree_util.tree_map(lambda a: a, self.others)  # fresh Variables: the call may write to them
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat), others)

    def __call__(self, x: Any, train: bool = False) -> Any:
        model = self.merged(self.variables)
        if train:
            model.train()
            if self.has_rng("dropout"):  # a training step's key (else the model's own, the same every step)
                key = self.make_rng("dropout")
                nnx.reseed(model, default=key, dropout=key)
        else:
            model.eval()
        with _watched(model, self):
            out = model(x)
        if train and self.is_mutable_collection("batch_stats"):
            stats: dict[str, Any] = {}
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
                *outer, leaf = _key(path)
                node = stats
                for k in outer:
                    node = node.setdefault(k, {})
                node[leaf] = var.get_value()
            for name, tree in stats.items():
                self.put_variable("batch_stats", name, tree)
        return out


#: Held while classes are patched: traces in other threads wait (a patch saved by one and restored by
#: another would stay).
_PATCHING = threading.RLock()


@contextlib.contextmanager
def _watched(model: nnx.Module, wrapper: NnxModule) -> Iterator[None]:
    """Every submodule call of ``model`` under the active interceptor, and sown as an intermediate.

    Python looks a call up on the class, not the instance, so the classes of ``model``'s
    submodules get a patched ``__call__`` for the duration (only while jax traces: a compiled
    function never runs this again), which passes the call on unchanged for any other instance.
    """
    paths = {id(m): _key(p) for p, m in nnx.iter_modules(model) if p}
    classes = {type(m) for p, m in nnx.iter_modules(model) if p}
    # classes that define a call (an ``nnx.List`` does not: ``cls.__call__`` would be its metaclass's)
    originals = {cls: cls.__call__ for cls in classes if any("__call__" in k.__dict__ for k in cls.__mro__[:-1])}
    own = {cls: cls.__dict__.get("__call__") for cls in originals}
    active: set[int] = set()

    def patched(original: Callable) -> Callable:
        def call(inst: Any, *args: Any, **kwargs: Any) -> Any:
            path = paths.get(id(inst))
            if path is None or id(inst) in active:  # not a submodule, or a subclass's call reaching its base's
                return original(inst, *args, **kwargs)
            active.add(id(inst))
            try:
                interceptor = _INTERCEPTOR.get()

                def next_fun(*a: Any, **k: Any) -> Any:
                    return original(inst, *a, **k)

                if interceptor is None:
                    out = next_fun(*args, **kwargs)
                else:
                    out = interceptor(next_fun, args, kwargs, NnxCall(linen_twin(inst) or inst, path))
            finally:
                active.discard(id(inst))
            if wrapper.is_mutable_collection("intermediates"):
                wrapper.sow("intermediates", "/".join(path) + "/__call__", out)
            return out

        return call

    done: list[type] = []
    with _PATCHING:
        try:
            for cls, original in originals.items():
                cls.__call__ = patched(original)
                done.append(cls)
            yield
        finally:
            for cls in done:
                if own[cls] is None:
                    del cls.__call__
                else:
                    cls.__call__ = own[cls]


#: The linen class standing for each NNX model class (its name in messages and tables).
_CLASSES: dict[type, type] = {}
#: Conversions of live NNX models, with the arrays they were made from.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linen_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (NnxModule,), {"__qualname__": cls.__qualname__,
                                                           "__module__": cls.__module__})
    return _CLASSES[cls]


def from_nnx(model: nnx.Module) -> tuple[NnxModule, dict[str, Any]]:
    """``(module, variables)``: ``model`` as a linen module and its state as linen variables.

    The same model (same arrays) gives the same pair, so that what the backend compiles
    for it is reused.
    """
    graphdef, *states, others = nnx.split(model, *(t for t, _ in COLLECTIONS), ...)
    stamp = tuple(id(v) for s in states for v in jax.tree_util.tree_leaves(s))
    cached = _CONVERTED.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    template, variables = [], {}
    for (_, collection), state in zip(COLLECTIONS, states, strict=True):
        for path, var in nnx.to_flat_state(state):
            value = var.get_value()
            template.append((collection, path, var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype))))
            node = variables.setdefault(collection, {})
            *outer, leaf = _key(path)
            for k in outer:
                node = node.setdefault(k, {})
            node[leaf] = value
    pair = (_linen_class(type(model))(graphdef, tuple(template), others), variables)
    _CONVERTED[model] = (stamp, pair)
    return pair


def to_nnx(module: NnxModule, variables: Mapping[str, Any]) -> nnx.Module:
    """The NNX model of a converted ``module`` holding ``variables`` (e.g. an aligned or combined model's)."""
    if not isinstance(module, NnxModule):
        raise TypeError(f"{type(module).__name__} is a linen module, not a converted NNX model")
    return module.merged(variables)
