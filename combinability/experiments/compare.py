"""Sweep a naive and an aligned pair the same way, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from combinability.results import open_results
from combinability.sweeps import sweep_pairs

if TYPE_CHECKING:
    from combinability.pair import ModelPair
    from combinability.samplers.base import Sampler

__all__ = ["compare_alignment", "reuse_or_run"]


def reuse_or_run(out: str | Path | None, run: Any) -> xr.Dataset:
    """Return the finished result at ``out`` when it exists, else ``run(out)``.

    A file whose ``done`` mask is not all true is an interrupted sweep: ``run(out)`` is
    called again and resumes it.
    """
    if out is not None and Path(out).exists():
        ds = open_results(out)
        if "done" not in ds or bool(ds["done"].all()):
            return ds
    return run(out)


def compare_alignment(
    pair: ModelPair,
    sampler: Sampler,
    *,
    out: str | Path | None = None,
    naive: bool = True,
    attrs: dict[str, Any] | None = None,
    **sweep_kwargs: Any,
) -> xr.Dataset:
    """Sweep ``sampler`` over the naive and the aligned pair along an ``alignment`` dim.

    Parameters
    ----------
    pair : ModelPair
        An aligned pair (``pair.align(...)``); its ``naive`` twin is swept too.
    sampler : Sampler
    out : path, optional
        Final netCDF file; an existing one is returned as is (finished work is reused),
        and partial results stream beside it so an interrupted run resumes.
    naive : bool
        Include the naive pair (default True).
    attrs : dict, optional
        Extra attributes stored with the result.
    **sweep_kwargs
        Passed to :func:`combinability.sweep`.
    """
    pairs = {"naive": pair.naive or pair, "aligned": pair} if naive and pair.is_aligned else {pair.alignment: pair}
    return reuse_or_run(out, lambda o: sweep_pairs(pairs, sampler, out=o, attrs=attrs, **sweep_kwargs))
