"""Sinkhorn re-basin: the soft-permutation numerics against finite differences, a planted permutation, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.align.sinkhorn import (
    harden,
    one_hot,
    sinkhorn,
    sinkhorn_backward,
    soft_apply,
    soft_apply_grad,
)
from combinability.permutation import apply_permutation, random_permutation
from tests.reference_nets import mlp_forward, mlp_params, mlp_spec


def test_sinkhorn_is_doubly_stochastic_and_its_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    logits, weights = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s, trace = sinkhorn(logits, 30)
    np.testing.assert_allclose(s.sum(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(s.sum(axis=1), 1, atol=1e-6)
    grad = sinkhorn_backward(weights, s, trace)
    eps = 1e-6
    for i, j in [(0, 0), (1, 3), (4, 2)]:
        d = np.zeros_like(logits)
        d[i, j] = eps
        up, down = sinkhorn(logits + d, 30)[0], sinkhorn(logits - d, 30)[0]
        numeric = (np.sum(weights * up) - np.sum(weights * down)) / 2 / eps
        assert grad[i, j] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_soft_permutations_act_like_permutations_and_their_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    params = mlp_params(rng, (4, 6, 5, 3))
    spec = mlp_spec(3)
    perm = random_permutation(spec, params, seed=2)
    hard = apply_permutation(spec, perm, params)
    soft = soft_apply(spec, one_hot(perm), params)
    for name in params:
        np.testing.assert_allclose(soft[name], hard[name], atol=1e-12)
    assert {p: v.tolist() for p, v in harden(one_hot(perm)).items()} == {p: v.tolist() for p, v in perm.items()}
    mats = {p: sinkhorn(rng.normal(size=(len(v), len(v))))[0] for p, v in perm.items()}
    grads = {n: rng.normal(size=v.shape) for n, v in params.items()}
    analytic = soft_apply_grad(spec, mats, params, grads)

    def f(m):
        out = soft_apply(spec, m, params)
        return sum(np.sum(grads[n] * out[n]) for n in params)

    eps = 1e-6
    for p in mats:
        for i, j in [(0, 1), (2, 2)]:
            up = {k: v.copy() for k, v in mats.items()}
            down = {k: v.copy() for k, v in mats.items()}
            up[p][i, j] += eps
            down[p][i, j] -= eps
            assert analytic[p][i, j] == pytest.approx((f(up) - f(down)) / 2 / eps, rel=1e-6, abs=1e-9)


def test_sinkhorn_recovers_a_planted_permutation_from_the_identity():
    """B is A with its 32 hidden units per layer shuffled; learned from the identity, the units that are ever
    active on the data are put back, and the midpoint of A and the aligned B computes A's function."""
    a = cb.train("mlp", "digits", backend="torch", seed=0, epochs=6, width=0.0625)
    be = cb.get_backend("torch")
    base = cb.ModelPair(a, a)
    perm = random_permutation(base.spec, base.params(0), seed=3)
    b = be.with_state(a, {**be.state(a), **apply_permutation(base.spec, perm, base.params(0))})
    pair = cb.ModelPair(a, b).align("sinkhorn", data="digits", epochs=5, init="identity", init_scale=1.0,
                                            seed=0)
    x = cb.load_dataset("digits", "train").x.reshape(-1, 64).astype(np.float64)
    pa = {k: v.astype(np.float64) for k, v in pair.params(0).items()}
    pm = {k: v.astype(np.float64) for k, v in pair.layout.unflatten((pair.theta_a + pair.theta_b) / 2).items()}
    np.testing.assert_allclose(mlp_forward(pm, x, 4), mlp_forward(pa, x, 4), rtol=1e-4, atol=1e-4)
    h = x
    alive_total = 0
    for i, name in enumerate(["P_layers.0", "P_layers.1", "P_layers.2"]):
        h = np.maximum(h @ pa[f"layers.{i}.weight"].T + pa[f"layers.{i}.bias"], 0)
        alive = h.max(axis=0) > 0
        alive_total += int(alive.sum())
        np.testing.assert_array_equal(pair.permutation[name][alive], np.argsort(perm[name])[alive])
    assert alive_total >= 48  # most units are alive: the check above is not vacuous
    assert pair.permutation.history[-1] < pair.permutation.history[0]


def test_bad_input_is_refused(digits_models):
    a, b, _ = digits_models
    pair = cb.ModelPair(a, b)
    with pytest.raises(cb.ConfigurationError, match="temperature must be a positive number"):
        pair.align("sinkhorn", data="digits", temperature=0)
    with pytest.raises(cb.ConfigurationError, match="init must be 'weight' or 'identity'"):
        pair.align("sinkhorn", data="digits", init="random")
    with pytest.raises(cb.ConfigurationError, match="'sinkhorn' learns from data"):
        pair.align("sinkhorn")
    with pytest.raises(cb.ConfigurationError, match="batch_size must be an integer >= 1"):
        pair.align("sinkhorn", data="digits", batch_size=0)
