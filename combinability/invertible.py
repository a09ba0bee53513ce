"""General invertible maps inside attention heads (Theus et al. 2025), found and fitted.

Inside one head, attention reads its query and key units only through ``qᵀk`` and its
value units only through ``W_O v``: any invertible ``G`` (not only a permutation or a
rotation) with queries ``G q``, keys ``G⁻ᵀ k``, values ``G v`` and output columns
``W_O G⁻¹`` computes the same function. :func:`invertible_spec` turns a spec's
within-head permutations (:class:`~combinability.kinds.Blocks` names) into such maps —
an :class:`~combinability.kinds.Invertible` name on one side of the bilinear form and
its :class:`~combinability.kinds.Dual` on the other — wherever a random map of that kind
keeps the model's outputs (it does not under rotary embeddings or norms on queries and
keys, where the permutations stay). :func:`fit_inner` is the weight-matching step of one
head's map.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import numpy as np

from combinability.kinds import Blocks, Dual, Invertible
from combinability.permutation import PermutationSpec, Repeat, rename_entry

__all__ = ["invertible_spec", "bindings_of", "dual_name", "duals", "fit_inner", "inner_objective", "lifted"]

#: Bindings of one name beyond which the sides of its bilinear form are not searched.
MAX_BINDINGS = 8


def dual_name(name: str) -> str:
    """The name of the :class:`~combinability.kinds.Dual` of ``name``."""
    return f"{name}~dual"


def bindings_of(spec: PermutationSpec, name: str) -> list[tuple[str, int, int | None]]:
    """Where ``name`` acts: ``(parameter, axis, segment)``, the segment None for a whole axis."""
    out: list[tuple[str, int, int | None]] = []
    for param, entry in spec.axes_to_perm.items():
        for axis, e in enumerate(entry):
            if e == name or (isinstance(e, Repeat) and e.name == name):
                out.append((param, axis, None))
            elif isinstance(e, tuple):
                out.extend((param, axis, k) for k, q in enumerate(e) if q == name)
    return out


def _with_dual(spec: PermutationSpec, name: str, dual: list[tuple[str, int, int | None]]) -> PermutationSpec:
    """``spec`` with ``name`` invertible and the bindings ``dual`` moved to its dual."""
    axes = {param: list(entry) for param, entry in spec.axes_to_perm.items()}
    other = dual_name(name)
    for param, axis, k in dual:
        e = axes[param][axis]
        if k is None:
            axes[param][axis] = rename_entry(e, {name: other})
        else:
            axes[param][axis] = tuple(other if j == k else q for j, q in enumerate(e))
    kind = spec.kind(name)
    kinds = {**spec.kinds, name: Invertible(kind.group, kind.blocks, kind.size), other: Dual(name)}
    return PermutationSpec({param: tuple(entry) for param, entry in axes.items()}, kinds, spec.stacks)


def invertible_spec(spec: PermutationSpec, keeps: Callable[[PermutationSpec], bool]) -> PermutationSpec:
    """``spec`` with every within-block permutation that can be an invertible map made one.

    For each :class:`~combinability.kinds.Blocks` name, the places it acts on are split in
    two sides (queries | keys, values | output columns), until a random map of
    :class:`~combinability.kinds.Invertible` kind on one side and its inverse transpose on
    the other keeps the outputs (``keeps``); a name for which no split does stays a
    permutation inside its blocks. Splits that keep a module's weight and bias (or a packed
    parameter's segment and its bias's) on one side are tried first: a key bias, which
    softmax ignores, then goes with its keys.

    Parameters
    ----------
    spec : PermutationSpec
        A model's symmetries with heads as block permutations (a traced transformer's).
    keeps : callable
        ``keeps(candidate) -> bool``: whether a random transformation of every name of
        ``candidate`` leaves the model's outputs unchanged (on folded norms, where the
        spec has an orthogonal stream).

    Returns
    -------
    PermutationSpec
        ``spec`` itself when no name can be made invertible.
    """
    out = spec
    for name in [p for p, k in spec.kinds.items() if isinstance(k, Blocks)]:
        where = bindings_of(spec, name)
        if len(where) < 2 or len(where) > MAX_BINDINGS:
            continue
        splits = [list(dual) for count in range(1, len(where)) for dual in itertools.combinations(where[1:], count)]
        splits.sort(key=lambda dual: -_cohesion(where, dual))  # stable: fewer dual places first among equals
        found = next((candidate for dual in splits if keeps(candidate := _with_dual(out, name, dual))), None)
        if found is not None:
            out = found
    return out


def _cohesion(where: list[tuple[str, int, int | None]], dual: list[tuple[str, int, int | None]]) -> int:
    """Pairs of places of one module (and one segment) on the same side, less those split apart."""
    from combinability.module_stacks import module_of

    score = 0
    for x, y in itertools.combinations(where, 2):
        if module_of(x[0]) == module_of(y[0]) and x[2] == y[2] and x[0] != y[0]:
            score += 1 if (x in dual) == (y in dual) else -1
    return score


def inner_objective(g: np.ndarray, grams: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """``‖Y − G X‖² + ‖V − G⁻ᵀ U‖²`` less the constants ``‖Y‖² + ‖V‖²``, and its gradient in ``G``.

    ``grams`` holds ``xx = X Xᵀ``, ``yx = Y Xᵀ``, ``uu = U Uᵀ`` and ``vu = V Uᵀ`` (``size × size``): X, U
    are B's rows of one head on the two sides of its bilinear form, Y, V A's.
    """
    n = np.linalg.inv(g).T
    value = float(np.sum(g * (g @ grams["xx"])) - 2.0 * np.sum(g * grams["yx"])
                  + np.sum(n * (n @ grams["uu"])) - 2.0 * np.sum(n * grams["vu"]))
    h = 2.0 * (n @ grams["uu"] - grams["vu"])  # the gradient in N = G⁻ᵀ
    grad = 2.0 * (g @ grams["xx"] - grams["yx"]) - n @ h.T @ n
    return value, grad


def _least_squares(grams: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Starting maps fitted to one side alone: ``Y Xᵀ (X Xᵀ)⁻¹``, and ``((V Uᵀ)(U Uᵀ)⁻¹)⁻ᵀ``."""
    out = []
    for fit, gram, dual in ((grams["yx"], grams["xx"], False), (grams["vu"], grams["uu"], True)):
        try:
            g = np.linalg.solve(gram.T, fit.T).T
            out.append(np.linalg.inv(g).T if dual else g)
        except np.linalg.LinAlgError:
            continue
    return out


def fit_inner(grams: Mapping[str, np.ndarray], start: np.ndarray, *, max_iter: int = 50) -> np.ndarray:
    """The invertible ``G`` of one head nearest to A: a local minimum of :func:`inner_objective`.

    Refined by nonlinear conjugate gradients from the best of ``start`` (the current map) and
    each side's least-squares fit; never worse than ``start``. (scipy 1.17's L-BFGS-B took 14 ms
    an iteration at 1,024 variables, its CG well under one.)
    """
    from scipy.optimize import minimize

    s = start.shape[0]

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            value, grad = inner_objective(flat.reshape(s, s), grams)
        except np.linalg.LinAlgError:  # a singular map: infinitely far (its inverse transpose blows up)
            return 1e300, np.zeros_like(flat)
        if not (np.isfinite(value) and np.isfinite(grad).all()):
            return 1e300, np.zeros_like(flat)
        return value, grad.ravel()

    starts = [g for g in [start, *_least_squares(grams)] if np.isfinite(g).all()]
    values = [fun(g.ravel())[0] for g in starts]
    first = int(np.argmin(values))
    res = minimize(fun, starts[first].ravel(), jac=True, method="CG",
                   options={"maxiter": max_iter, "gtol": 1e-10})
    if res.fun < values[0]:
        return res.x.reshape(s, s)
    return start


def lifted(spec: PermutationSpec, plain: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformation of ``spec`` from one of ``spec.without_invertible()``: each invertible map (and its
    dual) the permutation matrix of the within-head permutation of the same name."""
    from combinability.kinds import as_matrix

    out = {}
    for p in spec.perm_names:
        kind = spec.kind(p)
        name = kind.of if isinstance(kind, Dual) else p
        out[p] = as_matrix(plain[name]) if isinstance(spec.kind(name), Invertible) else np.asarray(plain[p])
    return out


def duals(spec: PermutationSpec) -> dict[str, str]:
    """Each :class:`~combinability.kinds.Invertible` name of ``spec`` to its dual's name."""
    return {k.of: p for p, k in spec.kinds.items() if isinstance(k, Dual)}

