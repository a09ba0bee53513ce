"""Coefficients on the vertices of the unit cube (paper §4.2.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Bernoulli"]


@dataclass(frozen=True)
class Bernoulli(Sampler):
    """``v_i ~ Bernoulli(p)`` independently: each weight is A's (0) or B's (1).

    Drawn as ``v = (u < p)`` from uniforms ``u``; ``p = 0`` gives model A and ``p = 1``
    model B exactly.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import Bernoulli, DrawContext
    >>> ctx = DrawContext(FlatLayout.from_arrays({"w": np.zeros(1000, np.float32)}), NumpyRandom(0))
    >>> v = Bernoulli().draw(0.3, ctx)
    >>> sorted(set(v.tolist()))
    [0.0, 1.0]
    """

    name: ClassVar[str] = "bernoulli"
    parameter: ClassVar[str] = "p"
    parameter_long_name: ClassVar[str] = "probability p of taking model B's weight"

    p: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    def support(self, value: Any) -> tuple[float, float]:
        p = self.validate(value)
        return (0.0 if p < 1.0 else 1.0, 1.0 if p > 0.0 else 0.0)

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        u = ctx.uniform()
        if value >= 1.0:  # u < 1 always, but do not rely on a source never returning 1.0
            return ctx.full(1.0)
        return ctx.as_float(u < value)
