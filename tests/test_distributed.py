"""Distributed sweeps on a Dask LocalCluster of two worker processes (issue 15).

Every distributed result is compared bit for bit with the in-process sweep of the same
settings: a killed worker, a resume in either direction and any spread of cells over
tasks must not change a number. The failures are planted by a logit metric (``probe``)
whose values are the cross-entropy's, and which kills its worker process or raises when
a marker file tells it to.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (after the skip: installed with dask)

import combinability as cb  # noqa: E402
from combinability.evaluation import LogitMetric, cross_entropy  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe travels to workers by value

VALUES = [0.0, 0.25, 0.5]
SAMPLES = 2
CELLS = len(VALUES) * SAMPLES
SETTINGS = dict(data="digits", values=VALUES, samples=SAMPLES, limit=200, seed=3, agreement=True)


@dataclass(frozen=True)
class Probe:
    """Per-example cross-entropy, with planted failures driven by files in ``folder``.

    ``kill``: the first worker process (never the client, ``client_pid``) that removes it
    dies at once. ``fail_after`` (holding N): every call after the N-th, counted in
    ``calls`` across processes, raises.
    """

    folder: str
    client_pid: int

    def __call__(self, xp, logits, y):
        folder = Path(self.folder)
        if os.getpid() != self.client_pid:
            try:
                (folder / "kill").unlink()
            except FileNotFoundError:
                pass
            else:
                (folder / "killed").write_text(str(os.getpid()))
                os._exit(1)
        limit = folder / "fail_after"
        if limit.exists():
            with open(folder / "calls", "ab") as fh:
                fh.write(b".")
            if (folder / "calls").stat().st_size > int(limit.read_text()):
                raise RuntimeError("planted failure")
        return cross_entropy(xp, logits, y)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def pair():
    a = cb.train("mlp", "digits", backend="torch", seed=0, epochs=1, width=0.125)
    b = cb.train("mlp", "digits", backend="torch", seed=1, epochs=1, width=0.125)
    return cb.ModelPair(a, b, backend="torch").align("weight", seed=0)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="module")
def probe(probe_dir):
    return LogitMetric("probe", Probe(str(probe_dir), os.getpid()), "cross-entropy, with planted failures")


@pytest.fixture(scope="module")
def reference(pair, probe):
    """The in-process sweep every distributed result must equal."""
    return cb.sweep(pair, cb.Uniform(), metrics=[probe], **SETTINGS)


def assert_bitwise_equal(ds: xr.Dataset, ref: xr.Dataset) -> None:
    assert sorted(ds.data_vars) == sorted(ref.data_vars)
    for name in ref.data_vars:
        assert ds[name].dims == ref[name].dims, name
        # NaN-free bitwise equality of float64 arrays: compare the bytes
        assert np.asarray(ds[name].values).tobytes() == np.asarray(ref[name].values).tobytes(), name
    for name in ref.coords:
        np.testing.assert_array_equal(ds[name].values, ref[name].values)


def test_import_combinability_loads_no_dask():
    code = ("import sys, combinability, combinability.sweeps, combinability.executors.dask_cluster; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_distributed_sweep_is_bitwise_the_in_process_one(client, pair, probe, reference, tmp_path, monkeypatch):
    from distributed import Future

    assert np.isfinite(reference["loss"].values).all() and reference["agreement"].values.sum() > 0
    scattered, submitted = [], []
    scatter, submit = client.scatter, client.submit
    monkeypatch.setattr(client, "scatter", lambda data, **kw: scattered.append(kw) or scatter(data, **kw))
    monkeypatch.setattr(client, "submit", lambda fn, *a, **kw: submitted.append((a, kw)) or submit(fn, *a, **kw))
    # two cells per task here; one per task and the default cut in the tests below
    ds = cb.sweep(pair, cb.Uniform(), metrics=[probe], client=client, cells_per_task=2, out=tmp_path / "d.nc",
                  **SETTINGS)
    # the models and data travel once, to every worker; each task carries a reference to them and its cells
    assert len(scattered) == 1 and scattered[0]["broadcast"] is True
    assert len(submitted) == CELLS // 2
    assert all(isinstance(a[0], Future) and len(a[1]) == 2 and kw["resources"] is None for a, kw in submitted)
    assert sorted(cell for a, _ in submitted for cell in a[1]) == [(i, s) for i in range(3) for s in range(2)]
    assert_bitwise_equal(ds, reference)
    assert ds.attrs["executor"] == "dask (2 workers)"
    assert_bitwise_equal(xr.load_dataset(tmp_path / "d.nc"), reference)


def test_compare_alignment_with_client_equals_in_process(client, pair):
    kw = dict(data="digits", values=[0.0, 0.5, 1.0], limit=100, splits=("test",))
    local = cb.experiments.compare_alignment(pair, cb.Linear(), **kw)
    remote = cb.experiments.compare_alignment(pair, cb.Linear(), client=client, **kw)
    assert remote.sizes["alignment"] == 2
    assert_bitwise_equal(remote, local)


def test_killed_worker_mid_sweep_completes_identically(client, pair, probe, probe_dir, reference, tmp_path):
    (probe_dir / "kill").touch()
    try:
        ds = cb.sweep(pair, cb.Uniform(), metrics=[probe], client=client, cells_per_task=1,
                      out=tmp_path / "killed.nc", **SETTINGS)
    finally:
        (probe_dir / "kill").unlink(missing_ok=True)
    assert (probe_dir / "killed").exists(), "no worker was killed: the test planted nothing"
    assert_bitwise_equal(ds, reference)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def _interrupted(probe_dir: Path, run, calls: int) -> None:
    """Run ``run`` with every probe call after ``calls`` failing; it must stop on the planted failure."""
    (probe_dir / "calls").unlink(missing_ok=True)
    (probe_dir / "fail_after").write_text(str(calls))
    try:
        with pytest.raises(RuntimeError, match="planted failure"):
            run()
    finally:
        (probe_dir / "fail_after").unlink()
        (probe_dir / "calls").unlink(missing_ok=True)


def _done(path: Path) -> int:
    with xr.open_dataset(path) as ds:
        return int(ds["done"].values.sum())


# the ends (A, B) are evaluated first: 2 models x 2 splits = 4 probe calls, then 2 per cell
ENDS_CALLS, CELL_CALLS = 4, 2


def test_resume_distributed_then_in_process(client, pair, probe, probe_dir, reference, tmp_path):
    out = tmp_path / "resume.nc"
    _interrupted(probe_dir, lambda: cb.sweep(pair, cb.Uniform(), metrics=[probe], client=client, cells_per_task=1,
                                             out=out, **SETTINGS), ENDS_CALLS + 2 * CELL_CALLS)
    assert 0 < _done(out) < CELLS
    ds = cb.sweep(pair, cb.Uniform(), metrics=[probe], out=out, **SETTINGS)
    assert_bitwise_equal(ds, reference)


def test_resume_in_process_then_distributed(client, pair, probe, probe_dir, reference, tmp_path):
    out = tmp_path / "resume.nc"
    _interrupted(probe_dir, lambda: cb.sweep(pair, cb.Uniform(), metrics=[probe], out=out, **SETTINGS),
                 ENDS_CALLS + 3 * CELL_CALLS)
    assert _done(out) == 3
    ds = cb.sweep(pair, cb.Uniform(), metrics=[probe], client=client, out=out, **SETTINGS)
    assert_bitwise_equal(ds, reference)


def _set_version(version: str) -> str:
    import combinability

    previous, combinability.__version__ = combinability.__version__, version
    return previous


def test_workers_of_another_version_are_refused(client, pair, tmp_path):
    previous = client.run(_set_version, "0.0.0+other")
    try:
        with pytest.raises(cb.IncompatibleVersionError) as err:
            cb.sweep(pair, cb.Linear(), data="digits", limit=50, client=client, out=tmp_path / "v.nc")
    finally:
        for addr, version in previous.items():
            client.run(_set_version, version, workers=[addr])
    message = str(err.value)
    assert "0.0.0+other" in message and cb.__version__ in message and "tcp://" in message
    assert not (tmp_path / "v.nc").exists()


def _hide_torch_backend(hide: bool) -> None:
    from combinability import plugins

    name = "combinability_torch.backend"
    if hide:
        plugins._hidden_for_test = sys.modules[name]
        sys.modules[name] = None  # the next import of it fails, as without torch
    else:
        sys.modules[name] = plugins._hidden_for_test
    plugins._backend_instances.pop("torch", None)


def test_workers_without_the_framework_are_named_with_the_extra(client, pair, tmp_path):
    worker = sorted(client.scheduler_info()["workers"])[0]
    client.run(_hide_torch_backend, True, workers=[worker])
    try:
        with pytest.raises(cb.BackendUnavailableError) as err:
            cb.sweep(pair, cb.Linear(), data="digits", limit=50, client=client, out=tmp_path / "f.nc")
    finally:
        client.run(_hide_torch_backend, False, workers=[worker])
    message = str(err.value)
    assert worker in message and "pip install 'combinability[torch]'" in message
    assert not (tmp_path / "f.nc").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_a_clear_error():
    from combinability.executors.dask_cluster import SchedulerUnreachableError, connect

    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(SchedulerUnreachableError, match="no Dask scheduler answered at") as err:
        connect(address, timeout=1)
    assert address in str(err.value)
    assert isinstance(err.value, ConnectionError)


@pytest.mark.parametrize("address", ["nonsense", "tcp://host"])
def test_a_malformed_scheduler_address_is_refused_at_once(address, monkeypatch):
    from combinability.executors import dask_cluster

    def no_client(*args, **kwargs):
        raise AssertionError("tried to connect to a malformed address")

    monkeypatch.setattr("distributed.Client", no_client)
    with pytest.raises(cb.ConfigurationError, match=f"the scheduler address '{address}' is not an address like "
                                                 r"tcp://host:8786 \(missing port number"):
        dask_cluster.connect(address)


def test_cli_scheduler_option(client, tmp_path, capsys, monkeypatch):
    from combinability.cli import main
    from combinability.executors import dask_cluster

    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT", 1.0)
    for name, seed in (("a", 0), ("b", 1)):
        cb.train("mlp", "digits", backend="torch", seed=seed, epochs=1, width=0.125,
                 checkpoint=tmp_path / f"{name}.ckpt")
    sweep = ["sweep", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--sampler", "uniform", "--samples", "2",
             "--values", "0.1,0.4", "--limit", "60", "-q"]
    # a running cluster: the file equals the in-process command's
    assert main([*sweep, "--out", str(tmp_path / "local.nc")]) == 0
    assert main([*sweep, "--out", str(tmp_path / "remote.nc"), "--scheduler", client.scheduler.address]) == 0
    remote = xr.load_dataset(tmp_path / "remote.nc")
    assert remote.attrs["executor"] == "dask (2 workers)"
    assert_bitwise_equal(remote, xr.load_dataset(tmp_path / "local.nc"))
    capsys.readouterr()
    # no scheduler there, or contradictory options: one-line errors, nothing written
    base = ["sweep", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--out", str(tmp_path / "s.nc")]
    address = f"tcp://127.0.0.1:{_free_port()}"
    assert main([*base, "--scheduler", address]) == 1
    assert f"no Dask scheduler answered at '{address}'" in capsys.readouterr().err
    assert main([*base, "--scheduler", address, "--workers", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--workers", "0"]) == 2
    assert "--workers must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "s.nc").exists()


def test_bad_client_arguments(pair):
    with pytest.raises(cb.ConfigurationError, match="dask.distributed.Client"):
        cb.sweep(pair, cb.Linear(), data="digits", limit=50, client="tcp://127.0.0.1:8786")
    with pytest.raises(cb.ConfigurationError, match="give client= too"):
        cb.sweep(pair, cb.Linear(), data="digits", limit=50, cells_per_task=2)


class _CudaBackend:
    """The torch backend as a CUDA sweep sees it (only what the worker check reads)."""

    name, extra = "torch", "torch"

    def device(self) -> str:
        return "cuda:0"


def test_workers_without_the_sweeps_device_are_named(client):
    from combinability.executors.dask_cluster import check_workers

    with pytest.raises(cb.ConfigurationError, match=r"worker tcp://\S+ has no device 'cuda:0'.*it has cpu"):
        check_workers(client, _CudaBackend())


def test_cells_are_cut_into_tasks():
    from combinability.executors.dask_cluster import batches

    cells = [(i, s) for i in range(5) for s in range(3)]
    assert batches(cells, workers=2) == [cells[0:2], cells[2:4], cells[4:6], cells[6:8], cells[8:10],
                                         cells[10:12], cells[12:14], cells[14:15]]
    assert batches(cells, workers=1, cells_per_task=7) == [cells[:7], cells[7:14], cells[14:]]
    assert batches(cells, workers=100) == [[c] for c in cells]
