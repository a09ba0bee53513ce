"""ModelSet: N models, model 0 the reference, each with its own transformation into its basin."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.models import build_model
from tests.reference_nets import numpy_evaluation, zoo_forward


@pytest.fixture(scope="module")
def four(digits_models):
    extra = cb.train("mlp", "digits", backend="torch", seed=3, epochs=6, width=0.25)
    return [*digits_models, extra]


def test_every_member_is_aligned_to_model_0_and_keeps_its_function(four):
    ms = cb.ModelSet(four).align("weight", seed=0)
    assert len(ms) == 4 and ms.transforms[0] is None and all(t is not None for t in ms.transforms[1:])
    x = cb.load_dataset("digits", "test").x.astype(np.float64)
    naive = ms.naive
    for i in range(1, 4):
        before = zoo_forward("mlp", {k: v.astype(np.float64) for k, v in naive.params(i).items()}, x)
        after = zoo_forward("mlp", {k: v.astype(np.float64) for k, v in ms.params(i).items()}, x)
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-8)
        # aligning to model 0 brings member i closer to it than it was
        assert np.linalg.norm(ms.theta(i) - ms.theta(0)) < np.linalg.norm(naive.theta(i) - naive.theta(0))
    # member i's transform is exactly the pairwise alignment of model i to model 0
    pair = cb.ModelPair(four[0], four[2]).align("weight", seed=0)
    np.testing.assert_array_equal(ms.theta(2), pair.theta_b)


def test_any_pair_and_triple_is_one_selection_away(four):
    ms = cb.ModelSet(four).align("weight", seed=0)
    pair = ms.pair(0, 3)
    assert isinstance(pair, cb.ModelPair) and pair.is_aligned
    np.testing.assert_array_equal(pair.theta_b, ms.theta(3))
    np.testing.assert_array_equal(pair.naive.theta_b, ms.naive.theta(3))
    triple = ms.select(0, 1, 3)
    test = cb.load_dataset("digits", "test")
    ds = cb.sweep(triple, cb.Triangle(), data="digits", splits=["test"], values=[(0.0, 1.0), (1 / 3, 1 / 3)])
    loss_d, _ = numpy_evaluation(ms.layout, ms.theta(3), test)
    assert float(ds["loss"].values[0, 0, 0]) == pytest.approx(loss_d, rel=1e-5)  # the C corner is member 3
    mid = (ms.theta(0) + ms.theta(1) + ms.theta(3)) / 3
    assert float(ds["loss"].values[0, 1, 0]) == pytest.approx(numpy_evaluation(ms.layout, mid, test)[0], rel=1e-4)
    import json

    # every member's alignment is recorded (B's alone was before); a selection without model 0 says so
    objectives = json.loads(ds.attrs["alignment_objectives"])
    assert objectives[0] is None and objectives[1:] == [ms.transforms[1].objective, ms.transforms[3].objective]
    assert "aligned_through" not in ds.attrs
    later = cb.sweep(ms.select(1, 3), cb.Linear(), data="digits", splits=["test"], values=[0.5])
    assert "not to this selection's first member" in later.attrs["aligned_through"]
    with pytest.raises(cb.ConfigurationError, match="select"):
        cb.sweep(ms, cb.Linear(), data="digits", values=[0.5])
    with pytest.raises(cb.ConfigurationError, match="holds 3 models and Linear combines two"):
        cb.sweep(cb.ModelSet(four[:3]), cb.Linear(), data="digits", values=[0.5])  # not silently its first two


def test_sets_of_different_models_are_refused():
    a = build_model("mlp", width=0.25, num_classes=10, input_shape=(1, 8, 8), seed=0)
    b = build_model("mlp", width=0.125, num_classes=10, input_shape=(1, 8, 8), seed=1)
    c = build_model("tiny10", width=0.25, num_classes=10, input_shape=(1, 8, 8), seed=2)
    with pytest.raises(cb.IncompatibleModelsError, match="models A and B cannot be combined: width"):
        cb.ModelSet([a, b])
    with pytest.raises(cb.IncompatibleModelsError, match="models A and C cannot be combined: architecture"):
        cb.ModelSet([a, a, c])
    with pytest.raises(cb.ConfigurationError, match="at least two"):
        cb.ModelSet([a])
    with pytest.raises(cb.UnknownNameError, match="valid: 0..1"):
        cb.ModelSet([a, a]).theta(5)


def test_transitivity_file_keeps_its_model_labels(digits_triple, tmp_path):
    """§5.3 runs on B and C (both re-based to A); the file written says so, and so does its figure."""
    from combinability import experiments as ex
    from combinability import plots
    from combinability.plots.curves import _end_names

    out = tmp_path / "transitivity.nc"
    ex.transitivity(digits_triple, out=out, data="digits", splits=["test"], values=[0.0, 0.5, 1.0], limit=100)
    saved = cb.open_results(out)
    assert saved.attrs["models"].startswith("lam=0: model B, lam=1: model C")
    assert _end_names(saved, ["a", "b"]) == {"a": "B", "b": "C"}
    # lam = 0 is model B re-based to A: the pair's own aligned B
    test = cb.load_dataset("digits", "test").subset(100)
    loss_b, _ = numpy_evaluation(digits_triple.layout, digits_triple.theta_b, test)
    at_0 = float(saved["loss"].sel(alignment="transitive", split="test").isel(lam=0, sample=0))
    assert at_0 == pytest.approx(loss_b, rel=1e-5)
    plots.plot_sweep(saved, tmp_path / "transitivity.png")
