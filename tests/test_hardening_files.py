"""Hardening of checkpoints, models and data files (issue 10, items 1, 4, 6 and 11).

Crafted checkpoints and CIFAR batches are written here byte by byte (or with safetensors and
pickle directly), expected shapes and messages are worked out by hand from the architecture's
definition, and downloads come from a local HTTP server: no network.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import combinability as cb
import combinability.models as models
from combinability import training
from combinability.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from combinability.data import cifar, download, load_dataset, locate, mnist
from combinability.errors import (
    CorruptFileError,
    DatasetError,
    IncompatibleModelsError,
    OutputExistsError,
    OutputNotWritableError,
)
from tests.test_data import fake_remote_mnist, md5, no_proxy, serve_folder, write_fake_cifar  # noqa: F401

DIGITS = {"architecture": "mlp", "width": 0.125, "num_classes": 10, "input_shape": [1, 8, 8]}
#: The MLP at width 0.125 on 8x8 digits: 3 hidden layers of round(512 * 0.125) = 64 units.
MLP_SHAPES = {"layers.0.weight": (64, 64), "layers.0.bias": (64,), "layers.1.weight": (64, 64), "layers.1.bias": (64,),
              "layers.2.weight": (64, 64), "layers.2.bias": (64,), "layers.3.weight": (10, 64), "layers.3.bias": (10,)}
#: Peak Python/numpy allocation allowed while refusing a crafted file (the crafted claims are gigabytes).
SMALL = 16 * 2**20


def _mlp_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in MLP_SHAPES.items()}


@pytest.fixture
def no_build(monkeypatch):
    """Make building a model, or training one, fail loudly: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or trained before the file was checked")

    monkeypatch.setattr(models, "build_model", refuse)
    monkeypatch.setattr(training, "fit", refuse)


def _peak(fn) -> tuple[BaseException, int]:
    """The exception ``fn`` raises and the peak traced allocation (bytes) while it ran.

    The plugins and the torch backend are imported first, so that only the work on the file counts.
    """
    cb.get_backend("torch")
    cb.list_architectures()
    tracemalloc.start()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        caught = exc
    else:
        raise AssertionError("no error was raised")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return caught, peak


# -- item 6: crafted checkpoints -------------------------------------------------------------------
def test_crafted_width_is_refused_from_the_header_before_anything_is_built(tmp_path, no_build):
    path = tmp_path / "huge.ckpt"
    save_checkpoint(path, _mlp_state(), config={**DIGITS, "width": 1e6}, backend="torch")
    err, peak = _peak(lambda: cb.load_model(path))
    assert isinstance(err, CorruptFileError), err
    # width 1e6: round(512 * 1e6) = 512000000 units in the first hidden layer
    message = str(err)
    assert "'layers.0.weight'" in message and "(512000000, 64)" in message and "(64, 64)" in message
    assert str(path) in message
    assert peak < SMALL


def test_header_declaring_more_data_than_the_file_holds(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000], "data_offsets": [0, 4 * 10**9]}}).encode()
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    for reader in (load_checkpoint, read_metadata, cb.load_model):
        err, peak = _peak(lambda reader=reader: reader(path))
        assert isinstance(err, CorruptFileError), err
        assert "'w'" in str(err) and "only 16 bytes of data" in str(err) and str(path) in str(err)
        assert peak < SMALL
    # a header length larger than the file
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    err, peak = _peak(lambda: load_checkpoint(path))
    assert isinstance(err, CorruptFileError) and f"claims {2**62} bytes" in str(err)
    assert peak < SMALL
    # shape and byte range that disagree
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CorruptFileError, match=r"shape \(3,\) of F32 \(12 bytes\).*span 8 bytes"):
        read_metadata(path)


def test_a_checkpoint_whose_tensors_do_not_fit_its_config(tmp_path, no_build):
    state = _mlp_state()
    state["layers.3.weight"] = np.zeros((7, 64), np.float32)
    save_checkpoint(tmp_path / "a.ckpt", state, config=DIGITS, backend="torch")
    with pytest.raises(CorruptFileError, match=r"'layers.3.weight'.*\(10, 64\).*\(7, 64\)"):
        cb.load_model(tmp_path / "a.ckpt")
    del state["layers.3.weight"]
    save_checkpoint(tmp_path / "b.ckpt", state, config=DIGITS, backend="torch")
    with pytest.raises(CorruptFileError, match="'layers.3.weight' .* is missing"):
        cb.load_model(tmp_path / "b.ckpt")
    save_checkpoint(tmp_path / "c.ckpt", _mlp_state(), config={"architecture": "mlp", "width": 0.125},
                    backend="torch")
    with pytest.raises(CorruptFileError, match=r"lacks \['num_classes', 'input_shape'\]"):
        cb.load_model(tmp_path / "c.ckpt")
    save_checkpoint(tmp_path / "d.ckpt", _mlp_state(), config={**DIGITS, "width": "wide"}, backend="torch")
    with pytest.raises(CorruptFileError, match="does not describe a valid 'mlp' model"):
        cb.load_model(tmp_path / "d.ckpt")


# -- item 6: integer weights -----------------------------------------------------------------------
def test_integer_weights_in_a_checkpoint_are_refused(tmp_path, no_build):
    state = _mlp_state()
    state["layers.1.weight"] = (state["layers.1.weight"] * 10).astype(np.int64)
    state["layers.2.bias"] = state["layers.2.bias"] > 0
    save_checkpoint(tmp_path / "int.ckpt", state, config=DIGITS, backend="torch")
    with pytest.raises(CorruptFileError) as err:
        cb.load_model(tmp_path / "int.ckpt")
    assert "layers.1.weight (int64)" in str(err.value) and "layers.2.bias (bool)" in str(err.value)


def test_batchnorm_counter_stays_an_integer_and_loads(tmp_path):
    model = models.build_model("resnet20_bn", width=0.25, num_classes=10, input_shape=(3, 8, 8), seed=4)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == np.int64 for k in counters)
    cb.save_model(model, tmp_path / "bn.ckpt")
    loaded = cb.load_model(tmp_path / "bn.ckpt").state_dict()
    assert list(loaded) == list(state)
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name].numpy(), value, strict=True)


def test_integer_weights_in_a_user_state_dict_are_refused(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    good = {k: v.clone() for k, v in net.state_dict().items()}
    good["1.num_batches_tracked"] = torch.tensor(5)  # an integer counter is legitimate
    torch.save(good, tmp_path / "good.pt")
    loaded = cb.load_into(net, tmp_path / "good.pt")
    assert int(loaded.state_dict()["1.num_batches_tracked"]) == 5
    torch.testing.assert_close(loaded.state_dict()["0.weight"], good["0.weight"], rtol=0, atol=0)
    bad = {**good, "0.weight": torch.ones(4, 3, dtype=torch.int32), "2.bias": torch.zeros(2, dtype=torch.int64)}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(IncompatibleModelsError) as err:
        cb.load_into(net, tmp_path / "bad.pt")
    assert "0.weight (int32)" in str(err.value) and "2.bias (int64)" in str(err.value)
    assert "num_batches_tracked" not in str(err.value)


def test_state_dicts_as_wrappers_and_older_torch_save_them_load_exactly(tmp_path):
    """A DDP-saved wrapper whose own names start with ``model.`` (only ``module.`` removed), a BatchNorm state of an
    older torch without ``num_batches_tracked`` (the model keeps its counter), and a Lightning file with an extra
    entry under the recognised ``model.`` prefix (named as the one that does not fit)."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))

    torch.manual_seed(0)
    saved = Wrapper()
    torch.save({f"module.{k}": v for k, v in saved.state_dict().items()}, tmp_path / "ddp.pt")
    loaded = cb.load_into(Wrapper(), tmp_path / "ddp.pt").state_dict()
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    old = {k: v for k, v in saved.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    got = cb.load_into(net, tmp_path / "old.pt").state_dict()
    torch.testing.assert_close(got["1.running_var"], old["1.running_var"], rtol=0, atol=0)
    assert int(got["1.num_batches_tracked"]) == int(net.state_dict()["1.num_batches_tracked"])
    lightning = {"state_dict": {**{f"model.{k}": v for k, v in saved.model.state_dict().items()},
                                "model.extra.weight": torch.ones(2), "criterion.weight": torch.ones(2)}}
    torch.save(lightning, tmp_path / "epoch=3.ckpt")
    with pytest.raises(IncompatibleModelsError, match=r"every entry of the model under 'model\.', and also "
                                                      r"\['extra\.weight'\]"):
        cb.load_into(net, tmp_path / "epoch=3.ckpt")


def test_flax_bfloat16_variables_are_floats_and_load():
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    import flax.linen as nn
    from flax import serialization

    from combinability.checkpoint import non_float_parameters

    net = nn.Dense(3)
    variables = net.init(jax.random.PRNGKey(0), np.ones((1, 4), np.float32))
    half = jax.tree_util.tree_map(lambda v: v.astype(jax.numpy.bfloat16), variables)
    assert non_float_parameters({"k": np.float32}, {"k": np.asarray(half["params"]["kernel"])}) == []
    assert non_float_parameters({"k": np.float32}, {"k": np.zeros(2, np.int8)}) == ["k (int8)"]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "half.msgpack"
        path.write_bytes(serialization.to_bytes(half))
        loaded = cb.load_into((net, variables), path).variables
    np.testing.assert_array_equal(np.asarray(loaded["params"]["kernel"], np.float32),
                                  np.asarray(half["params"]["kernel"], np.float32))


# -- read_metadata -----------------------------------------------------------------------------------
def test_read_metadata_reads_the_header_only(tmp_path, monkeypatch):
    import safetensors

    path = tmp_path / "m.ckpt"
    save_checkpoint(path, _mlp_state(), config=DIGITS, metadata={"dataset": "digits", "seed": 3}, backend="jax")

    def no_arrays(*args, **kwargs):
        raise AssertionError("read_metadata read the arrays")

    monkeypatch.setattr(safetensors, "deserialize", no_arrays)
    info = read_metadata(path)
    assert info["backend"] == "jax" and info["config"] == DIGITS and info["version"] == 2
    assert info["metadata"] == {"dataset": "digits", "seed": 3}
    assert {k: t["shape"] for k, t in info["tensors"].items()} == MLP_SHAPES
    assert {t["dtype"] for t in info["tensors"].values()} == {"float32"}


def test_read_metadata_of_files_from_elsewhere(tmp_path):
    import torch

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"), metadata={"who": "me"})
    info = read_metadata(tmp_path / "x.safetensors")
    assert (info["backend"], info["config"], info["metadata"], info["version"]) == (None, {}, {"who": "me"}, 0)
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "sd.pt")
    info = read_metadata(tmp_path / "sd.pt")
    assert (info["backend"], info["config"], info["version"]) == (None, {}, 0)
    assert info["tensors"]["weight"] == {"dtype": "float32", "shape": (1, 2)}
    (tmp_path / "junk").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptFileError, match="junk"):
        read_metadata(tmp_path / "junk")


# -- item 1: save_model and train never replace another file -----------------------------------------
def test_save_model_refuses_to_replace_a_file_it_did_not_write(tmp_path):
    model = models.build_model("mlp", width=0.125, num_classes=10, input_shape=(1, 8, 8), seed=0)
    other = models.build_model("mlp", width=0.125, num_classes=10, input_shape=(1, 8, 8), seed=1)
    notes = tmp_path / "notes.ckpt"
    notes.write_text("my notes")
    with pytest.raises(OutputExistsError, match="notes.ckpt.*not a readable checkpoint") as err:
        cb.save_model(model, notes)
    assert isinstance(err.value, FileExistsError)
    assert notes.read_text() == "my notes"
    cb.save_model(model, notes, overwrite=True)
    assert read_metadata(notes)["config"]["architecture"] == "mlp"

    path = tmp_path / "m.ckpt"
    cb.save_model(model, path, metadata={"seed": 0})
    with pytest.raises(OutputExistsError, match="seed: 0 in the file, 1 now"):
        cb.save_model(other, path, metadata={"seed": 1})
    assert read_metadata(path)["metadata"] == {"seed": 0}
    cb.save_model(other, path, metadata={"seed": 0})  # the same run's file: replaced
    loaded = cb.load_model(path).state_dict()
    np.testing.assert_array_equal(loaded["layers.0.weight"].numpy(), other.state_dict()["layers.0.weight"].numpy())
    cb.save_model(model, path, metadata={"seed": 1}, overwrite=True)
    assert read_metadata(path)["metadata"] == {"seed": 1}


def _train(path: Path, **kwargs):
    return cb.train("mlp", "digits", epochs=1, width=0.125, checkpoint=path, **kwargs)


def test_train_reuses_its_checkpoint_and_refuses_other_files_before_training(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    first = _train(path, seed=0, metadata={"config_file": "run.toml"})
    info = read_metadata(path)
    assert info["metadata"]["config_file"] == "run.toml" and info["metadata"]["seed"] == 0
    assert info["metadata"]["dataset"] == "digits" and info["metadata"]["width"] == 0.125
    weights = first.state_dict()["layers.0.weight"].numpy().copy()
    before = path.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the checkpoint could be reused or had to be refused")

    monkeypatch.setattr(training, "fit", no_training)
    reused = _train(path, seed=0)
    np.testing.assert_array_equal(reused.state_dict()["layers.0.weight"].numpy(), weights)
    with pytest.raises(OutputExistsError, match=r"m.ckpt.*other settings \(seed: 0 in the file, 1 now\)"):
        _train(path, seed=1)
    with pytest.raises(OutputExistsError, match=r"recipe.epochs: 1 in the file, 2 now\)"):  # the recipe, by field
        cb.train("mlp", "digits", epochs=2, width=0.125, checkpoint=path)
    foreign = tmp_path / "foreign.ckpt"
    foreign.write_bytes(b"\x00" * 100)
    with pytest.raises(OutputExistsError, match="foreign.ckpt.*not a readable checkpoint"):
        _train(foreign, seed=0)
    assert path.read_bytes() == before and foreign.read_bytes() == b"\x00" * 100

    monkeypatch.undo()
    retrained = _train(path, seed=1, overwrite=True)
    assert read_metadata(path)["metadata"]["seed"] == 1
    np.testing.assert_array_equal(cb.load_model(path).state_dict()["layers.0.weight"].numpy(),
                                  retrained.state_dict()["layers.0.weight"].numpy())


def test_train_checks_the_checkpoint_location_before_training(tmp_path, no_build):
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, so no folder can be made here")
    with pytest.raises(OutputNotWritableError, match="a-file"):
        _train(blocker / "sub" / "m.ckpt", seed=0)
    with pytest.raises(TypeError, match=r"metadata\['when'\]"):
        _train(tmp_path / "m.ckpt", seed=0, metadata={"when": object()})
    assert not (tmp_path / "m.ckpt").exists()


# -- item 6: malformed CIFAR files -------------------------------------------------------------------
@pytest.fixture
def cifar_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder, "cifar10")
    return folder


def _good_batch() -> bytes:
    return pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)


def _crafted_batches() -> dict[str, tuple[bytes, str]]:
    """Tiny pickles that claim huge sizes, each with what the error must say."""
    good = _good_batch()
    # BINBYTES8 (opcode 0x8e) declaring a terabyte, followed by three bytes
    bytes8 = pickle.PROTO + bytes([4]) + b"\x8e" + struct.pack("<Q", 2**40) + b"abc"
    # the shape given to ndarray.__setstate__: (2, 3072) -> (2**30, 3072), three terabytes
    state_shape = good.replace(b"K\x02M\x00\x0c\x86", b"J\x00\x00\x00\x40M\x00\x0c\x86")
    # the shape given to numpy's _reconstruct, (0,) -> (2**30,)
    new_shape = good.replace(b"K\x00\x85", b"J\x00\x00\x00\x40\x85")
    assert state_shape != good and new_shape != good
    return {
        "bytes8": (bytes8, r"truncated or damaged \(14 bytes; expected 1099511627776 bytes"),
        "state_shape": (state_shape, r"shape \(1073741824, 3072\) of uint8 \(3298534883328 bytes\), more than"),
        "new_shape": (new_shape, r"shape \(1073741824,\) of int8 \(1073741824 bytes\), more than"),
        "truncated": (good[: len(good) // 3], "truncated or damaged"),
        "objects": (pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0]}, protocol=2),
                    "refusing an array of Python objects"),
    }


@pytest.mark.parametrize("case", sorted(_crafted_batches()))
def test_malformed_cifar_batches_are_corrupt_files_not_memory_errors(cifar_folder, case):
    content, expected = _crafted_batches()[case]
    (cifar_folder / "test_batch").write_bytes(content)
    err, peak = _peak(lambda: load_dataset("cifar10", "test", root=cifar_folder))
    assert isinstance(err, CorruptFileError), repr(err)
    assert str(cifar_folder / "test_batch") in str(err)
    assert re.search(expected, str(err)), str(err)
    assert peak < SMALL


def test_well_formed_cifar_batch_still_loads(cifar_folder):
    (cifar_folder / "test_batch").write_bytes(_good_batch())
    ds = load_dataset("cifar10", "test", root=cifar_folder)
    assert ds.x.shape == (2, 3, 32, 32) and ds.y.tolist() == [0, 1]
    mean, std = np.array(cifar.LAYOUTS["cifar10"].mean), np.array(cifar.LAYOUTS["cifar10"].std)
    np.testing.assert_allclose(ds.x[:, :, 0, 0], np.broadcast_to(-mean / std, (2, 3)), rtol=1e-6)


# -- item 11: downloads with pooch ------------------------------------------------------------------
@pytest.mark.usefixtures("no_proxy")
def test_download_is_fetched_once_into_the_platform_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    with serve_folder(tmp_path / "remote") as (base, requests):
        raw, resources = fake_remote_mnist(tmp_path, base)
        monkeypatch.setitem(mnist.RESOURCES, "mnist", resources)
        folder = download("mnist")
        assert folder == tmp_path / "xdg-cache" / "combinability" / "mnist"  # pooch.os_cache on Linux
        # each file: one request to the dead mirror, one to the live one
        assert requests == {f"/absent/{r.filename}": 1 for r in resources} | {f"/{r.filename}": 1 for r in resources}
        for r in resources:
            assert md5((folder / r.filename).read_bytes()) == r.md5
        download("mnist")
        assert sum(requests.values()) == 2 * len(resources)  # cached: nothing fetched again
        np.testing.assert_array_equal(load_dataset("mnist", "train").y, raw["train"][1])


@pytest.mark.usefixtures("no_proxy")
def test_a_file_with_a_wrong_hash_is_refused_and_not_kept(tmp_path, monkeypatch):
    with serve_folder(tmp_path / "remote") as (base, _):
        _, resources = fake_remote_mnist(tmp_path, base)
        target = tmp_path / "dl" / "mnist"
        altered = locate.Resource(resources[0].filename, resources[0].urls[1:], md5(b"what the authors published"))
        with pytest.raises(DatasetError, match="MD5") as err:
            locate.fetch(altered, target)
        assert altered.urls[0] in str(err.value) and str(target) in str(err.value)
        assert list(target.iterdir()) == []
        # a damaged file already in the folder is replaced by a good download
        (target / resources[1].filename).write_bytes(b"damaged")
        good = locate.fetch(locate.Resource(resources[1].filename, resources[1].urls[1:], resources[1].md5), target)
        assert md5(good.read_bytes()) == resources[1].md5 and sorted(p.name for p in target.iterdir()) == [good.name]


@pytest.mark.usefixtures("no_proxy")
def test_download_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    import sys

    import pooch

    shown = []
    real = pooch.HTTPDownloader

    def spy(progressbar=False, **kwargs):
        shown.append(progressbar)
        return real(progressbar=False, **kwargs)

    monkeypatch.setattr(pooch, "HTTPDownloader", spy)
    with serve_folder(tmp_path / "remote") as (base, _):
        _, resources = fake_remote_mnist(tmp_path, base)
        one = locate.Resource(resources[0].filename, resources[0].urls[1:], resources[0].md5)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
        locate.fetch(one, tmp_path / "a")
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        locate.fetch(one, tmp_path / "b")
    assert shown == [False, True]


def test_a_folder_that_cannot_be_made_is_named_with_the_folder_that_refuses_it(tmp_path, monkeypatch):
    """``report --out ro/fig`` in a read-only ``ro`` said "(folder ro/fig)", a folder that does not exist."""
    from combinability.errors import OutputNotWritableError
    from combinability.files import check_writable

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(OutputNotWritableError, match=r"Permission denied \(creating folder .*ro/fig in .*ro\)"):
        check_writable(tmp_path / "ro" / "fig" / "summary.md", what="report summary")
