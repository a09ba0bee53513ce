"""Interpolation between the 'Max' and the 'Min' model (paper §4.5.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from combinability.errors import SamplerError
from combinability.samplers.base import DrawContext, Sampler

__all__ = ["MinMax"]


@dataclass(frozen=True)
class MinMax(Sampler):
    """``v = (1 − λ) v_max + λ v_min``: from the 'Max' model (λ = 0) to the 'Min' model (λ = 1).

    The Max model takes, for every element, the weight of larger absolute value
    (``v_max = 1`` where ``|θ_B| > |θ_A|``), the Min model the one of smaller absolute
    value (``v_min = 1`` where ``|θ_B| < |θ_A|``). Ties (``|θ_A| = |θ_B|``) go to model A in
    both, so ``v = 0`` there for every λ. Needs ``ctx.theta_a`` and ``ctx.theta_b``.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import DrawContext, MinMax
    >>> a = np.array([1.0, -3.0, 2.0], np.float32)
    >>> b = np.array([-2.0, 1.0, 2.0], np.float32)
    >>> ctx = DrawContext(FlatLayout.from_arrays({"w": a}), NumpyRandom(0), theta_a=a, theta_b=b)
    >>> MinMax().draw(0.0, ctx).tolist(), MinMax().draw(1.0, ctx).tolist()
    ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    """

    name: ClassVar[str] = "minmax"
    parameter: ClassVar[str] = "lam"
    parameter_long_name: ClassVar[str] = "coefficient λ from the Max model (0) to the Min model (1)"
    deterministic: ClassVar[bool] = True

    lam: float | None = None
    """Fix the parameter to one value (validated at construction); None sweeps the grid."""

    def _draw(self, value: float, ctx: DrawContext) -> Any:
        if ctx.theta_a is None or ctx.theta_b is None:
            raise SamplerError(
                "MinMax: needs the two models' weights; build the DrawContext with theta_a= and theta_b="
            )
        xp = ctx.xp
        abs_a = xp.abs(ctx.theta_a)
        abs_b = xp.abs(ctx.theta_b)
        v = ctx.as_float(abs_b > abs_a)  # v_max
        if value == 0.0:
            return v
        v_min = ctx.as_float(abs_b < abs_a)
        if value == 1.0:
            return v_min
        v *= 1.0 - value
        v_min *= value
        v += v_min
        return v
