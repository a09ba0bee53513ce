"""Sweep a naive and an aligned pair the same way, side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from combinability.results import existing_result, is_complete, json_attr
from combinability.sweeps import sweep_pairs

if TYPE_CHECKING:
    from combinability.pair import ModelPair
    from combinability.samplers.base import Sampler

__all__ = ["RUN_OPTIONS", "check_client", "compare_alignment", "reuse_or_run"]

#: Sweep keywords that change how a run goes, not its numbers: left out of experiments' result keys,
#: so a result computed on a Dask cluster is reused by an in-process run and the other way round.
RUN_OPTIONS = ("progress", "client", "cells_per_task")


def check_client(client: Any, backend: Any) -> None:
    """Refuse a Dask ``client`` whose workers cannot sweep on ``backend``, before any training; None passes.

    See :func:`combinability.executors.dask_cluster.check_workers` for what is checked.
    """
    if client is None:
        return
    from combinability.executors.dask_cluster import check_workers
    from combinability.plugins import get_backend

    check_workers(client, get_backend(backend))


def reuse_or_run(out: str | Path | None, key: Mapping[str, Any], run: Any, *, overwrite: bool = False) -> xr.Dataset:
    """Return the finished result of this run at ``out`` when it exists, else ``run(out)``.

    ``key`` holds every setting that identifies the result; ``run(out)`` must return the
    Dataset (and write it to ``out``); the key is stored in its ``run_key`` attribute
    (and written again when ``run`` wrote the file without it). A file at ``out`` that is
    not this library's, or holds the result of other settings, is refused
    (:class:`~combinability.errors.OutputExistsError`, naming what differs) unless
    ``overwrite=True``.
    """
    from combinability.files import output_lock
    from combinability.results import write_results

    with output_lock(out):
        previous = existing_result(out, key, overwrite=overwrite)
        if previous is not None and is_complete(previous):
            return previous
        ds = run(out)
        ds.attrs["run_key"] = json_attr(dict(key))
        if out is not None:
            write_results(ds, out)
        return ds


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
        Final netCDF file; an existing one of the same sweeps is returned as is (finished
        work is reused), another is refused unless ``overwrite=True``; partial results
        stream beside it so an interrupted run resumes.
    naive : bool
        Include the naive pair (default True).
    attrs : dict, optional
        Extra attributes stored with the result.
    **sweep_kwargs
        Passed to :func:`combinability.sweep` (``client=`` a ``dask.distributed.Client``
        spreads both sweeps over its workers).
    """
    pairs = {"naive": pair.naive or pair, "aligned": pair} if naive and pair.is_aligned else {pair.alignment: pair}
    return sweep_pairs(pairs, sampler, out=out, attrs=attrs, **sweep_kwargs)
