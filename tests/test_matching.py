"""Weight matching recovers planted permutations; derangements; activation matching."""

import numpy as np
import pytest

import combinability as cb
from tests import reference_nets as ref


def _plant(spec, params, seed, noise):
    """B = π⁻¹(A) + noise, so that the aligning permutation of B to A is π (planted)."""
    rng = np.random.default_rng(seed)
    planted = cb.random_permutation(spec, params, seed=rng)
    b = cb.apply_permutation(spec, cb.invert_permutation(planted), params)
    b = {k: v + noise * rng.normal(size=v.shape) * np.std(v) for k, v in b.items()}
    return planted, b


def test_recovers_planted_permutation_mlp_3x512():
    rng = np.random.default_rng(0)
    a = ref.mlp_params(rng, (784, 512, 512, 512, 10))
    spec = ref.mlp_spec(4)
    planted, b = _plant(spec, a, 1, noise=0.1)
    perm = cb.weight_matching(spec, a, b, seed=0)
    for p in planted:
        np.testing.assert_array_equal(perm[p], planted[p])
    # objective never decreases and the result beats identity
    assert all(y >= x - 1e-9 for x, y in zip(perm.history, perm.history[1:], strict=False))
    ident = cb.matching_objective(spec, a, b, cb.identity_permutation(spec.perm_sizes(a)))
    assert perm.objective > ident
    assert perm.objective == pytest.approx(cb.matching_objective(spec, a, b, perm))


def test_recovers_planted_permutation_residual_conv():
    rng = np.random.default_rng(2)
    a = ref.resnet_params(rng, c1=24, c2=32)
    spec = ref.resnet_spec()
    planted, b = _plant(spec, a, 3, noise=0.05)
    perm = cb.weight_matching(spec, a, b, seed=0, restarts=1)
    for p in planted:
        np.testing.assert_array_equal(perm[p], planted[p])
    x = rng.normal(size=(2, 3, 6, 6))
    aligned = cb.apply_permutation(spec, perm, b)
    # aligned B is the same function as B, and close to A weight-wise
    np.testing.assert_allclose(ref.resnet_forward(aligned, x), ref.resnet_forward(b, x), rtol=1e-9, atol=1e-12)


def test_seeded_and_deterministic():
    rng = np.random.default_rng(5)
    a = ref.mlp_params(rng, (20, 30, 30, 5))
    b = ref.mlp_params(rng, (20, 30, 30, 5))  # unrelated model: matching is non-trivial
    spec = ref.mlp_spec(3)
    p1 = cb.weight_matching(spec, a, b, seed=11, restarts=2)
    p2 = cb.weight_matching(spec, a, b, seed=11, restarts=2)
    for p in p1:
        np.testing.assert_array_equal(p1[p], p2[p])
    assert p1.history == p2.history
    # restarts keep the best: never worse than the single run from identity with the same seed
    single = cb.weight_matching(spec, a, b, seed=11)
    assert p1.objective >= single.objective - 1e-9


def test_init_and_max_iter():
    rng = np.random.default_rng(6)
    a = ref.mlp_params(rng, (10, 16, 4))
    spec = ref.mlp_spec(2)
    planted, b = _plant(spec, a, 7, noise=0.0)
    perm = cb.weight_matching(spec, a, b, init=planted, max_iter=1)
    np.testing.assert_array_equal(perm["P0"], planted["P0"])
    assert perm.iterations == 1
    with pytest.raises(cb.PermutationSpecError, match="not a permutation"):
        cb.weight_matching(spec, a, b, init={"P0": np.zeros(16, dtype=int)})
    with pytest.raises(cb.IncompatibleModelsError, match="differ in architecture or width"):
        cb.weight_matching(spec, a, ref.mlp_params(rng, (10, 17, 4)))
    bad = dict(b)
    bad["layers.0.bias"] = b["layers.0.bias"].copy()
    bad["layers.0.bias"][0] = np.nan
    with pytest.raises(cb.NonFiniteWeightsError, match="layers.0.bias"):
        cb.weight_matching(spec, a, bad)


def test_random_derangement_has_no_fixed_point():
    rng = np.random.default_rng(0)
    for k in (2, 3, 10, 100):
        for _ in range(20):
            s = cb.random_derangement(k, rng)
            assert sorted(s) == list(range(k))
            assert not np.any(s == np.arange(k))
    with pytest.raises(ValueError, match="at least 2"):
        cb.random_derangement(1, rng)


def test_perturb_rematches_exactly_the_k_lowest():
    base = {"P0": np.array([3, 1, 4, 0, 2, 5]), "P1": np.arange(3)}
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.95])
    out = cb.perturb_permutation(base, "P0", scores, k=3, seed=0)
    lowest = [1, 3, 4]
    changed = np.nonzero(out["P0"] != base["P0"])[0]
    assert sorted(changed) == lowest  # all k re-matched, nothing else touched
    assert sorted(out["P0"][lowest]) == sorted(base["P0"][lowest])
    np.testing.assert_array_equal(out["P1"], base["P1"])
    with pytest.raises(ValueError, match="between 2 and 6"):
        cb.perturb_permutation(base, "P0", scores, k=7)


def test_activation_matching_recovers_permuted_units():
    rng = np.random.default_rng(1)
    acts_a = {"P0": rng.normal(size=(500, 20))}
    planted = rng.permutation(20)
    # B's unit planted[j] carries A's unit j (plus noise): aligning B to A must give planted.
    acts_b = {"P0": np.empty_like(acts_a["P0"])}
    acts_b["P0"][:, planted] = acts_a["P0"] + 0.1 * rng.normal(size=(500, 20))
    perm = cb.activation_matching(acts_a, acts_b)
    np.testing.assert_array_equal(perm["P0"], planted)
    corr = cb.unit_correlations(acts_a["P0"], acts_b["P0"][:, perm["P0"]])
    assert np.all(np.diag(corr) > 0.98)


def test_deranged_random_permutations_move_every_unit_and_catch_a_two_unit_slip():
    import torch

    from combinability.derive import verify_spec
    from combinability.errors import TracingError
    from combinability.kinds import Blocks

    spec = cb.PermutationSpec({"w": ("P", "Q"), "g": ("G",)}, kinds={"Q": Blocks("G", 2, 3)})
    params = {"w": np.zeros((2, 6)), "g": np.zeros(2)}
    for seed in range(20):
        perm = cb.random_permutation(spec, params, seed=seed, derange=True)
        assert not np.any(perm["P"] == np.arange(2)) and not np.any(perm["G"] == np.arange(2))
        inner = perm["Q"].reshape(2, 3) - 3 * perm["G"][:, None]  # each block's units, moved within the block
        assert not np.any(inner == np.arange(3))
    # a net of two hidden units whose spec forgets the second layer's input axis: only a swap shows it
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
    wrong = cb.PermutationSpec({"0.weight": ("P_0", None), "0.bias": ("P_0",), "2.weight": (None, None),
                                "2.bias": (None,)})
    x = torch.randn(5, 3)
    for seed in range(8):  # a uniform draw is the identity for half the seeds; a derangement never
        with pytest.raises(TracingError, match="P_0 binds 0.weight axis 0"):
            verify_spec(cb.get_backend("torch"), net, wrong, x, seed=seed)
