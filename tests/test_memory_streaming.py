"""Activation statistics streamed over batches (issue 11, item 3).

References are independent: ``np.corrcoef`` on all activations at once (float64), and
planted permutations. Memory is checked by tracemalloc's count of numpy allocations: the
streamed collection's peak does not grow with the number of examples, while collecting
every activation (``Evaluator.features``) does.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from combinability.align.base import AlignTask
from combinability.align.builtin import activation
from combinability.evaluation import CrossMoments
from combinability.permutation import PermutationSpec


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlations of A's units (columns) with B's, by numpy in float64."""
    ua = a.shape[1]
    return np.corrcoef(a.astype(np.float64).T, b.astype(np.float64).T)[:ua, ua:]


def _correlated(rng: np.random.Generator, n: int, ua: int = 6, ub: int = 5) -> tuple[np.ndarray, np.ndarray]:
    base = rng.normal(size=(n, ua))
    a = 50.0 + 3.0 * base  # a large mean: E[ab] - E[a]E[b] would lose digits here
    b = base[:, :ub] @ rng.normal(size=(ub, ub)) + 0.5 * rng.normal(size=(n, ub)) - 20.0
    return a, b


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streamed_correlation_equals_corrcoef(batch: int) -> None:
    a, b = _correlated(np.random.default_rng(0), 1000)
    m = CrossMoments()
    for s in range(0, len(a), batch):
        m.update(a[s : s + batch], b[s : s + batch])
    assert m.count == 1000
    np.testing.assert_allclose(m.correlation(), _reference(a, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(a.T, b.T, bias=True)[:6, 6:], rtol=1e-10, atol=1e-10)


def test_float32_batches_match_corrcoef_at_float_tolerance() -> None:
    a, b = _correlated(np.random.default_rng(1), 5000)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    m = CrossMoments()
    for s in range(0, len(a), 512):
        m.update(a32[s : s + 512], b32[s : s + 512])
    np.testing.assert_allclose(m.correlation(), _reference(a32, b32), rtol=0, atol=2e-5)


def test_convolutional_batches_pool_examples_and_positions() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 3, 4, 5)), rng.normal(size=(12, 2, 4, 5))
    m = CrossMoments()
    for s in range(0, 12, 5):
        m.update(a[s : s + 5], b[s : s + 5])
    flat_a = a.transpose(0, 2, 3, 1).reshape(-1, 3)
    flat_b = b.transpose(0, 2, 3, 1).reshape(-1, 2)
    np.testing.assert_allclose(m.correlation(), _reference(flat_a, flat_b), atol=1e-12)


def test_constant_unit_correlates_zero_and_bad_batches_are_refused() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 3))
    a[:, 1] = 0.0  # a dead ReLU unit
    m = CrossMoments()
    m.update(a, a)
    corr = m.correlation()
    assert np.all(corr[1] == 0) and np.all(corr[:, 1] == 0)
    np.testing.assert_allclose(np.diag(corr)[[0, 2]], 1.0)
    with pytest.raises(ValueError, match="same observations"):
        m.update(a[:10], a[:9])
    with pytest.raises(ValueError, match="same units"):
        m.update(a[:, :2], a)
    with pytest.raises(ValueError, match="no observations"):
        CrossMoments().correlation()


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_of_streaming_does_not_grow_with_examples() -> None:
    units, batch = 64, 256

    def stream(batches: int) -> None:
        rng = np.random.default_rng(0)
        m = CrossMoments()
        for _ in range(batches):  # each batch made, reduced and dropped, as from a forward pass
            x = rng.standard_normal((batch, units), dtype=np.float32)
            m.update(x, x[:, ::-1])
        m.correlation()

    small, large = _peak_bytes(lambda: stream(4)), _peak_bytes(lambda: stream(64))
    all_activations = 64 * batch * units * 4
    assert large < 1.2 * small + 4096
    assert large < all_activations / 4


def _torch_pair():
    pytest.importorskip("torch")
    import combinability as cb
    from combinability.models import build_model

    models = [build_model("tiny10", backend="torch", width=0.25, input_shape=(3, 32, 32), seed=s) for s in (0, 1)]
    return cb.ModelPair(*models)


def _images(n: int, seed: int = 0):
    from combinability.data.base import ArrayDataset

    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n),
                        num_classes=10, name="noise", split="train")


def test_evaluator_correlations_match_corrcoef_for_every_batch_size() -> None:
    from combinability.evaluation import Evaluator

    pair = _torch_pair()
    data = _images(60)
    points = ["act_0", "act_5"]
    full = Evaluator(pair.backend_obj, pair.template, pair.layout, batch_size=60)
    fa, fb = full.features(pair.theta_a, data, points), full.features(pair.theta_b, data, points)
    assert fa["act_0"].shape == (60 * 32 * 32, 4)
    for batch in (7, 60):
        ev = Evaluator(pair.backend_obj, pair.template, pair.layout, batch_size=batch)
        corr = ev.correlations(pair.theta_a, pair.theta_b, data, points)
        for p in points:
            np.testing.assert_allclose(corr[p], _reference(fa[p], fb[p]), atol=2e-5)


def test_evaluator_correlations_hold_no_dataset_of_activations() -> None:
    from combinability.evaluation import Evaluator

    pair = _torch_pair()
    ev = Evaluator(pair.backend_obj, pair.template, pair.layout, batch_size=16)
    points = ["act_0", "act_1"]
    small, large = _images(32), _images(256)
    for d in (small, large):  # device copies of the data, cached, are not what is measured
        ev._data(d)
    streamed = [_peak_bytes(lambda d=d: ev.correlations(pair.theta_a, pair.theta_b, d, points))
                for d in (small, large)]
    held = _peak_bytes(lambda: ev.features(pair.theta_a, large, points))
    assert held > 256 * 32 * 32 * 4 * 4  # tracemalloc sees activations when they are held ...
    assert streamed[1] < 1.2 * streamed[0] + 65536  # ... and streaming holds none of them
    assert streamed[1] < held / 20


def _planted(rng: np.random.Generator, n: int = 400, units: int = 12):
    acts = np.maximum(rng.normal(size=(n, units)), 0).astype(np.float32)
    shuffle = rng.permutation(units)
    other = acts[:, shuffle] + 0.05 * rng.normal(size=(n, units)).astype(np.float32)
    # other's unit j is acts' unit shuffle[j]; the aligned B's unit i must be other's unit inverse[i]
    return acts, other, np.argsort(shuffle)


def test_activation_matching_recovers_a_planted_permutation_from_streamed_or_held_features() -> None:
    rng = np.random.default_rng(4)
    acts, other, expected = _planted(rng)
    spec = PermutationSpec({"w": ("P0", None)})
    params = {"w": np.zeros((12, 3), np.float32)}
    feats = {"reference": {"h": acts}, "other": {"h": other}}
    held = AlignTask(spec, params, params, feature_points={"P0": "h"},
                     features=lambda which, pts: {p: feats[which][p] for p in pts})
    perm = activation(held, batch_size=33)
    np.testing.assert_array_equal(perm["P0"], expected)
    matched = _reference(acts, other)[np.arange(12), expected]
    assert perm.objective == pytest.approx(matched.mean(), abs=1e-6)

    class Streamed:  # a task that offers streamed correlations (no features at all)
        spec, features, point = held.spec, None, held.point

        @staticmethod
        def correlations(points):
            return {p: _reference(feats["reference"][p], feats["other"][p]) for p in points}

    np.testing.assert_array_equal(activation(Streamed())["P0"], expected)
    with pytest.raises(ValueError, match="batch_size"):
        activation(held, batch_size=0)
