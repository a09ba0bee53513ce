"""Uniform coefficients on a box centred at model A (paper §5.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from combinability.errors import SamplerError
from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Box"]


@dataclass(frozen=True)
class Box(Sampler):
    """``v ~ U[-s, s]^d``: model A perturbed by uniform noise scaled by the edge lengths ``|θ_B − θ_A|``.

    Parameters
    ----------
    stop : float, default 0.5
        Largest valid ``s`` (the paper sweeps ``s`` over ``[0, 0.5]``).

    Notes
    -----
    ``s = 0`` gives model A exactly; coefficients are negative for half of the
    elements on average, so the combination extrapolates beyond the hyperrectangle.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import Box, DrawContext
    >>> ctx = DrawContext(FlatLayout.from_arrays({"w": np.zeros(1000, np.float32)}), NumpyRandom(0))
    >>> v = Box().draw(0.2, ctx)
    >>> bool(v.min() >= -0.2 and v.max() <= 0.2 and v.min() < 0)
    True
    """

    name: ClassVar[str] = "box"
    parameter: ClassVar[str] = "s"
    parameter_long_name: ClassVar[str] = "half-width s of the box U[-s, s]^d around model A"

    stop: float = 0.5
    s: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, bool) or not isinstance(self.stop, int | float) or not (
            math.isfinite(self.stop) and self.stop > 0
        ):
            raise SamplerError(f"Box: stop must be a finite number > 0, got {self.stop!r}")
        super().__post_init__()

    @property
    def range(self) -> tuple[float, float]:
        return (0.0, float(self.stop))

    @property
    def bounds(self) -> tuple[float, float]:
        return (-float(self.stop), float(self.stop))

    def support(self, value: Any) -> tuple[float, float]:
        s = self.validate(value)
        return (-s, s)

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        v = ctx.uniform()
        v *= 2.0 * value
        v -= value
        return v
