"""A results file that grows one evaluation at a time, without being rewritten.

A sweep's file is created once, complete in shape, with every result ``NaN`` and a
``done`` mask of zeros (atomically: temporary file, then rename). Finished evaluations
then write their own cells in place and, after them, their ``done`` flags, each followed
by a flush to the operating system, so a run killed at any moment leaves a file whose
``done`` cells are exactly the evaluations that are fully written. Evaluations are written
in groups, at most ``flush_every`` seconds apart (default one second, and always when the
stream closes, an interrupted run included), so that writing costs a fixed small share of
a sweep of fast evaluations; a run killed with SIGKILL loses at most that second of
evaluations, which a resumed run recomputes. Appending costs the same at the 10th and the
10,000th evaluation; the whole file is rewritten only once, when the sweep finishes
(:meth:`ResultStream.finish`, which drops the ``done`` mask).
Other processes can open the file while the sweep runs (HDF5's file locking is turned off
for this process unless ``HDF5_USE_FILE_LOCKING`` is set).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.errors import CorruptFileError
from combinability.results import deferred_interrupt, write_results

__all__ = ["ResultStream"]


class ResultStream:
    """In-place writer of one sweep file (netCDF-4), held open for the whole sweep.

    Parameters
    ----------
    path : path
        The results file; it must exist (see :meth:`create`).
    flush_every : float, optional
        Seconds between writes: evaluations appended within that time are written together
        (``0``: each one as it comes; default :attr:`FLUSH_EVERY`).

    Examples
    --------
    >>> import tempfile, numpy as np, xarray as xr
    >>> path = tempfile.mkdtemp() + "/s.nc"
    >>> ds = xr.Dataset({"loss": (("lam", "sample"), np.full((3, 1), np.nan)),
    ...                  "done": (("lam", "sample"), np.zeros((3, 1), bool))},
    ...                 attrs={"combinability_format": "sweep", "combinability_format_version": 1})
    >>> with ResultStream.create(path, ds) as stream:
    ...     stream.append({"lam": 1, "sample": 0}, {"loss": 0.5})
    >>> xr.open_dataset(path)["loss"].values.ravel().tolist()
    [nan, 0.5, nan]
    """

    #: Default seconds between writes (see ``flush_every``).
    FLUSH_EVERY: float = 1.0

    def __init__(self, path: str | os.PathLike, *, flush_every: float | None = None) -> None:
        # HDF5 locks a file open for writing against every reader; a sweep holds its file for
        # hours, and users read it meanwhile. Only cells are written in place (the file's
        # structure never changes after creation), so readers see a consistent file. A value
        # the user set is respected.
        os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
        import netCDF4

        self.path = Path(path)
        try:
            self._nc = netCDF4.Dataset(self.path, "r+")
        except OSError as exc:
            raise CorruptFileError(f"cannot open {self.path} to append results ({exc})") from None
        self._nc.set_auto_mask(False)
        self.flush_every = float(self.FLUSH_EVERY if flush_every is None else flush_every)
        self._pending: list[tuple[dict[str, int], dict[str, np.ndarray]]] = []
        self._last_flush = time.monotonic()

    @classmethod
    def create(cls, path: str | os.PathLike, template: xr.Dataset, *,
               flush_every: float | None = None) -> ResultStream:
        """Write ``template`` (every cell, a ``done`` mask) atomically, then open it for appending."""
        write_results(template, path)
        return cls(path, flush_every=flush_every)

    def append(self, index: Mapping[str, int], values: Mapping[str, Any]) -> None:
        """Write one evaluation's cells, then mark it done.

        Parameters
        ----------
        index : mapping of dim name to int
            The evaluation's position, e.g. ``{"lam": 3, "sample": 1}``.
        values : mapping of variable name to array
            Each variable's values at ``index``, over its remaining dims in file order
            (e.g. ``loss`` over ``split``).
        """
        self._pending.append((dict(index), {name: np.array(value) for name, value in values.items()}))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the appended evaluations' cells, then their ``done`` flags."""
        if not self._pending:
            return
        with deferred_interrupt():
            for index, values in self._pending:
                for name, value in values.items():
                    self._write(name, index, value)
            self._nc.sync()
            for index, _ in self._pending:
                self._write("done", index, 1)
            self._nc.sync()
            self._pending.clear()  # before a deferred Ctrl-C is raised at the block's end
            self._last_flush = time.monotonic()

    def _write(self, name: str, index: Mapping[str, int], value: Any) -> None:
        try:
            var = self._nc.variables[name]
        except KeyError:
            raise CorruptFileError(f"{self.path} has no variable {name!r} to append to") from None
        key = tuple(index[d] if d in index else slice(None) for d in var.dimensions)
        var[key] = np.asarray(value)

    def close(self) -> None:
        """Write what is pending and close the file (it stays a valid, resumable result)."""
        if self._nc.isopen():
            try:
                self.flush()
            finally:
                with deferred_interrupt():
                    self._nc.close()

    def finish(self, final: xr.Dataset) -> Path:
        """Close the stream and replace the file by ``final`` (atomically), without ``done``."""
        self.close()
        return write_results(final.drop_vars("done", errors="ignore"), self.path)

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
