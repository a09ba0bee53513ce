"""The same sweep on the JAX backend: coefficients drawn and models combined as jax arrays."""

import numpy as np
import pytest

import combinability as cb
from combinability.results import barriers

pytest.importorskip("jax")


@pytest.fixture(scope="module")
def jax_pair():
    a, b = (cb.train("mlp", "digits", backend="jax", seed=s, epochs=4, width=0.25) for s in (0, 1))
    return cb.ModelPair(a, b, backend="jax").align("weight", seed=0)


def test_jax_sweep_ends_and_barrier(jax_pair):
    ds = cb.sweep(jax_pair, cb.Subcube(), data="digits", splits=["test"], values=[0.0, 0.5, 1.0], samples=2)
    loss = ds["loss"].sel(split="test").values
    assert np.all(loss[0] == float(ds["loss_a"].sel(split="test")))
    assert np.all(loss[2] == float(ds["loss_b"].sel(split="test")))
    assert ds.attrs["backend"] == "jax"
    naive = cb.sweep(jax_pair.naive, cb.Subcube(), data="digits", splits=["test"], values=[0.5], samples=2)
    assert (float(barriers(ds)["loss_barrier"].sel(split="test"))
            < float(barriers(naive)["loss_barrier"].sel(split="test")))


def test_torch_and_jax_sweeps_agree_on_the_same_weights(jax_pair):
    """Convert the jax pair's weights to torch and sweep there: same coefficients law, same numbers (fp32)."""
    from combinability.models import build_model

    torch_be = cb.get_backend("torch")
    torch_models = []
    for which in ("a", "b"):
        template = build_model("mlp", backend="torch", width=0.25, num_classes=10, input_shape=(1, 8, 8), seed=0)
        torch_models.append(torch_be.with_state(template, jax_pair.naive.params(which)))  # one naming for both
    torch_pair = cb.ModelPair(*torch_models, backend="torch").align("weight", seed=0)
    for p in jax_pair.permutation:
        np.testing.assert_array_equal(torch_pair.permutation[p], jax_pair.permutation[p])
    kw = dict(data="digits", splits=["test"], values=[0.5])
    lin_jax = cb.sweep(jax_pair, cb.Linear(), **kw)["loss"].values
    lin_torch = cb.sweep(torch_pair, cb.Linear(), **kw)["loss"].values
    np.testing.assert_allclose(lin_jax, lin_torch, rtol=1e-4)
