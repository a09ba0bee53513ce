"""One-sampler experiments: identity stitching (§4.3), Min/Max (§4.5.1),
linear extrapolation (§5.1) and Θ_A-centred boxes (§5.2)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from combinability.experiments.compare import compare_alignment
from combinability.samplers import Box, Linear, MinMax, Stitch

if TYPE_CHECKING:
    from combinability.pair import ModelPair

__all__ = ["identity_stitching", "min_max", "linear_extrapolation", "centred_box"]


def identity_stitching(pair: ModelPair, *, lower: str = "b", out: str | Path | None = None,
                       attrs: Mapping[str, Any] | None = None, **sweep_kwargs: Any) -> xr.Dataset:
    """§4.3 (fig 6): whole layers from one model below the cut ``layer``, from the other above.

    The paper is inconsistent about the direction (see ``docs/conventions.md``): its
    formula puts ``π(Θ_B)`` below the cut and ``Θ_A`` above (``lower="b"``, the
    default), its first sentence the lower part of A and the upper part of B
    (``lower="a"``). ``layer = l`` takes the lower ``l`` layers from the ``lower`` model:
    with ``lower="b"``, ``layer = 0`` is model A and ``layer = L`` model B; with
    ``lower="a"`` the other way round. In between, the two parts are joined by the
    identity (the aligned pair) or not aligned at all (the naive pair).

    Parameters
    ----------
    pair : ModelPair
        An aligned pair; its naive twin is swept too.
    lower : {"b", "a"}, default "b"
        The model whose layers sit below the cut (:class:`~combinability.samplers.Stitch`).
    out : path, optional
        Final netCDF file (an existing finished one is returned as is).
    attrs : mapping, optional
        Extra attributes stored with the result, besides ``layer_names`` and ``stitch_lower``.
    **sweep_kwargs
        Passed to :func:`combinability.sweep`.

    Returns
    -------
    xarray.Dataset
        ``loss``, ``accuracy`` with dims ``(alignment, split, layer, sample)``; attributes
        ``layer_names``, ``stitch_lower`` and ``stitch_direction`` (in words).

    Raises
    ------
    SamplerError
        If ``lower`` is not ``"a"`` or ``"b"`` (before anything runs).
    """
    sampler = Stitch(lower=lower)
    labels = {"layer_names": ", ".join(pair.layer_names), "stitch_lower": sampler.lower,
              "stitch_direction": sampler.direction, **dict(attrs or {})}
    return compare_alignment(pair, sampler, out=out, attrs=labels, **sweep_kwargs)


def min_max(pair: ModelPair, *, out: str | Path | None = None, **sweep_kwargs: Any) -> xr.Dataset:
    """§4.5.1 (fig 8): interpolate from the 'Max' model (λ = 0: of every weight pair the
    larger in magnitude) to the 'Min' model (λ = 1: the smaller)."""
    return compare_alignment(pair, MinMax(), out=out, **sweep_kwargs)


def linear_extrapolation(pair: ModelPair, *, start: float = -1.0, stop: float = 2.0,
                         out: str | Path | None = None, **sweep_kwargs: Any) -> xr.Dataset:
    """§5.1 (fig 9): the linear path ``(1 − λ) θ_A + λ θ_B`` for λ from ``start`` to ``stop``."""
    return compare_alignment(pair, Linear(start=start, stop=stop), out=out, **sweep_kwargs)


def centred_box(pair: ModelPair, *, out: str | Path | None = None, **sweep_kwargs: Any) -> xr.Dataset:
    """§5.2 (fig 10): ``v ~ U[−s, s]^d``, boxes centred at Θ_A with edges ``|θ_A − θ_B|``."""
    return compare_alignment(pair, Box(), out=out, **sweep_kwargs)
