"""The coefficient vectors behind a sweep's evaluations, drawn again (``cb.sweep_coefficients``).

Reference: the combination ``(1 − v) ⊙ θ_A + v ⊙ θ_B`` formed here in numpy from the returned ``v``, loaded
into a copy of the torch module and scored with torch's own cross-entropy, must give the loss the sweep
stored for that cell; and ``v`` must follow the sampler's law.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import combinability as cb
from combinability.data import load_dataset
from combinability.errors import ConfigurationError, IncompatibleModelsError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def models():
    return [cb.train("mlp", "digits", seed=s, epochs=1, width=0.125) for s in (0, 1, 2)]


def _loss(template, layout, theta, data) -> float:
    net = copy.deepcopy(template).eval()
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in layout.unflatten(theta).items()})
    with torch.no_grad():
        logits = net(torch.as_tensor(np.asarray(data.x, np.float32)))
        return float(torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(data.y).long()))


@pytest.mark.parametrize("sampler", [cb.Uniform(), cb.Bernoulli(), cb.Hyperplane()])
def test_a_cells_coefficients_give_the_loss_the_sweep_stored(models, sampler):
    pair = cb.ModelPair(models[0], models[1]).align("weight")
    test = load_dataset("digits", "test")
    values = {"uniform": [0.1, 0.4], "bernoulli": [0.3, 0.6], "hyperplane": [0.2, 0.7]}[sampler.name]
    ds = cb.sweep(pair, sampler, data="digits", values=values, samples=2, splits=["test"])
    for index, value in enumerate(values):
        for sample in (0, 1):
            v = cb.sweep_coefficients(pair, ds, value, sample=sample)
            assert v.shape == pair.theta_a.shape and v.dtype == np.float32
            theta = (1 - v.astype(np.float64)) * pair.theta_a + v * pair.theta_b
            stored = float(ds["loss"].sel(split="test", sample=sample).isel({sampler.parameter: index}))
            assert _loss(pair.template, pair.layout, theta.astype(np.float32), test) == pytest.approx(stored,
                                                                                                     rel=1e-5)
    v = cb.sweep_coefficients(pair, ds, values[1], sample=0)
    if sampler.name == "uniform":  # U[0.5 − s, 0.5 + s]
        assert v.min() >= 0.1 and v.max() <= 0.9 and abs(v.mean() - 0.5) < 0.01
    if sampler.name == "bernoulli":
        assert set(np.unique(v).tolist()) == {0.0, 1.0} and abs(v.mean() - 0.6) < 0.01


def test_three_models_give_both_vectors(models):
    triple = cb.ModelPair(models[0], models[1], model_c=models[2]).align("weight")
    ds = cb.sweep(triple, cb.Triangle(), data="digits", values=[(0.25, 0.25)], samples=1, splits=["test"])
    v_b, v_c = cb.sweep_coefficients(triple, ds, (0.25, 0.25))
    np.testing.assert_allclose(v_b, 0.25)
    np.testing.assert_allclose(v_c, 0.25)


def test_another_pair_a_value_off_the_grid_and_a_result_of_another_kind_are_refused(models):
    pair = cb.ModelPair(models[0], models[1])
    ds = cb.sweep(pair, cb.Uniform(), data="digits", values=[0.25], samples=1, splits=["test"])
    with pytest.raises(IncompatibleModelsError, match="not the sweep's"):
        cb.sweep_coefficients(cb.ModelPair(models[0], models[2]), ds, 0.25)
    with pytest.raises(ConfigurationError, match=r"0.3 is not a value of the sweep's parameter 's'; valid: 0.25"):
        cb.sweep_coefficients(pair, ds, 0.3)
    with pytest.raises(ConfigurationError, match="sample 3 is not one of the sweep's samples"):
        cb.sweep_coefficients(pair, ds, 0.25, sample=3)
    with pytest.raises(ConfigurationError, match="not a sweep's result"):
        cb.sweep_coefficients(pair, cb.experiments.edge_lengths(pair), 0.25)
