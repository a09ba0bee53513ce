"""Recording a user's torch module as it runs on an example (:func:`concrete_trace`).

:func:`torch.fx.symbolic_trace` cannot record a ``forward`` that branches on shapes or
lengths (``if t > context:``, ``for layer in self.layers[:n]``). :class:`ConcreteTracer`
runs every node on the example as it is recorded and answers such questions with the
example's values, so the graph is the one the example follows; the stream tracer
(:mod:`combinability_torch.trace_stream`) and the layer tracer (:mod:`combinability_torch.trace`)
read the symmetries from it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from combinability.errors import TracingError
from combinability_torch.trace import other_arguments, reads_shape, refuse_computed_weights

__all__ = ["concrete_trace", "ConcreteTracer"]


#: torch's composite modules recorded through their ``forward`` (built from modules the tracers follow).
_OPENED_MODULES = (nn.TransformerEncoder, nn.TransformerEncoderLayer)

_FACTORIES = ("ones", "zeros", "full", "empty", "arange", "eye", "rand", "randn")


def concrete_trace(model: nn.Module, example_input: torch.Tensor, hint: str = "") -> fx.GraphModule:
    """``model``'s graph as it runs on ``example_input`` (:class:`ConcreteTracer`; its other
    ``forward`` arguments at their defaults), with every node's shape recorded.

    Raises
    ------
    TracingError
        Saying why torch.fx could not record or run it.
    """
    held = other_arguments(model)  # refuses a forward that needs more than its input, by name
    refuse_computed_weights(model)
    try:
        tracer = ConcreteTracer(example_input)
        gm = fx.GraphModule(model, tracer.trace(model, held))
        ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise TracingError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}") from None
    return gm


class ConcreteTracer(fx.Tracer):
    """``torch.fx`` tracing that also runs the model on an example, so ``forward`` may branch on shapes.

    Every node's value on ``example_input`` is computed as the node is recorded; when
    ``forward`` asks a traced value for a truth value (``if h % p:``, ``if t > context:``)
    the example's answer is taken, so the graph is the one the example follows — which is
    what the symmetries are derived from and verified on.
    """

    #: Buffers (a causal mask) are recorded as graph inputs, so indexing one with a traced size works.
    proxy_buffer_attributes = True

    def __init__(self, example_input: torch.Tensor) -> None:
        super().__init__()
        self.example = example_input
        self.values: dict[fx.Node, Any] = {}
        self.defaults: dict[str, Any] = {}

    def _value(self, a: Any) -> Any:
        def one(v: Any) -> Any:
            if isinstance(v, fx.Proxy):
                return self.values[v.node]
            if isinstance(v, slice):  # ``mask[:, :, :t, :t]`` with a traced size t
                return slice(*(self._value(e) for e in (v.start, v.stop, v.step)))
            return v

        return fx.node.map_aggregate(a, one)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        a, kw = self._value(args), self._value(kwargs)
        from torch.fx._symbolic_trace import _maybe_revert_all_patches  # torch pinned: run the real modules

        with torch.no_grad(), _maybe_revert_all_patches():
            if kind == "placeholder":  # the input; the other arguments are held at their defaults
                name = target if not isinstance(target, str) or target in self.defaults else \
                    target.rstrip("0123456789").removesuffix("_")  # fx numbers a held argument's placeholder
                value = self.defaults.get(name, self.example) if isinstance(name, str) else self.example
            elif kind == "get_attr":
                value = _attr(self.root, target)
            elif kind == "call_function":
                value = target(*a, **kw)
            elif kind == "call_method":
                value = getattr(a[0], target)(*a[1:], **kw)
            elif kind == "call_module":
                value = self.root.get_submodule(target)(*a, **kw)
            else:
                value = None
        self.values[proxy.node] = value
        return proxy

    def to_bool(self, obj: fx.Proxy) -> bool:
        """The example's answer to a branch on shapes; a branch on a tensor's values is refused (the
        example's way would be taken for every input)."""
        if self._reads_values(obj.node, {}):
            raise TracingError(f"forward branches on the values of a tensor (node {obj.node.name!r}): data-dependent "
                               "control flow cannot be followed")
        return bool(self.values[obj.node])

    def _reads_values(self, node: fx.Node, seen: dict[fx.Node, bool]) -> bool:
        """Whether ``node`` depends on the values (not only the shapes) of the input or the parameters."""
        if node not in seen:
            if reads_shape(node):
                seen[node] = False
            elif node.op in ("placeholder", "get_attr"):
                seen[node] = isinstance(self.values.get(node), torch.Tensor)
            else:
                seen[node] = any(self._reads_values(a, seen) for a in node.all_input_nodes)
        return seen[node]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch's modules are leaves, except the composite ones of :data:`_OPENED_MODULES`, whose
        ``forward`` is recorded (an ``nn.TransformerEncoder``'s layers, norms and attention)."""
        if isinstance(m, _OPENED_MODULES):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """Trace ``root``; tensor factories called with traced sizes (``torch.ones(t, t)``) are recorded too."""
        self.defaults = dict(concrete_args or {})
        originals = {name: getattr(torch, name) for name in _FACTORIES}

        def recorded(fn: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                found: list[fx.Proxy] = []
                fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, fx.Proxy) else v)
                return self.create_proxy("call_function", fn, args, kwargs) if found else fn(*args, **kwargs)
            return call

        none_or_dtype = F._none_or_dtype

        def dtype_of(value: Any) -> Any:  # torch's transformer layers ask a mask for its dtype this way
            return value.dtype if isinstance(value, fx.Proxy) else none_or_dtype(value)

        try:
            for name, fn in originals.items():
                setattr(torch, name, recorded(fn))
            F._none_or_dtype = dtype_of
            return super().trace(root, concrete_args)
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)
            F._none_or_dtype = none_or_dtype


#: Tensor attributes fixed by the example (a dtype, a device), read as values: ``torch.finfo(x.dtype)``.
_STATIC_ATTRIBUTES = frozenset({"dtype", "device", "layout", "is_cuda", "is_floating_point", "ndim", "is_nested",
                                "is_sparse", "is_quantized"})


class _ConcreteProxy(fx.Proxy):
    """A proxy whose static attributes (:data:`_STATIC_ATTRIBUTES`) and length are the example's values,
    and which iterates over its items (``len(past)``, ``for layer in outputs``)."""

    def _example(self) -> Any:
        return self.tracer.values.get(self.node)  # type: ignore[attr-defined]

    def __getattr__(self, k: str) -> Any:
        if k in _STATIC_ATTRIBUTES and isinstance(self._example(), torch.Tensor):
            return getattr(self._example(), k)
        if k == "shape" and isinstance(self._example(), torch.Tensor):  # a node at once, with its value
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return super().__getattr__(k)

    def __setitem__(self, key: Any, value: Any) -> None:
        """``out[rows] = y`` (and ``out[rows] += y``): recorded as ``operator.setitem``, run on the example."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        value = self._example()
        if value is None or not hasattr(value, "__len__"):
            return super().__len__()
        return len(value)

    def __iter__(self) -> Any:
        value = self._example()
        if value is None or not hasattr(value, "__len__"):
            return super().__iter__()
        return iter([self[i] for i in range(len(value))])


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
