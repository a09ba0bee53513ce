"""Bad input fails at once with an error of the library's hierarchy that says what is wrong.

One test per failure a user can meet; docs/failure-modes.md lists the same messages.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

import combinability as cb


@pytest.fixture(scope="module")
def torch_backend():
    return cb.get_backend("torch")


def _build(name: str, width: float, seed: int = 0):
    from combinability.models import build_model

    return build_model(name, backend="torch", width=width, num_classes=10, input_shape=(1, 8, 8), seed=seed)


def test_models_of_different_widths():
    with pytest.raises(cb.IncompatibleModelsError, match="width: A has 0.25, B has 0.5"):
        cb.ModelPair(_build("mlp", 0.25), _build("mlp", 0.5))


def test_models_of_different_architectures():
    with pytest.raises(cb.IncompatibleModelsError, match="architecture: A has 'mlp', B has 'tiny10'"):
        cb.ModelPair(_build("mlp", 0.25), _build("tiny10", 0.25))


def test_non_finite_weights(torch_backend):
    a = _build("mlp", 0.125)
    state = torch_backend.state(_build("mlp", 0.125, seed=1))
    state["layers.1.weight"][0, 0] = np.inf
    b = torch_backend.with_state(_build("mlp", 0.125, seed=1), state)
    with pytest.raises(cb.NonFiniteWeightsError, match=r"model B has NaN or infinite weights in \['layers.1.weight'\]"):
        cb.ModelPair(a, b)
    assert issubclass(cb.NonFiniteWeightsError, ValueError)


def test_spec_problems_are_named():
    params = {"fc.weight": np.zeros((3, 4)), "fc.bias": np.zeros(3), "out.weight": np.zeros((2, 3))}
    with pytest.raises(cb.PermutationSpecError, match=r"misses parameter\(s\) \['out.weight'\]"):
        cb.PermutationSpec({"fc.weight": ("P", None), "fc.bias": ("P",)}).validate(params)
    with pytest.raises(cb.PermutationSpecError, match=r"do not exist: \['fc.kernel'\]"):
        cb.PermutationSpec({"fc.kernel": ("P", None)}).validate(params, allow_unlisted=True)
    mismatch = "'out.weight' axis 0 has size 2, but 'fc.weight' axis 0 has size 3"
    with pytest.raises(cb.PermutationSpecError, match=mismatch):
        cb.PermutationSpec({"fc.weight": ("P", None), "fc.bias": ("P",), "out.weight": ("P", "P")}).validate(params)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: cb.Uniform(s=0.7), r"Uniform: s=0.7 is outside \[0, 0.5\]"),
        (lambda: cb.Subcube(lam=-0.1), r"Subcube: lam=-0.1 is outside \[0, 1\]"),
        (lambda: cb.Bernoulli(p=2), r"Bernoulli: p=2.0 is outside \[0, 1\]"),
        (lambda: cb.Linear(start=2, stop=1), "start must be < stop"),
        (lambda: cb.Triangle().validate((0.8, 0.8)), "outside the triangle"),
    ],
)
def test_sampler_parameter_out_of_range(factory, message):
    with pytest.raises(cb.SamplerError, match=message):
        factory()


@pytest.mark.parametrize(
    ("call", "kind"),
    [
        (lambda: cb.get_backend("tensorflow"), "backend 'tensorflow'; installed backends: jax, torch"),
        (lambda: cb.get_architecture("resnet50"), "architecture 'resnet50'; installed architectures: mlp"),
        (lambda: cb.load_dataset("imagenet", "train"), "imagenet"),
        (lambda: cb.get_sampler("gaussian"), "gaussian"),
        (lambda: cb.load_dataset("digits", "validation"), "'train', 'test'"),
        (lambda: cb.ModelPair(_build("mlp", 0.125), _build("mlp", 0.125)).align("gradient"),
         r"installed aligners: activation, identity, .*weight"),
    ],
)
def test_unknown_names_list_the_valid_ones(call, kind):
    with pytest.raises(cb.UnknownNameError, match=kind.replace("(", r"\(").replace(")", r"\)")):
        call()
    assert issubclass(cb.UnknownNameError, KeyError)


def test_known_backend_with_missing_framework_names_the_extra():
    class Plugin:
        @cb.hookimpl
        def combinability_register_backends(self):
            def factory():
                import combinability_no_such_framework  # noqa: F401

            return {"fakefw": (factory, "fakefw")}

    cb.plugins.register_plugin(Plugin(), name="fake-backend")
    try:
        with pytest.raises(cb.BackendUnavailableError, match=r"pip install 'combinability\[fakefw\]'"):
            cb.get_backend("fakefw")
        assert issubclass(cb.BackendUnavailableError, ImportError)
    finally:
        cb.plugins.reset_plugins()


def test_missing_dataset_files_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("COMBINABILITY_DATA", str(tmp_path / "data"))
    with pytest.raises(cb.DatasetNotFoundError) as info:
        cb.load_dataset("mnist", "train", root=tmp_path / "mine")
    text = str(info.value)
    assert str(tmp_path / "mine") in text and str(tmp_path / "data") in text
    assert "download" in text


def test_truncated_dataset_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    header = np.array([2051, 100, 28, 28], dtype=">i4").tobytes()
    for prefix, n in (("train", 100), ("t10k", 100)):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(header + bytes(28 * 28 * 10))  # header says 100 images, holds 10
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(np.array([2049, n], dtype=">i4").tobytes() + bytes(n))
    with pytest.raises(cb.DatasetError, match="truncated"):
        cb.load_dataset("mnist", "train", root=tmp_path)


def test_corrupt_and_foreign_results_files(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"this is not netCDF")
    with pytest.raises(cb.CorruptFileError, match="not a readable netCDF"):
        cb.open_results(bad)
    foreign = tmp_path / "foreign.nc"
    xr.Dataset({"x": ("i", [1.0])}).to_netcdf(foreign)
    with pytest.raises(cb.CorruptFileError, match="not written by combinability"):
        cb.open_results(foreign)
    future = tmp_path / "future.nc"
    xr.Dataset({"x": ("i", [1.0])}, attrs={"combinability_format": "sweep",
                                           "combinability_format_version": 99}).to_netcdf(future)
    with pytest.raises(cb.IncompatibleVersionError, match="version 99"):
        cb.open_results(future)


def test_corrupt_and_incompatible_checkpoints(tmp_path):
    import torch

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(cb.CorruptFileError):
        cb.load_model(bad)
    legacy_future = {"format": "combinability-checkpoint", "version": 99, "backend": "torch", "architecture": "mlp",
                     "config": {}, "state": {}, "metadata": {}}
    torch.save(legacy_future, tmp_path / "future.ckpt")
    with pytest.raises(cb.IncompatibleVersionError):
        cb.load_model(tmp_path / "future.ckpt")
    good = tmp_path / "good.ckpt"
    cb.save_model(_build("mlp", 0.125), good)
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the tensor payload
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    with pytest.raises(cb.CorruptFileError, match="flipped.ckpt"):
        cb.load_model(tmp_path / "flipped.ckpt")
    (tmp_path / "short.ckpt").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(cb.CorruptFileError, match="short.ckpt"):
        cb.load_model(tmp_path / "short.ckpt")
    sd = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), sd)
    with pytest.raises(cb.IncompatibleModelsError, match="plain state dict"):
        cb.load_model(sd)


def test_a_plugin_that_raises_on_load_is_a_warning(tmp_path):
    """A broken installed plugin warns with its name; the built-ins keep working."""
    site = tmp_path / "site"
    (site / "broken_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "broken_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\n"
                                                                   "Version: 0.1\n")
    (site / "broken_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[combinability.plugins]\nbroken = broken_plugin\n")
    (site / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.path.insert(0, sys.argv[1])
        import combinability as cb
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = cb.list_architectures()
        print("mlp" in names, [str(w.message) for w in caught if "broken" in str(w.message)])
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True")
    assert "plugin 'broken' (broken_plugin) failed and is skipped: RuntimeError: boom at import" in out.stdout


def test_checkpoints_of_version_0_1_still_load(tmp_path):
    """A torch (torch.save) and a jax (.npz) checkpoint as combinability 0.1 wrote them load into either backend."""
    import json

    import torch

    model = _build("mlp", 0.125, seed=3)
    state = cb.get_backend("torch").state(model)
    header = {"format": "combinability-checkpoint", "version": 1, "architecture": "mlp",
              "config": {"width": 0.125, "num_classes": 10, "input_shape": [1, 8, 8]}, "metadata": {"seed": 3}}
    torch.save({**header, "backend": "torch", "state": {k: torch.from_numpy(v) for k, v in state.items()}},
               tmp_path / "old_torch.ckpt")
    flax = {k.replace("layers.", "layers_").replace(".weight", "/kernel").replace(".bias", "/bias"):
            (v.T if k.endswith("weight") else v) for k, v in state.items()}
    text = json.dumps({**header, "backend": "jax", "names": list(flax)}).encode()
    np.savez(tmp_path / "old_jax.npz", __header__=np.frombuffer(text, np.uint8),
             **{f"a{i}": v for i, v in enumerate(flax.values())})
    for path in ("old_torch.ckpt", "old_jax.npz"):
        loaded = cb.get_backend("torch").state(cb.load_model(tmp_path / path))
        for k, v in state.items():
            np.testing.assert_array_equal(loaded[k], v, err_msg=f"{path}: {k}")


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5])
def test_seeds_outside_the_streams_range_are_refused_up_front(digits_pair, seed, tmp_path):
    with pytest.raises(cb.ConfigurationError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        cb.sweep(digits_pair, cb.Uniform(), data="digits", values=[0.5], seed=seed, out=tmp_path / "s.nc")
    assert not (tmp_path / "s.nc").exists()
    with pytest.raises(cb.ConfigurationError, match="seed must be"):
        cb.train("mlp", "digits", seed=seed, epochs=1, width=0.125, checkpoint=tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()
    with pytest.raises(cb.ConfigurationError, match="seed must be"):
        digits_pair.naive.align("weight", seed=seed)


def test_large_seeds_work_end_to_end(digits_pair, tmp_path):
    ds = cb.sweep(digits_pair, cb.Uniform(), data="digits", splits=["test"], values=[0.5], samples=1,
                  seed=2**64 - 1, limit=50, out=tmp_path / "big.nc")
    assert np.isfinite(ds["loss"].values).all()
    assert int(cb.open_results(tmp_path / "big.nc").attrs["seed"]) == 2**64 - 1


@pytest.mark.parametrize("bad", [-1, 10])
def test_labels_outside_the_models_classes_are_refused(digits_pair, bad):
    test = cb.load_dataset("digits", "test")
    y = test.y.copy()
    y[3] = bad  # (-100, torch's "ignore", is not scored: tests/test_ignored_targets.py)
    with pytest.raises(cb.DatasetError, match=rf"1 label\(s\).*outside \[0, 10\), e.g. \[{bad}\]"):
        cb.sweep(digits_pair, cb.Linear(), data=(test.x, y), values=[0.5])
    with pytest.raises(cb.DatasetError, match="outside"):
        cb.train("mlp", cb.data.ArrayDataset(test.x, y, 10, name="bad"), epochs=1, width=0.125)
