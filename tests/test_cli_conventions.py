"""The command line behaves as users expect (issue 10, items 1, 7, 8, 9).

Exit statuses, messages, ``--version``, ``-v``/``-q``, ``--debug``, ``--device``,
``--config``, settings stored in every file, the data and backend taken from the
checkpoint, ``--overwrite``, the experiments of the paper, a fast ``--help``, the progress
line of alignment, SIGTERM and Ctrl-C, and the README's walkthrough run end to end.
Files are read back with netCDF4, safetensors and PIL, not with the library.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import netCDF4
import numpy as np
import pytest
from safetensors import safe_open

from combinability.cli import main
from combinability.files import lock_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.25", "--epochs", "1", "-q"]


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends")])}
    return subprocess.run([sys.executable, "-m", "combinability", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _header(path: Path) -> dict:
    """A checkpoint's user metadata, read with safetensors alone (the format's ``metadata`` JSON entry)."""
    with safe_open(str(path), "np") as fh:
        return json.loads(fh.metadata()["metadata"])


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "np") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _nc_attrs(path: Path) -> dict:
    with netCDF4.Dataset(path) as nc:
        return {k: nc.getncattr(k) for k in nc.ncattrs()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Models A, B, C (tiny MLPs on digits) written by ``combinability train``."""
    folder = tmp_path_factory.mktemp("cli-models")
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        assert main(["train", "mlp", "digits", "--seed", str(seed), *TINY, "--out", str(folder / f"{name}.ckpt")]) == 0
    return folder


# -- 5. a fast --help: importing the command imports nothing heavy ---------------------------
def test_importing_the_cli_imports_no_heavy_module():
    code = ("import sys, combinability.cli; "
            "print(sorted(m for m in ('scipy.optimize', 'xarray', 'matplotlib', 'torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_still_resolves_lazily():
    code = ("import combinability as cb; missing = [n for n in cb.__all__ if getattr(cb, n, None) is None]; "
            "print(missing, cb.plugins.__name__, cb.weight_matching.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] combinability.plugins combinability.matching"


# -- 3. --version, exit statuses and one-line messages --------------------------------------
def test_version_is_the_project_version(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"combinability {version}"


@pytest.mark.parametrize(("args", "status", "message"), [
    (["train"], 2, "the following arguments are required: architecture, data"),             # argparse
    (["sweep", "a.ckpt", "b.ckpt", "--samples", "many"], 2, "invalid int value: 'many'"),   # argparse
    (["train", "no_such_arch", "digits", "--out", "x.ckpt"], 2, "unknown architecture 'no_such_arch'"),  # library
    (["sweep", "missing_a.ckpt", "missing_b.ckpt"], 2, "no such checkpoint: missing_a.ckpt"),  # a path: usage
])
def test_exit_status_and_one_line_message(tmp_path, args, status, message):
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == status, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert message in lines[-1] and lines[-1].startswith("combinability")
    assert not list(tmp_path.iterdir())  # nothing written


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "damaged.ckpt").write_bytes(b"not a checkpoint at all")
    result = _cli("sweep", "damaged.ckpt", "damaged.ckpt", "--data", "digits", "--debug", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("combinability: error:")


def test_library_usage_errors_exit_2_runtime_errors_exit_1(ckpts, tmp_path, capsys):
    a, b = str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")
    assert main(["sweep", a, b, "--sampler", "no_such_sampler", "--out", str(tmp_path / "x.nc")]) == 2   # unknown
    assert main(["sweep", a, b, "--sampler", "linear", "--values", "0,x", "--out", str(tmp_path / "x.nc")]) == 2
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint at all")
    assert main(["sweep", a, str(tmp_path / "bad.ckpt"), "--data", "digits", "--out", str(tmp_path / "x.nc")]) == 1
    err = capsys.readouterr().err
    assert "unknown sampler 'no_such_sampler'" in err and "--values" in err and "bad.ckpt" in err
    assert "Traceback" not in err


# -- 3. -v / -q through logging ----------------------------------------------------------------
def test_quiet_and_verbose(ckpts, tmp_path, capsys):
    a, b = str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")
    common = ["--sampler", "linear", "--values", "0,1", "--limit", "20", "--splits", "test", "--align", "none"]
    assert main(["sweep", a, b, *common, "--out", str(tmp_path / "1.nc")]) == 0
    err = capsys.readouterr().err
    assert f"dataset 'digits' and backend 'torch' taken from {a}" in err and "settings:" not in err
    assert main(["-v", "sweep", a, b, *common, "--out", str(tmp_path / "2.nc")]) == 0  # before the subcommand
    assert "combinability: settings: {" in capsys.readouterr().err
    assert main(["sweep", a, b, *common, "--out", str(tmp_path / "3.nc"), "-q"]) == 0
    assert capsys.readouterr().err == ""


# -- 2. the progress line of alignment ---------------------------------------------------------
def test_weight_matching_reports_each_sweep(caplog):
    import combinability as cb

    rng = np.random.default_rng(0)
    a = {"w1": rng.normal(size=(12, 5)), "w2": rng.normal(size=(3, 12))}
    b = {"w1": rng.normal(size=(12, 5)), "w2": rng.normal(size=(3, 12))}
    spec = cb.PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    with caplog.at_level("INFO", logger="combinability"):
        quiet = cb.weight_matching(spec, a, b, seed=0)
    assert not caplog.records
    with caplog.at_level("INFO", logger="combinability"):
        perm = cb.weight_matching(spec, a, b, seed=0, progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == perm.iterations and all(lines[i].startswith(f"weight matching: sweep {i + 1}, objective ")
                                                 for i in range(len(lines)))
    p = perm["P"]  # the last line's objective is <A, π(B)> of the result, computed here with numpy
    expected = float(np.vdot(a["w1"], b["w1"][p]) + np.vdot(a["w2"], b["w2"][:, p]))
    assert float(lines[-1].rsplit(" ", 1)[1]) == pytest.approx(expected, rel=1e-5)
    assert np.array_equal(quiet["P"], p)  # reporting changes nothing


def test_weight_matching_shows_a_progress_line_on_a_terminal(monkeypatch, caplog):
    import io

    import combinability as cb

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    rng = np.random.default_rng(1)
    a, b = ({"w1": rng.normal(size=(12, 5)), "w2": rng.normal(size=(3, 12))} for _ in range(2))
    spec = cb.PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level("INFO", logger="combinability"):
        perm = cb.weight_matching(spec, a, b, seed=0, progress=True)
    shown = terminal.getvalue()
    assert "weight matching" in shown and f"objective {perm.objective:.6g}" in shown
    assert not caplog.records  # the bar, not log lines, on a terminal


def test_pair_align_passes_progress_through(ckpts, caplog):
    import combinability as cb

    pair = cb.ModelPair(*(cb.load_model(ckpts / f"{m}.ckpt") for m in "ab"))
    with caplog.at_level("INFO", logger="combinability"):
        aligned = pair.align("weight", progress=True)
    sweeps = [r for r in caplog.records if r.getMessage().startswith("weight matching: sweep")]
    assert len(sweeps) == aligned.permutation.iterations >= 1


def test_progress_bar_shows_on_a_terminal_only(monkeypatch):
    import io

    from combinability.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, enabled, shown in ((Terminal(), True, True), (io.StringIO(), True, False), (Terminal(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress_bar(10, "train mlp", "step", enabled) as bar:
            bar.update(3)
            bar.refresh()
        assert ("train mlp" in stream.getvalue() and "3/10" in stream.getvalue()) is shown


# -- 3. --device ---------------------------------------------------------------------------------
def test_device(ckpts, tmp_path, capsys):
    import torch

    from combinability import plugins

    a, b = str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")
    before = plugins.get_backend("torch")
    out = tmp_path / "cpu.nc"
    assert main(["sweep", a, b, "--sampler", "linear", "--values", "0.5", "--limit", "20", "--splits", "test",
                 "--device", "cpu", "--out", str(out), "-q"]) == 0
    assert _nc_attrs(out)["device"] == "cpu"
    assert plugins.get_backend("torch") is before  # the choice does not outlive the command
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU-only machine)
    assert main(["sweep", a, b, "--device", missing, "--out", str(tmp_path / "x.nc")]) == 2
    err = capsys.readouterr().err
    assert f"device '{missing}' is not available" in err and "valid: cpu" in err
    assert main(["sweep", a, b, "--device", "toaster", "--out", str(tmp_path / "x.nc")]) == 2
    assert not (tmp_path / "x.nc").exists()


# -- 3. --config -------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_flags_win_and_settings_are_stored(ckpts, tmp_path, suffix):
    a, b = str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")
    if suffix == ".toml":
        text = 'sampler = "linear"\nvalues = "0,0.5,1"\nlimit = 30\nsplits = ["test"]\nbatch_size = 7\nquiet = true\n'
    else:
        text = "sampler: linear\nvalues: '0,0.5,1'\nlimit: 30\nsplits: [test]\nbatch-size: 7\nquiet: true\n"
    config = tmp_path / f"c{suffix}"
    config.write_text(text)
    out = tmp_path / "r.nc"
    argv = ["sweep", a, b, "--config", str(config), "--limit", "40", "--align", "none", "--out", str(out)]
    assert main(argv) == 0
    attrs = _nc_attrs(out)
    settings = json.loads(attrs["cli_settings"])
    assert settings["limit"] == 40 and settings["batch_size"] == 7 and settings["sampler"] == "linear"
    assert settings["splits"] == ["test"] and settings["data"] == "digits" and settings["backend"] == "torch"
    assert attrs["cli_command"] == shlex.join(["combinability", *argv])
    with netCDF4.Dataset(out) as nc:
        assert list(nc["lam"][:]) == [0.0, 0.5, 1.0] and list(nc["split"][:]) == ["test"]
        assert json.loads(nc.getncattr("examples")) == {"test": 40}


def test_a_required_option_may_come_from_the_config_file(tmp_path):
    config = tmp_path / "train.yml"
    config.write_text(f"out: {tmp_path / 'm.ckpt'}\nwidth: 0.25\nepochs: 1\nseed: 3\nquiet: true\n")
    assert main(["train", "mlp", "digits", "--config", str(config), "--seed", "4"]) == 0
    meta = _header(tmp_path / "m.ckpt")
    assert meta["seed"] == 4 and meta["width"] == 0.25  # the typed --seed wins over the file's


def test_unknown_config_key_is_a_usage_error_naming_the_valid_ones(ckpts, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("limitt = 3\n")
    assert main(["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) 'limitt'" in err and "valid:" in err and "limit" in err and "batch-size" in err
    config.write_text("limit = [1, 2]\n")
    assert main(["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--config", str(config)]) == 2
    assert "'limit' takes one value" in capsys.readouterr().err
    config.write_text("limit = \n")
    assert main(["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--config", str(config)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    config.write_text('limit = "abc"\n')  # argparse's usage dump named the option only, not the file
    assert main(["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"--config {config}: limit = 'abc' is not a valid value of --limit (not an integer)" in err
    assert "usage:" not in err


def test_train_stores_the_settings_in_the_checkpoint(ckpts):
    meta = _header(ckpts / "a.ckpt")
    assert meta["dataset"] == "digits" and meta["backend"] == "torch"
    settings = json.loads(meta["cli_settings"])
    assert settings["width"] == 0.25 and settings["epochs"] == 1 and settings["architecture"] == "mlp"
    assert meta["cli_command"].startswith("combinability train mlp digits --seed 0")


# -- 6. the dataset and backend come from the checkpoint --------------------------------------
def test_dataset_comes_from_the_checkpoint_and_a_state_dict_needs_data(ckpts, tmp_path, capsys):
    a, b = str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")
    out = tmp_path / "r.nc"
    assert main(["sweep", a, b, "--sampler", "linear", "--values", "1", "--splits", "test", "--out", str(out)]) == 0
    from sklearn.datasets import load_digits

    with netCDF4.Dataset(out) as nc:
        assert nc.getncattr("dataset") == "digits"
        n_test = json.loads(nc.getncattr("examples"))["test"]
    assert 0 < n_test < len(load_digits().target)  # the digits test split, not another dataset
    capsys.readouterr()
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"")  # never read: the missing --data is said first
    assert main(["sweep", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "pkg.mod:Net",
                 "--out", str(tmp_path / "x.nc")]) == 2
    assert "--model needs --data" in capsys.readouterr().err
    from safetensors.numpy import save_file

    from combinability.models import build_model, save_model

    plain = tmp_path / "plain.safetensors"  # a file from elsewhere: no record of its class or its data
    save_file({"w": np.zeros((2, 2), np.float32)}, str(plain))
    assert main(["sweep", str(plain), str(plain), "--out", str(tmp_path / "x.nc")]) == 2
    err = capsys.readouterr().err
    assert "plain state dict" in err and "give --model PKG.MODULE:CLASS" in err and "and --data" in err
    unlabelled = tmp_path / "m.ckpt"  # the library's checkpoint, written without a record of its data
    save_model(build_model("mlp", backend="torch", width=0.25, input_shape=(1, 8, 8), seed=0), unlabelled,
               backend="torch")
    assert main(["sweep", str(unlabelled), str(unlabelled), "--out", str(tmp_path / "x.nc")]) == 2
    err = capsys.readouterr().err
    assert "does not record the dataset" in err and "give --data" in err and "digits" in err


def test_data_of_the_wrong_shape_is_one_line_before_any_evaluation(tmp_path, capsys, monkeypatch):
    """A Fashion-MNIST-shaped model swept on digits: a one-line message naming both shapes, no traceback."""
    from combinability.evaluation import Evaluator
    from combinability.models import build_model, save_model

    for seed, name in ((0, "a.ckpt"), (1, "b.ckpt")):
        model = build_model("mlp", backend="torch", width=0.25, input_shape=(1, 28, 28), seed=seed)
        save_model(model, tmp_path / name, backend="torch", metadata={"dataset": "fashion_mnist"})

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated data of the wrong shape")

    monkeypatch.setattr(Evaluator, "evaluate", refuse)
    argv = ["sweep", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--data", "digits", "--align", "none",
            "--out", str(tmp_path / "s.nc"), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("combinability: error:") and "(1, 8, 8)" in err and "(1, 28, 28)" in err
    assert not (tmp_path / "s.nc").exists()


# -- 7. --overwrite ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "align", "sweep", "sweep --naive"])
def test_a_file_not_written_by_the_library_is_replaced_only_with_overwrite(ckpts, tmp_path, capsys, command):
    a, b = str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")
    out = tmp_path / ("x.ckpt" if command in ("train", "align") else "x.nc")
    argv = {
        "train": ["train", "mlp", "digits", "--seed", "5", *TINY],
        "align": ["align", a, b, "-q"],
        "sweep": ["sweep", a, b, "--sampler", "linear", "--values", "0,1", "--limit", "20", "-q"],
        "sweep --naive": ["sweep", a, b, "--naive", "--sampler", "linear", "--values", "0,1", "--limit", "20", "-q"],
    }[command] + ["--out", str(out)]
    out.write_text("my notes, not a result\n")
    assert main(argv) == 1
    assert out.read_text() == "my notes, not a result\n"
    assert str(out) in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    if out.suffix == ".ckpt":
        assert _header(out)["dataset"] == "digits"
    else:
        with netCDF4.Dataset(out) as nc:
            assert "loss" in nc.variables


# -- 4. the experiments of the paper ----------------------------------------------------------
def test_experiments_write_files_that_report_draws(ckpts, tmp_path):
    from PIL import Image

    a, b, c = (str(ckpts / f"{m}.ckpt") for m in "abc")
    files = {
        "edge-lengths": ["experiment", "edge-lengths", a, b, "--bins", "10"],
        "robustness": ["experiment", "robustness", a, b, "--steps", "2", "--limit", "50", "--examples", "100"],
        "transitivity": ["experiment", "transitivity", a, b, c, "--values", "0,0.5,1", "--limit", "30",
                         "--splits", "test"],
        "width": ["experiment", "width", "mlp", "digits", "--widths", "0.25", "--epochs", "1", "--limit", "30",
                  "--values-per-sampler", "2", "--samples", "1", "--splits", "test", "--model-dir",
                  str(tmp_path / "models")],
    }
    for name, argv in files.items():
        assert main([*argv, "--out", str(tmp_path / f"{name}.nc"), "-q"]) == 0, name
    params = sum(t.size for t in _tensors(ckpts / "a.ckpt").values())
    with netCDF4.Dataset(tmp_path / "edge-lengths.nc") as nc:
        counts = np.asarray(nc["count"][:])
        assert counts.shape[-1] == 10 and list(nc["alignment"][:]) == ["naive", "aligned"]
        assert (counts.sum(axis=(1, 2)) == params).all()  # every weight in one bin, once per alignment
        assert json.loads(nc.getncattr("cli_settings"))["bins"] == 10
    with netCDF4.Dataset(tmp_path / "robustness.nc") as nc:
        units = [t.shape[0] for k, t in _tensors(ckpts / "a.ckpt").items() if k.endswith(".weight")][:-1]
        assert sorted(np.asarray(nc["units"][:]).tolist()) == sorted(units)  # one row per hidden layer
    with netCDF4.Dataset(tmp_path / "transitivity.nc") as nc:
        assert list(nc["alignment"][:]) == ["naive", "transitive", "direct"]
        assert "cli_command" in nc.ncattrs()
    with netCDF4.Dataset(tmp_path / "width.nc") as nc:
        assert np.asarray(nc["width"][:]).tolist() == [0.25]
    assert main(["report", *(str(tmp_path / f"{n}.nc") for n in files), "--out", str(tmp_path / "figs")]) == 0
    for name in files:
        with Image.open(tmp_path / "figs" / f"{name}.png") as image:
            assert image.size[0] > 200


# -- 3. SIGTERM and Ctrl-C ---------------------------------------------------------------------
#: ``python -m combinability`` with Ctrl-C handled even where the suite runs as a background job, which
#: starts with SIGINT ignored and passes that on to every child (no preexec_fn: the workers hold threads)
INTERRUPTIBLE_CLI = [sys.executable, "-c",
                     "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "from combinability.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.mark.parametrize(("sig", "status", "what"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                      (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_a_sweep_cleanly(ckpts, tmp_path, sig, status, what):
    from filelock import FileLock

    out = tmp_path / "long.nc"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends")])}
    proc = subprocess.Popen(
        [*INTERRUPTIBLE_CLI, "sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--align",
         "none", "--sampler", "uniform", "--samples", "100000", "--limit", "20", "--splits", "test", "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240  # a bound on waiting for start-up, not a timing assertion
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        assert out.exists(), "the sweep did not start writing"
        time.sleep(0.5)  # inside the evaluation loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"combinability: {what}; finished results are kept (run the same command again to resume)"
    assert "Traceback" not in err
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    assert not Path(f"{lock_path(out)}.pid").exists()
    lock = FileLock(lock_path(out), timeout=0)
    lock.acquire()  # released: taken at once
    lock.release()


# -- 8. the README's walkthrough, as written, with tiny settings -------------------------------
def _walkthrough() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- cli-walkthrough -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _tiny(argv: list[str]) -> list[str]:
    """A README command with digits, one epoch and 100 examples; its structure unchanged."""
    out = ["digits" if a == "fashion_mnist" else a for a in argv[1:]]
    for option, value in (("--epochs", "1"), ("--limit", "100")):
        if option in out:
            out[out.index(option) + 1] = value
    return out + ["-q"]


def test_readme_walkthrough_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from PIL import Image

    commands = _walkthrough()
    assert [c[1] for c in commands] == ["plugins", "train", "train", "align", "sweep", "experiment", "report"]
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert argv[0] == "combinability"
        assert main(_tiny(argv)) == 0, argv
    assert "test accuracy" in capsys.readouterr().out  # train --evaluate
    # align wrote B permuted, keeping B's record of its data; sweep used that file as it is
    meta_b, meta_aligned = _header(tmp_path / "b.ckpt"), _header(tmp_path / "b_aligned.ckpt")
    assert meta_aligned["dataset"] == meta_b["dataset"] == "digits" and meta_aligned["seed"] == meta_b["seed"] == 1
    assert meta_aligned["aligned_to"] == "a.ckpt" and meta_aligned["source"] == "b.ckpt"
    b, b_aligned = _tensors(tmp_path / "b.ckpt"), _tensors(tmp_path / "b_aligned.ckpt")
    first = "layers.0.weight"
    assert not np.array_equal(b[first], b_aligned[first])
    assert np.array_equal(np.sort(b[first], axis=0), np.sort(b_aligned[first], axis=0))  # rows permuted
    with netCDF4.Dataset(tmp_path / "hyperplane.nc") as nc:
        assert nc.getncattr("dataset") == "digits" and json.loads(nc.getncattr("examples"))["test"] == 100
        assert "b_aligned.ckpt --align none" in nc.getncattr("cli_command")
        # swept as given, B as `align` wrote it against this A: labelled by that method, not "naive"
        assert nc.getncattr("alignment") == "weight" and "b_aligned.ckpt" in nc.getncattr("aligned_by")
        assert np.isfinite(np.asarray(nc["loss"][:])).all()
    with netCDF4.Dataset(tmp_path / "robustness.nc") as nc:
        assert "loss_barrier" in nc.variables
    for name in ("hyperplane", "robustness"):
        with Image.open(tmp_path / "figures" / f"{name}.png") as image:
            assert image.size[0] > 200
    assert "hyperplane" in (tmp_path / "figures" / "summary.md").read_text()


def test_a_closed_output_pipe_ends_the_command_quietly(monkeypatch, capsys):
    class ClosedPipe:  # what `combinability plugins | head -1` leaves once head has exited
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["plugins"]) == 141
    assert capsys.readouterr().err == ""  # no "error: [Errno 32] Broken pipe"


def test_train_says_it_loaded_a_model_trained_earlier_and_interrupted_training_promises_no_resume(
        ckpts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a.ckpt"
    out.write_bytes((ckpts / "a.ckpt").read_bytes())
    stat = out.stat()
    assert main(["train", "mlp", "digits", "--seed", "0", *TINY, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "already holds mlp trained on digits (seed 0) with these settings: loaded, not trained again" in said
    assert "trained mlp" not in said and out.stat().st_mtime_ns == stat.st_mtime_ns

    import combinability.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(combinability.models, "train", interrupted)
    assert main(["train", "mlp", "digits", "--seed", "5", *TINY, "--out", str(tmp_path / "new.ckpt")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("combinability: interrupted; nothing was written (the same command run again starts from the "
                       "beginning)")
    assert not (tmp_path / "new.ckpt").exists()
