"""``combinability symmetries``: two saved models in, a symmetry comparison (netCDF) out; bad input refused early.

The reference for the file's numbers is a plain torch forward pass of the saved models and a
numpy cross-entropy (the naive linear path at v = 0 and v = 1 is model A and model B).
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

import combinability as cb
from combinability.cli import main
from combinability.data import load_dataset
from combinability.results import open_results

LIMIT = 48
#: A tiny ViT on 8x8 digits: 2x2 patches, d_model 8 (2 heads of 4), one block.
GEOMETRY = {"image_size": 8, "patch_size": 2, "d_model": 8, "heads": 2, "depth": 1, "mlp": 16}
FAST = ["--samplers", "linear", "uniform", "--values", "linear=0,0.5,1", "--values", "0.25", "--samples", "1",
        "--limit", str(LIMIT), "--restarts", "0", "-q"]


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return float(-(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))[np.arange(len(y)), y].mean())


@pytest.fixture(scope="module")
def vit_checkpoints(tmp_path_factory):
    """Two ``tinyvit`` checkpoints (seeds 0, 1) written by ``cb.train``: one epoch on 200 digits."""
    folder = tmp_path_factory.mktemp("vits")
    train = load_dataset("digits", "train", limit=200)
    paths = [folder / f"vit{seed}.ckpt" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        cb.train("tinyvit", train, backend="torch", seed=seed, epochs=1, width=0.125, checkpoint=path)
    return paths


def test_writes_the_comparison_of_two_checkpoints_and_reuses_it(tmp_path, vit_checkpoints):
    out = tmp_path / "sym.nc"
    assert main(["symmetries", *map(str, vit_checkpoints), *FAST, "--out", str(out)]) == 0
    ds = open_results(out)
    assert [str(a) for a in ds["alignment"].values] == ["naive", "permutation", "all"]
    assert [str(s) for s in ds["sampler"].values] == ["linear", "uniform"]
    assert list(ds["split"].values) == ["test"] and bool(ds["has_orthogonal"])
    assert json.loads(ds.attrs["cli_settings"])["limit"] == LIMIT  # the command's options are stored

    test = load_dataset("digits", "test", limit=LIMIT)
    path = ds["loss"].sel(alignment="naive", sampler="linear", split="test").isel(sample=0)
    for value, ckpt in ((0.0, vit_checkpoints[0]), (1.0, vit_checkpoints[1])):
        model = cb.load_model(ckpt, backend="torch")
        with torch.no_grad():
            logits = model(torch.tensor(test.x)).numpy()
        assert float(path.sel(value=value)) == pytest.approx(_cross_entropy(logits, test.y), rel=1e-4)

    stamp = out.stat().st_mtime_ns
    assert main(["symmetries", *map(str, vit_checkpoints), *FAST, "--out", str(out)]) == 0
    assert out.stat().st_mtime_ns == stamp  # a finished result of the same settings is reused


def test_a_users_model_class_and_state_dict_files(tmp_path, monkeypatch, vit_checkpoints):
    (tmp_path / "my_vits.py").write_text(textwrap.dedent(f"""
        from combinability_torch.transformers import TinyViT

        class DigitsViT(TinyViT):
            def __init__(self):
                super().__init__(**{GEOMETRY!r})
        """))
    # run from the folder holding my_vits.py, as a user would: the command imports it from there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("my_vits", None)
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        from combinability_torch.transformers import TinyViT

        files.append(tmp_path / f"vit{seed}.pt")
        torch.save(TinyViT(**GEOMETRY).state_dict(), files[-1])
    out = tmp_path / "user.nc"
    code = main(["symmetries", *map(str, files), "--model", "my_vits:DigitsViT", "--data", "digits", *FAST,
                 "--out", str(out)])
    assert code == 0
    ds = open_results(out)
    assert ds["loss_barrier"].sizes == {"alignment": 3, "sampler": 2, "split": 1}
    assert np.isfinite(ds["loss_barrier"].values).all()


def test_activation_invertible_and_learned_alignments_keep_model_b_and_are_reported(tmp_path, vit_checkpoints):
    out = tmp_path / "sym.nc"
    assert main(["symmetries", *map(str, vit_checkpoints), *FAST, "--alignments", "naive", "activation", "invertible",
                 "learned", "--learn-epochs", "1", "--out", str(out)]) == 0
    ds = open_results(out)
    assert [str(a) for a in ds["alignment"].values] == ["naive", "activation", "invertible", "learned"]
    test = load_dataset("digits", "test", limit=LIMIT)
    model = cb.load_model(vit_checkpoints[1], backend="torch")
    with torch.no_grad():
        want = _cross_entropy(model(torch.tensor(test.x)).numpy(), test.y)
    for alignment in ("activation", "invertible", "learned"):  # B as aligned computes B's function
        end = ds["loss"].sel(alignment=alignment, sampler="linear", split="test", value=1.0).isel(sample=0)
        assert float(end) == pytest.approx(want, rel=1e-4)
    assert np.isfinite(ds["loss_barrier"].values).all()
    from combinability.report import report

    report([out], tmp_path / "figures")
    summary = (tmp_path / "figures" / "summary.md").read_text()
    assert "loss barrier (+ invertible in heads)" in summary and "loss barrier (learned maps)" in summary
    assert "loss barrier (by activations)" in summary


def test_align_learns_maps_with_invertible_heads_and_writes_a_model_with_b_s_function(tmp_path, capsys,
                                                                                      vit_checkpoints):
    out = tmp_path / "b_maps.ckpt"
    assert main(["align", *map(str, vit_checkpoints), "--method", "maps", "--symmetries", "invertible", "--epochs",
                 "1", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "qk~dual: 8x8 map" in printed  # each head's keys got the inverse transpose of its queries' map
    test = load_dataset("digits", "test", limit=LIMIT)
    with torch.no_grad():
        logits = [cb.load_model(p, backend="torch")(torch.tensor(test.x)).numpy() for p in (vit_checkpoints[1], out)]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-3, atol=1e-4)
    original = cb.load_model(vit_checkpoints[1], backend="torch").state_dict()
    moved = cb.load_model(out, backend="torch").state_dict()
    assert any(not torch.allclose(original[k], moved[k]) for k in original)


def test_an_aligned_or_merged_vit_is_written_as_a_tinyvit_checkpoint_that_loads_again(tmp_path, vit_checkpoints):
    merged = tmp_path / "merged.ckpt"
    assert main(["merge", *map(str, vit_checkpoints), "--data", "digits", "--out", str(merged), "-q"]) == 0
    model = cb.load_model(merged, backend="torch")  # it was a plain state dict, which load_model refused
    assert type(model).__name__ == "TinyViT"


@pytest.mark.parametrize("options, message", [
    (["--values", "foo=0.5"], "sampler 'foo' is not compared; compared (--samplers): linear, uniform"),
    (["--values", "linear=a,b"], "expected comma-separated numbers"),
    (["--values", "linear="], "no values"),
    (["--values", "uniform=0.75"], "s=0.75 is outside [0, 0.5]"),
    (["--samplers", "triangle"], "'triangle' combines three models"),
    (["--samplers", "nope"], "unknown sampler 'nope'"),
    (["--samplers", "linear", "linear"], "each sampler may appear once"),
    (["--samples", "0"], "--samples must be a positive integer, got 0"),
    (["--restarts", "-1"], "--restarts must be >= 0, got -1"),
    (["--learn-epochs", "0"], "--learn-epochs must be a positive integer, got 0"),
    (["--alignments", "gl"], "invalid choice: 'gl'"),
])
def test_bad_input_is_a_usage_error_before_any_model_is_read(tmp_path, capsys, options, message):
    missing = [str(tmp_path / "no_a.ckpt"), str(tmp_path / "no_b.ckpt")]  # never opened: refused before
    base = ["--samplers", "linear", "uniform"] if "--samplers" not in options else []
    code = main(["symmetries", *missing, "--data", "digits", "--backend", "torch", *base, *options,
                 "--out", str(tmp_path / "x.nc")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "no_a.ckpt" not in err
    assert not (tmp_path / "x.nc").exists()


def test_missing_files_and_missing_data(tmp_path, capsys, vit_checkpoints):
    assert main(["symmetries", str(tmp_path / "no_a.ckpt"), str(vit_checkpoints[1]), "--data", "digits",
                 "--backend", "torch", "--out", str(tmp_path / "x.nc")]) == 2  # a path that is not there
    assert f"no such checkpoint: {tmp_path / 'no_a.ckpt'}" in capsys.readouterr().err
    assert main(["symmetries", str(vit_checkpoints[0]), str(vit_checkpoints[1]), "--model", "my:Net",
                 "--out", str(tmp_path / "x.nc")]) == 2
    assert "--model needs --data" in capsys.readouterr().err
    assert main(["symmetries", str(vit_checkpoints[0])]) == 2  # argparse: model B is required
    assert not (tmp_path / "x.nc").exists()
