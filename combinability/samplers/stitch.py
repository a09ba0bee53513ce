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

__all__ = ["Stitch", "STITCH_LOWER", "stitch_direction"]

#: Valid values of ``Stitch.lower``: the model whose layers sit below the cut.
STITCH_LOWER: tuple[str, ...] = ("b", "a")

_MODEL_NAMES = {"a": "A (Θ_A)", "b": "B (π(Θ_B))"}


def stitch_direction(lower: str = "b") -> str:
    """A one-line description of the stitching direction, for figures and result attributes.

    Parameters
    ----------
    lower : {"b", "a"}
        The model whose layers sit below the cut.

    Returns
    -------
    str
        E.g. ``"layers below the cut from B (π(Θ_B)), above from A (Θ_A)"``. On a naive
        (unaligned) pair, B is the model as trained.

    Raises
    ------
    SamplerError
        If ``lower`` is not one of :data:`STITCH_LOWER`.

    Examples
    --------
    >>> stitch_direction("a")
    'layers below the cut from A (Θ_A), above from B (π(Θ_B))'
    """
    low = _check_lower(lower)
    high = "a" if low == "b" else "b"
    return f"layers below the cut from {_MODEL_NAMES[low]}, above from {_MODEL_NAMES[high]}"


def _check_lower(lower: Any) -> str:
    """``lower`` normalised to lower case, or a :class:`SamplerError` naming the valid values."""
    norm = lower.strip().lower() if isinstance(lower, str) else lower
    if norm not in STITCH_LOWER:
        raise SamplerError(
            f"Stitch: lower={lower!r} is not a model; valid values: 'b' (π(Θ_B) below the cut, "
            "Θ_A above: the paper's §4.3 formula, the default) or 'a' (Θ_A below, π(Θ_B) above: "
            "the section's first sentence)"
        )
    return norm


@dataclass(frozen=True)
class Stitch(Sampler):
    """Identity stitching at the cut ``l``: the layers below ``l`` from one model, the rest from the other.

    With ``lower="b"`` (the default, the paper's §4.3 formula) ``v = 1`` on every element
    whose layer index is ``< l`` and ``v = 0`` elsewhere: the lower ``l`` layers come
    from model B (``π(Θ_B)`` on an aligned pair), the upper ones from model A, joined
    with the identity map; ``l = 0`` is model A, ``l = L`` (the layout's number of
    layers) model B.

    With ``lower="a"`` (the section's first sentence: "the lower part of model Θ_A with
    the upper part of model Θ_B") the mask is mirrored, ``v = 0`` below ``l`` and ``1``
    from ``l`` on: the lower ``l`` layers come from A, the rest from B; ``l = 0`` is
    model B, ``l = L`` model A. In both directions ``l`` counts the layers taken from
    the ``lower`` model.

    Layer indices come from the :class:`~combinability.layout.FlatLayout`
    (``ctx.layer_index`` when given). The valid values depend on the layout, so the
    default grid is ``stitch.grid_for(layout)`` (``0, 1, ..., L``); :attr:`grid` needs
    ``num_layers``.

    Parameters
    ----------
    num_layers : int, optional
        Number of layers ``L``, to use :attr:`grid` without a layout.
    lower : {"b", "a"}, default "b"
        The model whose layers sit below the cut (case-insensitive). Part of
        :attr:`settings`, hence of result attributes and of a sweep's resume key.

    Raises
    ------
    SamplerError
        If ``num_layers`` is not an integer ``>= 0`` or ``lower`` is not ``"a"`` or ``"b"``.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> from combinability.samplers import DrawContext, Stitch
    >>> layout = FlatLayout.from_arrays({"a": np.zeros(2), "b": np.zeros(1), "c": np.zeros(2)})
    >>> Stitch().grid_for(layout).tolist()
    [0, 1, 2, 3]
    >>> ctx = DrawContext(layout, NumpyRandom(0))
    >>> Stitch().draw(2, ctx).tolist()
    [1.0, 1.0, 1.0, 0.0, 0.0]
    >>> Stitch(lower="a").draw(2, ctx).tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0]
    """

    name: ClassVar[str] = "stitch"
    parameter: ClassVar[str] = "layer"
    deterministic: ClassVar[bool] = True

    num_layers: int | None = None
    lower: str = "b"

    def __post_init__(self) -> None:
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise SamplerError(f"Stitch: num_layers must be an integer >= 0, got {n!r}")
        object.__setattr__(self, "lower", _check_lower(self.lower))

    @property
    def direction(self) -> str:
        """Which model is below the cut, in words (see :func:`stitch_direction`)."""
        return stitch_direction(self.lower)

    def end_layer(self, model: str, layers: int) -> int:
        """The cut at which the combination is ``model`` (``"a"`` or ``"b"``) of an ``L = layers`` network."""
        return 0 if model.lower() != self.lower else int(layers)

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
        below = ctx.layers < value
        return ctx.as_float(below if self.lower == "b" else ~below)
