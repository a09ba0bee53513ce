"""The fast weight matcher against the plain Git Re-Basin algorithm (benchmarks/reference_rebasin.py).

Results only, never times: planted permutations recovered exactly by both; on trained
models the same permutation as the reference when started identically (same seed, so
the same visit orders), and never a lower objective; the cached, low-rank-corrected
cost matrices equal ones computed from scratch in float64.
"""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

import combinability as cb
from combinability import assignment, matching_terms
from tests import reference_nets as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_rebasin as rebasin  # noqa: E402


def _plant(spec, params, seed, noise):
    """B = π⁻¹(A) + noise: the permutation aligning B to A is π."""
    rng = np.random.default_rng(seed)
    planted = cb.random_permutation(spec, params, seed=rng)
    b = cb.apply_permutation(spec, cb.invert_permutation(planted), params)
    return planted, {k: v + noise * rng.normal(size=v.shape) * np.std(v) for k, v in b.items()}


def _cost64(spec, a, b, perm, p):
    """``p``'s cost matrix from scratch, in float64, written independently of the library."""
    n = len(perm[p])
    cost = np.zeros((n, n))
    for name, axis in spec.perm_to_axes[p]:
        w = np.asarray(b[name], np.float64)
        for ax, q in enumerate(spec.axes_to_perm[name]):
            if q is not None and ax != axis:
                w = np.take(w, perm[q], axis=ax)
        wa = np.moveaxis(np.asarray(a[name], np.float64), axis, 0).reshape(n, -1)
        cost += wa @ np.moveaxis(w, axis, 0).reshape(n, -1).T
    return cost


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_planted_mlp_recovered_like_the_reference(noise):
    rng = np.random.default_rng(0)
    a = ref.mlp_params(rng, (30, 64, 48, 40, 5))
    spec = ref.mlp_spec(4)
    planted, b = _plant(spec, a, 1, noise)
    ours = cb.weight_matching(spec, a, b, seed=3)
    theirs, _ = rebasin.weight_matching(3, spec, a, b)
    for p in planted:
        np.testing.assert_array_equal(ours[p], planted[p])
        np.testing.assert_array_equal(theirs[p], planted[p])
    assert ours.objective == pytest.approx(rebasin.objective(spec, a, b, planted), rel=1e-12)


def test_planted_residual_conv_recovered_like_the_reference():
    rng = np.random.default_rng(2)
    a = ref.resnet_params(rng, c1=12, c2=16)
    spec = ref.resnet_spec()
    planted, b = _plant(spec, a, 3, noise=0.05)
    ours = cb.weight_matching(spec, a, b, seed=0, restarts=2)
    theirs, _ = rebasin.weight_matching(0, spec, a, b)
    best = max(theirs, ours, key=lambda perm: rebasin.objective(spec, a, b, perm))
    for p in planted:
        np.testing.assert_array_equal(ours[p], planted[p])
    assert ours.objective >= rebasin.objective(spec, a, b, best) - 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trained_same_descent_as_the_reference(digits_models, seed):
    """Same seed and start: the reference's visit orders, so its permutation and sweeps."""
    pairs = list(itertools.combinations(range(3), 2))
    i, j = pairs[seed]
    pair = cb.ModelPair(digits_models[i], digits_models[j], architecture="mlp", backend="torch")
    spec, a, b = pair.spec, pair.params(0), pair.params(1)
    theirs, sweeps = rebasin.weight_matching(seed, spec, a, b)
    ours = cb.weight_matching(spec, a, b, seed=seed)
    assert sweeps > 2  # trained models: a real descent, not a one-sweep answer
    for p in theirs:
        np.testing.assert_array_equal(ours[p], theirs[p])
    assert ours.iterations == sweeps
    assert ours.objective == pytest.approx(rebasin.objective(spec, a, b, theirs), rel=1e-12)
    assert ours.history[0] == pytest.approx(rebasin.objective(spec, a, b, cb.identity_permutation(spec.perm_sizes(a))))
    assert all(y >= x for x, y in zip(ours.history, ours.history[1:], strict=False))


def test_trained_restarts_never_below_the_reference(digits_models):
    pair = cb.ModelPair(digits_models[0], digits_models[2], architecture="mlp", backend="torch")
    spec, a, b = pair.spec, pair.params(0), pair.params(1)
    for seed in (0, 5):
        theirs, _ = rebasin.weight_matching(seed, spec, a, b)
        ours = cb.weight_matching(spec, a, b, seed=seed, restarts=3)
        assert ours.objective >= rebasin.objective(spec, a, b, theirs) - 1e-9
        assert ours.objective == pytest.approx(cb.matching_objective(spec, a, b, ours), rel=1e-12)


def _installed(name):
    try:
        from combinability.plugins import get_backend

        get_backend(name)
        return True
    except Exception:
        return False


#: Where the cost terms live: numpy on the host, or a backend's device arrays (its CPU here).
ARRAYS = ["numpy"] + [pytest.param(b, marks=pytest.mark.skipif(not _installed(b), reason=f"{b} not installed"))
                      for b in ("torch", "jax")]


def _arrays(where):
    from combinability.plugins import get_backend

    return None if where == "numpy" else matching_terms.DeviceArrays(get_backend(where))


@pytest.mark.parametrize("where", ARRAYS)
def test_cached_costs_follow_small_and_large_changes(where):
    """The low-rank corrections and recomputations give the from-scratch cost matrix."""
    rng = np.random.default_rng(4)
    a = ref.resnet_params(rng, c1=10, c2=14)
    b = ref.resnet_params(rng, c1=10, c2=14)
    spec = ref.resnet_spec()
    problem = matching_terms.Problem(spec, a, b, _arrays(where))
    perm = dict(cb.random_permutation(spec, a, seed=rng))
    for step in range(12):
        q = problem.names[step % len(problem.names)]
        n = len(perm[q])
        moved = rng.choice(n, size=(n, 2, (2 * n) // 3)[step % 3], replace=False)  # all, two, two thirds
        perm[q] = perm[q].copy()
        perm[q][moved] = perm[q][np.roll(moved, 1)]  # every chosen unit moves
        for p in problem.names:
            np.testing.assert_allclose(problem.cost(p, perm), _cost64(spec, a, b, perm, p), rtol=1e-4, atol=1e-4)
    assert sum(term.updates for terms in problem.terms.values() for term in terms) > 0  # corrections were taken


@pytest.mark.parametrize("where", ARRAYS)
def test_cached_costs_of_any_axis_layout(where):
    """Kernels with channels last (HWIO) and a tensor permuted on three axes: every term's
    layout (its first permuted axis first) and gathers give the from-scratch cost matrix."""
    rng = np.random.default_rng(14)
    spec = cb.PermutationSpec({"conv1": (None, None, None, "P1"), "conv2": (None, None, "P1", "P2"),
                               "bias2": ("P2",), "mix": ("P1", "P2", "P3"), "out": ("P3", None)})
    shapes = {"conv1": (3, 3, 2, 8), "conv2": (3, 3, 8, 10), "bias2": (10,), "mix": (8, 10, 6), "out": (6, 4)}
    a, b = ({k: rng.normal(size=shape) for k, shape in shapes.items()} for _ in range(2))
    problem = matching_terms.Problem(spec, a, b, _arrays(where))
    perm = {p: np.arange(n) for p, n in spec.perm_sizes(a).items()}
    for step in range(9):
        q = problem.names[step % 3]
        moved = rng.choice(len(perm[q]), size=2 if step % 2 else len(perm[q]), replace=False)
        perm[q] = perm[q].copy()
        perm[q][moved] = perm[q][rng.permutation(moved)]
        for p in problem.names:
            np.testing.assert_allclose(problem.cost(p, perm), _cost64(spec, a, b, perm, p), rtol=1e-4, atol=1e-4)
    planted, b = _plant(spec, a, 15, noise=0.0)
    found = cb.weight_matching(spec, a, b, seed=0, restarts=3, backend=None if where == "numpy" else where)
    assert found.objective == pytest.approx(rebasin.objective(spec, a, b, planted), rel=1e-9)


@pytest.mark.parametrize("where", [p for p in ARRAYS if p != "numpy"])
def test_trained_same_descent_with_costs_on_a_backend(digits_models, where):
    """Cost terms on a backend's device: the reference's permutation, sweeps and objective."""
    pair = cb.ModelPair(digits_models[0], digits_models[1], architecture="mlp", backend="torch")
    spec, a, b = pair.spec, pair.params(0), pair.params(1)
    theirs, sweeps = rebasin.weight_matching(0, spec, a, b)
    ours = cb.weight_matching(spec, a, b, seed=0, backend=where)
    for p in theirs:
        np.testing.assert_array_equal(ours[p], theirs[p])
    assert ours.iterations == sweeps
    assert ours.objective == pytest.approx(rebasin.objective(spec, a, b, theirs), rel=1e-12)
    aligned = pair.align("weight", backend=where)  # the aligner passes the option through
    for p in theirs:
        np.testing.assert_array_equal(aligned.transforms[1][p], theirs[p])


def test_reference_with_device_products_takes_the_same_steps(digits_models):
    """The yardstick's GPU form (torch gathers and products, here on the CPU): numpy's steps.

    Checked against the planted permutation of a residual conv net, and against the numpy
    reference's permutation and sweep count on a trained pair.
    """
    rng = np.random.default_rng(2)
    a = ref.resnet_params(rng, c1=12, c2=16)
    spec = ref.resnet_spec()
    planted, b = _plant(spec, a, 3, noise=0.0)
    on_torch, _ = rebasin.weight_matching(0, spec, a, b, device="cpu")
    for p in planted:
        np.testing.assert_array_equal(on_torch[p], planted[p])
    pair = cb.ModelPair(digits_models[0], digits_models[1], architecture="mlp", backend="torch")
    spec, a, b = pair.spec, pair.params(0), pair.params(1)
    theirs, sweeps = rebasin.weight_matching(1, spec, a, b)
    on_torch, torch_sweeps = rebasin.weight_matching(1, spec, a, b, device="cpu")
    assert sweeps > 2 and torch_sweeps == sweeps
    for p in theirs:
        np.testing.assert_array_equal(on_torch[p], theirs[p])


def test_unknown_matching_backend_is_refused_before_work():
    rng = np.random.default_rng(0)
    a = ref.mlp_params(rng, (6, 8, 3))
    with pytest.raises(cb.errors.UnknownNameError, match="backend"):
        cb.weight_matching(ref.mlp_spec(2), a, a, backend="no-such-backend")


def test_gain_is_the_change_of_the_objective():
    rng = np.random.default_rng(5)
    a = ref.mlp_params(rng, (12, 40, 36, 4))
    b = ref.mlp_params(rng, (12, 40, 36, 4))
    spec = ref.mlp_spec(3)
    problem = matching_terms.Problem(spec, a, b)
    perm = dict(cb.random_permutation(spec, a, seed=rng))
    for moved in (2, 40):  # exact path (few units) and cost-matrix path (many)
        new = perm["P0"].copy()
        idx = rng.choice(40, size=moved, replace=False)
        new[idx] = new[rng.permutation(idx)]
        gain, _ = problem.gain("P0", perm, new, problem.cost("P0", perm))
        want = cb.matching_objective(spec, a, b, {**perm, "P0": new}) - cb.matching_objective(spec, a, b, perm)
        exact = moved == 2
        assert gain == pytest.approx(want, rel=1e-12 if exact else 1e-5, abs=1e-12 if exact else 1e-5)


def test_permutation_on_two_axes_of_one_parameter():
    """A square weight permuted on both axes (a recurrent matrix): gain and result exact."""
    rng = np.random.default_rng(6)
    spec = cb.PermutationSpec({"w_in": ("P", None), "w_rec": ("P", "P"), "w_out": (None, "P")})
    a = {"w_in": rng.normal(size=(24, 4)), "w_rec": rng.normal(size=(24, 24)), "w_out": rng.normal(size=(3, 24))}
    planted = cb.Permutation({"P": rng.permutation(24)})  # moves more units than are valued one by one
    b = cb.apply_permutation(spec, cb.invert_permutation(planted), a)
    problem = matching_terms.Problem(spec, a, b)
    perm = {"P": np.arange(24)}
    gain, _ = problem.gain("P", perm, planted["P"], problem.cost("P", perm))
    want = cb.matching_objective(spec, a, b, planted) - cb.matching_objective(spec, a, b, perm)
    assert gain == pytest.approx(want, rel=1e-12)
    found = cb.weight_matching(spec, a, b, seed=0, restarts=4)
    np.testing.assert_array_equal(found["P"], planted["P"])


def test_float32_parameters_keep_an_exact_objective():
    rng = np.random.default_rng(7)
    a = {k: v.astype(np.float32) for k, v in ref.mlp_params(rng, (20, 32, 32, 6)).items()}
    spec = ref.mlp_spec(3)
    _, b = _plant(spec, a, 8, noise=0.5)
    b = {k: v.astype(np.float32) for k, v in b.items()}
    perm = cb.weight_matching(spec, a, b, seed=0)
    want = sum(np.vdot(a[k].astype(np.float64), v.astype(np.float64))
               for k, v in cb.apply_permutation(spec, perm, b).items())
    assert perm.objective == pytest.approx(want, rel=1e-12)


def test_generator_seed_is_one_integer_seed():
    """A Generator seed is asked for one integer: the same state gives the same result."""
    rng = np.random.default_rng(9)
    a = ref.mlp_params(rng, (10, 24, 24, 3))
    b = ref.mlp_params(rng, (10, 24, 24, 3))
    spec = ref.mlp_spec(3)
    first = cb.weight_matching(spec, a, b, seed=np.random.default_rng(42), restarts=1)
    again = cb.weight_matching(spec, a, b, seed=np.random.default_rng(42), restarts=1)
    as_int = cb.weight_matching(spec, a, b, seed=int(np.random.default_rng(42).integers(2**63)), restarts=1)
    for p in first:
        np.testing.assert_array_equal(first[p], again[p])
        np.testing.assert_array_equal(first[p], as_int[p])


def _optimum(cost):
    """scipy's minimum total of ``cost``: the independent reference."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].sum()


def _is_optimal(cost, x, tol=1e-9):
    n = len(cost)
    return sorted(np.asarray(x).tolist()) == list(range(n)) and \
        cost[np.arange(n), x].sum() == pytest.approx(_optimum(cost), abs=tol * max(1.0, abs(_optimum(cost))))


@pytest.mark.parametrize("ties", [False, True])
def test_warm_assignment_is_optimal_from_any_start(ties):
    """The warm-started solver (run here as plain Python) reaches scipy's optimum from any prices,
    any full or partial assignment and a cold start from the reductions, with ties or without."""
    rng = np.random.default_rng(10)
    for _ in range(40):
        n = int(rng.integers(1, 25))
        cost = rng.integers(0, 3, size=(n, n)).astype(float) if ties else rng.normal(size=(n, n))
        # any prices: random, zeros, or the column minima of a cold start (column reduction)
        prices = (rng.normal(size=n), np.zeros(n), cost.min(axis=0))[n % 3].copy()
        x = rng.permutation(n).astype(np.int64)
        for _ in range(3):  # then warm from the last solution and prices on a changed matrix
            x = assignment.warm_assignment(cost, x.copy(), prices)
            assert _is_optimal(cost, x)
            partial = x.copy()
            partial[rng.random(n) < 0.5] = -1  # rows without a column are free
            assert _is_optimal(cost, assignment.warm_assignment(cost, partial, rng.normal(size=n)))
            cold_x, cold_v = np.full(n, -7), np.full(n, np.nan)  # only written
            left = assignment.reduction_start(cost, cold_x, cold_v)
            assert left == np.sum(cold_x == -1)
            assert len(set(cold_x[cold_x >= 0].tolist())) == n - left  # no column twice
            assert _is_optimal(cost, assignment.warm_assignment(cost, cold_x, cold_v))
            cost = cost + 0.1 * rng.normal(size=(n, n))


@pytest.mark.parametrize("ties", [False, True])
def test_auction_start_is_eps_optimal(ties):
    """The auction (plain Python) ends with a permutation in which every row is within ``n·ε``
    of its cheapest column at the prices it returns (ε-complementary slackness), or gives up
    at its bid limit; the warm solver completes it to scipy's optimum."""
    rng = np.random.default_rng(14)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        cost = rng.integers(0, 3, size=(n, n)).astype(float) if ties else rng.normal(size=(n, n))
        x, v = np.full(n, -7), np.full(n, np.nan)
        last = 1e-3
        assert assignment.auction_start(cost, x, v, 0.5, last, 4.0, 10**6)
        assert sorted(x.tolist()) == list(range(n))
        reduced = cost - v[None, :]
        assert np.all(reduced[np.arange(n), x] <= reduced.min(axis=1) + last + 1e-12)
        assert _is_optimal(cost, assignment.warm_assignment(cost, x.copy(), v.copy()))
        assert not assignment.auction_start(cost, x, v, 0.5, last, 4.0, n - 1)  # fewer bids than rows


def test_cold_solve_from_an_auction_is_optimal(monkeypatch):
    """:func:`min_assignment` cold, with the auction on (any size, any rows left), in plain Python:
    scipy's optimum, also where the auction gives up (a limit of one bid per unit)."""
    monkeypatch.setattr(assignment, "compiled_warm_assignment", lambda: assignment.warm_assignment)
    monkeypatch.setattr(assignment, "compiled_reduction_start", lambda: assignment.reduction_start)
    monkeypatch.setattr(assignment, "compiled_auction_start", lambda: assignment.auction_start)
    monkeypatch.setattr(assignment, "AUCTION_UNITS", 2)
    monkeypatch.setattr(assignment, "AUCTION_FREE", 0.0)
    rng = np.random.default_rng(15)
    for limit in (400, 1):
        monkeypatch.setattr(assignment, "_AUCTION_BIDS_PER_UNIT", limit)
        for kind in ("normal", "integers", "constant"):
            n = int(rng.integers(3, 30))
            cost = {"normal": rng.normal(size=(n, n)), "integers": rng.integers(0, 3, size=(n, n)).astype(float),
                    "constant": np.ones((n, n))}[kind]
            x = assignment.min_assignment(cost, np.full(n, -7), np.full(n, np.nan), True)
            assert _is_optimal(cost, x), (limit, kind)


def test_warm_solver_takes_the_reference_steps(monkeypatch):
    """With the warm-started solver in place of scipy: still the reference's descent."""
    monkeypatch.setattr(assignment, "compiled_warm_assignment", lambda: assignment.warm_assignment)
    rng = np.random.default_rng(11)
    a = ref.mlp_params(rng, (20, 32, 24, 4))
    b = ref.mlp_params(rng, (20, 32, 24, 4))  # unrelated: a real descent
    spec = ref.mlp_spec(3)
    for seed in (0, 1):
        ours = cb.weight_matching(spec, a, b, seed=seed)
        theirs, sweeps = rebasin.weight_matching(seed, spec, a, b)
        assert ours.iterations == sweeps
        for p in theirs:
            np.testing.assert_array_equal(ours[p], theirs[p])


def test_a_large_parameter_does_not_stop_the_descent_elsewhere():
    """A parameter of huge values (as a stem's or a norm's running variance can be) on a
    permutation of its own makes the objective ~1e16: the gains of every other step are
    compared with what that step changes, not with the whole objective, which made them all
    look negligible (the descent stopped after its first sweep, short of the reference's)."""
    rng = np.random.default_rng(16)
    a = ref.mlp_params(rng, (12, 32, 24, 3))
    b = ref.mlp_params(rng, (12, 32, 24, 3))  # unrelated: a descent of several sweeps
    spec = cb.PermutationSpec({**ref.mlp_spec(3).axes_to_perm, "stats": ("Q",)})
    a["stats"] = 1e6 * np.arange(1.0, 33.0)
    b["stats"] = a["stats"][rng.permutation(32)]
    ours = cb.weight_matching(spec, a, b, seed=0)
    theirs, sweeps = rebasin.weight_matching(0, spec, a, b)
    assert ours.objective > 1e16
    assert ours.iterations == sweeps > 2
    for p in theirs:
        np.testing.assert_array_equal(ours[p], theirs[p])


def test_gain_scale_ignores_equal_entries():
    """The scale of an exact gain is ``Σ |A ⊙ (B_new − B_old)|``: a constant parameter adds nothing."""
    rng = np.random.default_rng(17)
    a = ref.mlp_params(rng, (6, 40, 3))
    spec = cb.PermutationSpec({**ref.mlp_spec(2).axes_to_perm, "const": ("P0",)})
    a["const"] = np.full(40, 1e8)
    b = {k: v + 0.1 * rng.normal(size=v.shape) if k != "const" else v for k, v in a.items()}
    problem = matching_terms.Problem(spec, a, b)
    perm = {"P0": np.arange(40)}
    new = perm["P0"].copy()
    new[[3, 7]] = new[[7, 3]]
    gain, scale = problem.gain("P0", perm, new, problem.cost("P0", perm))
    want = 0.0
    for name, axis in spec.perm_to_axes["P0"]:
        wa, wb = np.moveaxis(a[name], axis, 0), np.moveaxis(b[name], axis, 0)
        want += np.abs(wa[[3, 7]] * (wb[[7, 3]] - wb[[3, 7]])).sum()
    assert scale == pytest.approx(want, rel=1e-12)
    assert scale < 1e3  # the constant's 1e16 products are not in it


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed_is_refused_before_work(seed):
    rng = np.random.default_rng(12)
    a = ref.mlp_params(rng, (6, 8, 3))
    with pytest.raises(cb.ConfigurationError, match="seed must be a non-negative integer, a numpy Generator or None"):
        cb.weight_matching(ref.mlp_spec(2), a, a, seed=seed)
    with pytest.raises(ValueError):  # the built-in it refines
        cb.weight_matching(ref.mlp_spec(2), a, a, seed=seed)


@pytest.mark.parametrize("start", ["column minima", "cold", "auction"])
@pytest.mark.parametrize("kind", ["gram", "hubs", "integers"])
def test_compiled_assignment_matches_scipy_on_large_problems(kind, start, monkeypatch):
    """The compiled solver, cold (from the column minima as prices, from its own reductions, or
    from the auction, forced on) then warm, reaches scipy's optimum at 600 units."""
    from scipy.optimize import linear_sum_assignment

    warm = assignment.compiled_warm_assignment()
    if warm is None:
        pytest.skip("numba is not installed")
    auctions = []
    if start == "auction":
        compiled = assignment.compiled_auction_start()
        monkeypatch.setattr(assignment, "AUCTION_FREE", 0.0)
        monkeypatch.setattr(assignment, "compiled_auction_start",
                            lambda: lambda *args: auctions.append(1) or compiled(*args))
    rng = np.random.default_rng(13)
    n = 600
    if kind == "gram":  # like weight matching: inner products of two noisy copies of the same units
        a = rng.normal(size=(n, 64))
        cost = -(a @ (a[rng.permutation(n)] + rng.normal(size=(n, 64))).T)
    elif kind == "hubs":  # a trained network's: units of very unequal norms, so a few rows hold most column minima
        a = rng.normal(size=(n, 64)) * rng.lognormal(sigma=1.0, size=(n, 1))
        b = (a + 2 * rng.normal(size=(n, 64)))[rng.permutation(n)] * rng.lognormal(sigma=1.0, size=(n, 1))
        cost = -(a @ b.T)
        assert len(set(cost.argmin(axis=0))) < n // 2
    else:  # many ties
        cost = rng.integers(0, 5, size=(n, n)).astype(float)
    if start != "column minima":
        prices = np.empty(n)
        x = assignment.min_assignment(cost, np.empty(n, np.int64), prices, True)
        assert len(auctions) == (start == "auction")
    else:
        prices = cost.min(axis=0)
        x = warm(cost, np.arange(n, dtype=np.int64), prices)
    for _ in range(3):
        rows, cols = linear_sum_assignment(cost)
        assert sorted(x) == list(range(n))
        assert cost[np.arange(n), x].sum() == pytest.approx(cost[rows, cols].sum(), abs=1e-7)
        cost = cost + 0.05 * rng.normal(size=(n, n)) * np.abs(cost).mean()
        x = warm(cost, x.copy(), prices)


@pytest.mark.parametrize(("n", "kind"), [(1, "gram"), (7, "integers"), (300, "gram"), (300, "integers")])
def test_fast_solve_max_reaches_scipys_maximum(n, kind):
    """The cold maximum assignment (numba when installed, else scipy) is a permutation with
    scipy's optimal total, ties included; a non-square matrix goes to scipy."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(n)
    if kind == "gram":
        a = rng.normal(size=(n, 16))
        cost = a @ (a[rng.permutation(n)] + rng.normal(size=(n, 16))).T
    else:
        cost = rng.integers(0, 3, size=(n, n)).astype(np.float32)
    cols = assignment.fast_solve_max(cost)
    rows, best = linear_sum_assignment(cost, maximize=True)
    assert sorted(cols.tolist()) == list(range(n))
    assert float(cost[np.arange(n), cols].sum()) == pytest.approx(float(cost[rows, best].sum()), rel=1e-12)
    wide = rng.normal(size=(3, 5))
    cols = assignment.fast_solve_max(wide)
    rows, best = linear_sum_assignment(wide, maximize=True)
    np.testing.assert_array_equal(cols, best[np.argsort(rows)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_dot64_is_the_float64_sum_of_products(dtype):
    import math

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 29)) * 10.0 ** rng.integers(-3, 4, (37, 29))).astype(dtype)
    y = rng.standard_normal((37, 29)).astype(dtype)
    exact = math.fsum(float(a) * float(b) for a, b in zip(x.ravel(), y.ravel(), strict=True))
    assert matching_terms.dot64(x, y) == pytest.approx(exact, rel=1e-13, abs=1e-9)
    assert matching_terms.dot64(x.T, y.T) == pytest.approx(exact, rel=1e-13, abs=1e-9)  # any memory order
    assert matching_terms.dot64(x[::2], y[::2]) == pytest.approx(
        math.fsum(float(a) * float(b) for a, b in zip(x[::2].ravel(), y[::2].ravel(), strict=True)), rel=1e-13)
    z = x.copy()
    z[3, 4] = np.nan
    assert math.isnan(matching_terms.dot64(z, y))  # NaN is not optimised away


def test_the_next_permutation_s_products_started_early_change_nothing(digits_models, monkeypatch):
    """On a GPU the descent queues the next permutation's products before solving the current
    assignment (``HostArrays.asynchronous``); forced here on the host, where the same code runs
    in the same order: the reference's permutations, sweeps and objective, with prefetches taken."""
    monkeypatch.setattr(matching_terms.HostArrays, "asynchronous", True)
    prefetched = []
    original = matching_terms.Problem.prefetch
    monkeypatch.setattr(matching_terms.Problem, "prefetch",
                        lambda self, p, perm: (prefetched.append(p), original(self, p, perm)))
    pair = cb.ModelPair(digits_models[0], digits_models[1], architecture="mlp", backend="torch")
    rng = np.random.default_rng(21)
    resnet = ref.resnet_spec()
    a_res = ref.resnet_params(rng, c1=12, c2=16)
    for spec, a, b in ((pair.spec, pair.params(0), pair.params(1)),
                       (resnet, a_res, ref.resnet_params(rng, c1=12, c2=16))):
        theirs, sweeps = rebasin.weight_matching(0, spec, a, b)
        ours = cb.weight_matching(spec, a, b, seed=0)
        for p in theirs:
            np.testing.assert_array_equal(ours[p], theirs[p])
        assert ours.iterations == sweeps
        assert ours.objective == pytest.approx(rebasin.objective(spec, a, b, theirs), rel=1e-9)
    assert len(prefetched) >= 4


def test_independent_run_ends_before_a_permutation_that_reads_it():
    """A run of the visit order is solved together: it passes over permutations that are not
    stale and read none of it, and ends before one (stale or not) that reads one in it."""
    from combinability.matching import _independent_run

    users = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "d": set()}  # q -> the permutations whose cost reads q
    everything = set(users)
    assert _independent_run(["a", "c", "d", "b"], 0, everything, users) == (["a", "c", "d"], 3)
    assert _independent_run(["a", "c", "d", "b"], 3, everything, users) == (["b"], 4)
    assert _independent_run(["a", "b", "d"], 0, {"a", "d"}, users) == (["a"], 1)  # b may become stale
    assert _independent_run(["c", "a", "d"], 0, {"a", "d"}, users) == (["a", "d"], 3)  # c read by nothing here
    assert _independent_run(["c", "b"], 0, set(), users) == ([], 2)


def _counting_pool(monkeypatch) -> list[int]:
    """Solve every pair of independent assignments in threads; return the sizes of the runs solved so."""
    sizes: list[int] = []
    pool = matching_terms.solver_threads()
    if pool is None:
        pytest.skip("one core: independent assignments are solved one by one")

    class Counting:
        def map(self, function, *iterables):
            columns = [list(it) for it in iterables]
            sizes.append(len(columns[0]))
            return pool.map(function, *columns)

    monkeypatch.setattr(matching_terms, "THREAD_UNITS", 1)
    monkeypatch.setattr(matching_terms.HostArrays, "solve_in_threads", True)  # as with products on a GPU
    monkeypatch.setattr(matching_terms, "solver_threads", lambda: Counting())
    return sizes


@pytest.mark.parametrize("case", ["trained mlp", "planted resnet"])
def test_assignments_solved_in_threads_take_the_reference_steps(digits_models, case, monkeypatch):
    """Independent assignments solved at once in threads: still the reference's permutation and sweeps."""
    if case == "trained mlp":
        pair = cb.ModelPair(digits_models[0], digits_models[1], architecture="mlp", backend="torch")
        spec, a, b = pair.spec, pair.params(0), pair.params(1)
    else:
        rng = np.random.default_rng(4)
        a = ref.resnet_params(rng, c1=12, c2=16)
        spec = ref.resnet_spec()
        _, b = _plant(spec, a, 5, noise=0.6)
    sizes = _counting_pool(monkeypatch)
    theirs, sweeps = rebasin.weight_matching(1, spec, a, b)
    ours = cb.weight_matching(spec, a, b, seed=1)
    assert max(sizes, default=0) >= 2  # some assignments were solved together
    for p in theirs:
        np.testing.assert_array_equal(ours[p], theirs[p])
    assert ours.iterations == sweeps


def _match_in_child(spec, a, b, queue) -> None:
    matching_terms.THREAD_UNITS = 1
    matching_terms.HostArrays.solve_in_threads = True
    queue.put(dict(cb.weight_matching(spec, a, b, seed=0)))


@pytest.mark.skipif(sys.platform != "linux", reason="forked processes: Linux")
@pytest.mark.filterwarnings("ignore:os.fork")  # jax's warning; the child uses numpy and numba only
def test_solver_threads_work_in_a_forked_process():
    """A process forked after the parent solved in threads (a process pool's worker) solves in
    threads of its own: the parent's pool has no threads there, and using it would hang."""
    import multiprocessing

    if matching_terms.solver_threads() is None:
        pytest.skip("one core: no solver threads")
    rng = np.random.default_rng(0)
    a = ref.mlp_params(rng, (30, 64, 48, 40, 5))
    spec = ref.mlp_spec(4)
    planted, b = _plant(spec, a, 1, 0.1)
    list(matching_terms.solver_threads().map(abs, range(-64, 0)))  # the parent's threads ran, and are idle
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_match_in_child, args=(spec, a, b, queue))
    child.start()
    child.join(120)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "weight matching in a forked process did not finish"
    found = queue.get(timeout=10)
    for p in planted:
        np.testing.assert_array_equal(found[p], planted[p])
