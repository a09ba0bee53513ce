"""Tests of the coefficient samplers (combinability.samplers).

References are written independently of the code under test: literal tables from the
paper, closed forms, scipy quadrature and Kolmogorov-Smirnov tests, plain numpy picks.
"""

from __future__ import annotations

import math

import numpy as np
import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from combinability import hookspecs
from combinability.backend import NumpyRandom
from combinability.combination import combine, combine3
from combinability.errors import LayoutError, SamplerError, UnknownNameError
from combinability.layout import FlatLayout
from combinability.samplers import (
    SAMPLERS,
    Bernoulli,
    Box,
    DrawContext,
    Hyperplane,
    Linear,
    MinMax,
    Stitch,
    Subcube,
    Triangle,
    Uniform,
    get_sampler,
    truncated_exponential_mean,
    truncated_exponential_rate,
)
from combinability.samplers import registry as sampler_registry

F32_EPS = float(np.finfo(np.float32).eps)


def make_layout(sizes, layers=None) -> FlatLayout:
    params = {f"p{i}": np.zeros(n, np.float32) for i, n in enumerate(sizes)}
    return FlatLayout.from_arrays(params, layers=layers)


def numpy_ctx(d: int, seed: int = 0, **kwargs) -> DrawContext:
    return DrawContext(make_layout([d]), NumpyRandom(seed), **kwargs)


def bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint64)


# -- random sources of the other frameworks (as their backends would give) ---------
class TorchRandom:
    def __init__(self, seed: int) -> None:
        import torch

        self.torch = torch
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, shape, dtype=None):
        return self.torch.rand(shape, generator=self.generator, dtype=dtype or self.torch.float32)


class JaxRandom:
    def __init__(self, seed: int) -> None:
        import jax

        self.jax = jax
        self.key = jax.random.key(seed)

    def uniform(self, shape, dtype=None):
        self.key, sub = self.jax.random.split(self.key)
        return self.jax.random.uniform(sub, shape, dtype=dtype or self.jax.numpy.float32)


# -- the paper's table: names, parameters, ranges -------------------------------------
PAPER = {
    # name: (class, parameter, range, deterministic, models)
    "uniform": (Uniform, "s", (0.0, 0.5), False, 2),
    "subcube": (Subcube, "lam", (0.0, 1.0), False, 2),
    "hyperplane": (Hyperplane, "alpha", (0.0, 1.0), False, 2),
    "bernoulli": (Bernoulli, "p", (0.0, 1.0), False, 2),
    "linear": (Linear, "lam", (0.0, 1.0), True, 2),
    "stitch": (Stitch, "layer", None, True, 2),
    "minmax": (MinMax, "lam", (0.0, 1.0), True, 2),
    "box": (Box, "s", (0.0, 0.5), False, 2),
    "triangle": (Triangle, ("lam_b", "lam_c"), None, True, 3),
}
SCALAR = [n for n, row in PAPER.items() if row[2] is not None]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_class_attributes_and_registry(name):
    cls, parameter, _, deterministic, models = PAPER[name]
    assert SAMPLERS[name] is cls
    assert cls.name == name
    assert cls.parameter == parameter
    assert cls.deterministic is deterministic
    assert cls.models == models
    assert type(get_sampler(name.upper())) is cls


def test_registry_has_exactly_the_paper_samplers():
    assert set(SAMPLERS) >= set(PAPER)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(sampler_registry)
    (registered,) = pm.hook.combinability_register_samplers()
    assert {cls.name for cls in registered} == set(PAPER)


@pytest.mark.parametrize("name", SCALAR)
def test_default_grid_is_25_equidistant_values(name):
    lo, hi = PAPER[name][2]
    grid = get_sampler(name).grid
    assert grid.shape == (25,)
    assert grid[0] == lo and grid[-1] == hi
    np.testing.assert_allclose(np.diff(grid), (hi - lo) / 24, rtol=1e-12)


def test_linear_extrapolation_grid_and_range():
    lin = Linear(start=-1, stop=2)
    np.testing.assert_allclose(lin.grid, [-1 + 3 * i / 24 for i in range(25)])
    assert lin.bounds == (-1.0, 2.0)
    v = lin.draw(-0.75, numpy_ctx(5))
    assert v.tolist() == [-0.75] * 5
    with pytest.raises(SamplerError, match=r"Linear: lam=-0.75 is outside \[0, 1\]"):
        Linear().draw(-0.75, numpy_ctx(5))


def test_stitch_grid_needs_the_layers():
    layout = make_layout([3, 2, 4], layers={"p0": 0, "p1": 1, "p2": 4})
    assert Stitch().grid_for(layout).tolist() == [0, 1, 2, 3, 4, 5]
    assert Stitch(num_layers=3).grid.tolist() == [0, 1, 2, 3]
    with pytest.raises(SamplerError, match="grid_for"):
        _ = Stitch().grid


def test_triangle_grid_is_every_lattice_point_of_the_triangle():
    for r in (1, 4, 10):
        grid = Triangle(resolution=r).grid
        expected = {(i / r, j / r) for i in range(r + 1) for j in range(r + 1) if i + j <= r}
        assert {tuple(p) for p in grid.tolist()} == expected
        assert len(grid) == len(expected) == (r + 1) * (r + 2) // 2
        for point in grid:  # every grid point is valid
            Triangle(resolution=r).validate(tuple(point))


# -- support of every draw (hypothesis over layouts and values) -----------------------
def reference_support(name: str, x: float) -> tuple[float, float]:
    return {
        "uniform": lambda s: (0.5 - s, 0.5 + s),
        "subcube": lambda lam: (0.0, 2 * lam) if lam <= 0.5 else (2 * lam - 1, 1.0),
        "hyperplane": lambda a: (0.0, 1.0),
        "bernoulli": lambda p: (0.0, 1.0),
        "linear": lambda lam: (lam, lam),
        "minmax": lambda lam: (0.0, 1.0),
        "box": lambda s: (-s, s),
    }[name](x)


sizes_strategy = st.lists(st.integers(1, 40), min_size=1, max_size=5)


@pytest.mark.parametrize("name", SCALAR)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), sizes=sizes_strategy, seed=st.integers(0, 2**32 - 1))
def test_draws_lie_in_the_support(name, data, sizes, seed):
    lo, hi = PAPER[name][2]
    value = data.draw(st.floats(lo, hi), label="value")
    layout = make_layout(sizes)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(layout.size).astype(np.float32)
    b = rng.standard_normal(layout.size).astype(np.float32)
    ctx = DrawContext(layout, NumpyRandom(seed), theta_a=a, theta_b=b)
    v = get_sampler(name).draw(value, ctx)
    assert isinstance(v, np.ndarray) and v.shape == (layout.size,) and v.dtype == np.float32
    low, high = reference_support(name, value)
    tol = 2 * F32_EPS
    assert v.min() >= low - tol and v.max() <= high + tol
    if name == "bernoulli":
        assert set(np.unique(v).tolist()) <= {0.0, 1.0}
    if name == "minmax":  # per element one of 0, λ, 1 − λ (ties: 0)
        assert np.all((v == 0) | np.isclose(v, value, atol=1e-6) | np.isclose(v, 1 - value, atol=1e-6))


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_strategy, point=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_triangle_draws_constant_pairs(sizes, point):
    lam_b, lam_c = point
    if lam_b + lam_c > 1:
        lam_b, lam_c = 1 - lam_b, 1 - lam_c  # reflect into the triangle
    layout = make_layout(sizes)
    v_b, v_c = Triangle().draw((lam_b, lam_c), DrawContext(layout, NumpyRandom(0)))
    assert v_b.shape == v_c.shape == (layout.size,)
    assert np.all(v_b == np.float32(lam_b)) and np.all(v_c == np.float32(lam_c))


# -- ends: value 0 is model A, value 1 is model B, bitwise ----------------------------
ENDS = [
    # (sampler, value, expected v, which model)
    (Subcube(), 0.0, 0.0, "a"),
    (Subcube(), 1.0, 1.0, "b"),
    (Hyperplane(), 0.0, 0.0, "a"),
    (Hyperplane(), 1.0, 1.0, "b"),
    (Bernoulli(), 0.0, 0.0, "a"),
    (Bernoulli(), 1.0, 1.0, "b"),
    (Linear(), 0.0, 0.0, "a"),
    (Linear(), 1.0, 1.0, "b"),
    (Linear(start=-1, stop=2), 0.0, 0.0, "a"),
    (Linear(start=-1, stop=2), 1.0, 1.0, "b"),
    (Box(), 0.0, 0.0, "a"),
    (Stitch(), 0, 0.0, "a"),
    (Stitch(), 3, 1.0, "b"),  # the layout below has 3 layers
    (Stitch(lower="a"), 0, 1.0, "b"),  # A below the cut: no layer of A at l = 0
    (Stitch(lower="a"), 3, 0.0, "a"),
]


@pytest.mark.parametrize(("sampler", "value", "expected", "model"), ENDS)
def test_ends_give_the_models_bitwise(sampler, value, expected, model):
    layout = make_layout([7, 20, 5])
    rng = np.random.default_rng(3)
    a = rng.standard_normal(layout.size).astype(np.float32)
    b = rng.standard_normal(layout.size).astype(np.float32)
    v = sampler.draw(value, DrawContext(layout, NumpyRandom(1), theta_a=a, theta_b=b))
    assert np.all(v == expected)
    out = combine(a, b, v)
    assert np.array_equal(bits(out), bits(a if model == "a" else b))


@pytest.mark.parametrize(("point", "model"), [((0.0, 0.0), "a"), ((1.0, 0.0), "b"), ((0.0, 1.0), "c")])
def test_triangle_corners_give_the_models_bitwise(point, model):
    layout = make_layout([33])
    a, b, c = np.random.default_rng(4).standard_normal((3, layout.size)).astype(np.float32)
    v_b, v_c = Triangle().draw(point, DrawContext(layout, NumpyRandom(0)))
    out = combine3(a, b, c, v_b, v_c)
    assert np.array_equal(bits(out), bits({"a": a, "b": b, "c": c}[model]))


def test_uniform_at_zero_is_the_midpoint():
    v = Uniform().draw(0.0, numpy_ctx(100))
    assert np.all(v == 0.5)


# -- distributions ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sampler", "value", "low", "high"),
    [(Uniform(), 0.3, 0.2, 0.8), (Uniform(), 0.5, 0.0, 1.0), (Subcube(), 0.2, 0.0, 0.4),
     (Subcube(), 0.85, 0.7, 1.0), (Box(), 0.25, -0.25, 0.25)],
)
def test_uniform_families_are_uniform_on_their_cube(sampler, value, low, high):
    v = sampler.draw(value, numpy_ctx(20_000, seed=11)).astype(np.float64)
    assert stats.kstest(v, stats.uniform(low, high - low).cdf).pvalue > 1e-4


def quad_mean_and_std(rate: float) -> tuple[float, float]:
    def moment(k: int) -> float:
        return integrate.quad(lambda x: x**k * math.exp(rate * x), 0, 1, epsabs=1e-15, epsrel=1e-13)[0]

    z = moment(0)
    m1, m2 = moment(1) / z, moment(2) / z
    return m1, math.sqrt(m2 - m1 * m1)


@pytest.mark.parametrize(
    "rate", [-300.0, -40.0, -3.0, -0.049, -0.02, -1e-7, 0.0, 2e-9, 0.03, 0.049, 0.06, 0.7, 12.0, 150.0]
)
def test_truncated_exponential_mean_against_quadrature(rate):
    assert truncated_exponential_mean(rate) == pytest.approx(quad_mean_and_std(rate)[0], rel=1e-13, abs=2e-14)


@pytest.mark.parametrize("alpha", [1e-6, 0.05, 0.2, 0.4999, 0.5, 0.5001, 0.8, 0.95, 1 - 1e-6])
def test_truncated_exponential_rate_solves_for_the_mean(alpha):
    rate = truncated_exponential_rate(alpha)
    assert (rate < 0) == (alpha < 0.5) and (rate > 0) == (alpha > 0.5)
    if abs(rate) < 1e4:  # quadrature resolves the law
        assert quad_mean_and_std(rate)[0] == pytest.approx(alpha, rel=1e-9, abs=1e-12)
    else:  # mean of an exponential truncated far in its tail: about 1/|rate|
        assert min(alpha, 1 - alpha) == pytest.approx(1 / abs(rate), rel=1e-6)


def test_truncated_exponential_rate_rejects_degenerate_means():
    for mean in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            truncated_exponential_rate(mean)


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.8, 0.95])
def test_hyperplane_mean_within_a_few_over_sqrt_d(alpha):
    d = 200_000
    v = Hyperplane().draw(alpha, numpy_ctx(d, seed=int(alpha * 100))).astype(np.float64)
    _, std = quad_mean_and_std(truncated_exponential_rate(alpha))
    assert abs(v.mean() - alpha) < 5 * std / math.sqrt(d)
    assert v.min() >= 0 and v.max() <= 1


@pytest.mark.parametrize("alpha", [0.03, 0.3, 0.7, 0.97])
def test_hyperplane_follows_the_truncated_exponential_law(alpha):
    rate = truncated_exponential_rate(alpha)
    v = Hyperplane().draw(alpha, numpy_ctx(20_000, seed=5)).astype(np.float64)
    cdf = lambda x: np.expm1(rate * np.clip(x, 0, 1)) / np.expm1(rate)  # noqa: E731
    assert stats.kstest(v, cdf).pvalue > 1e-4


@pytest.mark.parametrize("alpha", [1e-9, 1 - 1e-9])
def test_hyperplane_extreme_means_stay_in_the_cube(alpha):
    v = Hyperplane().draw(alpha, numpy_ctx(10_000))
    assert v.min() >= 0 and v.max() <= 1 and np.all(np.isfinite(v))
    assert abs(float(v.astype(np.float64).mean()) - alpha) < 1e-6


@pytest.mark.parametrize("p", [0.02, 0.37, 0.5, 0.9])
def test_bernoulli_frequency_is_binomial(p):
    d = 100_000
    v = Bernoulli().draw(p, numpy_ctx(d, seed=7))
    ones = int(v.sum())
    assert abs(ones - d * p) < 5 * math.sqrt(d * p * (1 - p))


# -- MinMax and Stitch against plain numpy references ------------------------------------
def test_minmax_picks_the_larger_and_the_smaller_weight():
    rng = np.random.default_rng(8)
    a = rng.standard_normal(1000).astype(np.float32)
    b = rng.standard_normal(1000).astype(np.float32)
    a[:10] = -b[:10]  # ties |a| == |b| with different signs go to A
    a[10:20] = b[10:20]
    ctx = DrawContext(make_layout([1000]), NumpyRandom(0), theta_a=a, theta_b=b)
    max_model = np.array([y if abs(y) > abs(x) else x for x, y in zip(a, b, strict=True)], np.float32)
    min_model = np.array([y if abs(y) < abs(x) else x for x, y in zip(a, b, strict=True)], np.float32)
    assert np.array_equal(bits(combine(a, b, MinMax().draw(0.0, ctx))), bits(max_model))
    assert np.array_equal(bits(combine(a, b, MinMax().draw(1.0, ctx))), bits(min_model))
    v = MinMax().draw(0.3, ctx)
    expected = np.array(
        [0.7 if abs(y) > abs(x) else 0.3 if abs(y) < abs(x) else 0.0 for x, y in zip(a, b, strict=True)]
    )
    np.testing.assert_allclose(v, expected, atol=1e-7)


def test_minmax_needs_both_models():
    with pytest.raises(SamplerError, match="theta_a"):
        MinMax().draw(0.5, numpy_ctx(4))


def test_stitch_follows_the_layer_indices():
    sizes = [3, 5, 2, 4, 6]
    layers = {"p0": 0, "p1": 2, "p2": 1, "p3": 2, "p4": 3}  # not in flat order
    layout = make_layout(sizes, layers=layers)
    ctx = DrawContext(layout, NumpyRandom(0))
    element_layers = [layers[f"p{i}"] for i, n in enumerate(sizes) for _ in range(n)]
    for cut in range(5):
        v = Stitch().draw(cut, ctx)
        assert v.tolist() == [1.0 if layer < cut else 0.0 for layer in element_layers]


def test_stitch_uses_a_given_layer_index():
    layout = make_layout([4])
    v = Stitch().draw(1, DrawContext(layout, NumpyRandom(0), layer_index=np.array([0, 1, 0, 1])))
    assert v.tolist() == [1.0, 0.0, 1.0, 0.0]


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sampler", "value", "message"),
    [
        (Uniform(), 0.7, r"Uniform: s=0.7 is outside \[0, 0.5\]"),
        (Uniform(), -0.1, r"Uniform: s=-0.1 is outside \[0, 0.5\]"),
        (Subcube(), 1.2, r"Subcube: lam=1.2 is outside \[0, 1\]"),
        (Hyperplane(), -1e-3, r"Hyperplane: alpha=-0.001 is outside \[0, 1\]"),
        (Bernoulli(), 2, r"Bernoulli: p=2.0 is outside \[0, 1\]"),
        (Linear(start=-1, stop=2), 2.5, r"Linear: lam=2.5 is outside \[-1, 2\]"),
        (MinMax(), 1.01, r"MinMax: lam=1.01 is outside \[0, 1\]"),
        (Box(), 0.6, r"Box: s=0.6 is outside \[0, 0.5\]"),
        (Box(stop=2.0), 2.5, r"Box: s=2.5 is outside \[0, 2\]"),
        (Stitch(), 4, r"Stitch: layer=4 is outside \[0, 3\]"),
        (Stitch(), -1, r"Stitch: layer=-1 is outside \[0, 3\]"),
        (Stitch(), 1.5, r"Stitch: layer must be an integer"),
        (Uniform(), float("nan"), r"Uniform: s=nan is not a finite number"),
        (Bernoulli(), "0.5", r"Bernoulli: p must be a real number"),
        (Triangle(), (0.7, 0.5), r"Triangle: \(lam_b, lam_c\)=\(0.7, 0.5\) is outside the triangle"),
        (Triangle(), (-0.1, 0.5), r"outside the triangle"),
        (Triangle(), 0.5, r"Triangle: the value must be a pair"),
    ],
)
def test_out_of_range_values_raise(sampler, value, message):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 6)).astype(np.float32)
    ctx = DrawContext(make_layout([2, 2, 2]), NumpyRandom(0), theta_a=a, theta_b=b)
    with pytest.raises(SamplerError, match=message):
        sampler.draw(value, ctx)


def test_samplers_are_frozen_values():
    assert Linear(start=-1, stop=2) == Linear(start=-1.0, stop=2.0)
    assert hash(Uniform()) == hash(Uniform())
    with pytest.raises(AttributeError):
        Linear().start = 3  # type: ignore[misc]
    assert Uniform(s=0.25).grid.tolist() == [0.25]  # a fixed value is swept alone
    assert Linear(start=-1, stop=2).settings == {"sampler": "linear", "start": -1, "stop": 2, "lam": None}


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Linear(start=2, stop=1), "start must be < stop"),
        (lambda: Linear(start=float("inf")), "start must be a finite number"),
        (lambda: Triangle(resolution=0), "resolution must be an integer >= 1"),
        (lambda: Stitch(num_layers=-2), "num_layers"),
        (lambda: Box(stop=-1), "stop must be a finite number > 0"),
        (lambda: get_sampler("uniform", q=0.2), "valid settings"),
        (lambda: Uniform(s=0.7), r"Uniform: s=0.7 is outside \[0, 0.5\]"),
        (lambda: Bernoulli(p=1.5), r"Bernoulli: p=1.5 is outside \[0, 1\]"),
    ],
)
def test_invalid_settings_raise(factory, message):
    with pytest.raises(SamplerError, match=message):
        factory()


def test_unknown_sampler_name_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="bernoulli, box, hyperplane, linear, minmax, stitch"):
        get_sampler("gaussian")


def test_draw_context_checks_and_derives():
    layout = make_layout([3])
    with pytest.raises(LayoutError, match="theta_a has shape"):
        DrawContext(layout, NumpyRandom(0), theta_a=np.zeros(4))
    ctx = DrawContext(layout, NumpyRandom(0), theta_a=np.zeros(3))  # float64 models: float64 coefficients
    assert ctx.dtype == np.float64 and Uniform().draw(0.5, ctx).dtype == np.float64
    assert DrawContext(layout, NumpyRandom(0)).dtype == np.float32
    with pytest.raises(LayoutError):
        DrawContext({"w": 3}, NumpyRandom(0))  # type: ignore[arg-type]


def test_same_seed_same_draws():
    for name in ("uniform", "hyperplane", "bernoulli", "box", "subcube"):
        first = get_sampler(name).draw(0.3, numpy_ctx(50, seed=9))
        again = get_sampler(name).draw(0.3, numpy_ctx(50, seed=9))
        assert np.array_equal(first, again)


# -- other array libraries ------------------------------------------------------------------
def framework(name: str):
    if name == "torch":
        torch = pytest.importorskip("torch")
        return TorchRandom(0), lambda x: torch.from_numpy(np.asarray(x)), torch.Tensor
    jax = pytest.importorskip("jax")
    return JaxRandom(0), lambda x: jax.numpy.asarray(x), jax.Array


CASES = [
    (Uniform(), 0.3),
    (Subcube(), 0.2),
    (Subcube(), 0.8),
    (Hyperplane(), 0.15),
    (Hyperplane(), 0.85),
    (Hyperplane(), 0.5),
    (Bernoulli(), 0.4),
    (Linear(start=-1, stop=2), 1.5),
    (Stitch(), 2),
    (MinMax(), 0.25),
    (Box(), 0.1),
]


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_samplers_run_on_other_array_libraries(lib):
    random, to_lib, array_type = framework(lib)
    layout = make_layout([300, 200, 500])
    rng = np.random.default_rng(2)
    a_np, b_np = rng.standard_normal((2, layout.size)).astype(np.float32)
    ctx = DrawContext(layout, random, theta_a=to_lib(a_np), theta_b=to_lib(b_np))
    for sampler, value in CASES:
        v = sampler.draw(value, ctx)
        assert isinstance(v, array_type), (sampler, type(v))
        v_np = np.asarray(v)
        assert v_np.shape == (layout.size,) and v_np.dtype == np.float32
        low, high = sampler.support(value)
        assert v_np.min() >= low - 2 * F32_EPS and v_np.max() <= high + 2 * F32_EPS, sampler
    # deterministic samplers agree with numpy exactly
    np_ctx = DrawContext(layout, NumpyRandom(0), theta_a=a_np, theta_b=b_np)
    for sampler, value in [(MinMax(), 0.25), (Stitch(), 2), (Linear(), 0.3)]:
        assert np.array_equal(np.asarray(sampler.draw(value, ctx)), sampler.draw(value, np_ctx))
    # ends are exact on the device too
    v0, v1 = Subcube().draw(0.0, ctx), Hyperplane().draw(1.0, ctx)
    assert np.array_equal(bits(np.asarray(combine(ctx.theta_a, ctx.theta_b, v0))), bits(a_np))
    assert np.array_equal(bits(np.asarray(combine(ctx.theta_a, ctx.theta_b, v1))), bits(b_np))
    v_b, v_c = Triangle().draw((0.25, 0.5), ctx)
    assert isinstance(v_b, array_type) and np.all(np.asarray(v_c) == 0.5)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_hyperplane_mean_on_other_array_libraries(lib):
    random, _, _ = framework(lib)
    d = 100_000
    ctx = DrawContext(make_layout([d]), random)
    for alpha in (0.1, 0.9):
        v = np.asarray(Hyperplane().draw(alpha, ctx)).astype(np.float64)
        _, std = quad_mean_and_std(truncated_exponential_rate(alpha))
        assert abs(v.mean() - alpha) < 5 * std / math.sqrt(d)
