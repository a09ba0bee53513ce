"""§4.2: combinations sampled from the unit hypercube (figs 2–5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from combinability.experiments.compare import compare_alignment
from combinability.samplers import Bernoulli, Hyperplane, Subcube, Uniform

if TYPE_CHECKING:
    from combinability.pair import ModelPair
    from combinability.samplers.base import Sampler

__all__ = ["hypercube", "HYPERCUBE_SAMPLERS"]

#: The four hypercube distributions of §4.2, in the paper's order.
HYPERCUBE_SAMPLERS = (Uniform(), Subcube(), Hyperplane(), Bernoulli())


def hypercube(
    pair: ModelPair,
    samplers: tuple[Sampler, ...] = HYPERCUBE_SAMPLERS,
    *,
    out_dir: str | Path | None = None,
    **sweep_kwargs: Any,
) -> dict[str, xr.Dataset]:
    """Sweep the uniform (§4.2.1), subcube (§4.2.2), hyperplane (§4.2.3) and Bernoulli (§4.2.4) laws.

    Returns
    -------
    dict of sampler name to Dataset
        Each with an ``alignment`` dim (naive, aligned); written to
        ``<out_dir>/hypercube_<name>.nc`` when ``out_dir`` is given.
    """
    out = {}
    for sampler in samplers:
        path = Path(out_dir) / f"hypercube_{sampler.name}.nc" if out_dir is not None else None
        out[sampler.name] = compare_alignment(pair, sampler, out=path, **sweep_kwargs)
    return out
