"""Symmetries of a user's torch transformer, found by tracing its feature spaces.

:func:`torch.fx.symbolic_trace` gives the dataflow; every tensor's last axis (its
features) is assigned a *space*. Linear layers, embeddings and learned arrays
(positional embeddings, a class token) open spaces; residual additions and
concatenations along tokens merge them; norms, pooling over tokens, token indexing and
dropout keep them; element-wise nonlinearities mark them (no rotation passes a GELU).
``nn.MultiheadAttention`` (self-attention, packed ``in_proj_weight``) reads one space and
writes a new one, with its heads as block permutations: the query/key rows share a
within-head permutation, the value rows and ``out_proj`` columns another, and both move
with the head. Attention written out by hand (:func:`_attention_parts`: a split of one layer's
features into query, key and value, views into heads, ``F.scaled_dot_product_attention`` or
``softmax(q @ k.transpose(-2, -1)) @ v``) gives the same heads; rotary embeddings make the query/key
heads rigid and grouped-query attention makes the query heads blocks of the key/value heads' order
(:func:`_rotary_or_repeated`). A space that only linear
maps, norms, pooling and additions touch — a residual stream — is an orthogonal map when
every norm on it can be folded into the layers reading it (:func:`combinability.fold_norms`);
``fix_ones`` when a LayerNorm centres it.
The spaces and the spec they add up to are framework-free: :mod:`combinability.feature_spaces`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from combinability.errors import TracingError
from combinability.feature_spaces import FIXED, Experts, FeatureSpaces, Gates, Heads, Norm, spec_from_spaces
from combinability.folding import NormFold, Reader
from combinability.permutation import PermutationSpec
from combinability_torch.trace import logits_of, other_arguments, reads_shape, tensor_aliases

__all__ = ["stream_symmetries"]

_NONLINEAR_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus,
                      nn.Softmax, nn.LogSoftmax, nn.ReLU6, nn.Hardtanh)
_NONLINEAR = {F.relu, F.gelu, F.silu, F.elu, F.softplus, F.leaky_relu, F.softmax, F.log_softmax, torch.log_softmax,
              "log_softmax", F.tanh, F.sigmoid,
              torch.relu, torch.tanh, torch.sigmoid, torch.softmax, "relu", "tanh", "sigmoid", "softmax",
              # element-wise functions an activation is written with (GPT-2's gelu_new: x ** 3, tanh; erf, exp)
              torch.pow, "pow", operator.pow, torch.erf, "erf", torch.exp, "exp", torch.square, "square", torch.rsqrt,
              "rsqrt", torch.sqrt, "sqrt"}
_PASS_MODULES = (nn.Dropout, nn.Identity)
_PASS = {"contiguous", "clone", "detach", "float", "expand", "to", "type", "type_as", "half", "bfloat16", F.dropout,
         operator.mul, operator.truediv,
         torch.mul}
_ADD = {operator.add, operator.iadd, torch.add}
_TOKEN_OPS = {"mean", torch.mean, "sum", torch.sum}
_SHAPE_OPS = {"view", "reshape", "flatten", "transpose", "permute", "unsqueeze", "squeeze", torch.flatten,
              torch.reshape, torch.transpose}
_FLATTEN = {"flatten", torch.flatten}
_STATISTICS = {"var", torch.var, "std", torch.std, "norm", torch.norm}
_FACTORIES = ("ones", "zeros", "full", "empty", "arange", "eye", "rand", "randn")
#: Tensor methods making a constant of the tensor's dtype and device (an RNN's zero initial state).
_NEW_CONSTANTS = {"new_zeros", "new_ones", "new_full", "new_empty"} | {
    getattr(torch.Tensor, name) for name in ("new_zeros", "new_ones", "new_full", "new_empty")}


def _hint(model: nn.Module) -> str:
    return (f"; pass spec= (a combinability.PermutationSpec, with kinds for heads and the residual stream) by hand "
            f"to cb.ModelPair for this {type(model).__name__}")


def _last(shape: Any) -> int | None:
    meta = getattr(shape, "meta", {}).get("tensor_meta")
    return int(meta.shape[-1]) if meta is not None and hasattr(meta, "shape") and len(meta.shape) else None


def _ndim(n: Any) -> int | None:
    meta = getattr(n, "meta", {}).get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def stream_symmetries(model: nn.Module, example_input: torch.Tensor) -> tuple[PermutationSpec, list[NormFold]]:
    """The symmetry spec (heads, FFN neurons, residual stream) and the norm folds of ``model``.

    Raises
    ------
    TracingError
        Naming the node the tracer cannot follow, or a parameter it did not see.
    """
    gm = concrete_trace(model, example_input, _hint(model))
    sp = FeatureSpaces()
    space: dict[str, int | None] = {}
    binds: dict[str, list[Any]] = {}  # parameter -> per-axis entry: a space, a tuple of spaces, or None
    norms: list[Norm] = []
    heads: list[Heads] = []
    experts: list[Experts] = []
    att = _HandAttention()

    aliases = tensor_aliases(model)
    tied: set[str] = set()
    channels_first: dict[str, int] = {}  # a convolution's output (n, c, ...) -> the space of its channels
    carried: dict[str, int] = {}  # tokens transposed last (n, d, t) -> the space of the features on axis -2
    recurrent: dict[str, _Recurrent] = {}  # an RNN's output tuple and its parts -> what they hold
    params_of: dict[str, str] = {}  # a get_attr node of a parameter -> the parameter's name

    def bind(param: str, entries: list[Any]) -> None:
        param = aliases.get(param, param)  # a tied weight: one tensor, every use binds it
        if param in binds:
            binds[param] = sp.tie(param, binds[param], entries, _hint(model))
            tied.add(param)
        else:
            binds[param] = entries

    def tensor_args(n: fx.Node) -> list[fx.Node]:
        out: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), out.append)
        return [a for a in out if space.get(a.name) is not None]

    for n in gm.graph.nodes:
        where = f"node {n.name!r} ({n.op} {n.target!r})"
        if n.op == "placeholder":
            space[n.name] = FIXED
        elif n.op == "get_attr":
            value = gm.get_parameter(n.target) if isinstance(_attr(gm, n.target), nn.Parameter) else None
            if value is None:
                space[n.name] = FIXED
                continue
            if all(reads_shape(u) for u in n.users):  # read for its dtype or shape only (``w.dtype``)
                space[n.name] = None
                continue
            module, _, leaf = n.target.rpartition(".")
            s = sp.new(module if module and leaf in ("weight", "bias") else n.target)
            bind(n.target, [None] * (value.ndim - 1) + [s])
            space[n.name] = s
            params_of[n.name] = aliases.get(n.target, n.target)
        elif n.op in ("call_module", "call_function", "call_method") and not reads_shape(n) and (
                _swaps_tokens_and_features(n) and space.get(n.args[0].name) not in (None, FIXED)
                and n.args[0].name not in att.headed or any(a.name in carried for a in tensor_args(n))):
            _tokens_last(n, gm, carried, space, sp, bind, where, model)
        elif n.op in ("call_module", "call_function", "call_method") and not reads_shape(n) and (
                any(isinstance(space.get(a.name), tuple) for a in tensor_args(n)) or (
                    _joins_features(n) and not any(att.holds(a.name) for a in tensor_args(n)))):
            _packed(n, gm, [a for a in tensor_args(n)], space, sp, bind, where, model)
        elif n.op == "call_module":
            m = gm.get_submodule(n.target)
            src = space.get(n.args[0].name) if n.args and isinstance(n.args[0], fx.Node) else None
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in channels_first and \
                    not isinstance(m, _PASS_MODULES):
                raise TracingError(f"{where}: a {type(m).__name__} on a convolution's channels-first output; the "
                                   f"stream tracer follows a patch embedding's channels through flatten(2) and "
                                   f"transpose(1, 2) into the tokens' features{_hint(model)}")
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                if src != FIXED or m.groups != 1 or m.padding_mode != "zeros":
                    raise TracingError(f"{where}: the stream tracer follows a convolution only on the model's input "
                                       f"(a patch embedding; ungrouped, zero-padded){_hint(model)}")
                s = sp.new(n.target)
                bind(f"{n.target}.weight", [s] + [None] * (m.weight.ndim - 1))
                if m.bias is not None:
                    bind(f"{n.target}.bias", [s])
                channels_first[n.name] = s
                space[n.name] = None
            elif isinstance(m, nn.Linear):
                s = sp.new(n.target)
                bind(f"{n.target}.weight", [s, src])
                if m.bias is not None:
                    bind(f"{n.target}.bias", [s])
                space[n.name] = s
            elif isinstance(m, nn.Embedding):
                s = sp.new(n.target)
                bind(f"{n.target}.weight", [None, s])
                space[n.name] = s
            elif isinstance(m, nn.LayerNorm | nn.RMSNorm):
                shape = tuple(m.normalized_shape)
                if len(shape) != 1 or _last(n.args[0]) != shape[0]:
                    raise TracingError(f"{where}: a norm must normalise the last axis only{_hint(model)}")
                scale = f"{n.target}.weight" if getattr(m, "weight", None) is not None else None
                shift = f"{n.target}.bias" if getattr(m, "bias", None) is not None else None
                for p in (scale, shift):
                    if p:
                        bind(p, [src])
                norms.append(Norm(src, scale, shift, isinstance(m, nn.LayerNorm), _readers(gm, n)))
                space[n.name] = src
            elif isinstance(m, nn.RNNBase):
                recurrent[n.name] = _recurrent_layer(n, m, src, sp, bind, space, where, model)
                space[n.name] = None
            elif isinstance(m, nn.MultiheadAttention):
                space[n.name] = _attention(n, m, sp, space, bind, heads, where, model)
            elif isinstance(m, nn.Softmax) and n.args[0].name in att.scores:
                att.passes(n)  # an nn.Softmax module over the keys keeps attention scores scores
                space[n.name] = None
            elif isinstance(m, _NONLINEAR_MODULES):
                sp.mark([src])
                space[n.name] = src
            elif isinstance(m, _PASS_MODULES):
                space[n.name] = src
                att.passes(n)  # dropout on per-head features or attention weights
                if n.args[0].name in channels_first:
                    channels_first[n.name] = channels_first[n.args[0].name]
            else:
                raise TracingError(f"{where}: the stream tracer cannot follow a {type(m).__name__} module"
                                   + _hint(model))
        elif n.op in ("call_function", "call_method"):
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in recurrent and not reads_shape(n):
                _recurrent_part(n, recurrent, space, where, model)
                continue
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in channels_first and not reads_shape(n):
                _channels_first_op(n, channels_first, space, where, model)
                continue
            args = tensor_args(n)
            spaces = [space[a.name] for a in args]
            target = n.target
            if _attention_parts(n, args, spaces, sp, space, att, heads, where, model):
                continue
            if _parameter_product(n, space, binds, params_of, sp):
                continue
            if target in _NEW_CONSTANTS:  # ``weight.new_zeros(...)``: a constant of the tensor's type
                space[n.name] = None
                continue
            if target in _FUNCTIONAL_NORMS and args and args[0] is n.args[0]:
                norms.append(_functional_norm(n, gm, spaces[0], params_of, binds, sp, where, model))
                space[n.name] = spaces[0]
                continue
            if target in ("topk", torch.topk) and args and _dim_is_last(n, 2):
                sp.mark(spaces[:1])  # routing: permutations of the experts only
                space[n.name] = FIXED  # sorted gate values and their indices: free of the experts' order
            elif target == "scatter" and args and _dim_is_last(n, 1):
                space[n.name] = space[n.args[0].name]  # scattered back into the experts' positions
            elif target in ("zeros_like", "ones_like", torch.zeros_like, torch.ones_like) and args:
                space[n.name] = spaces[0]
            elif not args or _ndim(n) is None:
                space[n.name] = None  # shapes, constants, masks: no features
            elif target in ("repeat_interleave", torch.repeat_interleave) and len(args) == 1 and _dim_is_last(n, 2) \
                    and not sp.is_fixed(spaces[0]):
                repeats = n.kwargs.get("repeats", n.args[1] if len(n.args) > 1 else None)
                if not isinstance(repeats, int) or spaces[0] == FIXED:
                    raise TracingError(f"{where}: repeat_interleave needs an int number of repeats{_hint(model)}")
                s, count = sp.new(f"{n.name}"), _last(args[0])
                if count:  # each unit of the gate -> a block
                    experts.append(Experts(s, spaces[0], count, repeats))
                sp.mark(spaces[:1])
                space[n.name] = s
            elif target in _SCALING and len(args) == 2 and len(n.args) == 2 and sp.is_fixed(spaces[1]) and \
                    (_last(args[1]) or 1) == 1:
                space[n.name] = spaces[0]  # scaled by a number held in a tensor (Gemma's sqrt(d)), or one per token
            elif target in ("type_as", "to") and len(args) == 2 and n.args[0] is args[0]:
                space[n.name] = spaces[0]  # the other tensor gives only its dtype (and device)
            elif target in (operator.mul, torch.mul, "mul") and len(args) == 2 and FIXED not in spaces:
                s = sp.union(spaces[0], spaces[1])  # an element-wise product (gating): one permutation
                sp.mark([s])
                space[n.name] = s
            elif all(sp.is_fixed(s) for s in spaces):
                space[n.name] = FIXED  # preprocessing of the input (patching, casting)
            elif target is operator.getitem and n.args[0].op == "call_module" and isinstance(
                    gm.get_submodule(n.args[0].target), nn.MultiheadAttention):
                space[n.name] = spaces[0] if n.args[1] == 0 else None
            elif target in _ADD and len(args) >= 2:
                s = spaces[0]
                for other in spaces[1:]:
                    s = sp.union(s, other)
                space[n.name] = s
            elif target in _ADD or target in (operator.sub, torch.sub):
                sp.mark(spaces[:1])  # adding a constant: permutations only
                space[n.name] = spaces[0]
            elif target in _NONLINEAR:
                sp.mark(spaces[:1])
                space[n.name] = spaces[0]
            elif target in _PASS and len(args) == 1:
                space[n.name] = spaces[0]
            elif target is torch.cat:
                s = spaces[0]
                for other in spaces[1:]:
                    s = sp.union(s, other)
                space[n.name] = s
            elif target in _TOKEN_OPS | _STATISTICS and len(args) == 1 and _reduces_features(n):
                sp.mark(spaces)  # a norm written out (RMSNorm's mean of x²): permutations keep it, rotations not
                space[n.name] = None  # a statistic per token, which scales or shifts the features it came from
            elif (target is operator.getitem or target in _TOKEN_OPS or target in _SHAPE_OPS) and len(args) == 1 \
                    and _last(n) == _last(args[0]) and _keeps_last(n):
                space[n.name] = spaces[0]
            else:
                raise TracingError(f"{where}: the stream tracer cannot follow this operation on features"
                                   + _hint(model))
        elif n.op == "output":  # the logits (of an output object that also carries caches: only they)
            sp.fix(s for a in _output_nodes(n) if space.get(a.name) is not None for s in _segments(space[a.name]))
    for k, v in model.named_parameters():  # unused by forward: left as they are
        binds.setdefault(k, [None] * v.ndim)
    for param, entries in binds.items():  # a layer whose output was split: its rows are packed segments
        binds[param] = [att.packed.get(sp.find(e), e) if isinstance(e, int) else e for e in entries]
    norms = [replace(m, readers=None if m.readers is None else tuple(
        replace(r, weight=aliases.get(r.weight, r.weight), bias=r.bias and aliases.get(r.bias, r.bias))
        for r in m.readers)) for m in norms]
    return spec_from_spaces(sp, binds, norms, heads, experts, _hint(model), tied=tied)


def concrete_trace(model: nn.Module, example_input: torch.Tensor, hint: str = "") -> fx.GraphModule:
    """``model``'s graph as it runs on ``example_input`` (:class:`ConcreteTracer`; its other
    ``forward`` arguments at their defaults), with every node's shape recorded.

    Raises
    ------
    TracingError
        Saying why torch.fx could not record or run it.
    """
    held = other_arguments(model)  # refuses a forward that needs more than its input, by name
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

        try:
            for name, fn in originals.items():
                setattr(torch, name, recorded(fn))
            return super().trace(root, concrete_args)
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)


#: Tensor attributes fixed by the example (a dtype, a device), read as values: ``torch.finfo(x.dtype)``.
_STATIC_ATTRIBUTES = frozenset({"dtype", "device", "layout", "is_cuda", "is_floating_point", "ndim"})


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


def _dim_is_last(n: fx.Node, position: int) -> bool:
    """Whether the ``dim`` argument (keyword, or positional at ``position``) is the last axis."""
    dim = n.kwargs.get("dim", n.args[position] if len(n.args) > position else None)
    return dim == -1 or (dim is not None and dim == (_ndim(n.args[0]) or 0) - 1)


@dataclass(frozen=True)
class _Recurrent:
    """What a node of an RNN's outputs holds: ``"outputs"`` (the module's tuple), ``"states"`` (an LSTM's
    ``(h_n, c_n)``) or ``"stacked"`` (final states of every layer, ``(layers, n, hidden)``), and the
    spaces of the layers' hidden units."""

    what: str
    layers: tuple[int, ...]
    bidirectional: bool = False


def _recurrent_layer(n: fx.Node, m: nn.RNNBase, src: Any, sp: FeatureSpaces, bind: Any, space: dict[str, Any],
                     where: str, model: nn.Module) -> _Recurrent:
    """``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``: each layer's hidden units a space (permutations only: they pass
    sigmoids and tanh), its weights' rows the gates of that space (:class:`~combinability.feature_spaces.Gates`),
    ``weight_ih`` reading the layer below (the input for the first), ``weight_hh`` its own units."""
    if getattr(m, "proj_size", 0):
        raise TracingError(f"{where}: the stream tracer follows {type(m).__name__} layers without projections (got "
                           f"proj_size={m.proj_size}){_hint(model)}")
    given: list[fx.Node] = []
    fx.node.map_arg((n.args[1:], n.kwargs), given.append)
    if any(space.get(a.name) is not None for a in given):
        raise TracingError(f"{where}: a {type(m).__name__} given initial states made from features or parameters; "
                           f"the stream tracer follows one started from constants (zeros){_hint(model)}")
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    layers: list[int] = []  # torch's order of the final states: layer by layer, forward then reverse
    below: Any = src
    for k in range(m.num_layers):  # a one-directional stack's last units are the module's output: its point
        here = []
        for suffix in ("", "_reverse") if m.bidirectional else ("",):
            point = k == m.num_layers - 1 and not m.bidirectional
            s = sp.new(n.target if point else f"{n.target}.l{k}{suffix}", m.hidden_size,
                       name=None if point else f"{n.target}.hidden_l{k}{suffix}")
            sp.mark([s])
            bind(f"{n.target}.weight_ih_l{k}{suffix}", [Gates(s, gates), below])
            bind(f"{n.target}.weight_hh_l{k}{suffix}", [Gates(s, gates), s])
            if m.bias:
                for leaf in ("bias_ih", "bias_hh"):
                    bind(f"{n.target}.{leaf}_l{k}{suffix}", [Gates(s, gates)])
            here.append(s)
        layers += here
        below = tuple(here) if m.bidirectional else here[0]  # both directions' units, packed
    return _Recurrent("outputs" if m.mode != "LSTM" else "lstm", tuple(layers), bool(m.bidirectional))


def _recurrent_part(n: fx.Node, recurrent: dict[str, _Recurrent], space: dict[str, Any], where: str,
                    model: nn.Module) -> None:
    """An item of an RNN's outputs: the output sequence (the last layer's units), the final states, one
    layer's final states (``h_n[-1]``; all of them when there is one layer)."""
    held = recurrent[n.args[0].name]
    index = n.args[1] if n.target is operator.getitem and len(n.args) == 2 else None
    first = index[0] if isinstance(index, tuple) and index else index
    if held.what in ("outputs", "lstm") and index in (0, 1):
        if index == 0:  # the last layer's units (both directions', packed)
            space[n.name] = tuple(held.layers[-2:]) if held.bidirectional else held.layers[-1]
            return
        if held.what == "lstm":
            recurrent[n.name] = _Recurrent("states", held.layers, held.bidirectional)
        else:
            _stacked(n, held.layers, recurrent, space)
        return
    if held.what == "states" and index in (0, 1):
        _stacked(n, held.layers, recurrent, space)
        return
    if held.what == "stacked" and isinstance(first, int):
        space[n.name] = held.layers[first]
        return
    raise TracingError(f"{where}: a use of a recurrent layer's outputs the stream tracer does not follow (it "
                       f"follows the output sequence, and the final states of one layer: h_n[-1]){_hint(model)}")


def _stacked(n: fx.Node, layers: tuple[int, ...], recurrent: dict[str, _Recurrent], space: dict[str, Any]) -> None:
    """Final states ``(layers, n, hidden)``: of one layer, features of its space (``h_n.squeeze(0)``, ``h_n[-1]``
    follow as features); of several, indexed by layer (:func:`_recurrent_part`)."""
    if len(layers) == 1:
        space[n.name] = layers[0]
    else:
        recurrent[n.name] = _Recurrent("stacked", layers)
        space[n.name] = None


def _segments(s: Any) -> tuple[Any, ...]:
    """The spaces of a value's features: one, or the segments of packed features (a tuple)."""
    return s if isinstance(s, tuple) else (s,)


def _joins_features(n: fx.Node) -> bool:
    """``torch.cat(..., dim=-1)``: features joined along the last axis (packed features)."""
    if n.target not in (torch.cat, torch.concat, torch.concatenate):
        return False
    dim = n.kwargs.get("dim", n.kwargs.get("axis", n.args[1] if len(n.args) > 1 else 0))
    return isinstance(dim, int) and dim in (-1, (_ndim(n) or 0) - 1)


def _packed(n: fx.Node, gm: fx.GraphModule, args: list[fx.Node], space: dict[str, Any], sp: FeatureSpaces,
            bind: Any, where: str, model: nn.Module) -> None:
    """Packed features: several spaces side by side on the last axis, made by ``torch.cat(..., dim=-1)``
    (two branches' features, a bidirectional RNN's directions) — each segment moves by its own
    permutation (as a packed axis of a spec). A Linear reading them binds its input axis to the segments;
    activations, dropout, token pooling and indexing, reshapes keeping the last axis, LayerNorm over the
    features and sums of features packed alike keep them; they are never rotated. Anything else reading
    them is refused by name."""
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    packed = [space[a.name] for a in args]
    first = packed[0] if packed else None
    if _joins_features(n):
        segments = tuple(s for p in packed for s in _segments(p))
        if any(s in (None, FIXED) or sp.is_fixed(s) for s in segments):
            sp.fix(s for s in segments if s is not None)  # a packed axis moves all its segments or none
            space[n.name] = FIXED
        else:
            space[n.name] = segments
        return
    if len(args) == 1 and isinstance(m, nn.Linear):
        s = sp.new(n.target)
        bind(f"{n.target}.weight", [s, first])
        if m.bias is not None:
            bind(f"{n.target}.bias", [s])
        space[n.name] = s
        return
    if len(args) == 1 and isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        for leaf in ("weight", "bias"):
            if getattr(m, leaf, None) is not None:
                bind(f"{n.target}.{leaf}", [first])
        sp.mark(first)
        space[n.name] = first
        return
    keeps = len(args) == 1 and (
        isinstance(m, (*_NONLINEAR_MODULES, *_PASS_MODULES))
        or (m is None and (n.target in _NONLINEAR or n.target in _PASS or (
            (n.target is operator.getitem or n.target in _TOKEN_OPS or n.target in _SHAPE_OPS)
            and _last(n) == _last(args[0]) and _keeps_last(n)))))
    if keeps:
        sp.mark(first)
        space[n.name] = first
        return
    if m is None and n.target in _ADD and len(args) >= 2 and all(
            isinstance(p, tuple) and len(p) == len(first) for p in packed):  # (sizes: checked by the spec)
        space[n.name] = tuple(_union_all(sp, group) for group in zip(*packed, strict=True))
        return
    raise TracingError(f"{where}: on packed features (torch.cat(..., dim=-1) of several layers' features), the "
                       f"stream tracer follows Linear layers reading them, activations, dropout, LayerNorm, token "
                       f"pooling and indexing, reshapes keeping the features and sums of features packed alike"
                       f"{_hint(model)}")


def _union_all(sp: FeatureSpaces, spaces: tuple[int, ...]) -> int:
    s = spaces[0]
    for other in spaces[1:]:
        s = sp.union(s, other)
    return s


def _swaps_tokens_and_features(n: fx.Node) -> bool:
    """``x.transpose(1, 2)`` (or ``-1, -2``; ``permute(0, 2, 1)``; ``swapaxes``) of a 3-D ``(n, tokens, features)``."""
    if _ndim(n.args[0] if n.args else None) != 3:
        return False
    if n.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims", torch.swapdims):
        return len(n.args) == 3 and {int(d) % 3 for d in n.args[1:3] if isinstance(d, int)} == {1, 2}
    dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], tuple | list) else n.args[1:]
    return n.target in ("permute", torch.permute) and tuple(d % 3 for d in dims if isinstance(d, int)) == (0, 2, 1)


def _tokens_last(n: fx.Node, gm: fx.GraphModule, carried: dict[str, int], space: dict[str, Any],
                 sp: FeatureSpaces, bind: Any, where: str, model: nn.Module) -> None:
    """MLP-Mixer's token mixing: features ``(n, t, d)`` transposed to ``(n, d, t)``, layers and activations on
    the tokens (the last axis), and the transpose back.

    The transposed tensor carries the features' space on axis -2 (``carried``) and the tokens last, which
    stay in place (their order is the input's positions). A Linear there mixes tokens: its rows open a
    space (the token-mixing MLP's hidden units, which permute), and the layer whose output is transposed
    back has its rows fixed (they are tokens again). A token-mixing layer acts on each feature alike
    (its bias is added to every one, its activations act on each), so the features it carries keep
    their permutations only.
    """
    arg = next(a for a in (n.args[0], *n.args[1:], *n.kwargs.values()) if isinstance(a, fx.Node) and a.name in space
               and space[a.name] is not None)
    if arg.name not in carried:  # features transposed behind the tokens
        sp.mark([space[arg.name]])
        carried[n.name], space[n.name] = space[arg.name], FIXED
        return
    reads = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node) and space.get(a.name) is not None]
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    if len(reads) == 1 and _swaps_tokens_and_features(n):  # back: tokens on axis 1 again, features last
        sp.fix([space[arg.name]])
        space[n.name] = carried[arg.name]
        return
    if len(reads) == 1 and isinstance(m, nn.Linear):
        s = sp.new(n.target)
        bind(f"{n.target}.weight", [s, space[arg.name]])
        if m.bias is not None:
            bind(f"{n.target}.bias", [s])
        space[n.name] = s
    elif len(reads) == 1 and (isinstance(m, _NONLINEAR_MODULES) or (m is None and n.target in _NONLINEAR)):
        sp.mark([space[arg.name]])
        space[n.name] = space[arg.name]
    elif len(reads) == 1 and (isinstance(m, _PASS_MODULES) or (m is None and n.target in _PASS)):
        space[n.name] = space[arg.name]
    else:
        raise TracingError(f"{where}: on features transposed behind the tokens (MLP-Mixer's token mixing), the "
                           f"stream tracer follows Linear layers over the tokens, activations, dropout and the "
                           f"transpose back{_hint(model)}")
    carried[n.name] = carried[arg.name]


def _output_nodes(n: fx.Node) -> list[fx.Node]:
    """The nodes of a graph's output that are the model's logits (:func:`logits_of` of the output)."""
    out: list[fx.Node] = []
    fx.node.map_arg(logits_of(n.args[0]), out.append)
    return out


def _reduces_features(n: fx.Node) -> bool:
    """A mean, sum or variance over the last axis that keeps it as size 1 (``x.pow(2).mean(-1, keepdim=True)``)."""
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
    nd = _ndim(n.args[0]) or 0
    dims = dim if isinstance(dim, tuple | list) else (dim,)
    return bool(keep) and tuple(int(d) % nd for d in dims if isinstance(d, int)) == (nd - 1,) if nd else False


def _keeps_last(n: fx.Node) -> bool:
    """A token-level op: pooling over, or indexing of, axes other than the last."""
    if n.target is operator.getitem:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return Ellipsis not in idx or idx[-1] is Ellipsis
    if n.target in _TOKEN_OPS:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = dim if isinstance(dim, tuple | list) else (dim,)
        nd = _ndim(n.args[0]) or 0
        return dim is not None and all(d not in (-1, nd - 1) for d in dims)
    if n.target in ("transpose", torch.transpose):
        nd = _ndim(n.args[0]) or 0
        return all(d not in (-1, nd - 1) for d in n.args[1:3])
    return True  # reshapes that keep the last axis' size (checked by the caller; verified by function)


def _through_token_ops(gm: fx.GraphModule, users: list[fx.Node]) -> list[fx.Node]:
    """The users of a norm's output, looking through pooling, token indexing and dropout.

    They are per-feature linear (γ ⊙ n + β averaged or indexed over tokens is γ ⊙ mean n + β),
    so the norm folds into the layer behind them.
    """
    out: list[fx.Node] = []
    for u in users:
        if reads_shape(u):
            continue  # reads the shape, not the values
        passes = (u.op in ("call_function", "call_method") and (u.target in _TOKEN_OPS or u.target is
                  operator.getitem or u.target in _PASS) and _keeps_last(u)) or (
                  u.op == "call_module" and isinstance(gm.get_submodule(u.target), _PASS_MODULES))
        out += _through_token_ops(gm, list(u.users)) if passes else [u]
    return out


def _attention(n: fx.Node, m: nn.MultiheadAttention, sp: FeatureSpaces, space: dict[str, Any], bind: Any,
               heads: list[Heads], where: str, model: nn.Module) -> int:
    q, k, v = (n.kwargs.get(name, n.args[i] if len(n.args) > i else None) for i, name in
               enumerate(("query", "key", "value")))
    if not (q is k is v):
        raise TracingError(f"{where}: only self-attention (query, key and value the same tensor) is traced"
                           + _hint(model))
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise TracingError(f"{where}: attention needs a packed in_proj_weight, no bias_k/bias_v and "
                           f"add_zero_attn=False{_hint(model)}")
    src = space[q.name]
    dh = m.embed_dim // m.num_heads
    qk, vo, order = (sp.new(f"{n.target}.{part}", name=f"{n.target}.{part}") for part in ("qk", "vo", "heads"))
    heads += [Heads(qk, order, m.num_heads, dh), Heads(vo, order, m.num_heads, dh)]
    bind(f"{n.target}.in_proj_weight", [(qk, qk, vo), src])
    if m.in_proj_bias is not None:
        bind(f"{n.target}.in_proj_bias", [(qk, qk, vo)])
    s = sp.new(f"{n.target}.out_proj")
    bind(f"{n.target}.out_proj.weight", [s, vo])
    if m.out_proj.bias is not None:
        bind(f"{n.target}.out_proj.bias", [s])
    return s


_SPLITS = {"split", torch.split, "chunk", torch.chunk}
_SDPA = {F.scaled_dot_product_attention}


@dataclass
class _HandAttention:
    """What :func:`_attention_parts` has seen of attention written out by hand."""

    parts_of: dict[str, list[int]] = field(default_factory=dict)  # a split of features -> its parts' spaces
    packed: dict[int, tuple[int, ...]] = field(default_factory=dict)  # a layer's space -> its parts' spaces
    headed: dict[str, tuple[int, int]] = field(default_factory=dict)  # (..., heads, head_dim) -> (heads, dh)
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # headed, last two axes swapped (kᵀ)
    scores: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # q kᵀ and its softmax -> (qk, h, dh)
    #: one layer's features viewed as (..., parts, heads, head_dim) (timm's qkv), then with the parts
    #: axis moved first, then unbound: -> (the parts' spaces, heads, head_dim, whether the parts lead)
    stacked: dict[str, tuple[list[int], int, int, bool]] = field(default_factory=dict)
    layer_of: dict[int, str] = field(default_factory=dict)  # a part's space -> the name of the layer split
    #: a space viewed into heads -> the width of its heads (a slice of them is narrower: rotary halves,
    #: GPT-NeoX's query, key and value packed in each head)
    width: dict[int, int] = field(default_factory=dict)
    #: parts of heads stacked along a new last axis (GPT-J's ``stack((-x2, x1), -1)``) -> their heads
    interleaved: dict[str, int] = field(default_factory=dict)
    #: key/value heads on their way to being repeated for grouped-query attention (``k[:, :, None]``,
    #: expanded) -> (heads, head_dim, the new axis after the heads)
    repeating: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: per-head features (and kᵀ) of key/value heads repeated for grouped-query attention -> (heads, repeats)
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: grouped-query scores and their softmax -> (the query heads' order, the key/value heads' order)
    grouped: dict[str, tuple[int, int]] = field(default_factory=dict)

    def parts(self, sp: FeatureSpaces, layer: int, count: int, size: int) -> list[int]:
        """Open the spaces of ``count`` parts of ``layer``'s features (``<layer>.q``/``.k``/``.v`` for three)."""
        stem = sp.opener[sp.find(layer)]
        names = ("q", "k", "v") if count == 3 else tuple(str(i) for i in range(count))
        out = [sp.new(f"{stem}.{names[i]}", size, name=f"{stem}.{names[i]}") for i in range(count)]
        self.packed[layer] = tuple(out)
        self.layer_of.update(dict.fromkeys(out, stem))
        return out

    def stem(self, sp: FeatureSpaces, qk: int) -> str:
        """The name the heads of a query/key space take: its packed layer's, else its own layer's."""
        root = sp.find(qk)
        return self.layer_of.get(root, sp.opener[root])

    def head_width(self, sp: FeatureSpaces, s: int, default: int) -> int:
        """The width of the heads space ``s`` was viewed into (``default`` if none was recorded)."""
        root = sp.find(s)
        return next((w for t, w in self.width.items() if sp.find(t) == root), default)

    def holds(self, name: str) -> bool:
        """Whether node ``name`` is per-head features, keys, scores or parts the attention tracer follows
        (a rotary embedding's halves are concatenated back by it, not packed)."""
        return any(name in seen for seen in (self.headed, self.keys, self.scores, self.shared, self.grouped,
                                             self.interleaved, self.repeating, self.parts_of, self.stacked))

    def passes(self, n: fx.Node) -> None:
        """``n`` passes its first argument on unchanged in kind (dropout, a cast)."""
        src = n.args[0].name if n.args and isinstance(n.args[0], fx.Node) else None
        for seen in (self.headed, self.keys, self.scores, self.shared, self.grouped):
            if src in seen:
                seen[n.name] = seen[src]  # type: ignore[index]


_MATMUL = {operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm"}
_BADDBMM = {torch.baddbmm, "baddbmm"}
#: A query scaled by a number (timm's ``q * self.scale``) stays per-head features.
_SCALING = {operator.mul, operator.truediv, torch.mul, "mul", "div"}
#: Operations on attention scores that keep them scores: scaling, masking, softmax over keys, dropout.
_ON_SCORES = {operator.mul, operator.truediv, operator.add, torch.mul, torch.add, "masked_fill", "masked_fill_",
              torch.masked_fill, F.softmax, torch.softmax, "softmax", F.dropout, "float", "type_as", "contiguous", "to",
              "type", torch.where, torch.max, torch.maximum}


def _attention_parts(n: fx.Node, args: list[fx.Node], spaces: list[Any], sp: FeatureSpaces, space: dict[str, Any],
                     att: _HandAttention, heads: list[Heads], where: str, model: nn.Module) -> bool:
    """Attention written out by hand (nanoGPT's, minGPT's): handle ``n`` and return True, or leave it (False).

    One layer's features split into equal parts along the last axis (``qkv.split(d, dim=-1)``,
    ``chunk(3, -1)``) make that layer's rows packed segments, one space per part; a part viewed as
    ``(..., heads, head_dim)`` is *headed* until a view merges the heads back; token-axis
    transposes, ``contiguous`` and dropout keep that. ``F.scaled_dot_product_attention(q, k, v)``,
    or ``softmax(q @ k.transpose(-2, -1) * scale, masked) @ v``, makes the query's and key's spaces
    one (their within-head units are contracted together) and gives the query/key and value spaces
    heads moving with one head order, as ``nn.MultiheadAttention``'s.
    """
    target = n.target
    headed = att.headed
    if reads_shape(n):
        return False  # shapes, not features
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    scored = n.args[1] if target is torch.where and len(n.args) == 3 else first  # where(mask, scores, fill)
    refolded = target in ("view", "reshape") and isinstance(scored, fx.Node) and _shape_of(n) is not None and \
        _shape_of(scored) is not None and _shape_of(n)[-2:] == _shape_of(scored)[-2:]  # type: ignore[index]
    if isinstance(scored, fx.Node) and scored.name in att.scores and (target in _ON_SCORES or refolded) and \
            not any(a.name in headed or a.name in att.keys for a in args):
        att.scores[n.name] = att.scores[scored.name]
        if scored.name in att.grouped:
            att.grouped[n.name] = att.grouped[scored.name]
        space[n.name] = None
        return True
    if target in _SPLITS and len(args) == 1 and spaces[0] not in (None, FIXED) and args[0].name not in headed:
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        nd, last = _ndim(args[0]) or 0, _last(args[0]) or 0
        count = n.args[1] if target in ("chunk", torch.chunk) else None
        size = n.args[1] if count is None else None
        if dim not in (-1, nd - 1):
            return False
        if isinstance(size, int) and size > 0 and last % size == 0:
            count = last // size
        if not isinstance(count, int) or count < 1 or last % count:
            raise TracingError(f"{where}: features split into unequal parts{_hint(model)}")
        if spaces[0] in att.packed or sp.find(spaces[0]) != spaces[0]:
            raise TracingError(f"{where}: only a layer's own output may be split into parts{_hint(model)}")
        att.parts_of[n.name] = att.parts(sp, spaces[0], count, last // count)
        space[n.name] = None
        return True
    if target is operator.getitem and first is not None and first.name in att.parts_of:
        space[n.name] = att.parts_of[first.name][n.args[1]]
        return True
    if first is not None and first.name in att.stacked:
        return _stacked_parts(n, first, att, space, where, model)
    if _rotary_or_repeated(n, args, first, sp, space, att, where, model):
        return True
    if target in ("view", "reshape", torch.reshape) and len(args) == 1 and spaces[0] not in (None, FIXED):
        src, out = _shape_of(args[0]), _shape_of(n)
        if src is None or out is None:
            return False
        if args[0].name not in headed and len(out) == len(src) + 1 and out[:-2] == src[:-1] \
                and out[-2] * out[-1] == src[-1] and out[-1] > 1:  # (..., h * dh) -> (..., h, dh); h may be 1
            headed[n.name] = (out[-2], out[-1])
            if att.head_width(sp, spaces[0], out[-1]) != out[-1]:
                raise TracingError(f"{where}: a space viewed as heads of {out[-1]} units and of "
                                   f"{att.head_width(sp, spaces[0], 0)}{_hint(model)}")
            att.width[spaces[0]] = out[-1]
            space[n.name] = spaces[0]
            return True
        if args[0].name not in headed and len(out) == len(src) + 2 and out[:-3] == src[:-1] \
                and out[-3] * out[-2] * out[-1] == src[-1] and min(out[-3:]) > 1:  # (..., 3 h dh) -> (..., 3, h, dh)
            if spaces[0] in att.packed or sp.find(spaces[0]) != spaces[0]:
                raise TracingError(f"{where}: only a layer's own output may be viewed as parts{_hint(model)}")
            parts = att.parts(sp, spaces[0], out[-3], out[-2] * out[-1])
            att.stacked[n.name] = (parts, out[-2], out[-1], False)
            space[n.name] = None
            return True
        if args[0].name in headed and ((len(src) == 4 and len(out) == 3 and src[1] == headed[args[0].name][0] and
                                         out == (src[0] * src[1], *src[2:])) or (
                len(src) == 3 and len(out) == 4 and out[1] == headed[args[0].name][0] and out[0] * out[1] == src[0]
                and out[2:] == src[1:])):  # heads folded into the batch axis for bmm (OPT's), or unfolded
            att.passes(n)
            space[n.name] = spaces[0]
            return True
        if args[0].name in headed and len(out) == len(src) - 1 and out[:-1] == src[:-2] \
                and out[-1] == src[-2] * src[-1] and _heads_next_to_last(args[0], headed):  # heads merged back
            if att.head_width(sp, spaces[0], src[-1]) != src[-1]:
                raise TracingError(f"{where}: a part of each head merged back into features{_hint(model)}")
            space[n.name] = spaces[0]
            return True
        return False
    if len(args) == 1 and args[0].name in headed and (
            target in ("contiguous", "clone", "float", "to", "type", F.dropout) or
            (target in _SCALING and len(n.args) == 2 and not any(isinstance(a, fx.Node) for a in n.args[1:])) or
            (target in ("transpose", torch.transpose) and _keeps_last(n)) or _permute_keeps_last(n)):
        headed[n.name] = headed[args[0].name]
        if args[0].name in att.shared:
            att.shared[n.name] = att.shared[args[0].name]
        space[n.name] = spaces[0]
        return True
    if len(args) == 1 and args[0].name in headed and target in ("transpose", torch.transpose) and \
            {int(d) % (_ndim(args[0]) or 1) for d in n.args[1:3]} == {(_ndim(args[0]) or 0) - 2,
                                                                        (_ndim(args[0]) or 0) - 1}:
        att.keys[n.name] = headed[args[0].name]  # k.transpose(-2, -1): head_dim now next to last
        if args[0].name in att.shared:
            att.shared[n.name] = att.shared[args[0].name]
        space[n.name] = spaces[0]
        return True
    factors = n.args[1:3] if target in _BADDBMM and len(n.args) >= 3 else n.args  # baddbmm(zeros, q, kᵀ)
    if (target in _MATMUL or target in _BADDBMM) and len(factors) == 2 and all(isinstance(a, fx.Node)
                                                                                for a in factors):
        left, right = factors
        if left.name in headed and right.name in att.keys:  # scores q kᵀ: query and key units contracted
            if headed[left.name] != att.keys[right.name]:
                raise TracingError(f"{where}: query and key with different head counts or sizes{_hint(model)}")
            h, dh = headed[left.name]
            if right.name in att.shared:  # grouped-query attention: no within-head unit contracted alike
                att.grouped[n.name] = _grouped_scores(sp, heads, att, space[left.name], space[right.name], h, dh,
                                                      att.shared[right.name])
                att.scores[n.name] = (space[left.name], h, dh)
            else:
                att.scores[n.name] = (sp.union(space[left.name], space[right.name]), h, dh)
            space[n.name] = None
            return True
        if left.name in att.scores and right.name in headed:  # the attention weights mix the values
            qk, h, dh = att.scores[left.name]
            if headed[right.name] != (h, dh):
                raise TracingError(f"{where}: values with other head counts or sizes than the query{_hint(model)}")
            if (left.name in att.grouped) != (right.name in att.shared):
                raise TracingError(f"{where}: keys and values repeated over the query heads differently (grouped-"
                                   f"query attention repeats both){_hint(model)}")
            headed[n.name] = (h, dh)
            if left.name in att.grouped:
                space[n.name] = _grouped_values(sp, heads, att, att.grouped[left.name], space[right.name], h, dh,
                                                att.shared[right.name], att.stem(sp, qk))
            else:
                space[n.name] = _heads_of(sp, heads, att, qk, space[right.name], att.stem(sp, qk), h, dh)
            return True
    if target in _SDPA:
        q, k, v = (n.kwargs.get(name, n.args[i] if len(n.args) > i else None) for i, name in
                   enumerate(("query", "key", "value")))
        if not all(isinstance(t, fx.Node) and t.name in headed for t in (q, k, v)):
            raise TracingError(f"{where}: scaled_dot_product_attention on query, key and value viewed as "
                               f"(..., heads, head_dim) from one or more layers' features is followed{_hint(model)}")
        (h, dh), group = headed[q.name], att.shared.get(k.name)
        by_call = group is None and att.shared.get(v.name) is None and bool(n.kwargs.get("enable_gqa")) and \
            headed[k.name] == headed[v.name] and headed[k.name][1] == dh and h % headed[k.name][0] == 0
        if by_call:  # the call repeats the key/value heads over the query heads
            group = (headed[k.name][0], h // headed[k.name][0])
        kv = (group[0] if by_call else h, dh)  # type: ignore[index]
        if att.shared.get(k.name) != att.shared.get(v.name) or any(
                headed[t.name] != e or _shape_of(t)[-3] != e[0] for t, e in ((q, (h, dh)), (k, kv), (v, kv))):
            raise TracingError(f"{where}: query, key and value with different head counts or sizes, or heads not on "
                               f"axis -3 (transpose(1, 2) after the view){_hint(model)}")
        headed[n.name] = (h, dh)
        if group is not None:  # grouped-query attention
            order = _grouped_scores(sp, heads, att, space[q.name], space[k.name], h, dh, group)
            space[n.name] = _grouped_values(sp, heads, att, order, space[v.name], h, dh, group,
                                            att.stem(sp, space[q.name]))
            return True
        qk = sp.union(space[q.name], space[k.name])
        space[n.name] = _heads_of(sp, heads, att, qk, space[v.name], att.stem(sp, qk), h, dh)
        return True
    if any(a.name in headed or a.name in att.keys for a in args) or (
            first is not None and first.name in att.scores):
        raise TracingError(f"{where}: an operation on per-head features or attention scores the tracer does not "
                           f"follow (it follows views into and out of heads, token transposes, q @ k.transpose(-2, "
                           f"-1) scaled, masked and softmaxed, @ v, scaled_dot_product_attention, and rotary "
                           f"embeddings on whole heads: slices of head_dim concatenated back before the scores)"
                           f"{_hint(model)}")
    return False


def _permute_keeps_last(n: fx.Node) -> bool:
    """``x.permute(...)`` (or ``torch.permute``) that leaves the last axis last (GPT-2's heads: ``(0, 2, 1, 3)``)."""
    if n.target not in ("permute", torch.permute):
        return False
    dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], tuple | list) else n.args[1:]
    nd = _ndim(n.args[0]) or 0
    return bool(dims) and all(isinstance(d, int) for d in dims) and len(dims) == nd and dims[-1] % nd == nd - 1


def _parameter_product(n: fx.Node, space: dict[str, Any], binds: dict[str, list[Any]], params_of: dict[str, str],
                       sp: FeatureSpaces) -> bool:
    """A layer written with its parameters (GPT-2's ``Conv1D``: ``torch.addmm(b, x, W)``, ``x @ W``,
    ``F.linear(x, W, b)``): the weight's input axis takes ``x``'s space, its output axis (and the
    bias) the product's; ``F.embedding(ids, W)`` reads ``W``'s features. Return whether ``n`` was one."""
    target, a = n.target, n.args
    if target in (F.embedding, torch.embedding) and len(a) >= 2 and isinstance(a[1], fx.Node) and \
            a[1].name in params_of and len(binds[params_of[a[1].name]]) == 2:
        space[n.name] = binds[params_of[a[1].name]][1]  # a lookup of the table's rows: its features
        return True
    if target in (torch.addmm, "addmm") and len(a) == 3 and all(isinstance(v, fx.Node) for v in a):
        bias, x, w, w_in = a[0], a[1], a[2], 0  # W: (in, out)
    elif target in _MATMUL and len(a) == 2 and all(isinstance(v, fx.Node) for v in a):
        bias, x, w, w_in = None, a[0], a[1], 0
    elif target is F.linear and len(a) >= 2 and all(isinstance(v, fx.Node) for v in a[:2]):
        bias, x, w, w_in = (a[2] if len(a) > 2 else n.kwargs.get("bias")), a[0], a[1], 1  # W: (out, in)
    else:
        return False
    name = params_of.get(w.name)
    if name is None or space.get(x.name) is None or len(binds[name]) != 2:
        return False
    entries = binds[name]
    if w_in == 0:  # (in, out): the get_attr opened the output axis
        out = entries[1]
        entries[0] = sp.union(entries[0], space[x.name]) if entries[0] is not None else space[x.name]
    else:  # (out, in): the get_attr opened the input axis
        sp.union(entries[1], space[x.name])
        out = entries[0] if entries[0] is not None else sp.new(name.rpartition(".")[0] or name)
        entries[0] = out
    if isinstance(bias, fx.Node) and bias.name in params_of:
        out = sp.union(out, space[bias.name])
    space[n.name] = out
    return True


#: Norms written with their module's parameters (nanoGPT's ``LayerNorm``: ``F.layer_norm(x, self.weight.shape,
#: self.weight, self.bias, 1e-5)``), and the positions of their weight and bias arguments.
_FUNCTIONAL_NORMS = {F.layer_norm: (2, 3), F.rms_norm: (2, None)}


def _functional_norm(n: fx.Node, gm: fx.GraphModule, src: Any, params_of: dict[str, str],
                     binds: dict[str, list[Any]], sp: FeatureSpaces, where: str, model: nn.Module) -> Norm:
    """The :class:`Norm` of ``F.layer_norm`` / ``F.rms_norm`` over the last axis: its weight and bias (parameters
    read directly, or none) take the normalised space, as a LayerNorm module's do."""
    names = ("input", "normalized_shape", "weight", "bias" if n.target is F.layer_norm else "eps")
    args = {**dict(zip(names, n.args, strict=False)), **n.kwargs}
    last = _last(n.args[0])
    shape = args.get("normalized_shape")
    if isinstance(shape, fx.Node):  # ``self.weight.shape``: the shape of the parameter read
        owner = shape.args[0] if shape.target is getattr and shape.args[1:] == ("shape",) else None
        shape = tuple(gm.get_parameter(params_of[owner.name]).shape) if isinstance(owner, fx.Node) and \
            owner.name in params_of else None
    leaves = [args.get(k) for k in ("weight", "bias")]
    if shape is None or tuple(shape) != (last,) or any(
            v is not None and not (isinstance(v, fx.Node) and v.name in params_of) for v in leaves):
        raise TracingError(f"{where}: a functional norm must normalise the last axis only ({last}), with parameters "
                           f"read directly or none (got normalized_shape {shape}){_hint(model)}")
    scale, shift = (params_of[v.name] if v is not None else None for v in leaves)
    for p in (scale, shift):
        if p:
            sp.union(binds[p][0], src)
    return Norm(src, scale, shift, n.target is F.layer_norm, _readers(gm, n))


def _channels_first_op(n: fx.Node, channels_first: dict[str, int], space: dict[str, Any], where: str,
                       model: nn.Module) -> None:
    """Follow a patch embedding's output ``(n, c, h, w)`` to tokens ``(n, h * w, c)``.

    ``flatten(2)`` (or a reshape keeping the first two axes) keeps the channels on axis 1;
    ``transpose(1, 2)``, ``permute(0, 2, 1)`` or ``permute(0, 2, 3, 1)`` moves them last,
    where the stream's features are; anything else is refused.
    """
    s = channels_first[n.args[0].name]
    src, out = _shape_of(n.args[0]), _shape_of(n)
    target = n.target
    dims = [int(d) for d in n.args[1:]] if all(isinstance(d, int) for d in n.args[1:]) else None
    if target == "permute" and len(n.args) == 2 and isinstance(n.args[1], tuple | list):
        dims = [int(d) for d in n.args[1]]
    if src is None or out is None:
        raise TracingError(f"{where}: shapes unknown on a convolution's output{_hint(model)}")
    nd = len(src)
    if target in (_FLATTEN | {"reshape", "view", torch.reshape}) and len(out) >= 3 and out[:2] == src[:2]:
        channels_first[n.name] = s  # (n, c, h, w) -> (n, c, h * w): the channels stay on axis 1
        space[n.name] = None
        return
    moved_last = (target in ("transpose", torch.transpose) and dims is not None and len(dims) == 2 and nd == 3
                  and {d % nd for d in dims} == {1, 2}) or (
                  target in ("permute", torch.permute) and dims is not None and [d % nd for d in dims] ==
                  [0, *range(2, nd), 1])
    if moved_last:
        space[n.name] = s
        return
    raise TracingError(f"{where}: an operation on a convolution's channels-first output; the stream tracer follows "
                       f"a patch embedding's channels through flatten(2) and transpose(1, 2) (or permute(0, 2, 3, 1)) "
                       f"into the tokens' features{_hint(model)}")


def _stacked_parts(n: fx.Node, first: fx.Node, att: _HandAttention, space: dict[str, Any], where: str,
                   model: nn.Module) -> bool:
    """timm's attention: ``qkv(x).reshape(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)``, then
    ``unbind(0)`` or ``[i]``: each part per-head features of its own space."""
    parts, h, dh, leading = att.stacked[first.name]
    nd = len(_shape_of(first) or ())
    target = n.target
    if not leading and target in ("permute", torch.permute):
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], tuple | list) else n.args[1:]
        dims = [int(d) % nd for d in dims] if all(isinstance(d, int) for d in dims) else []
        if len(dims) == nd and dims[0] == nd - 3 and dims[-1] == nd - 1:
            att.stacked[n.name] = (parts, h, dh, True)
            space[n.name] = None
            return True
    if leading and target in ("unbind", torch.unbind) and n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) == 0:
        att.stacked[n.name] = (parts, h, dh, True)
        space[n.name] = None
        return True
    if leading and target is operator.getitem and isinstance(n.args[1], int):
        att.headed[n.name] = (h, dh)
        space[n.name] = parts[n.args[1]]
        return True
    raise TracingError(f"{where}: the tracer follows a layer's features viewed as (..., parts, heads, head_dim) "
                       f"through permute(2, 0, 3, 1, 4) (the parts axis first, head_dim last) and unbind(0) or [i] only"
                       + _hint(model))


def _slices_last(n: fx.Node) -> bool:
    """``x[..., a:b]`` (or ``x[:, :, :, a:b]``): a slice of the last axis, every other axis whole."""
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    nd = _ndim(n.args[0]) or 0
    whole = [i is Ellipsis or i == slice(None) for i in idx[:-1]]
    return bool(idx) and isinstance(idx[-1], slice) and all(whole) and (Ellipsis in idx or len(idx) == nd)


def _rotary_or_repeated(n: fx.Node, args: list[fx.Node], first: fx.Node | None, sp: FeatureSpaces,
                        space: dict[str, Any], att: _HandAttention, where: str, model: nn.Module) -> bool:
    """Rotary position embeddings and grouped-query attention on per-head features: handle ``n``
    and return True, or leave it (False).

    Rotary embeddings as Llama and GPT-NeoX write them — ``q * cos + rotate_half(q) * sin``, with
    ``rotate_half(x) = cat((-x[..., d // 2:], x[..., :d // 2]), -1)`` and ``cos``, ``sin`` tables
    of positions × head_dim, the same for every head — rotate fixed pairs of each head's units:
    the heads still move, their units keep their order (the space is *rigid*). So does any table
    varying along head_dim, and any slice of it: a part of every head, per-head features of fewer
    units (a partial rotary's ``q[..., :r]``; GPT-NeoX's query, key and value packed in each head,
    whose attention output is then a new space of heads). Key/value heads
    repeated over groups of query heads (``k[:, :, None].expand(b, kv, rep, t, dh).reshape(b, kv *
    rep, t, dh)``, Llama's ``repeat_kv``; ``repeat_interleave(k, rep, dim=1)``) are *shared*.
    """
    target, headed = n.target, att.headed
    shape, nd = _shape_of(n), _ndim(n) or 0
    if target is operator.getitem and first is not None and first.name in headed and _slices_last(n) and shape:
        headed[n.name] = (headed[first.name][0], shape[-1])  # a part of every head: its units keep their order
        sp.rigid([space[first.name]])
        space[n.name] = space[first.name]
        return True
    if target in (operator.neg, torch.neg, "neg") and first is not None and first.name in headed:
        headed[n.name], space[n.name] = headed[first.name], space[first.name]
        return True
    parts = list(n.args[0]) if target is torch.cat and n.args and isinstance(n.args[0], tuple | list) else []
    if any(isinstance(t, fx.Node) and t.name in headed for t in parts):
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        if dim not in (-1, nd - 1):
            return False  # along the tokens (a cache): not followed
        if not all(isinstance(t, fx.Node) and t.name in headed for t in parts) or shape is None or \
                len({headed[t.name][0] for t in parts}) != 1 or len({sp.find(space[t.name]) for t in parts}) != 1:
            raise TracingError(f"{where}: parts of one layer's heads are concatenated along head_dim only "
                               f"(rotate_half, a partial rotary's halves){_hint(model)}")
        headed[n.name], space[n.name] = (headed[parts[0].name][0], shape[-1]), space[parts[0].name]
        return True
    stacked = list(n.args[0]) if target is torch.stack and n.args and isinstance(n.args[0], tuple | list) else []
    if any(isinstance(t, fx.Node) and t.name in headed for t in stacked):
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        if dim not in (-1, nd - 1) or not all(isinstance(t, fx.Node) and t.name in headed for t in stacked) or \
                len({headed[t.name] for t in stacked}) != 1 or len({sp.find(space[t.name]) for t in stacked}) != 1:
            raise TracingError(f"{where}: parts of one layer's heads are stacked along a new last axis only (GPT-J's "
                               f"rotary on interleaved pairs), then flattened back{_hint(model)}")
        att.interleaved[n.name] = headed[stacked[0].name][0]
        space[n.name] = space[stacked[0].name]
        return True
    if first is not None and first.name in att.interleaved:
        src = _shape_of(first)
        if not (shape and src and tuple(shape) == (*src[:-2], src[-2] * src[-1])):
            raise TracingError(f"{where}: stacked parts of heads are followed through flatten(-2) only{_hint(model)}")
        headed[n.name], space[n.name] = (att.interleaved[first.name], shape[-1]), space[first.name]
        return True
    operands = [a for a in n.args[:2] if isinstance(a, fx.Node)] if len(n.args) == 2 else []
    if target in (operator.mul, torch.mul, "mul") and len(operands) == 2 and \
            sum(a.name in headed for a in operands) == 1 and all(
                a.name in headed or space.get(a.name) is None or sp.is_fixed(space[a.name]) for a in operands):
        # per-head features times a table (a constant, or made from the input's positions: no features)
        x, table = (operands[0], operands[1]) if operands[0].name in headed else (operands[1], operands[0])
        h = headed[x.name][0]
        xs, ts = _shape_of(x) or (), _shape_of(table) or ()
        aligned = [ts[i - len(xs) + len(ts)] if i - len(xs) + len(ts) >= 0 else 1 for i in range(len(xs))]
        if shape != xs or any(xs[i] == h and aligned[i] != 1 for i in range(len(xs) - 1)):
            raise TracingError(f"{where}: per-head features multiplied by a table that may differ between heads "
                               f"(rotary tables of positions x head_dim are followed; the example's token count must "
                               f"differ from the number of heads){_hint(model)}")
        if aligned[-1] != 1:
            sp.rigid([space[x.name]])  # cos/sin: one factor per unit of the head, the same in every head
        headed[n.name], space[n.name] = headed[x.name], space[x.name]
        return True
    if target in _ADD and len(args) == 2 and len(n.args) == 2 and all(a.name in headed for a in args) and \
            headed[args[0].name] == headed[args[1].name] and _shape_of(args[0]) == _shape_of(args[1]) == shape:
        headed[n.name] = headed[args[0].name]  # q * cos + rotate_half(q) * sin
        space[n.name] = sp.union(space[args[0].name], space[args[1].name])
        return True
    # grouped-query attention: the key/value heads repeated over the query heads
    if target is operator.getitem and first is not None and first.name in headed and first.name not in att.shared:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        src = _shape_of(first)
        if src and shape and idx.count(None) == 1 and all(i is None or i == slice(None) for i in idx):
            new = idx.index(None)  # k[:, :, None] (trailing axes whole)
            if shape == (*src[:new], 1, *src[new:]) and new > 0 and src[new - 1] == headed[first.name][0]:
                att.repeating[n.name] = (*headed[first.name], new)
                space[n.name] = space[first.name]
                return True
    if first is not None and first.name in att.repeating:
        h, dh, new = att.repeating[first.name]
        src = _shape_of(first)
        if target == "expand" and shape and src and len(shape) == len(src) and all(
                a == b for i, (a, b) in enumerate(zip(src, shape, strict=True)) if i != new):
            att.repeating[n.name] = (h, dh, new)
            space[n.name] = space[first.name]
            return True
        if target in ("reshape", "view", torch.reshape) and shape and src and \
                tuple(shape) == (*src[:new - 1], src[new - 1] * src[new], *src[new + 1:]):
            headed[n.name], att.shared[n.name] = (h * src[new], dh), (h, src[new])
            space[n.name] = space[first.name]
            return True
        raise TracingError(f"{where}: key/value heads given a new axis are followed through expand(...) and a "
                           f"reshape merging it into the heads (repeat_kv) only{_hint(model)}")
    if target in ("repeat_interleave", torch.repeat_interleave) and first is not None and first.name in headed \
            and first.name not in att.shared and shape:
        repeats = n.kwargs.get("repeats", n.args[1] if len(n.args) > 1 else None)
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
        h, dh = headed[first.name]
        src = _shape_of(first)
        if isinstance(repeats, int) and isinstance(dim, int) and src and src[dim] == h and shape[dim] == h * repeats \
                and dim % len(src) != len(src) - 1:
            headed[n.name], att.shared[n.name] = (h * repeats, dh), (h, repeats)
            space[n.name] = space[first.name]
            return True
    return False


def _grouped_scores(sp: FeatureSpaces, heads: list[Heads], att: _HandAttention, q: int, k: int, h: int, dh: int,
                    group: tuple[int, int]) -> tuple[int, int]:
    """Grouped-query attention's heads: the key/value heads' order, the query heads' order moving in
    groups of ``repeats`` with it; query and key rigid. Returns ``(query heads, key/value heads)``."""
    kv, repeats = group
    if kv * repeats != h:
        raise TracingError(f"{kv} key/value heads repeated {repeats} times do not make {h} query heads")
    kv_order = sp.new(f"{att.stem(sp, k)}.heads", kv, name=f"{att.stem(sp, k)}.heads")
    q_order = sp.new(f"{att.stem(sp, q)}.heads", h, name=f"{att.stem(sp, q)}.heads")
    heads += [Heads(q, q_order, h, att.head_width(sp, q, dh)), Heads(k, kv_order, kv, att.head_width(sp, k, dh)),
              Heads(q_order, kv_order, kv, repeats)]
    sp.rigid([q, k])  # their within-head units are contracted across different heads: kept in order
    sp.mark([q, k])
    return q_order, kv_order


def _grouped_values(sp: FeatureSpaces, heads: list[Heads], att: _HandAttention, orders: tuple[int, int], v: int,
                    h: int, dh: int, group: tuple[int, int], stem: str) -> int:
    """The values of grouped-query attention and its output (a new space, read by the output layer),
    rigid heads of the key/value and the query heads' orders."""
    q_order, kv_order = orders
    out = sp.new(f"{stem}.out", h * dh)
    heads += [Heads(v, kv_order, group[0], att.head_width(sp, v, dh)), Heads(out, q_order, h, dh)]
    sp.rigid([v, out])
    sp.mark([v, out])
    return out


def _heads_of(sp: FeatureSpaces, heads: list[Heads], att: _HandAttention, qk: int, vo: int, name: str, h: int,
              dh: int) -> int:
    """Query/key and value spaces as heads moving with one new head order; softmax makes them permutations.

    Returns the space of the attention's output: the values' own, or, where the values are a part of
    wider heads (GPT-NeoX's query, key and value packed in each head), a new rigid space of ``h``
    heads of ``dh`` units."""
    sp.mark([qk, vo])
    order = sp.new(f"{name}.heads", h, name=f"{name}.heads")
    heads += [Heads(qk, order, h, att.head_width(sp, qk, dh)), Heads(vo, order, h, att.head_width(sp, vo, dh))]
    if att.head_width(sp, vo, dh) == dh:
        return vo
    out = sp.new(f"{name}.out", h * dh)
    heads.append(Heads(out, order, h, dh))
    sp.rigid([out])
    sp.mark([out])
    att.width[out] = dh
    return out


def _shape_of(n: fx.Node) -> tuple[int, ...] | None:
    meta = getattr(n, "meta", {}).get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _heads_next_to_last(n: fx.Node, headed: dict[str, tuple[int, int]]) -> bool:
    """Whether a headed tensor has its heads on axis -2 again (transposed back before the merge)."""
    shape = _shape_of(n)
    return shape is not None and tuple(shape[-2:]) == headed[n.name]


def _readers(gm: fx.GraphModule, node: fx.Node) -> tuple[Reader, ...] | None:
    """The layers reading a norm's output (through pooling and token indexing); None if one is not a layer."""
    readers = []
    for u in _through_token_ops(gm, list(node.users)):
        um = gm.get_submodule(u.target) if u.op == "call_module" else None
        if isinstance(um, nn.Linear):
            readers.append(Reader(f"{u.target}.weight", 1, f"{u.target}.bias" if um.bias is not None else None))
        elif isinstance(um, nn.MultiheadAttention):
            readers.append(Reader(f"{u.target}.in_proj_weight", 1,
                                  f"{u.target}.in_proj_bias" if um.in_proj_bias is not None else None))
        else:
            return None
    return tuple(readers)
