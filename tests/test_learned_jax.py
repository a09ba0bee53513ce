"""The learned aligners on the jax backend: a planted permutation is recovered through jax's autodiff."""

import numpy as np
import pytest

pytest.importorskip("jax")

import combinability as cb  # noqa: E402
from combinability.permutation import apply_permutation, random_permutation  # noqa: E402


def _planted(width, seed=3):
    be = cb.get_backend("jax")
    a = cb.train("mlp", "digits", backend="jax", seed=0, epochs=6, width=width)
    base = cb.ModelPair(a, a)
    perm = random_permutation(base.spec, base.params(0), seed=seed)
    b = be.with_state(a, {**be.state(a), **apply_permutation(base.spec, perm, base.params(0))})
    return a, b, {p: np.argsort(v) for p, v in perm.items()}


def test_ste_on_jax_recovers_a_planted_permutation():
    a, b, truth = _planted(0.25)
    pair = cb.ModelPair(a, b).align("ste", data="digits", epochs=1, init="identity", seed=0)
    for p, idx in truth.items():
        np.testing.assert_array_equal(pair.permutation[p], idx)
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)


def test_learned_alignments_of_one_model_compile_its_gradient_step_once():
    """The training loss is one function per array namespace: a second STE run (and Sinkhorn's) reuses
    the compiled value-and-grad of the first instead of compiling the model again."""
    from combinability_jax.backend import _PROGRAMS

    a, b, _ = _planted(0.125)

    def compiled():
        return sum(p.value_and_grad._cache_size() for p in _PROGRAMS.get(a, {}).values())

    cb.ModelPair(a, b).align("ste", data="digits", epochs=1, init="identity", seed=0)
    first = compiled()
    assert first >= 1
    cb.ModelPair(a, b).align("ste", data="digits", epochs=1, init="identity", seed=1)
    cb.ModelPair(a, b).align("sinkhorn", data="digits", epochs=1, init="identity", seed=0)
    assert compiled() == first


def test_sinkhorn_on_jax_learns_what_it_learns_on_torch_from_the_same_weights():
    """A torch-trained MLP and its planted shuffle, loaded into jax models: both backends' Sinkhorn runs take the
    same steps (same objective history, same permutation), and the permutation puts the live units back."""
    from combinability.models import build_model

    torch_model = cb.train("mlp", "digits", backend="torch", seed=0, epochs=6, width=0.0625)
    params = cb.ModelPair(torch_model, torch_model).params(0)
    results = {}
    for backend in ("torch", "jax"):
        be = cb.get_backend(backend)
        m = torch_model if backend == "torch" else build_model("mlp", backend="jax", width=0.0625,
                                                               input_shape=(1, 8, 8))
        m = be.with_state(m, {**be.state(m), **params})
        base = cb.ModelPair(m, m)
        perm = random_permutation(base.spec, base.params(0), seed=3)
        b = be.with_state(m, {**be.state(m), **apply_permutation(base.spec, perm, base.params(0))})
        results[backend] = cb.ModelPair(m, b).align("sinkhorn", data="digits", epochs=5, init="identity",
                                                   init_scale=1.0, seed=0).permutation
    np.testing.assert_allclose(results["jax"].history, results["torch"].history, rtol=1e-4)
    for p in perm:
        np.testing.assert_array_equal(results["jax"][p], results["torch"][p])
    x = cb.load_dataset("digits", "train").x.reshape(-1, 64).astype(np.float64)
    pa = {k: v.astype(np.float64) for k, v in params.items()}
    h = x
    for i, name in enumerate(["P_layers.0", "P_layers.1", "P_layers.2"]):
        h = np.maximum(h @ pa[f"layers.{i}.weight"].T + pa[f"layers.{i}.bias"], 0)
        alive = h.max(axis=0) > 0
        np.testing.assert_array_equal(results["jax"][name][alive], np.argsort(perm[name])[alive])
