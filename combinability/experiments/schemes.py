"""One-sampler experiments: identity stitching (§4.3), Min/Max (§4.5.1),
linear extrapolation (§5.1) and Θ_A-centred boxes (§5.2)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from combinability.experiments.compare import compare_alignment
from combinability.samplers import Box, Linear, MinMax, Stitch

if TYPE_CHECKING:
    from combinability.pair import ModelPair

__all__ = ["identity_stitching", "min_max", "linear_extrapolation", "centred_box"]


def identity_stitching(pair: ModelPair, *, out: str | Path | None = None, **sweep_kwargs: Any) -> xr.Dataset:
    """§4.3 (fig 6): the lower ``layer`` layers from B, the rest from A, for every layer.

    ``layer = 0`` is model A, ``layer = L`` model B; in between, the two halves are
    joined by the identity (the aligned pair) or not aligned at all (the naive pair).
    """
    return compare_alignment(pair, Stitch(), out=out, attrs={"layer_names": ", ".join(pair.layer_names)},
                             **sweep_kwargs)


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
