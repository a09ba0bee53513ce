"""The built-in aligners: weight matching, activation matching and the identity.

They are plain functions ``aligner(task, **options) -> Permutation``, registered by
name through :mod:`combinability.align.registry` like any plugin's aligner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from combinability.align.base import AlignTask, blocks_without_points
from combinability.errors import ConfigurationError
from combinability.kinds import Blocks
from combinability.matching import weight_matching
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
    """Activation matching: one assignment per permutation maximising activation correlation.

    For each permutation, one linear assignment maximising the correlation of the two
    models' activations at its feature point (:meth:`AlignTask.point`). The correlations
    are streamed: when the task offers ``correlations(points)`` (the two models run on
    the same batches, reduced to running moments: see
    :meth:`combinability.evaluation.Evaluator.correlations`) no activations are held at
    all; otherwise the ``features`` arrays are reduced ``batch_size`` observations at a
    time in their own float32 (:class:`~combinability.evaluation.CrossMoments`), with no
    float64 copy of them.

    Neuron permutations get one assignment each. Block permutations
    (:class:`~combinability.kinds.Blocks`, a GroupNorm's groups) are assigned together with
    their group, blocks whole and units within blocks
    (:func:`combinability.kind_matching.block_assignment`), when each has a feature point;
    attention heads have none and are refused. A residual stream's orthogonal map is no
    assignment, so :func:`combinability.align.align` refuses such specs first.

    Raises
    ------
    ConfigurationError
        If the task has neither ``correlations`` nor ``features`` (no data was given), or
        a block permutation has no feature point.
    """
    if int(batch_size) < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    streamed = getattr(task, "correlations", None)
    if task.features is None and streamed is None:
        raise ConfigurationError("activation matching needs data: pass data=(x, y) or a dataset name")
    groups = {k.group for k in task.spec.kinds.values() if isinstance(k, Blocks)}
    pointless = blocks_without_points(task.spec, getattr(task, "feature_points", {}))
    if pointless:
        raise ConfigurationError(
            f"activation matching reads each block permutation's units at a feature point, and "
            f"{', '.join(map(repr, pointless[:4]))} have none (attention heads' units live inside the attention); "
            "align these models with 'weight' or 'ste'")
    known = getattr(task, "feature_points", {})
    parts = getattr(task, "part_points", {})
    unseen = [p for p in task.spec.perm_names if known and p not in known and p not in groups and p not in parts
              and not isinstance(task.spec.kinds.get(p), Blocks)]
    if unseen:
        raise ConfigurationError(
            f"activation matching reads each permutation's units at a feature point, and "
            f"{', '.join(map(repr, unseen[:4]))} have none (units inside a layer, as a recurrent layer's lower "
            "layers' hidden units); align these models with 'weight' or 'ste'")
    perm_points = {p: task.point(p) for p in task.spec.perm_names if p not in groups and p not in parts}
    points = list(dict.fromkeys([*perm_points.values(), *(pt for pt, _, _ in parts.values())]))
    corr = streamed(points) if streamed is not None else _correlations_of_features(task, points, int(batch_size))
    missing = [pt for pt in points if pt not in corr]
    if missing:
        raise ConfigurationError(f"the features callable returned no activations for point(s) {missing}")
    # a piece of a point's channels: the correlations among those channels only
    pieces = {p: corr[pt][a:b, a:b] for p, (pt, a, b) in parts.items() if p in task.spec.perm_names}
    return _assign({**{p: corr[pt] for p, pt in perm_points.items()}, **pieces}, task.spec)


def _correlations_of_features(task: AlignTask, points: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Unit correlations of the task's two feature sets, reduced ``batch_size`` rows at a time."""
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
        out[pt] = moments.correlation()
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
    for p, c in corr.items():
        kind = spec.kind(p)
        if isinstance(kind, Blocks):
            members.setdefault(kind.group, {})[p] = (c, kind.size)
        else:
            rows, cols = linear_sum_assignment(c, maximize=True)
            perm[p] = cols[np.argsort(rows)].astype(np.int64)
    for group, costs in members.items():
        perm.update(block_assignment(group, None, costs))
    total = sum(float(c[np.arange(len(c)), perm[p]].sum()) for p, c in corr.items())
    count = sum(len(c) for c in corr.values())
    return Permutation(perm, objective=total / max(count, 1), history=[total / max(count, 1)], method="activation")


def identity(task: AlignTask, **_: Any) -> Permutation:
    """The identity permutation (no alignment: the naive baseline)."""
    return identity_permutation(task.sizes(), task.spec)
