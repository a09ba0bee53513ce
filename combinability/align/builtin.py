"""The built-in aligners: weight matching, activation matching and the identity.

They are plain functions ``aligner(task, **options) -> Permutation``, registered by
name through :mod:`combinability.align.registry` like any plugin's aligner.
"""

from __future__ import annotations

from typing import Any

from combinability.align.base import AlignTask
from combinability.errors import ConfigurationError
from combinability.matching import activation_matching, weight_matching
from combinability.permutation import Permutation, identity_permutation

__all__ = ["weight", "activation", "identity"]


def weight(task: AlignTask, *, restarts: int = 0, max_iter: int = 100, progress: bool = False,
           **_: Any) -> Permutation:
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

    Returns
    -------
    Permutation
        ``method="weight"``, with the objective history of the best run.
    """
    return weight_matching(task.spec, task.reference, task.other, seed=task.seed, restarts=restarts,
                           max_iter=max_iter, progress=progress)


def activation(task: AlignTask, **_: Any) -> Permutation:
    """Activation matching (:func:`combinability.matching.activation_matching`).

    For each permutation, one linear assignment maximising the correlation of the two
    models' activations at its feature point (:meth:`AlignTask.point`).

    Raises
    ------
    ConfigurationError
        If the task has no ``features`` (no data was given).
    """
    if task.features is None:
        raise ConfigurationError("activation matching needs data: pass data=(x, y) or a dataset name")
    perm_points = {p: task.point(p) for p in task.spec.perm_names}
    points = list(dict.fromkeys(perm_points.values()))
    feats_ref = task.features("reference", points)
    feats_other = task.features("other", points)
    missing = [pt for pt in points if pt not in feats_ref or pt not in feats_other]
    if missing:
        raise ConfigurationError(f"the features callable returned no activations for point(s) {missing}")
    return activation_matching({p: feats_ref[pt] for p, pt in perm_points.items()},
                               {p: feats_other[pt] for p, pt in perm_points.items()})


def identity(task: AlignTask, **_: Any) -> Permutation:
    """The identity permutation (no alignment: the naive baseline)."""
    return identity_permutation(task.sizes(), task.spec)
