"""The ``combinability`` command end to end, in a temporary folder, as a new user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import combinability as cb
from combinability.cli import main


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "combinability", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for sub in ("train", "align", "sweep", "experiment", "report", "plugins", "demo"):
        assert sub in out
    sweep_help = subprocess.run([sys.executable, "-m", "combinability", "sweep", "--help"], capture_output=True,
                                text=True, check=True).stdout
    assert "--sampler" in sweep_help and "default: subcube" in sweep_help


def test_plugins_lists_everything(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "jax" in out and "resnet20" in out and "fashion_mnist" in out and "hyperplane" in out


def test_train_align_sweep_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        assert main(["train", "mlp", "digits", "--seed", str(seed), "--epochs", "3", "--width", "0.25",
                     "--out", f"m{seed}.ckpt", "--quiet", "--evaluate"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["align", "m0.ckpt", "m1.ckpt", "--out", "m1_aligned.ckpt"]) == 0
    out = capsys.readouterr().out
    assert "objective" in out and "m1_aligned.ckpt" in out
    # the aligned checkpoint is B permuted: a different weight vector, the same function
    be = cb.get_backend("torch")
    b = cb.load_model("m1.ckpt")
    b_aligned = cb.load_model("m1_aligned.ckpt")
    assert not np.array_equal(be.state(b)["layers.0.weight"], be.state(b_aligned)["layers.0.weight"])
    test = cb.load_dataset("digits", "test")
    from tests.reference_nets import zoo_forward

    logits = [zoo_forward("mlp", {k: v.astype(np.float64) for k, v in be.state(m).items()}, test.x)
              for m in (b, b_aligned)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6, atol=1e-8)

    assert main(["sweep", "m0.ckpt", "m1.ckpt", "--sampler", "linear", "--sampler-arg", "start=-0.5",
                 "--values=-0.5,0,0.5,1", "--naive", "--limit", "200", "--out", "lin.nc", "--quiet"]) == 0
    ds = cb.open_results("lin.nc")
    assert list(ds["alignment"].values) == ["naive", "aligned"]
    assert ds["lam"].values.tolist() == [-0.5, 0.0, 0.5, 1.0]
    assert main(["report", "lin.nc", "--out", "figs"]) == 0
    assert (tmp_path / "figs" / "lin.png").stat().st_size > 10_000
    summary = (tmp_path / "figs" / "summary.md").read_text()
    assert "| lin | linear | test |" in summary


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing_a.ckpt"), str(tmp_path / "missing_b.ckpt"),
                 "--out", str(tmp_path / "x.nc")]) != 0 or pytest.fail("a missing checkpoint must fail")
    assert main(["train", "no_such_arch", "digits", "--out", str(tmp_path / "x.ckpt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'no_such_arch'" in err and "mlp" in err


@pytest.mark.skipif(os.environ.get("CI_SKIP_DEMO") == "1", reason="demo smoke test disabled")
def test_demo_quick_runs_end_to_end_and_reuses(tmp_path):
    cmd = [sys.executable, "-m", "combinability", "demo", "--quick", "--data", "digits", "--out", str(tmp_path),
           "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "hypercube_uniform" in summary and "Three models" in summary
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 15
    assert len(list(tmp_path.glob("*.nc"))) >= 15
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.nc")}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.nc")} == mtimes  # finished results reused


def test_download_reports_where_it_failed_without_network(tmp_path, capsys, monkeypatch):
    import socket

    def offline(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # whatever client the download uses
    assert main(["download", "mnist", "--root", str(tmp_path)]) == 1  # a runtime error, not a usage error
    err = capsys.readouterr().err
    assert "could not download" in err and str(tmp_path / "mnist") in err and "MD5" in err
    assert main(["download", "imagenet"]) == 2  # an unknown name on the command line: a usage error
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err


def test_report_of_a_folder_without_results_fails_saying_so(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "figures")]) == 2
    assert "no results files to report" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()  # nothing written
