"""Symmetries of a user's torch transformer, found by tracing its feature spaces.

:func:`torch.fx.symbolic_trace` gives the dataflow; every tensor's last axis (its
features) is assigned a *space*. Linear layers, embeddings and learned arrays
(positional embeddings, a class token) open spaces; residual additions and
concatenations along tokens merge them; norms, pooling over tokens, token indexing and
dropout keep them; element-wise nonlinearities mark them (no rotation passes a GELU).
Attention (``nn.MultiheadAttention``, or written out by hand with rotary embeddings and
grouped queries) gives heads as block permutations (:mod:`combinability_torch.trace_attention`).
A space that only linear maps, norms, pooling and additions touch — a residual stream — is
an orthogonal map when every norm on it can be folded into the layers reading it (:func:`combinability.fold_norms`);
``fix_ones`` when a LayerNorm centres it.
The spaces and the spec they add up to are framework-free: :mod:`combinability.feature_spaces`;
the graph is recorded by :func:`combinability_torch.concrete_trace.concrete_trace`, and the
operations are told apart by kind in :mod:`combinability_torch.fx_vocabulary`.
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from combinability.errors import NotATransformerError, TracingError
from combinability.feature_spaces import (
    FIXED,
    Experts,
    FeatureSpaces,
    Gates,
    Heads,
    Interleaved,
    Norm,
    spec_from_spaces,
)
from combinability.folding import NormFold, Reader
from combinability.permutation import PermutationSpec
from combinability_torch.concrete_trace import _attr, concrete_trace
from combinability_torch.fx_vocabulary import (
    _ADD,
    _COMPARISONS,
    _FLATTEN,
    _MATMUL,
    _NEW_CONSTANTS,
    _NONLINEAR,
    _NONLINEAR_MODULES,
    _PARAMETER_CASTS,
    _PASS,
    _PASS_MODULES,
    _SCALING,
    _SHAPE_OPS,
    _STATISTICS,
    _TOKEN_OPS,
    _dim_is_last,
    _hint,
    _keeps_last,
    _last,
    _ndim,
    _shape_of,
    _uniform_last,
)
from combinability_torch.trace import example_value, feeding_logits, logits_of, reads_shape, tensor_aliases
from combinability_torch.trace_attention import _attention, _attention_parts, _HandAttention, single_head_keys
from combinability_torch.trace_experts import (
    INDEX_ADD,
    ExpertWeights,
    RouterGroups,
    Routing,
    index_add_space,
    stack_experts,
)

#: Convolutions written as functions (``F.conv2d(x, self.weight, ...)``): a CNN's, not a transformer's.
_CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}

__all__ = ["stream_symmetries"]


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
    vectors = _kept_vectors(model)
    kept: dict[str, str] = {}  # a get_attr node of a saved one-axis float buffer -> the buffer's name
    tied: set[str] = set()
    channels_first: dict[str, int] = {}  # a convolution's output (n, c, ...) -> the space of its channels
    carried: dict[str, int] = {}  # tokens transposed last (n, d, t) -> the space of the features on axis -2
    recurrent: dict[str, _Recurrent] = {}  # an RNN's output tuple and its parts -> what they hold
    params_of: dict[str, str] = {}  # a get_attr node of a parameter -> the parameter's name
    routing = Routing()  # expert ids, and the gates whose ids select expert modules
    linears: dict[str, int] = {}  # a linear layer -> the space it opened
    held = ExpertWeights()  # experts held as one parameter each (transformers 5's)
    bias_pieces: dict[str, tuple[int, int, list[int]]] = {}  # a piece of a concatenated bias -> (layer, index, sizes)
    transposed: set[str] = set()  # a parameter matrix read transposed (``W.t()``) by the product that uses it
    groups = RouterGroups()  # experts chosen in groups

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

    live = feeding_logits(gm)
    rms_of, rms_statistics = _rms_normalised(gm)  # RMSNorms written out (Llama's, T5's)
    for n in gm.graph.nodes:
        where = f"node {n.name!r} ({n.op} {n.target!r})"
        if n.op not in ("placeholder", "output") and n.name not in live:
            continue  # another output's work (a mixture's load-balancing loss): not the logits'
        if n.op in ("call_function", "call_method") and held.follow(n, params_of, binds, space, sp, routing, where,
                                                                    _hint(model)):
            continue  # experts held as one parameter of shape (experts, ...)
        if n.op == "placeholder":
            space[n.name] = FIXED
        elif n.op == "get_attr":
            value = gm.get_parameter(n.target) if isinstance(_attr(gm, n.target), nn.Parameter) else None
            if value is None and n.target in vectors:  # a saved vector: a constant unless added to features
                kept[n.name] = n.target
            if value is None:
                space[n.name] = FIXED
                continue
            if all(reads_shape(u) for u in n.users):  # read for its dtype or shape only (``w.dtype``)
                space[n.name] = None
                continue
            if value.ndim == 0:  # a learned number (a temperature, a gate): no axis to move, a constant to features
                bind(n.target, [])
                space[n.name] = FIXED
                continue
            param = aliases.get(n.target, n.target)
            if param in binds and len(binds[param]) == value.ndim and isinstance(binds[param][-1], int) and \
                    _read_as_matrix(n):
                # read again, as a layer's matrix, after a layer bound it (a tied decoder's
                # ``F.linear(z, self.enc.weight.t())``): its axes are the spaces that layer gave them
                tied.add(param)
                space[n.name] = binds[param][-1]
                params_of[n.name] = param
                continue
            module, _, leaf = n.target.rpartition(".")
            s = sp.new(module if module and leaf in ("weight", "bias") else n.target)
            bind(n.target, [None] * (value.ndim - 1) + [s])
            space[n.name] = s
            params_of[n.name] = aliases.get(n.target, n.target)
        elif n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in carried \
                and isinstance(gm.get_submodule(n.target), nn.Conv1d):
            # a convolution over the tokens of features transposed to (n, d, t) (a text CNN's): channels mixed
            m = gm.get_submodule(n.target)
            if m.groups != 1 or m.padding_mode != "zeros":
                raise TracingError(f"{where}: the stream tracer follows ungrouped, zero-padded convolutions over "
                                   f"the tokens{_hint(model)}")
            s_conv = sp.new(n.target)
            bind(f"{n.target}.weight", [s_conv, carried[n.args[0].name], None])
            if m.bias is not None:
                bind(f"{n.target}.bias", [s_conv])
            channels_first[n.name] = s_conv
            space[n.name] = None
        elif n.op in ("call_module", "call_function", "call_method") and not reads_shape(n) and (
                _swaps_tokens_and_features(n) and space.get(n.args[0].name) not in (None, FIXED)
                and n.args[0].name not in att.headed and not single_head_keys(n, space)
                or any(a.name in carried for a in tensor_args(n))):
            _tokens_last(n, gm, carried, space, sp, bind, where, model)
        elif n.op in ("call_module", "call_function", "call_method") and not reads_shape(n) and (
                any(isinstance(space.get(a.name), tuple) for a in tensor_args(n)) or (
                    _joins_features(n) and not any(att.holds(a.name) or a.name in att.per_head or
                                                   a.name in routing.ids for a in n.all_input_nodes))):
            _packed(n, gm, [a for a in tensor_args(n)], space, sp, bind, where, model)
        elif n.op == "call_module":
            m = gm.get_submodule(n.target)
            src = space.get(n.args[0].name) if n.args and isinstance(n.args[0], fx.Node) else None
            stem = channels_first.get(n.args[0].name) if n.args and isinstance(n.args[0], fx.Node) else None
            if stem is not None and isinstance(m, _NONLINEAR_MODULES) and not isinstance(m, nn.Softmax | nn.LogSoftmax):
                sp.mark([stem])  # an activation between the convolutions of a stem (Whisper's, wav2vec's)
                channels_first[n.name] = stem
                space[n.name] = None
                continue
            if stem is not None and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for leaf in ("weight", "bias", "running_mean", "running_var"):  # statistics of each channel
                    if getattr(m, leaf, None) is not None:
                        bind(f"{n.target}.{leaf}", [stem])
                channels_first[n.name] = stem
                space[n.name] = None
                continue
            if stem is not None and isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups == 1 and \
                    m.padding_mode == "zeros":
                s = sp.new(n.target)  # a convolution of a stem's channels: a space of its own, read by the next
                bind(f"{n.target}.weight", [s, stem] + [None] * (m.weight.ndim - 2))
                if m.bias is not None:
                    bind(f"{n.target}.bias", [s])
                channels_first[n.name] = s
                space[n.name] = None
                continue
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in channels_first and \
                    not isinstance(m, _PASS_MODULES):
                raise NotATransformerError(f"{where}: a {type(m).__name__} on a convolution's channels-first "
                                           f"output; the stream tracer follows a patch embedding's channels "
                                           f"through flatten(2) and transpose(1, 2) into the tokens' features"
                                           f"{_hint(model)}")
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                if src != FIXED or m.groups != 1 or m.padding_mode != "zeros":
                    raise NotATransformerError(f"{where}: the stream tracer follows a convolution only on the "
                                               f"model's input (a patch embedding; ungrouped, zero-padded)"
                                               f"{_hint(model)}")
                s = sp.new(n.target)
                bind(f"{n.target}.weight", [s] + [None] * (m.weight.ndim - 1))
                if m.bias is not None:
                    bind(f"{n.target}.bias", [s])
                channels_first[n.name] = s
                space[n.name] = None
            elif isinstance(m, nn.Linear):
                s = linears[n.target] = sp.new(n.target)
                bind(f"{n.target}.weight", [s, src])
                if m.bias is not None:
                    bind(f"{n.target}.bias", [s])
                space[n.name] = s
            elif isinstance(m, nn.Embedding | nn.EmbeddingBag):  # a bag pools its rows feature by feature
                s = sp.new(n.target)
                bind(f"{n.target}.weight", [None, s])
                space[n.name] = s
            elif isinstance(m, nn.LayerNorm | nn.RMSNorm) and n.args[0].name in att.headed:
                space[n.name] = _head_norm_module(n, m, src, sp, att, bind, where, model)
            elif isinstance(m, nn.LayerNorm | nn.RMSNorm):
                shape = tuple(m.normalized_shape)
                if len(shape) != 1 or _last(n.args[0]) != shape[0]:
                    raise TracingError(f"{where}: a norm must normalise the last axis only{_hint(model)}")
                scale = f"{n.target}.weight" if getattr(m, "weight", None) is not None else None
                shift = f"{n.target}.bias" if getattr(m, "bias", None) is not None else None
                for p in (scale, shift):
                    if p:
                        bind(p, [src])
                norms.append(Norm(src, scale, shift, isinstance(m, nn.LayerNorm), _readers(gm, n, live)))
                space[n.name] = src
            elif isinstance(m, nn.RNNBase):
                recurrent[n.name] = _recurrent_layer(n, m, src, sp, bind, space, where, model)
                space[n.name] = None
            elif isinstance(m, nn.GLU):
                space[n.name] = _gated_halves(n, n.args[0], src, m.dim, sp, att, where, model)
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
            if n.name in rms_statistics and rms_statistics[n.name].name not in att.headed:
                space[n.name] = None  # x * rsqrt(mean(x ** 2) + eps)'s statistic: a number per token
                continue
            if n.name in rms_of and space.get(rms_of[n.name].name) is not None and \
                    rms_of[n.name].name not in att.headed:  # (an RMSNorm over each head's units: as before)
                space[n.name] = space[rms_of[n.name].name]  # x / rms(x): every orthogonal map keeps it
                continue
            scaled = _rms_scale(n, rms_of, params_of, gm)
            if scaled is not None and space.get(scaled.name) is not None and not sp.is_fixed(space[scaled.name]) \
                    and scaled.name not in att.headed:
                weight = next(a for a in n.args if isinstance(a, fx.Node) and a.name in params_of)
                src = sp.union(space[scaled.name], space[weight.name])  # the RMSNorm's scale: a norm's weight
                norms.append(Norm(src, params_of[weight.name], None, False, _readers(gm, n, live)))
                space[n.name] = src
                continue
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in recurrent and not reads_shape(n):
                _recurrent_part(n, recurrent, space, where, model)
                continue
            if n.target in _CONVOLUTIONS and _conv_function(n, channels_first, space, binds, params_of, sp):
                continue
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in channels_first and not reads_shape(n):
                _channels_first_op(n, channels_first, space, sp, where, model)
                continue
            if routing.follow(n, space):  # expert ids: the values of a router's top-k
                continue
            if groups.follow(n, space, sp, heads, where, _hint(model)):  # group-limited routing (DeepSeek-V3's)
                continue
            vector = [a for a in n.args[:2] if isinstance(a, fx.Node) and a.name in kept] if n.target in _ADD else []
            other = [a for a in n.args[:2] if isinstance(a, fx.Node) and a.name not in kept]
            if len(vector) == 1 and len(n.args) == 2 and len(other) == 1 and space.get(other[0].name) is not None \
                    and not sp.is_fixed(space[other[0].name]) and _last(other[0]) == _last(vector[0]):
                bind(kept[vector[0].name], [space[other[0].name]])  # a saved bias per unit (an expert's, for the
                space[n.name] = space[other[0].name]                # router's choice): it moves with the units
                continue
            if n.target in _PARAMETER_CASTS and n.args and isinstance(n.args[0], fx.Node) and \
                    n.args[0].name in params_of and len(tensor_args(n)) == 1:
                params_of[n.name] = params_of[n.args[0].name]  # ``self.weight.type(torch.float32)``: the same
                space[n.name] = space[n.args[0].name]          # parameter, in another dtype (a router's, in float)
                continue
            if _transposes_matrix(n) and n.args[0].name in params_of and all(
                    u.op in ("call_function", "call_method") and (u.target in _MATMUL or u.target is F.linear)
                    and (u.args[1:2] == (n,) or u.kwargs.get("weight") is n) for u in n.users):
                params_of[n.name] = params_of[n.args[0].name]  # ``F.linear(x, self.proj.t())``: read transposed
                transposed.add(n.name)
                space[n.name] = space[n.args[0].name]
                continue
            args = tensor_args(n)
            spaces = [space[a.name] for a in args]
            target = n.target
            if args and not sp.is_fixed(spaces[0]) and (routing.route(n, spaces[0], sp) or routing.pick(n, spaces[0])):
                space[n.name] = FIXED  # sorted gate values and the ids of their experts; one expert's gate value
                continue
            if target is F.glu and args:
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else -1)
                space[n.name] = _gated_halves(n, args[0], spaces[0], dim, sp, att, where, model)
                continue
            if _attention_parts(n, args, spaces, sp, space, att, heads, where, model):
                continue
            if _parameter_product(n, space, binds, params_of, sp, bias_pieces, transposed):
                continue
            if target in _NEW_CONSTANTS:  # ``weight.new_zeros(...)``: a constant of the tensor's type
                space[n.name] = None
                continue
            if target in _FUNCTIONAL_NORMS and args and args[0] is n.args[0]:
                norms.append(_functional_norm(n, gm, spaces[0], params_of, binds, sp, where, model, live))
                space[n.name] = spaces[0]
                continue
            if target in INDEX_ADD and args and index_add_space(n, space, sp) is not NotImplemented:
                space[n.name] = index_add_space(n, space, sp)  # tokens back from their experts
                if target == "index_add_":  # in place: the buffer (zeros, no features yet) now holds them
                    space[n.args[0].name] = space[n.name]
            elif target is operator.setitem and args and args[0] is n.args[0] and _indexes_tokens(n) and \
                    isinstance(n.args[2], fx.Node) and all(sp.is_fixed(space[a.name]) for a in args[1:-1]):
                # ``out[rows] = y``: y's features are out's (a buffer of zeros has none before)
                space[n.args[0].name] = sp.union(spaces[0], space.get(n.args[2].name))
                space[n.name] = None
            elif target in ("scatter", "scatter_", torch.scatter) and args and _dim_is_last(n, 1):
                space[n.name] = space[n.args[0].name]  # scattered back into the experts' positions (or groups')
            elif target in ("masked_fill", "masked_fill_", torch.masked_fill) and len(args) == 2 and \
                    args[0] is n.args[0]:
                if sp.is_fixed(spaces[1]) and _uniform_last(args[1]):  # whole tokens masked (a padding mask)
                    space[n.name] = spaces[0]
                    fill = n.args[2] if len(n.args) > 2 else n.kwargs.get("value")
                    if not (isinstance(fill, int | float) and fill == 0):
                        sp.mark(spaces[:1])  # filled with a number: permutations keep it, rotations not
                else:  # masked by a mask of its own units (a router's groups), or by a fixed one: then fixed
                    space[n.name] = sp.union(spaces[0], spaces[1])
                    sp.mark([space[n.name]])
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
            elif target in ("repeat_interleave", torch.repeat_interleave) and len(args) == 1 and n.args[0] is args[0] \
                    and n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None) is not None \
                    and not _dim_is_last(n, 2) and _last(n) == _last(args[0]):
                space[n.name] = spaces[0]  # tokens repeated (each once per expert it is routed to)
            elif target in _SCALING and len(args) == 2 and len(n.args) == 2 and sp.is_fixed(spaces[1]) and \
                    _uniform_last(args[1]):
                space[n.name] = spaces[0]  # scaled by a number held in a tensor (Gemma's sqrt(d)), or one per token
            elif target in (operator.mul, torch.mul, "mul") and len(args) == 2 and len(n.args) == 2 and \
                    sp.is_fixed(spaces[0]) and not sp.is_fixed(spaces[1]) and _uniform_last(args[0]):
                space[n.name] = spaces[1]  # a weight per token times features (a router's gate value)
            elif target in ("type_as", "to", "expand_as") and len(args) == 2 and n.args[0] is args[0] and \
                    (target != "expand_as" or _last(args[0]) == _last(n) or sp.is_fixed(spaces[0])):
                space[n.name] = spaces[0]  # the other tensor gives only its dtype (and device), or shape
            elif target in (operator.mul, torch.mul, "mul") and len(args) == 2 and FIXED not in spaces and \
                    1 in (_last(args[0]), _last(args[1])) and _last(args[0]) != _last(args[1]):
                one = 0 if _last(args[0]) == 1 else 1  # a gate of one unit scaling every feature (Qwen2-MoE's
                sp.fix([spaces[one]])                  # shared expert): the unit stays, the features are the other's
                space[n.name] = spaces[1 - one]
            elif target in (operator.mul, torch.mul, "mul", "mul_") and len(args) == 2 and FIXED not in spaces \
                    and _layer_scale(n, args, gm, params_of) is not None:
                s = sp.union(spaces[0], spaces[1])  # a LayerScale: folds into the layer it scales (no gating)
                gamma, writer = _layer_scale(n, args, gm, params_of)  # type: ignore[misc]
                norms.append(Norm(s, gamma, None, False, (), writers=(writer,)))
                space[n.name] = s
            elif target in (operator.mul, torch.mul, "mul") and len(args) == 2 and FIXED not in spaces:
                s = sp.union(spaces[0], spaces[1])  # an element-wise product (gating): one permutation
                sp.mark([s])
                space[n.name] = s
            elif all(sp.is_fixed(s) for s in spaces):
                space[n.name] = FIXED  # preprocessing of the input (patching, casting)
            elif target is operator.getitem and n.args[0].op == "call_module" and isinstance(
                    gm.get_submodule(n.args[0].target), nn.MultiheadAttention):
                space[n.name] = spaces[0] if n.args[1] == 0 else None
            elif (target in _ADD or target in (operator.sub, torch.sub, "sub")) and len(args) == 2 and \
                    len(n.args) == 2 and sum(sp.is_fixed(x) and (_last(a) or 1) == 1
                                             for a, x in zip(args, spaces, strict=True)) == 1 and \
                    not all(sp.is_fixed(x) for x in spaces):
                s = spaces[1] if sp.is_fixed(spaces[0]) else spaces[0]  # one number per token added to every
                sp.mark([s])                                            # feature (PhiMoE's router's threshold)
                space[n.name] = s
            elif target in (operator.truediv, torch.div, "div", torch.true_divide) and len(args) == 2 and \
                    FIXED not in spaces and not any(sp.is_fixed(x) for x in spaces):
                s = sp.union(spaces[0], spaces[1])  # an element-wise quotient: one permutation
                sp.mark([s])
                space[n.name] = s
            elif target in _COMPARISONS and len(args) == 1:
                sp.mark(spaces)  # a mask of the features' own units
                space[n.name] = spaces[0]
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
            elif target is operator.getitem and args[0] is n.args[0] and all(sp.is_fixed(s) for s in spaces[1:]) \
                    and _last(n) == _last(args[0]) and _indexes_tokens(n):
                space[n.name] = spaces[0]  # the tokens an index picks (those routed to one expert)
            elif target in _CONVOLUTIONS:  # a convolutional network's layer written as a function
                raise NotATransformerError(f"{where}: a convolution on features; the stream tracer follows one "
                                           f"on the model's input only (a patch embedding){_hint(model)}")
            else:
                raise TracingError(f"{where}: the stream tracer cannot follow this operation on features"
                                   + _hint(model))
        elif n.op == "output":  # the logits (of an output object that also carries caches: only they)
            sp.fix(s for a in _output_nodes(n) if space.get(a.name) is not None for s in _segments(space[a.name]))
    for k, v in model.named_parameters():  # unused by forward: left as they are
        binds.setdefault(k, [None] * v.ndim)
    unplaced = set(att.per_head.values()) - set(att.sink_orders)
    if unplaced:
        raise TracingError(f"a value per head joined to the attention scores (a sink) whose scores never weighed "
                           f"the values the tracer follows (scores @ v){_hint(model)}")
    packed = {sp.find(s): parts for s, parts in att.packed.items()}  # by class: a bias added joins the layer's
    alternating = {sp.find(s): parts for s, parts in att.alternating.items()}
    for param, (layer, index, sizes) in bias_pieces.items():  # a bias concatenated from parameters (BEiT's)
        parts = packed.get(sp.find(layer))
        if parts is None or [sp.size[q] for q in parts] != sizes:
            raise TracingError(f"the bias {param} is one of the pieces {sizes} of a layer's bias concatenated from "
                               f"parameters, which the tracer follows where the layer's output is split into "
                               f"those pieces (query, key and value){_hint(model)}")
        binds[param] = [parts[index]]
    for param, entries in binds.items():  # a layer whose output was split: its rows are packed segments
        binds[param] = [Interleaved(alternating[sp.find(e)]) if isinstance(e, int) and sp.find(e) in alternating
                        else packed.get(sp.find(e), e) if isinstance(e, int) else e for e in entries]
        if any(e in att.sink_orders for e in entries if isinstance(e, int)):  # a value per head, a head table
            binds[param] = [att.sink_orders.get(e, e) if isinstance(e, int) else e for e in entries]
    norms = [replace(m, readers=None if m.readers is None else tuple(
        replace(r, weight=aliases.get(r.weight, r.weight), bias=r.bias and aliases.get(r.bias, r.bias))
        for r in m.readers)) for m in norms]
    spec, folds = spec_from_spaces(sp, binds, norms, heads, experts, _hint(model), tied=tied, cut=held.cut())
    gates = {}
    held_gates = {sp.find(g) for g in held.gates.values()}
    for gate_space in routing.selecting:
        if sp.find(gate_space) in held_gates:
            continue  # its experts are the parameters' slices
        openers = [t for t, s in linears.items() if sp.find(s) == sp.find(gate_space)]
        if len(openers) != 1:
            raise TracingError(f"node {routing.selecting[gate_space]!r} selects experts by ids that no single linear "
                               f"gate gives (found {openers}){_hint(model)}")
        gates[openers[0]] = gm.get_submodule(openers[0]).out_features
    if gates:
        spec = stack_experts(spec, model, gm, gates, _hint(model))
    return spec, folds


def _head_norm_module(n: fx.Node, m: nn.LayerNorm | nn.RMSNorm, src: int, sp: FeatureSpaces, att: _HandAttention,
                      bind: Any, where: str, model: nn.Module) -> int:
    """An ``nn.LayerNorm(head_dim)`` or ``nn.RMSNorm(head_dim)`` on per-head queries or keys (OLMo-2's, Qwen3's,
    ViT-22B's query/key norms as modules): each head normalised on its own units, so the heads still move; the
    weight (and bias), one per head_dim unit shared by every head, stay in place and keep each head's units in
    their order (rigid), as the norm written out does (:func:`combinability_torch.trace_attention._head_norm`)."""
    h, dh = att.headed[n.args[0].name]
    if tuple(m.normalized_shape) != (dh,) or _last(n.args[0]) != dh:
        raise TracingError(f"{where}: a {type(m).__name__} of shape {tuple(m.normalized_shape)} on per-head features "
                           f"of {h} heads of {dh} units; the tracer follows a norm over each head's units "
                           f"(normalized_shape=({dh},)){_hint(model)}")
    for leaf in ("weight", "bias"):
        if getattr(m, leaf, None) is not None:
            bind(f"{n.target}.{leaf}", [None])
    sp.rigid([src])
    sp.mark([src])
    att.headed[n.name] = att.headed[n.args[0].name]
    if n.args[0].name in att.shared:
        att.shared[n.name] = att.shared[n.args[0].name]
    return src


def _kept_vectors(model: nn.Module) -> set[str]:
    """The model's persistent floating-point buffers of one axis (saved with it, as GLM-4.5's and LFM2's
    ``e_score_correction_bias``, one value per expert for routing): one added to features is bound to their
    space, as a bias is, so that it moves with them; read any other way, it is a constant."""
    return {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor) and
            not isinstance(v, nn.Parameter) and v.ndim == 1 and v.is_floating_point()}


def _indexes_tokens(n: fx.Node) -> bool:
    """``x[rows]``, ``x[None, rows]``: an index by tensors and ``None`` that leaves the last axis whole."""
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    ndim = _ndim(n.args[0]) or 0
    axes = sum(1 for i in index if i is not None)
    return Ellipsis not in index and (axes < ndim or index[-1] == slice(None))


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


def _gated_halves(n: fx.Node, arg: fx.Node, s: Any, dim: Any, sp: FeatureSpaces, att: _HandAttention, where: str,
                  model: nn.Module) -> int:
    """A GLU over the features (``F.glu(x, -1)``, ``nn.GLU()``): the first half of a layer's units gated by
    the sigmoid of the second, ``a * sigmoid(b)``. Both halves move by one permutation (as a split into
    two parts multiplied), which the output keeps."""
    nd, last = _ndim(arg) or 0, _last(arg) or 0
    if dim not in (-1, nd - 1) or last % 2:
        raise TracingError(f"{where}: a GLU is followed over the features (the last axis, of even size){_hint(model)}")
    if s in (None, FIXED) or s in att.packed or sp.find(s) != s:
        raise TracingError(f"{where}: a GLU is followed on a layer's own output{_hint(model)}")
    first, second = att.parts(sp, s, 2, last // 2)
    gated = sp.union(first, second)
    sp.mark([gated])  # a product and a sigmoid: permutations only
    return gated


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


def _passes_token_ops(gm: fx.GraphModule, n: fx.Node, source: fx.Node) -> bool:
    """Whether ``n`` is ``source``, or ``source`` through the pooling, token indexing and dropout that
    :func:`_through_token_ops` looks through."""
    while n is not source:
        passes = (n.op in ("call_function", "call_method") and (n.target in _TOKEN_OPS or n.target is
                  operator.getitem or n.target in _PASS) and _keeps_last(n)) or (
                  n.op == "call_module" and isinstance(gm.get_submodule(n.target), _PASS_MODULES))
        if not passes or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        n = n.args[0]
    return True


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
                  u.op == "call_module" and isinstance(gm.get_submodule(u.target), _PASS_MODULES)) or (
                  u.target in ("view", "reshape", torch.reshape) and u.args and isinstance(u.args[0], fx.Node)
                  and _last(u) is not None and _last(u) == _last(u.args[0]))  # GPT-2's x.view(-1, d) for addmm
        out += _through_token_ops(gm, list(u.users)) if passes else [u]
    return out


def _parameter_product(n: fx.Node, space: dict[str, Any], binds: dict[str, list[Any]], params_of: dict[str, str],
                       sp: FeatureSpaces, bias_pieces: dict[str, tuple[int, int, list[int]]] | None = None,
                       transposed: Collection[str] = ()) -> bool:
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
    elif target is F.linear:  # F.linear(input, weight, bias), any of them by keyword (timm's BEiT)
        x, w = (a[0] if a else n.kwargs.get("input")), (a[1] if len(a) > 1 else n.kwargs.get("weight"))
        bias, w_in = (a[2] if len(a) > 2 else n.kwargs.get("bias")), 1  # W: (out, in)
        if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
            return False
    else:
        return False
    name = params_of.get(w.name)
    if name is None or space.get(x.name) is None or len(binds[name]) != 2:
        return False
    if w.name in transposed:  # the matrix read transposed: its other axis is the input's
        w_in = 1 - w_in
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
    elif isinstance(bias, fx.Node) and bias_pieces is not None and _concatenated(bias):
        pieces = list(bias.args[0])  # BEiT's torch.cat((q_bias, k_bias, v_bias)): a piece per part of the rows
        sizes = [int((_shape_of(q) or (0,))[0]) for q in pieces]
        for index, piece in enumerate(pieces):
            if piece.name in params_of:
                bias_pieces[params_of[piece.name]] = (out, index, sizes)
    space[n.name] = out
    return True


def _read_as_matrix(n: fx.Node) -> bool:
    """Whether every use of the parameter ``n`` is the matrix of a product (:func:`_parameter_reader`: ``F.linear(x,
    W)``, ``x @ W``, ``torch.addmm(b, x, W)``), read as it is or transposed (``W.t()``), or the table of
    ``F.embedding``: uses whose axes :func:`_parameter_product` binds."""
    def reads(u: fx.Node) -> bool:
        if u.target in (F.embedding, torch.embedding):
            return len(u.args) >= 2 and u.args[1] is n and u.args[0] is not n
        reader = _parameter_reader(u)
        return reader is not None and reader.weight == str(n.target) and not (u.args and u.args[0] is n)

    return bool(n.users) and all(
        bool(u.users) and all(reads(w) for w in u.users) if _transposes_matrix(u) and u.args[0] is n else reads(u)
        for u in n.users)


def _transposes_matrix(n: fx.Node) -> bool:
    """``W.t()``, ``W.T``, ``torch.t(W)`` or ``W.transpose(0, 1)`` of a matrix ``W``."""
    if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], fx.Node) or \
            _ndim(n.args[0]) != 2:
        return False
    if n.target in ("t", torch.t) or (n.target is getattr and n.args[1:] in (("T",), ("mT",))):
        return True
    return n.target in ("transpose", torch.transpose) and {int(d) % 2 for d in n.args[1:3]
                                                           if isinstance(d, int)} == {0, 1}


def _concatenated(bias: fx.Node) -> bool:
    """Whether ``bias`` is ``torch.cat`` of vectors (parameters, and constants such as BEiT's zero key bias)."""
    return bias.target is torch.cat and bool(bias.args) and isinstance(bias.args[0], tuple | list) and \
        (bias.kwargs.get("dim", bias.args[1] if len(bias.args) > 1 else 0) in (0, -1)) and \
        all(isinstance(q, fx.Node) and len(_shape_of(q) or ()) == 1 for q in bias.args[0])


#: Norms written with their module's parameters (nanoGPT's ``LayerNorm``: ``F.layer_norm(x, self.weight.shape,
#: self.weight, self.bias, 1e-5)``), and the positions of their weight and bias arguments.
_FUNCTIONAL_NORMS = {F.layer_norm: (2, 3), F.rms_norm: (2, None)}


def _functional_norm(n: fx.Node, gm: fx.GraphModule, src: Any, params_of: dict[str, str],
                     binds: dict[str, list[Any]], sp: FeatureSpaces, where: str, model: nn.Module,
                     live: set[str]) -> Norm:
    """The :class:`Norm` of ``F.layer_norm`` / ``F.rms_norm`` over the last axis: its weight and bias (parameters
    read directly, or none) take the normalised space, as a LayerNorm module's do (``live``: see :func:`_readers`)."""
    names = ("input", "normalized_shape", "weight", "bias" if n.target is F.layer_norm else "eps")
    args = {**dict(zip(names, n.args, strict=False)), **n.kwargs}
    last = _last(n.args[0])
    shape = args.get("normalized_shape")
    if isinstance(shape, fx.Node):  # ``self.weight.shape``: the shape of the parameter read
        owner = shape.args[0] if shape.target is getattr and shape.args[1:] == ("shape",) else None
        shape = tuple(gm.get_parameter(params_of[owner.name]).shape) if isinstance(owner, fx.Node) and \
            owner.name in params_of else None
    elif isinstance(shape, tuple | list):  # ``(x.shape[-1],)``: sizes read on the example
        shape = example_value(shape)
    leaves = [args.get(k) for k in ("weight", "bias")]
    if shape is None or tuple(shape) != (last,) or any(
            v is not None and not (isinstance(v, fx.Node) and v.name in params_of) for v in leaves):
        raise TracingError(f"{where}: a functional norm must normalise the last axis only ({last}), with parameters "
                           f"read directly or none (got normalized_shape {shape}){_hint(model)}")
    scale, shift = (params_of[v.name] if v is not None else None for v in leaves)
    for p in (scale, shift):
        if p:
            sp.union(binds[p][0], src)
    return Norm(src, scale, shift, n.target is F.layer_norm, _readers(gm, n, live))


def _conv_function(n: fx.Node, channels_first: dict[str, int], space: dict[str, Any], binds: dict[str, list[Any]],
                   params_of: dict[str, str], sp: FeatureSpaces) -> bool:
    """``F.conv1d/2d/3d(x, self.weight, self.bias, ...)`` of an ungrouped convolution on the model's input or a
    stem's channels (Whisper's ``Conv1d`` subclass): its output channels open a space, its input channels take
    the stem's. Return whether ``n`` was one."""
    x = n.args[0] if n.args else None
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and w.name in params_of and groups == 1):
        return False
    stem = channels_first.get(x.name)
    if stem is None and space.get(x.name) is not FIXED:
        return False
    name = params_of[w.name]
    out = sp.new(name.rpartition(".")[0] or name)
    binds[name] = [out, stem] + [None] * (len(binds[name]) - 2)  # (out, in, *kernel)
    if isinstance(b, fx.Node) and b.name in params_of:
        binds[params_of[b.name]] = [sp.union(out, binds[params_of[b.name]][0])]
    channels_first[n.name] = out
    space[n.name] = None
    return True


def _channels_first_op(n: fx.Node, channels_first: dict[str, int], space: dict[str, Any], sp: FeatureSpaces,
                       where: str, model: nn.Module) -> None:
    """Follow a patch embedding's output ``(n, c, h, w)`` to tokens ``(n, h * w, c)``.

    ``flatten(2)`` (or a reshape keeping the first two axes) keeps the channels on axis 1;
    ``transpose(1, 2)``, ``permute(0, 2, 1)`` or ``permute(0, 2, 3, 1)`` moves them last,
    where the stream's features are; anything else is refused.
    """
    s = channels_first[n.args[0].name]
    src, out = _shape_of(n.args[0]), _shape_of(n)
    target = n.target
    if target in _NONLINEAR and target not in (F.softmax, F.log_softmax, torch.log_softmax, torch.softmax, "softmax",
                                                "log_softmax") and len([a for a in n.all_input_nodes]) == 1:
        sp.mark([s])  # F.gelu between the convolutions of a stem (Whisper's)
        channels_first[n.name] = s
        space[n.name] = None
        return
    dims = [int(d) for d in n.args[1:]] if all(isinstance(d, int) for d in n.args[1:]) else None
    if target == "permute" and len(n.args) == 2 and isinstance(n.args[1], tuple | list):
        dims = [int(d) for d in n.args[1]]
    if _pools_positions(n, src, out):  # max or mean over the positions (a text CNN's max over time)
        if out is not None and len(out) == 2:  # the positions dropped: the channels are the features
            space[n.name] = s
        else:
            channels_first[n.name] = s
            space[n.name] = None
        return
    if src is None or out is None:
        raise TracingError(f"{where}: shapes unknown on a convolution's output{_hint(model)}")
    nd = len(src)
    if target in (_FLATTEN | {"reshape", "view", torch.reshape}) and len(out) >= 3 and out[:2] == src[:2]:
        channels_first[n.name] = s  # (n, c, h, w) -> (n, c, h * w): the channels stay on axis 1
        space[n.name] = None
        return
    if target in (_FLATTEN | {"reshape", "view", "squeeze", torch.reshape, torch.squeeze}) and len(out) == 2 and \
            out[:2] == src[:2]:
        space[n.name] = s  # (n, c, 1) -> (n, c): one position left, the channels are the features
        return
    moved_last = (target in ("transpose", torch.transpose) and dims is not None and len(dims) == 2 and nd == 3
                  and {d % nd for d in dims} == {1, 2}) or (
                  target in ("permute", torch.permute) and dims is not None and [d % nd for d in dims] ==
                  [0, *range(2, nd), 1])
    if moved_last:
        space[n.name] = s
        return
    raise NotATransformerError(f"{where}: an operation on a convolution's channels-first output; the stream tracer "
                               f"follows a patch embedding's channels through flatten(2) and transpose(1, 2) (or "
                               f"permute(0, 2, 3, 1)) into the tokens' features{_hint(model)}")


_POSITION_POOLS = {F.max_pool1d, F.avg_pool1d, F.adaptive_max_pool1d, F.adaptive_avg_pool1d, F.max_pool2d,
                   F.avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool2d}
_REDUCTIONS = {"mean", "amax", "max", torch.mean, torch.amax, torch.max}


def _pools_positions(n: fx.Node, src: tuple[int, ...] | None, out: tuple[int, ...] | None) -> bool:
    """Whether ``n`` pools a channels-first map ``src`` over its positions, each channel alone: a pooling
    function, a mean or maximum over the positional axes (kept or dropped), or the values of ``torch.max``
    over them (``[0]``, ``.values``)."""
    source = n.args[0] if n.args else None
    if isinstance(source, fx.Node) and source.target in ("max", torch.max) and len(n.args) > 1 and \
            ((n.target is operator.getitem and n.args[1] == 0) or (n.target is getattr and n.args[1] == "values")):
        return True  # the maxima of a ``max`` over the positions, checked where it was taken
    if src is None:
        return False
    if n.target in _POSITION_POOLS:
        return out is not None and out[:2] == src[:2] and len(out) == len(src)
    if n.target in _REDUCTIONS and len(src) >= 3:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        dims = dim if isinstance(dim, tuple | list) else (dim,)
        return all(isinstance(d, int) for d in dims) and {d % len(src) for d in dims} == set(range(2, len(src)))
    return False


_POW = {torch.pow, operator.pow, "pow"}
_CASTS = {"to", "float", "type", "double", "half", "bfloat16", "type_as"}


def _uncast(v: Any) -> Any:
    """``v`` before the casts applied to it (``x.to(torch.float32)``, ``x.float()``)."""
    while isinstance(v, fx.Node) and v.op == "call_method" and v.target in _CASTS and v.args:
        v = v.args[0]
    return v


def _rms_statistic(d: Any, x: fx.Node) -> set[str] | None:
    """The nodes of ``rsqrt(mean(x ** 2, -1, keepdim=True) + eps)`` ending at ``d`` (casts of ``x`` allowed, and
    ``x * x``), or None where ``d`` is not that statistic of ``x``."""
    if not (isinstance(d, fx.Node) and d.target in (torch.rsqrt, "rsqrt") and d.args):
        return None
    c = d.args[0]
    if not (isinstance(c, fx.Node) and c.target in (operator.add, torch.add, "add") and len(c.args) == 2):
        return None
    b = next((v for v in c.args if isinstance(v, fx.Node)), None)
    eps = next((v for v in c.args if not isinstance(v, fx.Node)), None)
    if b is None or not isinstance(eps, int | float) or b.target not in (torch.mean, "mean") or not b.args:
        return None
    dim = b.kwargs.get("dim", b.args[1] if len(b.args) > 1 else None)
    keep = b.kwargs.get("keepdim", b.args[2] if len(b.args) > 2 else False)
    if dim not in (-1, [-1], (-1,)) or not keep:
        return None
    a = b.args[0]
    if not isinstance(a, fx.Node):
        return None
    if a.target in _POW and len(a.args) == 2 and a.args[1] == 2:
        base = a.args[0]
    elif a.target in (operator.mul, torch.mul, "mul") and len(a.args) == 2 and a.args[0] is a.args[1]:
        base = a.args[0]
    elif a.target in ("square", torch.square) and a.args:
        base = a.args[0]
    else:
        return None
    if _uncast(base) is not _uncast(x):
        return None
    return {d.name, c.name, b.name, a.name} | ({base.name} if base is not x and base is not _uncast(x) else set())


def _rms_normalised(gm: fx.GraphModule) -> tuple[dict[str, fx.Node], dict[str, fx.Node]]:
    """RMSNorms written out (Llama's, T5's: ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``): each
    normalised output's node -> ``x``, and each node of their statistics (numbers per token) -> ``x``."""
    out: dict[str, fx.Node] = {}
    statistics: dict[str, fx.Node] = {}
    for e in gm.graph.nodes:
        if e.op not in ("call_function", "call_method") or e.target not in (operator.mul, torch.mul, "mul") or \
                len(e.args) != 2:
            continue
        for x, d in (e.args, e.args[::-1]):
            chain = _rms_statistic(d, x) if isinstance(x, fx.Node) else None
            if chain is not None:
                out[e.name] = x
                statistics.update(dict.fromkeys(chain, x))
                break
    return out, statistics


def _rms_scale(n: fx.Node, rms_of: dict[str, fx.Node], params_of: dict[str, str], gm: fx.GraphModule) -> Any:
    """The normalised features ``n`` scales by a learned vector (an RMSNorm's weight: ``self.weight * h``, through
    casts of ``h``), or None."""
    if n.target not in (operator.mul, torch.mul, "mul") or len(n.args) != 2:
        return None
    weights = [a for a in n.args if isinstance(a, fx.Node) and a.name in params_of]
    others = [a for a in n.args if isinstance(a, fx.Node) and a.name not in params_of]
    if len(weights) != 1 or len(others) != 1:
        return None
    h = others[0]
    while h.name not in rms_of and h.op == "call_method" and h.target in _CASTS and h.args:
        h = h.args[0]
    source = _uncast(weights[0])
    value = gm.get_parameter(source.target) if isinstance(source, fx.Node) and source.op == "get_attr" else None
    if h.name not in rms_of or value is None or value.ndim != 1:
        return None
    return others[0]


def _layer_scale(n: fx.Node, args: list[fx.Node], gm: fx.GraphModule,
                 params_of: dict[str, str]) -> tuple[str, Reader] | None:
    """``(γ, the layer it scales)`` where ``n`` multiplies a linear layer's output, read by nothing else (through
    dropout), by a learned vector of its features (a transformer's LayerScale: timm's ``ls1``, CaiT's, DINOv2's
    ``x * self.gamma``); None for any other product."""
    scales = [a for a in args if a.name in params_of]
    if len(scales) != 1 or len(args) != 2:
        return None
    gamma = scales[0]
    value = gm.get_parameter(gamma.target)
    if value.ndim < 1 or any(v != 1 for v in value.shape[:-1]):
        return None
    source = next(a for a in args if a is not gamma)
    while len(source.users) == 1 and ((source.op == "call_module" and isinstance(
            gm.get_submodule(source.target), _PASS_MODULES)) or source.target is F.dropout):
        source = source.args[0]
    if len(source.users) != 1 or source.op != "call_module" or not isinstance(gm.get_submodule(source.target),
                                                                              nn.Linear):
        return None
    m = gm.get_submodule(source.target)
    return params_of[gamma.name], Reader(f"{source.target}.weight", 0,
                                         f"{source.target}.bias" if m.bias is not None else None)


def _parameter_name(n: Any) -> str | None:
    """The parameter a node is (a ``get_attr``, or a cast of one: ``self.weight.float()``); None otherwise."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in _PARAMETER_CASTS and n.args:
        n = n.args[0]
    return str(n.target) if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _matrix_read(n: Any) -> tuple[str | None, bool]:
    """The parameter a product's matrix operand is, and whether it is read transposed (``W.t()``)."""
    if isinstance(n, fx.Node) and _transposes_matrix(n):
        return _parameter_name(n.args[0]), True
    return _parameter_name(n), False


def _parameter_reader(u: fx.Node) -> Reader | None:
    """A layer written with its parameters that reads a norm's output as its first operand, as a
    :class:`Reader`: ``x @ W`` and ``torch.addmm(b, x, W)`` (GPT-2's ``Conv1D``) with ``W`` of ``(in, out)``,
    ``F.linear(x, W, b)`` with ``W`` of ``(out, in)``; None for any other node."""
    a = u.args
    if u.op != "call_function" and u.op != "call_method":
        return None
    if u.target in _MATMUL and len(a) == 2:
        matrix, axis, bias = a[1], 0, None
    elif u.target in (torch.addmm, "addmm") and len(a) == 3:
        matrix, axis, bias = a[2], 0, _parameter_name(a[0])
    elif u.target is F.linear and (len(a) >= 2 or "weight" in u.kwargs):
        matrix, axis = (a[1] if len(a) > 1 else u.kwargs["weight"]), 1
        bias = _parameter_name(a[2] if len(a) > 2 else u.kwargs.get("bias"))
    else:
        return None
    weight, flipped = _matrix_read(matrix)
    shape = _shape_of(matrix)
    if weight is None or shape is None or len(shape) != 2:
        return None
    return Reader(weight, 1 - axis if flipped else axis, bias)


def _readers(gm: fx.GraphModule, node: fx.Node, live: set[str]) -> tuple[Reader, ...] | None:
    """The layers reading a norm's output (through pooling and token indexing); None if one is not a layer.
    ``live``: the nodes the logits are computed from (:func:`~combinability_torch.trace.feeding_logits`)."""
    readers = []
    for u in _through_token_ops(gm, list(node.users)):
        if u.op != "output" and u.name not in live:
            continue  # another output's work (a mixture's auxiliary loss): not the logits'
        if u.op == "output" and not any(_passes_token_ops(gm, a, node) for a in _output_nodes(u)):
            continue  # returned beside the logits (the final hidden states), which the library does not read
        um = gm.get_submodule(u.target) if u.op == "call_module" else None
        written = _parameter_reader(u)
        if written is not None:  # a layer written with its parameters (CLIP's ``x @ self.text_projection``)
            readers.append(written)
        elif isinstance(um, nn.Linear):
            readers.append(Reader(f"{u.target}.weight", 1, f"{u.target}.bias" if um.bias is not None else None))
        elif isinstance(um, nn.MultiheadAttention):
            readers.append(Reader(f"{u.target}.in_proj_weight", 1,
                                  f"{u.target}.in_proj_bias" if um.in_proj_bias is not None else None))
        else:
            return None
    return tuple(readers)
