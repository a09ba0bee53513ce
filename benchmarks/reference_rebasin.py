"""Git Re-Basin weight matching as published, in plain numpy and scipy: the yardstick.

A faithful reimplementation of ``weight_matching`` in ``src/weight_matching.py`` of
github.com/samuela/git-re-basin (Ainsworth, Hayase and Srinivasa, *Git Re-Basin: Merging
Models modulo Permutation Symmetries*, ICLR 2023, algorithm 2), kept here so that the
library's matcher (:func:`combinability.weight_matching`) can be timed against it in one
run and its results checked against it in the tests. It imports nothing of the library.

What is kept from the original, step for step:

* the permutation names in the order of first appearance in ``axes_to_perm``;
* the identity as the start (or ``init_perm``);
* each sweep visits all permutations in a fresh random order drawn from a key derived
  from the seed and the sweep number (the original: ``random.permutation(rngmix(rng,
  iteration), n)`` with jax; here ``numpy.random.default_rng([seed, iteration])``);
* for each permutation ``p`` the cost matrix ``A = Σ w_a @ w_b.T`` is rebuilt from scratch
  from every ``(parameter, axis)`` bound to ``p``, with all the *other* axes of B permuted
  by the current permutations, in float32 (jax's default dtype);
* ``scipy.optimize.linear_sum_assignment(A, maximize=True)``, its solution always
  replacing ``perm[p]``; the old and new values are ``vdot(A, eye(n)[perm])``;
* the stopping rule: a sweep with no assignment improving its value by more than
  ``1e-12`` ends the descent, or ``max_iter`` sweeps.

Left out: the ``print`` per permutation (``silent``) and jax itself. The objective is
not computed by the original; :func:`objective` computes it (float64) for comparisons.

On a GPU the original's products run on the GPU (jax places its arrays there), and each
cost matrix goes to the host for scipy. ``weight_matching(..., device="cuda")`` does the
same with torch: the float32 copies of both models, the gathers and the products are on
the device, and each assembled cost matrix comes back for its assignment. The steps are the
same; only the products' rounding differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["perm_to_axes", "visit_order", "weight_matching", "objective"]


def perm_to_axes(axes_to_perm: Mapping[str, tuple[str | None, ...]]) -> dict[str, list[tuple[str, int]]]:
    """Permutation name to its ``(parameter, axis)`` pairs, in order of first appearance."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, axes in axes_to_perm.items():
        for axis, p in enumerate(axes):
            if p is not None:
                out.setdefault(p, []).append((name, axis))
    return out


def visit_order(seed: int, iteration: int, count: int) -> np.ndarray:
    """The order in which sweep ``iteration`` visits the ``count`` permutations."""
    return np.random.default_rng([seed, iteration]).permutation(count)


def _permuted(axes_to_perm: Mapping[str, tuple[str | None, ...]], perm: Mapping[str, np.ndarray], name: str,
              params: Mapping[str, Any], except_axis: int | None = None, take: Any = np.take) -> Any:
    """Parameter ``name`` with every permutation applied but the one on ``except_axis``."""
    w = params[name]
    for axis, p in enumerate(axes_to_perm[name]):
        if axis == except_axis or p is None:
            continue
        w = take(w, perm[p], axis=axis)
    return w


class _DeviceArrays:
    """The few array operations of the descent, on torch tensors on ``device``."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)

    def asarray(self, x: Any) -> Any:
        return self.torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def take(self, w: Any, index: np.ndarray, axis: int) -> Any:
        return self.torch.index_select(w, axis, self.torch.as_tensor(index, device=self.device))

    def moveaxis(self, w: Any, source: int, destination: int) -> Any:
        return self.torch.movedim(w, source, destination)

    def zeros(self, n: int) -> Any:
        return self.torch.zeros((n, n), dtype=self.torch.float32, device=self.device)

    def to_host(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()


class _HostArrays:
    """The same operations in numpy."""

    take, moveaxis = staticmethod(np.take), staticmethod(np.moveaxis)

    def asarray(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def zeros(self, n: int) -> np.ndarray:
        return np.zeros((n, n), dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x


def weight_matching(
    seed: int,
    axes_to_perm: Mapping[str, tuple[str | None, ...]] | Any,
    params_a: Mapping[str, Any],
    params_b: Mapping[str, Any],
    max_iter: int = 100,
    init_perm: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Find the permutation of ``params_b`` that makes it match ``params_a``.

    Parameters
    ----------
    seed : int
        Seeds the visit order of every sweep.
    axes_to_perm : mapping or object with an ``axes_to_perm`` attribute
        Parameter name to the permutation name (or ``None``) of each axis.
    params_a, params_b : mapping of str to array
        Converted to float32, as jax does by default.
    max_iter : int, default 100
    init_perm : mapping of str to int array, optional
        The start (default: identity).
    device : str, optional
        A torch device (``"cuda"``) on which to gather and multiply, as the original does
        on a GPU; default: numpy on the CPU.

    Returns
    -------
    perm : dict of str to numpy.ndarray
        ``apply(perm, params_b)`` has B's unit ``perm[p][j]`` at position ``j``.
    sweeps : int
        Sweeps run (the last one improved nothing unless ``max_iter`` was reached).
    """
    axes = getattr(axes_to_perm, "axes_to_perm", axes_to_perm)
    p2a = perm_to_axes(axes)
    xp = _HostArrays() if device is None else _DeviceArrays(device)
    a = {k: xp.asarray(params_a[k]) for k in axes}
    b = {k: xp.asarray(params_b[k]) for k in axes}
    sizes = {p: a[entries[0][0]].shape[entries[0][1]] for p, entries in p2a.items()}
    if init_perm is None:
        perm = {p: np.arange(n) for p, n in sizes.items()}
    else:
        perm = {p: np.asarray(init_perm[p]).copy() for p in sizes}
    names = list(perm)
    sweeps = 0
    for iteration in range(max_iter):
        sweeps += 1
        progress = False
        for p_ix in visit_order(seed, iteration, len(names)):
            p = names[p_ix]
            n = sizes[p]
            cost = xp.zeros(n)
            for name, axis in p2a[p]:
                w_a = xp.moveaxis(a[name], axis, 0).reshape((n, -1))
                w_b = xp.moveaxis(_permuted(axes, perm, name, b, except_axis=axis, take=xp.take),
                                  axis, 0).reshape((n, -1))
                cost += w_a @ w_b.T
            cost = xp.to_host(cost)
            ri, ci = linear_sum_assignment(cost, maximize=True)
            if not np.array_equal(ri, np.arange(len(ri))):  # the original asserts this
                raise AssertionError("linear_sum_assignment returned unsorted rows")
            eye = np.eye(n, dtype=np.float32)
            old = np.vdot(cost, eye[perm[p]])
            new = np.vdot(cost, eye[ci, :])
            progress = progress or bool(new > old + 1e-12)
            perm[p] = np.asarray(ci)
        if not progress:
            break
    return perm, sweeps


def objective(axes_to_perm: Mapping[str, tuple[str | None, ...]] | Any, params_a: Mapping[str, Any],
              params_b: Mapping[str, Any], perm: Mapping[str, Any]) -> float:
    """``Σ ⟨θ_A, π(θ_B)⟩`` over the parameters of the spec, in float64."""
    axes = getattr(axes_to_perm, "axes_to_perm", axes_to_perm)
    b = {k: np.asarray(params_b[k]) for k in axes}
    perm = {p: np.asarray(v) for p, v in perm.items()}
    return float(sum(np.vdot(np.asarray(params_a[k], np.float64), _permuted(axes, perm, k, b).astype(np.float64))
                     for k in axes))
