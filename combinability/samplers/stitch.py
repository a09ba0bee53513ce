"""Identity stitching: whole layers from one model or the other (paper §4.3)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from combinability.errors import SamplerError
from combinability.layout import FlatLayout
from combinability.samplers.base import DrawContext, Sampler

__all__ = ["Stitch"]


@dataclass(frozen=True)
class Stitch(Sampler):
    """``v = 1`` on every element whose layer index is ``< l``, ``v = 0`` elsewhere.

    The lower ``l`` layers come from model B, the upper ones from model A, joined with
    the identity map. ``l = 0`` is model A, ``l = L`` (the layout's number of layers)
    model B. Layer indices come from the :class:`~combinability.layout.FlatLayout`
    (``ctx.layer_index`` when given).

    The valid values depend on the layout, so the default grid is
    ``stitch.grid_for(layout)`` (``0, 1, ..., L``); :attr:`grid` needs ``num_layers``.

    Parameters
    ----------
    num_layers : int, optional
        Number of layers ``L``, to use :attr:`grid` without a layout.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import DrawContext, Stitch
    >>> layout = FlatLayout.from_arrays({"a": np.zeros(2), "b": np.zeros(1), "c": np.zeros(2)})
    >>> Stitch().grid_for(layout).tolist()
    [0, 1, 2, 3]
    >>> Stitch().draw(2, DrawContext(layout, NumpyRandom(0))).tolist()
    [1.0, 1.0, 1.0, 0.0, 0.0]
    """

    name: ClassVar[str] = "stitch"
    parameter: ClassVar[str] = "layer"
    deterministic: ClassVar[bool] = True

    num_layers: int | None = None

    def __post_init__(self) -> None:
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise SamplerError(f"Stitch: num_layers must be an integer >= 0, got {n!r}")

    def _layers(self, layout: FlatLayout | None) -> int:
        if layout is not None:
            return layout.num_layers
        if self.num_layers is not None:
            return int(self.num_layers)
        raise SamplerError(
            "Stitch: the valid layers depend on the model; use stitch.grid_for(layout) "
            "or Stitch(num_layers=L)"
        )

    @property
    def range(self) -> tuple[float, float]:
        return (0.0, float(self._layers(None)))

    @property
    def grid(self) -> np.ndarray:
        return np.arange(self._layers(None) + 1)

    def grid_for(self, layout: FlatLayout | None = None) -> np.ndarray:
        return np.arange(self._layers(layout) + 1)

    def support(self, value: Any) -> tuple[float, float]:
        return (0.0, 1.0)

    def validate(self, value: Any, layout: FlatLayout | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray):
            raise SamplerError(f"Stitch: layer must be an integer, got {value!r}")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise SamplerError(f"Stitch: layer must be an integer, got {value!r}") from None
        if not (math.isfinite(x) and x == int(x)):
            raise SamplerError(f"Stitch: layer must be an integer, got {value!r}")
        top = self._layers(layout)
        if not 0 <= x <= top:
            raise SamplerError(f"Stitch: layer={int(x)} is outside [0, {top}]")
        return int(x)

    def _draw(self, value: int, ctx: DrawContext) -> Any:
        return ctx.as_float(ctx.layers < value)
