"""Uniform coefficients on a sub-cube sliding from A to B (paper §4.2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Subcube"]


@dataclass(frozen=True)
class Subcube(Sampler):
    """``v ~ U[0, 2λ]^d`` for ``λ <= 0.5`` and ``v ~ U[2λ - 1, 1]^d`` for ``λ > 0.5``.

    The cube grows from the vertex of model A (``λ = 0``: ``v = 0``) to the whole unit
    cube (``λ = 0.5``) and shrinks to the vertex of model B (``λ = 1``: ``v = 1``).

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import DrawContext, Subcube
    >>> ctx = DrawContext(FlatLayout.from_arrays({"w": np.zeros(1000, np.float32)}), NumpyRandom(0))
    >>> v = Subcube().draw(0.75, ctx)
    >>> bool(v.min() >= 0.5 and v.max() <= 1.0)
    True
    >>> bool((Subcube().draw(0.0, ctx) == 0).all() and (Subcube().draw(1.0, ctx) == 1).all())
    True
    """

    name: ClassVar[str] = "subcube"
    parameter: ClassVar[str] = "lam"
    parameter_long_name: ClassVar[str] = "subcube position λ (0: model A, 0.5: whole cube, 1: model B)"

    lam: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    def support(self, value: Any) -> tuple[float, float]:
        lam = self.validate(value)
        return (0.0, 2.0 * lam) if lam <= 0.5 else (2.0 * lam - 1.0, 1.0)

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        v = ctx.uniform()
        if value <= 0.5:
            v *= 2.0 * value  # λ = 0: exactly 0
        else:
            v *= 2.0 - 2.0 * value  # λ = 1: 0 * u + 1, exactly 1
            v += 2.0 * value - 1.0
        return v
