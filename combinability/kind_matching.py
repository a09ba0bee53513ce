"""Weight matching over every symmetry kind: neuron and block permutations, orthogonal maps.

The objective is Git Re-Basin's, ``Σ_params ⟨θ_A, T(θ_B)⟩``, maximised by coordinate
ascent: each step holds every transformation but one fixed, and that one then enters
the objective linearly, ``⟨M, C⟩`` with ``C = Σ_bindings A_(axis) B_(axis)ᵀ`` (each
bound axis or packed-axis segment moved to the front and flattened). Its exact
maximiser is

- a linear assignment on ``C`` for a neuron permutation;
- orthogonal Procrustes, ``M = U Vᵀ`` for ``C = U S Vᵀ``, for an orthogonal map (on the
  complement of the all-ones vector when the map must fix it, for LayerNorm streams);
- for a block group (attention heads, experts) jointly with its members: for each pair
  of blocks (i of A, j of B), the best within-block assignment of every member, summed
  into a block cost ``B[i, j]`` together with the group's own bindings (an MoE gate's
  rows); then an assignment σ on ``B``, and each block's within-block permutations are
  those of its matched pair.

A block group whose members are general invertible maps inside each block
(:class:`~combinability.kinds.Invertible`, with their :class:`~combinability.kinds.Dual`
on the other side of each head's bilinear form) cannot be valued by ``⟨θ_A, T(θ_B)⟩``,
which grows without bound with the map; its steps minimise the distance instead, and so
the objective of such a spec is ``Σ ⟨θ_A, T(θ_B)⟩ − ½‖T(θ_B)‖²`` (``−½‖θ_A − T(θ_B)‖²`` up
to a constant, and the same steps as before for every other kind, which keep norms). The
group's step assigns σ on the blocks' least-squares fits (each pair of blocks valued by
how much of A's block the best map of B's can reach, each side alone), then fits each
matched pair's map by :func:`combinability.invertible.fit_inner`.

Sweeps visit the steps in a seeded random order until a sweep improves nothing. This
generalises, for any spec, the matching of heads, FFN neurons, experts and the residual
stream of the transformer and MoE papers (Theus et al. 2025; Tran et al. 2025) — with
the block cost taken as the best within-block match instead of a head-circuit summary,
so the step is the exact coordinate optimum of the same objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from combinability.assignment import fast_solve_max
from combinability.invertible import duals, fit_inner
from combinability.kinds import (
    Blocks,
    Dual,
    Invertible,
    Orthogonal,
    block_matrix,
    block_parts,
    expand_blocks,
    invert,
    is_matrix,
    ones_complement,
)
from combinability.matching_terms import dot64
from combinability.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    check_permutation,
    identity_permutation,
    random_permutation,
)

__all__ = ["match_symmetries", "block_assignment"]


def _lap(cost: np.ndarray) -> tuple[np.ndarray, float]:
    cols = fast_solve_max(cost)
    return cols, float(cost[np.arange(len(cols)), cols].sum())


def _procrustes(cost: np.ndarray, fix_ones: bool) -> np.ndarray:
    n = cost.shape[0]
    if fix_ones:
        basis = ones_complement(n)
        inner = _procrustes(basis.T @ cost @ basis, False)
        return np.full((n, n), 1.0 / n) + basis @ inner @ basis.T
    u, _, vt = np.linalg.svd(cost)
    return u @ vt


def _offsets(spec: PermutationSpec, name: str, axis: int, sizes: Mapping[str, int]) -> list[int]:
    entry = spec.axes_to_perm[name][axis]
    return list(np.cumsum([0] + [sizes[q] for q in entry]))


def _cost(spec: PermutationSpec, p: str, a: Mapping[str, np.ndarray], b_rest: Mapping[str, np.ndarray],
          n: int, sizes: Mapping[str, int], *, left: str = "a") -> np.ndarray:
    """``C[i, j] = Σ ⟨A unit i, B unit j⟩`` over every axis and segment bound to ``p``.

    Each product runs in the precision of A's parameter (float32 for a float32 model, as
    in :mod:`combinability.matching_terms`; float64 for float64) and is summed in float64.
    With ``left="b"``, ``Σ ⟨B unit i, B unit j⟩`` (B's Gram matrix).
    """
    cost = np.zeros((n, n))
    views = [(name, axis, slice(None)) for name, axis in spec.perm_to_axes.get(p, [])]
    for name, axis, k in spec.segments.get(p, []):
        off = _offsets(spec, name, axis, sizes)
        views.append((name, axis, slice(off[k], off[k + 1])))
    for name, axis, part in views:
        pa = np.moveaxis((a if left == "a" else b_rest)[name], axis, 0)[part].reshape(n, -1)
        pb = np.moveaxis(b_rest[name], axis, 0)[part].reshape(n, -1)
        dtype = np.float64 if pa.dtype == np.float64 else np.float32
        cost += pa.astype(dtype, copy=False) @ pb.astype(dtype, copy=False).T
    return cost


def objective(spec: PermutationSpec, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
              perm: Mapping[str, Any]) -> float:
    """``Σ ⟨θ_A, T(θ_B)⟩`` over the spec's parameters, in float64."""
    moved = apply_permutation(spec, perm, {k: b[k] for k in spec.axes_to_perm})
    return float(sum(dot64(a[k], moved[k]) for k in moved))


def _bindings(spec: PermutationSpec) -> dict[str, list[str]]:
    """Each name of ``spec`` to the parameters it acts on (whole axes or packed segments)."""
    out: dict[str, list[str]] = {}
    for q, entries in (*spec.perm_to_axes.items(), *spec.segments.items()):
        out.setdefault(q, []).extend(entry[0] for entry in entries)
    return {q: list(dict.fromkeys(names)) for q, names in out.items()}


def _readers(spec: PermutationSpec, steps: list[str]) -> dict[str, set[str]]:
    """Each step to the names whose values its optimum reads.

    A name's cost reads, of every parameter it acts on, its own axis (or segment) with the
    *other* axes transformed: so the names acting on those other axes, for the step's name
    and, for a block group, its members.
    """
    across: dict[str, set[str]] = {}
    for axes in spec.axes_to_perm.values():
        on_axis = [{q for q in (entry if isinstance(entry, tuple) else (entry,)) if q is not None} for entry in axes]
        for x, names in enumerate(on_axis):
            others = set().union(*(on_axis[y] for y in range(len(axes)) if y != x))
            for q in names:
                across.setdefault(q, set()).update(others)
    out = {}
    dual = duals(spec)
    for p in steps:
        members = [m for m, kind in spec.kinds.items() if isinstance(kind, Blocks | Invertible) and kind.group == p]
        own = [p, *members, *(dual[m] for m in members if m in dual)]
        out[p] = set().union(*(across.get(o, set()) for o in own))
    return out


class _Transformed:
    """B under the current transformation, parameter by parameter, with each parameter's share
    ``⟨θ_A[k], T(θ_B)[k]⟩`` (float64) of the objective.

    A step is valued on the parameters it acts on alone. A permutation is undone or changed
    by one gather of the transformed parameter (exact); a parameter an orthogonal map acts on
    is transformed again from B when that map changes (no rounding builds up).
    """

    def __init__(self, spec: PermutationSpec, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                 perm: dict[str, np.ndarray], bound: Mapping[str, list[str]]) -> None:
        self.spec, self.a, self.b, self.perm, self.bound = spec, a, b, perm, bound
        self.duals = duals(spec)
        self.moved = apply_permutation(spec, perm, {k: b[k] for k in spec.axes_to_perm}, check=False)
        self.terms = {k: self.share(k, v) for k, v in self.moved.items()}

    def share(self, k: str, moved: np.ndarray) -> float:
        """Parameter ``k``'s share of the objective: ``⟨A, T(B)⟩``, less ``½‖T(B)‖²`` where maps need not keep norms."""
        value = dot64(self.a[k], moved)
        return value - 0.5 * dot64(moved, moved) if self.duals else value

    def total(self) -> float:
        return float(sum(self.terms.values()))

    def rest(self, q: str) -> dict[str, np.ndarray]:
        """The parameters ``q`` acts on, transformed by every name but ``q`` (and its dual)."""
        names = self.bound.get(q, [])
        if q in self.duals:
            names = list(dict.fromkeys([*names, *self.bound.get(self.duals[q], [])]))
            others = set(self.perm) - {q, self.duals[q]}
            return apply_permutation(self.spec, self.perm, {k: self.b[k] for k in names}, only=others, check=False)
        if is_matrix(self.perm[q]):
            return apply_permutation(self.spec, self.perm, {k: self.b[k] for k in names}, except_perm=q, check=False)
        undo = {**self.perm, q: invert(self.perm[q])}
        return apply_permutation(self.spec, undo, {k: self.moved[k] for k in names}, only={q}, check=False)

    def trial(self, changed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The parameters ``changed`` acts on, and their shares, with ``changed`` in place of the current values."""
        names = list(dict.fromkeys(k for q in changed for k in self.bound.get(q, [])))
        if any(is_matrix(v) for v in changed.values()):
            moved = apply_permutation(self.spec, {**self.perm, **changed}, {k: self.b[k] for k in names}, check=False)
        else:  # position j holds B's unit perm[q][j]; it is to hold changed[q][j]
            delta = {q: invert(self.perm[q])[np.asarray(v)] for q, v in changed.items()}
            moved = apply_permutation(self.spec, {**self.perm, **delta}, {k: self.moved[k] for k in names},
                                      only=set(changed), check=False)
        return moved, {k: self.share(k, moved[k]) for k in names}

    def accept(self, changed: Mapping[str, np.ndarray], moved: dict[str, np.ndarray],
               terms: dict[str, float]) -> None:
        self.perm.update(changed)
        self.moved.update(moved)
        self.terms.update(terms)


def _step(spec: PermutationSpec, p: str, state: _Transformed, a: Mapping[str, np.ndarray],
          sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The exact optimum of name ``p`` (with its block members, for a group), the rest held fixed.

    A name's cost reads only the parameters it acts on, transformed by every other name
    (:meth:`_Transformed.rest`).
    """
    rest = state.rest
    kind = spec.kind(p)
    if isinstance(kind, Orthogonal):
        return {p: _procrustes(_cost(spec, p, a, rest(p), sizes[p], sizes), kind.fix_ones)}
    members = [m for m, k in spec.kinds.items() if isinstance(k, Blocks) and k.group == p]
    maps = [m for m, k in spec.kinds.items() if isinstance(k, Invertible) and k.group == p]
    group_cost = _cost(spec, p, a, rest(p), sizes[p], sizes)
    if maps:
        return _invertible_blocks(spec, p, group_cost, members, maps, state, a, sizes)
    if not members:
        return {p: _lap(group_cost)[0]}
    return block_assignment(p, group_cost, {m: (_cost(spec, m, a, rest(m), sizes[m], sizes), spec.kinds[m].size)
                                            for m in members})


def _grams(spec: PermutationSpec, m: str, dual: str, state: _Transformed, a: Mapping[str, np.ndarray],
           sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The four ``n × n`` products of :func:`combinability.invertible.inner_objective` for every pair of blocks:
    ``yx = A Bᵀ``, ``xx = B Bᵀ`` on ``m``'s side, ``vu``, ``uu`` on its dual's, B transformed by every other name."""
    rest, n = state.rest(m), sizes[m]
    return {"yx": _cost(spec, m, a, rest, n, sizes), "xx": _cost(spec, m, a, rest, n, sizes, left="b"),
            "vu": _cost(spec, dual, a, rest, n, sizes), "uu": _cost(spec, dual, a, rest, n, sizes, left="b")}


def _reach(cross: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``R[i, j] = tr(C_ij G_j⁺ C_ijᵀ)``: the squared norm of A's block i that a free linear map of B's block j
    reaches, for ``cross`` ``(h, s, h, s)`` (``C_ij = cross[i, :, j]``) and B's Gram matrix ``gram`` (the same)."""
    h = gram.shape[0]
    inverse = np.stack([np.linalg.pinv(gram[j, :, j], hermitian=True) for j in range(h)])
    return np.einsum("iajb,jbc,iajc->ij", cross, inverse, cross, optimize=True)


def _invertible_blocks(spec: PermutationSpec, group: str, group_cost: np.ndarray, members: list[str],
                       maps: list[str], state: _Transformed, a: Mapping[str, np.ndarray],
                       sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The step of a block group with invertible maps inside its blocks (see the module docstring).

    σ maximises the group's own cost, each permutation member's best within-block assignment
    and, for each invertible member, ``½ (tr(C_yx G_xx⁺ C_yxᵀ) + tr(C_vu G_uu⁺ C_vuᵀ))`` per pair
    of blocks (what ``−½‖A − T(B)‖²`` gains from a free map of each side, less what depends
    on one block alone); each matched pair's map is then fitted from the one B's block holds now.
    """
    h = sizes[group]
    block_cost = np.array(group_cost, dtype=np.float64)
    fits = {}
    for m in maps:
        s = spec.kinds[m].size
        fits[m] = {k: v.reshape(h, s, h, s) for k, v in _grams(spec, m, state.duals[m], state, a, sizes).items()}
        block_cost += 0.5 * (_reach(fits[m]["yx"], fits[m]["xx"]) + _reach(fits[m]["vu"], fits[m]["uu"]))
    if members:  # σ on the block cost with each permutation member's best within-block assignments
        out = block_assignment(group, block_cost, {m: (_cost(spec, m, a, state.rest(m), sizes[m], sizes),
                                                       spec.kinds[m].size) for m in members})
    else:
        out = {group: _lap(block_cost)[0]}
    sigma = out[group]
    for m, blocks in fits.items():
        held_sigma, held = block_parts(m, state.perm[m], h, spec.kinds[m].size)
        by_b_block = {int(j): held[r] for r, j in enumerate(held_sigma)}  # each B block keeps its map
        inner = [fit_inner({"yx": blocks["yx"][i, :, j], "xx": blocks["xx"][j, :, j],
                            "vu": blocks["vu"][i, :, j], "uu": blocks["uu"][j, :, j]}, by_b_block[int(j)])
                 for i, j in enumerate(sigma)]
        out[m] = block_matrix(sigma, np.stack(inner))
        out[state.duals[m]] = block_matrix(sigma, np.linalg.inv(np.stack(inner)).transpose(0, 2, 1))
    return out


def block_assignment(group: str, group_cost: np.ndarray | None,
                     members: Mapping[str, tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    """The maximum of ``⟨σ, group_cost⟩ + Σ_m ⟨π_m, cost_m⟩`` over a block group and its members.

    Each member ``m`` permutes ``blocks x size`` units as ``π_m(i·size + a) = σ(i)·size + τ_i(a)``
    (:class:`~combinability.kinds.Blocks`): for each pair of blocks ``(i, j)`` the best
    within-block assignment of every member is summed into a block cost, with
    ``group_cost[i, j]`` (the group's own bindings; None: none); ``σ`` is the assignment of
    that block cost, and each block keeps the within-block assignments of its matched pair.
    It is the exact maximum, whatever the costs are (weight products, activation
    correlations).

    Parameters
    ----------
    group : str
        The group's name, a key of the result (its block permutation σ).
    group_cost : numpy.ndarray ``(blocks, blocks)`` or None
    members : mapping of str to (numpy.ndarray ``(n, n)``, int)
        Each member's cost matrix and block size (``n = blocks x size``).

    Returns
    -------
    dict of str to numpy.ndarray
        ``σ`` under ``group`` and each member's unit permutation.

    Examples
    --------
    >>> c = np.kron(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    >>> {k: v.tolist() for k, v in block_assignment("g", None, {"m": (c, 2)}).items()}
    {'g': [1, 0], 'm': [3, 2, 1, 0]}
    """
    h = next(len(c) // size for c, size in members.values())
    block_cost = np.zeros((h, h)) if group_cost is None else np.array(group_cost, dtype=np.float64)
    inner: dict[str, np.ndarray] = {}
    for m, (cost, s) in members.items():
        c = np.asarray(cost).reshape(h, s, h, s)
        best = np.empty((h, h, s), dtype=np.int64)
        for i in range(h):
            for j in range(h):
                best[i, j], value = _lap(c[i, :, j, :])
                block_cost[i, j] += value
        inner[m] = best
    sigma, _ = _lap(block_cost)
    out = {group: sigma}
    for m, best in inner.items():
        out[m] = expand_blocks(sigma, best[np.arange(h), sigma], members[m][1])
    return out


def match_symmetries(spec: PermutationSpec, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *,
                     seed: int = 0, max_iter: int = 100, init: Mapping[str, Any] | None = None,
                     restarts: int = 0, tol: float = 1e-12) -> Permutation:
    """Weight matching for a spec with block or orthogonal kinds (see the module docstring).

    Parameters are as for :func:`combinability.weight_matching` (which calls this for
    such specs); a restart starts from a random transformation of every kind.
    """
    sizes = spec.perm_sizes(a)
    spec.check_requirements(a)
    spec.check_requirements(b)
    steps = [p for p in sizes if not isinstance(spec.kind(p), Blocks | Invertible | Dual)]
    bound = _bindings(spec)
    readers = _readers(spec, steps)
    best: Permutation | None = None
    for run in range(restarts + 1):
        if run == 0 and init is not None:
            check_permutation(init, sizes, spec)
            perm = {p: np.asarray(init[p]).copy() for p in sizes}
        elif run == 0:
            perm = dict(identity_permutation(sizes, spec))
        else:
            perm = dict(random_permutation(spec, a, np.random.default_rng([seed, run, 1])))
        state = _Transformed(spec, a, b, perm, bound)
        value = state.total()
        history = [value]
        sweeps = 0
        stale = set(steps)  # steps whose inputs changed since they were last taken
        for sweep in range(max_iter):
            sweeps = sweep + 1
            improved = False
            for k in np.random.default_rng([seed, run, sweep]).permutation(len(steps)):
                if steps[k] not in stale:
                    continue  # the same inputs give the same optimum, already taken or refused
                stale.discard(steps[k])
                changed = _step(spec, steps[k], state, a, sizes)
                moved, terms = state.trial(changed)
                gain = float(sum(terms[name] - state.terms[name] for name in terms))
                share = float(sum(abs(state.terms[name]) for name in terms))  # what the step can change
                if gain > tol * max(1.0, share):
                    state.accept(changed, moved, terms)
                    value += gain
                    improved = True
                    stale.update(s for s in steps if readers[s] & changed.keys())
            history.append(value)
            if not improved:
                break
        perm, value = state.perm, state.total()  # each share exact for the final transformation
        if best is None or value > best.objective:
            best = Permutation(perm, objective=value, history=history, iterations=sweeps, method="weight")
    if best is None:  # pragma: no cover - restarts >= 0 guarantees one run
        raise ValueError("weight matching ran no iteration")
    return best
