"""Barriers, functional agreement and edge lengths (paper §3, §6.1, §6.2).

Numpy in, numpy out. Losses and accuracies are per-model scalars produced by a
backend's evaluation; predictions are integer labels, one per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from combinability.data.base import IGNORE_INDEX
from combinability.errors import IncompatibleModelsError, LayoutError, NonFiniteWeightsError, UnknownNameError
from combinability.layout import FlatLayout

__all__ = [
    "AGREEMENT_CATEGORIES",
    "BARRIER_KINDS",
    "EdgeLengthHistogram",
    "loss_barrier",
    "empirical_barrier",
    "agreement_counts",
    "agreement_categories",
    "edge_lengths",
    "edge_length_histogram",
]

#: Kinds of :func:`empirical_barrier`: for losses the worst value is the largest, for accuracies the smallest.
BARRIER_KINDS = ("loss", "accuracy")

#: The eight categories of §6.1, in the order of :func:`agreement_counts`. ``both``: the combined
#: model predicts what A *and* B predict; ``a_only``: what A predicts but B does not; ``b_only``:
#: what B predicts but A does not; ``neither``: something else. ``correct``/``wrong``: whether the
#: combined model's prediction is the true label.
AGREEMENT_CATEGORIES = (
    "both_correct",
    "both_wrong",
    "a_only_correct",
    "a_only_wrong",
    "b_only_correct",
    "b_only_wrong",
    "neither_correct",
    "neither_wrong",
)


# -- barriers ---------------------------------------------------------------------
def loss_barrier(losses_along_path: Any, loss_a: float, loss_b: float) -> float:
    """Loss barrier (Definition 3.1): ``max(losses along the path) − (L(A) + L(B)) / 2``.

    Parameters
    ----------
    losses_along_path : array-like of float
        Losses of the interpolated models (e.g. ``Linear().grid``); may include the ends.
    loss_a, loss_b : float
        Losses of the two end models.

    Returns
    -------
    float
        A NaN loss anywhere gives NaN.

    Examples
    --------
    >>> loss_barrier([0.1, 0.5, 0.3], 0.1, 0.3)
    0.3
    """
    return float(empirical_barrier(losses_along_path, loss_a, loss_b, kind="loss"))


def empirical_barrier(
    values: Any,
    end_a: Any,
    end_b: Any,
    kind: str = "loss",
    axis: int | tuple[int, ...] | None = None,
) -> Any:
    """Empirical loss or accuracy barrier of a sample of combinations (Definition 3.3).

    ``kind="loss"``: ``max(values) − (end_a + end_b) / 2``;
    ``kind="accuracy"``: ``(end_a + end_b) / 2 − min(values)``. Positive means the worst
    combination is worse than the average of the two end models.

    Parameters
    ----------
    values : array-like
        Losses (or accuracies) of the combined models.
    end_a, end_b : float or array-like
        Those of models A and B (broadcast against the reduced ``values``).
    kind : {"loss", "accuracy"}
    axis : int or tuple of int, optional
        Axes to take the worst value over; all by default.

    Returns
    -------
    float or numpy.ndarray
        NaN where a value is NaN.

    Raises
    ------
    UnknownNameError
        If ``kind`` is not one of :data:`BARRIER_KINDS`.
    LayoutError
        If ``values`` is empty.

    Examples
    --------
    >>> empirical_barrier([0.9, 0.8, 0.85], 0.9, 0.92, kind="accuracy")
    0.10999999999999999
    """
    if kind not in BARRIER_KINDS:
        raise UnknownNameError(f"unknown barrier kind {kind!r}; valid kinds: {', '.join(BARRIER_KINDS)}")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise LayoutError("an empirical barrier needs at least one value, got an empty array")
    mean_ends = (np.asarray(end_a, dtype=np.float64) + np.asarray(end_b, dtype=np.float64)) / 2.0
    if kind == "loss":
        out = np.max(values, axis=axis) - mean_ends
    else:
        out = mean_ends - np.min(values, axis=axis)
    return float(out) if np.ndim(out) == 0 else out


# -- functional agreement (§6.1) ----------------------------------------------------
def _labels(label: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise LayoutError(f"{label} must hold integer class labels, got dtype {arr.dtype}")
    return arr


def agreement_counts(pred: Any, pred_a: Any, pred_b: Any, labels: Any) -> np.ndarray:
    """Counts of the eight agreement categories of §6.1, in :data:`AGREEMENT_CATEGORIES` order.

    Parameters
    ----------
    pred : int array of shape ``(..., n)``
        Predicted labels of one or several combined models.
    pred_a, pred_b, labels : int arrays of shape ``(n,)``
        Predictions of models A and B and the true labels; targets labelled
        :data:`~combinability.data.base.IGNORE_INDEX` (``-100``) are not counted.

    Returns
    -------
    numpy.ndarray of int64, shape ``(..., 8)``
        Each row sums to ``n`` (less the targets not counted).

    Raises
    ------
    LayoutError
        If the arrays do not have matching lengths or are not integer labels.

    Examples
    --------
    >>> agreement_counts([0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 2, 3]).tolist()
    [1, 0, 0, 1, 1, 0, 1, 0]
    """
    pred = _labels("pred", pred)
    pred_a, pred_b, labels = (_labels(n, x) for n, x in (("pred_a", pred_a), ("pred_b", pred_b), ("labels", labels)))
    n = labels.shape[0] if labels.ndim == 1 else -1
    for name, arr in (("pred_a", pred_a), ("pred_b", pred_b), ("labels", labels)):
        if arr.ndim != 1 or arr.shape[0] != n:
            raise LayoutError(f"{name} has shape {arr.shape}; pred_a, pred_b and labels must share one shape (n,)")
    if pred.ndim == 0 or pred.shape[-1] != n:
        raise LayoutError(f"pred has shape {pred.shape}; its last axis must have the {n} examples of labels")
    keep = labels != IGNORE_INDEX
    if not keep.all():
        pred, pred_a, pred_b, labels = pred[..., keep], pred_a[keep], pred_b[keep], labels[keep]
    match_a = pred == pred_a
    match_b = pred == pred_b
    wrong = pred != labels
    # both: 0, a_only: 1, b_only: 2, neither: 3; then correct: +0, wrong: +1
    code = 4 * ~match_a + 2 * ~match_b + wrong
    batch = pred.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    offsets = (np.arange(rows, dtype=np.int64) * 8).reshape(*batch, 1) if batch else 0
    counts = np.bincount((code + offsets).reshape(-1), minlength=8 * rows)
    return counts.reshape(*batch, 8)


def agreement_categories(pred: Any, pred_a: Any, pred_b: Any, labels: Any) -> dict[str, Any]:
    """:func:`agreement_counts` as a dict ``{category: count}`` (ints; arrays for batched ``pred``).

    Examples
    --------
    >>> agreement_categories([0, 1], [0, 1], [0, 0], [0, 0])["a_only_wrong"]
    1
    """
    counts = agreement_counts(pred, pred_a, pred_b, labels)
    if counts.ndim == 1:
        return {name: int(c) for name, c in zip(AGREEMENT_CATEGORIES, counts, strict=True)}
    return {name: counts[..., i] for i, name in enumerate(AGREEMENT_CATEGORIES)}


# -- edge lengths (§6.2) ------------------------------------------------------------
def edge_lengths(theta_a: Any, theta_b: Any) -> np.ndarray:
    """Edge lengths ``|θ_A − θ_B|`` of the hyperrectangle spanned by two models.

    Examples
    --------
    >>> edge_lengths([1.0, -2.0], [0.5, 1.0]).tolist()
    [0.5, 3.0]
    """
    a, b = np.asarray(theta_a), np.asarray(theta_b)
    if a.shape != b.shape:
        raise IncompatibleModelsError(f"theta_a has shape {a.shape}, theta_b has shape {b.shape}")
    return np.abs(a - b)


class EdgeLengthHistogram(NamedTuple):
    """Result of :func:`edge_length_histogram`.

    Attributes
    ----------
    counts : numpy.ndarray of int64
        Shape ``(bins,)``, or ``(num_layers, bins)`` per layer.
    edges : numpy.ndarray of float64, shape ``(bins + 1,)``
        Bin edges shared by every layer (the last bin includes its right edge).
    """

    counts: np.ndarray
    edges: np.ndarray


def edge_length_histogram(
    theta_a: Any,
    theta_b: Any,
    bins: int | Sequence[float] = 50,
    layout: FlatLayout | None = None,
    *,
    per_layer: bool | None = None,
    names: Sequence[str] | None = None,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name
) -> EdgeLengthHistogram:
    """Histogram of the edge lengths ``|θ_A − θ_B|`` (Figure 13), optionally per layer.

    Parameters
    ----------
    theta_a, theta_b : flat arrays of the same shape
    bins : int or sequence of float, default 50
        As in :func:`numpy.histogram`.
    layout : FlatLayout, optional
        Gives the layer of each element; with it the histogram is per layer by default.
    per_layer : bool, optional
        Count each layer separately (needs ``layout``); default: whether ``layout`` is given.
    names : sequence of str, optional
        Only count these parameters (needs ``layout``), e.g. the weights but not the biases.
    range : (float, float), optional
        As in :func:`numpy.histogram`; lengths outside are not counted.

    Returns
    -------
    EdgeLengthHistogram
        ``(counts, edges)``; ``counts[l]`` is layer ``l``'s histogram when per layer.

    Raises
    ------
    IncompatibleModelsError
        If the vectors differ in shape.
    LayoutError
        If ``layout`` does not fit the vectors, or ``names``/``per_layer`` are used without it.
    NonFiniteWeightsError
        If a weight is NaN or infinite.

    Examples
    --------
    >>> import numpy as np
    >>> h = edge_length_histogram(np.zeros(4), np.array([0.1, 0.2, 0.9, 1.0]), bins=2)
    >>> h.counts.tolist(), h.edges.tolist()
    ([2, 2], [0.1, 0.55, 1.0])
    """
    lengths = edge_lengths(theta_a, theta_b).reshape(-1)
    per_layer = layout is not None if per_layer is None else per_layer
    if layout is None and (per_layer or names is not None):
        raise LayoutError("a per-layer histogram or a selection of names needs the layout")
    layers = None
    if layout is not None:
        if lengths.shape != (layout.size,):
            raise LayoutError(f"the vectors have {lengths.size} elements, the layout expects {layout.size}")
        layers = layout.layer_index()
        if names is not None:
            keep = np.zeros(layout.size, dtype=bool)
            for name in names:
                keep[layout.slice(name)] = True
            lengths, layers = lengths[keep], layers[keep]
    if not np.all(np.isfinite(lengths)):
        raise NonFiniteWeightsError(f"{int(np.sum(~np.isfinite(lengths)))} edge lengths are NaN or infinite")
    edges = np.histogram_bin_edges(lengths, bins=bins, range=range)
    if not per_layer:
        return EdgeLengthHistogram(np.histogram(lengths, bins=edges)[0].astype(np.int64), edges)
    nbins = edges.size - 1
    index = np.searchsorted(edges, lengths, side="right") - 1
    index[lengths == edges[-1]] = nbins - 1  # the last bin is closed
    inside = (index >= 0) & (index < nbins)
    flat = layers[inside].astype(np.int64) * nbins + index[inside]
    counts = np.bincount(flat, minlength=layout.num_layers * nbins).reshape(layout.num_layers, nbins)
    return EdgeLengthHistogram(counts.astype(np.int64), edges)
