"""Alignment of two networks modulo permutations of hidden units.

* :func:`weight_matching` — Git Re-Basin's permutation coordinate descent (paper
  appendix C; Ainsworth et al., 2023): maximise ``Σ ⟨θ_A, π(θ_B)⟩`` one permutation at
  a time, each step a linear assignment problem solved exactly. Same descent as the
  original (``benchmarks/reference_rebasin.py`` reimplements it; run 0 follows its
  visit orders), with less work per step: float32 cost matrices, their terms cached and
  corrected for the units that moved, unchanged problems skipped, assignments
  warm-started from the last solve's prices (with numba installed; scipy otherwise),
  and the objective followed incrementally.
* :func:`activation_matching` — one assignment per permutation on the correlation of
  the two networks' activations.
* :func:`perturb_permutation` — the §6.3 robustness probe: the ``k`` lowest-scoring unit
  pairs of one permutation re-matched by a random derangement.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from combinability.errors import AlignmentError, ConfigurationError, IncompatibleModelsError, PermutationSpecError
from combinability.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    check_permutation,
    identity_permutation,
)

__all__ = [
    "weight_matching",
    "matching_objective",
    "activation_matching",
    "unit_correlations",
    "random_derangement",
    "perturb_permutation",
]

_log = logging.getLogger(__name__)


def _linear_sum_assignment(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scipy.optimize.linear_sum_assignment`, imported on first use (it costs 0.3 s to import)."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost, maximize=maximize)


def _as_float_params(spec: PermutationSpec, params: Mapping[str, Any], which: str) -> dict[str, np.ndarray]:
    out = {}
    for name in spec.axes_to_perm:
        if name not in params:
            raise PermutationSpecError(f"parameter {name!r} of the spec is missing from model {which}")
        arr = np.asarray(params[name])
        if not np.all(np.isfinite(arr)):
            from combinability.errors import NonFiniteWeightsError

            raise NonFiniteWeightsError(f"model {which}: parameter {name!r} holds NaN or infinite values")
        out[name] = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float64)
    return out


def matching_objective(spec: PermutationSpec, params_a: Mapping[str, Any], params_b: Mapping[str, Any],
                       perm: Mapping[str, Any]) -> float:
    """``Σ_names ⟨θ_A[name], π(θ_B)[name]⟩`` over the parameters listed in ``spec``."""
    total = 0.0
    for name in spec.axes_to_perm:  # one parameter at a time: no float64 copy of a whole model
        b = apply_permutation(spec, perm, {name: params_b[name]})[name]
        total += float(np.einsum("i,i->", np.ravel(params_a[name]), b.ravel(), dtype=np.float64))
    return total


class _Term:
    """One ``(parameter, axis)`` bound to a permutation ``p``: its share of ``p``'s cost matrix.

    ``value[i, j] = Σ ⟨A unit i, B unit j⟩`` over that parameter, the other axes of B
    permuted by the current permutations. The value is cached in float32 together with
    the permutations it was computed with (``seen``): when one of them changed in a few
    units only, the value is updated by the product of those units' slices (a low-rank
    correction); a term of no other permutation (biases, norms, input and output layers)
    is computed once.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, axis: int, deps: list[tuple[int, str]]) -> None:
        self.n = a.shape[axis]
        self.a = np.ascontiguousarray(np.moveaxis(a, axis, 0), dtype=np.float32)
        self.b = np.ascontiguousarray(np.moveaxis(b, axis, 0), dtype=np.float32)
        self.deps = deps  # (axis of the moved arrays, permutation name)
        self.seen: dict[str, np.ndarray] = {}
        self.value: np.ndarray | None = None
        self.updates = 0

    def _full(self, perm: Mapping[str, np.ndarray]) -> np.ndarray:
        w = self.b
        for ax, q in self.deps:
            w = np.take(w, perm[q], axis=ax)
        return self.a.reshape(self.n, -1) @ w.reshape(self.n, -1).T

    def refresh(self, perm: Mapping[str, np.ndarray]) -> bool:
        """Bring :attr:`value` up to date with ``perm``; return whether it changed."""
        if self.value is not None:
            changed = [(ax, q, np.flatnonzero(self.seen[q] != perm[q])) for ax, q in self.deps]
            changed = [c for c in changed if len(c[2])]
            if not changed:
                return False
            if len(changed) == 1 and len(self.deps) == 1 and self.updates < _MAX_UPDATES:
                ax, q, units = changed[0]
                if 2 * len(units) < self.b.shape[ax]:
                    self.value = self._correct(self.value, ax, units, self.seen[q], perm[q])
                    self.seen[q] = perm[q].copy()
                    return True
        self.value = self._full(perm)
        self.seen = {q: perm[q].copy() for _, q in self.deps}
        self.updates = 0
        return True

    def _correct(self, value: np.ndarray, ax: int, units: np.ndarray, old: np.ndarray,
                 new: np.ndarray) -> np.ndarray:
        """``value + Σ_{k ∈ units} A[:, k] (B[:, new[k]] − B[:, old[k]])ᵀ``: only the moved units."""
        diff = np.take(self.b, new[units], axis=ax) - np.take(self.b, old[units], axis=ax)
        a_part = np.take(self.a, units, axis=ax)
        value += a_part.reshape(self.n, -1) @ diff.reshape(self.n, -1).T
        self.updates += 1
        return value


#: Low-rank corrections of a cached term before it is recomputed (bounds float32 drift).
_MAX_UPDATES = 16
#: Moves of at most this many units (or n/16) are valued exactly, in float64.
_EXACT_UNITS = 8


class _Problem:
    """The weight-matching problem of one pair: cached cost terms and the exact objective.

    Parameters
    ----------
    spec : PermutationSpec
    a, b : mapping of str to numpy.ndarray
        The two models' parameters as given (any float dtype; read for the exact,
        float64 objective); float32 copies feed the cost matrices.
    """

    def __init__(self, spec: PermutationSpec, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
        self.spec, self.a, self.b = spec, a, b
        self.sizes = spec.perm_sizes(a)
        self.names = list(self.sizes)
        self.terms: dict[str, list[_Term]] = {p: [] for p in self.names}
        self.constant: dict[str, np.ndarray] = {}
        self.users: dict[str, set[str]] = {p: set() for p in self.names}  # q -> the p whose cost reads q
        self.self_bound: set[str] = set()
        self.prices: dict[str, np.ndarray] = {}  # column prices of each permutation's last solve
        for p, entries in spec.perm_to_axes.items():
            const = np.zeros((self.sizes[p], self.sizes[p]), np.float32)
            for name, axis in entries:
                deps = self._deps(name, axis)
                term = _Term(a[name], b[name], axis, deps)
                if deps:
                    self.terms[p].append(term)
                    for _, q in deps:
                        self.users[q].add(p)
                        if q == p:
                            self.self_bound.add(p)
                else:
                    const += term._full({})
            self.constant[p] = const

    def _deps(self, name: str, axis: int) -> list[tuple[int, str]]:
        """The other permuted axes of ``name``, numbered as after moving ``axis`` to the front."""
        others = [ax for ax in range(len(self.spec.axes_to_perm[name])) if ax != axis]
        return [(1 + i, self.spec.axes_to_perm[name][ax]) for i, ax in enumerate(others)
                if self.spec.axes_to_perm[name][ax] is not None]

    def cost(self, p: str, perm: Mapping[str, np.ndarray]) -> np.ndarray:
        """``p``'s cost matrix (float32) with every other permutation at ``perm``."""
        for term in self.terms[p]:
            term.refresh(perm)
        total = self.constant[p].copy()
        for term in self.terms[p]:
            total += term.value
        return total

    def solve(self, p: str, cost: np.ndarray, current: np.ndarray) -> np.ndarray:
        """The maximum assignment of ``cost``, as the column of each row.

        Warm-started from ``current`` and the prices of ``p``'s last solve when numba
        is installed (:func:`_warm_assignment`), else scipy's cold solve.
        """
        warm = _compiled_warm_assignment()
        if warm is None or len(current) == 0:
            return _solve(cost)
        prices = self.prices.setdefault(p, np.zeros(len(current)))
        return warm(-cost.astype(np.float64), current.astype(np.int64), prices)

    def objective(self, perm: Mapping[str, np.ndarray]) -> float:
        """The exact (float64) objective ``Σ ⟨θ_A, π(θ_B)⟩``."""
        return matching_objective(self.spec, self.a, self.b, perm)

    def gain(self, p: str, perm: Mapping[str, np.ndarray], new: np.ndarray, cost: np.ndarray) -> float:
        """Change of the objective when ``perm[p]`` becomes ``new``, the others held.

        When many units move, their entries of the float32 ``cost`` summed in float64 (the
        rounding is far below such a gain); when few move (where a gain can be as small as
        the rounding), the exact float64 change, read from the moved units' slices only
        (whole parameters if ``p`` acts on two axes of one parameter).
        """
        old = perm[p]
        units = np.flatnonzero(old != new)
        if len(units) > max(_EXACT_UNITS, len(old) // 16) and p not in self.self_bound:
            gain = cost[units, new[units]].sum(dtype=np.float64) - cost[units, old[units]].sum(dtype=np.float64)
            return float(gain)
        return self._exact_gain(p, perm, new, units)

    def _exact_gain(self, p: str, perm: Mapping[str, np.ndarray], new: np.ndarray, units: np.ndarray) -> float:
        old = perm[p]
        if p in self.self_bound:
            names = {name for name, _ in self.spec.perm_to_axes[p]}
            part = PermutationSpec({k: self.spec.axes_to_perm[k] for k in names})
            trial = {**perm, p: new}
            return (matching_objective(part, self.a, self.b, trial)
                    - matching_objective(part, self.a, self.b, perm))
        total = 0.0
        for name, axis in self.spec.perm_to_axes[p]:
            a_rows = np.take(self.a[name], units, axis=axis)
            b_new = np.take(self.b[name], new[units], axis=axis)
            b_old = np.take(self.b[name], old[units], axis=axis)
            for ax, q in enumerate(self.spec.axes_to_perm[name]):
                if q is not None and ax != axis:
                    b_new, b_old = np.take(b_new, perm[q], axis=ax), np.take(b_old, perm[q], axis=ax)
            total += float(np.einsum("i,i->", a_rows.ravel(), b_new.ravel(), dtype=np.float64)
                           - np.einsum("i,i->", a_rows.ravel(), b_old.ravel(), dtype=np.float64))
        return total


def _seed_int(seed: int | np.random.Generator | None) -> int:
    """One non-negative integer seed: ``seed`` itself, one drawn from a Generator, or fresh entropy."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**63))
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**63)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigurationError(
            f"seed must be a non-negative integer, a numpy Generator or None, got {seed!r}")
    return int(seed)


def _visit_order(seed: int, run: int, sweep: int, count: int) -> np.ndarray:
    """The order of sweep ``sweep`` of run ``run``.

    Run 0 draws from ``default_rng([seed, sweep])``, the orders of the reference
    reimplementation in ``benchmarks/reference_rebasin.py``: from the same start, run 0
    follows Git Re-Basin's own descent.
    """
    if run == 0:
        return np.random.default_rng([seed, sweep]).permutation(count)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(run, sweep))).permutation(count)


def _random_start(seed: int, run: int, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(run,)))
    return {p: rng.permutation(n).astype(np.int64) for p, n in sizes.items()}


def _solve(cost: np.ndarray) -> np.ndarray:
    """The maximum assignment of ``cost`` (exact, scipy), as the column of each row."""
    rows, cols = _linear_sum_assignment(cost, maximize=True)
    return cols[np.argsort(rows)].astype(np.int64)


def _warm_assignment(cost: np.ndarray, x: np.ndarray, v: np.ndarray) -> np.ndarray:  # pragma: no cover - jitted
    """Minimum assignment of ``cost`` warm-started from an assignment and column prices.

    Jonker–Volgenant's augmentation (shortest augmenting paths on reduced costs
    ``cost[i, j] - v[j]``): rows whose column ``x[i]`` is still a cheapest one for them
    keep it, the others are freed and re-assigned one shortest augmenting path each,
    the prices ``v`` updated in place. Exact for any start; fast when the start is
    nearly optimal, as between two sweeps of weight matching. Plain loops, compiled by
    numba when it is installed (:func:`_compiled_warm_assignment`).

    Parameters
    ----------
    cost : numpy.ndarray, float64, shape (n, n)
    x : numpy.ndarray, int64, shape (n,)
        A permutation (row ``i`` to column ``x[i]``); modified and returned.
    v : numpy.ndarray, float64, shape (n,)
        Column prices (zeros for a cold start); updated in place.
    """
    n = cost.shape[0]
    y = np.empty(n, np.int64)
    for i in range(n):
        y[x[i]] = i
    free = np.empty(n, np.int64)
    n_free = 0
    for i in range(n):
        best = np.inf
        for j in range(n):
            best = min(best, cost[i, j] - v[j])
        if cost[i, x[i]] - v[x[i]] > best:
            free[n_free] = i
            n_free += 1
    for k in range(n_free):
        y[x[free[k]]] = -1
        x[free[k]] = -1
    dist = np.empty(n)
    pred = np.empty(n, np.int64)
    done = np.zeros(n, np.bool_)
    scanned = np.empty(n, np.int64)
    for k in range(n_free):
        start = free[k]
        for j in range(n):
            dist[j] = cost[start, j] - v[j]
            pred[j] = start
            done[j] = False
        n_scanned = 0
        while True:
            sink, low = -1, np.inf
            for j in range(n):  # the closest unscanned column, a free one on ties
                if not done[j] and (dist[j] < low or (dist[j] == low and y[j] < 0)):
                    sink, low = j, dist[j]
            if y[sink] < 0:
                break
            done[sink] = True
            scanned[n_scanned] = sink
            n_scanned += 1
            row = y[sink]
            base = low - cost[row, sink] + v[sink]
            for j in range(n):
                if not done[j] and base + cost[row, j] - v[j] < dist[j]:
                    dist[j] = base + cost[row, j] - v[j]
                    pred[j] = row
        for s in range(n_scanned):
            v[scanned[s]] += dist[scanned[s]] - low
        j = sink
        while True:  # flip the path
            row = pred[j]
            y[j] = row
            j, x[row] = x[row], j
            if row == start:
                break
    return x


@functools.cache
def _compiled_warm_assignment() -> Any:
    """:func:`_warm_assignment` compiled by numba, or ``None`` when numba is not installed."""
    try:
        import numba
    except ImportError:
        return None
    compiled = numba.njit(cache=True, nogil=True)(_warm_assignment)
    try:  # compile now: a numba that cannot compile it leaves scipy in charge
        compiled(np.zeros((2, 2)), np.arange(2, dtype=np.int64), np.zeros(2))
    except Exception as exc:  # noqa: BLE001 - numba raises many kinds; any means "not usable"
        _log.warning("numba could not compile the warm-started assignment (%s); using scipy", exc)
        return None
    return compiled


def _descend(problem: _Problem, perm: dict[str, np.ndarray], seed: int, run: int, max_iter: int, tol: float,
             report: Any = None) -> tuple[dict, list[float], int, float]:
    """Permutation coordinate descent from ``perm``: the permutation, history, sweeps and exact objective.

    The objective is followed incrementally: exact at the start and the end, in between
    the sum of the taken gains (see :meth:`_Problem.gain`).
    """
    names = problem.names
    history = [problem.objective(perm)]
    current = history[0]
    stale = set(names)  # permutations whose cost changed since their last solve
    iterations = 0
    for sweep in range(max_iter):
        iterations += 1
        improved = False
        for idx in _visit_order(seed, run, sweep, len(names)):
            p = names[idx]
            if p not in stale:
                continue  # same cost matrix as at its last solve: same solution
            stale.discard(p)
            cost = problem.cost(p, perm)
            new = problem.solve(p, cost, perm[p])
            if np.array_equal(new, perm[p]):
                continue
            gain = problem.gain(p, perm, new, cost)
            if gain > tol * max(1.0, abs(current)):
                perm[p] = new
                current += gain
                improved = True
                stale |= problem.users[p]
        history.append(current)
        if report is not None:
            report(iterations, current)
        if not improved:
            break
    return perm, history, iterations, problem.objective(perm)


class _SweepReporter:
    """The progress line of weight matching: a bar on a terminal, else one log record per sweep."""

    def __init__(self, enabled: bool, runs: int) -> None:
        from combinability.progress import progress_bar

        self.enabled, self.runs, self.run = enabled, runs, 0
        self.bar = progress_bar(None, "weight matching", "sweeps", enabled) if enabled else None

    def start(self, run: int) -> None:
        self.run = run

    def __call__(self, sweep: int, objective: float) -> None:
        if not self.enabled:
            return
        label = f"run {self.run + 1}/{self.runs}, " if self.runs > 1 else ""
        if self.bar is None or self.bar.disable:  # no terminal: a log line instead of the bar
            _log.info("weight matching: %ssweep %d, objective %.6g", label, sweep, objective)
            return
        self.bar.set_postfix_str(f"{label}objective {objective:.6g}", refresh=False)
        self.bar.update(1)
        self.bar.refresh()  # every sweep's objective is shown (a sweep is slower than a redraw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def weight_matching(
    spec: PermutationSpec,
    params_a: Mapping[str, Any],
    params_b: Mapping[str, Any],
    *,
    max_iter: int = 100,
    seed: int | np.random.Generator | None = 0,
    init: Mapping[str, Any] | None = None,
    restarts: int = 0,
    tol: float = 1e-12,
    progress: bool = False,
) -> Permutation:
    """Align ``params_b`` to ``params_a`` by permutation coordinate descent.

    Each sweep visits the permutations in a random order and replaces each by the exact
    solution of its linear assignment problem, the others held fixed. It stops after a
    sweep that improves nothing, or after ``max_iter`` sweeps. This is Git Re-Basin's
    algorithm: from the same start, with the same ``seed``, the first run visits the
    permutations in the orders of the reference reimplementation
    (``benchmarks/reference_rebasin.py``, ``numpy.random.default_rng([seed, sweep])``)
    and takes the same steps, so it reaches the same permutation (unless two
    assignments tie to float32 rounding).

    What is faster than the original: the cost matrices are built in float32 from
    cached terms, one per (parameter, axis); a term is recomputed only when a
    permutation it depends on changed, by a low-rank correction when few units moved;
    the terms of no other permutation (biases, norms, input and output layers) are
    computed once; a permutation whose cost matrix did not change since its last solve
    is not solved again; the objective is updated by each step's gain instead of being
    recomputed. When numba is installed, each assignment is solved by Jonker–Volgenant
    augmentation warm-started from the permutation's current assignment and the
    prices of its last solve (exact, about 6x faster than scipy's cold solve on
    512 units between sweeps); without it, by :func:`scipy.optimize.linear_sum_assignment`.

    Parameters
    ----------
    spec : PermutationSpec
    params_a, params_b : mapping of str to numpy array
        The two models' parameters (same names and shapes).
    max_iter : int, default 100
        Maximum number of sweeps per run.
    seed : int or numpy.random.Generator, default 0
        Seeds the sweep orders and the random starts of restarts (a Generator is
        asked for one integer seed; ``None`` draws fresh entropy).
    init : mapping of str to int array, optional
        Initial permutation of the first run (default: identity).
    restarts : int, default 0
        Extra runs from uniformly random initial permutations; the run with the best
        final objective is returned (single runs can stop in a local optimum).
    tol : float
        Improvement, relative to the objective, below which an assignment is not taken.
    progress : bool, default False
        Report every sweep's objective: a progress line on a terminal
        (:func:`combinability.progress.progress_bar`), elsewhere (a log file, a CI job) an
        ``INFO`` record of the ``combinability.matching`` logger per sweep
        (``weight matching: sweep 3, objective 41.2``).

    Returns
    -------
    Permutation
        ``{name: index array}`` with ``objective`` (exact, float64), ``history``
        (objective at the start, exact, and after each sweep of the best run: the
        start plus the gains taken, exact to the float32 rounding of the cost
        matrices) and ``iterations``.

    Raises
    ------
    PermutationSpecError
        If the spec does not fit the parameters.
    IncompatibleModelsError
        If the two models' shapes differ.
    NonFiniteWeightsError
        If a parameter holds NaN or infinite values.
    ConfigurationError
        If ``max_iter < 1``, ``restarts < 0`` or ``seed`` is not a non-negative integer,
        a Generator or ``None``.
    """
    if max_iter < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}")
    if restarts < 0:
        raise ConfigurationError(f"restarts must be >= 0, got {restarts}")
    base = _seed_int(seed)
    spec.validate(params_a, allow_unlisted=True)
    for name in spec.axes_to_perm:
        if name in params_b and np.shape(params_a[name]) != np.shape(params_b[name]):
            raise IncompatibleModelsError(
                f"parameter {name!r} has shape {np.shape(params_a[name])} in model A but "
                f"{np.shape(params_b[name])} in model B: the models differ in architecture or width"
            )
    a = _as_float_params(spec, params_a, "A")
    b = _as_float_params(spec, params_b, "B")
    if not spec.is_plain:  # heads, experts, orthogonal streams, packed axes
        from combinability.kind_matching import match_symmetries

        return match_symmetries(spec, a, b, seed=base, max_iter=max_iter, init=init, restarts=restarts, tol=tol)
    sizes = spec.perm_sizes(a)
    if init is not None:
        check_permutation(init, sizes)
        start = {p: np.asarray(init[p], dtype=np.int64).copy() for p in sizes}
    else:
        start = dict(identity_permutation(sizes))
    problem = _Problem(spec, a, b)
    best: tuple[dict, list[float], int, float] | None = None
    reporter = _SweepReporter(progress, restarts + 1)
    try:
        for run in range(restarts + 1):
            if run > 0:
                start = _random_start(base, run, sizes)
            reporter.start(run)
            result = _descend(problem, start, base, run, max_iter, tol, reporter)
            if best is None or result[3] > best[3]:
                best = result
    finally:
        reporter.close()
    if best is None:  # pragma: no cover - restarts >= 0 guarantees one run
        raise AlignmentError("weight matching ran no iteration")
    perm, history, iterations, objective = best
    return Permutation(perm, objective=objective, history=history, iterations=iterations, method="weight")


def unit_correlations(acts_a: np.ndarray, acts_b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every unit of A with every unit of B.

    Parameters
    ----------
    acts_a, acts_b : numpy.ndarray, shape (n_observations, units)

    Returns
    -------
    numpy.ndarray, shape (units_a, units_b)
        Units with zero variance correlate 0 with everything.
    """
    a = np.asarray(acts_a, dtype=np.float64)
    b = np.asarray(acts_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise IncompatibleModelsError(
            f"activations must be (observations, units) with the same observations, got {a.shape} and {b.shape}"
        )
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa = np.sqrt((a * a).sum(0))
    sb = np.sqrt((b * b).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (a.T @ b) / np.outer(sa, sb)
    return np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


def activation_matching(acts_a: Mapping[str, np.ndarray], acts_b: Mapping[str, np.ndarray]) -> Permutation:
    """One assignment per permutation maximising the summed activation correlation.

    Parameters
    ----------
    acts_a, acts_b : mapping of permutation name to array (n_observations, units)
        Activations of the units each permutation acts on, for the same inputs.

    Returns
    -------
    Permutation
        ``objective`` is the mean correlation of matched pairs over all permutations.
    """
    if set(acts_a) != set(acts_b):
        raise IncompatibleModelsError(f"activation points differ: {sorted(acts_a)} vs {sorted(acts_b)}")
    perm = {}
    total, count = 0.0, 0
    for p in acts_a:
        corr = unit_correlations(acts_a[p], acts_b[p])
        rows, cols = _linear_sum_assignment(corr, maximize=True)
        perm[p] = cols[np.argsort(rows)].astype(np.int64)
        total += corr[rows, cols].sum()
        count += len(rows)
    return Permutation(perm, objective=total / max(count, 1), history=[total / max(count, 1)], method="activation")


def random_derangement(k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``range(k)`` with no fixed point (``k >= 2``).

    Rejection sampling: about ``e`` tries on average.
    """
    if k < 2:
        raise ConfigurationError(f"a derangement needs at least 2 elements, got k={k}")
    while True:
        sigma = rng.permutation(k)
        if not np.any(sigma == np.arange(k)):
            return sigma.astype(np.int64)


def perturb_permutation(
    perm: Mapping[str, Any],
    name: str,
    scores: np.ndarray,
    k: int,
    seed: int | np.random.Generator | None = 0,
) -> Permutation:
    """Re-match the ``k`` lowest-scoring unit pairs of permutation ``name`` by a derangement.

    Parameters
    ----------
    perm : mapping of str to int array
        The alignment to perturb (B's unit ``perm[name][j]`` is matched to A's unit ``j``).
    name : str
        Which permutation (layer) to perturb.
    scores : numpy.ndarray, shape (n,)
        Score of each matched pair ``j`` (e.g. the activation correlation of A's unit
        ``j`` with its partner); the ``k`` lowest are re-matched.
    k : int
        Number of pairs to re-match, ``2 <= k <= n``.
    seed : int or numpy.random.Generator

    Returns
    -------
    Permutation
        A copy of ``perm`` in which no chosen unit keeps its partner: the chosen A units
        are paired among themselves with a random derangement of their B partners.
    """
    if name not in perm:
        raise PermutationSpecError(f"no permutation named {name!r}; valid: {', '.join(perm)}")
    base = np.asarray(perm[name], dtype=np.int64)
    n = len(base)
    scores = np.asarray(scores)
    if scores.shape != (n,):
        raise ConfigurationError(f"scores must have shape ({n},) for permutation {name!r}, got {scores.shape}")
    if not 2 <= k <= n:
        raise ConfigurationError(f"k must be between 2 and {n} (the units of {name!r}), got {k}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    chosen = np.argsort(scores, kind="stable")[:k]
    sigma = random_derangement(k, rng)
    new = base.copy()
    new[chosen] = base[chosen[sigma]]
    out = Permutation({p: np.asarray(v, dtype=np.int64).copy() for p, v in perm.items()}, method="perturbed")
    out[name] = new
    return out
