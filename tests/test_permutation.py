"""Permutation specs and operations against plain numpy reference networks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import combinability as cb
from combinability import PermutationSpec, PermutationSpecError
from tests import reference_nets as ref


def test_perm_to_axes_is_derived_in_order():
    spec = ref.mlp_spec(3)
    assert spec.perm_to_axes == {
        "P0": [("layers.0.weight", 0), ("layers.0.bias", 0), ("layers.1.weight", 1)],
        "P1": [("layers.1.weight", 0), ("layers.1.bias", 0), ("layers.2.weight", 1)],
    }
    assert spec.perm_names == ("P0", "P1")


def test_flax_convention_puts_axes_where_flax_keeps_them():
    spec = cb.SpecBuilder("flax").conv("c", None, "C").norm("n", "C").dense("d", "C", None).build()
    assert spec.axes_to_perm["c/kernel"] == (None, None, None, "C")
    assert spec.axes_to_perm["n/scale"] == ("C",)
    assert spec.axes_to_perm["d/kernel"] == ("C", None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_function_is_invariant(seed):
    rng = np.random.default_rng(seed)
    params = ref.mlp_params(rng, (7, 9, 8, 3))
    spec = ref.mlp_spec(3)
    perm = cb.random_permutation(spec, params, seed=seed)
    x = rng.normal(size=(5, 7))
    permuted = cb.apply_permutation(spec, perm, params)
    assert not np.allclose(permuted["layers.0.weight"], params["layers.0.weight"])
    np.testing.assert_allclose(ref.mlp_forward(permuted, x, 3), ref.mlp_forward(params, x, 3), rtol=1e-12)


def test_convnet_function_is_invariant():
    rng = np.random.default_rng(3)
    params = ref.convnet_params(rng)
    spec = ref.convnet_spec()
    spec.validate(params)
    perm = cb.random_permutation(spec, params, seed=3)
    x = rng.normal(size=(2, 3, 6, 6))
    np.testing.assert_allclose(ref.convnet_forward(cb.apply_permutation(spec, perm, params), x),
                               ref.convnet_forward(params, x), rtol=1e-10, atol=1e-12)


def test_residual_net_function_is_invariant():
    rng = np.random.default_rng(4)
    params = ref.resnet_params(rng)
    spec = ref.resnet_spec()
    spec.validate(params)
    perm = cb.random_permutation(spec, params, seed=4)
    x = rng.normal(size=(2, 3, 6, 6))
    np.testing.assert_allclose(ref.resnet_forward(cb.apply_permutation(spec, perm, params), x),
                               ref.resnet_forward(params, x), rtol=1e-10, atol=1e-12)


def test_a_wrong_spec_breaks_the_function():
    """The invariance tests above can fail: a residual stream permuted inconsistently changes the output."""
    rng = np.random.default_rng(5)
    params = ref.resnet_params(rng)
    axes = dict(ref.resnet_spec().axes_to_perm)
    axes["b1.conv2.weight"] = ("I1b", "I1", None, None)  # block output not tied to the stream
    axes["b1.norm2.weight"] = ("I1b",)
    axes["b1.norm2.bias"] = ("I1b",)
    spec = PermutationSpec(axes)
    perm = cb.random_permutation(spec, params, seed=5)
    x = rng.normal(size=(2, 3, 6, 6))
    assert not np.allclose(ref.resnet_forward(cb.apply_permutation(spec, perm, params), x),
                           ref.resnet_forward(params, x), atol=1e-6)


def test_apply_semantics_gathers():
    spec = PermutationSpec({"w": ("P", None)})
    w = np.arange(6.0).reshape(3, 2)
    out = cb.apply_permutation(spec, {"P": np.array([2, 0, 1])}, {"w": w})["w"]
    np.testing.assert_array_equal(out, w[[2, 0, 1]])


def test_validate_names_the_fault():
    params = ref.mlp_params(np.random.default_rng(0), (4, 5, 3))
    spec = ref.mlp_spec(2)
    spec.validate(params)
    with pytest.raises(PermutationSpecError, match="do not exist: \\['nope'\\]"):
        PermutationSpec({**spec.axes_to_perm, "nope": (None,)}).validate(params)
    missing = {k: v for k, v in spec.axes_to_perm.items() if k != "layers.1.bias"}
    with pytest.raises(PermutationSpecError, match="misses parameter\\(s\\) \\['layers.1.bias'\\]"):
        PermutationSpec(missing).validate(params)
    bad = {**spec.axes_to_perm, "layers.1.weight": ("P0", None)}  # binds out-axis (3) with P0 (5)
    with pytest.raises(PermutationSpecError, match="'layers.1.weight' axis 0 has size 3.*size 5"):
        PermutationSpec(bad).validate(params)
    with pytest.raises(PermutationSpecError, match="has 1 axes"):
        PermutationSpec({**spec.axes_to_perm, "layers.0.bias": ("P0", None)}).validate(params)
    with pytest.raises(PermutationSpecError, match="tuple"):
        PermutationSpec({"w": "P0"})
    assert isinstance(PermutationSpecError("x"), ValueError)


perm_arrays = st.integers(1, 12).flatmap(
    lambda n: st.permutations(list(range(n))).map(lambda p: np.array(p, dtype=np.int64)))


@settings(max_examples=60, deadline=None)
@given(p=perm_arrays, seed=st.integers(0, 1000))
def test_inverse_and_compose(p, seed):
    n = len(p)
    rng = np.random.default_rng(seed)
    q = rng.permutation(n)
    r = rng.permutation(n)
    spec = PermutationSpec({"w": ("P", None)})
    w = {"w": rng.normal(size=(n, 2))}
    P, Q, R = {"P": p}, {"P": q}, {"P": r}
    back = cb.apply_permutation(spec, cb.invert_permutation(P), cb.apply_permutation(spec, P, w))
    np.testing.assert_array_equal(back["w"], w["w"])
    pq = cb.compose_permutations(P, Q)
    np.testing.assert_array_equal(cb.apply_permutation(spec, pq, w)["w"],
                                  cb.apply_permutation(spec, Q, cb.apply_permutation(spec, P, w))["w"])
    left = cb.compose_permutations(cb.compose_permutations(P, Q), R)
    right = cb.compose_permutations(P, cb.compose_permutations(Q, R))
    np.testing.assert_array_equal(left["P"], right["P"])


def test_random_permutation_is_seeded_and_valid():
    params = ref.mlp_params(np.random.default_rng(0), (4, 50, 3))
    spec = ref.mlp_spec(2)
    a = cb.random_permutation(spec, params, seed=7)
    b = cb.random_permutation(spec, params, seed=7)
    c = cb.random_permutation(spec, params, seed=8)
    np.testing.assert_array_equal(a["P0"], b["P0"])
    assert not np.array_equal(a["P0"], c["P0"])
    assert sorted(a["P0"]) == list(range(50))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 7), min_size=3, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_random_specs_apply_inverse_compose(sizes, seed):
    """Over random MLP specs: apply∘inverse is the identity, compose is associative, function is kept."""
    rng = np.random.default_rng(seed)
    n_layers = len(sizes) - 1
    params = ref.mlp_params(rng, tuple(sizes))
    spec = ref.mlp_spec(n_layers)
    spec.validate(params)
    p, q, r = (cb.random_permutation(spec, params, seed=rng) for _ in range(3))
    back = cb.apply_permutation(spec, cb.invert_permutation(p), cb.apply_permutation(spec, p, params))
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])
    left = cb.compose_permutations(cb.compose_permutations(p, q), r)
    right = cb.compose_permutations(p, cb.compose_permutations(q, r))
    for name in left:
        np.testing.assert_array_equal(left[name], right[name])
    x = rng.normal(size=(3, sizes[0]))
    np.testing.assert_allclose(ref.mlp_forward(cb.apply_permutation(spec, p, params), x, n_layers),
                               ref.mlp_forward(params, x, n_layers), rtol=1e-12, atol=1e-12)


def test_apply_only_some_names_leaves_the_other_axes_as_they_are():
    """``only=`` transforms the axes of the names given and no others (packed segments too)."""
    rng = np.random.default_rng(3)
    spec = PermutationSpec({"w": ("P", ("Q", "R")), "v": ("R", None)})
    params = {"w": rng.normal(size=(4, 5)), "v": rng.normal(size=(3, 2))}
    perm = {"P": rng.permutation(4), "Q": rng.permutation(2), "R": rng.permutation(3)}
    identity = {"P": np.arange(4), "Q": np.arange(2), "R": np.arange(3)}
    for names in (["P"], ["R"], ["Q", "R"]):
        expected = cb.apply_permutation(spec, {**identity, **{q: perm[q] for q in names}}, params)
        got = cb.apply_permutation(spec, perm, params, only=set(names))
        for k in params:
            np.testing.assert_array_equal(got[k], expected[k])


def test_an_array_under_two_names_is_transformed_under_both_and_empty_ones_are_never_taken_for_another():
    from combinability.permutation import apply_permutation

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3))
    spec = PermutationSpec({"w": ("P", None), "z": (None,)})
    params = {"w": w, "alias": w, "copy": w.copy(), "z": np.zeros(0), "extra": np.zeros((0, 3))}
    out = apply_permutation(spec, {"P": np.array([2, 0, 3, 1])}, params)
    np.testing.assert_array_equal(out["w"], w[[2, 0, 3, 1]])
    np.testing.assert_array_equal(out["alias"], out["w"])  # the same memory: one tensor, two names
    np.testing.assert_array_equal(out["copy"], w)  # equal values only: another tensor
    assert out["extra"].shape == (0, 3)  # no memory of its own: not the listed empty "z"
