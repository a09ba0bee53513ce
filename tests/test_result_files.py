"""Result files: appended in place, resumed only by the same sweep, never replaced by another run,
checked writable first, free of stray temporaries, and self-describing (issue 10, items 1, 3, 4, 5, 10)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import combinability as cb
from combinability.data.digits import load_digits
from combinability.errors import IncompleteResultWarning
from combinability.evaluation import Evaluator

KW = dict(data="digits", splits=["test"], limit=60, seed=3)


def _no_evaluation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluated although the run should have stopped (or reused) before")

    monkeypatch.setattr(Evaluator, "evaluate", refuse)


# -- item 5: appending does not rewrite the file ------------------------------------------------
def test_a_sweep_writes_its_file_twice_whatever_its_length(digits_pair, tmp_path, monkeypatch):
    calls = []
    original = xr.Dataset.to_netcdf

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("path"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_netcdf", counting)
    out = tmp_path / "s.nc"
    ds = cb.sweep(digits_pair, cb.Uniform(), values=[0.1, 0.3, 0.5], samples=4, out=out, **KW)
    assert len(calls) == 2  # created once (every cell NaN), replaced once at the end: not once per evaluation
    in_memory = cb.sweep(digits_pair, cb.Uniform(), values=[0.1, 0.3, 0.5], samples=4, **KW)
    np.testing.assert_array_equal(cb.open_results(out)["loss"].values, in_memory["loss"].values)
    np.testing.assert_array_equal(ds["loss"].values, in_memory["loss"].values)


class _Peek:
    """A 'repair' that, before evaluation ``at``, reads the results file from another process."""

    def __init__(self, out, at):
        self.out, self.at, self.calls, self.seen = out, at, 0, None

    def __call__(self, theta, context):
        if self.calls == self.at:
            code = ("import sys, json, xarray as xr; d = xr.open_dataset(sys.argv[1]); "
                    "print(json.dumps({'done': d['done'].values.tolist(), 'loss': d['loss'].values.tolist()}))")
            run = subprocess.run([sys.executable, "-c", code, str(self.out)], capture_output=True, text=True,
                                 timeout=120)
            assert run.returncode == 0, run.stderr
            self.seen = json.loads(run.stdout.replace("NaN", "null"))
        self.calls += 1
        return theta


@pytest.mark.parametrize("flush_every", [0.0, None], ids=["each", "grouped"])
def test_the_file_holds_every_finished_evaluation_and_other_processes_can_read_it(digits_pair, tmp_path,
                                                                                  monkeypatch, flush_every):
    from combinability.result_stream import ResultStream

    if flush_every is not None:
        monkeypatch.setattr(ResultStream, "FLUSH_EVERY", flush_every)
    out = tmp_path / "s.nc"
    peek = _Peek(out, at=5)
    final = cb.sweep(digits_pair, cb.Linear(), values=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.5], repair=peek,
                     out=out, **KW)
    done = np.array(peek.seen["done"], dtype=bool)
    n = int(done.sum())
    # evaluations 0..n-1 are written, in order: all five when each is written as it finishes; in groups
    # a second apart (the default), those of the groups written so far
    assert n == 5 if flush_every == 0 else n <= 5
    assert done[:n].all() and not done[n:].any()
    loss = np.array([[[np.nan if v is None else v for v in sample] for sample in value]
                     for value in peek.seen["loss"]], dtype=float)  # (split, lam, sample)
    np.testing.assert_array_equal(loss[0, :n, 0], final["loss"].sel(split="test").values[:n, 0])
    assert np.isnan(loss[0, n:, 0]).all()


# -- item 3: resume only the same sweep --------------------------------------------------------
def test_a_resumed_file_must_match_every_setting_and_the_data_content(digits_pair, tmp_path):
    test = load_digits("test")
    x, y = test.x, test.y
    x, y = x[:60], y[:60]
    out = tmp_path / "s.nc"
    cb.sweep(digits_pair, cb.Linear(), data=(x, y), values=[0.5], batch_size=30, out=out)
    with pytest.raises(cb.sweeps.ResumeMismatchError, match=r"batch_size: 30 in the file, 20 now"):
        cb.sweep(digits_pair, cb.Linear(), data=(x, y), values=[0.5], batch_size=20, out=out)
    changed = x.copy()
    changed[0, 0, 0, 0] += 1.0  # same name, same size, other content
    differ = r"settings that differ: data.test.sha256: [0-9a-f]{64} in the file, [0-9a-f]{64} now; pass"
    with pytest.raises(cb.sweeps.ResumeMismatchError, match=differ) as err:
        cb.sweep(digits_pair, cb.Linear(), data=(changed, y), values=[0.5], batch_size=30, out=out)
    assert "batch_size" not in str(err.value) and "seed" not in str(err.value)
    with pytest.raises(cb.sweeps.ResumeMismatchError, match=r"models.theta_b: [0-9a-f]+ in the file, [0-9a-f]+ now"):
        cb.sweep(digits_pair.naive, cb.Linear(), data=(x, y), values=[0.5], batch_size=30, out=out)


def _stop_after(n):
    calls = []

    def repair(theta, context):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return theta

    return repair


def test_an_interrupted_sweep_resumes_only_with_the_same_settings(digits_pair, tmp_path, monkeypatch):
    out = tmp_path / "s.nc"
    kw = dict(values=[0.1, 0.3, 0.5], samples=3, out=out, **KW)
    reference = cb.sweep(digits_pair, cb.Uniform(), **{**kw, "out": None})
    with pytest.raises(KeyboardInterrupt):
        cb.sweep(digits_pair, cb.Uniform(), repair=_stop_after(4), **kw)
    with pytest.warns(IncompleteResultWarning, match="holds 4 of 9 evaluations"):
        partial = cb.open_results(out)
    assert int(partial["done"].sum()) == 4
    # its barrier is refused unless asked for, and then that of the evaluations done
    with pytest.raises(cb.ConfigurationError, match=r"unfinished \(4 of 9 evaluations\)"):
        cb.barriers(partial)
    done = partial["done"].values
    for split in partial["split"].values:
        loss = partial["loss"].sel(split=split).transpose(*partial["done"].dims).values
        ends = (float(partial["loss_a"].sel(split=split)) + float(partial["loss_b"].sel(split=split))) / 2
        got = float(cb.barriers(partial, partial=True)["loss_barrier"].sel(split=split))
        assert got == pytest.approx(loss[done].max() - ends, rel=1e-12)
    # a report draws the finished results only, and names the unfinished one
    from combinability.report import report

    written = report([out], tmp_path / "figures")
    assert [p.name for p in written] == ["summary.md"]
    assert "- s: 4 of 9 evaluations; the same command run again finishes it" in written[0].read_text()
    with pytest.raises(cb.OutputExistsError, match=r"holds an unfinished result of a different run; .*seed: 3 in "
                                                   r"the file, 4 now"):
        cb.sweep(digits_pair, cb.Uniform(), repair=_stop_after(10**6), **{**kw, "seed": 4})
    resumed = cb.sweep(digits_pair, cb.Uniform(), repair=_stop_after(10**6), **kw)
    np.testing.assert_array_equal(resumed["loss"].values, reference["loss"].values)


# -- item 1: never replace a file this run did not write ------------------------------------------
def test_a_file_that_is_not_a_result_is_never_replaced(digits_pair, tmp_path):
    out = tmp_path / "notes.nc"
    out.write_text("my notes, not a netCDF file")
    with pytest.raises(cb.OutputExistsError, match=r"notes.nc exists and is not a combinability result.*overwrite"):
        cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=out, **KW)
    assert out.read_text() == "my notes, not a netCDF file"
    with pytest.raises(cb.OutputExistsError, match="is not a combinability result"):
        cb.sweeps.sweep_pairs({"naive": digits_pair.naive, "aligned": digits_pair}, cb.Linear(), values=[0.5],
                              out=out, **KW)
    assert out.read_text() == "my notes, not a netCDF file"
    ds = cb.sweeps.sweep_pairs({"naive": digits_pair.naive, "aligned": digits_pair}, cb.Linear(), values=[0.5],
                               out=out, overwrite=True, **KW)
    assert cb.open_results(out)["loss"].shape == ds["loss"].shape


def test_a_finished_naive_and_aligned_result_is_reused_or_refused(digits_pair, tmp_path, monkeypatch):
    out = tmp_path / "both.nc"
    pairs = {"naive": digits_pair.naive, "aligned": digits_pair}
    first = cb.sweeps.sweep_pairs(pairs, cb.Linear(), values=[0.25, 0.5], out=out, **KW)
    with monkeypatch.context() as m:
        _no_evaluation(m)
        again = cb.sweeps.sweep_pairs(pairs, cb.Linear(), values=[0.25, 0.5], out=out, **KW)
        differ = r"different run; settings that differ: aligned.values: \[0.25, 0.5\] in the file, \[0.5\] now; naive"
        with pytest.raises(cb.OutputExistsError, match=differ):
            cb.sweeps.sweep_pairs(pairs, cb.Linear(), values=[0.5], out=out, **KW)
    np.testing.assert_array_equal(again["loss"].values, first["loss"].values)
    third = cb.sweeps.sweep_pairs(pairs, cb.Linear(), values=[0.5], out=out, overwrite=True, **KW)
    assert cb.open_results(out)["lam"].values.tolist() == [0.5] == third["lam"].values.tolist()


def test_experiments_refuse_a_result_of_other_settings(digits_pair, tmp_path):
    from combinability.experiments import edge_lengths

    out = tmp_path / "edges.nc"
    edge_lengths(digits_pair, bins=10, out=out)
    with pytest.raises(cb.OutputExistsError, match=r"bins: 10 in the file, 20 now"):
        edge_lengths(digits_pair, bins=20, out=out)
    assert edge_lengths(digits_pair, bins=20, out=out, overwrite=True)["count"].sizes["bin"] == 20


# -- item 4: writable first, no stray temporary files -------------------------------------------
def test_an_unwritable_location_is_reported_before_any_evaluation(digits_pair, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _no_evaluation(monkeypatch)
    unwritable = r"cannot write the output .*a_file/s.nc: .*a_file is a file, not a folder"
    with pytest.raises(cb.OutputNotWritableError, match=unwritable):
        cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=blocker / "s.nc", **KW)
    with pytest.raises(cb.OutputNotWritableError, match="is a folder"):
        cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=tmp_path, **KW)


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(digits_pair, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".s.nc.{host}.{dead.pid}.k3j2.tmp"
    live = tmp_path / f".s.nc.{host}.{os.getppid()}.a1b2.tmp"  # a live process: its write is in progress
    other_host = tmp_path / f".s.nc.elsewhere.{dead.pid}.zz.tmp"  # a cluster node's: not ours to judge
    for f in (stale, live, other_host):
        f.write_bytes(b"half a file")
    cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=tmp_path / "s.nc", **KW)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert cb.open_results(tmp_path / "s.nc")["loss"].shape == (1, 1, 1)


# -- item 10: self-describing results -------------------------------------------------------------
def test_results_describe_themselves(digits_pair, tmp_path):
    out = tmp_path / "both.nc"
    pairs = {"naive": digits_pair.naive, "aligned": digits_pair}
    cb.sweeps.sweep_pairs(pairs, cb.Uniform(), values=[0.1, 0.5], samples=2, out=out, agreement=True, **KW)
    ds = xr.open_dataset(out)  # as any netCDF tool sees it
    for name in list(ds.coords) + ["loss", "accuracy", "agreement"]:
        assert ds[name].attrs.get("long_name"), name
    assert ds["loss"].attrs["units"] == "nats" and "U[0.5 - s, 0.5 + s]" in ds["s"].attrs["long_name"]
    assert ds.attrs["Conventions"].startswith("CF-")
    assert "Mode Combinability" in ds.attrs["references"] and ds.attrs["source"].startswith("combinability ")
    assert ds.attrs["history"].startswith(ds.attrs["created"])
    assert "done" not in ds and "done" not in ds.to_dataframe().columns
    parts = json.loads(ds.attrs["parts"])  # each part's provenance survives the merge
    assert set(parts) == {"naive", "aligned"}
    assert parts["naive"]["fingerprints"] != parts["aligned"]["fingerprints"]
    assert json.loads(parts["aligned"]["fingerprints"])["theta_b"] == digits_pair.fingerprints()["theta_b"]
    assert all(p["created"] for p in parts.values())
    # how the pair was aligned, to rebuild it (the conftest's pair: weight matching, seed 0)
    assert json.loads(parts["aligned"]["alignment_settings"]) == {"method": "weight", "seed": 0, "symmetries": "all"}
    assert json.loads(parts["naive"]["alignment_settings"]) is None
    # xarray's own plot labels its axes with long_name [units]
    import matplotlib

    matplotlib.use("Agg")
    line = ds["loss"].sel(split="test", alignment="aligned").mean("sample").plot()
    assert line[0].axes.get_ylabel() == "mean cross-entropy loss [nats]"
    assert "s" in line[0].axes.get_xlabel() and line[0].axes.get_xlabel() != "s"
    ds.close()


@pytest.mark.parametrize(("argv0", "expected"), [
    ("/usr/local/bin/combinability", "combinability sweep a.ckpt b.ckpt"),  # the console script
    ("/repo/combinability/__main__.py", "combinability sweep a.ckpt b.ckpt"),  # python -m combinability
    ("/home/me/study.py", "combinability Python API"),
    ("/repo/other/__main__.py", "combinability Python API"),  # another package's python -m
])
def test_history_names_the_command_line_that_made_a_file(monkeypatch, argv0, expected):
    from combinability import results

    monkeypatch.setattr(sys, "argv", [argv0, "sweep", "a.ckpt", "b.ckpt"])
    assert results._command_line() == expected


def test_a_results_name_must_say_netcdf_and_a_reused_file_keeps_its_attributes_with_a_word(digits_pair, tmp_path):
    with pytest.raises(cb.ConfigurationError, match=r"give out= a name ending in \.nc.*got '.*results\.csv'"):
        cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=tmp_path / "results.csv", **KW)
    assert not (tmp_path / "results.csv").exists()
    out = tmp_path / "s.nc"
    cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=out, attrs={"note": "first"}, **KW)
    with pytest.warns(UserWarning, match=r"reused as it is: its attributes note='first' stay \(attrs= gave "
                                         r"note='second'\)"):
        again = cb.sweep(digits_pair, cb.Linear(), values=[0.5], out=out, attrs={"note": "second"}, **KW)
    assert again.attrs["note"] == "first"
