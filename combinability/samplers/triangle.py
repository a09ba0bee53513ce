"""Convex combinations of three models (paper §5.4)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from combinability.errors import SamplerError
from combinability.layout import FlatLayout
from combinability.samplers.base import DrawContext, Sampler, check_pair

__all__ = ["Triangle"]

_TOLERANCE = 1e-9  # slack on λ_B + λ_C <= 1 for values computed in floating point


@dataclass(frozen=True)
class Triangle(Sampler):
    """``θ = (1 − λ_B − λ_C) θ_A + λ_B θ_B + λ_C θ_C`` on the triangle ``λ_B, λ_C ≥ 0, λ_B + λ_C ≤ 1``.

    A value is a pair ``(λ_B, λ_C)``; :meth:`draw` returns the pair of constant
    coefficient vectors ``(v_b, v_c)`` for :func:`combinability.combination.combine3`.

    Parameters
    ----------
    resolution : int, default 10
        The default grid holds the points ``(i / resolution, j / resolution)`` with
        ``i + j <= resolution``: ``(resolution + 1)(resolution + 2) / 2`` points.

    Examples
    --------
    >>> Triangle(resolution=2).grid.tolist()
    [[0.0, 0.0], [0.0, 0.5], [0.0, 1.0], [0.5, 0.0], [0.5, 0.5], [1.0, 0.0]]
    """

    name: ClassVar[str] = "triangle"
    parameter: ClassVar[tuple[str, str]] = ("lam_b", "lam_c")
    deterministic: ClassVar[bool] = True
    models: ClassVar[int] = 3

    resolution: int = 10

    def __post_init__(self) -> None:
        r = self.resolution
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise SamplerError(f"Triangle: resolution must be an integer >= 1, got {r!r}")

    @property
    def grid(self) -> np.ndarray:
        """Points ``(λ_B, λ_C)`` of the triangle, shape ``(n, 2)``, float64."""
        r = int(self.resolution)
        i, j = np.triu_indices(r + 1)  # j >= i
        lam_b, lam_c = i, j - i  # all (i, k) with i + k <= r
        return np.stack([lam_b / r, lam_c / r], axis=1)

    def support(self, value: Any) -> tuple[float, float]:
        lam_b, lam_c = self.validate(value)
        return (min(lam_b, lam_c), max(lam_b, lam_c))

    def validate(self, value: Any, layout: FlatLayout | None = None) -> tuple[float, float]:
        lam_b, lam_c = check_pair("Triangle", self.parameter, value)
        if lam_b < 0 or lam_c < 0 or lam_b + lam_c > 1 + _TOLERANCE:
            raise SamplerError(
                f"Triangle: (lam_b, lam_c)=({lam_b!r}, {lam_c!r}) is outside the triangle "
                "lam_b >= 0, lam_c >= 0, lam_b + lam_c <= 1"
            )
        return lam_b, lam_c

    def _draw(self, value: tuple[float, float], ctx: DrawContext) -> tuple[Any, Any]:
        return ctx.full(value[0]), ctx.full(value[1])
