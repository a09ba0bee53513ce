"""The cached cost terms of fast weight matching (:func:`combinability.weight_matching`).

A :class:`Problem` holds, for each permutation, its cost matrix as a sum of float32
terms, one per ``(parameter, axis)`` it binds (:class:`Term`), cached and corrected for
the units that moved since they were computed, plus a constant for terms that depend
on no other permutation. It solves each assignment (warm-started when numba is
installed) and follows the objective by each step's gain.

The terms live in numpy arrays on the CPU by default (:class:`HostArrays`), or in a
backend's arrays on its device (:class:`DeviceArrays`, e.g. torch on a GPU): there the
products and gathers run, and each assembled cost matrix comes back to the host for its
assignment. The exact float64 objective and gains always read the parameters as given.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from combinability import assignment
from combinability.host_memory import float32_array
from combinability.permutation import PermutationSpec, apply_permutation, join_stacks

__all__ = ["Term", "Problem", "HostArrays", "DeviceArrays", "matching_objective", "dot64"]


def matching_objective(spec: PermutationSpec, params_a: Mapping[str, Any], params_b: Mapping[str, Any],
                       perm: Mapping[str, Any]) -> float:
    """``Σ_names ⟨θ_A[name], π(θ_B)[name]⟩`` over the parameters listed in ``spec``."""
    spec, params_a, params_b = join_stacks(spec, params_a, params_b)
    if any(np.ndim(t) == 2 for t in perm.values()):  # orthogonal maps: B's norms folded, checked once
        spec.check_requirements(params_b)
    total = 0.0
    for name in spec.axes_to_perm:  # one parameter at a time: no float64 copy of a whole model
        b = apply_permutation(spec, perm, {name: params_b[name]}, check=False)[name]
        total += dot64(params_a[name], b)
    return total


def _dot64_loop(x: np.ndarray, y: np.ndarray) -> float:  # pragma: no cover - jitted
    """``Σ x_i y_i`` of two flat arrays, each product and the sum in float64 (compiled by numba)."""
    total = 0.0
    for i in range(x.size):
        total += np.float64(x[i]) * np.float64(y[i])
    return total


@functools.cache
def _compiled_dot64() -> Any:
    """:func:`_dot64_loop` compiled by numba (vectorised: it may reorder the sum), or ``None``."""
    try:
        import numba
    except ImportError:
        return None
    compiled = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(_dot64_loop)
    try:
        compiled(np.zeros(2, np.float32), np.zeros(2, np.float32))
    except Exception:  # noqa: BLE001 - any numba failure means "use numpy"
        return None
    return compiled


def dot64(x: Any, y: Any) -> float:
    """``⟨x, y⟩`` summed in float64 (a float32 product is exact in float64).

    With numba, float32 and float64 arrays go through a compiled loop (about 5x faster
    than numpy's float64 ``einsum`` over float32 inputs, which converts them in buffers);
    other types, or without numba, through ``einsum``.
    """
    x, y = np.ravel(x), np.ravel(y)
    compiled = _compiled_dot64()
    if compiled is not None and x.dtype == y.dtype and x.dtype in (np.float32, np.float64):
        return float(compiled(np.ascontiguousarray(x), np.ascontiguousarray(y)))
    return float(np.einsum("i,i->", x, y, dtype=np.float64))


def _float32_copy(x: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """``x`` with its axes in ``order``, C-contiguous float32 (``x`` itself when it already is;
    a copy lives as long as its term: :func:`~combinability.host_memory.float32_array`).

    When the first axis moves and the last does not stay last (a transposition, as
    ``(out, in, h, w)`` to ``(in, h, w, out)``), the copy goes 16 slices of the first
    axis at a time, so that writes stay in cache: about 4x faster than one strided copy.
    """
    moved = np.transpose(x, order)
    if moved.dtype == np.float32 and moved.flags.c_contiguous:
        return moved
    out = float32_array(moved.shape)
    if order[0] == 0 or order[-1] == x.ndim - 1:
        np.copyto(out, moved, casting="same_kind")
        return out
    view = np.transpose(out, np.argsort(order))  # ``out`` seen in x's axis order
    for start in range(0, x.shape[0], 16):
        view[start : start + 16] = x[start : start + 16]
    return out


class HostArrays:
    """Where cost terms live by default: numpy arrays, products on numpy's BLAS."""

    #: Whether independent assignments are solved at once in threads (:meth:`Problem.solve_all`):
    #: not while the products run on the host's BLAS, whose threads, spinning for the next product,
    #: took the cores (on a 2-core CPU: no gain on ResNet-20 x16, 6-8 % slower on x8 and MLPs).
    solve_in_threads = False
    #: Whether products run asynchronously beside the host (a GPU's queue): then the descent
    #: starts the next permutation's products before it solves the current assignment.
    asynchronous = False

    def put(self, x: np.ndarray) -> Any:
        """``x`` (a float32 numpy array) where the products run."""
        return x

    def transposed(self, x: np.ndarray, order: tuple[int, ...]) -> Any:
        """``x`` (any float numpy array) with its axes in ``order``, contiguous float32, where the products run."""
        return _float32_copy(x, order)

    def host(self, x: Any) -> np.ndarray:
        """``x`` as a numpy array."""
        return x

    def take(self, w: Any, index: np.ndarray, axis: int, scratch: dict | None = None) -> Any:
        """``w`` gathered along ``axis``; along axis 0 into a buffer of ``scratch`` kept per shape
        (no fresh pages for every gather).

        The buffered gather is unchecked (``mode="wrap"``): ``index`` is a permutation, checked
        before the descent. numpy's default ``mode="raise"`` with ``out`` copies through a
        temporary buffer, 3-4x slower (ResNet-20 x8: 39 of the matching's 670 ms).
        """
        if axis == 0 and scratch is not None:
            out = scratch.get(w.shape)
            if out is None:
                out = scratch[w.shape] = float32_array(w.shape)
            return np.take(w, index, axis=0, out=out, mode="wrap")
        return np.take(w, index, axis=axis)

    def reshape(self, w: Any, shape: tuple[int, ...]) -> Any:
        return w.reshape(shape)

    def add_to(self, total: Any, x: Any) -> Any:
        """``total + x``, in place where the arrays allow it."""
        total += x
        return total


class DeviceArrays(HostArrays):
    """Cost terms in a backend's arrays on its device (e.g. torch on a GPU).

    Parameters
    ----------
    backend : Backend
        Its :meth:`~combinability.backend.Backend.asarray` moves the float32 copies (and
        each gather's index) to the device; the array-API namespace :meth:`Backend.xp`
        gathers and multiplies there.
    """

    def __init__(self, backend: Any) -> None:
        self.backend, self.xp = backend, backend.xp()
        self.asynchronous = backend.device() != "cpu"
        self.solve_in_threads = self.asynchronous  # the host's cores wait on the device otherwise
        self._indices: dict[bytes, Any] = {}  # gather indices already on the device, by content

    def put(self, x: np.ndarray) -> Any:
        return self.backend.asarray(x)

    def transposed(self, x: np.ndarray, order: tuple[int, ...]) -> Any:
        """Sent as it is, cast and transposed on the device (the host's transposed copies of a
        ResNet-20 x16 took 0.55 s of a 3 s matching on a GPU machine)."""
        xp = self.xp
        w = self.backend.asarray(np.asarray(x))
        if w.dtype != xp.float32:
            w = xp.astype(w, xp.float32)
        if tuple(order) == tuple(range(len(order))):
            return w
        shape = tuple(int(w.shape[ax]) for ax in order)
        # flattening a transposed array copies it in the new order, contiguous: the array API has no ``contiguous``
        return xp.reshape(xp.reshape(xp.permute_dims(w, tuple(order)), (-1,)), shape)

    def host(self, x: Any) -> np.ndarray:
        return self.backend.to_numpy(x)

    def take(self, w: Any, index: np.ndarray, axis: int, scratch: dict | None = None) -> Any:
        """``w`` gathered along ``axis`` on the device.

        The index crosses to the device once per content: every term that reads a permutation
        gathers by the same array, and a copy from the host's (pageable) memory waits for the
        products queued before it, which would undo the overlap of products and assignments.
        """
        index = np.asarray(index, np.int64)
        key = index.tobytes()
        device_index = self._indices.get(key)
        if device_index is None:
            if len(self._indices) >= _DEVICE_INDICES:
                self._indices.pop(next(iter(self._indices)))  # the oldest
            device_index = self._indices[key] = self.backend.asarray(index)
        return self.xp.take(w, device_index, axis=axis)

    def reshape(self, w: Any, shape: tuple[int, ...]) -> Any:
        return self.xp.reshape(w, shape)

    def add_to(self, total: Any, x: Any) -> Any:
        return total + x  # device arrays may be immutable (jax)


class Term:
    """One ``(parameter, axis)`` bound to a permutation ``p``: its share of ``p``'s cost matrix.

    ``value[i, j] = Σ ⟨A unit i, B unit j⟩`` over that parameter, the other axes of B
    permuted by the current permutations. The value is cached in float32 together with
    the permutations it was computed with (``seen``): when one of them changed in a few
    units only, the value is updated by the product of those units' slices (a low-rank
    correction); a term of no other permutation (biases, norms, input and output layers)
    is computed once.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, axis: int, deps: list[tuple[int, str]],
                 scratch: dict[tuple[int, ...], np.ndarray] | None = None, arrays: HostArrays | None = None) -> None:
        self.n = a.shape[axis]
        self.scratch = {} if scratch is None else scratch  # gather buffers by shape, shared by a problem's terms
        self.arrays = HostArrays() if arrays is None else arrays
        # B as (first dep, rest..., unit): the other axes, the first permuted one first.
        # Gathering B's first permuted axis (or, for a correction, B's moved units of it)
        # then copies whole rows, and the product is one GEMM with A's units as rows,
        # ``(unit, first dep, rest...)``, which BLAS reads transposed at no cost when A is
        # held in B's layout. When A's own layout is already that one (the unit axis first,
        # the others in order, as the output axis of a linear or convolution weight), A is
        # read as given: no copy.
        others = [ax for ax in range(a.ndim) if ax != axis]
        if deps:
            others.remove(deps[0][0])
            others.insert(0, deps[0][0])
        order = (*others, axis)
        self.a: Any = None  # A in B's layout, where A's own is not the one of its units as rows
        if (axis, *others) == tuple(range(a.ndim)):
            self.a_units = self.arrays.reshape(self.arrays.transposed(a, tuple(range(a.ndim))), (self.n, -1))
        else:
            self.a = self.arrays.transposed(a, order)
            self.a_units = self.arrays.reshape(self.a, (-1, self.n)).T
        self.first = int(a.shape[others[0]]) if others else 1  # units of the first dep
        self.b = self.arrays.transposed(b, order)
        self.b_shape = tuple(int(s) for s in self.b.shape)
        self.deps = [(others.index(ax), q) for ax, q in deps]  # (axis of self.b, permutation name)
        self.seen: dict[str, np.ndarray] = {}
        self.value: np.ndarray | None = None
        self.updates = 0

    def _full(self, perm: Mapping[str, np.ndarray]) -> Any:
        w, arrays = self.b, self.arrays
        for k, (ax, q) in enumerate(self.deps):
            index = perm[q]
            if np.array_equal(index, np.arange(len(index))):  # the identity reads B as it is
                continue
            # the first gather (whole rows) goes into a buffer kept per shape
            w = arrays.take(w, index, ax, self.scratch if k == 0 else None)
        return self.a_units @ arrays.reshape(w, (-1, self.n))

    def refresh(self, perm: Mapping[str, np.ndarray]) -> bool:
        """Bring :attr:`value` up to date with ``perm``; return whether it changed."""
        if self.value is not None:
            changed = [(ax, q, np.flatnonzero(self.seen[q] != perm[q])) for ax, q in self.deps]
            changed = [c for c in changed if len(c[2])]
            if not changed:
                return False
            if len(changed) == 1 and len(self.deps) == 1 and self.updates < _MAX_UPDATES:
                ax, q, units = changed[0]
                if len(units) < _CORRECT_FRACTION * self.b_shape[ax]:
                    self.value = self._correct(self.value, units, self.seen[q], perm[q])
                    self.seen[q] = perm[q].copy()
                    return True
        self.value = self._full(perm)
        self.seen = {q: perm[q].copy() for _, q in self.deps}
        self.updates = 0
        return True

    def _correct(self, value: Any, units: np.ndarray, old: np.ndarray, new: np.ndarray) -> Any:
        """``value + Σ_{k ∈ units} A[:, k] (B[new[k]] − B[old[k]])``: only the moved units (of the one dep)."""
        arrays = self.arrays
        diff = arrays.take(self.b, new[units], 0) - arrays.take(self.b, old[units], 0)
        if self.a is None:  # A as given: its rows' slices of the moved units
            a_part = arrays.reshape(arrays.take(arrays.reshape(self.a_units, (self.n, self.first, -1)), units, 1),
                                    (self.n, -1))
        else:  # A in B's layout: the moved units' rows
            a_part = arrays.reshape(arrays.take(self.a, units, 0), (-1, self.n)).T
        value = arrays.add_to(value, a_part @ arrays.reshape(diff, (-1, self.n)))
        self.updates += 1
        return value


#: Gather indices a :class:`DeviceArrays` keeps on its device (the permutations' current ones, and recent ones).
_DEVICE_INDICES = 64
#: A term is corrected (not recomputed) when fewer than this fraction of its dep's units moved.
_CORRECT_FRACTION = 0.75
#: Low-rank corrections of a cached term before it is recomputed (bounds float32 drift).
_MAX_UPDATES = 16
#: Moves of at most this many units (or n/16) are valued exactly, in float64.
_EXACT_UNITS = 8


#: Independent assignments are solved in threads when at least two have this many units
#: (below, a solve takes about as long as handing it to a thread).
THREAD_UNITS = 128


_solver_pool: tuple[int, concurrent.futures.ThreadPoolExecutor | None] | None = None  # (process id, pool)


def solver_threads() -> concurrent.futures.ThreadPoolExecutor | None:
    """The threads that solve independent assignments at once: one per core this process may
    use (at most 8), or ``None`` on a single core.

    One pool per process: a process forked from one that had a pool (a worker of a process
    pool) starts its own, as the forked copy has no threads behind it.
    """
    global _solver_pool
    if _solver_pool is None or _solver_pool[0] != os.getpid():
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        pool = None if cores < 2 else concurrent.futures.ThreadPoolExecutor(
            min(cores, 8), thread_name_prefix="combinability-assignment")
        _solver_pool = (os.getpid(), pool)
    return _solver_pool[1]


class Problem:
    """The weight-matching problem of one pair: cached cost terms and the exact objective.

    Parameters
    ----------
    spec : PermutationSpec
    a, b : mapping of str to numpy.ndarray
        The two models' parameters as given (any float dtype; read for the exact,
        float64 objective); float32 copies feed the cost matrices.
    arrays : HostArrays, optional
        Where the float32 copies live and the products run (default: numpy on the CPU;
        :class:`DeviceArrays` for a backend's device).
    """

    def __init__(self, spec: PermutationSpec, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                 arrays: HostArrays | None = None) -> None:
        self.spec, self.a, self.b = spec, a, b
        self.arrays = HostArrays() if arrays is None else arrays
        self.sizes = spec.perm_sizes(a)
        self.names = list(self.sizes)
        self.terms: dict[str, list[Term]] = {p: [] for p in self.names}
        self.constant: dict[str, np.ndarray] = {}
        self.users: dict[str, set[str]] = {p: set() for p in self.names}  # q -> the p whose cost reads q
        self.self_bound: set[str] = set()
        self.prices: dict[str, np.ndarray] = {}  # column prices of each permutation's last solve
        self._identity = {p: np.arange(n) for p, n in self.sizes.items()}
        scratch: dict[tuple[int, ...], np.ndarray] = {}  # the terms' gather buffers
        for p, entries in spec.perm_to_axes.items():
            const = self.arrays.put(np.zeros((self.sizes[p], self.sizes[p]), np.float32))
            for name, axis in entries:
                deps = self._deps(name, axis)
                term = Term(a[name], b[name], axis, deps, scratch, self.arrays)
                if deps:
                    self.terms[p].append(term)
                    for _, q in deps:
                        self.users[q].add(p)
                        if q == p:
                            self.self_bound.add(p)
                else:
                    const = self.arrays.add_to(const, term._full({}))
            self.constant[p] = const

    def _deps(self, name: str, axis: int) -> list[tuple[int, str]]:
        """The other permuted axes of ``name``: ``(axis, permutation name)``."""
        return [(ax, q) for ax, q in enumerate(self.spec.axes_to_perm[name]) if q is not None and ax != axis]

    def prefetch(self, p: str, perm: Mapping[str, np.ndarray]) -> None:
        """Bring ``p``'s terms up to date with ``perm`` now (on a GPU: queue their products, which
        then run while the host solves an assignment); :meth:`cost` later recomputes only what
        changed in between."""
        for term in self.terms[p]:
            term.refresh(perm)

    def cost(self, p: str, perm: Mapping[str, np.ndarray]) -> np.ndarray:
        """``p``'s cost matrix (float32 numpy) with every other permutation at ``perm``."""
        for term in self.terms[p]:
            term.refresh(perm)
        values = [term.value for term in self.terms[p]]
        # a new array (the constant and the cached terms stay as they are), then sums in place
        total = self.constant[p] + values[0] if values else self.constant[p] * 1
        for value in values[1:]:
            total = self.arrays.add_to(total, value)
        return self.arrays.host(total)

    def solve(self, p: str, cost: np.ndarray, current: np.ndarray) -> np.ndarray:
        """The maximum assignment of ``cost``, as the column of each row.

        Warm-started from ``current`` and the prices of ``p``'s last solve when numba
        is installed (:func:`combinability.assignment.min_assignment`; ``p``'s first solve is
        cold, from an auction's prices on large problems), else scipy's cold solve.
        """
        if assignment.compiled_warm_assignment() is None or len(current) == 0:
            return assignment.solve_max(cost)
        loss = -cost.astype(np.float64)
        cold = p not in self.prices
        if cold:  # the first solve: prices from an auction or the reductions of ``loss``
            self.prices[p] = np.empty(len(current))
        return assignment.min_assignment(loss, current.astype(np.int64), self.prices[p], cold)

    def solve_all(self, ps: list[str], costs: list[np.ndarray], perm: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """:meth:`solve` for each of ``ps`` (independent problems: each reads only its own prices).

        Where the products run on a device (:attr:`HostArrays.solve_in_threads`) and the solver
        is compiled (it releases the GIL), two or more problems of at least :data:`THREAD_UNITS`
        units are solved at once in threads (:func:`solver_threads`); the solutions are the
        same as one by one.
        """
        threads = len(ps) > 1 and self.arrays.solve_in_threads and assignment.compiled_warm_assignment() is not None
        pool = solver_threads() if threads else None
        if pool is None or sum(len(perm[p]) >= THREAD_UNITS for p in ps) < 2:
            return [self.solve(p, cost, perm[p]) for p, cost in zip(ps, costs, strict=True)]
        return list(pool.map(self.solve, ps, costs, [perm[p] for p in ps]))

    def objective(self, perm: Mapping[str, np.ndarray]) -> float:
        """The exact (float64) objective ``Σ ⟨θ_A, π(θ_B)⟩`` (:func:`matching_objective`).

        One parameter at a time, gathering only along the axes whose permutation is not
        the identity (a start from the identity reads B as it is).
        """
        moved = {q for q, pq in perm.items() if not np.array_equal(pq, self._identity[q])}
        total = 0.0
        for name, axes in self.spec.axes_to_perm.items():
            b = self.b[name]
            for axis, q in enumerate(axes):
                if q in moved:
                    b = np.take(b, perm[q], axis=axis)
            total += dot64(self.a[name], b)
        return total

    def gain(self, p: str, perm: Mapping[str, np.ndarray], new: np.ndarray,
             cost: np.ndarray) -> tuple[float, float]:
        """Change of the objective when ``perm[p]`` becomes ``new``, the others held, and its scale.

        When many units move, their entries of the float32 ``cost`` summed in float64 (the
        rounding is far below such a gain); when few move (where a gain can be as small as
        the rounding), the exact float64 change, read from the moved units' slices only
        (whole parameters if ``p`` acts on two axes of one parameter).

        Returns
        -------
        gain : float
        scale : float
            The sum of the absolute values the gain adds up: a step is taken when its gain
            exceeds ``tol`` times this (:func:`combinability.weight_matching`). For few units,
            ``Σ |A ⊙ (B_new − B_old)|`` over their slices, so that a parameter whose moved
            entries are equal (a constant, however large) weighs nothing; for many, the moved
            entries of ``cost``, at which the float32 rounding is.
        """
        old = perm[p]
        units = np.flatnonzero(old != new)
        if len(units) > max(_EXACT_UNITS, len(old) // 16) and p not in self.self_bound:
            taken = cost[units, new[units]].astype(np.float64)
            left = cost[units, old[units]].astype(np.float64)
            return float(taken.sum() - left.sum()), float(np.abs(taken).sum() + np.abs(left).sum())
        return self._exact_gain(p, perm, new, units)

    def _exact_gain(self, p: str, perm: Mapping[str, np.ndarray], new: np.ndarray,
                    units: np.ndarray) -> tuple[float, float]:
        old = perm[p]
        if p in self.self_bound:
            names = {name for name, _ in self.spec.perm_to_axes[p]}
            part = PermutationSpec({k: self.spec.axes_to_perm[k] for k in names})
            after = matching_objective(part, self.a, self.b, {**perm, p: new})
            before = matching_objective(part, self.a, self.b, perm)
            return after - before, abs(after) + abs(before)
        total, scale = 0.0, 0.0
        for name, axis in self.spec.perm_to_axes[p]:
            a_rows = np.take(self.a[name], units, axis=axis)
            b_new = np.take(self.b[name], new[units], axis=axis)
            b_old = np.take(self.b[name], old[units], axis=axis)
            for ax, q in enumerate(self.spec.axes_to_perm[name]):
                if q is not None and ax != axis:
                    b_new, b_old = np.take(b_new, perm[q], axis=ax), np.take(b_old, perm[q], axis=ax)
            # float32 inputs: the difference and each product are exact in float64, only the sum rounds
            change = a_rows.astype(np.float64) * (b_new.astype(np.float64) - b_old)
            total += float(change.sum())
            scale += float(np.abs(change).sum())
        return total, scale
