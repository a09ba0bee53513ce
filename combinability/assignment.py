"""Linear assignment solvers of weight matching: scipy's exact solve, and a warm-started one.

:func:`solve_max` is :func:`scipy.optimize.linear_sum_assignment` (imported on first use;
it costs 0.3 s to import). :func:`warm_assignment` is Jonker–Volgenant's augmentation
warm-started from an assignment and column prices — exact for any start, and fast when
the start is nearly optimal, as between two sweeps of weight matching; it is compiled by
numba when numba is installed (:func:`compiled_warm_assignment`), else not used.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

__all__ = ["linear_sum_assignment", "solve_max", "fast_solve_max", "warm_assignment", "compiled_warm_assignment"]

_log = logging.getLogger("combinability.matching")


def linear_sum_assignment(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scipy.optimize.linear_sum_assignment`, imported on first use (it costs 0.3 s to import)."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost, maximize=maximize)


def solve_max(cost: np.ndarray) -> np.ndarray:
    """The maximum assignment of ``cost`` (exact, scipy), as the column of each row."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols[np.argsort(rows)].astype(np.int64)


def fast_solve_max(cost: np.ndarray) -> np.ndarray:
    """The maximum assignment of ``cost`` (exact), as the column of each row: a cold
    :func:`warm_assignment` (from row and column reduction) when numba is installed, else
    :func:`solve_max`. Ties may be broken otherwise than scipy breaks them."""
    solve = compiled_warm_assignment()
    n = cost.shape[0]
    if solve is None or cost.ndim != 2 or n != cost.shape[1] or n == 0:
        return solve_max(cost)
    loss = -np.asarray(cost, dtype=np.float64)
    return solve(loss, np.empty(n, np.int64), np.empty(n), True)


def warm_assignment(cost: np.ndarray, x: np.ndarray, v: np.ndarray,  # pragma: no cover - jitted
                    cold: bool = False) -> np.ndarray:
    """Minimum assignment of ``cost``, warm-started from an assignment and column prices, or cold.

    Jonker and Volgenant's shortest augmenting paths on reduced costs ``cost[i, j] - v[j]``.
    Warm: rows whose column ``x[i]`` is still a cheapest one for them keep it; the others
    are freed. Cold (``cold=True``; ``x`` and ``v`` are then only written): row then column
    reduction give the prices, and each row takes a cheapest column that no row took
    before it. Each free row is then assigned by one shortest augmenting path (Dijkstra
    over the columns); the prices ``v`` are updated in place. Exact for any start.

    The loops over columns are written to vectorise: a scanned column is set apart by an
    infinite distance and price (not skipped by a branch), the distances through a row are
    updated by selects (not a branch), and the minimum distance and the minimum over free
    columns (an infinite penalty on taken ones) are taken in a pass of their own; a short
    scan then finds a closest column, a free one on ties. On weight matching's 512-unit
    costs a path step costs about a third of one loop doing all of this with branches.

    Fast warm, when the start is nearly optimal, as between two sweeps of weight matching.
    Cold, the two reductions matter on weight-matching costs: there the column minima of a
    trained network's cost often fall on a few rows (units of large norm), so that column
    reduction alone assigns a few dozen of 256 rows and its solve took 2x as long as from
    zero prices, while both reductions together take about as long as scipy's solve, or less.
    (Jonker and Volgenant's augmenting row reduction was tried as well: no faster on these
    problems, cold or warm.) Plain loops, compiled by numba when it is installed
    (:func:`compiled_warm_assignment`).

    Parameters
    ----------
    cost : numpy.ndarray, float64, shape (n, n)
    x : numpy.ndarray, int64, shape (n,)
        A permutation (row ``i`` to column ``x[i]``); modified and returned.
    v : numpy.ndarray, float64, shape (n,)
        Column prices, updated in place: those of the last solve to warm-start (or any
        prices, e.g. the column minima of ``cost``); written when ``cold``.
    cold : bool, default False
        Ignore ``x`` and ``v`` and start from the two reductions.
    """
    n = cost.shape[0]
    y = np.full(n, -1, np.int64)  # the row of each column, -1 when free
    free = np.empty(n, np.int64)
    n_free = 0
    taken = np.zeros(n)  # 0 for a free column, inf for a taken one: the cheapest free column is a minimum
    if cold:
        u = np.empty(n)
        for i in range(n):
            low = np.inf
            for j in range(n):
                low = min(low, cost[i, j])
            u[i] = low
        v[:] = np.inf
        for i in range(n):  # the column minima, read row by row
            for j in range(n):
                v[j] = min(v[j], cost[i, j] - u[i])
        for i in range(n):  # row i takes a cheapest column if one is untaken
            low, low_free = np.inf, np.inf
            for j in range(n):  # branch-free (it vectorises): the cheapest, and the cheapest untaken
                d = cost[i, j] - v[j]
                low = min(low, d)
                low_free = min(low_free, d + taken[j])
            if low_free == low:
                j = 0
                while cost[i, j] - v[j] != low or taken[j] != 0:
                    j += 1
                x[i], y[j], taken[j] = j, i, np.inf
            else:
                x[i] = -1
                free[n_free] = i
                n_free += 1
    else:
        for i in range(n):
            y[x[i]] = i
        for i in range(n):
            low = np.inf
            for j in range(n):
                low = min(low, cost[i, j] - v[j])
            if cost[i, x[i]] - v[x[i]] > low:
                free[n_free] = i
                n_free += 1
        for k in range(n_free):
            y[x[free[k]]] = -1
            x[free[k]] = -1
    dist = np.empty(n)
    pred = np.empty(n, np.int32)  # the row each closest distance came through
    blocked = v.copy()  # v, or -inf for the columns scanned by this path: no distance through them changes
    for j in range(n):
        taken[j] = np.inf if y[j] >= 0 else 0.0
    scanned = np.empty(n, np.int64)
    scanned_at = np.empty(n)  # the distance at which each scanned column was scanned
    for k in range(n_free):
        start = free[k]
        for j in range(n):
            dist[j] = cost[start, j] - v[j]
            pred[j] = start
        n_scanned = 0
        while True:
            # Each loop below is branch-free, so that it vectorises: about 4x faster than one
            # loop that updates, takes the minimum and tracks its column together.
            low, low_free = np.inf, np.inf
            for j in range(n):
                low = min(low, dist[j])
                low_free = min(low_free, dist[j] + taken[j])
            sink = 0
            if low_free == low:  # a closest column that is free: the path ends there
                while dist[sink] != low or taken[sink] != 0:
                    sink += 1
                break
            while dist[sink] != low:
                sink += 1
            scanned[n_scanned], scanned_at[n_scanned] = sink, low
            n_scanned += 1
            blocked[sink], dist[sink] = -np.inf, np.inf  # scanned: out of later minima and updates
            row = y[sink]
            base = low - cost[row, sink] + v[sink]
            for j in range(n):  # the distances through ``row``
                d = base + cost[row, j] - blocked[j]
                closer = d < dist[j]
                pred[j] = row if closer else pred[j]
                dist[j] = d if closer else dist[j]
        for s in range(n_scanned):
            j = scanned[s]
            v[j] += scanned_at[s] - low
            blocked[j] = v[j]
        taken[sink] = np.inf
        j = sink
        while True:  # flip the path
            row = pred[j]
            y[j] = row
            j, x[row] = x[row], j
            if row == start:
                break
    return x


@functools.cache
def compiled_warm_assignment() -> Any:
    """:func:`warm_assignment` compiled by numba, or ``None`` when numba is not installed."""
    try:
        import numba
    except ImportError:
        return None
    compiled = numba.njit(cache=True, nogil=True)(warm_assignment)
    try:  # compile now: a numba that cannot compile it leaves scipy in charge
        compiled(np.zeros((2, 2)), np.arange(2, dtype=np.int64), np.zeros(2))
        compiled(np.zeros((2, 2)), np.arange(2, dtype=np.int64), np.zeros(2), True)
    except Exception as exc:  # noqa: BLE001 - numba raises many kinds; any means "not usable"
        _log.warning("numba could not compile the warm-started assignment (%s); using scipy", exc)
        return None
    return compiled
