"""Modules of one structure seen as one stacked parameter: mixtures of experts held as separate modules.

Most mixture-of-experts code (Mixtral, DeepSeek-MoE, Switch, the usual tutorial layer)
keeps its experts as separate modules, ``experts.0`` … ``experts.E-1``. Permuting the
experts moves whole parameters between names, which no axis of any one parameter
expresses. A spec therefore binds the experts' parameters through a :class:`Stack`: a
*stacked parameter* (``"moe.experts.*.w1.weight"``) that is its members joined along
one axis. Joined along the axis of the experts' own hidden units, ``E`` blocks of ``h``
units form a :class:`~combinability.kinds.Blocks` axis whose group is the expert
permutation (bound to the gate's rows too); a member without such an axis (an
expert's output bias) is stacked along a new first axis bound to the group itself.
Every algorithm that works on block permutations (weight matching, STE, the
many-model methods) then aligns experts as it aligns heads.

Views compose: a view's member may be another view's name (a :class:`Merge` of a
:class:`Part`), joined after it (:func:`view_levels`). A spec's
:attr:`~combinability.PermutationSpec.axes_to_perm` names the stacked parameters; the
parameters given to it and returned by it keep the model's own names
(:func:`join_members` and :func:`split_members` convert at that boundary).
:func:`stack_modules` rewrites a spec whose modules each have their own permutations
(as a tracer finds them) into one with their stacks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from combinability.errors import PermutationSpecError

__all__ = ["Stack", "Merge", "Part", "merge_blocks", "block_pairs", "view_from_json", "view_levels", "join_members",
           "split_members", "stack_modules", "stack_experts", "sibling_modules", "module_of"]


@dataclass(frozen=True)
class Stack:
    """A stacked parameter: the parameters ``members`` joined along ``axis``.

    Parameters
    ----------
    members : tuple of str
        The parameters, in block order (expert 0 first); all of one shape.
    axis : int
        The axis of the stacked parameter along which they are joined.
    new_axis : bool, default False
        Stack them along a new axis ``axis`` (``numpy.stack``: one entry per member)
        instead of concatenating them along their own ``axis`` (``numpy.concatenate``:
        a block of entries per member).
    """

    members: tuple[str, ...]
    axis: int
    new_axis: bool = False

    def __post_init__(self) -> None:
        members = self.members
        if isinstance(members, str) or not isinstance(members, tuple | list) or not members or \
                not all(isinstance(m, str) for m in members):
            raise PermutationSpecError(f"Stack.members must be a non-empty tuple of parameter names, got {members!r}")
        if len(set(members)) != len(members):
            raise PermutationSpecError(f"Stack.members names a parameter twice: {list(members)}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int | np.integer) or self.axis < 0:
            raise PermutationSpecError(f"Stack.axis must be a non-negative int, got {self.axis!r}")
        object.__setattr__(self, "members", tuple(members))
        object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "new_axis", bool(self.new_axis))

    def to_json(self) -> dict[str, Any]:
        return {"members": list(self.members), "axis": self.axis, **({"new_axis": True} if self.new_axis else {})}

    @classmethod
    def from_json(cls, data: Any) -> Stack:
        if not isinstance(data, dict) or "members" not in data or "axis" not in data:
            raise PermutationSpecError(f"a stack is {{'members': [...], 'axis': k[, 'new_axis': true]}}, got {data!r}")
        return cls(tuple(data["members"]), data["axis"], bool(data.get("new_axis", False)))

    def join(self, arrays: Sequence[Any], name: str) -> np.ndarray:
        """The stacked parameter ``name`` of its members' ``arrays``."""
        arrays = [np.asarray(a) for a in arrays]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise PermutationSpecError(f"the members of {name!r} differ in shape: "
                                       + ", ".join(f"{m} {a.shape}" for m, a in zip(self.members, arrays, strict=True)))
        ndim = arrays[0].ndim + (1 if self.new_axis else 0)
        if self.axis >= max(ndim, 1):
            raise PermutationSpecError(f"{name!r} joins its members along axis {self.axis}, but it has {ndim} axes")
        return np.stack(arrays, self.axis) if self.new_axis else np.concatenate(arrays, self.axis)

    def split(self, array: Any, name: str) -> list[np.ndarray]:
        """The members' arrays of the stacked parameter ``name``."""
        array = np.asarray(array)
        count = len(self.members)
        if array.ndim <= self.axis or array.shape[self.axis] % count:
            raise PermutationSpecError(f"{name!r} of shape {array.shape} does not split into its {count} members "
                                       f"along axis {self.axis}")
        pieces = np.split(array, count, axis=self.axis)
        return [np.squeeze(p, self.axis) for p in pieces] if self.new_axis else pieces


@dataclass(frozen=True)
class Merge:
    """A parameter seen with two of its axes merged into one: ``groups`` blocks (its ``group_axis``: heads,
    experts) of units (its ``unit_axis``), block-major, in the place of the unit axis.

    A head's or an expert's units, on an axis of their own beside the heads' or experts'
    axis (flax's ``(d, heads, head_dim)`` kernels, experts stacked as ``(E, d, h)``), permute
    per block only when both axes are one: the merged axis is then bound to a
    :class:`~combinability.kinds.Blocks` permutation (see :func:`merge_blocks`).

    Parameters
    ----------
    member : str
        The parameter, or a view of one (a :class:`Part`: one half of transformers 5's
        ``gate_up_proj (E, 2h, d)``, whose experts' and units' axes are then merged).
    group_axis, unit_axis : int
        Its axes of the blocks and of their units (different).
    groups : int
        The number of blocks (the size of ``group_axis``).
    """

    member: str
    group_axis: int
    unit_axis: int
    groups: int

    def __post_init__(self) -> None:
        if not isinstance(self.member, str) or not self.member:
            raise PermutationSpecError(f"Merge.member must be a parameter name, got {self.member!r}")
        for what in ("group_axis", "unit_axis", "groups"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise PermutationSpecError(f"Merge.{what} must be a non-negative int, got {value!r}")
            object.__setattr__(self, what, int(value))
        if self.group_axis == self.unit_axis:
            raise PermutationSpecError(f"Merge of {self.member!r}: group_axis and unit_axis must differ")

    @property
    def members(self) -> tuple[str, ...]:
        return (self.member,)

    @property
    def axis(self) -> int:
        """The merged axis, in the merged parameter."""
        return self.unit_axis - (1 if self.group_axis < self.unit_axis else 0)

    def to_json(self) -> dict[str, Any]:
        return {"merge": self.member, "group_axis": self.group_axis, "unit_axis": self.unit_axis,
                "groups": self.groups}

    def join(self, arrays: Sequence[Any], name: str) -> np.ndarray:
        array = np.asarray(arrays[0])
        if max(self.group_axis, self.unit_axis) >= array.ndim or array.shape[self.group_axis] != self.groups:
            raise PermutationSpecError(f"{name!r} merges axes {self.group_axis} ({self.groups} blocks) and "
                                       f"{self.unit_axis} of {self.member!r}, whose shape is {array.shape}")
        moved = np.moveaxis(array, self.group_axis, self.axis)
        return moved.reshape(moved.shape[:self.axis] + (-1,) + moved.shape[self.axis + 2:])

    def split(self, array: Any, name: str) -> list[np.ndarray]:
        array = np.asarray(array)
        if array.ndim <= self.axis or array.shape[self.axis] % self.groups:
            raise PermutationSpecError(f"{name!r} of shape {array.shape} does not split into {self.groups} blocks "
                                       f"along axis {self.axis}")
        shape = array.shape[:self.axis] + (self.groups, -1) + array.shape[self.axis + 1:]
        return [np.moveaxis(array.reshape(shape), self.axis, self.group_axis)]


@dataclass(frozen=True)
class Part:
    """A slice of one parameter along one axis, ``[start:stop]``, bound as a parameter of its own.

    One layer's rows can hold several things that move in different ways: Phi-3's
    ``qkv_proj`` stacks the query heads, the key heads and the value heads, of unequal
    sizes, with rotary position embeddings keeping the units of each query and key head in
    order (:class:`~combinability.permutation.Repeat` entries), where a packed axis's
    segments can only be plain names. Seen as its parts, each slice gets an entry of
    any kind. The parts of one parameter must tile the axis: from 0, each starting where
    the last stopped, the last one running to the end (``stop=None``).

    Parameters
    ----------
    member : str
        The parameter.
    axis : int
        The axis it is cut along.
    start : int
        The part's first entry along ``axis``.
    stop : int or None
        One past its last entry; ``None``: the end of the axis.
    step : int, default 1
        Every ``step``-th entry from ``start`` to the end (``stop`` None): the parts of an axis
        whose entries alternate (GPT-OSS's gate and up units, ``g0, u0, g1, u1, ...``: ``[0::2]``
        and ``[1::2]``). The parts of one parameter then all have this step and the starts
        ``0 .. step - 1``.
    """

    member: str
    axis: int
    start: int
    stop: int | None = None
    step: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.member, str) or not self.member:
            raise PermutationSpecError(f"Part.member must be a parameter name, got {self.member!r}")
        for what in ("axis", "start", "stop", "step"):
            value = getattr(self, what)
            if value is None and what == "stop":
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise PermutationSpecError(f"Part.{what} must be a non-negative int, got {value!r}")
            object.__setattr__(self, what, int(value))
        if self.stop is not None and self.stop <= self.start:
            raise PermutationSpecError(f"Part of {self.member!r}: stop ({self.stop}) must exceed start ({self.start})")
        if self.step < 1 or self.step > 1 and (self.stop is not None or self.start >= self.step):
            raise PermutationSpecError(f"Part of {self.member!r}: a step ({self.step}) above 1 takes every step-th "
                                       f"entry from a start below it to the end (stop None), got start {self.start}, "
                                       f"stop {self.stop}")

    @property
    def members(self) -> tuple[str, ...]:
        return (self.member,)

    def to_json(self) -> dict[str, Any]:
        return {"part": self.member, "axis": self.axis, "start": self.start, "stop": self.stop,
                **({"step": self.step} if self.step != 1 else {})}

    def join(self, arrays: Sequence[Any], name: str) -> np.ndarray:
        """The part ``name`` of its member's array (a view)."""
        array = np.asarray(arrays[0])
        stop = array.shape[self.axis] if array.ndim > self.axis and self.stop is None else self.stop
        if array.ndim <= self.axis or stop > array.shape[self.axis] or stop <= self.start or \
                self.step > 1 and array.shape[self.axis] % self.step:
            step = f":{self.step}" if self.step != 1 else ""
            raise PermutationSpecError(f"{name!r} is {self.member!r}[{self.start}:{self.stop}{step}] along axis "
                                       f"{self.axis}, but its shape is {array.shape}")
        index = [slice(None)] * array.ndim
        index[self.axis] = slice(self.start, stop, self.step)
        return array[tuple(index)]

    def split(self, array: Any, name: str) -> list[np.ndarray]:
        """The piece of its member (:func:`split_members` joins the parts of a member)."""
        return [np.asarray(array)]


def _tiles(parts: Sequence[tuple[str, Part]], member: str) -> list[tuple[str, Part]]:
    """``parts`` of ``member`` in order, checked to tile one axis from 0 to the end (or, with a step, to take
    every entry once)."""
    ordered = sorted(parts, key=lambda kv: kv[1].start)
    axes = {part.axis for _, part in ordered}
    if len(axes) != 1:
        raise PermutationSpecError(f"the parts of {member!r} cut it along different axes: {sorted(axes)}")
    steps = {part.step for _, part in ordered}
    if steps != {1}:
        if len(steps) != 1 or [p.start for _, p in ordered] != list(range(len(ordered))) or len(ordered) != steps.pop():
            bounds = ", ".join(f"[{p.start}::{p.step}]" for _, p in ordered)
            raise PermutationSpecError(f"the strided parts of {member!r} must each take every k-th entry, k their "
                                       f"number, from the starts 0 .. k - 1, got {bounds}")
        return ordered
    at = 0
    for k, (_, part) in enumerate(ordered):
        last = k == len(ordered) - 1
        if part.start != at or (part.stop is None) != last:
            bounds = ", ".join(f"[{p.start}:{'' if p.stop is None else p.stop}]" for _, p in ordered)
            raise PermutationSpecError(f"the parts of {member!r} must tile its axis {part.axis} from 0 to the end "
                                       f"(the last with stop=None), got {bounds}")
        at = part.stop if part.stop is not None else at
    return ordered


def _interleave(pieces: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """The array whose entries along ``axis`` alternate between ``pieces`` (the inverse of strided parts)."""
    stacked = np.stack(pieces, axis + 1)
    return stacked.reshape(stacked.shape[:axis] + (-1,) + stacked.shape[axis + 2:])


def view_from_json(data: Any) -> Stack | Merge | Part:
    """A :class:`Stack`, :class:`Merge` or :class:`Part` from its ``to_json``."""
    if isinstance(data, dict) and "part" in data:
        try:
            return Part(data["part"], data["axis"], data["start"], data.get("stop"), data.get("step", 1))
        except KeyError as exc:
            raise PermutationSpecError(f"a part needs {exc}, got {data!r}") from None
    if isinstance(data, dict) and "merge" in data:
        try:
            return Merge(data["merge"], data["group_axis"], data["unit_axis"], data["groups"])
        except KeyError as exc:
            raise PermutationSpecError(f"a merge needs {exc}, got {data!r}") from None
    return Stack.from_json(data)


def merge_blocks(spec: Any, params: Mapping[str, Any], pairs: Mapping[str, str] | None = None) -> Any:
    """``spec`` with each permutation of units that only ever sits beside one of blocks made per block.

    A plain permutation ``P`` every one of whose axes lies in a parameter that also has an
    axis bound to a plain permutation ``G`` that binds more parameters besides (flax's heads:
    ``(d, heads, head_dim)`` query and key kernels beside the heads' value kernel; experts
    stacked as ``(E, d, h)`` beside the gate) permutes the units of every block alike. Per block
    is finer, and valid when the blocks never mix along ``P``'s axis (heads, experts): those
    parameters are seen merged (:class:`Merge`) and ``P`` becomes ``Blocks(G, |G|, |P|)``.
    Whether the finer map keeps the function is for the caller to verify
    (:func:`combinability.derive_symmetries` keeps each pair that does).

    Parameters
    ----------
    spec : PermutationSpec
    params : mapping of str to array-like
        The model's parameters (their shapes size the blocks).
    pairs : mapping of str to str, optional
        Which units to merge into which blocks (default: all of :func:`block_pairs`).

    Returns
    -------
    PermutationSpec
        ``spec`` itself when there is nothing to merge.
    """
    from combinability.kinds import Blocks
    from combinability.permutation import PermutationSpec

    pairs = block_pairs(spec) if pairs is None else dict(pairs)
    axes, kinds, views = dict(spec.axes_to_perm), dict(spec.kinds), dict(spec.stacks)
    if not pairs:
        return spec
    sizes = spec.perm_sizes(params)
    merged: dict[str, tuple[str, tuple]] = {}  # a parameter -> its merged view's name and entries
    for p, g in pairs.items():
        for name, axis in spec.perm_to_axes[p]:
            entry = axes[name]
            group_axis = entry.index(g)
            virtual = f"{name}:{g}"
            views[virtual] = Merge(name, group_axis, axis, sizes[g])
            merged[name] = (virtual, tuple(e for a, e in enumerate(entry) if a != group_axis))
        kinds[p] = Blocks(g, sizes[g], sizes[p])
    axes = dict(merged[name] if name in merged else (name, entry) for name, entry in axes.items())  # in spec order
    return PermutationSpec(axes, kinds, views)


def block_pairs(spec: Any) -> dict[str, str]:
    """The units a spec would permute per block (:func:`merge_blocks`): ``{units: blocks}``."""
    from combinability.kinds import Blocks

    views = spec.stacks
    plain = {p for p in spec.perm_to_axes if p not in spec.kinds and p not in spec.segments and p not in spec.repeats}
    blocks_of = {k.group for k in spec.kinds.values() if isinstance(k, Blocks)}  # already moving blocks
    holders = {p: {name for name, _ in entries} for p, entries in spec.perm_to_axes.items()}
    pairs: dict[str, str] = {}  # units -> blocks
    for p in sorted(plain - blocks_of):
        if any(isinstance(views.get(name), Stack | Merge) or list(spec.axes_to_perm[name]).count(p) != 1
               for name in holders[p]):  # a part of a parameter (one half of a fused gate_up) may be merged
            continue
        # the blocks: bound in every parameter of p (once), and in more (the heads' order binds the values too)
        found = [g for g in plain if g != p and holders[p] < holders[g]
                 and all(list(spec.axes_to_perm[name]).count(g) == 1 for name in holders[p])
                 and _one_side(spec, holders[p], g, p)]
        found.sort(key=lambda g: (len(holders[g]), g))  # the nearest: a head order, not the stream beside it
        if found and (len(found) == 1 or len(holders[found[0]]) < len(holders[found[1]])):
            pairs[p] = found[0]
    pairs = {p: g for p, g in pairs.items() if p not in pairs.values()}
    return pairs


def view_levels(stacks: Mapping[str, Stack | Merge | Part]) -> list[dict[str, Stack | Merge | Part]]:
    """The views of a spec in the order they are joined: first those whose members are all the model's
    parameters, then those with a member that is a view of the level before (a :class:`Merge` of a
    :class:`Part`: one half of transformers 5's ``gate_up_proj (E, 2h, d)``, seen with its experts'
    and units' axes merged), and so on.

    Raises
    ------
    PermutationSpecError
        If views name each other in a cycle.

    Examples
    --------
    >>> views = {"w:G": Merge("w[0:2]", 0, 1, 3), "w[0:2]": Part("w", 1, 0, 2), "w[2:]": Part("w", 1, 2)}
    >>> [sorted(level) for level in view_levels(views)]
    [['w[0:2]', 'w[2:]'], ['w:G']]
    """
    level: dict[str, int] = {}

    def depth(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise PermutationSpecError(f"the views {list(path[path.index(name):]) + [name]} name each other in a "
                                       "cycle; a view's members are the model's parameters or other views")
        if name not in level:
            inner = [depth(m, (*path, name)) for m in stacks[name].members if m in stacks]
            level[name] = 1 + max(inner) if inner else 0
        return level[name]

    for name in stacks:
        depth(name, ())
    levels: list[dict[str, Stack | Merge | Part]] = [{} for _ in range(max(level.values(), default=-1) + 1)]
    for name, view in stacks.items():
        levels[level[name]][name] = view
    return levels


def _one_side(spec: Any, names: set[str], g: str, p: str) -> bool:
    """Whether the blocks ``g`` lie on one side of the units ``p`` in every parameter of ``names`` (heads before
    their units in a query kernel ``(d, heads, head_dim)`` and in the output's ``(heads, head_dim, d)``; experts
    before their units in ``(E, h, d)`` and ``(E, d, h)``). A layer's input and output axes swap sides between
    the layers reading and writing a space (a stream beside a feed-forward layer's units), which are no blocks."""
    sides = {list(spec.axes_to_perm[name]).index(g) < list(spec.axes_to_perm[name]).index(p) for name in names}
    return len(sides) == 1


def join_members(stacks: Mapping[str, Stack | Merge | Part], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with each view's members replaced by the view (a stacked parameter, a merged one, the
    parts of one), in place of its first member; views of views after the views they read
    (:func:`view_levels`).

    A view none of whose members are given is left out; one given in part is an error.

    Raises
    ------
    PermutationSpecError
        If only some members of a stack are given, or they differ in shape.
    """
    out = dict(params)
    for level in view_levels(stacks):
        out = _join_level(level, out)
    return out


def _join_level(stacks: Mapping[str, Stack | Merge | Part], params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`join_members` of views whose members are all in ``params`` or none."""
    first: dict[str, list[str]] = {}
    for name, stack in stacks.items():
        present = [m for m in stack.members if m in params]
        if present and len(present) != len(stack.members):
            missing = [m for m in stack.members if m not in params]
            raise PermutationSpecError(f"the stacked parameter {name!r} needs all its members together; "
                                       f"{missing} are missing")
        if present:
            first.setdefault(stack.members[0], []).append(name)
    members = {m for names in first.values() for name in names for m in stacks[name].members}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in first:
            for name in first[key]:
                out[name] = stacks[name].join([params[m] for m in stacks[name].members], name)
        elif key not in members:
            out[key] = value
    return out


def split_members(stacks: Mapping[str, Stack | Merge | Part], params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`join_members`: each view given replaced by its members (the parts of one
    parameter joined back along their axis, in place of the first); views of views first.

    Raises
    ------
    PermutationSpecError
        If some parts of a parameter are given without the others.
    """
    out = dict(params)
    for level in reversed(view_levels(stacks)):
        out = _split_level(level, out)
    return out


def _split_level(stacks: Mapping[str, Stack | Merge | Part], params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`split_members` of the views of one level."""
    parts: dict[str, list[tuple[str, Part]]] = {}
    for name, view in stacks.items():
        if isinstance(view, Part):
            parts.setdefault(view.member, []).append((name, view))
    out: dict[str, Any] = {}
    for key, value in params.items():
        view = stacks.get(key)
        if isinstance(view, Part):
            if view.member in out:
                continue
            given = [kv for kv in parts[view.member] if kv[0] in params]
            if len(given) != len(parts[view.member]):
                missing = [name for name, _ in parts[view.member] if name not in params]
                raise PermutationSpecError(f"{view.member!r} is joined from all its parts; {missing} are missing")
            ordered = _tiles(given, view.member)
            out[view.member] = _interleave([np.asarray(params[name]) for name, _ in ordered], view.axis) \
                if view.step > 1 else np.concatenate([np.asarray(params[name]) for name, _ in ordered], view.axis)
        elif view is not None:
            out.update(zip(view.members, view.split(value, key), strict=True))
        else:
            out[key] = value
    return out


def stack_modules(spec: Any, group: str, modules: Sequence[str], params: Mapping[str, Any]) -> Any:
    """``spec`` with the parameters of ``modules`` (experts) stacked and their units moved as blocks of ``group``.

    Each module ``k`` must have the same parameters (names relative to the module), bound
    alike: the same names on axes bound to permutations that reach outside the module (the
    stream), and on the others permutations of its own (its hidden units), the ``k``-th of a
    one-to-one correspondence across modules. A member parameter with one axis of its own
    units joins along that axis, bound to a :class:`~combinability.kinds.Blocks` permutation
    of group ``group``; one with none stacks along a new first axis, bound to ``group``.

    Parameters
    ----------
    spec : PermutationSpec
        Its modules' own permutations must be plain neuron permutations.
    group : str
        The permutation of the modules (bound to the gate's rows: a neuron permutation of
        ``len(modules)`` units, or a name no axis binds yet).
    modules : sequence of str
        The modules' name prefixes, in the order of their blocks (``"moe.experts.0"``, ...).
    params : mapping of str to array-like
        The model's parameters (their shapes size the blocks).

    Returns
    -------
    PermutationSpec
        The stacked parameters are named after the modules with ``*`` for what tells them
        apart (``"moe.experts.*.w1.weight"``), their block permutations likewise
        (``"P_moe.experts.*.w1"``).

    Raises
    ------
    PermutationSpecError
        If the modules differ in parameters or binding, a parameter has two axes of its own
        units, or a module's own permutation is not a plain one.

    Examples
    --------
    >>> from combinability.permutation import PermutationSpec
    >>> spec = PermutationSpec({"gate.weight": ("G", "S"), "e.0.w1": ("P_e.0", "S"), "e.0.w2": ("S", "P_e.0"),
    ...                         "e.1.w1": ("P_e.1", "S"), "e.1.w2": ("S", "P_e.1")})
    >>> shapes = {k: np.zeros((3, 2)) if k.endswith("w1") else np.zeros((2, 3)) for k in spec.axes_to_perm}
    >>> stacked = stack_modules(spec, "G", ["e.0", "e.1"], {**shapes, "gate.weight": np.zeros((2, 2))})
    >>> dict(stacked.axes_to_perm)
    {'gate.weight': ('G', 'S'), 'e.*.w1': ('P_e.*', 'S'), 'e.*.w2': ('S', 'P_e.*')}
    >>> stacked.kind("P_e.*")
    Blocks(group='G', blocks=2, size=3)
    """
    from combinability.kinds import Blocks
    from combinability.permutation import PermutationSpec, _names_of

    modules = list(modules)
    if len(modules) < 2 or len(set(modules)) != len(modules):
        raise PermutationSpecError(f"stack_modules needs two or more distinct modules, got {modules}")
    sep = _separator(modules[0])
    axes = dict(spec.axes_to_perm)
    owned = [{k[len(m) + 1:]: v for k, v in axes.items() if k.startswith(m + sep)} for m in modules]
    for m, p in zip(modules, owned, strict=True):
        if not p:
            raise PermutationSpecError(f"module {m!r} has no parameter in the spec")
        if set(p) != set(owned[0]):
            raise PermutationSpecError(f"the modules {modules} differ in parameters: {m} has {sorted(p)}, "
                                       f"{modules[0]} has {sorted(owned[0])}")
    inside = [{q for entries in p.values() for e in entries for q in _names_of(e)} for p in owned]
    outside = {q for k, entries in axes.items() if not any(k.startswith(m + sep) for m in modules)
               for e in entries for q in _names_of(e)}
    own = [names - outside - set().union(*(o for j, o in enumerate(inside) if j != k))
           for k, names in enumerate(inside)]
    match: dict[str, str] = {}  # module k's own name -> module 0's
    for rel, entries0 in owned[0].items():
        for k, p in enumerate(owned):
            for e, e0 in zip(p[rel], entries0, strict=True):
                mine = isinstance(e, str) and e in own[k]
                if mine != (isinstance(e0, str) and e0 in own[0]) or (not mine and e != e0) or (
                        mine and match.setdefault(f"{k}:{e}", e0) != e0) or (
                        not mine and any(q in own[k] for q in _names_of(e))):
                    raise PermutationSpecError(
                        f"{modules[k]}.{rel} is bound as {p[rel]}, unlike {modules[0]}.{rel} ({entries0}); "
                        "modules stacked as experts must be bound alike (their own units on plain axes)")
    for q in own[0]:
        if q in spec.kinds:
            raise PermutationSpecError(f"{q!r} of {modules[0]} is {spec.kind(q)}; only modules whose own units "
                                       "are plain permutations are stacked")
    prefix = os.path.commonprefix(modules)
    suffix = os.path.commonprefix([m[len(prefix):][::-1] for m in modules])[::-1]
    star = f"{prefix}*{suffix}"

    def block_name(q: str) -> str:  # a permutation named after the module (flax's without the collection)
        parts, stars = modules[0].split(sep), star.split(sep)
        for k in range(len(parts)):
            tail = sep.join(parts[k:])
            if tail in q and len(stars) == len(parts):
                return q.replace(tail, sep.join(stars[k:]))
        return f"{q}*"

    kinds = dict(spec.kinds)
    stacks = dict(spec.stacks)
    members_of = {f"{m}{sep}{rel}" for m in modules for rel in owned[0]}
    out: dict[str, tuple] = {}
    for key, entries in axes.items():
        if key not in members_of:
            out[key] = entries
        elif key.startswith(modules[0] + sep):
            rel = key[len(modules[0]) + 1:]
            mine = [ax for ax, e in enumerate(entries) if isinstance(e, str) and e in own[0]]
            name = f"{star}{sep}{rel}"
            if name in axes or name in stacks:
                raise PermutationSpecError(f"the stacked parameter {name!r} would shadow a name the spec has")
            members = tuple(f"{m}{sep}{rel}" for m in modules)
            if len(mine) > 1:
                raise PermutationSpecError(
                    f"{key} has {len(mine)} axes of its module's own units ({[entries[ax] for ax in mine]}); "
                    "only modules whose parameters have at most one such axis are stacked as experts")
            if mine:
                stacks[name] = Stack(members, mine[0])
                out[name] = tuple(block_name(e) if j == mine[0] else e for j, e in enumerate(entries))
                size = int(np.shape(params[key])[mine[0]])
                kinds[block_name(entries[mine[0]])] = Blocks(group, len(modules), size)
            else:
                stacks[name] = Stack(members, 0, new_axis=True)
                out[name] = (group, *entries)
    return PermutationSpec(out, kinds, stacks)


def _separator(name: str) -> str:
    """How a framework joins module names: flax's paths by ``/``, torch's by ``.``."""
    return "/" if "/" in name else "."


def module_of(param: str) -> str:
    """The module a parameter name belongs to (``"moe.gate.weight"`` -> ``"moe.gate"``)."""
    return param.rpartition(_separator(param))[0]


def sibling_modules(params: Mapping[str, Any], anchor: str, count: int) -> list[str] | None:
    """The ``count`` modules of one structure nearest to the module ``anchor`` (a router's gate): its experts.

    Read from parameter names and shapes alone: the modules are children of one module (or
    of the root) below the nearest ancestor of ``anchor`` that has such a group, none holding
    ``anchor``, each with the same parameters (relative names and shapes), in the order of
    their names' trailing numbers where they have them (``experts.10`` after ``experts.9``).

    Parameters
    ----------
    params : mapping of str to array-like
        The model's parameters by name (``"moe.experts.0.w1.weight"``, ``"params/experts_0/fc1/kernel"``).
    anchor : str
        The module the search starts from.
    count : int
        The number of modules wanted (the gate's rows).

    Returns
    -------
    list of str or None
        The modules' names, or ``None`` when no ancestor of ``anchor`` has such a group.

    Raises
    ------
    PermutationSpecError
        If the nearest ancestor with such a group has two of them.

    Examples
    --------
    >>> shapes = {f"moe.experts.{e}.fc.weight": np.zeros((4, 2)) for e in range(3)}
    >>> sibling_modules({**shapes, "moe.gate.weight": np.zeros((3, 2))}, "moe.gate", 3)
    ['moe.experts.0', 'moe.experts.1', 'moe.experts.2']
    """
    sep = _separator(anchor)
    children: dict[str, list[str]] = {}
    structure: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, value in params.items():
        parts = name.split(sep)
        for depth in range(1, len(parts)):
            module, parent = sep.join(parts[:depth]), sep.join(parts[:depth - 1])
            if module not in structure:
                children.setdefault(parent, []).append(module)
            structure.setdefault(module, []).append((sep.join(parts[depth:]), tuple(np.shape(value))))
    parts = anchor.split(sep)
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = sep.join(parts[:depth])
        groups: list[list[str]] = []
        for parent, kids in children.items():
            if ancestor and parent != ancestor and not parent.startswith(ancestor + sep):
                continue
            by_structure: dict[tuple, list[str]] = {}
            for kid in kids:
                if anchor == kid or anchor.startswith(kid + sep):
                    continue  # a list of blocks, one of which holds the gate, is not its experts
                by_structure.setdefault(tuple(sorted(structure[kid])), []).append(kid)
            groups += [g for g in by_structure.values() if len(g) == count]
        if len(groups) > 1:
            raise PermutationSpecError(f"the router {anchor!r} selects one of {count} experts, and several groups of "
                                       f"{count} modules could be them: {[g[0] for g in groups]}")
        if groups:
            return sorted(groups[0], key=_natural)
    return None


def _natural(name: str) -> tuple:
    """Sort key: ``experts.10`` after ``experts.9``."""
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def stack_experts(spec: Any, group: str, modules: Sequence[str], params: Mapping[str, Any]) -> Any:
    """:func:`stack_modules`, or, for experts that cannot be stacked (two hidden layers of their own),
    ``spec`` with ``group`` (the gate's rows) left in place and a
    :class:`~combinability.errors.CombinabilityWarning` that says why: sound, their units still aligned."""
    import warnings

    from combinability.errors import CombinabilityWarning
    from combinability.permutation import PermutationSpec

    try:
        return stack_modules(spec, group, modules, params)
    except PermutationSpecError as exc:
        warnings.warn(f"the experts {modules[0]}, ... of {group!r} stay in place (their units are still aligned "
                      f"inside each), as they cannot be moved as blocks: {exc}", CombinabilityWarning, stacklevel=3)
        return PermutationSpec({k: tuple(None if e == group else e for e in v) for k, v in spec.axes_to_perm.items()},
                               spec.kinds, spec.stacks)
