"""Recording a user's torch module as it runs on an example (:func:`concrete_trace`).

:func:`torch.fx.symbolic_trace` cannot record a ``forward`` that branches on shapes or
lengths (``if t > context:``, ``for layer in self.layers[:n]``). :class:`ConcreteTracer`
runs every node on the example as it is recorded and answers such questions with the
example's values, so the graph is the one the example follows; the stream tracer
(:mod:`combinability_torch.trace_stream`) and the layer tracer (:mod:`combinability_torch.trace`)
read the symmetries from it.

What recent transformers versions write is taken too: a decorated ``forward`` of ``(self, *args,
**kwargs)`` (traced through a subclass whose ``forward`` takes the input alone), attention masks
built by ``torch.vmap`` (:data:`_MASK_BUILDERS`, run on the example), a key/value cache object
(``config.use_cache`` off while tracing), sizes read off shapes as indices, and ``experts[i]``
with ``i`` read off the routing (the expert the example names).
"""

from __future__ import annotations

import functools
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
    config = getattr(model, "config", None)  # transformers: no key/value cache object, which fx cannot record
    cached = getattr(config, "use_cache", None) is True
    try:
        if cached:
            config.use_cache = False
        tracer = ConcreteTracer(example_input)
        gm = fx.GraphModule(model, tracer.trace(model, held))
        ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise TracingError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}") from None
    finally:
        if cached:
            config.use_cache = True
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
        try:
            value = self._run(kind, target, a, kw)
        except Exception:
            self.graph.erase_node(proxy.node)  # an operation that fails on the example (and that forward may
            raise  # catch: transformers' probes) leaves no node behind
        self.values[proxy.node] = value
        return proxy

    def _run(self, kind: str, target: Any, a: Any, kw: Any) -> Any:
        """The example's value of one recorded operation."""
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
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        """The example's answer to a branch on shapes, or on which experts a router chose (transformers 5's loop
        over the experts hit skips a padding expert: ``if expert_idx == num_experts: continue``, as the loop itself
        runs over the experts the example hits); a branch on any other values of a tensor is refused (the
        example's way would be taken for every input)."""
        if self._reads_values(obj.node, {}, choices=True):
            raise TracingError(f"forward branches on the values of a tensor (node {obj.node.name!r}): data-dependent "
                               "control flow cannot be followed")
        return bool(self.values[obj.node])

    def _reads_values(self, node: fx.Node, seen: dict[fx.Node, bool], choices: bool = False) -> bool:
        """Whether ``node`` depends on the values (not only the shapes) of the input or the parameters; with
        ``choices``, not counting the indices a top-k, an argmax or a sort chose (:func:`_chosen_indices`)."""
        if node not in seen:
            if reads_shape(node) or choices and _chosen_indices(node):
                seen[node] = False
            elif node.op in ("placeholder", "get_attr"):
                seen[node] = isinstance(self.values.get(node), torch.Tensor)
            else:
                seen[node] = any(self._reads_values(a, seen, choices) for a in node.all_input_nodes)
        return seen[node]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch's modules are leaves, except the composite ones of :data:`_OPENED_MODULES`, whose
        ``forward`` is recorded (an ``nn.TransformerEncoder``'s layers, norms and attention)."""
        if isinstance(m, _OPENED_MODULES):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        """A module the model does not hold as a submodule (transformers 5 calls functions from the kernels hub,
        ``apply_rotary_pos_emb``, as module instances kept outside the model) is traced through: the operations
        its ``forward`` runs are recorded, as a function's are."""
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

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

        own_class = type(root) if isinstance(root, nn.Module) and (
            hasattr(type(root).forward, "__wrapped__") or _takes_keywords(type(root).forward)) else None
        if own_class is not None:  # a decorated forward (transformers' @can_return_tuple: wrapper(self, *a, **kw)),
            # whose arguments torch.fx cannot patch, or one taking **kwargs (which torch.fx would pass on as a traced
            # value): traced through a subclass whose forward takes the input alone (the others at their defaults, as
            # the library calls model(x))
            def forward(self: nn.Module, input: Any) -> Any:  # noqa: A002 - fx names the placeholder after it
                return own_class.forward(self, input)

            root.__class__ = type(own_class.__name__, (own_class,), {"forward": forward,
                                                                     "__module__": own_class.__module__})
            concrete_args, self.defaults = None, {}
        masks = _on_the_example(self)
        list_item = nn.ModuleList.__getitem__

        def module_of_example(modules: nn.ModuleList, index: Any) -> Any:
            """``experts[i]`` for an expert number read off the routing (transformers' loop over the experts hit):
            the module the example's number names, whose call is then recorded."""
            return list_item(modules, int(self.values[index.node]) if isinstance(index, fx.Proxy) else index)

        nn.ModuleList.__getitem__ = module_of_example
        try:
            for name, fn in originals.items():
                setattr(torch, name, recorded(fn))
            F._none_or_dtype = dtype_of
            return super().trace(root, concrete_args)
        finally:
            for module, name, fn in masks:
                setattr(module, name, fn)
            nn.ModuleList.__getitem__ = list_item
            for name, fn in originals.items():
                setattr(torch, name, fn)
            F._none_or_dtype = none_or_dtype
            if own_class is not None:
                root.__class__ = own_class


def _takes_keywords(forward: Any) -> bool:
    """Whether ``forward`` takes ``**kwargs`` (transformers 4.x's ``GraniteMoeForCausalLM``)."""
    import inspect

    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False


#: Operations whose result is the indices they chose (a router's experts), and those that give them as their item 1.
_CHOOSING = {torch.argmax, "argmax", torch.argmin, "argmin", torch.argsort, "argsort"}
_CHOOSING_PAIRS = {torch.topk, "topk", torch.sort, "sort", torch.max, "max", torch.min, "min"}


def _chosen_indices(node: fx.Node) -> bool:
    """Whether ``node`` holds indices chosen by a top-k, an argmax or a sort (``topk(...)[1]``, ``.indices``)."""
    if node.target in _CHOOSING:
        return True
    return node.target in (operator.getitem, getattr) and len(node.args) == 2 and \
        isinstance(node.args[0], fx.Node) and node.args[0].target in _CHOOSING_PAIRS and node.args[1] in (1, "indices")


#: transformers' attention-mask builders (``transformers.masking_utils``, imported by name into each model's module):
#: functions of shapes, positions and the (absent) padding mask only, which build the mask with ``torch.vmap``, which
#: proxies cannot pass. While tracing they run on the example's values; the mask is a constant of the graph.
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask",
                  "create_bidirectional_mask")


def _on_the_example(tracer: ConcreteTracer) -> list[tuple[Any, str, Any]]:
    """Replace the mask builders of every loaded transformers model module by their run on the example's values;
    return what to put back."""
    import sys

    def concrete(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            a, kw = tracer._value((args, kwargs))
            with torch.no_grad():
                return fn(*a, **kw)
        return call

    replaced = []
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("transformers.models.") and module is not None:
            for name in _MASK_BUILDERS:
                fn = getattr(module, name, None)
                if callable(fn):
                    replaced.append((module, name, fn))
                    setattr(module, name, concrete(fn))
    return replaced


#: Tensor attributes fixed by the example (a dtype, a device), read as values: ``torch.finfo(x.dtype)``.
_STATIC_ATTRIBUTES = frozenset({"dtype", "device", "layout", "is_cuda", "is_floating_point", "ndim", "is_nested",
                                "is_sparse", "is_quantized"})


class _ConcreteProxy(fx.Proxy):
    """A proxy whose static attributes (:data:`_STATIC_ATTRIBUTES`) and length are the example's values,
    and which iterates over its items (``len(past)``, ``for layer in outputs``)."""

    def _example(self) -> Any:
        return self.tracer.values.get(self.node)  # type: ignore[attr-defined]

    def __getattr__(self, k: str) -> Any:
        value = self._example()
        if isinstance(value, torch.Tensor):
            if not k.startswith("__") and not hasattr(value, k):
                # as the tensor would answer (transformers 5 asks hasattr(x, "jax") to detect torchax)
                raise AttributeError(f"{type(value).__name__!r} object has no attribute {k!r}")
            if k in _STATIC_ATTRIBUTES:
                return getattr(value, k)
            if k == "shape":  # a node at once, with its value
                return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return super().__getattr__(k)

    def __index__(self) -> int:
        """A size read off shapes (``mask[:, :, :, :key.shape[-2]]`` on a constant mask) as the example's int; a
        tensor's values are refused, as a branch on them is (the example's way would hold for every input)."""
        tracer = self.tracer
        if tracer._reads_values(self.node, {}):  # type: ignore[attr-defined]
            raise TracingError(f"forward uses the values of a tensor as an index (node {self.node.name!r}): "
                               "data-dependent indexing cannot be followed")
        return int(self._example())

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
