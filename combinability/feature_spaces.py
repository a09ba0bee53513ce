"""Feature spaces of a traced network, and the symmetry spec they add up to.

The transformer tracers (:mod:`combinability_torch.trace_stream`,
:mod:`combinability_jax.trace_stream`) give every feature axis they meet a *space*. A
layer opens one; a residual addition merges two (:meth:`FeatureSpaces.union`); the
model's input and output, and whatever merges with them, are *fixed* (no transformation
may act there); an element-wise nonlinearity marks its space *nonlinear* (permutations
only: no rotation passes a GELU). What the tracers read differs by framework; what
follows from it does not, and lives here:

* :class:`FeatureSpaces`, the union-find over spaces with its fixed and nonlinear marks;
* :func:`spec_from_spaces`, which turns the traced facts — parameter axes bound to spaces,
  the norms on each space and the layers reading them (:class:`Norm`), attention heads
  (:class:`Heads`) and experts (:class:`Experts`) — into a
  :class:`~combinability.permutation.PermutationSpec` and the
  :class:`~combinability.folding.NormFold` s its orthogonal maps need.

A space that is neither fixed, nonlinear, nor part of heads or experts, and whose norms
all fold into the layers reading them — a residual stream — becomes an
:class:`~combinability.kinds.Orthogonal` map (``fix_ones`` when a LayerNorm centres it;
the norms' scales and shifts are then its ``requires`` and leave the spec's axes). Every
other space is a permutation named ``P_<opener>`` after the first layer that opened it.

Examples
--------
>>> sp = FeatureSpaces()
>>> stream, hidden = sp.new("embed"), sp.new("fc1")
>>> _ = sp.union(stream, sp.new("fc2"))  # x + fc2(...): one space
>>> sp.mark([hidden])                   # gelu(fc1(x))
>>> spec, folds = spec_from_spaces(sp, {
...     "embed.weight": (stream, FIXED), "fc1.weight": (hidden, stream),
...     "fc2.weight": (stream, hidden), "head.weight": (FIXED, stream)})
>>> spec.axes_to_perm["fc2.weight"], spec.kind("P_embed"), spec.kind("P_fc1")
(('P_embed', 'P_fc1'), Orthogonal(fix_ones=False, requires=()), Neuron())
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from combinability.errors import TracingError
from combinability.folding import NormFold, Reader
from combinability.kinds import Blocks, Kind, Orthogonal
from combinability.module_stacks import Part
from combinability.permutation import Entry, PermutationSpec, Repeat

__all__ = ["FIXED", "ANY", "FeatureSpaces", "Norm", "Heads", "Experts", "Gates", "Interleaved", "ReshapeGroups",
           "spec_from_spaces",
           "opener_points"]

FIXED = 0
"""The fixed space: the model's input and output axes (batch, tokens, pixels, classes)."""

Label = int | None  # a space, or None: an axis that is not a feature (a broadcast axis, a shape)

ANY: Label = None
"""A broadcast axis (size 1 against a larger one): merges into anything."""


class FeatureSpaces:
    """Union-find over feature spaces, with *fixed* and *nonlinear* marks on each class.

    Space :data:`FIXED` (0) exists from the start. A union with it marks the other class
    fixed and returns :data:`FIXED`; a union of two other classes keeps the smaller id (the
    space opened first) as the root, and the marks of both.

    Attributes
    ----------
    opener : list of str
        The name of what opened each space (``P_<opener>`` names its permutation).
    size : list of int
        Each space's width as given to :meth:`new` (0 when unknown).
    """

    def __init__(self) -> None:
        self._parent: list[int] = [FIXED]
        self.opener: list[str] = ["<fixed>"]
        self.size: list[int] = [0]
        self._names: dict[int, str] = {}
        self._fixed: set[int] = {FIXED}
        self._nonlinear: set[int] = set()
        self._rigid: set[int] = set()

    def __len__(self) -> int:
        """The number of spaces opened, :data:`FIXED` included."""
        return len(self._parent)

    def new(self, opener: str, size: int = 0, *, name: str | None = None) -> int:
        """Open a space; ``name`` replaces the default permutation name ``P_<opener>``."""
        self._parent.append(len(self._parent))
        self.opener.append(str(opener))
        self.size.append(int(size))
        if name is not None:
            self._names[len(self._parent) - 1] = name
        return len(self._parent) - 1

    def find(self, s: int) -> int:
        """The root of space ``s``'s class."""
        if not isinstance(s, int) or not 0 <= s < len(self._parent):
            raise ValueError(f"{s!r} is not a space: spaces are the ints 0..{len(self._parent) - 1} that new() "
                             "returned")
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def union(self, a: Label, b: Label) -> Label:
        """Merge two spaces and return the merged class's label (``None`` merges into anything)."""
        if a is None or b is None:
            return b if a is None else a
        ra, rb = self.find(a), self.find(b)
        if FIXED in (ra, rb):
            self._fixed.add(rb if ra == FIXED else ra)
            return FIXED
        lo, hi = min(ra, rb), max(ra, rb)
        self._parent[hi] = lo
        for marks in (self._fixed, self._nonlinear, self._rigid):
            if hi in marks:
                marks.add(lo)
        return lo

    def fix(self, labels: Iterable[Label]) -> None:
        """Mark the classes of ``labels`` fixed (``None`` entries are skipped)."""
        for s in labels:
            self.union(s, FIXED)

    def mark(self, labels: Iterable[Label]) -> None:
        """Mark the classes of ``labels`` nonlinear: permutations only (``None`` entries are skipped)."""
        self._nonlinear.update(self.find(s) for s in labels if s is not None)

    def rigid(self, labels: Iterable[Label]) -> None:
        """Mark the classes of ``labels`` *rigid*: heads whose units keep their order inside each
        head (rotary position embeddings rotate fixed pairs of them; ``None`` entries are skipped).

        A rigid space of :class:`Heads` moves with its heads only: its axes become
        :class:`~combinability.permutation.Repeat` entries of the head order.
        """
        self._rigid.update(self.find(s) for s in labels if s is not None)

    def is_rigid(self, s: Label) -> bool:
        """Whether ``s`` is a space whose class is marked rigid."""
        return s is not None and self.find(s) in self._rigid

    def is_fixed(self, s: Label) -> bool:
        """Whether ``s`` is a space whose class is fixed."""
        return s is not None and self.find(s) in self._fixed

    def is_nonlinear(self, s: Label) -> bool:
        """Whether ``s`` is a space whose class is marked nonlinear."""
        return s is not None and self.find(s) in self._nonlinear

    def tie(self, param: str, first: Sequence[Any], second: Sequence[Any], hint: str = "") -> list[Any]:
        """One binding of a parameter used by two layers (tied weights) from the bindings of both uses.

        Each axis's spaces are merged; an axis one use leaves untransformed (``None``) fixes
        the other use's space; packed axes must pack the same number of segments.

        Raises
        ------
        TracingError
            If the two uses see the parameter with different numbers of axes, or one packs
            an axis into segments the other does not.

        Examples
        --------
        >>> sp = FeatureSpaces()
        >>> vocab, stream, head_in = sp.new("wte"), sp.new("wte_out"), sp.new("ln_f")
        >>> sp.tie("wte.weight", [None, stream], [vocab, head_in])  # embedding; lm_head (out, in)
        [0, 2]
        >>> sp.find(stream) == sp.find(head_in), sp.is_fixed(vocab)
        (True, True)
        """
        if len(first) != len(second):
            raise TracingError(f"{param!r} is used by two layers with {len(first)} and {len(second)} axes" + hint)
        out: list[Any] = []
        for a, b in zip(first, second, strict=True):
            if isinstance(a, tuple) or isinstance(b, tuple):
                if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
                    raise TracingError(f"{param!r} is used by two layers that split an axis differently" + hint)
                out.append(tuple(self.union(x, y) for x, y in zip(a, b, strict=True)))
            else:
                out.append(self.union(FIXED if a is None else a, FIXED if b is None else b))
        return out

    def name(self, s: int) -> str:
        """The permutation name of ``s``'s class: its root's ``name=``, else ``P_<opener of the root>``."""
        root = self.find(s)
        return self._names.get(root, f"P_{self.opener[root]}")


@dataclass(frozen=True)
class Norm:
    """A norm over the last axis of a space, and the layers reading its output.

    Parameters
    ----------
    space : int or None
        The space it normalises (``None``: none; the norm is then ignored).
    scale, shift : str or None
        Its scale γ and shift β (``None`` where it has none).
    centres : bool
        Whether it subtracts the mean (LayerNorm): the stream's maps must then fix the ones vector.
    readers : tuple of Reader, or None
        Every layer reading its output (through pooling and token indexing); ``None`` when
        one of them cannot take the norm folded in. A shift folds into readers' biases; where a reader
        has none, it stays in the norm, divided by the scale, and moves with the stream.
    writers : tuple of Reader
        For a learned scale of layers' outputs (LayerScale, no norm): the layers it scales, which
        take it folded in (:class:`~combinability.folding.NormFold`).
    """

    space: int | None
    scale: str | None = None
    shift: str | None = None
    centres: bool = False
    readers: tuple[Reader, ...] | None = ()
    writers: tuple[Reader, ...] = ()


@dataclass(frozen=True)
class Heads:
    """A space whose units come in ``count`` heads of ``size``, ordered by the space ``group``.

    ``within`` is the within-head space when the tracer saw the split ``(count·size) ->
    (count, size)``: spaces whose within-head spaces meet (query and key) become one class.
    The space is fixed when its head order is; when only its within-head part is fixed, or
    the tracer marked it :meth:`~FeatureSpaces.rigid` (rotary position embeddings), it is
    *rigid*: it moves with its heads and keeps their units in order, and its axes become
    ``Repeat(<head order>, size)``. A within-head space may not be bound to a parameter axis
    of its own. The head order may itself be the space of other ``Heads`` (grouped-query
    attention: the query heads move in groups, one per key/value head).
    """

    space: int
    group: int
    count: int
    size: int
    within: int | None = None


@dataclass(frozen=True)
class Experts:
    """A space of ``count`` experts' units, ``size`` each, moving with the gate's space ``gate``.

    The space is fixed when the gate is (a gate value repeated over an expert's units).
    """

    space: int
    gate: int
    count: int
    size: int


@dataclass(frozen=True)
class Gates:
    """An axis binding: ``count`` gates' rows of one space's units, gate by gate (a recurrent layer's).

    An LSTM's ``weight_ih`` is ``(4 * hidden, in)``: its input, forget, cell and output gates'
    rows for every hidden unit, gate after gate; a permutation of the hidden units moves each
    gate's rows alike, so the axis is :class:`~combinability.permutation.Repeat` of the
    space's name, ``count`` times, interleaved (``gate * hidden + unit``). One gate is the space.
    """

    space: int
    count: int


@dataclass(frozen=True)
class Interleaved:
    """An axis binding: entries alternating between ``spaces`` (GPT-OSS's experts' gate and up units,
    ``g0, u0, g1, u1, ...``, read back as ``[..., ::2]`` and ``[..., 1::2]``). The parameter is cut into
    strided parts (:class:`~combinability.module_stacks.Part` with a step), one per space."""

    spaces: tuple[int, ...]


class ReshapeGroups:
    """Heads and experts found where a tracer sees a reshape of feature axes.

    A reshape is read group by group: runs of source and destination axes with the same
    product (axes of size 1 skipped). A group of one axis into one keeps its label; axes
    that are fixed or broadcast stay so. One feature axis into two, ``(h·d) -> (h, d)``,
    splits its space into a head space and a within-head space (:class:`Heads`; the same
    space split twice must split alike); two into one merges them back (only a split made
    before); a space repeated along a new broadcast axis, ``(e, 1) -> (e·u)``, spreads a
    gate over ``u`` units per expert (:class:`Experts`). Anything else is refused. The
    reading is framework-free; a tracer passes shapes and labels.

    Parameters
    ----------
    spaces : FeatureSpaces
        The tracer's spaces (new head and within-head spaces are opened in it).
    hint : str
        Appended to every :class:`~combinability.errors.TracingError` (what to do instead).
    """

    def __init__(self, spaces: FeatureSpaces, hint: str = "") -> None:
        self.sp, self.hint = spaces, hint
        self.splits: dict[int, tuple[int, int, int, int]] = {}  # space -> (head space, within space, h, dh)
        self.expansions: dict[int, tuple[int, int, int]] = {}  # space -> (gate space, experts, units)
        self.merged: dict[int, tuple[int, int, int]] = {}  # space -> (head space, h, dh): heads and others' units

    def reshape(self, src: Sequence[int], labels: Sequence[Label], dst: Sequence[int], where: str,
                stem: str) -> list[Label]:
        """The labels of a reshape's output axes (``dst``), from its input's ``src`` shape and ``labels``.

        ``where`` names the operation in errors; ``stem`` names new head spaces (``stem/heads``).
        """
        sp = self.sp
        out: list[Label] = [ANY] * len(dst)
        a_ax = [a for a, n in enumerate(src) if n != 1]
        b_ax = [b for b, n in enumerate(dst) if n != 1]
        i = j = 0
        while i < len(a_ax) or j < len(b_ax):
            gi, gj = [a_ax[i]], [b_ax[j]]
            i, j = i + 1, j + 1
            pa, pb = src[gi[0]], dst[gj[0]]
            while pa != pb:
                if pa < pb:
                    gi.append(a_ax[i])
                    pa, i = pa * src[a_ax[i]], i + 1
                else:
                    gj.append(b_ax[j])
                    pb, j = pb * dst[b_ax[j]], j + 1
            ls = [labels[a] for a in gi]
            if len(gi) == len(gj) == 1:
                out[gj[0]] = ls[0]
            elif all(s is ANY or sp.is_fixed(s) for s in ls):
                fill = FIXED if any(s is not ANY for s in ls) else ANY
                for b in gj:
                    out[b] = fill
            elif len(gi) == 1 and len(gj) == 2:
                out[gj[0]], out[gj[1]] = self._split(ls[0], dst[gj[0]], dst[gj[1]], where, stem)
            elif len(gi) == 2 and len(gj) == 1 and ls[1] is ANY:
                s = sp.new(f"{sp.opener[sp.find(ls[0])]}.repeated", dst[gj[0]])
                self.expansions[s] = (ls[0], src[gi[0]], src[gi[1]])
                out[gj[0]] = s
            elif len(gi) == 2 and len(gj) == 1:
                out[gj[0]] = self._merge(ls[0], ls[1], where, src[gi[0]], src[gi[1]], stem)
            else:
                raise TracingError(f"{where}: a reshape of feature axes {tuple(src[a] for a in gi)} -> "
                                   f"{tuple(dst[b] for b in gj)}{self.hint}")
        return out

    def _split(self, s: int, h: int, dh: int, where: str, stem: str) -> tuple[int, int]:
        root = self.sp.find(s)
        for t, (hs, cs, th, tdh) in self.splits.items():
            if self.sp.find(t) == root:
                if (th, tdh) != (h, dh):
                    raise TracingError(f"{where}: a space split as {th}x{tdh} and as {h}x{dh} (heads of different "
                                       f"counts or sizes){self.hint}")
                return hs, cs
        taken = sum(self.sp.opener[t].startswith(f"{stem}/heads") for t, *_ in self.splits.values())
        suffix = f"_{taken + 1}" if taken else ""  # the module's other splits (keys of fewer heads): other names
        hs, cs = self.sp.new(f"{stem}/heads{suffix}", h), self.sp.new(f"{stem}/head_dim{suffix}", dh)
        self.splits[s] = (hs, cs, h, dh)
        return hs, cs

    def _merge(self, hs: int, cs: int, where: str, h: int, dh: int, stem: str) -> int:
        sp, f = self.sp, self.sp.find
        for t, (th, tc, _, _) in self.splits.items():
            if f(th) == f(hs) and f(tc) == f(cs):
                return t
        if not any(f(th) == f(hs) for th, _, _, _ in self.splits.values()) and \
                not any(f(g) == f(hs) for g in self.expansions):
            raise TracingError(f"{where}: merges a head axis and a within-head axis that no split made" + self.hint)
        # one split's heads (or heads repeated from them) with another's units: grouped-query attention's output,
        # the query heads' mix of the shared values. Its units keep their order; so do the values'.
        sp.fix([cs])
        s = sp.new(f"{stem}/merged", h * dh)
        sp.rigid([s])
        self.merged[s] = (hs, h, dh)
        return s

    def heads(self) -> list[Heads]:
        """A :class:`Heads` for every space that was split, and for every merge of one split's heads
        with another's units (rigid)."""
        return [Heads(s, hs, h, dh, cs) for s, (hs, cs, h, dh) in self.splits.items()] + [
            Heads(s, hs, h, dh) for s, (hs, h, dh) in self.merged.items()]

    def experts(self) -> list[Experts]:
        """An :class:`Experts` for every gate spread over its experts' units."""
        return [Experts(s, g, e, u) for s, (g, e, u) in self.expansions.items()]


def _propagate(sp: FeatureSpaces, heads: Sequence[Heads], experts: Sequence[Experts], hint: str) -> None:
    """Heads contracted together (query, key) are one class; a fixed head order or gate fixes the space,
    a fixed within-head part makes it rigid."""
    f = sp.find
    changed = True
    while changed:
        changed = False
        by_within: dict[int, Heads] = {}
        for h in heads:
            if sp.is_fixed(h.group) and not sp.is_fixed(h.space):
                sp.fix([h.space])
                changed = True
            if sp.is_fixed(h.within) and not sp.is_rigid(h.space):
                sp.rigid([h.space])
                changed = True
            if h.within is None or sp.is_fixed(h.within):
                continue  # no within-head permutation to share
            t = by_within.setdefault(f(h.within), h)
            if f(t.space) != f(h.space):
                if f(t.group) != f(h.group):
                    raise TracingError(f"the within-head axes of {sp.opener[f(h.space)]!r} and "
                                       f"{sp.opener[f(t.space)]!r} meet but their heads do not" + hint)
                sp.union(h.space, t.space)
                changed = True
        by_space: dict[int, Experts] = {}
        for e in experts:
            if sp.is_fixed(e.gate) and not sp.is_fixed(e.space):
                sp.fix([e.space])
                changed = True
            t = by_space.setdefault(f(e.space), e)
            if f(t.gate) != f(e.gate) and (t.count, t.size) == (e.count, e.size):
                sp.union(t.gate, e.gate)  # units spread alike from two gates (keys and values repeated): one order
                changed = True


def _rigid_heads(sp: FeatureSpaces, bound: set[int], heads: Sequence[Heads]) -> dict[int, Repeat]:
    """Rigid head spaces (bound, not fixed) -> their axes' ``Repeat`` of the head order; the head
    orders they repeat join ``bound`` (the query heads of grouped-query attention are heads in turn)."""
    f = sp.find
    out: dict[int, Repeat] = {}
    changed = True
    while changed:
        changed = False
        for h in heads:
            if f(h.space) in bound and sp.is_rigid(h.space) and not sp.is_fixed(h.space) and f(h.space) not in out:
                out[f(h.space)] = Repeat(sp.name(h.group), h.size)
                bound.add(f(h.group))
                changed = True
    return out


def _block_kinds(sp: FeatureSpaces, bound: set[int], heads: Sequence[Heads], experts: Sequence[Experts],
                 hint: str, rigid: Collection[int] = ()) -> tuple[dict[str, Kind], set[int]]:
    """The Blocks kinds of heads and experts, and the classes they take (never orthogonal)."""
    f = sp.find
    kinds: dict[str, Kind] = {}
    special: set[int] = set()
    for h in heads:
        if sp.is_fixed(h.space) or f(h.space) not in bound:
            continue
        if h.within is not None and f(h.within) in bound:
            raise TracingError(f"the within-head axis of {sp.opener[f(h.space)]!r} is bound to a parameter axis of "
                               "its own" + hint)
        if f(h.space) not in rigid:
            kinds[sp.name(h.space)] = Blocks(sp.name(h.group), h.count, h.size)
        special |= {f(h.space), f(h.group)} | ({f(h.within)} if h.within is not None else set())
    for e in experts:
        if sp.is_fixed(e.space) or f(e.space) not in bound:
            continue
        name, kind = sp.name(e.space), Blocks(sp.name(e.gate), e.count, e.size)
        if kinds.get(name, kind) != kind:
            raise TracingError(f"the units of {name!r} are both heads and experts" + hint)
        kinds[name] = kind
        special |= {f(e.space), f(e.gate)}
    return kinds, special


def _labels(param: str, entries: Sequence[int | tuple[int, ...] | Gates | None], n: int) -> list[int]:
    out: list[int] = []
    for e in entries:
        e = e.space if isinstance(e, Gates) else e.spaces if isinstance(e, Interleaved) else e
        for s in e if isinstance(e, tuple) else (e,):
            if s is not None and not (isinstance(s, int) and 0 <= s < n):
                raise ValueError(f"{param!r}: an axis is bound to a space (an int from FeatureSpaces.new), None, or a "
                                 f"tuple of spaces (segments of a packed axis); got {e!r}")
            if s is not None:
                out.append(s)
    return out


def spec_from_spaces(spaces: FeatureSpaces, binds: Mapping[str, Sequence[int | tuple[int, ...] | None]],
                     norms: Sequence[Norm] = (), heads: Sequence[Heads] = (), experts: Sequence[Experts] = (),
                     hint: str = "", tied: Collection[str] = (), cut: Collection[str] = ()
                     ) -> tuple[PermutationSpec, list[NormFold]]:
    """The symmetry spec of traced feature spaces, and the norm folds its orthogonal maps need.

    Parameters
    ----------
    spaces : FeatureSpaces
        The traced spaces (heads sharing a within-head space are merged, and spaces whose
        heads or gate are fixed are fixed, in place).
    binds : mapping of str to sequence
        Every parameter (in spec order), one entry per axis: a space, ``None`` (no
        transformation), or a tuple of spaces for an axis packing segments that move
        separately (stacked query/key/value rows).
    norms : sequence of Norm
        The norms, in the order their scales and shifts are listed in ``requires``.
    heads, experts : sequence of Heads, sequence of Experts
        Spaces whose units move in blocks.
    hint : str
        Appended to the message of a :class:`~combinability.errors.TracingError` (what to do instead).
    tied : collection of str
        Parameters used by more than one layer (tied weights, bound once by
        :meth:`FeatureSpaces.tie`): no norm folds into them, as a fold would change
        every use.
    cut : collection of str
        Parameters whose packed axes are cut into parts (:class:`~combinability.module_stacks.Part`)
        even when their segments are plain names: experts held as one parameter
        ``(experts, 2h, d)``, whose gate and up halves can then each be merged per expert
        (:func:`combinability.module_stacks.merge_blocks`).

    Returns
    -------
    (PermutationSpec, list of NormFold)
        Fixed spaces give ``None`` axes; heads and experts :class:`~combinability.kinds.Blocks`,
        rigid heads :class:`~combinability.permutation.Repeat` entries of their head order;
        purely linear streams whose norms all fold :class:`~combinability.kinds.Orthogonal`
        (their norms' parameters dropped from the axes, listed in ``requires``, and folded
        by the returned folds); every other space a plain permutation.

    Raises
    ------
    TracingError
        Heads whose within-head axes meet while the heads do not; a within-head axis bound
        on its own; units that are both heads and experts.
    ValueError
        An axis entry that is not a space, ``None`` or a tuple of spaces.
    """
    sp, f = spaces, spaces.find
    bound = {f(s) for param, entries in binds.items() for s in _labels(param, entries, len(sp))}
    _propagate(sp, heads, experts, hint)
    bound = {f(s) for s in bound}
    rigid = _rigid_heads(sp, bound, heads)
    kinds, special = _block_kinds(sp, bound, heads, experts, hint, rigid)
    unfoldable: set[int] = set()
    centred: set[int] = set()
    folds: dict[int, list[NormFold]] = {}
    for norm in norms:
        if norm.space is None or sp.is_fixed(norm.space):
            continue
        root = f(norm.space)
        if norm.centres:
            centred.add(root)
        if norm.readers is None or any(r.weight in tied or r.bias in tied for r in norm.readers):
            # read by something it cannot fold into, or a tied weight
            unfoldable.add(root)
            continue
        keep = norm.shift is not None and any(r.bias is None for r in norm.readers)  # a bias-free reader
        folds.setdefault(root, []).append(NormFold(norm.scale, norm.shift, tuple(norm.readers), keep_shift=keep,
                                                   writers=tuple(norm.writers)))
    orthogonal = {r for r in bound if not sp.is_fixed(r) and not sp.is_nonlinear(r)} - unfoldable - special
    kept = {fold.shift for r in orthogonal for fold in folds.get(r, []) if fold.keep_shift}  # move with the stream
    norm_params = {p: f(n.space) for n in norms if n.space is not None for p in (n.scale, n.shift)
                   if p and p not in kept}
    all_folds: list[NormFold] = []
    for r in sorted(orthogonal):
        requires = [(p, 1.0 if p == n.scale else 0.0) for n in norms if n.space is not None and f(n.space) == r
                    for p in (n.scale, n.shift) if p and p not in kept]
        kinds[sp.name(r)] = Orthogonal(fix_ones=r in centred, requires=tuple(requires))
        all_folds += folds.get(r, [])

    def entry(param: str, e: int | tuple[int, ...] | Gates | Interleaved | None) -> Entry:
        if isinstance(e, Interleaved):
            if any(sp.is_fixed(s) for s in e.spaces) or len({sp.size[s] for s in e.spaces}) != 1 or \
                    sp.size[e.spaces[0]] < 1:
                raise TracingError(f"{param!r}: alternating entries of spaces of unknown or unequal sizes, or "
                                   f"some fixed while the others move" + hint)
            return _Cut(tuple(rigid.get(f(s), sp.name(s)) for s in e.spaces), tuple(sp.size[s] for s in e.spaces),
                        step=len(e.spaces))
        if isinstance(e, Gates):
            inner = entry(param, e.space)
            if inner is None or e.count == 1:
                return inner
            if not isinstance(inner, str):
                raise TracingError(f"{param!r}: the gates of a recurrent layer over a space that is itself repeated "
                                   f"or packed" + hint)
            return Repeat(inner, e.count, interleaved=True)
        if isinstance(e, tuple):
            if all(sp.is_fixed(s) for s in e):  # every segment in place (a fused qkv of heads that cannot move)
                return None
            if any(sp.is_fixed(s) for s in e):
                raise TracingError(f"{param!r}: a segment of a packed axis is fixed while the others move" + hint)
            if any(f(s) in rigid for s in e) or param in cut:  # rigid heads among the segments (or asked): parts
                if not all(sp.size[s] > 0 for s in e[:-1]):
                    raise TracingError(f"{param!r}: a packed axis with a segment of rigid heads (rotary position "
                                       f"embeddings on stacked query/key/value rows) whose sizes are unknown" + hint)
                return _Cut(tuple(rigid.get(f(s), sp.name(s)) for s in e), tuple(sp.size[s] for s in e))
            return tuple(sp.name(s) for s in e)
        if e is None or sp.is_fixed(e) or (param in norm_params and f(e) in orthogonal):
            return None
        return rigid.get(f(e), sp.name(e))

    axes = {param: tuple(entry(param, e) for e in entries) for param, entries in binds.items()}
    axes, parts = _cut_parts(axes, hint)
    return PermutationSpec(axes, kinds, parts), all_folds


@dataclass(frozen=True)
class _Cut:
    """A packed axis whose segments are not all plain names (rigid heads): cut into parts of these sizes."""

    entries: tuple[Entry, ...]
    sizes: tuple[int, ...]
    step: int = 1  # parts alternating entry by entry (:class:`Interleaved`), not side by side


def _cut_parts(axes: Mapping[str, tuple[Any, ...]], hint: str) -> tuple[dict[str, tuple[Entry, ...]], dict[str, Part]]:
    """``axes`` with each parameter that has a :class:`_Cut` axis bound as its parts
    (``"qkv.weight[0:96]"``, ...; :class:`~combinability.module_stacks.Part`), and those parts."""
    out: dict[str, tuple[Entry, ...]] = {}
    parts: dict[str, Part] = {}
    for param, entries in axes.items():
        cuts = [axis for axis, e in enumerate(entries) if isinstance(e, _Cut)]
        if not cuts:
            out[param] = entries
            continue
        if len(cuts) > 1:
            raise TracingError(f"{param!r}: two axes packed with segments of rigid heads" + hint)
        axis, cut = cuts[0], entries[cuts[0]]
        if cut.step > 1:
            for k, e in enumerate(cut.entries):
                name = f"{param}[{k}::{cut.step}]"
                out[name] = entries[:axis] + (e,) + entries[axis + 1:]
                parts[name] = Part(param, axis, k, None, cut.step)
            continue
        start = 0
        for k, (e, size) in enumerate(zip(cut.entries, cut.sizes, strict=True)):
            last = k == len(cut.entries) - 1
            name = f"{param}[{start}:{'' if last else start + size}]"
            out[name] = entries[:axis] + (e,) + entries[axis + 1:]
            parts[name] = Part(param, axis, start, None if last else start + size)
            start += size
    return out, parts


def opener_points(spec: PermutationSpec) -> dict[str, str]:
    """The feature point of each neuron permutation of a traced spec: the layer that opened its space.

    :func:`spec_from_spaces` names a plain permutation ``P_<opener>`` after the first layer that
    opened its space, whose output carries its units (before any activation, which keeps them);
    activation matching reads them there. Heads, experts and streams (other kinds) get none, nor
    do names without the ``P_`` form (units inside a layer: query and key parts, a recurrent
    layer's), nor a space a layer opens on another axis than its output's last (``P_attn/query:1``,
    the heads of a flax ``DenseGeneral`` kernel ``(d, heads, head_dim)``); a stream's spec made
    permutations only (:meth:`PermutationSpec.permutations_only`) gets its point.

    Examples
    --------
    >>> from combinability.kinds import Orthogonal
    >>> opener_points(PermutationSpec({"fc1.weight": ("P_fc1", "P_embed"), "fc2.weight": ("P_embed", "P_fc1")},
    ...                               kinds={"P_embed": Orthogonal()}))
    {'P_fc1': 'fc1'}
    """
    return {p: p[2:] for p in spec.perm_names
            if p.startswith("P_") and len(p) > 2 and ":" not in p and p not in spec.kinds}
