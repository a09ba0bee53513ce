"""Mixtures of experts held as separate modules, as the stream tracer meets them (Mixtral's routing).

A router's top-k (or argmax) over the gate's logits gives *expert ids*: values that name
experts by the gate's row order. Scattered back into the gate's positions
(``zeros.scatter(-1, ids, weights)``) they stay in the gate's space; compared with an
expert's number (``ids == e``, ``one_hot(ids)[..., e]``) they select the tokens of module
``experts[e]``, and the experts then move only with the gate's rows. :class:`Routing`
follows the ids through the graph; :func:`expert_modules` finds the modules they select
(the children of one container, all of one structure, as many as the gate has rows); the
spec then binds them stacked (:func:`combinability.module_stacks.stack_modules`), so that
experts are permuted as blocks of the gate's permutation.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from combinability.errors import PermutationSpecError, TracingError
from combinability.feature_spaces import FIXED, FeatureSpaces, Heads
from combinability.module_stacks import sibling_modules
from combinability.module_stacks import stack_experts as core_stack_experts
from combinability.permutation import PermutationSpec
from combinability_torch.fx_vocabulary import _ADD, _MATMUL, _SHAPE_OPS, _dim_is_last, _ndim, _shape_of
from combinability_torch.trace import reads_shape

__all__ = ["Routing", "RouterGroups", "ExpertWeights", "expert_modules", "stack_experts", "INDEX_ADD", "GROUPED_MM",
           "index_add_space"]

_log = logging.getLogger("combinability.tracing")

#: Operations that give the ids in another shape or type (still one expert id per entry).
_ID_PASS = _SHAPE_OPS | {"contiguous", "clone", "long", "int", "to", "view_as", "expand", "squeeze", "unsqueeze"}
#: Operations that read values at the ids' positions (gate values of the chosen experts): free of the experts' order.
_ID_READS = {"gather", torch.gather, "take_along_dim", torch.take_along_dim}
#: Operations that put values back at the ids' positions (the gate's space), handled by the stream tracer.
_ID_WRITES = {"scatter", "scatter_", "scatter_add", "scatter_add_", torch.scatter, torch.scatter_add}
#: Adds a source into rows picked by an index (tokens gathered back after their experts).
INDEX_ADD = {"index_add_", "index_add", torch.index_add}


@dataclass
class Routing:
    """The expert ids of a traced graph and the gates whose ids select modules.

    Attributes
    ----------
    ids : dict of str to int
        A node holding expert ids -> the gate's space they index.
    selecting : dict of int to str
        A gate's space whose ids select modules (compared with an expert's number) -> the
        node where that was seen first.
    """

    ids: dict[str, int] = field(default_factory=dict)
    tuples: dict[str, int] = field(default_factory=dict)  # a (values, ids) pair -> the gate's space
    selecting: dict[int, str] = field(default_factory=dict)

    def route(self, n: fx.Node, gate: int, sp: FeatureSpaces) -> bool:
        """Record ``n`` if it routes by the gate space ``gate`` (top-k, max or argmax over its last axis)."""
        target = n.target
        if target in ("topk", torch.topk) and _dim_is_last(n, 2, default=-1) or target in ("max", torch.max) and (
                len(n.args) > 1 or "dim" in n.kwargs) and _dim_is_last(n, 1):
            self.tuples[n.name] = gate
        elif target in ("argmax", torch.argmax) and _dim_is_last(n, 1):
            self.ids[n.name] = gate
        else:
            return False
        sp.mark([gate])  # routing: permutations of the experts only
        return True

    def pick(self, n: fx.Node, gate: int) -> bool:
        """Record ``n`` if it picks one unit of ``gate`` by number (``probs[:, e]``, ``probs[..., e:e + 1]``):
        the gate value of one expert, which then weighs the module of that number (dense gating)."""
        if n.target is not operator.getitem or len(n.args) != 2:
            return False
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        last = [i for i in index if i is not None][-1:] if Ellipsis in index or len(
            [i for i in index if i is not None]) == (_ndim(n.args[0]) or 0) else []
        if not last or not (isinstance(last[0], int) or isinstance(last[0], slice) and isinstance(
                last[0].start, int) and isinstance(last[0].stop, int) and last[0].stop - last[0].start == 1):
            return False
        self.selecting.setdefault(gate, n.name)
        return True

    def reaches(self, index: Any) -> bool:
        """Whether ``index`` (an argument: nodes, or tuples holding them) is computed from expert ids."""
        stack: list[fx.Node] = []
        fx.node.map_arg(index, stack.append)
        seen: set[str] = set()
        while stack:
            m = stack.pop()
            if m.name in self.ids or m.name in self.tuples:
                return True
            if m.name not in seen:
                seen.add(m.name)
                stack += m.all_input_nodes
        return False

    def gate_of(self, index: Any) -> int | None:
        """The gate space whose expert ids ``index`` is computed from (one), else ``None``."""
        stack: list[fx.Node] = []
        fx.node.map_arg(index, stack.append)
        seen: set[str] = set()
        gates: set[int] = set()
        while stack:
            m = stack.pop()
            if m.name in self.ids or m.name in self.tuples:
                gates.add(self.ids.get(m.name, self.tuples.get(m.name)))
            elif m.name not in seen:
                seen.add(m.name)
                stack += m.all_input_nodes
        return gates.pop() if len(gates) == 1 else None

    def follow(self, n: fx.Node, space: dict[str, Any]) -> bool:
        """Give ``n`` its space when it reads expert ids; return whether it did."""
        if reads_shape(n):
            return False  # ``ids.size(-1)``: the number of experts per token, a size
        if n.target in (operator.getitem, getattr) and n.args and isinstance(n.args[0], fx.Node) and \
                n.args[0].name in self.tuples:
            if n.args[1] in (1, "indices"):
                self.ids[n.name] = self.tuples[n.args[0].name]
            space[n.name] = FIXED  # the gate values, sorted: free of the experts' order
            return True
        nodes: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), nodes.append)
        held = [a for a in nodes if a.name in self.ids]
        if not held or n.target in _ID_WRITES:
            return False
        gate = self.ids[held[0].name]
        if n.target in _ID_PASS or n.target is operator.getitem and n.args[0] is held[0] or (
                n.target in (torch.cat, torch.concat) and len(held) == len(nodes) and
                {self.ids[a.name] for a in held} == {gate}):  # the first choices, then the second (PhiMoE's)
            self.ids[n.name] = gate
        elif n.target not in _ID_READS:
            self.selecting.setdefault(gate, n.name)  # compared with an expert's number: selects a module
        space[n.name] = FIXED
        return True


def expert_modules(model: nn.Module, gm: fx.GraphModule, gate: str, count: int) -> list[str] | None:
    """The ``count`` sibling modules the gate ``gate`` routes to (:func:`combinability.module_stacks.sibling_modules`),
    each called by the traced graph; ``None`` if there are none."""
    try:
        found = sibling_modules(dict(model.named_parameters()), gate, count)
    except PermutationSpecError as exc:
        raise TracingError(str(exc)) from None
    if found:
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        idle = [f for f in found if not any(c == f or c.startswith(f + ".") for c in called)]
        if idle:
            raise TracingError(f"the experts {idle} of router {gate!r} received no token of example_input; "
                               "trace on more tokens, so that every expert is called")
    return found


def stack_experts(spec: PermutationSpec, model: nn.Module, gm: fx.GraphModule, gates: dict[str, int],
                  hint: str) -> PermutationSpec:
    """``spec`` with the experts of each routing gate stacked as blocks of the gate's permutation
    (:func:`combinability.module_stacks.stack_experts`: experts that cannot be stacked stay in place, with a
    warning).

    Parameters
    ----------
    gates : dict of str to int
        A gate layer (whose ids select modules) -> its number of experts.
    """
    params = dict(model.named_parameters())
    for gate, count in gates.items():
        modules = expert_modules(model, gm, gate, count)
        if modules is None:
            raise TracingError(f"the router {gate!r} selects tokens for each of its {count} experts, but no group of "
                               f"{count} modules of one structure was found beside it{hint}")
        group = spec.axes_to_perm.get(f"{gate}.weight", (None,))[0]
        if not isinstance(group, str) or group in spec.kinds:
            _log.info("the experts of %s stay in place: the gate's rows are not a permutation", gate)
            continue
        spec = core_stack_experts(spec, group, modules, params)
    return spec


def index_add_space(n: fx.Node, space: dict[str, Any], sp: FeatureSpaces) -> Any:
    """The space of ``x.index_add_(dim, rows, source)`` along a token axis: ``x``'s and ``source``'s merged
    (a buffer of zeros has none); ``NotImplemented`` when it adds along the features."""
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    source = n.args[3] if len(n.args) > 3 else n.kwargs.get("source")
    if not isinstance(dim, int) or _dim_is_last(n, 1) or not isinstance(source, fx.Node):
        return NotImplemented
    return sp.union(space.get(n.args[0].name), space.get(source.name))



#: A product of each group of tokens by its expert's weights (transformers 5's default way of running experts).
GROUPED_MM = tuple(f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None)
#: Reorderings of a parameter's axes, and operations that keep them (a cast).
_AXES_ORDER = {"transpose", torch.transpose, "swapaxes", torch.swapaxes, "permute", torch.permute, "t", torch.t}
_AXES_KEPT = {"contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type_as"}
_ADDS = _ADD | {"add", "add_"}  # a bias added to a product, also in place


@dataclass
class ExpertWeights:
    """Experts held as one parameter of shape ``(experts, ...)`` (transformers 5's ``gate_up_proj (E, 2h, d)`` and
    ``down_proj (E, d, h)``), as the stream tracer meets them.

    The experts' axis is indexed by the router's choices, in one of three ways, all followed:
    ``W[e]`` for each expert hit (a loop, ``eager``), ``W[expert_ids]`` for each token and
    ``torch.bmm`` (``batched_mm``), or ``torch._grouped_mm(x, W.transpose(-2, -1), offs=...)``
    over the tokens sorted by expert (``grouped_mm``). That axis is bound to the gate's rows (the
    experts move with them); the axes the products read and write take their spaces, as a
    linear layer's would, one space for every expert. The parameters are listed in
    :attr:`gates`; the spec then cuts their packed axes (the gate and up halves) into parts, so
    that :func:`combinability.derive_symmetries` permutes each expert's units its own way
    (:func:`combinability.module_stacks.merge_blocks`).

    Attributes
    ----------
    views : dict of str to (str, tuple)
        A node standing for a parameter seen another way (an expert's slice, a transpose) ->
        the parameter and, for each axis of the node, the parameter's axis (``None``: tokens).
    gates : dict of str to int
        A parameter with an experts' axis -> the gate space of its experts.
    """

    views: dict[str, tuple[str, tuple[int | None, ...]]] = field(default_factory=dict)
    gates: dict[str, int] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)  # x.unsqueeze(-1) before torch.bmm, and (S, out, 1) after

    def follow(self, n: fx.Node, params_of: dict[str, str], binds: dict[str, list[Any]], space: dict[str, Any],
               sp: FeatureSpaces, routing: Routing, where: str, hint: str) -> bool:
        """Follow ``n`` if it reads an experts' parameter this way (raising for any other use of one);
        return whether it did."""
        if reads_shape(n):
            return False  # ``W.shape``: sizes only
        nodes: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), nodes.append)
        target = n.target

        def axes_of(a: Any) -> tuple[str, tuple[int | None, ...]] | None:
            if not isinstance(a, fx.Node):
                return None
            if a.name in self.views:
                return self.views[a.name]
            if a.name in params_of and _ndim(a) is not None:
                return params_of[a.name], tuple(range(_ndim(a)))
            return None

        def bind(param: str, axis: int | None, s: Any) -> Any:
            if axis is None:
                return s
            entries = binds[param]
            entries[axis] = s if entries[axis] is None else sp.union(entries[axis], s)
            return entries[axis]

        def opened(param: str, axis: int | None) -> Any:
            """The space of ``param``'s ``axis``, opened now if it has none."""
            if axis is None:
                return FIXED
            if binds[param][axis] is None:
                binds[param][axis] = sp.new(param, name=f"P_{param}:{axis}")
            return binds[param][axis]

        def experts_axis(param: str, axis: int | None, index: Any) -> None:
            gate = routing.gate_of(index)
            if axis is None or gate is None:
                raise TracingError(f"{where}: the experts' axis of {param!r} is picked by no router's choice{hint}")
            self.gates[param] = bind(param, axis, gate)

        if target is operator.getitem and len(n.args) == 2 and axes_of(n.args[0]) and routing.reaches(n.args[1]):
            param, axes = axes_of(n.args[0])
            index = n.args[1]
            if not isinstance(index, fx.Node):
                raise TracingError(f"{where}: an experts' parameter is indexed by one tensor of expert numbers "
                                   f"(W[e] or W[expert_ids]), got {index!r}{hint}")
            experts_axis(param, axes[0], index)
            kept = (None,) * (_ndim(index) or 0) + axes[1:]
            self.views[n.name] = (param, kept)
            space[n.name] = opened(param, kept[-1]) if kept and kept[-1] is not None else FIXED
            return True
        if target in GROUPED_MM and len(n.args) >= 2 and axes_of(n.args[1]):
            x, (param, axes) = n.args[0], axes_of(n.args[1])
            offs = n.kwargs.get("offs", n.args[2] if len(n.args) > 2 else None)
            if len(axes) != 3 or _ndim(x) != 2 or offs is None or n.kwargs.get("bias") is not None:
                raise TracingError(f"{where}: a grouped product of tokens (tokens, in) by experts' weights "
                                   f"(experts, in, out) with offsets and no bias is followed{hint}")
            experts_axis(param, axes[0], offs)
            bind(param, axes[1], space.get(x.name))
            space[n.name] = opened(param, axes[2])
            return True
        if target is F.linear and len(n.args) >= 2 and isinstance(n.args[1], fx.Node) and n.args[1].name in self.views:
            x, (param, axes) = n.args[0], self.views[n.args[1].name]
            if len(axes) != 2:
                raise TracingError(f"{where}: an expert's weights in F.linear must be one expert's (out, in){hint}")
            bind(param, axes[1], space.get(x.name))
            out = opened(param, axes[0])
            bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if isinstance(bias, fx.Node):
                out = sp.union(out, space.get(bias.name))
            space[n.name] = out
            return True
        if target in ("unsqueeze", torch.unsqueeze) and n.args[1:] in ((-1,), ((_ndim(n) or 0) - 1,)) and n.users \
                and all(u.target in _MATMUL and isinstance(u.args[0], fx.Node) and u.args[0].name in self.views
                        and u.args[1:] == (n,) for u in n.users):
            self.columns[n.name] = space.get(n.args[0].name)  # features on axis -2 of (S, in, 1)
            space[n.name] = None
            return True
        if target in _MATMUL and len(n.args) == 2 and any(isinstance(a, fx.Node) and a.name in self.views
                                                        for a in n.args):
            w, x = n.args
            if isinstance(w, fx.Node) and w.name in self.views and isinstance(x, fx.Node) and \
                    x.name in self.columns:  # (S, out, in) @ (S, in, 1)
                param, axes = self.views[w.name]
                bind(param, axes[2], self.columns[x.name])
                self.columns[n.name] = opened(param, axes[1])
                space[n.name] = None
                return True
            x, w = n.args
            if isinstance(w, fx.Node) and w.name in self.views and len(self.views[w.name][1]) in (2, 3) and \
                    isinstance(x, fx.Node) and x.name not in self.views:  # x @ W[e] (in, out); (S, 1, in) @ W[ids]
                param, axes = self.views[w.name]
                bind(param, axes[-2], space.get(x.name))
                space[n.name] = opened(param, axes[-1])
                return True
        if target in _ADDS and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and \
                sum(a.name in self.views for a in n.args) == 1:
            bias = n.args[0] if n.args[0].name in self.views else n.args[1]
            other = n.args[1] if bias is n.args[0] else n.args[0]
            param, axes = self.views[bias.name]
            if axes[-1] is not None and all(a is None for a in axes[:-1]) and other.name not in self.columns:
                space[n.name] = sp.union(space.get(other.name), opened(param, axes[-1]))  # an expert's bias
                if target == "add_" and other is n.args[0]:
                    space[other.name] = space[n.name]
                return True
        if target in ("squeeze", torch.squeeze) and n.args[0].name in self.columns and n.args[1:] in (
                (-1,), ((_ndim(n.args[0]) or 0) - 1,)):
            space[n.name] = self.columns[n.args[0].name]
            return True
        base = axes_of(n.args[0]) if n.args else None
        if base and (target in _AXES_ORDER or target in _AXES_KEPT) and (
                n.args[0].name in self.views or len(base[1]) >= 3 and _feeds_grouped_product(n)):
            param, axes = base
            order = _axes_order(n, len(axes))
            if order is None:
                raise TracingError(f"{where}: experts' weights are reordered by {target!r} with arguments the "
                                   f"tracer cannot read{hint}")
            self.views[n.name] = (param, tuple(axes[k] for k in order))
            space[n.name] = opened(param, self.views[n.name][1][-1]) if self.views[n.name][1][-1] is not None \
                else FIXED
            return True
        held = [a for a in nodes if a.name in self.views or a.name in self.columns]
        if held:
            what = self.views[held[0].name][0] if held[0].name in self.views else held[0].name
            raise TracingError(f"{where}: experts' weights held as one parameter ({what!r}) are followed into "
                               f"F.linear, torch.bmm and torch._grouped_mm (transformers 5's eager, batched_mm and "
                               f"grouped_mm experts), not into this operation{hint}")
        return False

    def cut(self) -> set[str]:
        """The parameters with an experts' axis, whose packed axes the spec cuts into parts."""
        return set(self.gates)


def _feeds_grouped_product(n: fx.Node) -> bool:
    """Whether ``n`` (a parameter transposed or cast) reaches a grouped product through such operations only."""
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        for u in m.users:
            if u.target in GROUPED_MM:
                return True
            if (u.target in _AXES_ORDER or u.target in _AXES_KEPT) and u.name not in seen:
                seen.add(u.name)
                stack.append(u)
    return False


def _axes_order(n: fx.Node, ndim: int) -> list[int] | None:
    """The axes of ``n``'s input in the order ``n`` puts them (a transpose, a permute, ``.t()``; a cast keeps them)."""
    target, args = n.target, n.args[1:]
    if target in _AXES_KEPT:
        return list(range(ndim))
    if target in ("t", torch.t) and ndim == 2:
        return [1, 0]
    if target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes) and len(args) == 2 and \
            all(isinstance(a, int) for a in args):
        i, j = (a % ndim for a in args)
        order = list(range(ndim))
        order[i], order[j] = order[j], order[i]
        return order
    if target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
        if len(dims) == ndim and all(isinstance(a, int) for a in dims):
            return [a % ndim for a in dims]
    return None


_TOPK = {"topk", torch.topk}


@dataclass
class RouterGroups:
    """Group-limited routing (DeepSeek-V3's, GLM-4.5's, dots.llm1's): the gate's scores viewed as
    ``(tokens, groups, experts per group)``, each group scored by the sum of its top scores, the best groups
    chosen, and the experts of the others masked out before the top-k.

    Experts then move in their groups: a permutation of the groups, and of the experts inside each
    (the gate's space becomes :class:`~combinability.kinds.Blocks` of a new *groups* space, through a
    :class:`~combinability.feature_spaces.Heads` entry; one group leaves the gate's space as it is).
    The group scores, the groups chosen and the mask built from them live in the groups' space, and the
    mask, repeated over each group's experts, in the gate's again.
    """

    split: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # (tokens, g, e) view -> (gate, groups, e)
    per_group: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # groups on axis -2 -> (gate, groups, e)
    gate_of: dict[int, tuple[int, int]] = field(default_factory=dict)  # a groups space -> (its gate space, e)

    def follow(self, n: fx.Node, space: dict[str, Any], sp: FeatureSpaces, heads: list[Heads], where: str,
               hint: str) -> bool:
        """Follow ``n`` if it is a step of group-limited routing; return whether it was."""
        target = n.target
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if first is None:
            return False
        shape, src = _shape_of(n), _shape_of(first)
        if target in ("view", "reshape", torch.reshape) and first.name not in self.per_group and shape and src and \
                len(shape) == len(src) + 1 and shape[:-2] == src[:-1] and shape[-2] * shape[-1] == src[-1] and \
                space.get(first.name) not in (None, FIXED) and not sp.is_fixed(space[first.name]) and n.users and \
                all(u.target in _TOPK and _dim_is_last(u, 2, default=-1) for u in n.users):
            gate, groups, size = space[first.name], shape[-2], shape[-1]
            stem = sp.opener[sp.find(gate)]
            order = sp.new(f"{stem}.groups", groups, name=f"{sp.name(gate)}.groups") if groups > 1 else \
                sp.new(f"{stem}.group")
            if groups > 1:
                heads.append(Heads(gate, order, groups, size))
            sp.mark([gate, order])
            self.split[n.name] = (gate, order, size)
            self.gate_of[order] = (gate, size)
            space[n.name] = None
            return True
        if target in _TOPK and first.name in self.split:
            self.per_group[n.name] = self.split[first.name]  # the top scores of each group (values, then ids)
            space[n.name] = None
            return True
        if target is operator.getitem and first.name in self.per_group and n.args[1] == 0:
            self.per_group[n.name] = self.per_group[first.name]
            space[n.name] = None
            return True
        if target in ("sum", torch.sum) and first.name in self.per_group and _dim_is_last(n, 1) and \
                not n.kwargs.get("keepdim", False):
            space[n.name] = self.per_group[first.name][1]  # a score per group
            return True
        if target in ("unsqueeze", torch.unsqueeze) and n.args[1:] in ((-1,), ((_ndim(n) or 0) - 1,)) and \
                space.get(first.name) is not None and sp.find(space[first.name]) in {
                    sp.find(o) for o in self.gate_of}:
            order = next(o for o in self.gate_of if sp.find(o) == sp.find(space[first.name]))
            gate, size = self.gate_of[order]
            self.per_group[n.name] = (gate, order, size)  # a value per group, to be repeated over its experts
            space[n.name] = None
            return True
        if target == "expand" and first.name in self.per_group and shape and shape[-1] == self.per_group[
                first.name][2]:
            self.per_group[n.name] = self.per_group[first.name]
            space[n.name] = None
            return True
        if target in ("view", "reshape", torch.reshape) and first.name in self.per_group and shape and src and \
                len(shape) == len(src) - 1 and shape[-1] == src[-2] * src[-1]:
            space[n.name] = self.per_group[first.name][0]  # back to the gate's experts
            return True
        if first.name in self.per_group or first.name in self.split:
            raise TracingError(f"{where}: group-limited routing is followed through the groups' top scores summed, "
                               f"the best groups chosen and a mask of them repeated over their experts{hint}")
        return False
