"""Tests of combinability.metrics against hand-computed values and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from combinability.errors import IncompatibleModelsError, LayoutError, NonFiniteWeightsError, UnknownNameError
from combinability.layout import FlatLayout
from combinability.metrics import (
    AGREEMENT_CATEGORIES,
    agreement_categories,
    agreement_counts,
    edge_length_histogram,
    edge_lengths,
    empirical_barrier,
    loss_barrier,
)
from tests.model_checks import agreement_by_hand


# -- barriers -------------------------------------------------------------------------
def test_loss_barrier_hand_computed():
    # ends 0.2 and 0.4 (mean 0.3), worst point on the path 1.1 -> 0.8
    assert loss_barrier([0.2, 0.7, 1.1, 0.9, 0.4], 0.2, 0.4) == pytest.approx(0.8)
    # a path better than its ends has a negative barrier
    assert loss_barrier([0.1, 0.05], 0.2, 0.4) == pytest.approx(-0.2)
    assert math.isnan(loss_barrier([0.1, float("nan")], 0.2, 0.4))


def test_empirical_barrier_loss_and_accuracy():
    losses = np.array([[0.3, 0.5], [0.9, 0.4]])
    assert empirical_barrier(losses, 0.3, 0.5) == pytest.approx(0.9 - 0.4)
    accuracies = [0.91, 0.87, 0.93]
    assert empirical_barrier(accuracies, 0.92, 0.90, kind="accuracy") == pytest.approx(0.91 - 0.87)
    per_row = empirical_barrier(losses, np.array([0.1, 0.2]), 0.3, axis=1)
    np.testing.assert_allclose(per_row, [0.5 - 0.2, 0.9 - 0.25])


def test_empirical_barrier_errors():
    with pytest.raises(UnknownNameError, match="valid kinds: loss, accuracy"):
        empirical_barrier([0.1], 0.1, 0.1, kind="error")
    with pytest.raises(LayoutError, match="at least one value"):
        empirical_barrier([], 0.1, 0.1)


# -- agreement categories ---------------------------------------------------------------
def test_category_names_are_stable():
    assert AGREEMENT_CATEGORIES == (
        "both_correct", "both_wrong", "a_only_correct", "a_only_wrong",
        "b_only_correct", "b_only_wrong", "neither_correct", "neither_wrong",
    )


@pytest.mark.parametrize("seed", range(5))
def test_agreement_against_a_python_loop(seed):
    rng = np.random.default_rng(seed)
    n, classes = 600, 3  # few classes: every category occurs
    labels = rng.integers(0, classes, n)
    pred_a = np.where(rng.random(n) < 0.7, labels, rng.integers(0, classes, n))
    pred_b = np.where(rng.random(n) < 0.7, labels, rng.integers(0, classes, n))
    pred = np.where(rng.random(n) < 0.5, pred_a, rng.integers(0, classes, n))
    expected = agreement_by_hand(pred.tolist(), pred_a.tolist(), pred_b.tolist(), labels.tolist())
    assert agreement_categories(pred, pred_a, pred_b, labels) == expected
    assert all(v > 0 for v in expected.values())
    # batched: several combined models at once
    batch = np.stack([pred, pred_a, pred_b, labels]).reshape(2, 2, n)
    counts = agreement_counts(batch, pred_a, pred_b, labels)
    assert counts.shape == (2, 2, 8)
    for i in range(2):
        for j in range(2):
            ref = agreement_by_hand(batch[i, j].tolist(), pred_a.tolist(), pred_b.tolist(), labels.tolist())
            assert counts[i, j].tolist() == [ref[c] for c in AGREEMENT_CATEGORIES]


def test_agreement_at_the_ends():
    labels = np.array([0, 1, 2, 2])
    pred_a = np.array([0, 1, 1, 2])
    pred_b = np.array([0, 2, 1, 1])
    counts = agreement_categories(pred_a, pred_a, pred_b, labels)  # the combination is model A
    assert counts == {
        "both_correct": 1, "both_wrong": 1, "a_only_correct": 2, "a_only_wrong": 0,
        "b_only_correct": 0, "b_only_wrong": 0, "neither_correct": 0, "neither_wrong": 0,
    }


def test_agreement_shape_errors():
    with pytest.raises(LayoutError, match="pred_b has shape"):
        agreement_counts([0, 1], [0, 1], [0, 1, 2], [0, 1])
    with pytest.raises(LayoutError, match="pred has shape"):
        agreement_counts([0, 1, 1], [0, 1], [0, 1], [0, 1])
    with pytest.raises(LayoutError, match="integer class labels"):
        agreement_counts([0.5, 1.0], [0, 1], [0, 1], [0, 1])


# -- edge lengths ------------------------------------------------------------------------
def test_edge_lengths_hand_computed():
    np.testing.assert_array_equal(edge_lengths([1.0, -2.0, 3.0], [0.5, 1.0, 3.0]), [0.5, 3.0, 0.0])
    with pytest.raises(IncompatibleModelsError, match="theta_b has shape"):
        edge_lengths(np.zeros(2), np.zeros(3))


def test_histogram_hand_computed():
    hist = edge_length_histogram(np.zeros(5), np.array([0.0, 0.25, -0.5, 0.75, 1.0]), bins=4)
    np.testing.assert_allclose(hist.edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert hist.counts.tolist() == [1, 1, 1, 2]  # the last bin includes 1.0


def make_pair(seed=0):
    params = {"c1.w": np.zeros((4, 3)), "c1.b": np.zeros(4), "c2.w": np.zeros((2, 4)), "head": np.zeros(5)}
    layout = FlatLayout.from_arrays(params, layers={"c1.w": 0, "c1.b": 0, "c2.w": 2, "head": 3})
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(layout.size)
    b = a + rng.standard_normal(layout.size) * rng.uniform(0, 2, layout.size)
    return layout, a, b


def test_histogram_per_layer_against_numpy_per_layer():
    layout, a, b = make_pair()
    hist = edge_length_histogram(a, b, bins=6, layout=layout)
    lengths = np.abs(a - b)
    np.testing.assert_allclose(hist.edges, np.linspace(lengths.min(), lengths.max(), 7))
    assert hist.counts.shape == (4, 6)
    element_layer = np.concatenate([np.full(e.size, e.layer) for e in layout.entries])
    for layer in range(4):
        expected, _ = np.histogram(lengths[element_layer == layer], bins=hist.edges)
        assert hist.counts[layer].tolist() == expected.tolist()
    assert hist.counts[1].sum() == 0  # no parameter in layer 1
    total = edge_length_histogram(a, b, bins=6, layout=layout, per_layer=False)
    assert total.counts.tolist() == hist.counts.sum(axis=0).tolist()


def test_histogram_names_and_range():
    layout, a, b = make_pair(1)
    hist = edge_length_histogram(a, b, bins=3, layout=layout, names=["c1.w", "c2.w"], range=(0.0, 1.0))
    lengths = np.abs(a - b)
    w1, w2 = lengths[layout.slice("c1.w")], lengths[layout.slice("c2.w")]
    assert hist.counts[0].tolist() == np.histogram(w1, bins=3, range=(0, 1))[0].tolist()
    assert hist.counts[2].tolist() == np.histogram(w2, bins=3, range=(0, 1))[0].tolist()
    assert hist.counts[3].sum() == 0  # "head" not selected


def test_histogram_errors():
    layout, a, b = make_pair()
    with pytest.raises(LayoutError, match="needs the layout"):
        edge_length_histogram(a, b, names=["c1.w"])
    with pytest.raises(LayoutError, match="layout expects"):
        edge_length_histogram(a[:-1], b[:-1], layout=layout)
    b[3] = np.nan
    with pytest.raises(NonFiniteWeightsError, match="1 edge lengths"):
        edge_length_histogram(a, b)
