"""Linear interpolation and extrapolation (paper §3, §5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from combinability.errors import SamplerError
from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Linear"]


@dataclass(frozen=True)
class Linear(Sampler):
    """``v = λ`` everywhere: the ordinary linear path ``(1 − λ) θ_A + λ θ_B``.

    Parameters
    ----------
    start, stop : float, default 0 and 1
        Range of ``λ``. ``Linear(start=-1, stop=2)`` is the extrapolation of §5.1.

    Examples
    --------
    >>> Linear().grid[[0, 12, 24]].tolist()
    [0.0, 0.5, 1.0]
    >>> Linear(start=-1, stop=2).grid[[0, -1]].tolist()
    [-1.0, 2.0]
    """

    name: ClassVar[str] = "linear"
    parameter: ClassVar[str] = "lam"
    parameter_long_name: ClassVar[str] = "interpolation coefficient λ (0: model A, 1: model B)"
    deterministic: ClassVar[bool] = True

    start: float = 0.0
    stop: float = 1.0
    lam: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    def __post_init__(self) -> None:
        for label in ("start", "stop"):
            x = getattr(self, label)
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                raise SamplerError(f"Linear: {label} must be a finite number, got {x!r}")
        if not self.start < self.stop:
            raise SamplerError(f"Linear: start must be < stop, got start={self.start!r}, stop={self.stop!r}")
        super().__post_init__()

    @property
    def range(self) -> tuple[float, float]:
        return (float(self.start), float(self.stop))

    @property
    def bounds(self) -> tuple[float, float]:
        return self.range

    def support(self, value: Any) -> tuple[float, float]:
        lam = self.validate(value)
        return (lam, lam)

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        return ctx.full(value)
