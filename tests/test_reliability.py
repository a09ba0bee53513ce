"""Interrupted work resumes, files are never half-written, the same seed gives the same bits."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import combinability as cb

LIMIT = 300
VALUES = ",".join(f"{v:g}" for v in np.linspace(0, 0.5, 26))
#: ``python -m combinability`` with Ctrl-C handled even where the suite runs as a background job, which
#: starts with SIGINT ignored and passes that on to every child (no preexec_fn: the workers hold threads)
INTERRUPTIBLE_CLI = [sys.executable, "-c",
                     "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "from combinability.cli import main; sys.exit(main(sys.argv[1:]))"]
SAMPLES = 64  # long enough that a signal comes mid-sweep (evaluations are written a second apart, not one by one)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def checkpoints(digits_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    a, b, _ = digits_models
    cb.save_model(a, folder / "a.ckpt", backend="torch")
    cb.save_model(b, folder / "b.ckpt", backend="torch")
    return folder / "a.ckpt", folder / "b.ckpt"


def _sweep_cmd(checkpoints, out: Path) -> list[str]:
    a, b = checkpoints
    return [*INTERRUPTIBLE_CLI, "sweep", str(a), str(b), "--sampler", "uniform",
            "--values", VALUES, "--samples", str(SAMPLES), "--data", "digits", "--limit", str(LIMIT),
            "--seed", "0", "--quiet", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.nc"
    subprocess.run(_sweep_cmd(checkpoints, out), check=True, env=_env(), capture_output=True, timeout=600)
    return cb.open_results(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_killed_sweep_resumes_to_identical_results(checkpoints, uninterrupted, tmp_path, sig):
    out = tmp_path / "sweep.nc"
    cmd = _sweep_cmd(checkpoints, out)
    rng = np.random.default_rng(int(sig))
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(float(rng.uniform(0.0, 0.4)))  # a random moment of the sweep
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    partial = cb.open_results(out)  # never half-written: always a readable file
    n_done = int(partial["done"].sum())
    total = partial["done"].size
    assert n_done < total, "the sweep finished before the signal: make it longer"
    assert not list(tmp_path.glob(".*.tmp")) or sig == signal.SIGKILL  # SIGINT and SIGTERM clean up
    if sig != signal.SIGKILL:
        assert proc.returncode != 0 and not (tmp_path / ".sweep.nc.lock.pid").exists()
    # entries marked done already hold their final values
    done = partial["done"].values
    np.testing.assert_array_equal(partial["loss"].values[:, done], uninterrupted["loss"].values[:, done])

    subprocess.run(cmd, check=True, env=_env(), capture_output=True, timeout=600)
    resumed = cb.open_results(out)
    assert "done" not in resumed  # a finished file carries no mask: to_dataframe() shows only results
    for var in ("loss", "accuracy", "loss_a", "loss_b", "accuracy_a", "accuracy_b"):
        np.testing.assert_array_equal(resumed[var].values, uninterrupted[var].values)
    assert resumed.attrs["sweep_key"] == uninterrupted.attrs["sweep_key"]


def test_resume_refuses_a_different_sweep(digits_pair, tmp_path):
    out = tmp_path / "s.nc"
    cb.sweep(digits_pair, cb.Linear(), data="digits", splits=["test"], values=[0.5], limit=50, out=out)
    differ = r"holds a finished result of a different run; settings that differ: values: \[0.5\] in the file, "
    with pytest.raises(cb.CombinabilityError, match=differ + r"\[0.25\] now; pass overwrite=True"):
        cb.sweep(digits_pair, cb.Linear(), data="digits", splits=["test"], values=[0.25], limit=50, out=out)
    ds = cb.sweep(digits_pair, cb.Linear(), data="digits", splits=["test"], values=[0.25], limit=50, out=out,
                  overwrite=True)
    assert cb.open_results(out)["lam"].values.tolist() == [0.25] == ds["lam"].values.tolist()


def _failing_to_netcdf(self, path, *args, **kwargs):
    Path(path).write_bytes(b"CDF\x01 half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failing_results_write_leaves_previous_file_intact(monkeypatch, tmp_path):
    first = xr.Dataset({"x": ("i", np.arange(3.0))}, attrs={"combinability_format": "sweep",
                                                            "combinability_format_version": 1})
    path = tmp_path / "r.nc"
    cb.write_results(first, path)
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _failing_to_netcdf)
    with pytest.raises(OSError, match="No space left"):
        cb.write_results(first.assign(x=("i", np.zeros(3))), path)
    monkeypatch.undo()
    xr.testing.assert_identical(cb.open_results(path), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.nc"]  # no temporary left behind


def test_failing_checkpoint_write_leaves_previous_file_intact(monkeypatch, digits_models, tmp_path):
    import safetensors.numpy

    a, b, _ = digits_models
    path = tmp_path / "m.ckpt"
    cb.save_model(a, path, backend="torch")

    def failing_save(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{ partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        cb.save_model(b, path, backend="torch")
    monkeypatch.undo()
    loaded = cb.load_model(path, backend="torch")
    be = cb.get_backend("torch")
    for name, value in be.state(a).items():
        np.testing.assert_array_equal(be.state(loaded)[name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np
    import combinability as cb
    seed = int(sys.argv[1])
    h = hashlib.sha256()
    layout = cb.FlatLayout.from_arrays({"w": np.zeros((300, 100), np.float32), "b": np.zeros(300, np.float32)},
                                       layers={"w": 0, "b": 1})
    ta = np.random.default_rng(seed).normal(size=layout.size).astype(np.float32)
    tb = np.random.default_rng(seed + 1).normal(size=layout.size).astype(np.float32)
    for name in sorted(cb.SAMPLERS):
        smp = cb.get_sampler(name)
        if smp.models != 2:
            continue
        value = smp.grid_for(layout)[len(smp.grid_for(layout)) // 2]
        ctx = cb.DrawContext(layout, cb.NumpyRandom(seed), theta_a=ta, theta_b=tb)
        h.update(np.asarray(smp.draw(value, ctx)).tobytes())
    spec = cb.SpecBuilder("torch").dense("l0", None, "P0").dense("l1", "P0", "P1").dense("l2", "P1", None).build()
    rng = np.random.default_rng(seed)
    pa = {f"l{i}.{k}": rng.normal(size=s) for i, (o, n) in enumerate([(40, 10), (30, 40), (5, 30)])
          for k, s in (("weight", (o, n)), ("bias", (o,)))}
    pb = {k: rng.normal(size=v.shape) for k, v in pa.items()}
    perm = cb.weight_matching(spec, pa, pb, seed=seed, restarts=2)
    for p in sorted(perm):
        h.update(perm[p].tobytes())
    be = cb.get_backend("torch")
    from combinability.models import build_model
    a, b = (build_model("mlp", width=0.125, num_classes=10, input_shape=(1, 8, 8), seed=seed + k)
            for k in (0, 1))
    pair = cb.ModelPair(a, b).align("weight", seed=seed)
    ds = cb.sweep(pair, cb.Uniform(), data="digits", values=[0.5], samples=2, seed=seed, limit=200)
    h.update(pair.theta_b.tobytes())
    h.update(ds["loss"].values.tobytes())
    h.update(ds["accuracy"].values.tobytes())
    print("core+evaluation", h.hexdigest())
    t = cb.train("mlp", "digits", seed=seed, epochs=1, width=0.125)
    print("training", hashlib.sha256(be.state(t)["layers.0.weight"].tobytes()).hexdigest())
    """
)


def test_same_seed_same_bits_across_processes(tmp_path):
    script = tmp_path / "det.py"
    script.write_text(DETERMINISM_SCRIPT)

    def run(seed: int, **env: str) -> dict[str, str]:
        res = subprocess.run([sys.executable, str(script), str(seed)], env=_env(**env), capture_output=True,
                             text=True, timeout=600, check=True)
        return dict(line.rsplit(" ", 1) for line in res.stdout.strip().splitlines()[-2:])

    first = run(0, PYTHONHASHSEED="1", OMP_NUM_THREADS="1")
    other_hash = run(0, PYTHONHASHSEED="2", OMP_NUM_THREADS="1")
    other_threads = run(0, PYTHONHASHSEED="3", OMP_NUM_THREADS="2")
    other_seed = run(1, PYTHONHASHSEED="1", OMP_NUM_THREADS="1")
    # coefficients, permutations and CPU evaluations: identical whatever the hash seed and thread count
    assert first["core+evaluation"] == other_hash["core+evaluation"] == other_threads["core+evaluation"]
    # training: identical for the same thread count (torch splits reductions across threads; see docs)
    assert first["training"] == other_hash["training"]
    # different seeds differ
    assert first["core+evaluation"] != other_seed["core+evaluation"]
    assert first["training"] != other_seed["training"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from combinability.files import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_two_processes_cannot_write_one_results_file(digits_pair, tmp_path):
    """A second sweep into a file another process is writing is refused, naming the holder's pid;
    once that process is killed (SIGKILL: no clean-up), its lock is taken over."""
    out = tmp_path / "shared.nc"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        kw = dict(data="digits", splits=["test"], values=[0.5], limit=50, out=out)
        with pytest.raises(cb.OutputLockedError, match=rf"being written by another process \(pid {holder.pid}\)"):
            cb.sweep(digits_pair, cb.Linear(), **kw)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    ds = cb.sweep(digits_pair, cb.Linear(), **kw)
    assert out.exists() and "done" not in ds and not np.isnan(ds["loss"].values).any()
    assert not (tmp_path / ".shared.nc.lock.pid").exists()
