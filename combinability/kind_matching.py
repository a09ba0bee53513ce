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

from combinability.kinds import Blocks, Orthogonal, expand_blocks, ones_complement
from combinability.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    check_permutation,
    identity_permutation,
    random_permutation,
)

__all__ = ["match_symmetries"]


def _lap(cost: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols[np.argsort(rows)].astype(np.int64), float(cost[rows, cols].sum())


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
          n: int, sizes: Mapping[str, int]) -> np.ndarray:
    """``C[i, j] = Σ ⟨A unit i, B unit j⟩`` over every axis and segment bound to ``p``."""
    cost = np.zeros((n, n))
    views = [(name, axis, slice(None)) for name, axis in spec.perm_to_axes.get(p, [])]
    for name, axis, k in spec.segments.get(p, []):
        off = _offsets(spec, name, axis, sizes)
        views.append((name, axis, slice(off[k], off[k + 1])))
    for name, axis, part in views:
        pa = np.moveaxis(a[name], axis, 0)[part].reshape(n, -1)
        pb = np.moveaxis(b_rest[name], axis, 0)[part].reshape(n, -1)
        cost += pa.astype(np.float64) @ pb.astype(np.float64).T
    return cost


def objective(spec: PermutationSpec, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
              perm: Mapping[str, Any]) -> float:
    """``Σ ⟨θ_A, T(θ_B)⟩`` over the spec's parameters, in float64."""
    moved = apply_permutation(spec, perm, {k: b[k] for k in spec.axes_to_perm})
    return float(sum(np.vdot(a[k].astype(np.float64), moved[k].astype(np.float64)) for k in moved))


def _step(spec: PermutationSpec, p: str, perm: dict[str, np.ndarray], a: Mapping[str, np.ndarray],
          b: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The exact optimum of name ``p`` (with its block members, for a group), the rest held fixed."""
    def rest(q: str) -> dict[str, np.ndarray]:
        return apply_permutation(spec, perm, {k: b[k] for k in spec.axes_to_perm}, except_perm=q)

    kind = spec.kind(p)
    if isinstance(kind, Orthogonal):
        return {p: _procrustes(_cost(spec, p, a, rest(p), sizes[p], sizes), kind.fix_ones)}
    members = [m for m, k in spec.kinds.items() if isinstance(k, Blocks) and k.group == p]
    group_cost = _cost(spec, p, a, rest(p), sizes[p], sizes)
    if not members:
        return {p: _lap(group_cost)[0]}
    h = sizes[p]
    inner: dict[str, np.ndarray] = {}
    block_cost = group_cost.copy()
    for m in members:
        s = spec.kinds[m].size
        c = _cost(spec, m, a, rest(m), sizes[m], sizes).reshape(h, s, h, s)
        best = np.empty((h, h, s), dtype=np.int64)
        for i in range(h):
            for j in range(h):
                best[i, j], value = _lap(c[i, :, j, :])
                block_cost[i, j] += value
        inner[m] = best
    sigma, _ = _lap(block_cost)
    out = {p: sigma}
    for m, best in inner.items():
        out[m] = expand_blocks(sigma, best[np.arange(h), sigma], spec.kinds[m].size)
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
    steps = [p for p in sizes if not isinstance(spec.kind(p), Blocks)]
    best: Permutation | None = None
    for run in range(restarts + 1):
        if run == 0 and init is not None:
            check_permutation(init, sizes, spec)
            perm = {p: np.asarray(init[p]).copy() for p in sizes}
        elif run == 0:
            perm = dict(identity_permutation(sizes, spec))
        else:
            perm = dict(random_permutation(spec, a, np.random.default_rng([seed, run, 1])))
        value = objective(spec, a, b, perm)
        history = [value]
        sweeps = 0
        for sweep in range(max_iter):
            sweeps = sweep + 1
            improved = False
            for k in np.random.default_rng([seed, run, sweep]).permutation(len(steps)):
                trial = dict(perm)
                trial.update(_step(spec, steps[k], perm, a, b, sizes))
                new = objective(spec, a, b, trial)
                if new > value + tol * max(1.0, abs(value)):
                    perm, value, improved = trial, new, True
            history.append(value)
            if not improved:
                break
        if best is None or value > best.objective:
            best = Permutation(perm, objective=value, history=history, iterations=sweeps, method="weight")
    if best is None:  # pragma: no cover - restarts >= 0 guarantees one run
        raise ValueError("weight matching ran no iteration")
    return best
