"""Linear assignment solvers of weight matching: scipy's exact solve, and a warm-started one.

:func:`solve_max` is :func:`scipy.optimize.linear_sum_assignment` (imported on first use;
it costs 0.3 s to import). :func:`warm_assignment` is Jonker–Volgenant's augmentation
warm-started from an assignment and column prices — exact for any start, and fast when
the start is nearly optimal, as between two sweeps of weight matching; it is compiled by
numba when numba is installed (:func:`compiled_warm_assignment`), else not used.
A large problem solved cold starts from the assignment and prices of an ε-scaling
auction (:func:`auction_start`), which the augmentation then completes exactly
(:func:`min_assignment`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

__all__ = [
    "linear_sum_assignment",
    "solve_max",
    "fast_solve_max",
    "min_assignment",
    "warm_assignment",
    "reduction_start",
    "auction_start",
    "compiled_warm_assignment",
    "compiled_reduction_start",
    "compiled_auction_start",
]

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
    :func:`min_assignment` when numba is installed, else :func:`solve_max`. Ties may be
    broken otherwise than scipy breaks them."""
    n = cost.shape[0]
    if compiled_warm_assignment() is None or cost.ndim != 2 or n != cost.shape[1] or n == 0:
        return solve_max(cost)
    loss = -np.asarray(cost, dtype=np.float64)
    return min_assignment(loss, np.empty(n, np.int64), np.empty(n), True)


#: Cold problems of at least this many units start from an auction (:func:`auction_start`)
#: when the reductions leave more than this fraction of their rows without a column: on
#: weight matching's trained costs 1.5-3x faster than from the reductions at 512 units and
#: 3x at 1,024, slower at 256 and below, and slower where the reductions assign most rows.
AUCTION_UNITS = 512
AUCTION_FREE = 0.25
#: The auction's first ε, as a fraction of the cost's spread, its last (divided by the
#: units), and the factor ε shrinks by between phases (the fastest of a grid on trained
#: MLPs' and ResNet-20's costs of 512 and 1,024 units).
_AUCTION_FIRST, _AUCTION_LAST, _AUCTION_FACTOR = 0.1, 1e-3, 8.0
#: Bids per unit after which an auction gives up (a price war on a degenerate cost), leaving
#: the reductions to start the solve.
_AUCTION_BIDS_PER_UNIT = 400


def min_assignment(cost: np.ndarray, x: np.ndarray, v: np.ndarray, cold: bool) -> np.ndarray:
    """Minimum assignment of ``cost`` (float64, square) by the compiled :func:`warm_assignment`.

    Warm, from ``x`` and the prices ``v`` (updated in place). Cold (``x`` and ``v`` are then
    only written), from row and column reduction (:func:`reduction_start`); when they leave
    more than :data:`AUCTION_FREE` of the rows without a column on a problem of at least
    :data:`AUCTION_UNITS` units, from an ε-scaling auction's assignment and prices instead
    (:func:`auction_start`), unless the auction gives up. Exact in every case. Needs numba
    (:func:`compiled_warm_assignment` is not ``None``).
    """
    warm = compiled_warm_assignment()
    if cold:
        n = len(x)
        left = compiled_reduction_start()(cost, x, v)
        if n >= AUCTION_UNITS and left > AUCTION_FREE * n:
            spread = float(cost.max() - cost.min())  # finite and positive, else no auction
            auction = compiled_auction_start()
            if auction is not None and np.isfinite(spread) and spread > 0:
                prices, columns = np.empty(n), np.empty(n, np.int64)
                first, last = spread * _AUCTION_FIRST, spread * _AUCTION_LAST / n
                if auction(cost, columns, prices, first, last, _AUCTION_FACTOR, _AUCTION_BIDS_PER_UNIT * n):
                    x[:], v[:] = columns, prices
    return warm(cost, x, v)


def reduction_start(cost: np.ndarray, x: np.ndarray, v: np.ndarray) -> int:  # pragma: no cover - jitted
    """A cold start for :func:`warm_assignment`: prices from row then column reduction,
    and each row's cheapest column if no row took it before.

    Row reduction subtracts each row's minimum, column reduction then takes each column's
    minimum as its price ``v``; row ``i`` then takes a column of least reduced cost
    ``cost[i, j] - v[j]`` if one is still untaken (``x[i] = -1`` otherwise). On weight
    matching's costs both reductions matter: there the column minima of a trained network's
    cost often fall on a few rows (units of large norm), so that column reduction alone
    assigns a few dozen of 256 rows, and its solve took 2x as long as from zero prices.

    Parameters
    ----------
    cost : numpy.ndarray, float64, shape (n, n)
    x, v : numpy.ndarray, int64 and float64, shape (n,)
        Written: the column of each row (``-1`` for none) and the column prices.

    Returns
    -------
    int
        How many rows are left without a column.
    """
    n = cost.shape[0]
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
    taken = np.zeros(n)  # 0 for a free column, inf for a taken one: the cheapest free column is a minimum
    left = 0
    for i in range(n):  # row i takes a cheapest column if one is untaken
        low, low_free = np.inf, np.inf
        for j in range(n):  # branch-free (it vectorises): the cheapest, and the cheapest untaken
            d = cost[i, j] - v[j]
            low = min(low, d)
            low_free = min(low_free, d + taken[j])
        x[i] = -1
        if low_free == low:
            j = 0
            while cost[i, j] - v[j] != low or taken[j] != 0:
                j += 1
            x[i], taken[j] = j, np.inf
        else:
            left += 1
    return left


def warm_assignment(cost: np.ndarray, x: np.ndarray, v: np.ndarray) -> np.ndarray:  # pragma: no cover - jitted
    """Minimum assignment of ``cost``, warm-started from an assignment and column prices.

    Jonker and Volgenant's shortest augmenting paths on reduced costs ``cost[i, j] - v[j]``.
    Rows whose column ``x[i]`` is still a cheapest one for them keep it; the others, and
    the rows without one (``x[i] = -1``), are free. Each free row is then assigned by one
    shortest augmenting path (Dijkstra over the columns); the prices ``v`` are updated in
    place. Exact for any start.

    The loops over columns are written to vectorise: a scanned column is set apart by an
    infinite distance and price (not skipped by a branch), the distances through a row are
    updated by selects (not a branch), and the minimum distance and the minimum over free
    columns (an infinite penalty on taken ones) are taken in a pass of their own; a short
    scan then finds a closest column, a free one on ties. On weight matching's 512-unit
    costs a path step costs about a third of one loop doing all of this with branches.

    Fast when the start is nearly optimal, as between two sweeps of weight matching. A cold
    solve starts from :func:`reduction_start` (both reductions together take about as long
    as scipy's solve, or less), or from :func:`auction_start` (:func:`min_assignment`).
    (Jonker and Volgenant's augmenting row reduction was tried as well: no faster on these
    problems, cold or warm.) Plain loops, compiled by numba when it is installed
    (:func:`compiled_warm_assignment`).

    Parameters
    ----------
    cost : numpy.ndarray, float64, shape (n, n)
    x : numpy.ndarray, int64, shape (n,)
        Row ``i``'s column ``x[i]``, ``-1`` for none, no column twice; modified and returned.
    v : numpy.ndarray, float64, shape (n,)
        Column prices, updated in place: those of the last solve to warm-start (or any
        finite prices, e.g. the column minima of ``cost``).
    """
    n = cost.shape[0]
    y = np.full(n, -1, np.int64)  # the row of each column, -1 when free
    free = np.empty(n, np.int64)
    n_free = 0
    for i in range(n):
        if x[i] >= 0:
            y[x[i]] = i
    for i in range(n):
        if x[i] < 0:
            free[n_free] = i
            n_free += 1
            continue
        low = np.inf
        for j in range(n):
            low = min(low, cost[i, j] - v[j])
        if cost[i, x[i]] - v[x[i]] > low:
            free[n_free] = i
            n_free += 1
            y[x[i]] = -1
            x[i] = -1
    taken = np.zeros(n)  # 0 for a free column, inf for a taken one: the cheapest free column is a minimum
    dist = np.empty(n)
    pred = np.empty(n, np.int32)  # the row each closest distance came through
    blocked = v.copy()  # v, or -inf for the columns scanned by this path: no distance through them changes
    for j in range(n):
        if y[j] >= 0:
            taken[j] = np.inf
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


def auction_start(cost: np.ndarray, x: np.ndarray, v: np.ndarray, eps: float,  # pragma: no cover - jitted
                  eps_last: float, factor: float, max_bids: int) -> bool:
    """An ε-optimal assignment and prices of ``cost`` (minimum) by Bertsekas' ε-scaling auction.

    Each unassigned row bids for its cheapest column at prices ``v`` (reduced cost
    ``cost[i, j] - v[j]``): it takes the column, evicting its holder, and lowers the
    column's price until the column is ``ε`` dearer than the row's second choice. Rows bid
    one at a time, in turn (Gauss–Seidel). A phase ends when every row holds a column;
    then ``ε`` shrinks by ``factor`` and the next phase starts afresh from the prices
    (the first phase from zero prices), down to ``eps_last``.

    What comes out is ε-optimal only (each row within ``n · eps_last`` of its best): it is
    a start for :func:`warm_assignment`, which completes it exactly; on weight matching's
    costs the two together take a third of the time of a cold solve from the reductions
    at 1,024 units. A price war (near-equal rows bidding for the same columns, as on
    degenerate costs, or prices so large that ``ε`` is lost in their rounding) is cut
    at ``max_bids`` bids in all.

    Parameters
    ----------
    cost : numpy.ndarray, float64, shape (n, n)
    x : numpy.ndarray, int64, shape (n,)
        Written: the column of each row.
    v : numpy.ndarray, float64, shape (n,)
        Written: the column prices.
    eps, eps_last, factor : float
        The first ε, the last, and the factor between phases (``> 1``).
    max_bids : int
        Bids after which the auction gives up.

    Returns
    -------
    bool
        Whether it finished (``x`` is then a permutation); ``False`` when it gave up.
    """
    n = cost.shape[0]
    owner = np.empty(n, np.int64)  # the row holding each column, -1 when none
    queue = np.empty(n, np.int64)  # the rows without a column, a ring buffer
    v[:] = 0.0
    bids = 0
    while True:
        owner[:] = -1
        for i in range(n):
            x[i] = -1
            queue[i] = i
        head, waiting = 0, n
        while waiting > 0:
            i = queue[head]
            head = (head + 1) % n
            waiting -= 1
            best, second, column = np.inf, np.inf, 0
            for j in range(n):  # one pass with branches: faster here than separate branch-free passes
                d = cost[i, j] - v[j]
                if d < best:
                    second, best, column = best, d, j
                elif d < second:
                    second = d
            v[column] -= second - best + eps
            holder = owner[column]
            owner[column], x[i] = i, column
            if holder >= 0:
                x[holder] = -1
                queue[(head + waiting) % n] = holder
                waiting += 1
            bids += 1
            if bids > max_bids:
                return False
        if eps <= eps_last:
            return True
        eps = max(eps / factor, eps_last)


def _compile(function: Any, instead: str, *example: Any) -> Any:
    """``function`` compiled by numba and run once on ``example``, or ``None`` without a usable
    numba (a warning then says what is done ``instead``)."""
    try:
        import numba
    except ImportError:
        return None
    compiled = numba.njit(cache=True, nogil=True)(function)
    try:  # compile now: a numba that cannot compile it leaves the fallback in charge
        compiled(*example)
    except Exception as exc:  # noqa: BLE001 - numba raises many kinds; any means "not usable"
        _log.warning("numba could not compile %s (%s); %s", function.__name__, exc, instead)
        return None
    return compiled


@functools.cache
def compiled_warm_assignment() -> Any:
    """:func:`warm_assignment` compiled by numba, or ``None`` when numba is not installed
    (or :func:`reduction_start`, which every cold solve needs, cannot be compiled)."""
    if compiled_reduction_start() is None:
        return None
    return _compile(warm_assignment, "using scipy", np.zeros((2, 2)), np.array([1, -1], np.int64), np.zeros(2))


@functools.cache
def compiled_reduction_start() -> Any:
    """:func:`reduction_start` compiled by numba, or ``None`` when numba is not installed."""
    return _compile(reduction_start, "using scipy", np.zeros((2, 2)), np.empty(2, np.int64), np.empty(2))


@functools.cache
def compiled_auction_start() -> Any:
    """:func:`auction_start` compiled by numba, or ``None`` when numba is not installed."""
    return _compile(auction_start, "cold solves start from the reductions", np.zeros((2, 2)), np.empty(2, np.int64),
                    np.empty(2), 1.0, 0.5, 2.0, 100)
