"""§6.1 (fig 12): do combinations predict like model A, like model B, like both or like neither?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from combinability.samplers import Bernoulli, Hyperplane, Linear, Subcube, Uniform
from combinability.sweeps import sweep

if TYPE_CHECKING:
    from combinability.pair import ModelPair
    from combinability.samplers.base import Sampler

__all__ = ["functional_agreement", "AGREEMENT_SCHEMES"]

#: The schemes of fig 12: linear interpolation, Bernoulli, cube and plane intersect, uniform.
AGREEMENT_SCHEMES = (Linear(), Bernoulli(), Subcube(), Hyperplane(), Uniform())


def functional_agreement(
    pair: ModelPair,
    samplers: tuple[Sampler, ...] = AGREEMENT_SCHEMES,
    *,
    splits: tuple[str, ...] = ("test",),
    out_dir: str | Path | None = None,
    **sweep_kwargs: Any,
) -> dict[str, xr.Dataset]:
    """Count, along each scheme, the examples in each agreement category of §6.1.

    Each Dataset has an ``agreement`` variable with a ``category`` dim:
    the combination's prediction agrees with A only, B only, both or neither, each
    split by whether it is correct. Written to ``<out_dir>/agreement_<name>.nc``.
    """
    out = {}
    for sampler in samplers:
        path = Path(out_dir) / f"agreement_{sampler.name}.nc" if out_dir is not None else None
        out[sampler.name] = sweep(pair, sampler, agreement=True, splits=splits, out=path, **sweep_kwargs)
    return out
