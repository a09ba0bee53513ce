"""align_many: N models in one basin (MergeMany, cycle, hierarchical, reference), ms.models and ms.merge()."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import combinability as cb
from combinability.align.many import mergemany, pairwise_permutation
from combinability.models import build_model
from combinability.permutation import compose_permutations
from tests.reference_nets import mlp_params, mlp_spec, zoo_forward


@pytest.fixture(scope="module")
def four(digits_models):
    return [*digits_models, cb.train("mlp", "digits", backend="torch", seed=3, epochs=6, width=0.25)]


@pytest.mark.parametrize("method", ["mergemany", "cycle", "hierarchical", "reference"])
def test_every_member_keeps_its_function_and_member_0_is_unchanged(four, method):
    ms = cb.align_many(four, method=method, seed=0)
    assert isinstance(ms, cb.ModelSet) and len(ms) == 4 and ms.alignment == method
    assert ms.transforms[0] is None and ms.models[0] is four[0]
    np.testing.assert_array_equal(ms.theta(0), ms.naive.theta(0))
    x = cb.load_dataset("digits", "test").x.astype(np.float64)
    for i, model in enumerate(ms.models):
        assert isinstance(model, torch.nn.Module)
        state = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
        before = zoo_forward("mlp", {k: v.astype(np.float64) for k, v in ms.naive.params(i).items()}, x)
        np.testing.assert_allclose(zoo_forward("mlp", state, x), before, rtol=1e-6, atol=1e-8)
    # aligned, the members are closer to one another than before
    spread = [sum(np.linalg.norm(s.theta(i) - s.theta(j)) for i, j in itertools.combinations(range(4), 2))
              for s in (ms.naive, ms)]
    assert spread[1] < spread[0]


def test_cycle_pairwise_maps_compose_exactly_for_every_triple(four):
    ms = cb.align_many(four, method="cycle", seed=0)
    for i, j, k in itertools.permutations(range(4), 3):
        composed = compose_permutations(pairwise_permutation(ms, i, j), pairwise_permutation(ms, j, k))
        direct = pairwise_permutation(ms, i, k)
        for p in direct:
            np.testing.assert_array_equal(composed[p], direct[p])
        # and the map of i into j's basin takes the given model i onto aligned member i, seen from j
    for i, j in itertools.permutations(range(4), 2):
        moved = cb.apply_permutation(ms.spec, pairwise_permutation(ms, i, j), ms.naive.params(i))
        back = cb.apply_permutation(ms.spec, ms.transforms[j] or {p: np.arange(len(v)) for p, v in
                                                                  ms.transforms[1].items()}, moved)
        for name, value in ms.params(i).items():
            np.testing.assert_array_equal(back[name], value)


def _cost(params, mean, perms, i, layer):
    """``C[a, b] = ⟨unit a of the mean, unit b of model i⟩``, hidden layer ``layer`` of a 3-layer MLP, in numpy."""
    p = params[i]
    w_in = p[f"layers.{layer}.weight"]
    if layer > 0:
        w_in = w_in[:, perms[f"P{layer - 1}"]]
    w_out = p[f"layers.{layer + 1}.weight"]
    if layer + 1 < 2:
        w_out = w_out[perms[f"P{layer + 1}"]]
    b = p[f"layers.{layer}.bias"]
    m_in, m_b, m_out = mean[f"layers.{layer}.weight"], mean[f"layers.{layer}.bias"], mean[f"layers.{layer + 1}.weight"]
    return m_in @ w_in.T + np.outer(m_b, b) + m_out.T @ w_out


def _moved(p, perms):
    """A 3-layer MLP's parameters with hidden units reordered by ``perms`` (unit j becomes unit perms[j])."""
    p0, p1 = perms["P0"], perms["P1"]
    return {"layers.0.weight": p["layers.0.weight"][p0], "layers.0.bias": p["layers.0.bias"][p0],
            "layers.1.weight": p["layers.1.weight"][p1][:, p0], "layers.1.bias": p["layers.1.bias"][p1],
            "layers.2.weight": p["layers.2.weight"][:, p1], "layers.2.bias": p["layers.2.bias"]}


def test_mergemany_stops_at_its_fixed_point():
    """At the result, each hidden layer of each model solves its assignment against the mean of the others."""
    rng = np.random.default_rng(0)
    params = [mlp_params(rng, (5, 7, 6, 3)) for _ in range(4)]
    perms = mergemany(mlp_spec(3), params, seed=0)
    moved = [_moved(p, pm) for p, pm in zip(params, perms, strict=True)]
    changed = sum(int(np.any(pm[p] != np.arange(len(pm[p])))) for pm in perms for p in pm)
    assert changed > 0
    for i in range(4):
        mean = {n: np.mean([moved[j][n] for j in range(4) if j != i], axis=0) for n in moved[0]}
        for layer in (0, 1):
            cost = _cost(params, mean, perms[i], i, layer)
            rows, cols = linear_sum_assignment(cost, maximize=True)
            best = cost[rows, cols].sum()
            now = cost[np.arange(len(cost)), perms[i][f"P{layer}"]].sum()
            assert now == pytest.approx(best, rel=1e-9)


def test_hierarchical_of_two_is_weight_matching(digits_models):
    a, b, _ = digits_models
    ms = cb.align_many([a, b], method="hierarchical", seed=0)
    pair = cb.ModelPair(a, b).align("weight", seed=0)
    np.testing.assert_array_equal(ms.theta(1), pair.theta_b)


def test_merge_averages_the_aligned_members(four):
    ms = cb.align_many(four, method="mergemany", seed=0)
    merged = ms.merge()
    assert isinstance(merged, torch.nn.Module)
    state = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    for name in state:
        np.testing.assert_allclose(state[name], np.mean([ms.params(i)[name] for i in range(4)], axis=0),
                                   rtol=1e-6, atol=1e-7)
    test = cb.load_dataset("digits", "test")
    logits = zoo_forward("mlp", {k: v.astype(np.float64) for k, v in state.items()}, test.x.astype(np.float64))
    assert np.mean(logits.argmax(axis=1) == test.y) > 0.5
    with pytest.raises(cb.ConfigurationError, match="has no BatchNorm"):
        ms.merge(repair="reset", repair_data="digits")


def test_user_modules_come_back_as_user_modules():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3)) for _ in range(3)]
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    ms = cb.align_many(nets, method="cycle", example_input=x)
    for given, aligned in zip(nets, ms.models, strict=True):
        assert type(aligned) is torch.nn.Sequential
        with torch.no_grad():
            np.testing.assert_allclose(aligned(torch.as_tensor(x)).numpy(), given(torch.as_tensor(x)).numpy(),
                                       rtol=1e-5, atol=1e-6)
    assert isinstance(ms.merge(), torch.nn.Sequential)


def test_bad_input_is_refused_before_matching(digits_models):
    a = digits_models[0]
    with pytest.raises(cb.ConfigurationError, match="align_many needs at least two models, got 1"):
        cb.align_many([a])
    with pytest.raises(cb.ConfigurationError, match="unknown align_many method 'average'; valid: mergemany"):
        cb.align_many([a, a], method="average")
    narrow = build_model("mlp", width=0.125, num_classes=10, input_shape=(1, 8, 8), seed=1)
    with pytest.raises(cb.IncompatibleModelsError, match="cannot be combined: width"):
        cb.align_many([a, narrow])
