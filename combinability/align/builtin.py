"""The built-in aligners: weight matching, activation matching and the identity.

They are plain functions ``aligner(task, **options) -> Permutation``, registered by
name through :mod:`combinability.align.registry` like any plugin's aligner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from combinability.align.base import AlignTask, blocks_without_points
from combinability.errors import ConfigurationError, UnknownNameError
from combinability.kinds import Blocks, Orthogonal
from combinability.matching import weight_matching
from combinability.observation import Piece
from combinability.permutation import Permutation, PermutationSpec, identity_permutation

__all__ = ["weight", "activation", "identity"]


def weight(task: AlignTask, *, restarts: int = 0, max_iter: int = 100, progress: bool = False,
           backend: Any = None, **_: Any) -> Permutation:
    """Git Re-Basin weight matching (:func:`combinability.matching.weight_matching`).

    Parameters
    ----------
    task : AlignTask
    restarts : int, default 0
        Extra runs from random initial permutations; the best is kept.
    max_iter : int, default 100
        Maximum number of coordinate-descent sweeps per run.
    progress : bool, default False
        Show a progress line with each sweep's objective (see :func:`weight_matching`).
    backend : str or Backend, optional
        Compute the cost matrices with this backend's arrays on its device (``"torch"`` on
        a GPU); default numpy on the CPU (see :func:`weight_matching`).

    Returns
    -------
    Permutation
        ``method="weight"``, with the objective history of the best run.
    """
    return weight_matching(task.spec, task.reference, task.other, seed=task.seed, restarts=restarts,
                           max_iter=max_iter, progress=progress, backend=backend)


def activation(task: AlignTask, *, batch_size: int = 4096, **_: Any) -> Permutation:
    """Activation matching: each transformation fitted to the two models' activations on the same data.

    Each name's units are read at its observations (``task.observations``, found by
    :func:`combinability.observation.observe_model`: for attention heads, MLP neurons and a
    residual stream every piece of every output that holds them; else its feature point or a
    piece of one). The statistics are streamed: when the task offers ``moments``
    or ``correlations`` (the two models run on the same batches, reduced to running moments:
    see :meth:`combinability.evaluation.Evaluator.moments`) no activations are held at all;
    otherwise the ``features`` arrays are reduced ``batch_size`` observations at a time in
    their own float32 (:class:`~combinability.evaluation.CrossMoments`).

    * A neuron permutation is the linear assignment maximising the correlation of its
      units, summed over its observations (a head's query and key units both).
    * Block permutations (:class:`~combinability.kinds.Blocks`: attention heads, a GroupNorm's
      groups) are assigned together with their group, blocks whole and units within blocks
      (:func:`combinability.kind_matching.block_assignment`), as Verma & Elbayad (2024) match heads.
    * An orthogonal map (a residual stream, :class:`~combinability.kinds.Orthogonal`) is the
      orthogonal Procrustes solution ``Q = U Vᵀ`` of ``Σ E[h_A h_Bᵀ] = U S Vᵀ`` over its
      observations (each normalised by ``√(E‖h_A‖² E‖h_B‖²)`` so that every point counts alike),
      which minimises ``Σ E‖h_A − Q h_B‖²``; with ``fix_ones`` within the maps that fix the
      all-ones vector. Orthogonal maps need second moments: the task's ``moments`` or ``features``.

    Raises
    ------
    ConfigurationError
        If the task has neither ``moments``, ``correlations`` nor ``features`` (no data was
        given), a block permutation or an orthogonal map has no observation, or an orthogonal map
        is asked of a task that offers correlations only.
    """
    if int(batch_size) < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    moments = getattr(task, "moments", None)
    streamed = getattr(task, "correlations", None)
    if task.features is None and streamed is None and moments is None:
        raise ConfigurationError("activation matching needs data: pass data=(x, y) or a dataset name")
    spec = task.spec
    groups = {k.group for k in spec.kinds.values() if isinstance(k, Blocks)}
    observed = getattr(task, "observations", {})
    pointless = [p for p in blocks_without_points(spec, getattr(task, "feature_points", {})) if p not in observed]
    if pointless:
        raise ConfigurationError(
            f"activation matching reads each block permutation's units at a feature point, and "
            f"{', '.join(map(repr, pointless[:4]))} have none (attention heads' units live inside the attention); "
            "align these models with 'weight' or 'ste'")
    rotations = [p for p in spec.perm_names if isinstance(spec.kinds.get(p), Orthogonal)]
    unobserved = [p for p in rotations if p not in observed]
    if unobserved:
        raise ConfigurationError(
            f"activation matching fits an orthogonal map to the activations it moves, and no output of this model "
            f"was found to hold {', '.join(map(repr, unobserved[:4]))}'s units; align with symmetries='permutation' "
            "or with 'weight'")
    known = getattr(task, "feature_points", {})
    parts = getattr(task, "part_points", {})
    unseen = [p for p in spec.perm_names if known and p not in known and p not in groups and p not in parts
              and p not in observed and not isinstance(spec.kinds.get(p), Blocks)]
    if unseen:
        raise ConfigurationError(
            f"activation matching reads each permutation's units at a feature point, and "
            f"{', '.join(map(repr, unseen[:4]))} have none (units inside a layer, as a recurrent layer's lower "
            "layers' hidden units); align these models with 'weight' or 'ste'")
    pieces = {p: _observations(task, p, observed, parts) for p in spec.perm_names if p not in groups or p in observed}
    points = list(dict.fromkeys(piece.point for ps in pieces.values() for piece in ps))
    if rotations and moments is None and task.features is None:
        raise ConfigurationError("activation matching fits orthogonal maps to second moments of the activations, and "
                                 "this task offers correlations only: give it moments or features")
    try:
        if moments is not None:
            stats: dict[str, Any] = moments(points)
        elif rotations or streamed is None:
            stats = _moments_of_features(task, points, int(batch_size))
        else:
            stats = streamed(points)
    except UnknownNameError as exc:  # a feature point the model's outputs do not have
        raise ConfigurationError(
            f"activation matching reads each permutation's units at a feature point, and this model's cannot all be "
            f"read ({exc}); align these models with 'weight' or 'ste'") from None
    missing = [pt for pt in points if pt not in stats]
    if missing:
        raise ConfigurationError(f"the features callable returned no activations for point(s) {missing}")
    corr = {pt: s if isinstance(s, np.ndarray) else s.correlation() for pt, s in stats.items()}
    costs = {p: sum(piece.cost(corr[piece.point]) for piece in ps) / len(ps)
             for p, ps in pieces.items() if p not in rotations}
    perm = _assign(costs, spec)
    for p in rotations:
        perm[p] = _procrustes([(stats[piece.point], piece) for piece in pieces[p]], fix_ones=spec.kind(p).fix_ones)
    return perm


def _observations(task: AlignTask, name: str, observed: Any, parts: Any) -> tuple[Piece, ...]:
    """The pieces of feature points at which ``name``'s units are read (``stop`` None: to the end)."""
    if name in observed:
        return tuple(Piece(*piece) for piece in observed[name])
    if name in parts:
        return (Piece(*parts[name]),)
    return (Piece(task.point(name), 0, None),)


def _procrustes(stats: list[tuple[Any, Piece]], *, fix_ones: bool) -> np.ndarray:
    """The orthogonal ``Q`` maximising ``Σ tr(Qᵀ M_k)`` over the normalised second moments ``M_k`` of the pieces
    (restricted to ``Q 1 = 1`` with ``fix_ones``)."""
    total: np.ndarray | None = None
    for moments, piece in stats:
        if piece.times != 1:
            raise ConfigurationError(f"an orthogonal map observed at {piece.point!r} through repeated units: "
                                     "activation matching fits rotations to units observed one by one")
        a, b = piece.start, piece.stop
        m = moments.second_moment()[a:b, a:b]
        energy_a = float((moments.m2_a / moments.count + moments.mean_a ** 2)[a:b].sum())
        energy_b = float((moments.m2_b / moments.count + moments.mean_b ** 2)[a:b].sum())
        m = m / np.sqrt(max(energy_a * energy_b, 1e-300))
        total = m if total is None else total + m
    assert total is not None  # every rotation has an observation (checked by the caller)
    if fix_ones:
        from combinability.kinds import ones_complement

        n = total.shape[0]
        basis = ones_complement(n)
        u, _, vt = np.linalg.svd(basis.T @ total @ basis)
        return np.full((n, n), 1.0 / n) + basis @ (u @ vt) @ basis.T
    u, _, vt = np.linalg.svd(total)
    return u @ vt


def _moments_of_features(task: AlignTask, points: list[str], batch_size: int) -> dict[str, Any]:
    """Running moments (:class:`~combinability.evaluation.CrossMoments`) of the task's two feature sets,
    reduced ``batch_size`` rows at a time."""
    from combinability.errors import IncompatibleModelsError
    from combinability.evaluation import CrossMoments

    feats_ref = task.features("reference", points)
    feats_other = task.features("other", points)
    out = {}
    for pt in points:
        if pt not in feats_ref or pt not in feats_other:
            continue
        a, b = np.asarray(feats_ref[pt]), np.asarray(feats_other[pt])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
            raise IncompatibleModelsError(f"activations at {pt!r} must be (observations, units) with the same "
                                          f"observations, got {a.shape} and {b.shape}")
        moments = CrossMoments()
        for s in range(0, a.shape[0], batch_size):
            moments.update(a[s : s + batch_size], b[s : s + batch_size])
        out[pt] = moments
    return out


def _assign(corr: dict[str, np.ndarray], spec: PermutationSpec) -> Permutation:
    """One maximum-correlation assignment per permutation (``objective``: mean matched correlation).

    The members of a block group (:class:`~combinability.kinds.Blocks`: a GroupNorm's groups)
    are assigned together, blocks whole and units within blocks
    (:func:`combinability.kind_matching.block_assignment`).
    """
    from scipy.optimize import linear_sum_assignment

    from combinability.kind_matching import block_assignment

    perm: dict[str, np.ndarray] = {}
    members: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
    groups = {k.group for k in spec.kinds.values() if isinstance(k, Blocks)}
    for p, c in corr.items():
        kind = spec.kind(p)
        if isinstance(kind, Blocks):
            members.setdefault(kind.group, {})[p] = (c, kind.size)
        elif p not in groups:
            rows, cols = linear_sum_assignment(c, maximize=True)
            perm[p] = cols[np.argsort(rows)].astype(np.int64)
    for group, costs in members.items():  # a group observed itself (grouped key/value heads): its own cost too
        perm.update(block_assignment(group, corr.get(group), costs))
    total = sum(float(c[np.arange(len(c)), perm[p]].sum()) for p, c in corr.items())
    count = sum(len(c) for c in corr.values())
    return Permutation(perm, objective=total / max(count, 1), history=[total / max(count, 1)], method="activation")


def identity(task: AlignTask, **_: Any) -> Permutation:
    """The identity permutation (no alignment: the naive baseline)."""
    return identity_permutation(task.sizes(), task.spec)
