"""Uniform coefficients on a cube centred at 1/2 (paper §4.2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Uniform"]


@dataclass(frozen=True)
class Uniform(Sampler):
    """``v ~ U[0.5 - s, 0.5 + s]^d`` for ``s`` in ``[0, 0.5]``.

    ``s = 0`` is the midpoint of the linear path (``v = 1/2`` everywhere), ``s = 0.5``
    the uniform distribution on the whole unit cube.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import DrawContext, Uniform
    >>> ctx = DrawContext(FlatLayout.from_arrays({"w": np.zeros(1000, np.float32)}), NumpyRandom(0))
    >>> v = Uniform().draw(0.25, ctx)
    >>> bool(v.min() >= 0.25 and v.max() <= 0.75)
    True
    >>> Uniform().draw(0.7, ctx)
    Traceback (most recent call last):
    ...
    combinability.errors.SamplerError: Uniform: s=0.7 is outside [0, 0.5]
    """

    name: ClassVar[str] = "uniform"
    parameter: ClassVar[str] = "s"
    parameter_long_name: ClassVar[str] = "half-width s of the cube U[0.5 - s, 0.5 + s]^d"

    s: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    @property
    def range(self) -> tuple[float, float]:
        return (0.0, 0.5)

    def support(self, value: Any) -> tuple[float, float]:
        s = self.validate(value)
        return (0.5 - s, 0.5 + s)

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        v = ctx.uniform()
        v *= 2.0 * value
        v += 0.5 - value
        return v
