"""The sampler base class and the context a draw runs in.

A *sampler* is a small frozen dataclass describing one family of coefficient
distributions from the paper. It knows the name of its swept parameter, that
parameter's default grid and valid range, and how to draw one coefficient vector
``v`` (the weight of model B, see :mod:`combinability.samplers`) for a given value of
the parameter. Everything a draw needs besides that value is held in a
:class:`DrawContext`.

Sampler code is written against the Python array API only, so one implementation
runs on numpy, torch and jax arrays; every random number comes from
``ctx.random.uniform``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from combinability.backend import RandomSource
from combinability.errors import LayoutError, SamplerError
from combinability.layout import FlatLayout

__all__ = ["DrawContext", "Sampler", "GRID_SIZE", "equidistant"]

#: Number of values in a default grid (the paper's 25 equidistant values).
GRID_SIZE = 25


def equidistant(start: float, stop: float, num: int = GRID_SIZE) -> np.ndarray:
    """``num`` equidistant float64 values from ``start`` to ``stop``, both included."""
    return np.linspace(start, stop, num, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class DrawContext:
    """Everything a sampler needs to draw a coefficient vector, besides the parameter value.

    Parameters
    ----------
    layout : FlatLayout
        Layout of the flat parameter vectors; ``layout.size`` is the length ``d`` of ``v``.
    random : RandomSource
        The only source of randomness: ``random.uniform(shape, dtype)`` returns U[0, 1)
        draws as arrays of the backend's namespace (numpy, torch, jax, ...).
    xp : array namespace, optional
        Namespace of the arrays to create. Derived with
        :func:`array_api_compat.array_namespace` from ``theta_a`` (or ``theta_b``) when
        given, otherwise from a zero-size uniform draw.
    dtype : dtype of ``xp``, optional
        Floating dtype of ``v``; defaults to that of ``theta_a`` (or ``theta_b``), else to
        the random source's default (float32 for :class:`~combinability.backend.NumpyRandom`).
    device : device of ``xp``, optional
        Where to create arrays; derived like ``xp``.
    theta_a, theta_b : arrays of shape ``(d,)``, optional
        The flat parameter vectors of models A and B (needed by :class:`~combinability.samplers.MinMax`).
    layer_index : int array of shape ``(d,)``, optional
        Layer of every element, on the device (used by :class:`~combinability.samplers.Stitch`);
        computed from ``layout.layer_index()`` when absent.

    Examples
    --------
    >>> import numpy as np
    >>> from combinability.backend import NumpyRandom
    >>> from combinability.layout import FlatLayout
    >>> layout = FlatLayout.from_arrays({"w": np.zeros((2, 3), np.float32)})
    >>> ctx = DrawContext(layout, NumpyRandom(0))
    >>> ctx.size, ctx.dtype
    (6, dtype('float32'))
    """

    layout: FlatLayout
    random: RandomSource
    xp: Any = None
    dtype: Any = None
    device: Any = None
    theta_a: Any = field(default=None, repr=False)
    theta_b: Any = field(default=None, repr=False)
    layer_index: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, FlatLayout):
            raise LayoutError(f"DrawContext needs a FlatLayout, got {type(self.layout).__name__}")
        if not callable(getattr(self.random, "uniform", None)):
            raise SamplerError(
                f"DrawContext needs a RandomSource with a uniform(shape, dtype) method, "
                f"got {type(self.random).__name__}"
            )
        d = self.layout.size
        for label in ("theta_a", "theta_b", "layer_index"):
            arr = getattr(self, label)
            if arr is not None and tuple(arr.shape) != (d,):
                raise LayoutError(f"DrawContext.{label} has shape {tuple(arr.shape)}, the layout expects ({d},)")
        ref = self.theta_a if self.theta_a is not None else self.theta_b
        if ref is None and (self.xp is None or self.dtype is None or self.device is None):
            ref = self.random.uniform((0,), self.dtype)  # a zero-size probe: namespace, dtype, device
        if self.xp is None:
            object.__setattr__(self, "xp", array_api_compat.array_namespace(ref))
        if self.dtype is None:
            object.__setattr__(self, "dtype", ref.dtype)
        if self.device is None:
            object.__setattr__(self, "device", array_api_compat.device(ref))

    @property
    def size(self) -> int:
        """Length ``d`` of the coefficient vectors."""
        return self.layout.size

    def uniform(self) -> Any:
        """``d`` independent U[0, 1) draws of :attr:`dtype` from :attr:`random`."""
        return self.random.uniform((self.size,), self.dtype)

    def full(self, value: float) -> Any:
        """A ``(d,)`` array of :attr:`dtype` filled with ``value``."""
        return self.xp.full((self.size,), value, dtype=self.dtype, device=self.device)

    def as_float(self, mask: Any) -> Any:
        """A boolean array as 0/1 of :attr:`dtype`."""
        return self.xp.astype(mask, self.dtype)

    @cached_property
    def layers(self) -> Any:
        """The layer index of every element, as an integer array of :attr:`xp` on :attr:`device`."""
        if self.layer_index is not None:
            return self.layer_index
        return self.xp.asarray(self.layout.layer_index(), device=self.device)


def _real(sampler: str, parameter: str, value: Any) -> float:
    """``value`` as a finite Python float, or a :class:`SamplerError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray):
        raise SamplerError(f"{sampler}: {parameter} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SamplerError(f"{sampler}: {parameter} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise SamplerError(f"{sampler}: {parameter}={out!r} is not a finite number")
    return out


@dataclass(frozen=True)
class Sampler:
    """Base class of coefficient samplers.

    Subclasses are frozen dataclasses that set the class attributes below and implement
    :meth:`_draw` (and :meth:`support` and :attr:`grid`); :meth:`draw` validates the value
    first.

    Attributes
    ----------
    name : str
        Registry name (lower case), e.g. ``"uniform"``.
    parameter : str or tuple of str
        Name of the swept parameter (``"s"``, ``"lam"``, ...), a tuple for several.
    parameter_long_name : str
        What the parameter means, in words: the ``long_name`` of its coordinate in results
        (axis labels of ``Dataset.plot``).
    deterministic : bool
        True when every draw for a value gives the same vector (one sample suffices).
    models : int
        Number of models combined (2, or 3 for :class:`~combinability.samplers.Triangle`).
    """

    name: ClassVar[str] = ""
    parameter: ClassVar[str | tuple[str, ...]] = ""
    parameter_long_name: ClassVar[str] = ""
    deterministic: ClassVar[bool] = False
    models: ClassVar[int] = 2

    def __post_init__(self) -> None:
        fixed = self.fixed
        if fixed is not None:
            self.validate(fixed)

    # -- description -----------------------------------------------------------
    @property
    def fixed(self) -> Any:
        """The parameter value the sampler was built with (``Uniform(s=0.25)``), or None.

        A sampler built with a value sweeps that value alone by default; one built
        without sweeps its default grid.
        """
        if not isinstance(self.parameter, str) or self.parameter not in {f.name for f in fields(self)}:
            return None
        return getattr(self, self.parameter)

    @property
    def parameters(self) -> tuple[str, ...]:
        """:attr:`parameter` as a tuple."""
        return self.parameter if isinstance(self.parameter, tuple) else (self.parameter,)

    @property
    def settings(self) -> dict[str, Any]:
        """The sampler's name and fields, JSON-able (for provenance)."""
        return {"sampler": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @property
    def range(self) -> tuple[float, float]:
        """Closed interval of valid parameter values."""
        return (0.0, 1.0)

    @property
    def grid(self) -> np.ndarray:
        """Default parameter values: 25 equidistant values over :attr:`range` (or the fixed value)."""
        if self.fixed is not None:
            return np.asarray([self.fixed], dtype=np.float64)
        return equidistant(*self.range)

    def grid_for(self, layout: FlatLayout | None = None) -> np.ndarray:
        """Default parameter values for ``layout`` (only :class:`Stitch` needs the layout)."""
        return self.grid

    @property
    def bounds(self) -> tuple[float, float]:
        """Support of the coefficients ``v`` over every valid parameter value."""
        return (0.0, 1.0)

    def support(self, value: Any) -> tuple[float, float]:
        """Closed interval holding every coefficient drawn for ``value``."""
        return self.bounds

    # -- validation and drawing ------------------------------------------------
    def validate(self, value: Any, layout: FlatLayout | None = None) -> Any:
        """Check ``value`` and return it normalised (a float for one-parameter samplers).

        Raises
        ------
        SamplerError
            If ``value`` is not a finite number inside :attr:`range`.
        """
        cls = type(self).__name__
        x = _real(cls, self.parameter, value)
        lo, hi = self.range
        if not lo <= x <= hi:
            raise SamplerError(f"{cls}: {self.parameter}={x!r} is outside [{lo:g}, {hi:g}]")
        return x

    def draw(self, value: Any, ctx: DrawContext) -> Any:
        """Draw one coefficient vector for ``value``.

        Parameters
        ----------
        value
            Value of :attr:`parameter` (a pair for :class:`Triangle`).
        ctx : DrawContext

        Returns
        -------
        array of shape ``(d,)`` in ``ctx.xp``
            The weight ``v`` of model B (a pair of arrays for three-model samplers).

        Raises
        ------
        SamplerError
            If ``value`` is outside the sampler's range.
        """
        return self._draw(self.validate(value, ctx.layout), ctx)

    def _draw(self, value: Any, ctx: DrawContext) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement _draw")


def check_pair(sampler: str, parameters: Sequence[str], value: Any) -> tuple[float, float]:
    """``value`` as a pair of finite floats, or a :class:`SamplerError`."""
    try:
        first, second = value
    except (TypeError, ValueError):
        raise SamplerError(
            f"{sampler}: the value must be a pair ({', '.join(parameters)}), got {value!r}"
        ) from None
    return _real(sampler, parameters[0], first), _real(sampler, parameters[1], second)
