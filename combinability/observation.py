"""Where a model's units can be observed: the feature points whose outputs a transformation moves.

Activation matching reads each transformation's units in the model's activations. A plain
neuron permutation has its point (the layer that opened its space); an attention head's
query/key and value units and a residual stream do not: they are spread over several
outputs (the query and the key projections, every block writing the stream), some packed
together (one ``qkv`` layer's output holds three heads' worth of units side by side).

:func:`observed_units` finds them by what they are, whatever the framework or the way
the model is written: run the model before and after a random transformation ``T`` of
its spec, and a point observes name ``n`` (whole, or on a segment of its units) exactly
when its output after is its output before transformed by ``T[n]`` along its units. A
point's units are read second (the backend's channels-first convention) or, for outputs a
backend gives as they are (a transformer block's ``(n, tokens, features)``), last.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from combinability.kinds import act
from combinability.permutation import PermutationSpec, Repeat, _segment_sizes

__all__ = ["Piece", "Observed", "READINGS", "observed_units", "observe_model", "read_rows", "channels_first"]

#: How a point's output may hold its units, besides channels-first (``(n, units, *positions)``, as backends give
#: features): ``"last"``, on its last axis (a torch transformer block's ``(n, tokens, features)``, which a
#: backend gives as it is); ``"heads"``, on the last two axes of the map the channels-first output was moved from
#: (a flax ``DenseGeneral``'s ``(n, tokens, heads, head_dim)``, given ``(n, head_dim, tokens, heads)``).
READINGS = ("last", "heads")

class Piece(NamedTuple):
    """The units ``start:stop`` of a feature point's output, at which a name's units are observed.

    Where the name moves its units ``times`` output units at a time (an attention head's units move
    with it when the name permutes whole heads: a :class:`~combinability.permutation.Repeat` axis),
    unit ``i`` of the name is the output units ``i·times … i·times + times − 1`` of the piece (or,
    ``interleaved``, ``t·n + i`` for each ``t``).
    """

    point: str
    start: int
    stop: int | None
    times: int = 1
    interleaved: bool = False

    def cost(self, matrix: np.ndarray) -> np.ndarray:
        """The piece of ``matrix`` (a statistic of the point's units against each other, ``(units, units)``) as a
        ``(n, n)`` cost between the name's units: the sum over each unit's ``times`` output units in order."""
        c = np.asarray(matrix)[self.start:self.stop, self.start:self.stop]
        if self.times == 1:
            return c
        t, n = self.times, c.shape[0] // self.times
        if self.interleaved:
            return np.einsum("titj->ij", c.reshape(t, n, t, n))
        return np.einsum("itjt->ij", c.reshape(n, t, n, t))

#: Relative error under which an output counts as transformed (float32 forward passes).
_CLOSE = 2e-3
#: Relative change a transformation must make for a point to tell it apart from one it leaves as is.
_MOVED = 1e-2
#: Observation rows compared per output and reading: any two transformations differ on a few of them.
_ROWS = 64
#: Candidate outputs read in one forward pass (their outputs are held together on the device).
_POINTS_PER_PASS = 64


@dataclass(frozen=True)
class Observed:
    """The pieces of outputs at which each name's units are observed.

    Parameters
    ----------
    pieces : mapping of str to tuple of Piece
        For each observed name, every ``(point, start, stop)`` whose units it reorders.
    readings : mapping of str to str
        The points read otherwise than channels-first, and how (:data:`READINGS`).
    """

    pieces: Mapping[str, tuple[Piece, ...]] = field(default_factory=dict)
    readings: Mapping[str, str] = field(default_factory=dict)


def observed_units(spec: PermutationSpec, before: Mapping[str, Any],
                   rounds: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], names: Collection[str],
                   params: Mapping[str, Any]) -> Observed:
    """The points at which each of ``names`` is observed, from outputs before and after transformations.

    Parameters
    ----------
    spec : PermutationSpec
        The spec the transformations are transformations of.
    before : mapping of str to array
        The outputs of the candidate points on some inputs, for the model's parameters:
        channels-first as backends give features (``(n, units)``, ``(n, units, *positions)``), or
        with the units last for outputs a backend gives as they are; or each already as :func:`read_rows`
        keeps it (what :func:`observe_model` passes, so that no round holds whole outputs).
    rounds : sequence of (transform, after)
        Transformations of every name of ``spec`` (each name a derangement or the identity), and the
        same outputs for the parameters so transformed. A point observes a name when in every round
        its output moved as the name's transformation says; names that draw the same values (two
        heads' derangements of two blocks) are told apart by rounds that move one and not the other
        (:func:`observe_model` moves each family of names in a distinct set of rounds).
    names : collection of str
        The names to look for.
    params : mapping of str to array
        The parameters (for the sizes of packed segments).

    Returns
    -------
    Observed
        Names observed nowhere are absent.

    Examples
    --------
    A point holding ``a``'s units and then ``b``'s (a packed output), and one holding ``a``'s alone:

    >>> spec = PermutationSpec({"w": (("a", "b"), None), "u": ("a",)})
    >>> t = {"a": np.array([1, 2, 0]), "b": np.array([1, 0])}
    >>> x = np.random.default_rng(0).normal(size=(4, 5))
    >>> moved = np.concatenate([x[:, [1, 2, 0]], x[:, [4, 3]]], axis=1)
    >>> found = observed_units(spec, {"packed": x, "alone": x[:, :3]},
    ...                        [(t, {"packed": moved, "alone": x[:, [1, 2, 0]]})], ["a", "b"], {"w": np.zeros((5, 2))})
    >>> [tuple(piece)[:3] for piece in found.pieces["a"]], [tuple(piece)[:3] for piece in found.pieces["b"]]
    ([('packed', 0, 3), ('alone', 0, 3)], [('packed', 3, 5)])
    """
    if not rounds:
        return Observed()
    transforms = [t for t, _ in rounds]
    first = transforms[0]
    wanted = [n for n in dict.fromkeys(names) if all(n in t for t in transforms)]
    sizes = {n: _size(first[n]) for n in first}
    packs = _packed_segments(spec, first, params)
    repeats = {(e.name, e.times, e.interleaved) for entries in spec.axes_to_perm.values() for e in entries
               if isinstance(e, Repeat) and e.name in wanted and np.ndim(first[e.name]) == 1}
    pieces: dict[str, list[Piece]] = {n: [] for n in wanted}
    readings: dict[str, str] = {}
    seen: list[np.ndarray] = []
    for point, out in before.items():
        a = _as_rows(out)
        afters = [_as_rows(after[point]) for _, after in rounds if point in after]
        if not a or len(afters) != len(rounds) or any(set(b) != set(a) for b in afters) \
                or not all(np.isfinite(f).all() for r in (a, *afters) for f in r.values()):
            continue
        for reading in a:
            fa, fbs = a[reading], [b[reading] for b in afters]
            if any(fb.shape != fa.shape for fb in fbs):
                break
            units = fa.shape[1]
            found = [(n, Piece(point, 0, units)) for n in wanted
                     if sizes[n] == units and _follows(fa, fbs, [t[n] for t in transforms])]
            found += [(n, Piece(point, 0, units, k, inter)) for n, k, inter in sorted(repeats)
                      if sizes[n] * k == units and _follows(fa, fbs, [_repeated(t[n], k, inter) for t in transforms])]
            for way in packs.get(units, ()) if not found else ():
                # a segment no round moves (a single key/value head) says nothing either way
                moving = [(entry, s, e) for entry, s, e in way if entry is not None
                          and any(not _is_identity(_segment_value(t, entry)) for t in transforms)]
                matched = [_segment_piece(point, entry, s, e) for entry, s, e in moving
                           if _follows(fa[:, s:e], [fb[:, s:e] for fb in fbs],
                                       [_segment_value(t, entry) for t in transforms])]
                if moving and len(matched) == len(moving):  # every segment moved as it says: this output is that axis
                    found = [m for m in matched if m[0] in pieces]
                    break
            if found and any(s.shape == fa.shape and np.array_equal(s, fa) for s in seen):
                break  # the same output again (a dropout's in inference, a wrapper's): counted once
            if found:
                seen.append(fa)
                for n, piece in found:
                    pieces[n].append(piece)
                if reading != "second":
                    readings[point] = reading
                break
    return Observed({n: tuple(ps) for n, ps in pieces.items() if ps}, readings)


def _size(value: Any) -> int:
    return int(np.shape(value)[0])


def read_rows(out: Any) -> dict[str, np.ndarray]:
    """An output read every way it may hold its units (channels-first ``"second"``, then :data:`READINGS` its rank
    allows), each as at most ``_ROWS`` of its observation rows, evenly spaced (float64): what
    :func:`observed_units` compares, a few kilobytes whatever the output's size."""
    a = np.asarray(out)
    if a.ndim < 2 or not a.size:  # no units to observe (an empty slice: rotary over none of a head's units)
        return {}
    kept = {}
    for reading in ("second", *READINGS[:a.ndim - 2]):
        rows = _rows(a, reading)
        if rows.shape[0] > _ROWS:
            rows = rows[np.linspace(0, rows.shape[0] - 1, _ROWS).astype(np.int64)]
        kept[reading] = rows.astype(np.float64)
    return kept


def _as_rows(out: Any) -> dict[str, np.ndarray]:
    """``out`` as :func:`read_rows` gives it (already so when a mapping)."""
    return dict(out) if isinstance(out, Mapping) else read_rows(out)


def _rows(f: np.ndarray, reading: str) -> np.ndarray:
    """``(observations, units)`` of an output read channels-first (``"second"``) or as :data:`READINGS` says."""
    f = channels_first(np, f, reading) if reading != "second" else f
    return np.moveaxis(f, 1, -1).reshape(-1, f.shape[1])


def channels_first(xp: Any, f: Any, reading: str) -> Any:
    """An output read as ``reading`` (:data:`READINGS`) made channels-first, ``(n, units, *positions)``.

    Examples
    --------
    >>> f = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)      # (n, head_dim, tokens, heads), from (n, 4, 5, 3)
    >>> channels_first(np, f, "heads").shape                  # (n, heads x head_dim, tokens)
    (2, 15, 4)
    >>> channels_first(np, f, "last").shape
    (2, 5, 3, 4)
    """
    if f.ndim < 3:
        return f
    if reading == "last":
        return xp.permute_dims(f, (0, f.ndim - 1, *range(1, f.ndim - 1)))
    if reading == "heads":
        g = xp.permute_dims(f, (0, *range(2, f.ndim), 1))  # the map the backend moved: (n, ..., heads, head_dim)
        g = xp.reshape(g, (*g.shape[:-2], g.shape[-2] * g.shape[-1]))
        return xp.permute_dims(g, (0, g.ndim - 1, *range(1, g.ndim - 1))) if g.ndim > 2 else g
    raise ValueError(f"unknown reading {reading!r}; valid: {', '.join(READINGS)}")


def _packed_segments(spec: PermutationSpec, transform: Mapping[str, Any],
                     params: Mapping[str, Any]) -> dict[int, list[list[tuple[Any, int, int]]]]:
    """For each length of an axis whose entries move in segments, the ways its segments cut it:
    ``[(entry, start, stop), ...]``, ``entry`` a name, a :class:`~combinability.permutation.Repeat` (units
    moving whole per head) or None (a segment that does not move). Such axes are the packed axes of the spec
    (``(q, k, v)`` tuples) and the axes of parameters it binds as parts
    (:class:`~combinability.module_stacks.Part`: Phi-3's ``qkv_proj`` of unequal query, key and value rows)."""
    from combinability.module_stacks import Part

    out: dict[int, list[list[tuple[Any, int, int]]]] = {}

    def split(entry: Any, start: int, stop: int, param: str) -> list[tuple[Any, int, int]] | None:
        if not isinstance(entry, tuple):
            return [(entry, start, stop)]
        if any(n not in transform for n in entry):
            return None
        try:
            cuts = _segment_sizes(entry, transform, stop - start, param)
        except Exception:  # noqa: BLE001 - segments that do not fit this axis: not a way to cut it
            return None
        bounds = start + np.concatenate([[0], np.cumsum(cuts)]).astype(int)
        return [(n, int(bounds[i]), int(bounds[i + 1])) for i, n in enumerate(entry)]

    def add(length: int, way: list[tuple[Any, int, int]] | None) -> None:
        if way and way not in out.setdefault(length, []):
            out[length].append(way)

    for param, entries in spec.axes_to_perm.items():
        if param in params:
            for axis, entry in enumerate(entries):
                if isinstance(entry, tuple):
                    add(int(np.shape(params[param])[axis]), split(entry, 0, int(np.shape(params[param])[axis]), param))
    cut: dict[tuple[str, int], list[tuple[int, int | None, Any]]] = {}
    for name, view in spec.stacks.items():
        # (a part of a stacked view, as a fused experts' tensor cut into gate and up rows, is not a stored array)
        if isinstance(view, Part) and view.step == 1 and view.member in params and name in spec.axes_to_perm:
            entry = spec.axes_to_perm[name][view.axis]
            cut.setdefault((view.member, view.axis), []).append((view.start, view.stop, entry))
    for (member, axis), parts in cut.items():
        length = int(np.shape(params[member])[axis])
        way: list[tuple[Any, int, int]] | None = []
        for start, stop, entry in sorted(parts, key=lambda part: part[0]):
            pieces = split(entry, start, length if stop is None else stop, member)
            if pieces is None:
                way = None
                break
            way += pieces
        add(length, way)
    return out


def _segment_value(transform: Mapping[str, Any], entry: Any) -> Any:
    """The transformation of a segment's units: its name's, or for a :class:`Repeat` its name's per unit's entries."""
    if isinstance(entry, Repeat):
        return _repeated(transform[entry.name], entry.times, entry.interleaved)
    return transform[entry]


def _segment_piece(point: str, entry: Any, start: int, stop: int) -> tuple[str, Piece]:
    """The name a segment observes and its piece of ``point``."""
    if isinstance(entry, Repeat):
        return entry.name, Piece(point, start, stop, entry.times, entry.interleaved)
    return entry, Piece(point, start, stop)


def _repeated(value: Any, times: int, interleaved: bool) -> np.ndarray:
    """An index array acting on ``times`` consecutive (or, ``interleaved``, strided) units per entry."""
    value = np.asarray(value)
    n = len(value)
    if interleaved:
        return (np.arange(times)[:, None] * n + value[None, :]).ravel()
    return (value[:, None] * times + np.arange(times)[None, :]).ravel()


def _follows(fa: np.ndarray, fbs: Sequence[np.ndarray], values: Sequence[Any]) -> bool:
    """Whether each ``fbs[r]`` is ``fa`` transformed by ``values[r]`` along its units, and one visibly so."""
    if fa.shape[1] != _size(values[0]):
        return False
    scale = float(np.linalg.norm(fa))
    if scale == 0.0:
        return False
    visible = False
    for fb, value in zip(fbs, values, strict=True):
        moved = act(value, fa, 1)
        if float(np.linalg.norm(fb - moved)) > _CLOSE * scale:
            return False
        visible = visible or float(np.linalg.norm(moved - fa)) > _MOVED * scale
    return visible


def observe_model(backend: Any, model: Any, layout: Any, theta: np.ndarray, example_input: Any,
                  spec: PermutationSpec, names: Collection[str], *, seed: int = 0) -> Observed:
    """:func:`observed_units` of a model: its candidate points run on ``example_input`` before and after a random
    transformation of ``spec``.

    Parameters
    ----------
    backend : Backend
    model : native model
    layout : FlatLayout
    theta : numpy.ndarray
        The model's flat vector (norms folded where ``spec`` has an orthogonal map).
    example_input : array
    spec : PermutationSpec
    names : collection of str
        The names to look for.
    seed : int
        Seeds the random transformation.

    Returns
    -------
    Observed
        Empty when the backend's prepared model cannot list its points (``feature_candidates(flat, x)``:
        the names ``features`` reads on ``x``).
    """
    from combinability.data.base import input_dtype
    from combinability.errors import UnknownNameError
    from combinability.permutation import apply_permutation, random_permutation

    prepared = backend.prepare(model, layout)
    candidates = getattr(prepared, "feature_candidates", None)
    if candidates is None or not names:
        return Observed()
    # two examples show every unit (a sequence's or an image's positions are observations too), and keep the
    # outputs of every candidate in every round small
    example = np.asarray(example_input)[:2]
    x = backend.asarray(example, input_dtype(example))
    points = list(candidates(backend.asarray(np.asarray(theta, dtype=np.float32)), x))
    params = layout.unflatten(theta)
    rounds = [(t, layout.flatten(apply_permutation(spec, t, params)))
              for t in _probe_transforms(spec, params, seed, random_permutation)]

    def read(vector: Any, chunk: list[str]) -> dict[str, Any]:
        try:
            return prepared.features(vector, x, chunk)
        except UnknownNameError:  # a candidate no forward pass reaches (a module another one only reads the weights of)
            feats = {}
            for p in chunk:
                try:
                    feats.update(prepared.features(vector, x, [p]))
                except UnknownNameError:
                    continue
            return feats

    def outputs(flat: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Every candidate's output, read as :func:`read_rows` keeps it (a few rows), a bounded number per pass."""
        vector = backend.asarray(np.asarray(flat, dtype=np.float32))
        kept: dict[str, dict[str, np.ndarray]] = {}
        for start in range(0, len(points), _POINTS_PER_PASS):
            feats = read(vector, points[start:start + _POINTS_PER_PASS])
            kept.update({p: read_rows(backend.to_numpy(v)) for p, v in feats.items()
                         if v is not None and hasattr(v, "shape")})
            del feats
        return kept

    return observed_units(spec, outputs(theta), [(t, outputs(moved)) for t, moved in rounds], names, params)


def _probe_transforms(spec: PermutationSpec, params: Mapping[str, Any], seed: int, draw: Any) -> list[dict[str, Any]]:
    """Transformations of ``spec`` that tell every name apart: a point moved as one name says in each of them is
    that name's, not another's that drew the same values.

    Each family (a block group and its members, or a name alone) moves whole in the rounds of its code's
    bits, so any two families differ in some round. Then, with every block group in place, each block member
    moves its units inside its blocks in the rounds of its own code's bits, so two members of one family (a
    head's key and value units, which may draw the same derangement of a few units) differ in some round too.
    """
    from combinability.kinds import Blocks
    from combinability.permutation import random_derangement

    def family(name: str) -> str:  # the outermost block group a name moves with (heads within a key/value head's)
        group = spec.group_of(name)
        return name if group is None or group == name else family(group)

    codes: dict[str, int] = {}
    for name in spec.perm_names:
        codes.setdefault(family(name), len(codes) + 1)
    out = []
    for r in range(max(codes.values(), default=0).bit_length()):
        drawn = draw(spec, params, seed + r, derange=True)
        out.append({n: v if codes[family(n)] >> r & 1 else _identity(v) for n, v in drawn.items()})
    members: dict[str, list[str]] = {}
    for name in spec.perm_names:
        if isinstance(spec.kinds.get(name), Blocks):
            members.setdefault(family(name), []).append(name)
    rank = {m: i + 1 for ms in members.values() for i, m in enumerate(ms)}
    rng = np.random.default_rng([seed, 1])
    for r in range(max(rank.values(), default=1).bit_length() if any(len(ms) > 1 for ms in members.values()) else 0):
        transform = {n: _identity(v) for n, v in out[0].items()} if out else {}
        for m, k in rank.items():
            kind = spec.kinds[m]
            if k >> r & 1 and kind.size > 1:
                transform[m] = np.concatenate([i * kind.size + random_derangement(kind.size, rng)
                                               for i in range(kind.blocks)])
        out.append(transform)
    return out


def _is_identity(value: Any) -> bool:
    """Whether a transformation value leaves its units in place."""
    value = np.asarray(value)
    return bool(np.array_equal(value, _identity(value)))


def _identity(value: Any) -> np.ndarray:
    """The identity of the kind of ``value`` (an index array, or a matrix)."""
    n = _size(value)
    return np.eye(n) if np.ndim(value) == 2 else np.arange(n, dtype=np.int64)
