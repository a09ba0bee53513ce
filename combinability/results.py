"""Results as labelled ``xarray.Dataset``: schema, provenance, atomic netCDF files.

Every Dataset the library writes carries ``combinability_format`` (what kind of result)
and ``combinability_format_version``; :func:`open_results` checks both and gives back
exactly what :func:`write_results` (or ``Dataset.to_netcdf``) wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.digests import memoized
from combinability.errors import ConfigurationError, CorruptFileError, IncompatibleVersionError, IncompleteResultWarning
from combinability.files import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "open_results",
    "read_results",
    "write_results",
    "atomic_path",
    "provenance",
    "barriers",
    "json_attr",
    "annotate",
    "data_digest",
    "key_differences",
    "existing_result",
    "is_complete",
    "progress_of",
    "reused_as_it_is",
    "RESULT_SUFFIXES",
]

#: Suffixes of the results files this library writes (netCDF-4).
RESULT_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")

#: Version of the results schema written by this library.
FORMAT_VERSION = 1

#: The paper every result refers to (the ``references`` attribute).
REFERENCE = ("Csiszárik, A., Kiss, M. F., Kőrösi-Szabó, P., Muntag, M., Papp, G., Varga, D. (2023). "
             "Mode Combinability: Exploring Convex Combinations of Permutation Aligned Models")

#: ``long_name`` (and ``units``) of the coordinates and variables the library writes; a sampler's
#: own parameter gets its label from the sampler (``Sampler.parameter_long_name``).
LABELS: dict[str, dict[str, str]] = {
    "split": {"long_name": "data split"},
    "sample": {"long_name": "draw of the coefficients (sample index)"},
    "point": {"long_name": "point of the triangle (index)"},
    "lam_b": {"long_name": "coefficient of model B (λ_B)", "units": "1"},
    "lam_c": {"long_name": "coefficient of model C (λ_C)", "units": "1"},
    "category": {"long_name": "agreement category (paper §6.1)"},
    "alignment": {"long_name": "alignment of model B (and C)"},
    "width": {"long_name": "width multiplier", "units": "1"},
    "sampler": {"long_name": "coefficient distribution (sampler)"},
    "layer": {"long_name": "layer index (from the input)"},
    "layer_name": {"long_name": "layer name"},
    "bin": {"long_name": "edge-length bin"},
    "bin_edge": {"long_name": "edge-length bin boundary"},
    "bin_edges": {"long_name": "edge-length bin boundaries |θ_A − π(θ_B)|"},
    "permutation": {"long_name": "perturbed permutation (layer)"},
    "step": {"long_name": "perturbation step"},
    "k": {"long_name": "weakest unit pairs re-matched"},
    "units": {"long_name": "units in the layer"},
    "loss": {"long_name": "mean cross-entropy loss", "units": "nats"},
    "accuracy": {"long_name": "top-1 accuracy", "units": "1"},
    "loss_barrier": {"long_name": "loss barrier (worst loss − mean of the end models)", "units": "nats"},
    "accuracy_barrier": {"long_name": "accuracy barrier (mean of the end models − worst accuracy)", "units": "1"},
    "count": {"long_name": "number of weights per edge-length bin"},
}


def json_attr(value: Any) -> str:
    """Serialise a value for a netCDF attribute (netCDF has no dict or bool attributes)."""
    return json.dumps(value, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def provenance(**extra: Any) -> dict[str, Any]:
    """Attributes common to every result: library and platform versions, time of creation."""
    from combinability import __version__

    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    attrs: dict[str, Any] = {
        "Conventions": "CF-1.10",
        "source": f"combinability {__version__}",
        "references": REFERENCE,
        "history": f"{created} {_command_line()}",
        "combinability_version": __version__,
        "combinability_format_version": FORMAT_VERSION,
        "created": created,
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


def _command_line() -> str:
    """What created the result: the command line of a ``combinability`` run, else the Python API."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if script.name == "combinability" or (script.name == "__main__.py" and script.parent.name == "combinability"):
        return "combinability " + " ".join(sys.argv[1:])  # the console script, or ``python -m combinability``
    return "combinability Python API"


def annotate(ds: xr.Dataset, labels: Mapping[str, Mapping[str, str]] | None = None) -> xr.Dataset:
    """Give every coordinate and known variable a ``long_name`` (and ``units``), in place.

    Existing attributes are kept. ``labels`` adds or overrides entries of :data:`LABELS`
    (e.g. a sampler's parameter). Coordinates without a known label get their name as
    ``long_name``, so xarray's ``.plot()`` always labels its axes. Returns ``ds``.
    """
    table = {**LABELS, **(labels or {})}
    for name in list(ds.coords) + list(ds.data_vars):
        attrs = ds[name].attrs
        known = table.get(str(name))
        if known is None and str(name) in ds.coords:
            known = {"long_name": str(name)}
        for key, value in (known or {}).items():
            attrs.setdefault(key, value)
    return ds


def data_digest(x: Any, y: Any = None) -> str:
    """SHA-256 of the examples (and labels) actually evaluated: shape, dtype and bytes.

    Computed once for read-only arrays (:mod:`combinability.digests`), as the datasets
    :func:`~combinability.data.load_dataset` returns.
    """

    def compute() -> str:
        h = hashlib.sha256()
        for arr in (x, y):
            if arr is None:
                continue
            arr = np.ascontiguousarray(np.asarray(arr))
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    if all(arr is None or isinstance(arr, np.ndarray) for arr in (x, y)):
        return memoized("sha256", (x, y), compute)
    return compute()


def data_identity(ds: Any, *, split: bool = True) -> dict[str, Any]:
    """Name, (split,) size and content hash of evaluated data, for run keys."""
    found = {"name": getattr(ds, "name", ""), "examples": len(ds), "sha256": data_digest(ds.x, ds.y)}
    return {"name": found["name"], "split": ds.split, **found} if split else found


def key_differences(stored: Any, wanted: Mapping[str, Any]) -> list[str]:
    """The settings in which a stored run key (JSON text or mapping) differs from ``wanted``.

    Each entry reads ``"seed: 0 in the file, 1 now"``; an unreadable stored key is one
    entry naming it.
    """
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            return [f"the file's run key is not readable ({stored[:60]!r})"]
    if not isinstance(stored, Mapping):
        return ["the file records no run key (written by an older combinability)"]
    wanted = json.loads(json_attr(dict(wanted)))
    return _differences(stored, wanted, "")


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key, "(absent)"), wanted.get(key, "(absent)")
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping) and set(old) == set(new):
            out.extend(_differences(old, new, f"{prefix}{key}."))  # the same kind of thing: name what changed in it
        else:
            out.append(f"{prefix}{key}: {_short(old)} in the file, {_short(new)} now")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def is_complete(ds: xr.Dataset) -> bool:
    """Whether a result holds every evaluation (a sweep's ``done`` mask, when present, is all true)."""
    return "done" not in ds or bool(ds["done"].all())


def progress_of(ds: xr.Dataset) -> str:
    """``"k of n evaluations"`` of a result with a ``done`` mask."""
    return f"{int(ds['done'].sum())} of {int(ds['done'].size)} evaluations"


def reused_as_it_is(previous: xr.Dataset, attrs: Mapping[str, Any] | None, path: Any) -> xr.Dataset:
    """``previous``, a finished result a run reuses, warning where the caller's ``attrs`` differ from its own
    (the file keeps what it holds; ``overwrite=True`` writes it anew with them)."""
    changed = sorted(k for k, v in (attrs or {}).items() if previous.attrs.get(k) != v)
    if changed:
        import warnings

        warnings.warn(f"{path} holds this run's finished result and is reused as it is: its attributes "
                      f"{', '.join(f'{k}={previous.attrs.get(k)!r}' for k in changed)} stay (attrs= gave "
                      f"{', '.join(f'{k}={attrs[k]!r}' for k in changed)}); pass overwrite=True to run it anew with "
                      "them", UserWarning, stacklevel=3)
    return previous


def existing_result(path: str | os.PathLike | None, key: Mapping[str, Any], *, overwrite: bool = False,
                    attr: str = "run_key") -> xr.Dataset | None:
    """What is at an output path, checked before a run writes there.

    Returns None when nothing is there, or ``overwrite`` is true (the run starts afresh);
    the stored Dataset when it is this library's result of the same run (``ds.attrs[attr]``
    equals ``key``), finished or not, to be reused or resumed.

    Raises
    ------
    ConfigurationError
        If ``path`` does not end in a netCDF suffix (:data:`RESULT_SUFFIXES`).
    OutputExistsError
        If the file is not this library's result, or is the result of another run (the
        message names every setting that differs); pass ``overwrite=True`` to replace it.
    """
    from combinability.errors import CorruptFileError, IncompatibleVersionError, OutputExistsError

    if path is not None and Path(path).suffix.lower() not in RESULT_SUFFIXES:
        raise ConfigurationError(f"results are netCDF files: give out= a name ending in "
                                 f"{', '.join(RESULT_SUFFIXES)}, got {str(path)!r}")
    if path is None or overwrite or not Path(path).exists():
        return None
    hint = "pass overwrite=True (--overwrite) to replace it, or choose another path"
    try:
        ds = read_results(path)
    except (CorruptFileError, IncompatibleVersionError) as exc:
        raise OutputExistsError(f"{path} exists and is not a combinability result this run can continue ({exc}); "
                                f"{hint}") from None
    differences = key_differences(ds.attrs.get(attr), key)
    if differences:
        state = "a finished" if is_complete(ds) else "an unfinished"
        raise OutputExistsError(f"{path} holds {state} result of a different run; settings that differ: "
                                f"{'; '.join(differences)}; {hint}")
    return ds


@contextlib.contextmanager
def deferred_interrupt() -> Any:
    """Hold back Ctrl-C (SIGINT) and SIGTERM while the block runs; raise them afterwards.

    A KeyboardInterrupt inside the netCDF/HDF5 library can leave its locks held (and a
    file half-written); writes are short, so the interrupt waits for them instead and is
    raised (as KeyboardInterrupt) when the block ends. Outside the main thread this is a
    no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            from combinability.files import Terminated

            raise Terminated("terminated (SIGTERM)") if signal.SIGTERM in received else KeyboardInterrupt


def write_results(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to netCDF atomically (temporary file in the same folder, then rename).

    Ctrl-C during the write is deferred until the file is complete (see :func:`deferred_interrupt`).
    """
    annotate(ds)
    with deferred_interrupt(), atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4")
    return Path(path)


def read_results(path: str | os.PathLike) -> xr.Dataset:
    """Read a results file written by this library, fully into memory, finished or not (a run resuming it).

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


def open_results(path: str | os.PathLike) -> xr.Dataset:
    """Read a results file written by this library, fully into memory (:func:`read_results`).

    An unfinished sweep's file (an interrupted or running one) is read with an
    :class:`~combinability.errors.IncompleteResultWarning`: its ``done`` mask says which
    evaluations it holds, and :func:`barriers` refuses it unless asked (``partial=True``).

    Raises
    ------
    FileNotFoundError, CorruptFileError, IncompatibleVersionError
        As :func:`read_results`.
    """
    ds = read_results(path)
    if not is_complete(ds):
        import warnings

        warnings.warn(f"{path} holds {progress_of(ds)} (its run was interrupted or is still running; the same "
                      "command run again finishes it): its ``done`` mask says which; barriers of it are refused "
                      "unless asked for (barriers(ds, partial=True))", IncompleteResultWarning, stacklevel=2)
    return ds


def barriers(ds: xr.Dataset, *, partial: bool = False) -> xr.Dataset:
    """Empirical loss and accuracy barriers (Def. 3.3) of a sweep, per split.

    The loss barrier is the worst (largest) loss over every parameter value and sample
    minus the mean loss of the end models; the accuracy barrier is the mean accuracy of
    the end models minus the worst accuracy. Dimensions other than the sweep's
    parameter and ``sample`` (e.g. ``alignment``) are kept. A NaN loss (or accuracy) of an
    evaluated combination — a diverged model, whose worst value is undefined — makes the
    barrier NaN, as :func:`combinability.metrics.empirical_barrier` does; it is never
    skipped in favour of the worst of the others.

    Parameters
    ----------
    ds : xarray.Dataset
        A sweep's result.
    partial : bool, default False
        Of an unfinished sweep (an interrupted or running one, whose ``done`` mask is not all
        true), take the worst over the evaluations done; without it such a sweep is refused, as
        its barrier would silently be that of part of the grid.

    Raises
    ------
    ConfigurationError
        If the sweep is unfinished and ``partial`` is false.
    """
    ends = [m for m in ("a", "b", "c") if f"loss_{m}" in ds]
    if not ends:
        raise CorruptFileError("the Dataset has no end-model scores (loss_a, loss_b): not a sweep result")
    if not is_complete(ds):
        if not partial:
            raise ConfigurationError(f"the sweep is unfinished ({progress_of(ds)}): its barrier would be that of the "
                                     "evaluations done only; run the same sweep again to finish it, or pass "
                                     "partial=True to take the worst over those done")
        ds = ds.assign(loss=ds["loss"].where(ds["done"]), accuracy=ds["accuracy"].where(ds["done"]))
    reduce = [d for d in ds["loss"].dims if d not in ("split", "alignment")]
    loss_ref = sum(ds[f"loss_{m}"] for m in ends) / len(ends)
    acc_ref = sum(ds[f"accuracy_{m}"] for m in ends) / len(ends)
    # A NaN among the evaluations done (a diverged combination) makes the worst value undefined: the barrier
    # is NaN, as metrics.empirical_barrier's, never the worst of the other combinations. Only the cells not
    # yet evaluated (NaN, and false in ``done``, of a partial sweep) are left out.
    evaluated = ds["done"] if "done" in ds else True
    worst_loss = ds["loss"].max(reduce).where(~(ds["loss"].isnull() & evaluated).any(reduce))
    worst_acc = ds["accuracy"].min(reduce).where(~(ds["accuracy"].isnull() & evaluated).any(reduce))
    out = xr.Dataset(
        {
            "loss_barrier": worst_loss - loss_ref,
            "accuracy_barrier": acc_ref - worst_acc,
        }
    )
    out.attrs = {k: v for k, v in ds.attrs.items() if k in ("sampler", "architecture", "dataset", "width")}
    return annotate(out)
