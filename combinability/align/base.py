"""What an aligner is given (:class:`AlignTask`) and what it is (:data:`Aligner`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from combinability.permutation import Permutation, PermutationSpec

__all__ = ["AlignTask", "Aligner", "Features"]

#: ``features(which, points) -> {point: array (n_observations, units)}`` with ``which`` in
#: ``{"reference", "other"}``: the two models' activations at the named feature points,
#: for the same inputs.
Features = Callable[[str, Sequence[str]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class AlignTask:
    """What an aligner gets: find T such that T(other) lives in reference's basin.

    Parameters
    ----------
    spec : PermutationSpec
        Which permutation acts on which axis of which parameter (reference names and axes).
    reference : mapping of str to numpy.ndarray
        Model 0's named arrays (reference convention); it is left as it is.
    other : mapping of str to numpy.ndarray
        The model to transform, same names and shapes.
    seed : int
        Seeds any randomness of the aligner.
    feature_points : mapping of str to str
        Permutation name to the feature point whose units it permutes (the point passed
        to ``features``); a permutation missing here is looked up under its own name.
    features : callable, optional
        ``features("reference" | "other", points) -> {point: array (n, units)}``: both
        models' activations on the same inputs; ``None`` when no data was given.
    part_points : mapping of str to (str, int, int)
        Permutation name to ``(point, start, stop)`` for a permutation that reorders only the
        channels ``start:stop`` of its feature point (a piece of a stream between zero channels).
    correlations : callable, optional
        ``correlations(points) -> {point: array (units, units)}``: the Pearson correlation
        of every reference unit with every other unit, streamed over the data without
        holding activations (:meth:`combinability.evaluation.Evaluator.correlations`);
        ``None`` when no data was given.
    observations : mapping of str to tuple of Piece
        Name to every piece of a point's units that it reorders
        (:class:`~combinability.observation.Piece`: ``(point, start, stop[, times, interleaved])``), for the
        names read at several outputs or at none of their own: attention heads' query/key and
        value units, a residual stream (:func:`combinability.observation.observed_units`).
    moments : callable, optional
        ``moments(points) -> {point: CrossMoments}``: as ``correlations``, the running moments
        themselves (:meth:`combinability.evaluation.Evaluator.moments`), from which an orthogonal
        map is fitted; ``None`` when no data was given.

    Notes
    -----
    The aligner returns ``π`` such that ``apply_permutation(spec, π, other)`` is the
    transformed model: its unit ``j`` of permutation ``P`` is ``other``'s unit ``π[P][j]``.
    """

    spec: PermutationSpec
    reference: Mapping[str, np.ndarray]
    other: Mapping[str, np.ndarray]
    seed: int = 0
    feature_points: Mapping[str, str] = field(default_factory=dict)
    features: Features | None = None
    correlations: Callable[[Sequence[str]], dict[str, np.ndarray]] | None = None
    part_points: Mapping[str, tuple[str, int, int]] = field(default_factory=dict)
    observations: Mapping[str, tuple[tuple[Any, ...], ...]] = field(default_factory=dict)
    moments: Callable[[Sequence[str]], dict[str, Any]] | None = None

    def point(self, perm_name: str) -> str:
        """The feature point of permutation ``perm_name`` (its own name when none is given)."""
        return self.feature_points.get(perm_name, perm_name)

    def blocks_without_points(self) -> list[str]:
        """The block permutations (:class:`~combinability.kinds.Blocks`) with no feature point.

        A GroupNorm's groups are read at their layer's output; an attention head's query,
        key and value units at the outputs :attr:`observations` lists, when it lists them.
        """
        return [p for p in blocks_without_points(self.spec, self.feature_points) if p not in self.observations]

    def sizes(self) -> dict[str, int]:
        """Size of each permutation of :attr:`spec`, read off :attr:`reference`."""
        return self.spec.perm_sizes(self.reference)


def blocks_without_points(spec: PermutationSpec, feature_points: Mapping[str, str]) -> list[str]:
    """The names of ``spec``'s block permutations missing from ``feature_points``."""
    from combinability.kinds import Blocks

    return [p for p, k in spec.kinds.items() if isinstance(k, Blocks) and p not in feature_points]


#: An aligner: ``aligner(task, **options) -> Permutation``. It must accept (and may
#: ignore) keyword options it does not know.
Aligner = Callable[..., Permutation]
