"""Tests of combinability.combination against hand-computed values and plain numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import combinability.combination as combine_module
from combinability.combination import combine, combine3, combine3_into, combine_into
from combinability.errors import IncompatibleModelsError, LayoutError


def bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    return x.view({4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def test_hand_computed_values():
    a = np.array([0.0, 1.0, 2.0, -4.0])
    b = np.array([4.0, 5.0, 6.0, 4.0])
    assert combine(a, b, 0.25).tolist() == [1.0, 2.0, 3.0, -2.0]
    assert combine(a, b, np.array([0.0, 1.0, 0.5, 2.0])).tolist() == [0.0, 5.0, 4.0, 12.0]
    assert combine(a, b, -1.0).tolist() == [-4.0, -3.0, -2.0, -12.0]  # extrapolation
    c = np.array([8.0, 1.0, -2.0, 0.0])
    assert combine3(a, b, c, 0.5, 0.25).tolist() == [4.0, 3.0, 3.0, 1.0]
    assert combine3(a, b, c, np.array([0.0, 1.0, 0.0, 0.5]), 0.5).tolist() == [4.0, 5.0, 0.0, 2.0]


def reference2(a, b, v):
    """The definition, evaluated by numpy in one go."""
    return (1 - v) * a + v * b


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 3 * combine_module._NUMPY_BLOCK + 7),  # across several CPU blocks
    seed=st.integers(0, 2**31),
    scalar=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_matches_the_formula_across_blocks(d, seed, scalar, dtype):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, d)).astype(dtype)
    v = float(rng.uniform(-1, 2)) if scalar else rng.uniform(-1, 2, d).astype(dtype)
    expected = reference2(a, b, v)
    out = combine(a, b, v)
    assert out.dtype == dtype and np.array_equal(out, expected)
    buffer = np.empty_like(a)
    assert combine_into(buffer, a, b, v) is buffer and np.array_equal(buffer, expected)


def test_small_blocks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(1)
    a, b, c = rng.standard_normal((3, 1001)).astype(np.float32)
    v_b, v_c = rng.uniform(0, 0.5, (2, 1001)).astype(np.float32)
    expected2 = reference2(a, b, v_b)
    expected3 = (1 - v_b - v_c) * a + v_b * b + v_c * c
    monkeypatch.setattr(combine_module, "_NUMPY_BLOCK", 64)
    assert np.array_equal(combine(a, b, v_b), expected2)
    assert np.array_equal(combine3(a, b, c, v_b, v_c), expected3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ends_are_bitwise_exact(dtype):
    rng = np.random.default_rng(2)
    a, b, c = (rng.standard_normal(6000) * 10.0 ** rng.integers(-8, 8, 6000)).astype(dtype).reshape(3, -1)
    d = a.shape[0]
    for zero, one in [(0.0, 1.0), (np.zeros(d, dtype), np.ones(d, dtype))]:
        assert np.array_equal(bits(combine(a, b, zero)), bits(a))
        assert np.array_equal(bits(combine(a, b, one)), bits(b))
        assert np.array_equal(bits(combine3(a, b, c, zero, zero)), bits(a))
        assert np.array_equal(bits(combine3(a, b, c, one, zero)), bits(b))
        assert np.array_equal(bits(combine3(a, b, c, zero, one)), bits(c))
    mixed = (np.arange(d) % 2).astype(dtype)  # a Bernoulli-like vertex
    assert np.array_equal(bits(combine(a, b, mixed)), bits(np.where(mixed == 1, b, a)))


def test_combine_into_may_overwrite_an_input():
    rng = np.random.default_rng(3)
    a, b, v = rng.standard_normal((3, 70_001)).astype(np.float32)
    expected = reference2(a, b, v)
    out = combine_into(a, a, b, v)
    assert out is a and np.array_equal(a, expected)
    a2, b2, c2 = rng.standard_normal((3, 100)).astype(np.float32)
    expected3 = (1 - 0.25 - 0.5) * a2 + 0.25 * b2 + 0.5 * c2
    assert np.array_equal(combine3_into(c2, a2, b2, c2, 0.25, 0.5), expected3.astype(np.float32))


def test_multidimensional_arrays():
    a = np.arange(6.0).reshape(2, 3)
    b = np.full((2, 3), 10.0)
    np.testing.assert_array_equal(combine(a, b, 0.5), (a + b) / 2)
    out = np.empty((2, 3))
    np.testing.assert_array_equal(combine_into(out, a, b, np.full((2, 3), 0.1)), 0.9 * a + 1.0)


def test_shape_and_library_errors():
    a, b = np.zeros(3), np.zeros(4)
    with pytest.raises(IncompatibleModelsError, match=r"theta_b has shape \(4,\), theta_a has shape \(3,\)"):
        combine(a, b, 0.5)
    with pytest.raises(IncompatibleModelsError, match="theta_c"):
        combine3(a, a, b, 0.1, 0.1)
    with pytest.raises(LayoutError, match=r"coefficient v has shape \(2,\)"):
        combine(a, a, np.zeros(2))
    with pytest.raises(LayoutError, match="coefficient v_c"):
        combine3(a, a, a, 0.1, np.zeros(5))
    with pytest.raises(LayoutError, match="out has shape"):
        combine_into(np.zeros(2), a, a, 0.5)
    torch = pytest.importorskip("torch")
    with pytest.raises(IncompatibleModelsError, match="different libraries"):
        combine(a, torch.zeros(3, dtype=torch.float64), 0.5)


def test_torch_arrays():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    a, b, v = rng.standard_normal((3, 1000)).astype(np.float32)
    ta, tb, tv = (torch.from_numpy(x.copy()) for x in (a, b, v))
    out = combine(ta, tb, tv)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference2(a, b, v), rtol=1e-6, atol=1e-6)
    assert torch.equal(combine(ta, tb, 0.0), ta) and torch.equal(combine(ta, tb, 1.0), tb)
    buffer = torch.empty(1000)
    assert combine_into(buffer, ta, tb, 0.3) is buffer
    np.testing.assert_allclose(buffer.numpy(), reference2(a, b, 0.3), rtol=1e-6, atol=1e-6)
    assert torch.equal(combine3(ta, tb, tv, 0.0, 1.0), tv)


def test_jax_arrays_are_never_written():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(5)
    a, b, v = rng.standard_normal((3, 1000)).astype(np.float32)
    ja, jb, jv = jnp.asarray(a), jnp.asarray(b), jnp.asarray(v)
    out = combine(ja, jb, jv)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference2(a, b, v), rtol=1e-6, atol=1e-6)
    assert np.array_equal(bits(np.asarray(combine(ja, jb, 1.0))), bits(b))
    buffer = jnp.zeros(1000, jnp.float32)
    result = combine_into(buffer, ja, jb, jv)
    assert np.all(np.asarray(buffer) == 0)  # immutable: a new array comes back
    np.testing.assert_allclose(np.asarray(result), reference2(a, b, v), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(combine3_into(buffer, ja, jb, jv, 0.5, 0.5)), 0.5 * b + 0.5 * v, rtol=1e-6, atol=1e-6
    )


def test_a_registered_compiler_combines_immutable_arrays_in_one_compiled_call():
    """Jax arrays go through the formula compiled once by the registered compiler (jax.jit: no
    full-size temporaries), with the same values and v = 0 / 1 still giving A / B bit for bit."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    compiled: list[str] = []

    def compiler(formula):
        compiled.append(formula.__name__)
        return jax.jit(formula)

    saved = dict(combine_module._COMPILERS)
    try:
        combine_module.register_compiler("jax.numpy", compiler)
        rng = np.random.default_rng(6)
        a, b, v = rng.standard_normal((3, 1000)).astype(np.float32)
        ja, jb, jv = jnp.asarray(a), jnp.asarray(b), jnp.asarray(v)
        for _ in range(2):
            np.testing.assert_allclose(np.asarray(combine(ja, jb, jv)), reference2(a, b, v), rtol=1e-6, atol=1e-6)
        assert np.array_equal(bits(np.asarray(combine(ja, jb, jnp.zeros(1000)))), bits(a))
        assert np.array_equal(bits(np.asarray(combine(ja, jb, jnp.ones(1000)))), bits(b))
        assert np.array_equal(bits(np.asarray(combine(ja, jb, 1.0))), bits(b))
        np.testing.assert_allclose(np.asarray(combine3(ja, jb, jv, 0.25, 0.5)), 0.25 * a + 0.25 * b + 0.5 * v,
                                   rtol=1e-6, atol=1e-6)
        assert compiled == ["_formula2", "_formula3"]  # each formula compiled once, then reused
    finally:
        combine_module._COMPILERS.clear()
        combine_module._COMPILERS.update(saved)
        combine_module._COMPILED.clear()
