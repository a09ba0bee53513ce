"""Permutation specs and the operations on permutations of hidden units.

A :class:`PermutationSpec` says, for every named parameter, which permutation (if
any) acts on each of its axes. A *permutation* is a mapping from permutation name to
an integer index array ``perm[P]`` of length ``n_P``; applying it to parameters
gathers along every axis bound to ``P``::

    out[name] (index j along a P-axis) == params[name] (index perm[P][j])

so that ``apply_permutation(spec, perm, params_b)`` is a network functionally
identical to ``params_b`` whose unit ``j`` is B's unit ``perm[P][j]``.

Beyond neuron permutations a spec may declare other symmetry kinds
(:mod:`combinability.kinds`): block permutations that move attention heads or experts
whole, and orthogonal maps of a residual stream, whose value is a matrix ``Q`` applied
along every bound axis. An axis may also pack segments that move separately (stacked
query/key/value rows), or repeat each unit of a permutation in place (:class:`Repeat`: a
feature map flattened channel by channel into a dense layer's input). Apply, inverse,
compose, identity and random draws below handle every kind.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np

from combinability.errors import ConfigurationError, PermutationSpecError
from combinability.kinds import (
    Blocks,
    Dual,
    Invertible,
    Kind,
    Neuron,
    Orthogonal,
    act,
    block_matrix,
    block_parts,
    check_value,
    compose,
    dual_of,
    expand_blocks,
    invert,
    kind_from_json,
    random_invertible,
    random_orthogonal,
)
from combinability.module_stacks import (
    Merge,
    Part,
    Stack,
    _tiles,
    join_members,
    split_members,
    view_from_json,
    view_levels,
)

__all__ = [
    "PermutationSpec",
    "Repeat",
    "split_axis",
    "split_repeats",
    "join_stacks",
    "Permutation",
    "apply_permutation",
    "invert_permutation",
    "compose_permutations",
    "identity_permutation",
    "random_permutation",
    "random_derangement",
    "check_permutation",
]


@dataclass(frozen=True)
class Repeat:
    """An axis holding ``times`` entries per unit of the permutation ``name``.

    A feature map of ``name``'s channels flattened into a dense layer's input: the
    permutation moves each channel's ``times`` entries (its positions) together and
    keeps their order. Flattened channel by channel (torch's ``flatten`` of ``(c, h, w)``)
    a unit's entries are consecutive (``unit * times + position``); flattened position by
    position (flax's reshape of ``(h, w, c)``, ``interleaved=True``) the units are
    (``position * n + unit``). The axis has ``times`` x the permutation's size.

    Examples
    --------
    >>> import numpy as np
    >>> spec = PermutationSpec({"conv.weight": ("C", None, None, None), "fc.weight": (None, Repeat("C", 2))})
    >>> out = apply_permutation(spec, {"C": np.array([1, 0])}, {"fc.weight": np.array([[1, 2, 3, 4]])})
    >>> out["fc.weight"].tolist()
    [[3, 4, 1, 2]]
    """

    name: str
    times: int
    interleaved: bool = False

    @property
    def unit_axis(self) -> int:
        """Where the units are among the two axes :func:`split_axis` splits the axis into."""
        return 1 if self.interleaved else 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PermutationSpecError(f"Repeat.name must be a permutation name, got {self.name!r}")
        if not isinstance(self.times, int | np.integer) or isinstance(self.times, bool) or self.times < 1:
            raise PermutationSpecError(f"Repeat.times must be a positive int, got {self.times!r}")
        object.__setattr__(self, "times", int(self.times))


Entry = str | tuple[str, ...] | Repeat | None


def _entry(name: str, p: Any) -> Entry:
    if p is None or isinstance(p, str | Repeat):
        return p
    if isinstance(p, tuple | list) and p and all(isinstance(q, str) for q in p):
        return tuple(p)
    if isinstance(p, dict) and set(p) in ({"repeat", "times"}, {"repeat", "times", "interleaved"}):  # JSON
        return Repeat(p["repeat"], p["times"], bool(p.get("interleaved", False)))
    raise PermutationSpecError(
        f"{name!r}: an axis entry is a permutation name, None, a tuple of names (consecutive segments "
        f"of a packed axis, e.g. ('qk', 'qk', 'vo') for stacked query/key/value rows), or a Repeat (each "
        f"unit repeated in place: a flattened feature map); got {p!r}"
    )


def _names_of(p: Entry) -> tuple[str, ...]:
    """The permutation names an axis entry binds."""
    return (p,) if isinstance(p, str) else (p.name,) if isinstance(p, Repeat) else (p or ())


class PermutationSpec:
    """Which transformation acts on which axis of which parameter.

    Parameters
    ----------
    axes_to_perm : mapping of str to tuple
        One entry per parameter; the tuple has one element per axis: the name of the
        permutation acting on that axis, ``None``, or a tuple of names when the axis
        packs consecutive segments that move separately (torch's ``in_proj_weight``
        stacks query, key and value rows: ``("qk", "qk", "vo")``).
    kinds : mapping of str to Kind, optional
        The symmetry kind of names that are not plain neuron permutations:
        :class:`~combinability.kinds.Blocks` (heads, experts) or
        :class:`~combinability.kinds.Orthogonal` (a residual stream).
    stacks : mapping of str to Stack, Merge or Part, optional
        Parameters of ``axes_to_perm`` that are views of the model's parameters: several
        joined (:class:`~combinability.module_stacks.Stack`: experts held as separate
        modules), two axes of one merged (:class:`~combinability.module_stacks.Merge`), or
        a slice of one (:class:`~combinability.module_stacks.Part`: Phi-3's query, key and
        value rows, each moving its own way).
        The parameters a spec is given and returns keep the model's names; its
        ``axes_to_perm`` binds the stacked ones.

    Examples
    --------
    >>> spec = PermutationSpec({
    ...     "fc1.weight": ("P0", None), "fc1.bias": ("P0",),
    ...     "fc2.weight": (None, "P0"), "fc2.bias": (None,),
    ... })
    >>> spec.perm_to_axes["P0"]
    [('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)]
    >>> from combinability.kinds import Blocks
    >>> heads = PermutationSpec({"in_proj": (("qk", "qk", "vo"), None), "out_proj": (None, "vo")},
    ...                         kinds={"qk": Blocks("heads", 2, 3), "vo": Blocks("heads", 2, 3)})
    >>> heads.perm_names, heads.is_plain
    (('qk', 'vo', 'heads'), False)
    """

    def __init__(self, axes_to_perm: Mapping[str, tuple[Entry, ...]], kinds: Mapping[str, Kind] | None = None,
                 stacks: Mapping[str, Stack] | None = None) -> None:
        checked: dict[str, tuple[Entry, ...]] = {}
        for name, axes in axes_to_perm.items():
            if not isinstance(name, str):
                raise PermutationSpecError(f"parameter names must be str, got {name!r}")
            if isinstance(axes, str) or not isinstance(axes, tuple | list):
                raise PermutationSpecError(
                    f"{name!r}: axes must be a tuple with one entry (a permutation name or None) per axis, "
                    f"got {axes!r}"
                )
            checked[name] = tuple(_entry(name, p) for p in axes)
        self._axes = MappingProxyType(checked)
        self._kinds = MappingProxyType({k: v for k, v in (kinds or {}).items() if not isinstance(v, Neuron)})
        self._stacks = MappingProxyType(dict(stacks or {}))
        self._check_stacks()
        bound = set(self._bound_names())
        for p, kind in self._kinds.items():
            if not isinstance(kind, Blocks | Orthogonal | Invertible | Dual):
                raise PermutationSpecError(f"kind of {p!r} must be Neuron, Blocks, Orthogonal, Invertible or Dual, "
                                           f"got {kind!r}")
            if p not in bound:
                raise PermutationSpecError(f"kinds name {p!r}, which no axis of the spec binds")
            if isinstance(kind, Blocks | Invertible) and kind.group in self._kinds:
                raise PermutationSpecError(f"{p!r}: the group {kind.group!r} of a {type(kind).__name__} kind must be "
                                           "a plain permutation of the blocks")
            if isinstance(kind, Dual) and not isinstance(self._kinds.get(kind.of), Invertible):
                raise PermutationSpecError(f"{p!r} is the dual of {kind.of!r}, which is not an Invertible name of "
                                           "this spec")
        for p, kind in self._kinds.items():
            if isinstance(kind, Blocks | Invertible):
                for q, other in self._kinds.items():
                    if (isinstance(other, Blocks | Invertible) and other.group == kind.group
                            and other.blocks != kind.blocks):
                        raise PermutationSpecError(
                            f"{p!r} and {q!r} share the group {kind.group!r} with different block counts "
                            f"({kind.blocks} vs {other.blocks}); blocks of one group move together")

    def _check_stacks(self) -> None:
        seen: dict[str, str] = {}
        parts: dict[str, list[tuple[str, Part]]] = {}
        for name, stack in self._stacks.items():
            if not isinstance(stack, Stack | Merge | Part):
                raise PermutationSpecError(f"stacks[{name!r}] must be a Stack, a Merge or a Part, got {stack!r}")
            for m in stack.members:
                if m in self._axes:
                    raise PermutationSpecError(f"{m!r} is both a parameter of the spec and a member of the stacked "
                                               f"parameter {name!r}")
                if isinstance(stack, Part) and (m not in seen or m in parts):  # the parts of one parameter share it
                    parts.setdefault(m, []).append((name, stack))
                    seen.setdefault(m, name)
                    continue
                if seen.setdefault(m, name) != name:
                    raise PermutationSpecError(f"{m!r} is a member of both {seen[m]!r} and {name!r}")
        view_levels(self._stacks)  # views of views (a part of a parameter, merged), never in a cycle
        for name, stack in self._stacks.items():
            if name not in self._axes and name not in seen:
                raise PermutationSpecError(f"the stacked parameter {name!r} is bound by no entry of the spec")
            if stack.axis >= self._ndim_of(name):
                raise PermutationSpecError(f"{name!r} joins its members along axis {stack.axis}, but the spec gives "
                                           f"it {self._ndim_of(name)} axes")
        for m, cut in parts.items():
            _tiles(cut, m)
            if len({self._ndim_of(name) for name, _ in cut}) != 1:
                raise PermutationSpecError(f"the parts of {m!r} are given different numbers of axes")

    def _ndim_of(self, name: str) -> int:
        """The number of axes of a name of :attr:`axes_to_perm` or of a view's member that is itself a view."""
        if name in self._axes:
            return len(self._axes[name])
        for outer, view in self._stacks.items():
            if name in view.members:
                ndim = self._ndim_of(outer)
                return ndim + 1 if isinstance(view, Merge) else ndim - 1 if isinstance(view, Stack) and \
                    view.new_axis else ndim
        raise PermutationSpecError(f"the spec binds no parameter {name!r}")

    def _bound_names(self) -> list[str]:
        names: list[str] = []
        for axes in self._axes.values():
            for p in axes:
                for q in _names_of(p):
                    if q not in names:
                        names.append(q)
        return names

    @property
    def axes_to_perm(self) -> Mapping[str, tuple[Entry, ...]]:
        """Parameter name to the permutation name (``None``, or a tuple of segment names) of each axis."""
        return self._axes

    @property
    def stacks(self) -> Mapping[str, Stack]:
        """Stacked parameters (experts held as separate modules) and their members."""
        return self._stacks

    @property
    def parameters(self) -> tuple[str, ...]:
        """The model's parameters the spec binds: :attr:`axes_to_perm`'s, each stacked one as its members."""
        stacks = self._stacks

        def members(name: str) -> list[str]:
            return [m for k in stacks[name].members for m in members(k)] if name in stacks else [name]

        return tuple(dict.fromkeys(m for name in self._axes for m in members(name)))

    def axes_of(self, param: str) -> tuple[Entry, ...]:
        """What acts on each axis of the model's parameter ``param``, also when the spec binds it through a
        stacked or merged view (:attr:`stacks`): a member's axis joined with others is bound to the view's
        block permutation; a merged parameter's blocks axis to the blocks' own permutation; the axis a
        parameter is cut along into parts (:class:`~combinability.module_stacks.Part`) to the tuple of
        the parts' entries, in order. Views of views are followed.

        Raises
        ------
        PermutationSpecError
            If the spec binds no such parameter.
        """
        if param in self._axes:
            return self._axes[param]
        cut = sorted(((view.start, name) for name, view in self._stacks.items()
                      if isinstance(view, Part) and view.member == param))
        if cut:
            view = self._stacks[cut[0][1]]
            entries = list(self.axes_of(cut[0][1]))
            entries[view.axis] = tuple(self.axes_of(name)[view.axis] for _, name in cut)
            return tuple(entries)
        for name, view in self._stacks.items():
            if param in view.members:
                entries = list(self.axes_of(name))
                if isinstance(view, Merge):
                    entries.insert(view.group_axis, self.group_of(entries[view.axis]))
                elif view.new_axis:
                    del entries[view.axis]
                return tuple(entries)
        raise PermutationSpecError(f"the spec binds no parameter {param!r}")

    def joined(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` as :attr:`axes_to_perm` names them: each stack's members joined (:func:`join_members`)."""
        return join_members(self._stacks, params)

    @property
    def kinds(self) -> Mapping[str, Kind]:
        """Names that are not plain neuron permutations, and their kinds."""
        return self._kinds

    def kind(self, name: str) -> Kind:
        """The kind of one name (:class:`~combinability.kinds.Neuron` unless declared)."""
        return self._kinds.get(name, Neuron())

    @property
    def is_plain(self) -> bool:
        """True when every name is a neuron permutation bound to whole axes (the classic re-basin spec)."""
        return not self._kinds and not self.segments and not self.repeats and not self._stacks

    @cached_property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name to the whole ``(parameter, axis)`` pairs it acts on, in spec order.

        Segments of packed axes are listed by :attr:`segments`.
        """
        out: dict[str, list[tuple[str, int]]] = {}
        for name, axes in self._axes.items():
            for axis, p in enumerate(axes):
                if isinstance(p, str):
                    out.setdefault(p, []).append((name, axis))
        return out

    @cached_property
    def segments(self) -> dict[str, list[tuple[str, int, int]]]:
        """Name to the ``(parameter, axis, segment index)`` of every packed-axis segment it acts on."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        for name, axes in self._axes.items():
            for axis, p in enumerate(axes):
                if isinstance(p, tuple):
                    for k, q in enumerate(p):
                        out.setdefault(q, []).append((name, axis, k))
        return out

    @cached_property
    def repeats(self) -> dict[str, list[tuple[str, int, int]]]:
        """Name to the ``(parameter, axis, times)`` of every axis repeating its units (:class:`Repeat`)."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        for name, axes in self._axes.items():
            for axis, p in enumerate(axes):
                if isinstance(p, Repeat):
                    out.setdefault(p.name, []).append((name, axis, p.times))
        return out

    def group_of(self, name: Any) -> str | None:
        """The block group a name moves its units with (a :class:`Blocks` or :class:`Invertible` name, or
        the :class:`Dual` of one), else None."""
        kind = self.kind(name) if isinstance(name, str) else None
        if isinstance(kind, Dual):
            kind = self.kind(kind.of)
        return kind.group if isinstance(kind, Blocks | Invertible) else None

    @property
    def perm_names(self) -> tuple[str, ...]:
        """Names of the transformations, in order of first appearance (block groups last)."""
        names = self._bound_names()
        for kind in self._kinds.values():
            if isinstance(kind, Blocks | Invertible) and kind.group not in names:
                names.append(kind.group)
        return tuple(names)

    def __repr__(self) -> str:
        extra = f", kinds {dict(self._kinds)}" if self._kinds else ""
        return f"PermutationSpec({len(self._axes)} parameters, permutations {list(self.perm_names)}{extra})"

    def to_json(self) -> str:
        """The spec as JSON: ``{"format": "combinability-spec", "version": 1|2|3, "axes": {...}, "kinds": {...}}``.

        Version 1 (no ``kinds``) is written for plain specs, so older readers keep reading them;
        version 3 for a spec with ``stacks``.
        """
        import json

        axes = {k: [list(p) if isinstance(p, tuple) else _repeat_json(p) if isinstance(p, Repeat) else p for p in v]
                for k, v in self._axes.items()}
        data: dict[str, Any] = {"format": "combinability-spec", "version": 1 if self.is_plain else 2, "axes": axes}
        if self._kinds:
            data["kinds"] = {k: v.to_json() for k, v in self._kinds.items()}
        if self._stacks:  # version 3: a reader that ignored them would bind names the model lacks
            data["version"] = 3
            data["stacks"] = {k: v.to_json() for k, v in self._stacks.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PermutationSpec:
        """Read a spec written by :meth:`to_json` (or a plain ``{name: [perm|null, ...]}`` object).

        Raises
        ------
        PermutationSpecError
            If the text is not JSON or does not describe a spec.
        """
        import json

        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise PermutationSpecError(f"not a JSON permutation spec: {exc}") from None
        kinds: dict[str, Kind] = {}
        stacks: dict[str, Stack] = {}
        if isinstance(data, dict) and data.get("format") == "combinability-spec":
            if data.get("version") not in (1, 2, 3):
                raise PermutationSpecError(f"permutation spec version {data.get('version')!r}; this library "
                                           "reads 1 to 3")
            kinds = {k: kind_from_json(v) for k, v in (data.get("kinds") or {}).items()}
            stacks = {k: view_from_json(v) for k, v in (data.get("stacks") or {}).items()}
            data = data.get("axes")
        if not isinstance(data, dict):
            raise PermutationSpecError("a JSON permutation spec is an object {parameter: [permutation or null, ...]}")
        return cls({k: tuple(tuple(p) if isinstance(p, list) else p for p in v) if isinstance(v, list) else v
                    for k, v in data.items()}, kinds, stacks)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PermutationSpec) and dict(self._axes) == dict(other._axes)
                and dict(self._kinds) == dict(other._kinds) and dict(self._stacks) == dict(other._stacks))

    def __hash__(self) -> int:
        return hash((tuple(self._axes.items()), tuple(self._kinds.items()), tuple(self._stacks.items())))

    def perm_sizes(self, params: Mapping[str, Any]) -> dict[str, int]:
        """Size of each transformation, read off ``params`` (which :meth:`validate` checks)."""
        self.validate(params, allow_unlisted=True)
        return self._sizes(self.joined(params))

    def _sizes(self, params: Mapping[str, Any]) -> dict[str, int]:
        sizes = {p: int(np.shape(params[axes[0][0]])[axes[0][1]]) for p, axes in self.perm_to_axes.items()}
        for p, entries in self.repeats.items():
            name, axis, times = entries[0]
            sizes.setdefault(p, int(np.shape(params[name])[axis]) // times)
        for p, kind in self._kinds.items():
            if isinstance(kind, Blocks | Invertible):
                sizes.setdefault(p, kind.blocks * kind.size)
                sizes.setdefault(kind.group, kind.blocks)
        packed = [(p, int(np.shape(params[name])[axis])) for name, axes in self._axes.items()
                  for axis, p in enumerate(axes) if isinstance(p, tuple)]
        _solve_segment_sizes(packed, sizes)
        return {p: sizes[p] for p in self.perm_names if p in sizes}

    def validate(self, params: Mapping[str, Any], *, allow_unlisted: bool = False) -> None:
        """Check that the spec fits ``params``.

        Parameters
        ----------
        params : mapping of str to array-like
            Named parameters (only their shapes are read).
        allow_unlisted : bool, default False
            Accept parameters that the spec does not list (left unpermuted).

        Raises
        ------
        PermutationSpecError
            Naming the parameter and axis at fault: a listed parameter that does not
            exist, a parameter the spec misses, an entry with the wrong number of axes,
            two axes bound to one permutation with different sizes, segments that do
            not add up to their axis, or blocks that do not fit their name's size.
        """
        params = self.joined(params)
        missing = [n if n not in self._stacks else f"{n} (stacking {', '.join(self._stacks[n].members)})"
                   for n in self._axes if n not in params]
        if missing:
            known = ", ".join(list(params)[:12]) + (" ..." if len(params) > 12 else "")
            raise PermutationSpecError(
                f"the spec names parameter(s) that do not exist: {missing}; the model has: {known}"
            )
        if not allow_unlisted:
            unlisted = [n for n in params if n not in self._axes]
            if unlisted:
                raise PermutationSpecError(
                    f"the spec misses parameter(s) {unlisted}; list every parameter, with None for "
                    "axes no permutation acts on (or pass allow_unlisted=True)"
                )
        for name, axes in self._axes.items():
            shape = np.shape(params[name])
            if len(axes) != len(shape):
                raise PermutationSpecError(
                    f"{name!r} has {len(shape)} axes (shape {tuple(shape)}) but the spec gives {len(axes)}: {axes}"
                )
        for p, entries in self.perm_to_axes.items():
            first_name, first_axis = entries[0]
            size = np.shape(params[first_name])[first_axis]
            for name, axis in entries[1:]:
                other = np.shape(params[name])[axis]
                if other != size:
                    raise PermutationSpecError(
                        f"permutation {p!r} binds axes of different sizes: {name!r} axis {axis} has size "
                        f"{other}, but {first_name!r} axis {first_axis} has size {size}"
                    )
        sizes = self._sizes(params)
        for p, kind in self._kinds.items():
            if isinstance(kind, Blocks | Invertible) and sizes[p] != kind.blocks * kind.size:
                raise PermutationSpecError(
                    f"{p!r} has {sizes[p]} units but its kind says {kind.blocks} blocks of {kind.size}")
            if isinstance(kind, Dual) and sizes[p] != sizes[kind.of]:
                raise PermutationSpecError(f"{p!r} has {sizes[p]} units but is the dual of {kind.of!r}, which has "
                                           f"{sizes[kind.of]}")
            if (isinstance(kind, Blocks | Invertible) and kind.group in self.perm_to_axes
                    and sizes[kind.group] != kind.blocks):
                raise PermutationSpecError(
                    f"the group {kind.group!r} of {p!r} binds axes of size {sizes[kind.group]}, not "
                    f"{kind.blocks} blocks")
        for p, entries in self.repeats.items():
            for name, axis, times in entries:
                length = np.shape(params[name])[axis]
                if length != sizes[p] * times:
                    raise PermutationSpecError(
                        f"{name!r} axis {axis} has size {length}, but it repeats each of the {sizes[p]} units of "
                        f"{p!r} {times} times ({sizes[p] * times})")
        for name, axes in self._axes.items():
            for axis, p in enumerate(axes):
                if isinstance(p, tuple) and sum(sizes[q] for q in p) != np.shape(params[name])[axis]:
                    raise PermutationSpecError(
                        f"{name!r} axis {axis} has size {np.shape(params[name])[axis]}, but its segments {p} add "
                        f"up to {sum(sizes[q] for q in p)} ({', '.join(f'{q}: {sizes[q]}' for q in p)})")

    def permutations_only(self) -> PermutationSpec:
        """This spec with every orthogonal map replaced by a permutation of the same axes.

        The norms an orthogonal map needed folded (its ``requires``) are permuted with the
        stream instead, so the model is used as it is — the permutation-only alignment a
        study compares against. Invertible maps inside blocks become permutations inside
        blocks, their duals bound to the same names (:meth:`without_invertible`).
        """
        spec = self.without_invertible()
        axes = dict(spec._axes)
        for p, kind in spec._kinds.items():
            if isinstance(kind, Orthogonal):
                for name, _ in kind.requires:
                    axes[name] = (p,) + tuple(axes.get(name, (None,)))[1:]
        return PermutationSpec(axes, {p: k for p, k in spec._kinds.items() if not isinstance(k, Orthogonal)},
                               spec._stacks)

    def stored_as(self, parts: Mapping[str, Sequence[tuple[str, tuple[int | None, ...]]]]) -> PermutationSpec:
        """This spec for a model that stores some parameters as several tensors: ``parts[name]`` lists each
        tensor that ``name`` is computed from, with, for each of its axes, the axis of ``name`` it runs along
        (its entry is that axis's) or None (not permuted: a size-1 axis of a weight norm's gains).

        Examples
        --------
        >>> spec = PermutationSpec({"fc.weight": ("P", None), "fc.bias": ("P",)})
        >>> weight_norm = {"fc.weight": [("fc.g", (0, None)), ("fc.v", (0, 1))]}
        >>> dict(spec.stored_as(weight_norm).axes_to_perm)
        {'fc.g': ('P', None), 'fc.v': ('P', None), 'fc.bias': ('P',)}
        """
        axes: dict[str, tuple[Entry, ...]] = {}
        for name, entry in self._axes.items():
            if name not in parts:
                axes[name] = entry
                continue
            for stored, along in parts[name]:
                if any(a is not None and not 0 <= a < len(entry) for a in along):
                    raise PermutationSpecError(f"{stored!r} runs along axes {along} of {name!r}, which has "
                                               f"{len(entry)} axes")
                axes[stored] = tuple(None if a is None else entry[a] for a in along)
        return PermutationSpec(axes, self._kinds, self._stacks)

    def without_invertible(self) -> PermutationSpec:
        """This spec with each :class:`Invertible` name a :class:`Blocks` permutation and its
        :class:`Dual`'s axes bound to it (the spec it was made from by
        :func:`combinability.invertible.invertible_spec`)."""
        duals = {p: k.of for p, k in self._kinds.items() if isinstance(k, Dual)}
        if not duals and not any(isinstance(k, Invertible) for k in self._kinds.values()):
            return self
        axes = {name: tuple(rename_entry(e, duals) for e in entry) for name, entry in self._axes.items()}
        kinds = {p: Blocks(k.group, k.blocks, k.size) if isinstance(k, Invertible) else k
                 for p, k in self._kinds.items() if p not in duals}
        return PermutationSpec(axes, kinds, self._stacks)

    def check_requirements(self, params: Mapping[str, Any]) -> None:
        """Refuse orthogonal maps on a model whose norms are not folded (see :func:`combinability.fold_norms`)."""
        for p, kind in self._kinds.items():
            if isinstance(kind, Orthogonal):
                for name, value in kind.requires:
                    arr = np.asarray(params[name]) if name in params else None
                    if arr is None or not np.allclose(arr, value, atol=1e-6):
                        raise PermutationSpecError(
                            f"an orthogonal map of {p!r} needs {name!r} to be all {value:g} (a norm on the stream "
                            "whose scale/shift is folded into the layers that read it); it is not — call "
                            "cb.fold_norms(...) first, or align with permutations only")


def rename_entry(entry: Entry, names: Mapping[str, str]) -> Entry:
    """An axis entry with each name in ``names`` replaced by what it maps to."""
    if isinstance(entry, str):
        return names.get(entry, entry)
    if isinstance(entry, Repeat):
        return Repeat(names.get(entry.name, entry.name), entry.times, entry.interleaved)
    if isinstance(entry, tuple):
        return tuple(names.get(q, q) for q in entry)
    return entry


class Permutation(dict):
    """A permutation of a spec: ``{name: int64 index array}``, plus how it was found.

    It is a plain ``dict`` (so ``perm["P0"]`` works) with attributes filled in by the
    matching procedures.

    Attributes
    ----------
    objective : float or None
        The matching objective reached (for weight matching, ``Σ ⟨θ_A, π(θ_B)⟩``).
    history : list of float
        Objective after the start and after each sweep of the best run.
    iterations : int
        Sweeps of the best run.
    method : str
        ``"weight"``, ``"activation"``, ``"identity"``, ``"random"``, ...
    """

    def __init__(self, *args: Any, objective: float | None = None, history: list[float] | None = None,
                 iterations: int = 0, method: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.history = list(history or [])
        self.iterations = iterations
        self.method = method

    def copy(self) -> Permutation:  # keep the type and metadata
        return Permutation({k: v.copy() for k, v in self.items()}, objective=self.objective,
                           history=self.history, iterations=self.iterations, method=self.method)

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self.items()}
        return f"Permutation(method={self.method!r}, sizes={sizes}, objective={self.objective})"


def check_permutation(perm: Mapping[str, Any], sizes: Mapping[str, int] | None = None,
                      spec: PermutationSpec | None = None) -> None:
    """Raise :class:`PermutationSpecError` unless every entry is a valid transformation.

    An entry is a permutation of ``range(n)``, or for a name of
    :class:`~combinability.kinds.Orthogonal` kind in ``spec`` an orthogonal matrix; a
    :class:`~combinability.kinds.Blocks` name must move whole blocks as its group does.
    When ``sizes`` is given, ``perm`` must hold exactly those names with those lengths.
    """
    if sizes is not None:
        missing = sorted(set(sizes) - set(perm))
        extra = sorted(set(perm) - set(sizes))
        if missing or extra:
            raise PermutationSpecError(
                f"permutation names do not match the spec: missing {missing}, unexpected {extra}"
            )
    for p, value in perm.items():
        kind = spec.kind(p) if spec is not None else (Orthogonal() if np.ndim(value) == 2 else Neuron())
        check_value(p, value, None if sizes is None else sizes[p], kind)
    if spec is not None:
        from combinability.kinds import block_structure

        for p, kind in spec.kinds.items():
            if isinstance(kind, Blocks | Invertible) and p in perm:
                sigma = (block_structure(p, np.asarray(perm[p]), kind) if isinstance(kind, Blocks)
                         else block_parts(p, perm[p], kind.blocks, kind.size)[0])
                if kind.group in perm and not np.array_equal(sigma, np.asarray(perm[kind.group])):
                    raise PermutationSpecError(f"{p!r} moves its blocks differently from its group {kind.group!r}")
            if isinstance(kind, Dual) and p in perm and kind.of in perm:
                expected = dual_of(perm[kind.of])
                if np.abs(np.asarray(perm[p]) - expected).max() > 1e-6 * max(1.0, float(np.abs(expected).max())):
                    raise PermutationSpecError(f"{p!r} must hold the inverse transpose of {kind.of!r} (the other side "
                                               "of its bilinear form); it does not")


def _segment_sizes(entry: tuple[str, ...], perm: Mapping[str, Any], length: int, name: str) -> list[int]:
    known = {q: len(np.asarray(perm[q])) for q in entry if q in perm}
    unknown = [q for q in entry if q not in known]
    if unknown:
        share = (length - sum(known[q] for q in entry if q in known)) // len(unknown)
        known.update({q: share for q in unknown})
    sizes = [known[q] for q in entry]
    if sum(sizes) != length:
        raise PermutationSpecError(f"{name!r}: segments {entry} of sizes {sizes} do not add up to the axis' {length}")
    return sizes


def apply_permutation(
    spec: PermutationSpec,
    perm: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    except_perm: str | None = None,
    check: bool = True,
    only: Collection[str] | None = None,
) -> dict[str, np.ndarray]:
    """Transform ``params`` by ``perm`` (permutations gather, orthogonal maps multiply along their axes).

    Parameters
    ----------
    spec : PermutationSpec
    perm : mapping of str to array
        One value per name of ``spec``: an index array, or a matrix for an orthogonal name.
    params : mapping of str to numpy array
        Parameters not listed in the spec are returned unchanged, except the other names of a
        listed one: an array under two names (a head tied to the embedding: torch's
        ``state_dict()`` holds ``lm_head.weight`` and ``embed_tokens.weight``, one tensor)
        is transformed under both.
    except_perm : str, optional
        Leave the axes of this name untransformed (used inside weight matching).
    check : bool, default True
        Refuse an orthogonal map on unfolded norms (:meth:`PermutationSpec.check_requirements`,
        which needs every norm parameter in ``params``); weight matching checks once, then
        transforms a few parameters at a time without it.
    only : collection of str, optional
        Transform the axes of these names alone (``perm`` still gives the sizes of packed segments).

    Returns
    -------
    dict of str to numpy.ndarray
        New arrays (inputs are not modified), in the order of ``params``.
    """
    out = _apply(spec, perm, params, except_perm=except_perm, check=check, only=only)
    listed = set(spec.parameters)
    if len(listed) < len(params):  # another name of a listed array (a tied weight) is transformed with it
        by_memory = {_memory(params[name]): name for name in params if name in listed}
        by_memory.pop(None, None)  # arrays without host memory of their own are never taken for one another
        for name in params:
            where = _memory(params[name]) if name not in listed else None
            origin = by_memory.get(where) if where is not None else None
            if origin is not None:
                out[name] = out[origin]
    return out


def _memory(value: Any) -> tuple[Any, ...] | None:
    """Where an array's entries lie (address, shape, strides, dtype), or None if it has no memory of its own
    on the host; equal for two names of one tensor."""
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - a device array, a tensor that needs grad: not compared
        return None
    if arr.size == 0:
        return None
    return arr.__array_interface__["data"][0], arr.shape, arr.strides, arr.dtype.str


def _apply(spec: PermutationSpec, perm: Mapping[str, Any], params: Mapping[str, Any], *,
           except_perm: str | None, check: bool, only: Collection[str] | None) -> dict[str, np.ndarray]:
    """:func:`apply_permutation` of the arrays as the spec names them (tied names not yet followed)."""
    if spec.stacks:  # experts held as separate modules: transformed as their stacked parameters
        inner, joined = join_stacks(spec, params)
        out = split_members(spec.stacks, apply_permutation(inner, perm, joined, except_perm=except_perm,
                                                           check=check, only=only))
        return {k: out[k] for k in params}

    def skip(p: str) -> bool:
        return p == except_perm or (only is not None and p not in only)

    if check and any(np.ndim(perm[p]) == 2 for p in perm if not skip(p)):
        spec.check_requirements(params)
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        arr = np.asarray(value)
        axes = spec.axes_to_perm.get(name)
        if axes is not None:
            if len(axes) != arr.ndim:
                raise PermutationSpecError(
                    f"{name!r} has {arr.ndim} axes (shape {arr.shape}) but the spec gives {len(axes)}: {axes}"
                )
            for axis, p in enumerate(axes):
                if isinstance(p, tuple):
                    sizes = _segment_sizes(p, perm, arr.shape[axis], name)
                    pieces = np.split(arr, np.cumsum(sizes)[:-1], axis=axis)
                    arr = np.concatenate([piece if skip(q) else _act(q, perm, piece, axis, name)
                                          for q, piece in zip(p, pieces, strict=True)], axis=axis)
                elif isinstance(p, Repeat):
                    if not skip(p.name):
                        split = split_axis(arr, axis, p, name)
                        arr = _act(p.name, perm, split, axis + p.unit_axis, name).reshape(arr.shape)
                elif p is not None and not skip(p):
                    arr = _act(p, perm, arr, axis, name)
        out[name] = arr
    return out


def _repeat_json(p: Repeat) -> dict[str, Any]:
    return {"repeat": p.name, "times": p.times, **({"interleaved": True} if p.interleaved else {})}


def split_axis(arr: Any, axis: int, repeat: Repeat, name: str) -> Any:
    """``arr`` with the repeated ``axis`` split in two, units and repeats, in the order they are laid
    out (``(units, times)``, or ``(times, units)`` when interleaved; the units at
    ``axis + repeat.unit_axis``); a view, the entries' order kept."""
    length, times = arr.shape[axis], repeat.times
    if length % times:
        raise PermutationSpecError(f"{name!r} axis {axis} has size {length}, not a multiple of its repeat {times}")
    pair = (times, length // times) if repeat.interleaved else (length // times, times)
    return arr.reshape(arr.shape[:axis] + pair + arr.shape[axis + 1:])


def join_stacks(spec: PermutationSpec, *params: Mapping[str, Any]) -> tuple[Any, ...]:
    """``spec`` without its :attr:`~PermutationSpec.stacks`, and each mapping of ``params`` with their
    members joined: a spec whose parameters are all the arrays it binds.

    Algorithms that read parameters by the spec's names (weight matching, the objective)
    run on the result; the permutations they find are those of ``spec``.
    """
    if not spec.stacks:
        return (spec, *params)
    return (PermutationSpec(spec.axes_to_perm, spec.kinds), *(spec.joined(ps) for ps in params))


def split_repeats(spec: PermutationSpec, *params: Mapping[str, Any]) -> tuple[PermutationSpec, ...]:
    """``spec`` and ``params`` with every :class:`Repeat` axis split in two: the units, bound to
    the permutation, and the repeats, bound to nothing — a spec of whole axes on reshaped views.

    Algorithms written for whole axes (weight matching, Sinkhorn) run on the result; the
    permutations they find are those of ``spec``.

    Returns
    -------
    tuple
        ``(spec, params, ...)``: the new spec, then each mapping of ``params`` with the
        parameters of repeated axes reshaped (views; other parameters as given).
    """
    if not spec.repeats:
        return (spec, *params)
    axes: dict[str, tuple[Entry, ...]] = {}
    splits: dict[str, list[tuple[int, Repeat]]] = {}  # parameter -> (axis, repeat), last axis first
    for name, entries in spec.axes_to_perm.items():
        new: list[Entry] = []
        for axis, p in enumerate(entries):
            if isinstance(p, Repeat):
                new += [None, p.name] if p.interleaved else [p.name, None]
                splits.setdefault(name, []).insert(0, (axis, p))
            else:
                new.append(p)
        axes[name] = tuple(new)

    def reshaped(ps: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(ps)
        for name, cuts in splits.items():
            if name in out:
                arr = np.asarray(out[name])
                for axis, repeat in cuts:
                    arr = split_axis(arr, axis, repeat, name)
                out[name] = arr
        return out

    return (PermutationSpec(axes, spec.kinds, spec.stacks), *(reshaped(ps) for ps in params))


def _act(p: str, perm: Mapping[str, Any], arr: np.ndarray, axis: int, name: str) -> np.ndarray:
    if p not in perm:
        raise PermutationSpecError(f"no index array for permutation {p!r} (needed by {name!r})")
    value = perm[p]
    n = np.shape(value)[0]
    if n != arr.shape[axis]:
        raise PermutationSpecError(
            f"permutation {p!r} has length {n} but {name!r} axis {axis} has size {arr.shape[axis]}"
        )
    return act(value, arr, axis)


def identity_permutation(sizes: Mapping[str, int], spec: PermutationSpec | None = None) -> Permutation:
    """The identity for sizes ``{name: n}`` (identity matrices for a spec's orthogonal and invertible names)."""
    def one(p: str, n: int) -> np.ndarray:
        if spec is not None and isinstance(spec.kind(p), Orthogonal | Invertible | Dual):
            return np.eye(n)
        return np.arange(n, dtype=np.int64)

    return Permutation({p: one(p, n) for p, n in sizes.items()}, method="identity")


def invert_permutation(perm: Mapping[str, Any]) -> Permutation:
    """The inverse: ``apply(inv, apply(perm, x)) == x``."""
    return Permutation({p: invert(idx) for p, idx in perm.items()}, method="inverse")


def compose_permutations(first: Mapping[str, Any], second: Mapping[str, Any]) -> Permutation:
    """The transformation that applies ``first`` then ``second``.

    ``apply(compose(p, q), x) == apply(q, apply(p, x))``; in index form
    ``compose(p, q)[P] == p[P][q[P]]``, for orthogonal matrices ``Q_q Q_p``.
    """
    if set(first) != set(second):
        raise PermutationSpecError(
            f"cannot compose permutations of different names: {sorted(first)} vs {sorted(second)}"
        )
    return Permutation({p: compose(first[p], second[p]) for p in first}, method="composed")


def _solve_segment_sizes(packed: list[tuple[tuple[str, ...], int]], sizes: dict[str, int]) -> None:
    """Fill ``sizes`` with the sizes of segments that no axis binds alone, from the packed axes
    ``(segments, length)``: each says the sizes of its segments add up to its length.

    An axis with one unknown segment gives it at once (repeatedly, as each size found may leave another
    axis one unknown); the rest are solved together where the axes determine them (GhostNet's
    ``cat([x1, dw(x1)])[:, :7]`` packs pieces ``(a, b)`` of 4 channels in one axis and ``(a, b, a)`` of 7 in
    another: a = 3, b = 1), and segments the axes leave undetermined share what is left equally.
    """
    def unknowns(p: tuple[str, ...]) -> list[str]:
        return [q for q in dict.fromkeys(p) if q not in sizes]

    def left(p: tuple[str, ...], length: int) -> int:
        return length - sum(sizes[q] for q in p if q in sizes)

    changed = True
    while changed:  # one unknown segment on an axis: its size is what the others leave
        changed = False
        for p, length in packed:
            todo = unknowns(p)
            if len(todo) == 1:
                sizes[todo[0]] = left(p, length) // p.count(todo[0])
                changed = True
    rest = list(dict.fromkeys(q for p, _ in packed for q in unknowns(p)))
    if rest:
        rows = [(p, length) for p, length in packed if unknowns(p)]
        a = np.array([[p.count(q) for q in rest] for p, _ in rows], dtype=np.float64)
        b = np.array([left(p, length) for p, length in rows], dtype=np.float64)
        if np.linalg.matrix_rank(a) == len(rest):
            solved = np.linalg.lstsq(a, b, rcond=None)[0]
            whole = np.rint(solved)
            if np.allclose(solved, whole, atol=1e-6) and (whole > 0).all() and np.allclose(a @ whole, b):
                sizes.update({q: int(v) for q, v in zip(rest, whole, strict=True)})
                return
    for p, length in packed:  # left undetermined: the unknown segments of an axis share what is left equally
        todo = unknowns(p)
        if todo:
            count = sum(1 for q in p if q not in sizes)
            share = left(p, length) // count
            for q in todo:
                sizes[q] = share


def random_permutation(
    spec: PermutationSpec,
    params: Mapping[str, Any],
    seed: int | np.random.Generator | None = 0,
    *,
    derange: bool = False,
) -> Permutation:
    """A uniformly random transformation of every name in ``spec`` (seeded numpy Generator).

    Neuron permutations are uniform; a :class:`~combinability.kinds.Blocks` name moves
    its blocks as its (uniform) group permutation does and permutes each block's units
    uniformly; an :class:`~combinability.kinds.Orthogonal` name is Haar-distributed; an
    :class:`~combinability.kinds.Invertible` name moves its blocks as its group does, with a
    random invertible map inside each (:func:`~combinability.kinds.random_invertible`), and its
    :class:`~combinability.kinds.Dual` holds the inverse transpose.
    With ``derange=True`` every permutation (of two or more units, blocks or units within a
    block) is drawn uniformly among those that move every unit: a check that the
    transformation keeps a function then puts each unit to the test (a uniform
    permutation of two units is the identity half of the time).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    draw = _derangement if derange else _uniform_permutation
    sizes = spec.perm_sizes(params)
    out: dict[str, np.ndarray] = {}
    for p, n in sizes.items():
        kind = spec.kind(p)
        if isinstance(kind, Orthogonal):
            out[p] = random_orthogonal(n, rng, fix_ones=kind.fix_ones)
        elif not isinstance(kind, Blocks | Invertible | Dual):
            out[p] = draw(n, rng)
    for p in sizes:
        kind = spec.kind(p)
        if isinstance(kind, Blocks):
            inner = np.stack([draw(kind.size, rng) for _ in range(kind.blocks)])
            out[p] = expand_blocks(out[kind.group], inner, kind.size)
        elif isinstance(kind, Invertible):
            inner = np.stack([random_invertible(kind.size, rng) for _ in range(kind.blocks)])
            out[p] = block_matrix(out[kind.group], inner)
    for p in sizes:
        kind = spec.kind(p)
        if isinstance(kind, Dual):
            out[p] = dual_of(out[kind.of])
    return Permutation({p: out[p] for p in sizes}, method="random")


def _uniform_permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(n).astype(np.int64)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`random_derangement` of ``n >= 2`` units; the identity of one unit (or none)."""
    return random_derangement(n, rng) if n >= 2 else np.arange(n, dtype=np.int64)


def random_derangement(k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``range(k)`` with no fixed point (``k >= 2``).

    Rejection sampling: about ``e`` tries on average.
    """
    if k < 2:
        raise ConfigurationError(f"a derangement needs at least 2 elements, got k={k}")
    while True:
        sigma = rng.permutation(k)
        if not np.any(sigma == np.arange(k)):
            return sigma.astype(np.int64)


def iter_axes(spec: PermutationSpec) -> Iterator[tuple[str, int, str]]:
    """Yield ``(parameter, axis, permutation)`` for every whole axis bound to a name."""
    for p, entries in spec.perm_to_axes.items():
        for name, axis in entries:
            yield name, axis, p
