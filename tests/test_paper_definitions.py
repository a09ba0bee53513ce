"""An audit of the library against the paper's definitions, on synthetic arrays.

Every reference here is written from the text of the paper (Csiszárik et al., "Mode
Combinability"), in plain numpy/scipy, never from the library's code. The paper writes
Definition 3.2 as ``Θ_v = v ⊙ Θ_A + (1 − v) ⊙ Θ_B`` (``v`` weights A) while §3's barrier,
§4.2.2, §5.1, §5.2 and §5.4 put model A at parameter 0; the library takes ``v`` as B's weight
throughout (docs/conventions.md). The references below state the paper's law in the paper's
own reading and then map it once onto the library's convention (``v_lib = 1 − v_paper`` where
the paper's ``v`` weights A).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xarray as xr
from scipy import optimize, stats

import combinability as cb
from combinability.backend import NumpyRandom
from combinability.combination import combine, combine3
from combinability.layout import FlatLayout
from combinability.metrics import (
    AGREEMENT_CATEGORIES,
    agreement_counts,
    edge_length_histogram,
    edge_lengths,
    empirical_barrier,
    loss_barrier,
)
from combinability.samplers import (
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
)
from tests.model_checks import agreement_by_hand

D = 200_000  # coordinates per draw: moments to ~1e-3, KS tests with real power
GRID = np.linspace(0.0, 1.0, 25)  # "25 numbers equidistantly from [0, 1]" (§4.2.2, figs 2-5)


def _ctx(d: int = D, seed: int = 0, dtype=np.float64, **kw) -> DrawContext:
    layout = kw.pop("layout", None) or FlatLayout.from_arrays({"w": np.zeros(d, np.float32)})
    return DrawContext(layout, NumpyRandom(seed), dtype=dtype, **kw)


def _draw(sampler, value, seed: int = 0, d: int = D, dtype=np.float64) -> np.ndarray:
    return np.asarray(sampler.draw(value, _ctx(d, seed, dtype)), dtype=np.float64)


def _uniform_checks(v: np.ndarray, lo: float, hi: float) -> None:
    """``v`` is i.i.d. U[lo, hi]: support, first two moments, KS, no correlation between neighbours."""
    assert v.min() >= lo and v.max() <= hi
    width = hi - lo
    assert abs(v.mean() - (lo + hi) / 2) < 5 * width / np.sqrt(12 * v.size)
    assert v.var() == pytest.approx(width**2 / 12, rel=0.02)
    assert stats.kstest(v, stats.uniform(loc=lo, scale=width).cdf).pvalue > 1e-3
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 5 / np.sqrt(v.size)  # coordinates drawn independently


# -- Definition 3.2 and §5.4: the combinations themselves ------------------------------------
def test_elementwise_combination_is_definition_3_2_with_v_weighting_b():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    v = rng.uniform(size=1000)
    w_a = 1.0 - v  # the paper's v of Definition 3.2 weights A: Θ = w_a ⊙ Θ_A + (1 − w_a) ⊙ Θ_B
    np.testing.assert_allclose(combine(a, b, v), w_a * a + (1.0 - w_a) * b, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(combine(a, b, np.zeros(1000)), a)  # the vertices are the models, exactly
    np.testing.assert_array_equal(combine(a, b, np.ones(1000)), b)
    # §3 (Def. 3.1): the linear path (1 − λ) Θ_A + λ Θ_B is the constant coefficient λ
    for lam in (-1.0, 0.3, 2.0):
        np.testing.assert_allclose(combine(a, b, lam), (1 - lam) * a + lam * b, atol=1e-12)


def test_three_model_combination_is_section_5_4():
    rng = np.random.default_rng(1)
    a, b, c = (rng.normal(size=500) for _ in range(3))
    for lam_b, lam_c in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.2, 0.3), (-0.5, 1.5)]:
        paper = a + lam_b * (b - a) + lam_c * (c - a)  # Θ_A + λ_B (π_B(Θ_B) − Θ_A) + λ_C (π_C(Θ_C) − Θ_A)
        np.testing.assert_allclose(combine3(a, b, c, lam_b, lam_c), paper, atol=1e-12)
    np.testing.assert_array_equal(combine3(a, b, c, 1.0, 0.0), b)
    np.testing.assert_array_equal(combine3(a, b, c, 0.0, 1.0), c)


def test_triangle_grid_is_the_two_simplex():
    r = 6
    pts = Triangle(resolution=r).grid
    ref = sorted((i / r, j / r) for i in range(r + 1) for j in range(r + 1) if i + j <= r)
    np.testing.assert_allclose(sorted(map(tuple, pts.tolist())), ref, rtol=0, atol=1e-12)
    ctx = _ctx(10)
    v_b, v_c = Triangle().draw((0.2, 0.3), ctx)
    assert np.all(np.asarray(v_b) == 0.2) and np.all(np.asarray(v_c) == 0.3)


# -- §4.2.1: uniform on [0.5 − s, 0.5 + s]^d -------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.05, 0.25, 0.5])
def test_uniform_cube_section_4_2_1(s):
    v = _draw(Uniform(), s, seed=3)
    if s == 0:
        assert np.all(v == 0.5)  # the midpoint of the linear path
    else:
        _uniform_checks(v, 0.5 - s, 0.5 + s)  # symmetric about 1/2: the same in either reading of v
    assert Uniform().grid.tolist() == pytest.approx(np.linspace(0, 0.5, 25).tolist())  # s ∈ [0, 0.5], 25 values


# -- §4.2.2: subcubes [0, 2λ]^d and [2λ − 1, 1]^d -------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 0.55, 0.9, 1.0])
def test_subcube_section_4_2_2(lam):
    v = _draw(Subcube(), lam, seed=4)
    # the paper: λ = 0 gives model A, λ = 1 model B; cube [0, 2λ] for λ ≤ 1/2, [2λ − 1, 1] above
    lo, hi = (0.0, 2 * lam) if lam <= 0.5 else (2 * lam - 1, 1.0)
    if lam in (0.0, 1.0):
        assert np.all(v == lam)  # v weights B: 0 is A, 1 is B
    else:
        _uniform_checks(v, lo, hi)
        assert abs(v.mean() - lam) < 0.01  # figs 3 and B.16: the axis is the cube's centre, which is λ
    assert Subcube().grid.tolist() == pytest.approx(GRID.tolist())


# -- §4.2.3: the hyperplane {mean(v) = α}, by the max-entropy law on [0, 1] ---------------------
def _maxent_law(alpha: float):
    """The exponential law truncated to [0, 1] with mean ``alpha``, as a scipy distribution.

    Independent of the library: scipy's ``truncexpon`` (density ∝ e^{−x} on [0, b], scaled by
    1/b to [0, 1]) and a root search on its mean; mirrored for α > 1/2.
    """
    low = min(alpha, 1 - alpha)
    if low == 0.5:
        return stats.uniform(), False

    def mean(b):
        return stats.truncexpon(b, scale=1.0 / b).mean()

    b = optimize.brentq(lambda b: mean(b) - low, 1e-3, 1e3, xtol=1e-14)
    return stats.truncexpon(b, scale=1.0 / b), alpha > 0.5


@pytest.mark.parametrize("alpha", [1 / 24, 0.125, 0.3, 0.5, 0.75, 23 / 24])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hyperplane_section_4_2_3(alpha, dtype):
    v = _draw(Hyperplane(), alpha, seed=5, dtype=dtype)
    law, mirrored = _maxent_law(alpha)
    x = 1.0 - v if mirrored else v
    assert v.min() >= 0 and v.max() <= 1
    assert stats.kstest(x, law.cdf).pvalue > 1e-3
    # "the magnitude of this ε noise is O(1/√d)": the sample mean is α up to a few standard errors
    assert abs(v.mean() - alpha) < 5 * law.std() / np.sqrt(v.size)
    assert v.var() == pytest.approx(law.var(), rel=0.03)
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 5 / np.sqrt(v.size)


def test_hyperplane_law_is_the_maximum_entropy_law_with_mean_alpha():
    """Among laws on [0, 1] with mean α, the exponential one has the largest entropy (§4.2.3)."""
    alpha = 0.3
    law, _ = _maxent_law(alpha)
    v = _draw(Hyperplane(), alpha, seed=6)
    # a histogram density estimate of the drawn law against the reference density
    hist, edges = np.histogram(v, bins=40, range=(0, 1), density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    np.testing.assert_allclose(hist, law.pdf(centres), rtol=0.05)
    # two other laws with the same mean have lower entropy
    assert law.entropy() > stats.beta(alpha * 2, (1 - alpha) * 2).entropy()
    assert law.entropy() > stats.uniform(0, 2 * alpha).entropy()


def test_hyperplane_ends_are_the_models():
    assert np.all(_draw(Hyperplane(), 0.0, d=100) == 0.0) and np.all(_draw(Hyperplane(), 1.0, d=100) == 1.0)
    np.testing.assert_allclose(Hyperplane().grid, GRID)


# -- §4.2.4: the vertices, Bernoulli(p) -------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 1 / 24, 0.3, 0.5, 1.0])
def test_bernoulli_section_4_2_4(p):
    v = _draw(Bernoulli(), p, seed=7)
    assert set(np.unique(v).tolist()) <= {0.0, 1.0}  # every weight is exactly A's or B's
    ones = int(v.sum())
    if p in (0.0, 1.0):
        assert ones == p * v.size
    else:
        assert stats.binomtest(ones, v.size, p).pvalue > 1e-3  # P(v_i = 1) = P(B's weight) = p
        a, b = v[:-1], v[1:]
        both = np.mean(a * b)  # independence: P(v_i = v_{i+1} = 1) = p²
        assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / a.size)
    np.testing.assert_allclose(Bernoulli().grid, GRID)


# -- §5.1 and §5.2: beyond the hyperrectangle -----------------------------------------------
def test_linear_extrapolation_section_5_1():
    grid = Linear(start=-1, stop=2).grid
    np.testing.assert_allclose(grid, np.linspace(-1, 2, 25))
    assert -0.25 in grid and 1.25 in grid  # the paper's segments [−0.25, 0] and [1, 1.25] are on the grid
    for lam in (-1.0, 0.0, 0.4, 1.0, 2.0):
        assert np.all(_draw(Linear(start=-1, stop=2), lam, d=50) == lam)


@pytest.mark.parametrize("s", [0.1, 0.25, 0.5])
def test_box_centred_at_a_section_5_2(s):
    v = _draw(Box(), s, seed=8)
    _uniform_checks(v, -s, s)  # "we choose our combining coefficients from [−s, s]^d"
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=D), rng.normal(size=D)
    theta = combine(a, b, v)
    # centred at Θ_A, each weight moved by at most s times its edge length |Θ_B − Θ_A|
    assert np.all(np.abs(theta - a) <= s * np.abs(b - a) + 1e-12)
    assert abs(np.mean((theta - a) / (b - a))) < 5 * s / np.sqrt(3 * D)
    assert np.all(_draw(Box(), 0.0, d=100) == 0.0)  # s = 0: Θ_A
    np.testing.assert_allclose(Box().grid, np.linspace(0, 0.5, 25))  # "various s ∈ [0, 0.5]"


# -- §4.5.1: the 'Min' and 'Max' models ----------------------------------------------------
def test_min_max_models_section_4_5_1():
    rng = np.random.default_rng(3)
    a = rng.normal(size=2000)
    b = rng.normal(size=2000)
    a[:5] = [1.0, -2.0, 0.5, 3.0, -1.0]
    b[:5] = [-2.0, 1.0, 0.5, -3.0, 1.0]  # ties of |w| in entries 2, 3, 4
    lay = FlatLayout.from_arrays({"w": np.zeros(2000)})
    ctx = DrawContext(lay, NumpyRandom(0), dtype=np.float64, theta_a=a, theta_b=b)
    # "for each pair of weights (w_a, w_b) the one for which the absolute value is smaller" / "largest"
    maxm = np.array([wa if abs(wa) > abs(wb) else wb for wa, wb in zip(a, b, strict=True)])
    minm = np.array([wa if abs(wa) < abs(wb) else wb for wa, wb in zip(a, b, strict=True)])
    tie = np.abs(a) == np.abs(b)
    maxm[tie] = minm[tie] = a[tie]  # a tie is A's weight (documented: either is as large as the other)
    got_max = combine(a, b, np.asarray(MinMax().draw(0.0, ctx)))
    got_min = combine(a, b, np.asarray(MinMax().draw(1.0, ctx)))
    np.testing.assert_array_equal(got_max, maxm)
    np.testing.assert_array_equal(got_min, minm)
    # fig 8: the linear interpolation between the Max (λ = 0) and the Min model (λ = 1)
    for lam in (0.25, 0.5, 0.8):
        got = combine(a, b, np.asarray(MinMax().draw(lam, ctx)))
        np.testing.assert_allclose(got, (1 - lam) * maxm + lam * minm, atol=1e-12)


# -- §4.3: identity stitching -----------------------------------------------------------------
def _stitch_layout(sizes=(3, 2, 4, 1)) -> tuple[FlatLayout, np.ndarray]:
    arrays = {f"l{i}.weight": np.zeros(n, np.float32) for i, n in enumerate(sizes)}
    layout = FlatLayout.from_arrays(arrays, layers={f"l{i}.weight": i for i in range(len(sizes))})
    return layout, np.repeat(np.arange(len(sizes)), sizes)


def test_identity_stitching_formula_section_4_3():
    """'we set the coefficients to 0 for each layer i ≤ l and 1 for layers i > l' with Definition 3.2
    (coefficient 1 = Θ_A): the lower l layers (1-based) are π(Θ_B), the upper ones Θ_A: ``Stitch()``."""
    layout, layer_of = _stitch_layout()
    big_l = 4
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=layout.size), rng.normal(size=layout.size)
    assert Stitch().grid_for(layout).tolist() == list(range(big_l + 1))
    for cut in range(big_l + 1):
        coef_a = np.where(layer_of + 1 <= cut, 0.0, 1.0)  # 1-based layer i = index + 1
        paper = coef_a * a + (1 - coef_a) * b  # Definition 3.2 as written
        v = np.asarray(Stitch().draw(cut, DrawContext(layout, NumpyRandom(0), dtype=np.float64)))
        np.testing.assert_array_equal(combine(a, b, v), paper)
        # the first sentence's reading: the lower part of Θ_A, the upper part of Θ_B
        first = np.where(layer_of < cut, a, b)
        v = np.asarray(Stitch(lower="a").draw(cut, DrawContext(layout, NumpyRandom(0), dtype=np.float64)))
        np.testing.assert_array_equal(combine(a, b, v), first)


# -- Definitions 3.1 and 3.3: barriers -------------------------------------------------------
@pytest.mark.parametrize("l_a,l_b,h", [(0.5, 0.5, 0.3), (0.2, 0.6, 0.5), (0.9, 0.1, 0.05), (0.3, 0.4, 0.0)])
def test_loss_barrier_definition_3_1_closed_form(l_a, l_b, h):
    """L(λ) = (1 − λ) L_A + λ L_B + 4 h λ (1 − λ): the barrier max_λ L(λ) − (L_A + L_B)/2 in closed form."""
    lam = np.linspace(0, 1, 20_001)
    path = (1 - lam) * l_a + lam * l_b + 4 * h * lam * (1 - lam)
    if h > 0:
        star = np.clip(0.5 + (l_b - l_a) / (8 * h), 0, 1)  # the vertex of the parabola, in [0, 1]
    else:
        star = 0.0 if l_a >= l_b else 1.0
    peak = (1 - star) * l_a + star * l_b + 4 * h * star * (1 - star)
    expected = peak - (l_a + l_b) / 2
    assert loss_barrier(path, l_a, l_b) == pytest.approx(expected, abs=1e-8)
    # the ends are part of the path: the barrier is never below |L_A − L_B| / 2
    assert loss_barrier(path, l_a, l_b) >= abs(l_a - l_b) / 2 - 1e-12
    # equal ends, bump h at λ = 1/2 (on the paper's 25-point grid): exactly h
    if l_a == l_b:
        grid_path = l_a + 4 * h * GRID * (1 - GRID)
        assert loss_barrier(grid_path, l_a, l_b) == pytest.approx(h, abs=1e-12)


def test_empirical_barriers_definition_3_3():
    rng = np.random.default_rng(5)
    losses = rng.uniform(0.1, 2.0, size=(7, 4))  # a sample of combinations (values × draws)
    acc = rng.uniform(0.5, 0.95, size=(7, 4))
    l_a, l_b, acc_a, acc_b = 0.3, 0.5, 0.9, 0.85
    # "comparing the performance of the worst-performing model in the sample with the average
    # performance of the original models"
    assert empirical_barrier(losses, l_a, l_b, kind="loss") == pytest.approx(losses.max() - 0.4)
    # "subtracting the worst-performing model in terms of accuracy from the average accuracy"
    assert empirical_barrier(acc, acc_a, acc_b, kind="accuracy") == pytest.approx(0.875 - acc.min())
    # the empirical barrier of a sample may be negative (Def. 3.3 does not include the ends)
    assert empirical_barrier([0.1, 0.2], 0.3, 0.5) == pytest.approx(0.2 - 0.4)
    assert np.isnan(empirical_barrier([0.1, np.nan, 0.3], 0.1, 0.3))


def _sweep_like(loss, acc, ends, done=None) -> xr.Dataset:
    """A sweep-shaped Dataset: (alignment, split, lam, sample) and the ends (alignment, split)."""
    dims = ("alignment", "split", "lam", "sample")
    coords = {"alignment": ["naive", "aligned"], "split": ["test"], "lam": np.linspace(0, 1, loss.shape[2]),
              "sample": np.arange(loss.shape[3])}
    data = {"loss": (dims, loss), "accuracy": (dims, acc)}
    for name, value in ends.items():
        data[name] = (("alignment", "split"), np.full((2, 1), value))
    if done is not None:
        data["done"] = (("alignment", "lam", "sample"), done)
    return xr.Dataset(data, coords=coords)


def test_sweep_barriers_definition_3_3():
    rng = np.random.default_rng(6)
    loss = rng.uniform(0.1, 1.0, size=(2, 1, 5, 3))
    acc = rng.uniform(0.6, 0.9, size=(2, 1, 5, 3))
    ends = {"loss_a": 0.2, "loss_b": 0.4, "accuracy_a": 0.9, "accuracy_b": 0.8}
    out = cb.barriers(_sweep_like(loss, acc, ends))
    for k in range(2):  # the worst over every value and draw, per alignment
        assert float(out["loss_barrier"][k, 0]) == pytest.approx(loss[k].max() - 0.3)
        assert float(out["accuracy_barrier"][k, 0]) == pytest.approx(0.85 - acc[k].min())


def test_sweep_barrier_is_nan_when_a_combination_diverged():
    """A NaN loss (a diverged combination) has no worst value: the barrier is NaN, as
    ``metrics.empirical_barrier`` gives, not the worst of the remaining combinations."""
    rng = np.random.default_rng(7)
    loss = rng.uniform(0.1, 1.0, size=(2, 1, 5, 3))
    acc = rng.uniform(0.6, 0.9, size=(2, 1, 5, 3))
    loss[1, 0, 2, 1] = np.nan  # the aligned pair only
    ends = {"loss_a": 0.2, "loss_b": 0.4, "accuracy_a": 0.9, "accuracy_b": 0.8}
    out = cb.barriers(_sweep_like(loss, acc, ends))
    assert float(out["loss_barrier"][0, 0]) == pytest.approx(loss[0].max() - 0.3)
    assert np.isnan(float(out["loss_barrier"][1, 0]))
    assert np.isnan(empirical_barrier(loss[1], 0.2, 0.4))
    # a partial sweep leaves out the cells not evaluated yet (NaN and not done), and only those
    done = np.ones((2, 5, 3), dtype=bool)
    done[:, 4, :] = False
    loss2 = np.where(done[:, None], rng.uniform(0.1, 1.0, size=loss.shape), np.nan)
    acc2 = np.where(done[:, None], acc, np.nan)
    part = cb.barriers(_sweep_like(loss2, acc2, ends, done=done), partial=True)
    np.testing.assert_allclose(part["loss_barrier"].values[:, 0], np.nanmax(loss2, axis=(1, 2, 3)) - 0.3)
    np.testing.assert_allclose(part["accuracy_barrier"].values[:, 0], 0.85 - np.nanmin(acc2, axis=(1, 2, 3)))
    loss2[0, 0, 1, 0] = np.nan  # done, yet NaN: diverged
    part = cb.barriers(_sweep_like(loss2, acc2, ends, done=done), partial=True)
    assert np.isnan(float(part["loss_barrier"][0, 0])) and np.isfinite(float(part["loss_barrier"][1, 0]))


def test_three_model_barrier_uses_the_mean_of_the_three_ends():
    loss = np.array([[[[0.5], [0.7], [0.6]]]] * 2)
    acc = np.array([[[[0.8], [0.7], [0.9]]]] * 2)
    ends = {"loss_a": 0.3, "loss_b": 0.4, "loss_c": 0.5, "accuracy_a": 0.9, "accuracy_b": 0.8, "accuracy_c": 1.0}
    out = cb.barriers(_sweep_like(loss, acc, ends))
    assert float(out["loss_barrier"][0, 0]) == pytest.approx(0.7 - 0.4)
    assert float(out["accuracy_barrier"][0, 0]) == pytest.approx(0.9 - 0.7)


# -- §6.1: the agreement categories ------------------------------------------------------------
def test_agreement_categories_section_6_1_by_hand():
    # one example per category, written out: (pred, A's, B's, true label)
    rows = {
        "both_correct": (1, 1, 1, 1), "both_wrong": (1, 1, 1, 2),
        "a_only_correct": (3, 3, 4, 3), "a_only_wrong": (3, 3, 4, 5),
        "b_only_correct": (6, 7, 6, 6), "b_only_wrong": (6, 7, 6, 0),
        "neither_correct": (2, 0, 0, 2), "neither_wrong": (2, 0, 1, 9),
    }
    cols = np.array(list(rows.values())).T
    got = cb.agreement_categories(*cols)
    assert got == dict.fromkeys(rows, 1)


def test_agreement_categories_section_6_1_random():
    rng = np.random.default_rng(8)
    n = 3000
    labels = rng.integers(0, 4, n)
    pred_a = np.where(rng.uniform(size=n) < 0.7, labels, rng.integers(0, 4, n))
    pred_b = np.where(rng.uniform(size=n) < 0.7, labels, rng.integers(0, 4, n))
    preds = np.stack([pred_a, pred_b, rng.integers(0, 4, n)])  # the ends, and a random model
    counts = agreement_counts(preds, pred_a, pred_b, labels)
    for row, pred in zip(counts, preds, strict=True):
        ref = agreement_by_hand(pred, pred_a, pred_b, labels)
        assert row.tolist() == [ref[c] for c in AGREEMENT_CATEGORIES]
        assert row.sum() == n
    # at model A nothing is 'b_only' or 'neither'; at model B nothing is 'a_only' or 'neither'
    a_row = dict(zip(AGREEMENT_CATEGORIES, counts[0], strict=True))
    assert a_row["b_only_correct"] + a_row["b_only_wrong"] + a_row["neither_correct"] + a_row["neither_wrong"] == 0
    assert a_row["a_only_correct"] + a_row["a_only_wrong"] == int(np.sum(pred_a != pred_b))


# -- §6.2: edge lengths -------------------------------------------------------------------------
def test_edge_lengths_section_6_2():
    layout, layer_of = _stitch_layout((50, 30, 20))
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=layout.size), rng.normal(size=layout.size)
    ref = np.array([abs(x - y) for x, y in zip(a, b, strict=True)])  # |Θ_A,i − π(Θ_B)_i|
    np.testing.assert_array_equal(edge_lengths(a, b), ref)
    h = edge_length_histogram(a, b, bins=7, layout=layout)
    for layer in range(3):
        counts, _ = np.histogram(ref[layer_of == layer], bins=h.edges)
        assert h.counts[layer].tolist() == counts.tolist()
    assert h.counts.sum() == layout.size


# -- §6.3: re-matching the k lowest-scoring pairs by a derangement ---------------------------------
def test_perturbation_section_6_3():
    rng = np.random.default_rng(10)
    n = 12
    base = rng.permutation(n)
    scores = rng.uniform(size=n)
    for k in (2, 5, n):
        out = cb.perturb_permutation({"P0": base, "P1": np.arange(3)}, "P0", scores, k, seed=k)
        new = np.asarray(out["P0"])
        lowest = set(np.argsort(scores)[:k].tolist())  # "re-match randomly the k lowest scoring pairs"
        assert sorted(new.tolist()) == list(range(n))  # still a permutation
        changed = {j for j in range(n) if new[j] != base[j]}
        assert changed == lowest  # every chosen pair loses its partner (a derangement), no other changes
        assert {int(new[j]) for j in lowest} == {int(base[j]) for j in lowest}  # re-matched among themselves
        assert np.array_equal(out["P1"], np.arange(3))


def test_random_derangement_is_uniform():
    rng = np.random.default_rng(11)
    k = 4
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(4500):
        sigma = tuple(cb.random_derangement(k, rng).tolist())
        assert all(s != i for i, s in enumerate(sigma))
        seen[sigma] = seen.get(sigma, 0) + 1
    all_derangements = [p for p in itertools.permutations(range(k)) if all(p[i] != i for i in range(k))]
    assert set(seen) == set(all_derangements)  # 9 of them for k = 4
    assert stats.chisquare(list(seen.values())).pvalue > 1e-3
