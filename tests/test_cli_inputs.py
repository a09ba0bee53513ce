"""The command line checks what it is given before any work, and never replaces what it did not write.

Usage errors exit with status 2 before a model is loaded (``_pair`` is made to fail to prove it),
runtime errors with 1; a refused output keeps its bytes. Files are read back with netCDF4 and
safetensors, not with the library.
"""

from __future__ import annotations

import json
import logging
import shutil

import netCDF4
import numpy as np
import pytest
from safetensors import safe_open

from combinability.cli import build_parser, main
from combinability.cli import commands as cli_commands
from combinability.cli.checks import plain_message

TINY = ["--width", "0.25", "--epochs", "1", "-q"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Models A and B (tiny MLPs on digits) written by ``combinability train``, and a linear sweep of them."""
    folder = tmp_path_factory.mktemp("cli-inputs")
    for name, seed in (("a", 0), ("b", 1)):
        assert main(["train", "mlp", "digits", "--seed", str(seed), *TINY, "--out", str(folder / f"{name}.ckpt")]) == 0
    assert main(["sweep", str(folder / "a.ckpt"), str(folder / "b.ckpt"), "--sampler", "linear", "--values", "0,1",
                 "--limit", "20", "--splits", "test", "--align", "none", "--out", str(folder / "lin.nc"), "-q"]) == 0
    return folder


@pytest.fixture
def no_models(monkeypatch):
    """Loading the models fails the test: what is checked before it is checked before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("models loaded before the options were checked")

    monkeypatch.setattr(cli_commands, "_pair", refuse)


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# -- 1. report never replaces what it did not write ------------------------------------------------
def test_report_refuses_files_it_did_not_write(ckpts, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "summary.md").write_text("my precious notes\n")
    (notes / "lin.png").write_bytes(b"my own figure")
    assert main(["report", str(ckpts / "lin.nc"), "--out", str(notes), "-q"]) == 1
    err = _last_error(capsys)
    assert "summary.md" in err and "lin.png" in err and "--overwrite" in err
    assert (notes / "summary.md").read_text() == "my precious notes\n"
    assert (notes / "lin.png").read_bytes() == b"my own figure"
    assert main(["report", str(ckpts / "lin.nc"), "--out", str(notes), "--overwrite", "-q"]) == 0
    assert (notes / "lin.png").read_bytes().startswith(b"\x89PNG")


def test_report_run_again_replaces_its_own_files_but_not_edited_ones(ckpts, tmp_path, capsys):
    out = tmp_path / "figs"
    argv = ["report", str(ckpts / "lin.nc"), "--out", str(out), "-q"]
    assert main(argv) == 0
    assert main(argv) == 0  # its own, unchanged files: replaced
    assert (out / "lin.png").read_bytes().startswith(b"\x89PNG")
    summary = (out / "summary.md").read_text()
    assert "| lin | linear | test |" in summary
    (out / "summary.md").write_text(summary.replace("# combinability report", "# my edited report"))
    edited = (out / "summary.md").read_bytes()
    assert main(argv) == 1
    err = _last_error(capsys)
    assert "holds summary.md, which" in err and "lin.png" not in err  # the figure is still the report's own
    assert (out / "summary.md").read_bytes() == edited
    (out / "summary.md").write_text(summary + "my note, added after the report's last line\n")
    assert main(argv) == 1  # a line appended after the marker: still only summary.md is the user's now
    err = _last_error(capsys)
    assert "holds summary.md, which" in err and "lin.png" not in err


def test_report_of_a_missing_file_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "nope.nc"]) == 2
    assert "no such results file or folder: nope.nc" in _last_error(capsys)
    assert list(tmp_path.iterdir()) == []  # no empty report/ folder


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_report_out_that_cannot_be_a_folder_is_refused_before_drawing(ckpts, tmp_path, capsys, where):
    blocker = tmp_path / "lin.nc"
    shutil.copy(ckpts / "lin.nc", blocker)
    before = blocker.read_bytes()
    out = blocker if where == "a file" else blocker / "figs"
    assert main(["report", str(ckpts / "lin.nc"), "--out", str(out), "-q"]) == 1
    err = _last_error(capsys)
    assert "is a file, not a folder; choose a writable location" in err and "cannot write the report" in err
    assert blocker.read_bytes() == before


# -- 2. experiment robustness ------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "message"), [
    (["--steps=-2"], "--steps must be a positive integer (1, 2, ...), got -2"),
    (["--steps", "0"], "--steps must be a positive integer (1, 2, ...), got 0"),
    (["--examples", "0"], "--examples must be a positive integer (1, 2, ...), got 0"),
    (["--examples", "1"], "--examples must be an integer >= 2, got 1"),
    (["--lambdas", "0.5,1.5"], "--lambdas must be points of the linear path between A and B, in [0, 1]"),
    (["--lambdas=-0.5"], "in [0, 1] (e.g. 0.25,0.5,0.75), got [-0.5]"),
    (["--limit", "0"], "--limit must be a positive integer (1, 2, ...), got 0"),
])
def test_robustness_settings_are_usage_errors_before_alignment(ckpts, tmp_path, capsys, no_models, option, message):
    out = tmp_path / "r.nc"
    assert main(["experiment", "robustness", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), *option,
                 "--out", str(out), "-q"]) == 2
    assert message in _last_error(capsys)
    assert not out.exists()


def test_the_library_refuses_an_empty_robustness_experiment():
    from combinability.errors import ConfigurationError
    from combinability.experiments.robustness import alignment_robustness

    with pytest.raises(ConfigurationError, match="steps must be an integer >= 1, got 0"):
        alignment_robustness(None, "digits", steps=0)


# -- 3. train --width ----------------------------------------------------------------------------------
@pytest.mark.parametrize("width", ["0", "-1"])
def test_train_refuses_a_width_that_is_not_positive(tmp_path, capsys, width):
    out = tmp_path / "w.ckpt"
    assert main(["train", "mlp", "digits", f"--width={width}", "--epochs", "1", "--out", str(out)]) == 2
    assert f"--width must be a finite number > 0, got {width}" in _last_error(capsys)
    assert not out.exists()


# -- 4. align run again ----------------------------------------------------------------------------------
def test_align_run_again_with_other_messages_or_paths_replaces_its_own_file(ckpts, tmp_path, capsys, monkeypatch):
    for name in ("a.ckpt", "b.ckpt"):
        shutil.copy(ckpts / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["align", "a.ckpt", "b.ckpt", "--out", "b_aligned.ckpt"]) == 0
    for argv in (["-q", "align", "a.ckpt", "b.ckpt"], ["align", "./a.ckpt", "b.ckpt", "-v"],
                 ["align", str(tmp_path / "a.ckpt"), "b.ckpt", "--debug", "-q"]):
        assert main([*argv, "--out", "b_aligned.ckpt"]) == 0, argv
    before = (tmp_path / "b_aligned.ckpt").read_bytes()
    capsys.readouterr()
    assert main(["align", "a.ckpt", "b.ckpt", "--seed", "7", "--out", "b_aligned.ckpt", "-q"]) == 1
    err = _last_error(capsys)
    assert "holds another run's checkpoint" in err and "seed: 0 in the file, 7 now" in err
    assert (tmp_path / "b_aligned.ckpt").read_bytes() == before
    assert main(["align", "b.ckpt", "a.ckpt", "--out", "b_aligned.ckpt", "-q"]) == 1  # other inputs
    assert "the input files' contents" in _last_error(capsys)
    assert (tmp_path / "b_aligned.ckpt").read_bytes() == before


# -- 5. the checkpoint's name says its format ---------------------------------------------------------
@pytest.mark.parametrize("name", ["b_al.pt", "b_al.pth", "b_al.bin", "b_al.nc", "b_al"])
def test_align_refuses_a_checkpoint_name_of_another_format(ckpts, tmp_path, capsys, no_models, name):
    out = tmp_path / name
    assert main(["align", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--out", str(out), "-q"]) == 2
    err = _last_error(capsys)
    assert f"--out {out}: checkpoints are written in the safetensors format" in err and ".ckpt or .safetensors" in err
    assert not out.exists()


def test_align_writes_a_safetensors_name(ckpts, tmp_path):
    out = tmp_path / "b_al.safetensors"
    assert main(["align", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--out", str(out), "-q"]) == 0
    with safe_open(str(out), "np") as fh:
        assert json.loads(fh.metadata()["metadata"])["method"] == "weight"


# -- 6. sweep's values, before any alignment ----------------------------------------------------------
@pytest.mark.parametrize(("option", "message"), [
    (["--limit", "0"], "--limit must be a positive integer (1, 2, ...), got 0"),
    (["--limit=-5"], "--limit must be a positive integer (1, 2, ...), got -5"),
    (["--samples", "0"], "--samples must be a positive integer (1, 2, ...), got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer (1, 2, ...), got 0"),
    (["--data", "nosuch"], "unknown dataset 'nosuch'; installed datasets: "),
    (["--data", "nosuch.npz"], "--data nosuch.npz: no such file"),
    (["--splits", "validation"], "unknown split 'validation'; valid splits: 'train', 'test'"),
    (["--sampler", "subcube", "--values", "0,1.5"], "Subcube: lam=1.5 is outside [0, 1]"),
])
def test_sweep_values_are_usage_errors_before_any_work(ckpts, tmp_path, capsys, no_models, option, message):
    out = tmp_path / "x.nc"
    assert main(["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), *option, "--out", str(out), "-q"]) == 2
    assert message in _last_error(capsys)
    assert not out.exists()


def test_a_missing_checkpoint_is_a_usage_error(ckpts, tmp_path, capsys, no_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(ckpts / "a.ckpt"), "nope.ckpt", "--out", "x.nc"]) == 2
    assert f"no such checkpoint: nope.ckpt (in {tmp_path})" in _last_error(capsys)
    assert list(tmp_path.iterdir()) == []


# -- 7. advice in the command line's own terms ---------------------------------------------------------
def test_a_plain_state_dict_without_model_points_to_the_model_option(tmp_path, capsys, no_models):
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    torch.save(net.state_dict(), tmp_path / "a.pt")
    assert main(["sweep", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--data", "digits",
                 "--out", str(tmp_path / "x.nc")]) == 2
    err = _last_error(capsys)
    assert "holds a plain state dict" in err and "give --model PKG.MODULE:CLASS" in err and "cb.ModelPair" not in err


@pytest.mark.parametrize(("option", "message"), [
    (["--sampler", "triangle"], "--sampler triangle combines three models: give the third with --model-c"),
    (["--sampler", "linear", "--model-c", "b.ckpt"], "--model-c is for a three-model sampler (--sampler triangle); "
                                                     "--sampler linear combines two models"),
])
def test_model_c_goes_with_a_three_model_sampler(ckpts, tmp_path, capsys, no_models, monkeypatch, option, message):
    monkeypatch.chdir(ckpts)
    assert main(["sweep", "a.ckpt", "b.ckpt", *option, "--out", str(tmp_path / "x.nc"), "-q"]) == 2
    assert message in _last_error(capsys)


# -- 8. a config file's list for a comma-separated option ----------------------------------------------
def test_a_config_list_of_values_is_the_comma_separated_option(ckpts, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('sampler = "linear"\nvalues = [0, 0.5, 1]\nlimit = 20\nsplits = ["test"]\n')
    out = tmp_path / "r.nc"
    assert main(["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--config", str(config), "--align", "none",
                 "--out", str(out), "-q"]) == 0
    with netCDF4.Dataset(out) as nc:
        assert list(nc["lam"][:]) == [0.0, 0.5, 1.0]
        assert json.loads(nc.getncattr("cli_settings"))["values"] == "0,0.5,1"


# -- 9. help and messages say what the command does ------------------------------------------------------
def test_help_texts_agree_with_the_commands():
    parser = build_parser()
    assert "141" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert "aligners, repairs and metrics" in " ".join(sub["plugins"].format_help().split())
    assert "(default: torch)" in " ".join(sub["train"].format_help().split())
    assert "(default: the checkpoint's, else torch)" in " ".join(sub["sweep"].format_help().split())
    assert ".ckpt or .safetensors" in " ".join(sub["align"].format_help().split())
    assert "--overwrite" in sub["report"].format_help()


def test_weight_matching_sweeps_are_reported_with_v_only(ckpts, tmp_path, capsys):
    argv = ["sweep", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt"), "--sampler", "linear", "--values", "0",
            "--limit", "20", "--splits", "test"]
    assert main([*argv, "--out", str(tmp_path / "1.nc")]) == 0
    err = capsys.readouterr().err
    assert "taken from" in err and "weight matching: sweep" not in err
    assert main(["-v", *argv, "--out", str(tmp_path / "2.nc")]) == 0
    assert "combinability: weight matching: sweep 1, objective" in capsys.readouterr().err
    assert logging.getLogger("combinability.matching").level == logging.NOTSET  # restored


# -- 10. messages without terminal escapes -----------------------------------------------------------------
def test_messages_lose_terminal_escapes():
    text = "two options, \x1b[1mdo those steps\x1b[0m.\n (1) here"
    assert plain_message(text) == "two options, do those steps. (1) here"


def test_a_pickled_module_is_refused_in_plain_text(tmp_path, capsys):
    import torch

    torch.save(torch.nn.Linear(64, 10), tmp_path / "w.pt")
    assert main(["sweep", str(tmp_path / "w.pt"), str(tmp_path / "w.pt"), "--data", "digits",
                 "--out", str(tmp_path / "w.nc")]) == 1
    err = _last_error(capsys)
    assert "\x1b" not in err and "save model.state_dict(), not the model" in err
    assert np.all([not p.name.endswith(".nc") for p in tmp_path.iterdir()])


def test_a_users_model_aligned_by_the_cli_then_swept_as_given_is_labelled_by_its_method(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import sys
    import textwrap

    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn

        class SmallNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(64, 12), nn.Linear(12, 10)

            def forward(self, x):
                return self.fc2(self.fc1(x.flatten(1)).relu())
        """))
    monkeypatch.chdir(tmp_path)  # as a user runs it: mynets.py imported from the working folder
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("mynets", None)
    for seed in (0, 1):
        torch.manual_seed(seed)
        layers = {"fc1.weight": torch.randn(12, 64), "fc1.bias": torch.randn(12), "fc2.weight": torch.randn(10, 12),
                  "fc2.bias": torch.randn(10)}
        torch.save(layers, tmp_path / f"net{seed}.pt")
    user = ["--model", "mynets:SmallNet", "--data", "digits", "-q"]
    assert main(["align", "net0.pt", "net1.pt", *user, "--out", "net1_al.safetensors"]) == 0
    with safe_open(str(tmp_path / "net1_al.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["metadata"])["aligned_to"] == "net0.pt"
    for b, label in (("net1_al.safetensors", "weight"), ("net1.pt", "naive")):
        out = f"{label}.nc"
        assert main(["sweep", "net0.pt", b, *user, "--align", "none", "--sampler", "linear", "--values", "0,1",
                     "--limit", "20", "--splits", "test", "--out", out]) == 0
        with netCDF4.Dataset(tmp_path / out) as nc:
            assert nc.getncattr("alignment") == label  # the aligned B by its method; the raw B naive
            assert (label == "weight") == ("aligned_by" in nc.ncattrs())


def test_align_without_out_reports_the_matching_and_writes_nothing(ckpts, tmp_path, capsys, monkeypatch):
    """The user guide's ``combinability align a.ckpt b.ckpt`` (no --out) raised a TypeError."""
    monkeypatch.chdir(tmp_path)
    assert main(["align", str(ckpts / "a.ckpt"), str(ckpts / "b.ckpt")]) == 0
    said = capsys.readouterr().out
    assert "weight matching in" in said and "units," in said and "written" not in said
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("width", ["inf", "nan", "0", "-1"])
def test_train_refuses_a_width_that_is_not_a_finite_positive_number(tmp_path, capsys, no_models, width):
    out = tmp_path / "x.ckpt"
    assert main(["train", "mlp", "digits", "--width", width, "--out", str(out)]) == 2
    assert "--width must be a finite number > 0" in _last_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("width", [float("inf"), float("nan"), 0, -0.5, "1"])
def test_the_api_refuses_a_width_that_is_not_a_finite_positive_number(width):
    from combinability.errors import ConfigurationError
    from combinability.models import build_model

    with pytest.raises(ConfigurationError, match="width must be a finite number > 0"):
        build_model("mlp", width=width)
