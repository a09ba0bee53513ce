"""Learned continuous maps: a residual stream's rotation and the invertible maps inside heads, trained
on the loss of combinations (the data-driven alignment of Theus et al. 2025's symmetry classes).

Weight matching chooses the maps nearest in weights, a proxy: the loss along the path is what a
study measures. This aligner starts from weight matching's transformation, holds its
permutations (neurons, heads, experts) fixed, and trains every continuous map of the spec by
gradient descent on the loss of ``(1 − v) ⊙ θ_A + v ⊙ T(θ_B)`` with ``v`` drawn by a sampler
(the midpoint by default), through the same loop as STE (:func:`combinability.align.ste.learn`:
batches, evaluation after every epoch, the best transformation seen, resumable state files).

- An :class:`~combinability.kinds.Orthogonal` map stays orthogonal: ``Q = Q₀ cayley(W − Wᵀ)``,
  the Cayley transform ``(I − S)⁻¹(I + S)`` of a skew-symmetric matrix (on the complement of
  the all-ones vector where the map must fix it, for LayerNorm streams).
- An :class:`~combinability.kinds.Invertible` map is trained block by block (each head's
  ``G_i``, the heads' order held), its :class:`~combinability.kinds.Dual` ``M⁻ᵀ`` following it.

The gradient of the loss with respect to a map is that of the transformed parameters, ``v ∇L``,
contracted with B transformed by every other name (for ``M ×_axis B'``: ``Σ (v∇L)_(axis) B'_(axis)ᵀ``,
the same products as weight matching's cost), chained through the dual (``−N Hᵀ N`` for
``N = M⁻ᵀ``) and the Cayley transform.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from combinability.align.base import AlignTask
from combinability.align.ste import (
    LearningContext,
    as_values,
    check_learning,
    check_options,
    check_settings,
    learn,
    start_permutation,
)
from combinability.errors import ConfigurationError
from combinability.invertible import duals
from combinability.kind_matching import _cost
from combinability.kinds import Invertible, Orthogonal, block_matrix, block_parts, ones_complement
from combinability.permutation import Permutation, apply_permutation

__all__ = ["maps", "cayley", "cayley_grad"]


def cayley(s: np.ndarray) -> np.ndarray:
    """``(I − S)⁻¹ (I + S)``: orthogonal for a skew-symmetric ``S``."""
    eye = np.eye(len(s))
    return np.linalg.solve(eye - s, eye + s)


def cayley_grad(s: np.ndarray, c: np.ndarray, grad_c: np.ndarray) -> np.ndarray:
    """The gradient in ``S`` of a function whose gradient in ``C = cayley(S)`` is ``grad_c``:
    ``(I − S)⁻ᵀ grad_c (I + C)ᵀ`` (from ``dC = (I − S)⁻¹ dS (I + C)``)."""
    eye = np.eye(len(s))
    return np.linalg.solve((eye - s).T, grad_c) @ (eye + c).T


class _MapLearner:
    """The continuous maps of a spec as one flat trainable vector; the permutations held at ``start``."""

    def __init__(self, task: AlignTask, ctx: LearningContext, start: Permutation, *, lr: float) -> None:
        from combinability.training import Optimizer, TrainRecipe

        self.task, self.ctx, self.spec = task, ctx, task.spec
        self.start = as_values(task.spec, start)
        self.other = dict(task.other)
        self.sizes = task.spec.perm_sizes(task.reference)
        self.duals = duals(task.spec)
        self.parts: list[tuple[str, int, tuple[int, ...]]] = []  # (name, offset, shape) in the flat vector
        self.fixed: dict[str, Any] = {}  # per name: what the trained part is relative to
        offset, initial = 0, []
        for p, kind in task.spec.kinds.items():
            if isinstance(kind, Orthogonal):
                n = self.sizes[p] - (1 if kind.fix_ones else 0)
                basis = ones_complement(self.sizes[p]) if kind.fix_ones else None
                base = self.start[p] if basis is None else basis.T @ self.start[p] @ basis
                self.fixed[p] = (basis, base)
                shape, value = (n, n), np.zeros((n, n))
            elif isinstance(kind, Invertible):
                sigma, inner = block_parts(p, self.start[p], kind.blocks, kind.size)
                self.fixed[p] = sigma
                shape, value = inner.shape, inner
            else:
                continue
            self.parts.append((p, offset, shape))
            initial.append(value.ravel())
            offset += int(np.prod(shape))
        self.theta = np.concatenate(initial) if initial else np.zeros(0)
        self.recipe = TrainRecipe(lr=lr, optimizer="adam", weight_decay=0.0)
        self.opt = Optimizer(self.recipe, np, np.ones(len(self.theta)))

    def _piece(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        return self.theta[offset : offset + int(np.prod(shape))].reshape(shape)

    def values(self) -> Permutation:
        """The transformation at the current parameters."""
        out = dict(self.start)
        for p, offset, shape in self.parts:
            w = self._piece(offset, shape)
            if isinstance(self.spec.kind(p), Orthogonal):
                basis, base = self.fixed[p]
                inner = base @ cayley(w - w.T)
                out[p] = inner if basis is None else (np.full((len(basis), len(basis)), 1.0 / len(basis))
                                                      + basis @ inner @ basis.T)
            else:
                out[p] = block_matrix(self.fixed[p], w)
                out[self.duals[p]] = block_matrix(self.fixed[p], np.linalg.inv(w).transpose(0, 2, 1))
        return Permutation(out)

    def transformed(self) -> np.ndarray:
        self.current = self.values()
        return self.ctx.layout.flatten({**self.other, **apply_permutation(self.spec, self.current, self.other,
                                                                          check=False)})

    def gradient(self, grad_flat: np.ndarray) -> np.ndarray:
        """The gradient in the flat parameters, from the gradient in the transformed vector (``v ∇L``)."""
        spec, values = self.spec, self.current
        g = self.ctx.layout.unflatten(np.asarray(grad_flat, dtype=np.float64), cast=False)
        out = np.zeros_like(self.theta)
        for p, offset, shape in self.parts:
            acting = {p, self.duals.get(p, p)}
            names = [k for k in spec.axes_to_perm if any(q in acting for q in _names(spec.axes_to_perm[k]))]
            rest = apply_permutation(spec, values, {k: self.other[k] for k in names},
                                     only=set(values) - acting, check=False)
            grads = {k: g[k] for k in names}
            d = _cost(spec, p, grads, rest, self.sizes[p], self.sizes)  # dL/dM = Σ g_(axis) B'_(axis)ᵀ
            w = self._piece(offset, shape)
            if isinstance(spec.kind(p), Orthogonal):
                basis, base = self.fixed[p]
                if basis is not None:
                    d = basis.T @ d @ basis
                s = w - w.T
                ds = cayley_grad(s, cayley(s), base.T @ d)
                out[offset : offset + w.size] = (ds - ds.T).ravel()
            else:
                dual = self.duals[p]
                n = values[dual]
                d = d - n @ _cost(spec, dual, grads, rest, self.sizes[p], self.sizes).T @ n
                sigma = self.fixed[p]
                h, size = shape[0], shape[1]
                blocks = d.reshape(h, size, h, size)
                out[offset : offset + w.size] = blocks[np.arange(h), :, sigma, :].ravel()
        return out

    def backward(self, grad_flat: np.ndarray) -> None:
        self.theta = self.opt.step(self.theta, self.gradient(grad_flat), self.recipe.lr)

    def permutation(self) -> Permutation:
        return as_values(self.spec, self.values())

    def state(self) -> dict[str, np.ndarray]:
        out = {"theta": self.theta, "opt/t": np.asarray(self.opt.t)}
        if self.opt.m is not None:
            out.update({"opt/m": self.opt.m, "opt/v": self.opt.v})
        return out

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.theta = np.asarray(state["theta"], dtype=np.float64)
        if "opt/m" in state:
            self.opt.m, self.opt.v = np.asarray(state["opt/m"]), np.asarray(state["opt/v"])
        self.opt.t = int(state["opt/t"])


def _names(entry: tuple) -> set[str]:
    from combinability.permutation import _names_of

    return {q for e in entry for q in _names_of(e)}


def _start(task: AlignTask, init: str, matching_iter: int) -> Permutation:
    """The transformation training starts from (see :func:`maps`' ``init``)."""
    if init != "weight" or not any(isinstance(k, Invertible) for k in task.spec.kinds.values()):
        return start_permutation(task, "identity" if init == "identity" else "weight", max_iter=matching_iter)
    from dataclasses import replace

    from combinability.invertible import lifted

    plain = start_permutation(replace(task, spec=task.spec.without_invertible()), "weight", max_iter=matching_iter)
    return Permutation(lifted(task.spec, plain), objective=plain.objective, history=plain.history,
                       iterations=plain.iterations, method="weight")


def maps(task: AlignTask, *, context: LearningContext | None = None, lr: float = 1e-3, init: str = "weight",
         matching_iter: int = 100, **options: Any) -> Permutation:
    """Learned continuous maps: weight matching, then its orthogonal and invertible maps trained on combinations.

    Parameters
    ----------
    task : AlignTask
        A spec with orthogonal maps (a transformer's residual stream) or invertible maps inside
        heads (``symmetries="invertible"``).
    context : LearningContext
        The models, their backend and the data (passed by ``ModelSet.align``).
    lr : float, default 1e-3
        Adam's learning rate on the maps' parameters (the skew-symmetric generator of each
        rotation, the entries of each head's map).
    init : {"weight", "invertible", "identity"}, default "weight"
        The start: weight matching's permutations and rotations, each head's invertible map
        starting as its within-head permutation (``"weight"``); weight matching with invertible
        maps inside heads (``"invertible"``: up to 100 sweeps that fit every head's map; on the
        reference TinyViT 6 s of matching where ``"weight"`` takes 0.4 s, and learned barriers of
        0.175 against 0.229 nats, on CharGPT 0.301 against 0.315); or the identity. The
        permutations of the start are kept.
    matching_iter : int, default 100
        Sweeps of the starting weight matching.
    **options
        The shared loop's options (:func:`combinability.align.ste.learn`): ``epochs`` (3),
        ``batch_size`` (100), ``sampler`` (default the midpoint), ``state``, ``eval_examples``
        (1000), ``progress``.

    Returns
    -------
    Permutation
        ``method="maps"``: the transformation with the lowest evaluation loss seen (the start
        included); ``objective`` that loss, ``history`` one per epoch after the start's.

    Raises
    ------
    ConfigurationError
        If the spec has no orthogonal or invertible map to learn, an option is out of range,
        or no data or model context is given (all before training).
    """
    if not any(isinstance(k, Orthogonal | Invertible) for k in task.spec.kinds.values()):
        raise ConfigurationError("aligner 'maps' learns orthogonal and invertible maps (a transformer's residual "
                                 "stream, symmetries='invertible' inside heads), and these models' symmetries have "
                                 "none: use 'ste' or 'weight'")
    check_settings("maps", lr, init, ("weight", "invertible", "identity"), matching_iter)
    ctx = check_learning("maps", task, context)
    check_options("maps", options.get("epochs", 3), options.get("batch_size", 100),
                  options.get("eval_examples", 1000), options.get("sampler"))
    start = _start(task, init, matching_iter)
    settings = {"lr": lr, "init": init, "matching_iter": matching_iter}
    return learn("maps", task, ctx, lambda: _MapLearner(task, ctx, start, lr=lr), start=start, settings=settings,
                 **options)
