"""Coefficients near the slice ``mean(v) = α`` of the unit cube (paper §4.2.3).

Sampling uniformly from the polytope ``{v ∈ [0, 1]^d : mean(v) = α}`` is hard, so the
paper draws ``d`` i.i.d. coordinates from the exponential law truncated to ``[0, 1]``
whose mean is ``α`` — the maximum-entropy law on ``[0, 1]`` with that mean. Its joint
density is constant on every slice ``mean(v) = c``, and by the central limit theorem
the sample mean is ``α + O(1/√d)``.

The density is ``f(x) ∝ exp(t x)`` on ``[0, 1]`` with *rate* ``t`` (``t < 0`` for
``α < 1/2``, ``t = 0`` — uniform — for ``α = 1/2``); its mean is
``m(t) = 1 / (1 − e^{−t}) − 1/t``, and ``m(−t) = 1 − m(t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Hyperplane", "truncated_exponential_mean", "truncated_exponential_rate"]

_SERIES = 0.05  # below this |t| the mean is evaluated by its Taylor series (error < 1e-14)


def _lower_mean(t: float) -> float:
    """Mean of the density ∝ exp(−t x) on [0, 1] for ``t >= 0``: ``1/t − 1/(e^t − 1)``."""
    if t < _SERIES:
        t2 = t * t
        return 0.5 - t / 12.0 * (1.0 - t2 / 60.0 * (1.0 - t2 / 42.0))
    if t > 700.0:  # e^t overflows; 1 / (e^t − 1) is below 1e-304
        return 1.0 / t
    return 1.0 / t - 1.0 / math.expm1(t)


def truncated_exponential_mean(rate: float) -> float:
    """Mean of the exponential law with density ∝ ``exp(rate · x)`` truncated to ``[0, 1]``.

    Parameters
    ----------
    rate : float
        Any real number; 0 is the uniform law (mean 1/2).

    Returns
    -------
    float
        In ``(0, 1)``, increasing in ``rate``.

    Examples
    --------
    >>> truncated_exponential_mean(0.0)
    0.5
    >>> round(truncated_exponential_mean(-10.0), 6)
    0.099955
    """
    rate = float(rate)
    return _lower_mean(-rate) if rate <= 0 else 1.0 - _lower_mean(rate)


@lru_cache(maxsize=1024)
def truncated_exponential_rate(mean: float) -> float:
    """The rate ``t`` whose truncated exponential law on ``[0, 1]`` has mean ``mean``.

    Solves ``m(t) = mean`` with :func:`scipy.optimize.brentq` on the numerically stable
    closed form; exact (0) at ``mean = 1/2``.

    Parameters
    ----------
    mean : float
        Strictly between 0 and 1.

    Returns
    -------
    float
        Negative for ``mean < 1/2``, positive for ``mean > 1/2``; infinite when the mean
        is so close to 0 or 1 (closer than about 1e-308) that ``1/rate`` underflows.

    Examples
    --------
    >>> t = truncated_exponential_rate(0.2)
    >>> round(truncated_exponential_mean(t), 12)
    0.2
    """
    mean = float(mean)
    if not 0.0 < mean < 1.0:
        raise ValueError(f"the mean of a non-degenerate law on [0, 1] lies in (0, 1), got {mean!r}")
    low = min(mean, 1.0 - mean)  # solve for the law with mean <= 1/2, rate -t with t >= 0
    if low == 0.5:
        return 0.0
    if low < 1e-3:
        # t > 999, where 1 / (e^t - 1) is far below the precision of 1/t: the mean is 1/t.
        t = 1.0 / low  # inf for subnormal means: the law is a point mass at 0 in double precision
    else:
        # _lower_mean decreases from 1/2 at t = 0 and stays below 1/t: the root is in [0, 2/low].
        from scipy.optimize import brentq  # imported here: listing plugins stays free of scipy

        t = brentq(lambda x: _lower_mean(x) - low, 0.0, 2.0 / low, xtol=1e-300, maxiter=500)
    return -t if mean < 0.5 else t


@dataclass(frozen=True)
class Hyperplane(Sampler):
    """``v_i`` i.i.d. from the truncated exponential law on ``[0, 1]`` with mean ``α``.

    The maximum-entropy approximation of the uniform law on the slice
    ``{v ∈ [0, 1]^d : mean(v) = α}``. ``α = 0`` and ``α = 1`` are degenerate and give
    exactly model A and model B; ``α = 1/2`` is the uniform law on the unit cube.

    Drawn by inverting the CDF: for the law with mean ``a = min(α, 1 − α)`` and rate
    ``−t`` (``t >= 0``), ``x = log1p(u · expm1(−t)) / (−t)``, and ``v = x`` or ``1 − x``.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import DrawContext, Hyperplane
    >>> ctx = DrawContext(FlatLayout.from_arrays({"w": np.zeros(100_000, np.float32)}), NumpyRandom(0))
    >>> v = Hyperplane().draw(0.2, ctx)
    >>> round(float(v.mean()), 2), bool(v.min() >= 0 and v.max() <= 1)
    (0.2, True)
    """

    name: ClassVar[str] = "hyperplane"
    parameter: ClassVar[str] = "alpha"
    parameter_long_name: ClassVar[str] = "mean coefficient α (hyperplane mean(v) = α)"

    alpha: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    def support(self, value: Any) -> tuple[float, float]:
        alpha = self.validate(value)
        return (alpha, alpha) if alpha in (0.0, 1.0) else (0.0, 1.0)

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        u = ctx.uniform()
        if value == 0.0 or value == 1.0:
            return ctx.full(value)
        if value == 0.5:
            return u
        t = -abs(truncated_exponential_rate(value))  # rate of the law with mean min(α, 1 − α)
        if math.isinf(t):  # α within 1e-308 of 0 or 1: a point mass
            return ctx.full(0.0 if value < 0.5 else 1.0)
        u *= math.expm1(t)  # in (expm1(t), 0]: log1p is finite
        x = ctx.xp.log1p(u)
        x *= 1.0 / t  # in [0, 1] up to rounding
        if value > 0.5:
            x *= -1.0
            x += 1.0
        return ctx.xp.clip(x, 0.0, 1.0)
