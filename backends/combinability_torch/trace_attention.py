"""Attention in the stream tracer: ``nn.MultiheadAttention`` and attention written out by hand.

``nn.MultiheadAttention`` (self-attention, packed ``in_proj_weight``) reads one space and
writes a new one, with its heads as block permutations: the query/key rows share a
within-head permutation, the value rows and ``out_proj`` columns another, and both move
with the head (:func:`_attention`). Attention written out by hand (:func:`_attention_parts`: a
split of one layer's features into query, key and value, views into heads,
``F.scaled_dot_product_attention`` or ``softmax(q @ k.transpose(-2, -1)) @ v``) gives the same
heads; rotary embeddings make the query/key heads rigid and grouped-query attention makes the
query heads blocks of the key/value heads' order (:func:`_rotary_or_repeated`). Called node by
node from :func:`combinability_torch.trace_stream.stream_symmetries`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from combinability.errors import TracingError
from combinability.feature_spaces import FIXED, FeatureSpaces, Heads
from combinability_torch.fx_vocabulary import (
    _ADD,
    _MATMUL,
    _SCALING,
    _dim_is_last,
    _hint,
    _keeps_last,
    _last,
    _ndim,
    _permute_keeps_last,
    _shape_of,
)
from combinability_torch.trace import example_value, permute_dims, reads_shape


def _einsum_product(n: fx.Node, att: _HandAttention) -> tuple[fx.Node, fx.Node] | None:
    """The two factors of an attention product written with ``torch.einsum``, as ``@`` would take them, or None.

    Scores ``einsum("bhqd,bhkd->bhqk", q, k)`` (also with heads on axis 2, ``"bqhd,bkhd->bhqk"``): two
    per-head operands contracted over their last axis, head_dim; the key is then read as ``kᵀ``. Mixing
    ``einsum("bhqk,bhkd->bhqd", weights, v)``: scores contracted over their last axis, the keys, with
    per-head values.
    """
    if n.target not in (torch.einsum, "einsum") or not n.args or not isinstance(n.args[0], str):
        return None
    operands = list(n.args[1][0:2]) if len(n.args) == 2 and isinstance(n.args[1], tuple | list) else list(n.args[1:])
    equation = n.args[0].replace(" ", "")
    if len(operands) != 2 or not all(isinstance(a, fx.Node) for a in operands) or "->" not in equation or \
            "." in equation:
        return None
    inputs, output = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or any(len(p) != len(set(p)) for p in (*parts, output)):
        return None
    (left, right), (lhs, rhs) = operands, parts
    contracted = (set(lhs) & set(rhs)) - set(output)
    if len(contracted) != 1 or set(output) != (set(lhs) | set(rhs)) - contracted:
        return None
    letter = contracted.pop()
    if left.name in att.headed and right.name in att.headed and lhs[-1] == rhs[-1] == letter:
        att.keys.setdefault(right.name, att.headed[right.name])  # q kᵀ: the key read transposed
        return left, right
    if left.name in att.scores and right.name in att.headed and lhs[-1] == letter and rhs[-1] != letter:
        return left, right
    return None


def _number(a: Any) -> bool:
    """Whether ``a`` is a number: a constant, or one worked out from sizes (Whisper's ``(d // heads) ** -0.25``)."""
    return not isinstance(a, fx.Node) or a.meta.get("tensor_meta") is None


def _per_head(bias: fx.Node, scores: fx.Node) -> bool:
    """Whether ``bias``, added to (or masking) ``scores`` of shape ``(..., heads, q, k)``, may differ between
    heads: more than one entry on the heads axis (ALiBi's slopes, ``(1, heads, 1, k)``); a mask of
    ``(batch, 1, q, k)`` does not."""
    shape, target = _shape_of(bias), _shape_of(scores)
    if not shape or not target or len(target) < 3:
        return False
    axis = len(shape) - 3  # the heads axis, counted from the right as broadcasting does
    return axis >= 0 and shape[axis] > 1 and (bias.meta.get("tensor_meta") is None or
                                              getattr(bias.meta["tensor_meta"], "dtype", None) != torch.bool)


def _several_keys(keys: int | None, where: str, model: nn.Module) -> None:
    """Refuse attention over one key position: there softmax gives 1 whatever the scores, so the check of the
    derived symmetries (the model's outputs on ``example_input`` under a random map) could not see a wrong
    query/key binding (an ALiBi or per-head bias, a per-head temperature) and would let it through."""
    if keys == 1:
        raise TracingError(f"{where}: attention over a single position on example_input; the check of the derived "
                           f"symmetries needs attention at work: pass example_input with two or more tokens (more "
                           f"tokens than heads is best){_hint(model)}")


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
    shape = _shape_of(q)
    _several_keys(None if not shape or len(shape) < 2 else shape[-2] if m.batch_first or len(shape) == 2
                  else shape[0], where, model)
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
    #: a layer's features sliced along the last axis into parts that tile it (Phi-3's ``qkv[..., :q]``,
    #: ``qkv[..., q:q + kv]``, ``qkv[..., q + kv:]``) -> each slice's node name -> its part's space
    sliced: dict[str, dict[str, int]] = field(default_factory=dict)
    #: squares of per-head features (False) and statistics of them per head and token (True): a head's RMSNorm
    head_stats: dict[str, bool] = field(default_factory=dict)
    #: per-head features split into parts along head_dim (GPT-NeoX's ``qkv.chunk(3, dim=-1)``): tuples of parts
    split_heads: set[str] = field(default_factory=set)
    #: parts of heads stacked along a new last axis (GPT-J's ``stack((-x2, x1), -1)``) -> their heads
    interleaved: dict[str, int] = field(default_factory=dict)
    #: per-head features viewed as pairs of units, ``(..., head_dim // 2, 2)`` (Meta's llama, before
    #: ``view_as_complex``) -> their heads and head_dim
    paired: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: key/value heads on their way to being repeated for grouped-query attention (``k[:, :, None]``,
    #: expanded) -> (heads, head_dim, the new axis after the heads)
    repeating: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: per-head features (and kᵀ) of key/value heads repeated for grouped-query attention -> (heads, repeats)
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: grouped-query scores and their softmax -> (the query heads' order, the key/value heads' order)
    grouped: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: a layer's features read as alternating parts (GPT-OSS's ``gate_up[..., ::2]``, ``[..., 1::2]``) -> the parts
    alternating: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: a value per head viewed across the scores' axes, ``(1, heads, 1, 1)`` (GPT-OSS's attention sinks) -> its space
    per_head: dict[str, int] = field(default_factory=dict)
    #: scores with a value per head joined as one more key (and what follows from them) -> that value's space
    sunk: dict[str, int] = field(default_factory=dict)
    #: the space of a value per head joined to the scores -> the query heads' order it moves with
    sink_orders: dict[int, int] = field(default_factory=dict)
    #: scores with a bias that may differ between heads added (ALiBi's slope per head times the distance):
    #: the heads of their attention stay in place
    pinned: set[str] = field(default_factory=set)
    #: a table of a value per head and pair of positions, ``(1, heads, q, k)`` (T5's relative position
    #: bias: an embedding of position buckets, permuted) -> its heads' space
    head_table: dict[str, int] = field(default_factory=dict)
    #: keys, queries and values of one head read as plain features (Karpathy's ``Head`` modules, no view)
    single: set[str] = field(default_factory=set)

    def parts(self, sp: FeatureSpaces, layer: int, count: int, size: int) -> list[int]:
        """Open the spaces of ``count`` equal parts of ``layer``'s features (``<layer>.q``/``.k``/``.v`` for three)."""
        return self.sized_parts(sp, layer, [size] * count)

    def sized_parts(self, sp: FeatureSpaces, layer: int, sizes: list[int]) -> list[int]:
        """Open the spaces of parts of ``layer``'s features of these ``sizes`` (``.q``/``.k``/``.v`` for three)."""
        stem = sp.opener[sp.find(layer)]
        names = ("q", "k", "v") if len(sizes) == 3 else tuple(str(i) for i in range(len(sizes)))
        out = [sp.new(f"{stem}.{names[i]}", size, name=f"{stem}.{names[i]}") for i, size in enumerate(sizes)]
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
                                             self.interleaved, self.paired, self.repeating, self.parts_of,
                                             self.stacked))

    def passes(self, n: fx.Node) -> None:
        """``n`` passes its first argument on unchanged in kind (dropout, a cast)."""
        src = n.args[0].name if n.args and isinstance(n.args[0], fx.Node) else None
        for seen in (self.headed, self.keys, self.scores, self.shared, self.grouped, self.sunk):
            if src in seen:
                seen[n.name] = seen[src]  # type: ignore[index]
        if src in self.pinned:  # scores whose heads stay in place (ALiBi's bias, a temperature per head)
            self.pinned.add(n.name)


_BADDBMM = {torch.baddbmm, "baddbmm"}


#: Operations on attention scores that keep them scores: scaling, masking, softmax over keys, dropout.
_ON_SCORES = {operator.mul, operator.truediv, operator.add, torch.mul, torch.add, "add", "mul", "div", "masked_fill",
              "masked_fill_",
              operator.sub, torch.sub, "sub",
              torch.masked_fill, F.softmax, torch.softmax, "softmax", F.dropout, "float", "type_as", "contiguous", "to",
              "type", torch.where, torch.max, "max", torch.maximum, torch.tanh, "tanh"}  # tanh: Gemma-2's soft-capping


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
    # a cast to another tensor's type (``softmax(s.float()).type_as(q)``, Meta's llama) reads only its dtype
    operands = [scored] if target in ("type_as", "to") and scored is first else args
    summed = [a for a in n.args[:2] if isinstance(a, fx.Node)] if target in _ADD or target == "add" else []
    if isinstance(scored, fx.Node) and scored.name in att.head_table and len(summed) == 2 and \
            summed[1].name in att.scores:
        scored = summed[1]  # table + scores: the scores with the table added
    if isinstance(scored, fx.Node) and scored.name in att.scores and (
            target in _ON_SCORES or refolded or _max_values(n) or _drops_last_keys(n)) and \
            not any(a.name in headed or a.name in att.keys for a in operands):
        att.scores[n.name] = att.scores[scored.name]
        if scored.name in att.grouped:
            att.grouped[n.name] = att.grouped[scored.name]
        if scored.name in att.sunk:
            att.sunk[n.name] = att.sunk[scored.name]
        factors = [a for a in n.args[:2] if isinstance(a, fx.Node)] if target in _SCALING else []
        scaled = [a for a in factors if a is not scored and isinstance(space.get(a.name), int)
                  and not sp.is_fixed(space[a.name]) and int(np.prod(_shape_of(a) or (1,))) > 1]
        per_head = [a for a in scaled if _per_head(a, scored) and _of_parameters(a) and
                    all(d == 1 for d in (_shape_of(a) or ())[-2:])]
        if per_head and len(per_head) == len(scaled):  # a learned temperature per head, (heads, 1, 1): the heads
            sp.fix([space[a.name] for a in per_head])  # stay in place (each keeps its temperature), as ALiBi's
            att.pinned.add(n.name)
            scaled = []
        if scaled:  # a learned factor per head (a temperature): its axes would not move with the heads
            raise TracingError(f"{where}: attention scores scaled by {scaled[0].name!r} (a parameter or features); "
                               f"the tracer follows scores scaled by numbers and constants{_hint(model)}")
        placed = [a for a in summed if a is not scored and isinstance(space.get(a.name), int)
                  and not sp.is_fixed(space[a.name])]
        shared = [a for a in placed if _of_parameters(a) and not _per_head(a, scored) and (_ndim(a) or 0) >= 2]
        if shared:  # a learned bias of (query, key) positions, one for every head (``(1, 1, q, k)``): its axes are
            sp.fix([space[a.name] for a in shared])  # positions, which no symmetry moves
            placed = [a for a in placed if a not in shared]
        if placed:  # a parameter or features added to the scores: their axes would not move with the heads
            raise TracingError(f"{where}: {placed[0].name!r} (a parameter or features) added to attention scores; "
                               f"the tracer follows tables of a value per head added to them as T5's relative "
                               f"position bias is (an embedding of position buckets, permuted to (1, heads, q, k)), "
                               f"masks and constants{_hint(model)}")
        if scored.name in att.pinned or any(_per_head(a, scored) for a in summed if a is not scored
                                            and a.name not in att.head_table):
            att.pinned.add(n.name)
        tables = {att.head_table[a.name] for a in summed if a.name in att.head_table}
        if tables:  # a table of a value per head added to the scores: it moves with the query heads
            if len(tables) > 1 or (scored.name in att.sunk and att.sunk[scored.name] not in tables):
                raise TracingError(f"{where}: two tables of a value per head added to one attention's scores"
                                   f"{_hint(model)}")
            att.sunk[n.name] = tables.pop()
        space[n.name] = None
        return True
    if _sinks(n, args, spaces, att, space) or _head_tables(n, args, spaces, att, space):
        return True
    if target in _SPLITS and len(args) == 1 and spaces[0] not in (None, FIXED) and args[0].name not in headed:
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        nd, last = _ndim(args[0]) or 0, _last(args[0]) or 0
        parts = example_value(n.args[1]) if len(n.args) > 1 else None  # ``split(x.shape[-1] // 3, -1)``
        count = parts if target in ("chunk", torch.chunk) else None
        size = parts if count is None else None
        if dim not in (-1, nd - 1):
            return False
        if isinstance(size, int) and size > 0 and last % size == 0:
            count = last // size
        if not isinstance(count, int) or count < 1 or last % count:
            raise TracingError(f"{where}: features split into unequal parts{_hint(model)}")
        again = next((parts for layer, parts in att.packed.items() if sp.find(layer) == sp.find(spaces[0])),
                     None)  # the layer's output split before (a block called again with its weights: ALBERT's)
        if again is not None and len(again) == count and all(sp.size[s] == last // count for s in again):
            att.parts_of[n.name] = list(again)  # split as before (each expert's output of one experts' parameter)
            space[n.name] = None
            return True
        if spaces[0] in att.packed or sp.find(spaces[0]) != spaces[0]:
            raise TracingError(f"{where}: only a layer's own output may be split into parts{_hint(model)}")
        att.parts_of[n.name] = att.parts(sp, spaces[0], count, last // count)
        space[n.name] = None
        return True
    if target is operator.getitem and first is not None and first.name in att.parts_of:
        space[n.name] = att.parts_of[first.name][n.args[1]]
        return True
    if target is operator.getitem and first is not None and len(args) == 1 and spaces[0] not in (None, FIXED) \
            and first.name not in headed and _strided_last(n) is not None:
        return _alternating(n, first, spaces[0], sp, space, att, where, model)
    if target is operator.getitem and first is not None and len(args) == 1 and spaces[0] not in (None, FIXED) \
            and first.name not in headed and _slices_last(n) and first.name not in att.sliced:
        return _sliced_rows(n, first, spaces[0], sp, space, att, where, model)
    if target is operator.getitem and first is not None and first.name in att.sliced:
        space[n.name] = att.sliced[first.name][n.name]
        return True
    if first is not None and first.name in att.stacked:
        return _stacked_parts(n, first, att, space, where, model)
    if _rotary_or_repeated(n, args, first, sp, space, att, where, model):
        return True
    merged = target in ("flatten", torch.flatten) and len(args) == 1 and args[0].name in headed and \
        (n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)) % max(_ndim(args[0]) or 1, 1) == \
        (_ndim(args[0]) or 0) - 2  # Whisper's ``.flatten(start_dim=2)`` of (b, t, heads, head_dim)
    split_last = target in ("unflatten", torch.unflatten) and _dim_is_last(n, 1)  # ``q.unflatten(-1, (h, dh))``
    if (merged or split_last or target in ("view", "reshape", torch.reshape)) and len(args) == 1 and \
            spaces[0] not in (None, FIXED):
        src, out = _shape_of(args[0]), _shape_of(n)
        if src is None or out is None:
            return False
        if tuple(out) == tuple(src) and att.holds(args[0].name):  # to its own shape (transformers 5's SDPA output)
            att.passes(n)
            space[n.name] = spaces[0]
            return True
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
    if args and args[0].name in headed and target == "type_as":  # a cast to another tensor's dtype (Gemma-3's norms)
        headed[n.name] = headed[args[0].name]
        if args[0].name in att.shared:
            att.shared[n.name] = att.shared[args[0].name]
        space[n.name] = spaces[0]
        return True
    if len(args) == 1 and args[0].name in headed and (
            target in ("contiguous", "clone", "float", "to", "type", F.dropout) or
            (target in _SCALING and len(n.args) == 2 and all(_number(a) for a in n.args[1:])) or
            (target in ("transpose", torch.transpose) and _keeps_last(n)) or _permute_keeps_last(n)):
        headed[n.name] = headed[args[0].name]
        if args[0].name in att.shared:
            att.shared[n.name] = att.shared[args[0].name]
        space[n.name] = spaces[0]
        return True
    if len(args) == 1 and args[0].name in att.keys and (target in ("contiguous", "to", "float", "type") or (
            target in _SCALING and len(n.args) == 2 and all(_number(a) for a in n.args[1:]))):
        att.keys[n.name] = att.keys[args[0].name]  # kᵀ scaled by a number (Whisper's ``* scale``), cast
        if args[0].name in att.shared:
            att.shared[n.name] = att.shared[args[0].name]
        space[n.name] = spaces[0]
        return True
    if len(args) == 1 and spaces[0] not in (None, FIXED) and args[0].name not in headed and \
            single_head_keys(n, space):  # Karpathy's ``Head``: one head's key, transposed with no view into heads
        att.keys[n.name] = (1, _last(args[0]) or 0)
        att.single.add(n.name)
        space[n.name] = spaces[0]
        return True
    src = _shape_of(args[0]) if len(args) == 1 else None
    to_keys = src is not None and len(src) == 4 and src[2] == headed.get(args[0].name, (0,))[0] and \
        permute_dims(n) == (0, 2, 3, 1)  # MPT's k.permute(0, 2, 3, 1): (b, t, heads, hd) to kᵀ per head
    if len(args) == 1 and args[0].name in headed and (to_keys or target in ("transpose", torch.transpose) and
            {int(d) % (_ndim(args[0]) or 1) for d in n.args[1:3]} == {(_ndim(args[0]) or 0) - 2,
                                                                        (_ndim(args[0]) or 0) - 1}):
        att.keys[n.name] = headed[args[0].name]  # k.transpose(-2, -1): head_dim now next to last
        if args[0].name in att.shared:
            att.shared[n.name] = att.shared[args[0].name]
        space[n.name] = spaces[0]
        return True
    factors = n.args[1:3] if target in _BADDBMM and len(n.args) >= 3 else n.args  # baddbmm(zeros, q, kᵀ)
    products = _einsum_product(n, att)
    if products is not None:
        factors = products
    if (target in _MATMUL or target in _BADDBMM or products is not None) and len(factors) == 2 and \
            all(isinstance(a, fx.Node) for a in factors):
        left, right = factors
        if right.name in att.single and left.name not in headed and _plain(left, space, sp) and \
                _last(left) == att.keys[right.name][1]:
            headed[left.name] = att.keys[right.name]  # the query of one head, read as it is (no view)
            att.single.add(left.name)
        if left.name in headed and right.name in att.keys:  # scores q kᵀ: query and key units contracted
            if headed[left.name] != att.keys[right.name]:
                raise TracingError(f"{where}: query and key with different head counts or sizes{_hint(model)}")
            _several_keys((_shape_of(n) or (None,))[-1], where, model)
            h, dh = headed[left.name]
            if right.name in att.shared:  # grouped-query attention: no within-head unit contracted alike
                att.grouped[n.name] = _grouped_scores(sp, heads, att, space[left.name], space[right.name], h, dh,
                                                      att.shared[right.name])
                att.scores[n.name] = (space[left.name], h, dh)
            else:
                att.scores[n.name] = (sp.union(space[left.name], space[right.name]), h, dh)
            space[n.name] = None
            return True
        single = left.name in att.scores and right.name not in headed and att.scores[left.name][1] == 1 and \
            _plain(right, space, sp) and _last(right) == att.scores[left.name][2] and _last(n) == _last(right)
        if single:  # the values of one head, read as they are: the output is plain features again
            headed[right.name] = (1, att.scores[left.name][2])
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
            if single:
                del headed[n.name]
            if left.name in att.pinned:  # a bias per head (ALiBi): its heads cannot be exchanged
                sp.fix([heads[-1].group])
            if left.name in att.sunk:  # each head's sink moves with the query heads (the order just recorded)
                value, order = att.sunk[left.name], heads[-1].group
                if value in att.sink_orders:  # one table for several layers (T5's): their heads move together
                    sp.union(att.sink_orders[value], order)
                att.sink_orders[value] = order
            return True
    if target in _SDPA:
        q, k, v = (n.kwargs.get(name, n.args[i] if len(n.args) > i else None) for i, name in
                   enumerate(("query", "key", "value")))
        single = all(isinstance(t, fx.Node) and t.name not in headed and _plain(t, space, sp) for t in (q, k, v)) \
            and len({_last(t) for t in (q, k, v)}) == 1
        if single:  # one head on (batch, tokens, features), no view into heads: the output is plain features
            headed.update({t.name: (1, _last(q) or 0) for t in (q, k, v)})
        if not all(isinstance(t, fx.Node) and t.name in headed for t in (q, k, v)):
            raise TracingError(f"{where}: scaled_dot_product_attention on query, key and value viewed as "
                               f"(..., heads, head_dim) from one or more layers' features is followed{_hint(model)}")
        _several_keys((_shape_of(k) or (None, None))[-2], where, model)
        (h, dh), group = headed[q.name], att.shared.get(k.name)
        by_call = group is None and att.shared.get(v.name) is None and bool(n.kwargs.get("enable_gqa")) and \
            headed[k.name] == headed[v.name] and headed[k.name][1] == dh and h % headed[k.name][0] == 0
        if by_call:  # the call repeats the key/value heads over the query heads
            group = (headed[k.name][0], h // headed[k.name][0])
        kv = (group[0] if by_call else h, dh)  # type: ignore[index]
        if att.shared.get(k.name) != att.shared.get(v.name) or any(
                headed[t.name] != e or (not single and _shape_of(t)[-3] != e[0])
                for t, e in ((q, (h, dh)), (k, kv), (v, kv))):
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
        if single:
            del headed[n.name]
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        if isinstance(mask, fx.Node) and _per_head(mask, q):  # a float mask per head (ALiBi as SDPA's mask)
            sp.fix([heads[-1].group])
        return True
    if any(a.name in headed or a.name in att.keys for a in args) or (
            first is not None and first.name in att.scores):
        raise TracingError(f"{where}: an operation on per-head features or attention scores the tracer does not "
                           f"follow (it follows views into and out of heads, token transposes, q @ k.transpose(-2, "
                           f"-1) scaled, masked and softmaxed, @ v, scaled_dot_product_attention, and rotary "
                           f"embeddings on whole heads: slices of head_dim concatenated back before the scores)"
                           f"{_hint(model)}")
    return False


def _plain(n: fx.Node, space: dict[str, Any], sp: FeatureSpaces) -> bool:
    """Whether ``n`` is features of a space of their own, ``(batch, tokens, features)`` (not per head, not fixed)."""
    s = space.get(n.name)
    return isinstance(s, int) and not sp.is_fixed(s) and _ndim(n) == 3


def single_head_keys(n: fx.Node, space: dict[str, Any]) -> bool:
    """Whether ``n`` transposes the last two axes of 3-D features only to make a head's keys ``kᵀ``: each reader
    is a product ``q @ kᵀ`` (possibly after scaling by a number or a cast) of a 3-D query of as many units.

    That is one head's attention written without a view into heads (Karpathy's ``Head`` modules, several of
    them concatenated), not a token mixing (MLP-Mixer's transposes feed Linear layers)."""
    if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], fx.Node) or \
            _ndim(n.args[0]) != 3 or n.target not in ("transpose", torch.transpose, "permute", torch.permute,
                                                    "swapaxes", torch.swapaxes, "mT"):
        return False
    if n.target in ("permute", torch.permute):
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], tuple | list) else n.args[1:]
        if tuple(int(d) % 3 for d in dims if isinstance(d, int)) != (0, 2, 1):
            return False
    elif {int(d) % 3 for d in n.args[1:3] if isinstance(d, int)} != {1, 2}:
        return False
    width = _last(n.args[0])
    readers: list[fx.Node] = []
    for u in n.users:
        if reads_shape(u):
            continue
        while u.target in ("contiguous", "to", "float", "type") or (
                u.target in _SCALING and len(u.args) == 2 and u.args[0] is not None and all(
                    _number(a) for a in u.args[1:])) and len(u.users) == 1:
            u = next(iter(u.users))
        readers.append(u)
    if not readers:
        return False
    for u in readers:
        if u.target not in _MATMUL or len(u.args) != 2 or not isinstance(u.args[0], fx.Node) or \
                _ndim(u.args[0]) != 3 or _last(u.args[0]) != width or space.get(u.args[0].name, 0) is None:
            return False
    return True


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


def _sliced_rows(n: fx.Node, first: fx.Node, layer: int, sp: FeatureSpaces, space: dict[str, Any],
                 att: _HandAttention, where: str, model: nn.Module) -> bool:
    """A layer's own features sliced along the last axis by every reader (Phi-3's query, key and value
    rows of unequal sizes): when the slices tile the axis, each is a part with a space of its own (a
    packed segment of the layer's rows, as an equal ``split`` makes); otherwise leave ``n`` (False)."""
    last = _last(first) or 0
    readers = list(first.users)
    bounds: dict[str, tuple[int, int]] = {}
    for r in readers:
        if reads_shape(r):
            continue  # its shape, not its features
        if r.target is not operator.getitem or r.args[0] is not first or not _slices_last(r):
            return False  # read whole somewhere too: not parts
        cut = r.args[1][-1] if isinstance(r.args[1], tuple) else r.args[1]
        if any(isinstance(b, fx.Node) for b in (cut.start, cut.stop, cut.step)):
            return False  # bounds read off the graph: not known here
        start, stop, step = cut.indices(last)
        if step != 1 or stop <= start:
            return False
        bounds[r.name] = (start, stop)
    edges = sorted(set(bounds.values()))
    if len(edges) < 2 or edges[0][0] != 0 or edges[-1][1] != last or \
            any(a[1] != b[0] for a, b in zip(edges, edges[1:], strict=False)):
        return False  # overlapping, or leaving rows out: not a packing
    if layer in att.packed or sp.find(layer) != layer:
        raise TracingError(f"{where}: only a layer's own output may be sliced into parts{_hint(model)}")
    spaces = att.sized_parts(sp, layer, [b - a for a, b in edges])
    att.sliced[first.name] = {r: spaces[edges.index(b)] for r, b in bounds.items()}
    space[n.name] = att.sliced[first.name][n.name]
    return True


def _slices_last(n: fx.Node) -> bool:
    """``x[..., a:b]`` (or ``x[:, :, :, a:b]``): a slice of the last axis, every other axis whole."""
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    nd = _ndim(n.args[0]) or 0
    whole = [i is Ellipsis or i == slice(None) for i in idx[:-1]]
    return bool(idx) and isinstance(idx[-1], slice) and all(whole) and (Ellipsis in idx or len(idx) == nd)


_SQUARES = {"pow", torch.pow, operator.pow, "square", torch.square}
_ON_STATISTICS = {operator.add, torch.add, "add", torch.rsqrt, "rsqrt", torch.sqrt, "sqrt", "to", "float",
                  "reciprocal", torch.reciprocal}


def _of_parameters(n: fx.Node) -> bool:
    """Whether ``n`` is computed from the model's parameters and constants alone (a norm's weight, or
    Gemma's ``1 + weight.float()``), no input reaching it."""
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m.op == "placeholder":
            return False
        if m.name in seen:
            continue
        seen.add(m.name)
        stack += [a for a in (*m.args, *m.kwargs.values()) if isinstance(a, fx.Node)]
    return True


def _head_norm(n: fx.Node, first: fx.Node | None, sp: FeatureSpaces, space: dict[str, Any],
               att: _HandAttention) -> bool:
    """An RMSNorm over each head's features (Qwen3's and OLMo-2's query/key norms): ``x * rsqrt(mean(x², -1) +
    eps) * weight`` on per-head features. The statistic is free of the order of a head's units, so they still
    permute; the weight, one per head_dim unit shared by every head, is not permuted and keeps each head's units
    in their order (rigid, as a rotary does). Handle ``n`` and return True, or leave it (False)."""
    target, headed = n.target, att.headed
    if target in _SQUARES and first is not None and first.name in headed and n.args[1:2] == (2,):
        att.head_stats[n.name] = False  # squares of per-head features, not yet reduced
        space[n.name] = None
        return True
    if target in ("mean", torch.mean) and first is not None and first.name in att.head_stats and \
            _dim_is_last(n, 1) and n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False):
        att.head_stats[n.name] = True  # a statistic per head and token
        space[n.name] = None
        return True
    if target in _ON_STATISTICS and first is not None and att.head_stats.get(first.name) and \
            not any(isinstance(a, fx.Node) and a.name in headed for a in n.args[1:]):
        att.head_stats[n.name] = True
        space[n.name] = None
        return True
    nodes = [a for a in n.args if isinstance(a, fx.Node)]
    if target in (operator.mul, torch.mul, "mul", operator.truediv, "div") and len(nodes) == 2:
        mine = [a for a in nodes if a.name in headed]
        other = [a for a in nodes if a.name not in headed]
        if len(mine) != 1 or len(other) != 1:
            return False
        h, o = mine[0], other[0]
        if att.head_stats.get(o.name):  # scaled by its own statistic
            headed[n.name], space[n.name] = headed[h.name], space[h.name]
            sp.mark([space[h.name]])
            return True
        if _of_parameters(o) and _shape_of(o) == (headed[h.name][1],) and target in (operator.mul, torch.mul, "mul"):
            sp.fix([space.get(o.name)])  # the norm's weight, shared by every head: not permuted
            sp.rigid([space[h.name]])
            headed[n.name], space[n.name] = headed[h.name], space[h.name]
            return True
    return False


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
    if _head_norm(n, first, sp, space, att):
        return True
    if target is operator.getitem and first is not None and first.name in headed and _slices_last(n) and shape:
        headed[n.name] = (headed[first.name][0], shape[-1])  # a part of every head: its units keep their order
        sp.rigid([space[first.name]])
        space[n.name] = space[first.name]
        return True
    if target in _SPLITS and first is not None and first.name in headed and shape is None:
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        width = headed[first.name][1]
        count = n.args[1] if target in ("chunk", torch.chunk) else None
        if dim not in (-1, (_ndim(first) or 0) - 1) or not isinstance(count or n.args[1], int):
            return False
        part = width // count if count else n.args[1]
        if part < 1 or width % part:
            raise TracingError(f"{where}: heads split into unequal parts along head_dim{_hint(model)}")
        # GPT-NeoX's query, key and value chunked out of each head's packed rows: parts of every head
        headed[n.name] = (headed[first.name][0], part)
        att.split_heads.add(n.name)
        sp.rigid([space[first.name]])
        space[n.name] = space[first.name]
        return True
    if target is operator.getitem and first is not None and first.name in att.split_heads and \
            isinstance(n.args[1], int):
        headed[n.name], space[n.name] = headed[first.name], space[first.name]  # one part of every head
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
    # Meta's llama rotary: units paired, ``view_as_complex``, times a complex table, ``view_as_real``, flatten(3)
    src = _shape_of(first) if first is not None else None
    if target in ("reshape", "view", torch.reshape) and first is not None and first.name in headed and shape and \
            src and src[-1] % 2 == 0 and tuple(shape) == (*src[:-1], src[-1] // 2, 2):
        att.paired[n.name] = headed[first.name]  # units (2i, 2i + 1) of each head rotated together: rigid
        sp.rigid([space[first.name]])
        space[n.name] = space[first.name]
        return True
    if first is not None and first.name in att.paired and target in ("float", "contiguous", "to", "type_as"):
        att.paired[n.name], space[n.name] = att.paired[first.name], space[first.name]
        return True
    if target is torch.view_as_complex and first is not None and first.name in att.paired:
        h, dh = att.paired[first.name]
        headed[n.name], space[n.name] = (h, dh // 2), space[first.name]  # a complex unit per pair
        return True
    if target is torch.view_as_real and first is not None and first.name in headed:
        att.interleaved[n.name] = headed[first.name][0]  # the pairs back, flattened next
        space[n.name] = space[first.name]
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
            clash = [f"axis {i} of {xs[i]}" for i in range(len(xs) - 1) if xs[i] == h and aligned[i] != 1]
            raise TracingError(f"{where}: per-head features {tuple(xs)} multiplied by a table {tuple(ts)} that may "
                               f"differ between heads ({', '.join(clash) or 'shapes differ'}, as many as the {h} "
                               f"heads); rotary tables of positions x head_dim are followed: give an example whose "
                               f"batch size and token count differ from the number of heads{_hint(model)}")
        if aligned[-1] != 1:
            sp.rigid([space[x.name]])  # cos/sin: one factor per unit of the head, the same in every head
        headed[n.name], space[n.name] = headed[x.name], space[x.name]
        return True
    if (target in _ADD or target in (operator.sub, torch.sub, "sub")) and len(args) == 2 and len(n.args) == 2 and \
            all(a.name in headed for a in args) and headed[args[0].name] == headed[args[1].name] and \
            _shape_of(args[0]) == _shape_of(args[1]) == shape:
        headed[n.name] = headed[args[0].name]  # q * cos + rotate_half(q) * sin; GPT-OSS's x1 * cos - x2 * sin
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
    if target == "expand" and first is not None and first.name in headed and first.name not in att.shared and \
            headed[first.name][0] == 1 and shape:
        src = _shape_of(first)
        grown = [i for i, (a, b) in enumerate(zip(src or (), shape, strict=False)) if a != b]
        if src and len(src) == len(shape) and len(grown) == 1 and src[grown[0]] == 1 and grown[0] != len(src) - 1:
            # multi-query attention: the one key/value head expanded over the query heads
            # (``k.view(b, t, 1, dh).transpose(1, 2).expand(b, h, t, dh)``), shared by all of them
            headed[n.name], att.shared[n.name] = (shape[grown[0]], headed[first.name][1]), (1, shape[grown[0]])
            space[n.name] = space[first.name]
            return True
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


def _strided_last(n: fx.Node) -> tuple[int, int] | None:
    """``(start, step)`` of ``x[..., start::step]`` (step above 1), an index of the last axis alone; else None."""
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    cut = index[-1] if index else None
    if not isinstance(cut, slice) or not isinstance(cut.step, int) or cut.step < 2 or cut.stop is not None or \
            not (cut.start is None or isinstance(cut.start, int) and 0 <= cut.start < cut.step):
        return None
    before = index[:-1]
    if not (before == (Ellipsis,) or len(before) == (_ndim(n.args[0]) or 0) - 1 and
            all(i == slice(None) for i in before)):
        return None
    return cut.start or 0, cut.step


def _alternating(n: fx.Node, first: fx.Node, s: int, sp: FeatureSpaces, space: dict[str, Any], att: _HandAttention,
                 where: str, model: nn.Module) -> bool:
    """``x[..., k::m]`` of a layer's own output: its ``k``-th of ``m`` alternating parts (GPT-OSS's gate units at the
    even entries, its up units at the odd ones); the layer's rows are then cut into strided parts."""
    start, step = _strided_last(n)  # type: ignore[misc]
    last = _last(first) or 0
    if last % step:
        raise TracingError(f"{where}: every {step}-th feature of {last}, which {step} does not divide{_hint(model)}")
    if s not in att.alternating:
        if s in att.packed or sp.find(s) != s:
            raise TracingError(f"{where}: only a layer's own output may be read as alternating parts{_hint(model)}")
        stem = sp.opener[s]
        att.alternating[s] = tuple(sp.new(f"{stem}.{k}", last // step, name=f"{stem}.{k}") for k in range(step))
    parts = att.alternating[s]
    if len(parts) != step:
        raise TracingError(f"{where}: a layer's output read as alternating parts of two different steps{_hint(model)}")
    space[n.name] = parts[start]
    return True


def _max_values(n: fx.Node) -> bool:
    """``scores.max(dim=-1, keepdim=True).values``: the maximum over the keys (subtracted before a softmax)."""
    return n.target is getattr and n.args[1:] == ("values",)


def _drops_last_keys(n: fx.Node) -> bool:
    """``probs[..., :-1]``: the scores without their last keys (a sink's column dropped after the softmax)."""
    if n.target is not operator.getitem or not isinstance(n.args[1], tuple) or len(n.args[1]) != 2:
        return False
    whole, cut = n.args[1]
    return whole is Ellipsis and isinstance(cut, slice) and cut.start is None and cut.step is None and \
        isinstance(cut.stop, int) and cut.stop < 0


def _head_tables(n: fx.Node, args: list[fx.Node], spaces: list[Any], att: _HandAttention,
                 space: dict[str, Any]) -> bool:
    """A table of a value per head for each pair of positions, added to the scores (T5's relative
    position bias: ``embedding(buckets)`` of shape ``(q, k, heads)``, ``.permute([2, 0, 1])``,
    ``.unsqueeze(0)``, plus a padding mask): the table's heads move with the query heads of every
    attention it is added to. Handle ``n`` and return True, or leave it."""
    target, shape = n.target, _shape_of(n)
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if permute_dims(n) == (2, 0, 1) and first is not None and len(args) == 1 and \
            spaces[0] not in (None, FIXED) and not att.holds(first.name):
        att.head_table[n.name] = spaces[0]  # (q, k, heads) -> (heads, q, k)
        space[n.name] = None
        return True
    if first is not None and first.name in att.head_table and not args and shape is not None and (
            target in ("unsqueeze", "contiguous", "to", "type_as", "float", "expand", "expand_as", "clone") or
            (target in ("view", "reshape", torch.reshape) and [s for s in shape if s != 1] ==
             [s for s in (_shape_of(first) or ()) if s != 1])):
        att.head_table[n.name] = att.head_table[first.name]  # leading axes of 1 added, a cast
        space[n.name] = None
        return True
    operands = [a for a in n.args[:2] if isinstance(a, fx.Node)]
    tables = {att.head_table[a.name] for a in operands if a.name in att.head_table}
    if tables and target in _ADD and not args:
        if len(tables) > 1:
            raise TracingError(f"node {n.name!r}: two tables of a value per head added together")
        att.head_table[n.name] = tables.pop()  # plus a mask (no features)
        space[n.name] = None
        return True
    return False


def _sinks(n: fx.Node, args: list[fx.Node], spaces: list[Any], att: _HandAttention, space: dict[str, Any]) -> bool:
    """A value per head (GPT-OSS's ``sinks`` of shape ``(heads,)``) viewed as ``(1, heads, 1, 1)`` and expanded over
    the scores, then joined to them as one more key (``torch.cat([scores, sinks], dim=-1)``): the value moves with
    the query heads. Handle ``n`` and return True, or leave it."""
    target = n.target
    if target in ("reshape", "view", torch.reshape) and len(args) == 1 and _ndim(args[0]) == 1 and \
            spaces[0] not in (None, FIXED) and _shape_of(n) is not None and len(_shape_of(n)) == 4 and \
            _shape_of(n)[1] == _last(args[0]) and _shape_of(n)[0] == _shape_of(n)[2] == _shape_of(n)[3] == 1:
        att.per_head[n.name] = spaces[0]
        space[n.name] = None
        return True
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if target in ("expand", "expand_as", "contiguous", "to", "type_as") and first is not None and \
            first.name in att.per_head:
        att.per_head[n.name] = att.per_head[first.name]
        space[n.name] = None
        return True
    if target in (torch.cat, torch.concat) and n.args and isinstance(n.args[0], list | tuple) and \
            len(n.args[0]) == 2 and all(isinstance(a, fx.Node) for a in n.args[0]):
        scores, value = n.args[0]
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        if scores.name in att.scores and value.name in att.per_head and dim in (-1, (_ndim(n) or 0) - 1):
            att.scores[n.name] = att.scores[scores.name]
            if scores.name in att.grouped:
                att.grouped[n.name] = att.grouped[scores.name]
            att.sunk[n.name] = att.per_head[value.name]
            space[n.name] = None
            return True
    if any(a.name in att.per_head for a in n.all_input_nodes):
        raise TracingError(f"node {n.name!r}: a value per head viewed as (1, heads, 1, 1) is followed only when it "
                           "is joined to the attention scores as one more key (GPT-OSS's sinks: torch.cat([scores, "
                           "sinks], dim=-1))")
    return False


def _grouped_scores(sp: FeatureSpaces, heads: list[Heads], att: _HandAttention, q: int, k: int, h: int, dh: int,
                    group: tuple[int, int]) -> tuple[int, int]:
    """Grouped-query attention's heads: the key/value heads' order, the query heads' order moving in
    groups of ``repeats`` with it; query and key rigid. Returns ``(query heads, key/value heads)``."""
    kv, repeats = group
    if kv * repeats != h:
        raise TracingError(f"{kv} key/value heads repeated {repeats} times do not make {h} query heads")
    q_stem, k_stem = att.stem(sp, q), att.stem(sp, k)
    if q_stem == k_stem:  # query and key rows of one layer (Phi-3's qkv_proj): the two orders by their parts
        q_stem, k_stem = sp.opener[sp.find(q)], sp.opener[sp.find(k)]
    kv_order = sp.new(f"{k_stem}.heads", kv, name=f"{k_stem}.heads")
    q_order = sp.new(f"{q_stem}.heads", h, name=f"{q_stem}.heads")
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


def _heads_next_to_last(n: fx.Node, headed: dict[str, tuple[int, int]]) -> bool:
    """Whether a headed tensor has its heads on axis -2 again (transposed back before the merge)."""
    shape = _shape_of(n)
    return shape is not None and tuple(shape[-2:]) == headed[n.name]
