"""Coefficient samplers: the distributions of element-wise model combinations.

Convention
----------
A coefficient vector ``v`` is the weight of model **B**; the combined model is

    θ_v = (1 − v) ⊙ θ_A + v ⊙ θ_B            (:func:`combinability.combination.combine`)

so ``v = 0`` gives model A and ``v = 1`` model B exactly, and every interpolating
sampler's parameter runs from model A (value 0) to model B (value 1). Three-model
combinations (:class:`Triangle`) use ``θ = (1 − λ_B − λ_C) θ_A + λ_B θ_B + λ_C θ_C``.

The paper is not consistent here: Definition 3.2 writes ``θ_v = v ⊙ θ_A + (1 − v) ⊙ θ_B``
(``v`` weights A), while §4.2.2 ("for λ = 0 we get model A"), §3's loss barrier, §5.1
and §5.4 put model A at 0. This library follows the latter throughout; for the
symmetric samplers (Uniform, Bernoulli at ``p = 1/2``, ...) the two readings differ
only by swapping A and B.

Samplers
--------
=============  ==============  ===========================================  ==============
class          parameter       law of ``v`` (d coordinates)                 paper
=============  ==============  ===========================================  ==============
Uniform        s ∈ [0, 0.5]    U[0.5 − s, 0.5 + s]^d                        §4.2.1
Subcube        lam ∈ [0, 1]    U[0, 2λ]^d (λ ≤ ½), U[2λ − 1, 1]^d (λ > ½)   §4.2.2
Hyperplane     alpha ∈ [0, 1]  i.i.d. truncated exponential, mean α         §4.2.3
Bernoulli      p ∈ [0, 1]      i.i.d. Bernoulli(p)                          §4.2.4
Stitch         layer ∈ 0..L    1 on layers < l (from B), 0 above (from A)   §4.3
                               (lower="a": A's layers below the cut, B's above)
MinMax         lam ∈ [0, 1]    (1 − λ) v_max + λ v_min ('Max' → 'Min')      §4.5.1
Linear         lam ∈ [0, 1]    λ everywhere; Linear(start=-1, stop=2)       §3, §5.1
Box            s ∈ [0, 0.5]    U[−s, s]^d (centred at A)                    §5.2
Triangle       (lam_b, lam_c)  constants λ_B, λ_C on the 2-simplex          §5.4
=============  ==============  ===========================================  ==============

Each sampler is a frozen dataclass with class attributes ``name``, ``parameter``,
``deterministic`` and ``models``, properties ``grid`` (25 equidistant default values),
``range`` and ``bounds``, and ``draw(value, ctx)`` returning an array of ``ctx.xp``
(numpy, torch, jax, ...) built only from ``ctx.random.uniform``.

Examples
--------
>>> import numpy as np
>>> from combinability.backend import NumpyRandom
>>> from combinability.layout import FlatLayout
>>> from combinability.samplers import DrawContext, get_sampler
>>> sampler = get_sampler("subcube")
>>> sampler.parameter, len(sampler.grid)
('lam', 25)
>>> ctx = DrawContext(FlatLayout.from_arrays({"w": np.zeros(4, np.float32)}), NumpyRandom(0))
>>> sampler.draw(1.0, ctx).tolist()
[1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from combinability.errors import PluginError, SamplerError, UnknownNameError
from combinability.samplers.base import GRID_SIZE, DrawContext, Sampler
from combinability.samplers.bernoulli import Bernoulli
from combinability.samplers.box import Box
from combinability.samplers.hyperplane import Hyperplane, truncated_exponential_mean, truncated_exponential_rate
from combinability.samplers.linear import Linear
from combinability.samplers.minmax import MinMax
from combinability.samplers.stitch import Stitch
from combinability.samplers.subcube import Subcube
from combinability.samplers.triangle import Triangle
from combinability.samplers.uniform import Uniform

__all__ = [
    "GRID_SIZE",
    "DrawContext",
    "Sampler",
    "Uniform",
    "Subcube",
    "Hyperplane",
    "Bernoulli",
    "Linear",
    "Stitch",
    "MinMax",
    "Box",
    "Triangle",
    "BUILTIN_SAMPLERS",
    "SAMPLERS",
    "get_sampler",
    "register_sampler",
    "truncated_exponential_mean",
    "truncated_exponential_rate",
]

#: The samplers of the paper, in the paper's order.
BUILTIN_SAMPLERS: tuple[type[Sampler], ...] = (
    Uniform,
    Subcube,
    Hyperplane,
    Bernoulli,
    Stitch,
    MinMax,
    Linear,
    Box,
    Triangle,
)

#: Registry of sampler classes by name (built-ins; plugins are added with :func:`register_sampler`).
SAMPLERS: dict[str, type] = {cls.name: cls for cls in BUILTIN_SAMPLERS}


def register_sampler(cls: type, *, replace: bool = False) -> type:
    """Add a sampler class to :data:`SAMPLERS` under its ``name``.

    Parameters
    ----------
    cls : type
        A class with a lower-case string ``name``, a ``parameter`` and callable ``draw``;
        usually a :class:`Sampler` subclass.
    replace : bool, default False
        Allow replacing a different class already registered under that name.

    Returns
    -------
    type
        ``cls`` (so this works as a class decorator).

    Raises
    ------
    PluginError
        If ``cls`` lacks the required attributes, or its name is taken and not ``replace``.
    """
    name = getattr(cls, "name", None)
    problems = []
    if not isinstance(cls, type):
        problems.append("it is not a class")
    if not isinstance(name, str) or not name or name != name.lower():
        problems.append(f"its name must be a non-empty lower-case string, got {name!r}")
    if not isinstance(getattr(cls, "parameter", None), str | tuple) or not getattr(cls, "parameter", None):
        problems.append("it needs a 'parameter' (str or tuple of str)")
    if not callable(getattr(cls, "draw", None)):
        problems.append("it needs a draw(value, ctx) method")
    if problems:
        raise PluginError(f"cannot register sampler {cls!r}: " + "; ".join(problems))
    if not replace and SAMPLERS.get(name, cls) is not cls:
        raise PluginError(f"a sampler named {name!r} is already registered ({SAMPLERS[name]!r})")
    SAMPLERS[name] = cls
    return cls


def get_sampler(name: str, **kwargs: Any) -> Any:
    """Instantiate the sampler registered as ``name`` (case-insensitive) with ``kwargs``.

    Examples
    --------
    >>> get_sampler("linear", start=-1, stop=2)
    Linear(start=-1, stop=2, lam=None)

    Raises
    ------
    UnknownNameError
        If no sampler has that name; the message lists the valid names.
    SamplerError
        If ``kwargs`` are not settings of that sampler.
    """
    key = name.lower() if isinstance(name, str) else name
    try:
        cls = SAMPLERS[key]
    except (KeyError, TypeError):
        from combinability.plugins import get_sampler_class, list_samplers

        if isinstance(key, str) and key in list_samplers():  # registered by a plugin's hook
            cls = get_sampler_class(key)
        else:
            valid = sorted(set(SAMPLERS) | set(list_samplers()))
            raise UnknownNameError(f"unknown sampler {name!r}; valid names: {', '.join(valid)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        known = [f.name for f in fields(cls)] if is_dataclass(cls) else []
        raise SamplerError(
            f"{cls.__name__}: invalid settings {kwargs!r} ({exc}); valid settings: {known or 'none'}"
        ) from None
