"""Sinkhorn re-basin: soft permutations learned by gradient, hardened at the end.

Each permutation ``P`` of the spec is relaxed to a doubly stochastic matrix
``S = sinkhorn(L / τ)`` of learned logits ``L`` (Peña et al., *Re-basin via implicit
Sinkhorn differentiation*, CVPR 2023). ``S`` acts on the other model like the permutation
it relaxes (unit ``j`` of the transformed model is ``Σ_k S[j, k]`` · unit ``k``), the loss
of combinations with the reference is minimised over ``L`` with the training loop of
:mod:`combinability.align.ste`, and the final (and best) ``S`` is hardened into a
permutation by a linear assignment.

The soft-permutation numerics here (:func:`sinkhorn`, :func:`soft_apply`,
:func:`soft_apply_grad`) are plain numpy; they are also used by the ``"cycle"``
many-model aligner (:mod:`combinability.align.many`).

Sinkhorn relaxes neuron permutations bound to whole axes only (it is registered with
``kinds=("neuron",)``): a doubly stochastic matrix has no block structure for heads or
experts, does not relax an orthogonal map, and a packed axis would need one matrix per
segment. :func:`combinability.align.align` refuses such specs before any work, naming
``"ste"`` and ``"weight"``, which handle every kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.align.base import AlignTask
from combinability.errors import ConfigurationError
from combinability.permutation import Permutation, PermutationSpec, Repeat, split_axis

if TYPE_CHECKING:
    from combinability.align.ste import LearningContext

__all__ = ["sinkhorn", "sinkhorn_backward", "soft_apply", "soft_apply_grad", "harden", "one_hot", "sinkhorn_align"]


# -- soft permutations -------------------------------------------------------------------------
def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def sinkhorn(logits: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, list[np.ndarray]]:
    """The Sinkhorn operator in the log domain: a doubly stochastic matrix from ``logits``.

    Alternately normalises the rows and the columns of ``exp(logits)``.

    Parameters
    ----------
    logits : numpy.ndarray of shape (n, n)
    iterations : int
        Row-and-column normalisation rounds.

    Returns
    -------
    matrix : numpy.ndarray of shape (n, n)
        Columns sum to 1 exactly, rows nearly.
    trace : list of numpy.ndarray
        The log-domain matrix after every half step (for :func:`sinkhorn_backward`).

    Examples
    --------
    >>> s, _ = sinkhorn(np.array([[2.0, 0.0], [0.0, 2.0]]))
    >>> np.allclose(s.sum(0), 1) and np.allclose(s.sum(1), 1)
    True
    """
    log = np.asarray(logits, dtype=np.float64)
    trace = []
    for _ in range(iterations):
        log = log - _lse(log, axis=1)
        trace.append(log)
        log = log - _lse(log, axis=0)
        trace.append(log)
    return np.exp(log), trace


def sinkhorn_backward(grad: np.ndarray, matrix: np.ndarray, trace: list[np.ndarray]) -> np.ndarray:
    """Gradient with respect to the logits, given ``grad`` with respect to :func:`sinkhorn`'s matrix.

    Each half step ``y = x − logsumexp(x, axis)`` has the adjoint
    ``dx = dy − exp(y) · Σ_axis dy``; the last exponential gives ``dy = grad · matrix``.
    """
    g = np.asarray(grad, dtype=np.float64) * matrix
    for k in range(len(trace) - 1, -1, -1):
        axis = 0 if k % 2 else 1
        g = g - np.exp(trace[k]) * np.sum(g, axis=axis, keepdims=True)
    return g


def one_hot(perm: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The permutation matrices ``M[j, π[j]] = 1`` of a :class:`Permutation`."""
    out = {}
    for p, idx in perm.items():
        idx = np.asarray(idx)
        m = np.zeros((len(idx), len(idx)))
        m[np.arange(len(idx)), idx] = 1.0
        out[p] = m
    return out


def harden(matrices: Mapping[str, np.ndarray]) -> Permutation:
    """The permutation closest to each (soft) matrix: ``π`` maximising ``Σ_j S[j, π[j]]``."""
    from scipy.optimize import linear_sum_assignment

    out = {}
    for p, s in matrices.items():
        rows, cols = linear_sum_assignment(np.asarray(s, dtype=np.float64), maximize=True)
        out[p] = cols[np.argsort(rows)].astype(np.int64)
    return Permutation(out)


def _mode_product(arr: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``out[..., j, ...] = Σ_k matrix[j, k] arr[..., k, ...]`` along ``axis``."""
    return np.moveaxis(np.tensordot(matrix, arr, axes=([1], [axis])), 0, axis)


def soft_apply(spec: PermutationSpec, matrices: Mapping[str, np.ndarray], params: Mapping[str, Any], *,
               skip: tuple[str, int] | None = None) -> dict[str, np.ndarray]:
    """Apply (soft) permutation matrices to ``params``, as :func:`apply_permutation` applies indices.

    With one-hot matrices (:func:`one_hot`) the result equals ``apply_permutation``.

    Parameters
    ----------
    spec : PermutationSpec
    matrices : mapping of str to (n, n) array
        One matrix per permutation of the spec.
    params : mapping of str to numpy.ndarray
        Parameters the spec does not list are returned unchanged.
    skip : (name, axis), optional
        Leave this one axis of this parameter untransformed (used by :func:`soft_apply_grad`).
    """
    out = {}
    for name, value in params.items():
        arr = np.asarray(value, dtype=np.float64)
        for axis, p in enumerate(spec.axes_to_perm.get(name, ())):
            if p is None or (name, axis) == skip:
                continue
            if isinstance(p, Repeat):  # a flattened feature map: its channels' entries move together
                split = split_axis(arr, axis, p, name)
                arr = _mode_product(split, matrices[p.name], axis + p.unit_axis).reshape(arr.shape)
            else:
                arr = _mode_product(arr, matrices[p], axis)
        out[name] = arr
    return out


def soft_apply_grad(spec: PermutationSpec, matrices: Mapping[str, np.ndarray], params: Mapping[str, Any],
                    grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Gradient of ``Σ_name ⟨grads[name], soft_apply(spec, matrices, params)[name]⟩`` w.r.t. each matrix.

    By the product rule, each permuted axis ``(name, a)`` of permutation ``p`` adds
    ``G_(a) · U_(a)ᵀ``, where ``U`` is the parameter with every *other* axis transformed
    and ``X_(a)`` unfolds ``X`` along axis ``a``.
    """
    out = {p: np.zeros_like(np.asarray(m, dtype=np.float64)) for p, m in matrices.items()}
    for name, axes in spec.axes_to_perm.items():
        if name not in params or name not in grads:
            continue
        g = np.asarray(grads[name], dtype=np.float64)
        for axis, p in enumerate(axes):
            if p is None:
                continue
            u = soft_apply(spec, matrices, {name: params[name]}, skip=(name, axis))[name]
            gs, at = g, axis
            if isinstance(p, Repeat):  # unfold along the channels, each with its repeats
                gs, u, at, p = split_axis(g, axis, p, name), split_axis(u, axis, p, name), axis + p.unit_axis, p.name
            n = gs.shape[at]
            out[p] += np.moveaxis(gs, at, 0).reshape(n, -1) @ np.moveaxis(u, at, 0).reshape(n, -1).T
    return out


# -- the aligner ---------------------------------------------------------------------------------
class _SinkhornLearner:
    """Logits of soft permutations, trained by Adam on the host (numpy)."""

    def __init__(self, task: AlignTask, ctx: LearningContext, start: Permutation, *, temperature: float,
                 iterations: int, lr: float, init_scale: float) -> None:
        from combinability.training import Optimizer, TrainRecipe

        self.task, self.ctx, self.temperature, self.iterations = task, ctx, temperature, iterations
        self.names = list(task.sizes())
        self.logits = {p: init_scale * m for p, m in one_hot(start).items()}
        self.recipe = TrainRecipe(lr=lr, optimizer="adam", weight_decay=0.0)
        self.opt = Optimizer(self.recipe, np, 1.0)
        self.other = {k: np.asarray(v, dtype=np.float64) for k, v in task.other.items()}
        self._saved: Any = None

    def _matrices(self) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        mats, traces = {}, {}
        for p in self.names:
            mats[p], traces[p] = sinkhorn(self.logits[p] / self.temperature, self.iterations)
        return mats, traces

    def transformed(self) -> np.ndarray:
        """The other model under the current soft permutations, as a host flat vector."""
        mats, traces = self._matrices()
        self._saved = (mats, traces)
        params = {**self.other, **soft_apply(self.task.spec, mats, self.other)}
        return self.ctx.layout.flatten(params)

    def backward(self, grad_flat: np.ndarray) -> None:
        """One Adam step on the logits, from the gradient w.r.t. the transformed flat vector."""
        mats, traces = self._saved
        grads = self.ctx.layout.unflatten(np.asarray(grad_flat, dtype=np.float64), cast=False)
        g_mats = soft_apply_grad(self.task.spec, mats, self.other, grads)
        g_logits = {p: sinkhorn_backward(g_mats[p], mats[p], traces[p]) / self.temperature for p in self.names}
        flat = np.concatenate([self.logits[p].ravel() for p in self.names])
        g = np.concatenate([g_logits[p].ravel() for p in self.names])
        flat = self.opt.step(flat, g, self.recipe.lr)
        offset = 0
        for p in self.names:
            n = self.logits[p].size
            self.logits[p] = flat[offset : offset + n].reshape(self.logits[p].shape)
            offset += n

    def permutation(self) -> Permutation:
        return harden(self._matrices()[0])

    def state(self) -> dict[str, np.ndarray]:
        out = {f"logits/{p}": v for p, v in self.logits.items()}
        if self.opt.m is not None:
            out.update({"opt/m": self.opt.m, "opt/v": self.opt.v})
        out["opt/t"] = np.asarray(self.opt.t)
        return out

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.logits = {p: np.asarray(state[f"logits/{p}"], dtype=np.float64) for p in self.names}
        if "opt/m" in state:
            self.opt.m, self.opt.v = np.asarray(state["opt/m"]), np.asarray(state["opt/v"])
        self.opt.t = int(state["opt/t"])


def sinkhorn_align(task: AlignTask, *, context: LearningContext | None = None, temperature: float = 1.0,
                   sinkhorn_iterations: int = 20, init: str = "weight", init_scale: float = 3.0,
                   lr: float = 0.3, **options: Any) -> Permutation:
    """Sinkhorn re-basin: learn soft permutations on the loss of combinations, then harden them.

    Parameters
    ----------
    task : AlignTask
    context : LearningContext
        The models, their backend and the data (passed by ``ModelSet.align``).
    temperature : float, default 1.0
        ``τ`` of ``sinkhorn(L / τ)``: lower is closer to a hard permutation.
    sinkhorn_iterations : int, default 20
        Row-and-column normalisation rounds per step.
    init : {"weight", "identity"}, default "weight"
        The permutation the logits start at: weight matching's, or the identity.
    init_scale : float, default 3.0
        The starting logits are ``init_scale`` times the one-hot matrix of ``init``.
    lr : float, default 0.3
        Adam's learning rate on the logits.
    **options
        The shared loop's options (:func:`combinability.align.ste.learn`): ``data`` is
        given by the context; ``epochs``, ``batch_size``, ``sampler``, ``state``,
        ``eval_examples``, ``progress``.

    Returns
    -------
    Permutation
        ``method="sinkhorn"``; ``objective`` the best evaluation loss, ``history`` the
        evaluation loss at the start and after every epoch.

    Raises
    ------
    ConfigurationError
        If no data or no model context is given, the temperature or the options are out of range,
        or the backend gives no gradients.
    """
    from combinability.align.ste import check_learning, check_options, learn, start_permutation

    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigurationError(f"sinkhorn: temperature must be a positive number, got {temperature!r}")
    if sinkhorn_iterations < 1:
        raise ConfigurationError(f"sinkhorn: sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
    if init not in ("weight", "identity"):
        raise ConfigurationError(f"sinkhorn: init must be 'weight' or 'identity', got {init!r}")
    ctx = check_learning("sinkhorn", task, context)
    check_options("sinkhorn", options.get("epochs", 3), options.get("batch_size", 100),
                   options.get("eval_examples", 1000), options.get("sampler"))
    start = start_permutation(task, init)

    def make() -> _SinkhornLearner:
        return _SinkhornLearner(task, ctx, start, temperature=temperature, iterations=sinkhorn_iterations, lr=lr,
                                init_scale=init_scale)

    settings = {"temperature": temperature, "sinkhorn_iterations": sinkhorn_iterations, "init": init,
                "init_scale": init_scale, "lr": lr}
    return learn("sinkhorn", task, ctx, make, start=start, settings=settings, **options)

