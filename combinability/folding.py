"""Folding a norm's scale and shift into the layers that read it (function-preserving).

A residual stream read through ``LayerNorm(x) = γ ⊙ (x − mean x) / σ(x) + β`` admits
an orthogonal map Q of the stream only when γ and β are out of the way: the map
commutes with the normalisation (``fix_ones`` maps for LayerNorm's centring; any map for
RMSNorm) but not with an element-wise scale. Every layer that reads the norm's output
computes ``W (γ ⊙ n + β) + b = (W diag γ) n + (W β + b)``, so setting

    W ← W diag γ,    b ← b + W β,    γ ← 1,    β ← 0

changes no output. A learned scale of a layer's output before it joins the stream (a
transformer's LayerScale, ``x + γ ⊙ (W h + b)``) folds into that layer the same way, ``W ←
diag γ W``, ``b ← γ ⊙ b``, ``γ ← 1``. Where a reader has no bias (an untied language-model head, a bias-free
gate), the shift stays in the norm, divided by the scale, ``β ← β / γ`` (``W (γ ⊙ n + β) =
(W diag γ)(n + β / γ)``): it then moves with the stream as a vector of it, which an
orthogonal map of the stream keeps (``Q n + Q β'``, read by ``W Qᵀ``), and only ``γ ← 1`` is
required. :func:`fold_norms` does this on named arrays; the spec's
:class:`~combinability.kinds.Orthogonal` kind lists the folded parameters it needs
(``requires``), and :meth:`~combinability.PermutationSpec.check_requirements` refuses a
model that was not folded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from combinability.errors import PermutationSpecError

__all__ = ["NormFold", "Reader", "fold_norms"]


@dataclass(frozen=True)
class Reader:
    """A layer reading a norm's output: its weight, the weight's input axis, and its bias (or None)."""

    weight: str
    axis: int
    bias: str | None = None


@dataclass(frozen=True)
class NormFold:
    """One norm on a stream and the layers that read its output.

    Parameters
    ----------
    scale, shift : str or None
        The norm's scale γ and shift β (``None`` where the norm has none).
    readers : sequence of Reader
        Every layer that reads the norm's output.
    keep_shift : bool
        Keep the shift in the norm, divided by the scale, rather than folding it into the readers'
        biases (for readers without one): the shift then moves with the stream.
    writers : sequence of Reader
        For a learned scale of a layer's output (a transformer's LayerScale, ``x + γ ⊙ (W h + b)``):
        the layers whose outputs it scales, ``axis`` their output axis; ``W ← diag γ W`` and
        ``b ← γ ⊙ b`` there, and ``γ ← 1``.
    """

    scale: str | None
    shift: str | None
    readers: tuple[Reader, ...]
    keep_shift: bool = False
    writers: tuple[Reader, ...] = ()


def fold_norms(params: Mapping[str, Any], folds: Sequence[NormFold]) -> dict[str, np.ndarray]:
    """Fold each norm's scale and shift into its readers; the function is unchanged.

    Parameters
    ----------
    params : mapping of str to array
        Named parameters (torch or flax layout: each reader's input axis is given).
    folds : sequence of NormFold
        The norms to fold.

    Returns
    -------
    dict of str to numpy.ndarray
        New arrays; the norms' scales become 1 and shifts 0.

    Examples
    --------
    >>> p = {"ln.weight": np.array([2.0, 3.0]), "ln.bias": np.array([1.0, 0.0]),
    ...      "fc.weight": np.array([[1.0, 1.0]]), "fc.bias": np.array([0.5])}
    >>> out = fold_norms(p, [NormFold("ln.weight", "ln.bias", (Reader("fc.weight", 1, "fc.bias"),))])
    >>> out["fc.weight"].tolist(), out["fc.bias"].tolist(), out["ln.weight"].tolist()
    ([[2.0, 3.0]], [1.5], [1.0, 1.0])
    >>> kept = fold_norms(p, [NormFold("ln.weight", "ln.bias", (Reader("fc.weight", 1),), keep_shift=True)])
    >>> kept["fc.weight"].tolist(), kept["ln.bias"].tolist()  # the shift divided by the scale, in the norm
    ([[2.0, 3.0]], [0.5, 0.0])
    >>> q = {"ls.gamma": np.array([2.0, 3.0]), "proj.weight": np.ones((2, 1)), "proj.bias": np.ones(2)}
    >>> scaled = fold_norms(q, [NormFold("ls.gamma", None, (), writers=(Reader("proj.weight", 0, "proj.bias"),))])
    >>> scaled["proj.weight"].tolist(), scaled["proj.bias"].tolist(), scaled["ls.gamma"].tolist()
    ([[2.0], [3.0]], [2.0, 3.0], [1.0, 1.0])
    """
    out = {k: np.array(v, copy=True) for k, v in params.items()}
    for fold in folds:
        for name in (fold.scale, fold.shift, *(r.weight for r in fold.readers),
                     *(r.bias for r in fold.readers if r.bias)):
            if name is not None and name not in out:
                raise PermutationSpecError(f"cannot fold a norm: no parameter {name!r}")
        for name in (*(r.weight for r in fold.writers), *(r.bias for r in fold.writers if r.bias)):
            if name not in out:
                raise PermutationSpecError(f"cannot fold a scale: no parameter {name!r}")
        if not fold.readers and not fold.writers:
            raise PermutationSpecError(f"cannot fold the norm {fold.scale or fold.shift!r}: nothing reads it")
        gamma = out[fold.scale] if fold.scale else None
        for r in fold.writers if gamma is not None else ():  # a layer scale: into the rows it scales
            w = out[r.weight]
            shape = [1] * w.ndim
            shape[r.axis] = w.shape[r.axis]
            out[r.weight] = w * gamma.reshape(shape).astype(w.dtype)
            if r.bias is not None:
                out[r.bias] = out[r.bias] * gamma.astype(out[r.bias].dtype)
        beta = out[fold.shift] if fold.shift else None
        if fold.keep_shift and beta is not None:
            if gamma is not None and not np.all(gamma != 0):
                raise PermutationSpecError(f"cannot fold the scale {fold.scale!r} and keep the shift {fold.shift!r} "
                                           "(its readers have no bias): the scale has zeros")
            out[fold.shift] = beta / gamma if gamma is not None else beta
            beta = None  # stays in the norm, moving with the stream
        for r in fold.readers:
            w = out[r.weight]
            shape = [1] * w.ndim
            shape[r.axis] = w.shape[r.axis]
            if beta is not None:
                shift = np.tensordot(w, beta, axes=([r.axis], [0]))
                if r.bias is None:
                    if np.any(beta != 0):
                        raise PermutationSpecError(
                            f"cannot fold the shift {fold.shift!r} into {r.weight!r}: the layer has no bias")
                else:
                    out[r.bias] = out[r.bias] + shift.astype(out[r.bias].dtype)
            if gamma is not None:
                out[r.weight] = w * gamma.reshape(shape).astype(w.dtype)
        if gamma is not None:
            out[fold.scale] = np.ones_like(gamma)
        if beta is not None:
            out[fold.shift] = np.zeros_like(beta)
    return out
