"""Many models in one basin: MergeMany, cycle-consistent, hierarchical and reference alignment.

Every method finds one permutation ``π_i`` per model into a shared *universe*; the
returned :class:`~combinability.sets.ModelSet` holds ``T_i = π_0⁻¹ ∘ π_i`` (apply ``π_i``,
then undo ``π_0``), so that member 0 is unchanged, every member computes the same function
as its input, and the map of member ``i`` into member ``j``'s basin,
``π_ij = T_j⁻¹ ∘ T_i`` (:func:`pairwise_permutation`), composes consistently:
``π_jk ∘ π_ij = π_ik`` exactly, for every triple.

Methods
-------
``"reference"``
    Each model matched to model 0 by weight matching (pairwise transitivity, §5.3).
``"mergemany"``
    Ainsworth et al. (2023), MergeMany: in a seeded random order, each model is
    weight-matched to the mean of the others (as aligned), until a round changes nothing.
``"cycle"``
    C2M3-style (Crisostomi et al., 2024): soft permutations of every model into the
    universe, optimised jointly by Frank–Wolfe for ``Σ_{i<j} ⟨π_i(θ_i), π_j(θ_j)⟩`` from the
    reference alignment, then hardened (the better of the two by that objective is kept).
``"hierarchical"``
    Pairwise merges up a binary tree: neighbours are matched and averaged, level by level,
    each right subtree permuted as a whole into its left neighbour's basin.

Symmetry kinds
--------------
``"reference"``, ``"mergemany"`` and ``"hierarchical"`` are built on pairwise weight
matching and work for every kind (heads and experts as block permutations, a residual
stream's orthogonal map, packed axes): with an orthogonal map the members' norms are
folded first (same functions, new parameters) and the transformations compose as maps
(:func:`~combinability.compose_permutations`). ``"cycle"`` relaxes permutation matrices
(Frank–Wolfe on doubly stochastic matrices) and is refused for any other kind, naming the
methods that apply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from combinability.align import PERMUTING_KINDS, check_kinds, spec_kinds
from combinability.errors import ConfigurationError
from combinability.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
)

__all__ = ["METHODS", "align_many", "align_set", "pairwise_permutation", "mergemany", "cycle", "hierarchical",
           "reference", "all_pairs_objective", "METHOD_KINDS", "OPTIONS", "check_method", "check_options"]

Params = dict[str, np.ndarray]


def _spec_params(spec: PermutationSpec, params: Mapping[str, Any]) -> Params:
    return {n: np.asarray(params[n], dtype=np.float64) for n in spec.parameters if n in params}


def _mean(items: Sequence[Params]) -> Params:
    return {n: np.mean([p[n] for p in items], axis=0) for n in items[0]}


def _match(spec: PermutationSpec, target: Params, other: Params, *, init: Mapping[str, Any] | None,
           seed: Any, max_iter: int) -> Permutation:
    from combinability.matching import weight_matching

    return weight_matching(spec, target, other, init=init, seed=seed, max_iter=max_iter)


def all_pairs_objective(spec: PermutationSpec, params: Sequence[Mapping[str, Any]],
                        perms: Sequence[Mapping[str, Any]]) -> float:
    """``Σ_{i<j} ⟨π_i(θ_i), π_j(θ_j)⟩`` over the spec's parameters (what ``"cycle"`` maximises)."""
    moved = [apply_permutation(spec, pm, _spec_params(spec, p)) for p, pm in zip(params, perms, strict=True)]
    total = {n: sum(m[n] for m in moved) for n in moved[0]}
    # Σ_{i<j} ⟨a_i, a_j⟩ = (‖Σ a_i‖² − Σ ‖a_i‖²) / 2
    return float(sum(np.vdot(total[n], total[n]) - sum(np.vdot(m[n], m[n]) for m in moved) for n in total) / 2)


# -- the methods: one permutation per model into a universe ----------------------------------------
def _same(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether two transformations agree (index arrays exactly, orthogonal matrices to rounding)."""
    return all(np.allclose(new[p], old[p], rtol=0.0, atol=1e-9) if np.ndim(new[p]) == 2
               else np.array_equal(new[p], old[p]) for p in old)


def reference(spec: PermutationSpec, params: Sequence[Params], *, seed: int = 0, max_iter: int = 100,
              **_: Any) -> list[Permutation]:
    """Each model weight-matched to model 0."""
    sizes = spec.perm_sizes(params[0])
    return [identity_permutation(sizes, spec)] + [_match(spec, params[0], p, init=None, seed=seed, max_iter=max_iter)
                                            for p in params[1:]]


def mergemany(spec: PermutationSpec, params: Sequence[Params], *, seed: int = 0, max_iter: int = 100,
              rounds: int = 100, **_: Any) -> list[Permutation]:
    """MergeMany: match each model to the mean of the others until a round changes nothing.

    At the returned permutations, every permutation of every model solves its linear
    assignment against the mean of the other models (the fixed point of the procedure),
    unless ``rounds`` ran out first.
    """
    sizes = spec.perm_sizes(params[0])
    perms = [identity_permutation(sizes, spec) for _ in params]
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        changed = False
        for i in rng.permutation(len(params)):
            others = [apply_permutation(spec, perms[j], params[j]) for j in range(len(params)) if j != i]
            new = _match(spec, _mean(others), params[i], init=perms[i], seed=rng, max_iter=max_iter)
            if not _same(new, perms[i]):
                perms[i], changed = new, True
        if not changed:
            break
    return perms


def cycle(spec: PermutationSpec, params: Sequence[Params], *, seed: int = 0, max_iter: int = 100,
          fw_iter: int = 50, **_: Any) -> list[Permutation]:
    """Cycle-consistent matching: Frank–Wolfe on soft universe permutations, from the reference alignment."""
    from combinability.align.sinkhorn import harden, one_hot, soft_apply, soft_apply_grad

    start = reference(spec, params, seed=seed, max_iter=max_iter)
    mats = [one_hot(p) for p in start]
    for t in range(fw_iter):
        moved = [soft_apply(spec, m, p) for m, p in zip(mats, params, strict=True)]
        total = {n: sum(m[n] for m in moved) for n in moved[0]}
        directions = []
        for i, (m, p) in enumerate(zip(mats, params, strict=True)):
            grad = soft_apply_grad(spec, m, p, {n: total[n] - moved[i][n] for n in total})
            directions.append(one_hot(harden(grad)))
        step = 2.0 / (t + 2.0)
        new = [{k: (1 - step) * m[k] + step * d[k] for k in m} for m, d in zip(mats, directions, strict=True)]
        if all(np.allclose(a[k], b[k]) for a, b in zip(mats, new, strict=True) for k in a):
            break
        mats = new
    hard = [Permutation(dict(harden(m))) for m in mats]
    if all_pairs_objective(spec, params, hard) >= all_pairs_objective(spec, params, start):
        return hard
    return start


def hierarchical(spec: PermutationSpec, params: Sequence[Params], *, seed: int = 0, max_iter: int = 100,
                 **_: Any) -> list[Permutation]:
    """Pairwise matches up a binary tree; each right subtree is permuted into its left neighbour's basin."""
    sizes = spec.perm_sizes(params[0])
    perms = [identity_permutation(sizes, spec) for _ in params]
    groups: list[tuple[list[int], Params]] = [([i], p) for i, p in enumerate(params)]
    while len(groups) > 1:
        merged = []
        for k in range(0, len(groups) - 1, 2):
            (left, center_l), (right, center_r) = groups[k], groups[k + 1]
            pi = _match(spec, center_l, center_r, init=None, seed=seed, max_iter=max_iter)
            for m in right:
                perms[m] = compose_permutations(perms[m], pi)
            moved = apply_permutation(spec, pi, center_r)
            w = len(left) / (len(left) + len(right))
            merged.append((left + right, {n: w * center_l[n] + (1 - w) * moved[n] for n in center_l}))
        if len(groups) % 2:
            merged.append(groups[-1])
        groups = merged
    return perms


#: The many-model aligners by name.
METHODS: dict[str, Callable[..., list[Permutation]]] = {
    "mergemany": mergemany, "cycle": cycle, "hierarchical": hierarchical, "reference": reference,
}

#: The symmetry kinds each method handles (see :data:`combinability.plugins.SYMMETRY_KINDS`).
METHOD_KINDS: dict[str, frozenset[str]] = {
    "mergemany": PERMUTING_KINDS, "cycle": frozenset({"neuron"}), "hierarchical": PERMUTING_KINDS,
    "reference": PERMUTING_KINDS,
}


# -- the public entry point ---------------------------------------------------------------------------
def align_many(models: Sequence[Any], method: str = "mergemany", *, example_input: Any = None,
               backend: str | None = None, spec: PermutationSpec | None = None, seed: int = 0,
               max_iter: int = 100, symmetries: str = "all", **options: Any) -> Any:
    """Bring ``models`` into one basin; return the :class:`~combinability.sets.ModelSet` of the aligned members.

    Parameters
    ----------
    models : sequence of native models
        At least two: library-built models, checkpoints loaded with ``cb.load_model``, or a
        user's own ``torch.nn.Module`` / flax ``(module, variables)`` (then pass ``example_input``).
    method : {"mergemany", "cycle", "hierarchical", "reference"}
        See the module documentation.
    example_input : array, optional
        A batch of inputs, to trace a user's own models.
    backend : str, optional
        The models' backend; inferred when omitted.
    spec : PermutationSpec, optional
        The symmetry spec, for models not built from a layer table.
    seed : int
        Seeds the matching (sweep orders, MergeMany's visiting order).
    max_iter : int
        Maximum weight-matching sweeps per match.
    symmetries : {"all", "permutation"}, default "all"
        For a transformer: ``"all"`` aligns heads, neurons and the residual stream's
        orthogonal map (folding the members' norms first: they keep their functions, not
        their parameters); ``"permutation"`` permutes the stream instead (as
        :meth:`ModelSet.align <combinability.sets.ModelSet.align>`).
    **options
        ``rounds`` (MergeMany, default 100, at least 1), ``fw_iter`` (cycle, default 50); any
        other option is refused (it would be ignored). :meth:`ModelSet.align
        <combinability.sets.ModelSet.align>` takes these methods too: ``ms.align("mergemany")``.

    Returns
    -------
    ModelSet
        ``alignment=method``; ``transforms[i]`` maps model ``i`` into model 0's basin
        (``None`` for model 0), ``ms.models`` are the aligned members as native models
        (member 0 is the input model itself, or its norms folded for an orthogonal map) and
        ``ms.merge()`` their average.

    Raises
    ------
    ConfigurationError
        If fewer than two models are given, ``method`` is unknown (the message lists the valid ones),
        an option is unknown or out of range (``max_iter=0``, ``rounds=0``), or the method does not
        handle the models' symmetry kinds (``"cycle"`` on heads, experts or a residual stream; the
        message names the methods that do).
    IncompatibleModelsError
        If the models differ in architecture or shapes.
    """
    from combinability.data.convert import check_seed
    from combinability.sets import ModelSet

    models = list(models)
    if len(models) < 2:
        raise ConfigurationError(f"align_many needs at least two models, got {len(models)}")
    check_method(method)
    seed = check_seed(seed)
    check_options(method, max_iter=max_iter, **options)
    ms = ModelSet(models, backend=backend, spec=spec, example_input=example_input)
    return align_set(ms, method, seed=seed, max_iter=max_iter, symmetries=symmetries, **options)


def check_method(method: Any) -> None:
    """Refuse a name that is no many-model method, listing the valid ones.

    Raises
    ------
    ConfigurationError
        If ``method`` is not a key of :data:`METHODS`.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigurationError(f"unknown align_many method {method!r}; valid: {', '.join(METHODS)}")


#: The options of the many-model methods beyond ``seed`` and ``max_iter``, with their smallest valid values
#: (every method takes them all, as :func:`~combinability.experiments.compare_aligners` passes one set of
#: options to each; a method ignores those of the others).
OPTIONS: dict[str, int] = {"rounds": 1, "fw_iter": 0}


def check_options(method: str, *, max_iter: Any = 100, **options: Any) -> None:
    """Refuse options no many-model method takes, and counts out of range, before any work.

    An option the methods do not know (``restarts=``, a misspelt ``round=``) would otherwise
    be ignored while recorded in the set's ``alignment_settings`` as if it had been used.

    Raises
    ------
    ConfigurationError
        Naming the option and the valid ones, or the count and its range.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"align_many method {method!r} takes no option {', '.join(map(repr, unknown))}; its options are "
            f"seed, max_iter (weight-matching sweeps per match), rounds (MergeMany) and fw_iter (cycle)")
    for name, value in {"max_iter": max_iter, **options}.items():
        low = OPTIONS.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ConfigurationError(f"align_many: {name} must be an integer >= {low}, got {value!r}")


def align_set(ms: Any, method: str, *, seed: int = 0, max_iter: int = 100, symmetries: str = "all",
              **options: Any) -> Any:
    """Align the naive members of the :class:`~combinability.sets.ModelSet` ``ms`` by ``method``.

    What :func:`align_many` and :meth:`ModelSet.align <combinability.sets.ModelSet.align>` (given a
    method of :data:`METHODS`) run, on a set already built: the set of ``ms``'s class (a
    :class:`~combinability.pair.ModelPair` stays one) holding ``T_i(θ_i)``, its naive set
    ``ms.naive`` (or ``ms`` itself while naive).

    Raises
    ------
    ConfigurationError
        For an unknown method, an option out of range, or symmetry kinds the method does not handle.
    """
    from combinability.data.convert import check_seed
    from combinability.sets import alignment_settings

    check_method(method)
    seed = check_seed(seed)
    check_options(method, max_iter=max_iter, **options)
    naive = ms.naive or ms
    spec = naive._alignment_spec(symmetries)
    check_kinds(method, METHOD_KINDS[method], spec, what="align_many method",
                alternatives=[m for m, kinds in METHOD_KINDS.items() if spec_kinds(spec) <= kinds])
    folded = naive._folded_for(spec)
    params = [_spec_params(spec, folded.params(i)) for i in range(len(naive))]
    universe = METHODS[method](spec, params, seed=seed, max_iter=max_iter, **options)
    undo = invert_permutation(universe[0])
    transforms: list[Permutation | None] = [None]
    thetas = [folded.thetas[0]]
    for i in range(1, len(naive)):
        t = compose_permutations(universe[i], undo)
        t.method = method
        transforms.append(t)
        thetas.append(naive.layout.flatten(apply_permutation(spec, t, folded.params(i))))
    return naive._replace(thetas=tuple(thetas), transforms=tuple(transforms), alignment=method, naive=naive,
                          models=folded._natives(thetas), spec=spec, alignment_settings=alignment_settings(
                              method, seed=seed, max_iter=max_iter, symmetries=symmetries, **options))


def pairwise_permutation(ms: Any, i: int, j: int) -> Permutation:
    """The map of member ``i`` (as given) into member ``j``'s basin (as given): ``T_j⁻¹ ∘ T_i``.

    For sets aligned by :func:`align_many` these compose exactly:
    ``compose(pairwise(i, j), pairwise(j, k)) == pairwise(i, k)``.
    """
    sizes = ms.spec.perm_sizes(ms.naive.params(0) if ms.naive is not None else ms.params(0))
    ti = ms.transforms[i] if ms.transforms[i] is not None else identity_permutation(sizes, ms.spec)
    tj = ms.transforms[j] if ms.transforms[j] is not None else identity_permutation(sizes, ms.spec)
    return compose_permutations(ti, invert_permutation(tj))
