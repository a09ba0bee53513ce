"""The result stream writes evaluations in groups, and never marks a cell done before its values."""

from __future__ import annotations

import numpy as np
import xarray as xr

from combinability.result_stream import ResultStream


def _template(n: int = 6) -> xr.Dataset:
    return xr.Dataset({"loss": (("split", "lam", "sample"), np.full((2, n, 1), np.nan)),
                       "done": (("lam", "sample"), np.zeros((n, 1), bool))},
                      attrs={"combinability_format": "sweep", "combinability_format_version": 1})


def _read(path) -> tuple[np.ndarray, np.ndarray]:
    with xr.open_dataset(path) as ds:
        return ds["loss"].values.copy(), ds["done"].values.astype(bool).ravel()


def test_evaluations_within_the_interval_are_written_together_and_all_on_close(tmp_path):
    path = tmp_path / "s.nc"
    stream = ResultStream.create(path, _template(), flush_every=3600)
    for i in range(3):
        stream.append({"lam": i, "sample": 0}, {"loss": np.array([i, 10.0 + i])})
    loss, done = _read(path)  # another reader while the sweep runs: nothing written yet
    assert not done.any() and np.isnan(loss).all()
    stream.flush()
    loss, done = _read(path)
    np.testing.assert_array_equal(done, [True, True, True, False, False, False])
    np.testing.assert_array_equal(loss[:, :3, 0], [[0, 1, 2], [10, 11, 12]])
    stream.append({"lam": 5, "sample": 0}, {"loss": np.array([5.0, 15.0])})
    stream.close()  # an interrupted run closes its stream: what was appended is kept
    loss, done = _read(path)
    np.testing.assert_array_equal(done, [True, True, True, False, False, True])
    np.testing.assert_array_equal(loss[:, 5, 0], [5, 15])
    assert np.isnan(loss[:, 3:5]).all()


def test_appended_values_are_copied_when_appended(tmp_path):
    path = tmp_path / "s.nc"
    buffer = np.array([1.0, 2.0])
    with ResultStream.create(path, _template(), flush_every=3600) as stream:
        stream.append({"lam": 0, "sample": 0}, {"loss": buffer})
        buffer[:] = -1  # the caller reuses its array
    loss, _ = _read(path)
    np.testing.assert_array_equal(loss[:, 0, 0], [1, 2])


def test_no_interval_writes_each_evaluation_as_it_comes(tmp_path):
    path = tmp_path / "s.nc"
    with ResultStream.create(path, _template(), flush_every=0) as stream:
        stream.append({"lam": 2, "sample": 0}, {"loss": np.array([7.0, 8.0])})
        loss, done = _read(path)
        assert done.tolist() == [False, False, True, False, False, False]
        np.testing.assert_array_equal(loss[:, 2, 0], [7, 8])
