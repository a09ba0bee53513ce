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
from torch import fx, nn

from combinability.errors import PermutationSpecError, TracingError
from combinability.feature_spaces import FIXED, FeatureSpaces
from combinability.module_stacks import sibling_modules
from combinability.module_stacks import stack_experts as core_stack_experts
from combinability.permutation import PermutationSpec
from combinability_torch.fx_vocabulary import _SHAPE_OPS, _dim_is_last, _ndim

__all__ = ["Routing", "expert_modules", "stack_experts", "INDEX_ADD", "index_add_space"]

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
        if target in ("topk", torch.topk) and _dim_is_last(n, 2) or target in ("max", torch.max) and (
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

    def follow(self, n: fx.Node, space: dict[str, Any]) -> bool:
        """Give ``n`` its space when it reads expert ids; return whether it did."""
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
        if n.target in _ID_PASS or n.target is operator.getitem and n.args[0] is held[0]:
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

