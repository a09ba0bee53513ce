"""Results as labelled ``xarray.Dataset``: schema, provenance, atomic netCDF files.

Every Dataset the library writes carries ``combinability_format`` (what kind of result)
and ``combinability_format_version``; :func:`open_results` checks both and gives back
exactly what :func:`write_results` (or ``Dataset.to_netcdf``) wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.errors import CorruptFileError, IncompatibleVersionError
from combinability.files import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "open_results",
    "write_results",
    "atomic_path",
    "provenance",
    "barriers",
    "json_attr",
]

#: Version of the results schema written by this library.
FORMAT_VERSION = 1


def json_attr(value: Any) -> str:
    """Serialise a value for a netCDF attribute (netCDF has no dict or bool attributes)."""
    return json.dumps(value, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def provenance(**extra: Any) -> dict[str, Any]:
    """Attributes common to every result: library and platform versions, time of creation."""
    from combinability import __version__

    attrs: dict[str, Any] = {
        "combinability_version": __version__,
        "combinability_format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "xarray_version": xr.__version__,
    }
    for key, value in extra.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, Mapping | list | tuple) and not (
            isinstance(value, list | tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     for v in value) and value
        ):
            value = json_attr(value)
        attrs[key] = value
    return attrs


@contextlib.contextmanager
def deferred_interrupt() -> Any:
    """Hold back Ctrl-C (SIGINT) while the block runs; raise it as KeyboardInterrupt afterwards.

    A KeyboardInterrupt inside the netCDF/HDF5 library can leave its locks held and hang
    the interpreter at exit; writes are short, so the interrupt waits for them instead.
    Outside the main thread this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def write_results(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to netCDF atomically (temporary file in the same folder, then rename).

    Ctrl-C during the write is deferred until the file is complete (see :func:`deferred_interrupt`).
    """
    with deferred_interrupt(), atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4")
    return Path(path)


def open_results(path: str | os.PathLike) -> xr.Dataset:
    """Read a results file written by this library, fully into memory.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        If the file is not readable netCDF, or was not written by combinability.
    IncompatibleVersionError
        If it was written by a newer schema version than this library reads.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        with xr.open_dataset(path, engine="netcdf4") as handle:
            ds = handle.load()
    except Exception as exc:
        raise CorruptFileError(f"{path} is not a readable netCDF results file ({type(exc).__name__}: {exc})") from exc
    if "combinability_format" not in ds.attrs:
        raise CorruptFileError(f"{path} was not written by combinability (no 'combinability_format' attribute)")
    version = ds.attrs.get("combinability_format_version")
    if not isinstance(version, int | np.integer) or int(version) > FORMAT_VERSION or int(version) < 1:
        raise IncompatibleVersionError(
            f"{path} uses results format version {version}; this combinability reads versions 1..{FORMAT_VERSION}"
        )
    return ds


def barriers(ds: xr.Dataset) -> xr.Dataset:
    """Empirical loss and accuracy barriers (Def. 3.3) of a sweep, per split.

    The loss barrier is the worst (largest) loss over every parameter value and sample
    minus the mean loss of the end models; the accuracy barrier is the mean accuracy of
    the end models minus the worst accuracy. Dimensions other than the sweep's
    parameter and ``sample`` (e.g. ``alignment``) are kept.
    """
    ends = [m for m in ("a", "b", "c") if f"loss_{m}" in ds]
    if not ends:
        raise CorruptFileError("the Dataset has no end-model scores (loss_a, loss_b): not a sweep result")
    reduce = [d for d in ds["loss"].dims if d not in ("split", "alignment")]
    loss_ref = sum(ds[f"loss_{m}"] for m in ends) / len(ends)
    acc_ref = sum(ds[f"accuracy_{m}"] for m in ends) / len(ends)
    out = xr.Dataset(
        {
            "loss_barrier": ds["loss"].max(reduce) - loss_ref,
            "accuracy_barrier": acc_ref - ds["accuracy"].min(reduce),
        }
    )
    out.attrs = {k: v for k, v in ds.attrs.items() if k in ("sampler", "architecture", "dataset", "width")}
    return out
