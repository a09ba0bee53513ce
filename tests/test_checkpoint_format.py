"""The framework-free checkpoint format (:mod:`combinability.checkpoint`).

Files are checked against independent references: the arrays they were written from, files
written directly with ``safetensors.numpy`` / ``torch.save`` / ``np.savez``, and hashes computed
here with :mod:`hashlib` from the documented recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from combinability.checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    load_checkpoint,
    payload_sha256,
    read_state_dict,
    save_checkpoint,
)
from combinability.errors import (
    BackendUnavailableError,
    CorruptFileError,
    IncompatibleModelsError,
    IncompatibleVersionError,
)

CONFIG = {"architecture": "mlp", "width": 1, "num_classes": 10, "input_shape": [1, 28, 28]}


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "layer.bias": rng.standard_normal(4),  # float64
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # 0-d
        "counts": np.array([-(2**62), 0, 2**62 + 1], dtype=np.int64),
        "mask": np.array([[True, False], [False, True]]),
        "scalar": np.array(np.pi),  # 0-d float64
        "empty": np.zeros((0, 5), np.float32),
    }


def _assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, ref in want.items():
        ref = np.asarray(ref)
        assert got[name].dtype == ref.dtype, name
        assert got[name].shape == ref.shape, name
        np.testing.assert_array_equal(got[name], ref, strict=True)


def _header(data: bytes) -> tuple[int, dict]:
    """(length, parsed JSON) of a safetensors header, read by hand."""
    size = int.from_bytes(data[:8], "little")
    return size, json.loads(data[8 : 8 + size])


def _header_hash(entries: dict[str, str]) -> str:
    """The documented ``header_sha256`` recipe, written out independently."""
    rest = {k: v for k, v in entries.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _entries(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata())


def _no_leftovers(directory: Path, expected: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == expected


# -- round trip ---------------------------------------------------------------------------------
def test_round_trip_exact(tmp_path):
    path = tmp_path / "model.safetensors"
    state = _state()
    meta = {"seed": np.int64(3), "accuracy": np.float32(0.5), "tags": ("a", "b"), "where": Path("/x"), "none": None}
    assert save_checkpoint(path, state, config=CONFIG, metadata=meta, backend="torch") is None
    ck = load_checkpoint(path)
    assert isinstance(ck, Checkpoint)
    _assert_same_state(ck.state, state)
    assert ck.config == CONFIG
    assert ck.metadata == {"seed": 3, "accuracy": 0.5, "tags": ["a", "b"], "where": "/x", "none": None}
    assert (ck.backend, ck.version, ck.path) == ("torch", VERSION, path)
    assert VERSION == 2
    assert ck.state["bn.num_batches_tracked"].shape == ()
    for array in ck.state.values():  # owned, writable copies
        assert array.flags.writeable and array.flags.owndata
    _assert_same_state(read_state_dict(path), state)
    _no_leftovers(tmp_path, {"model.safetensors"})


def test_file_is_plain_safetensors_with_documented_header(tmp_path):
    path = tmp_path / "m.safetensors"
    state = _state()
    save_checkpoint(path, state, config=CONFIG, metadata={"seed": 1}, backend="jax")
    # an independent reader sees the same tensors
    other = load_file(path)
    assert set(other) == set(state)
    for name, ref in state.items():
        np.testing.assert_array_equal(other[name], ref, strict=True)
    entries = _entries(path)
    assert entries["format"] == FORMAT
    assert entries["version"] == "2"
    assert entries["backend"] == "jax"
    assert json.loads(entries["config"]) == CONFIG
    assert json.loads(entries["metadata"]) == {"seed": 1}
    assert json.loads(entries["names"]) == list(state)
    assert entries["library_version"]
    assert entries["sha256"] == payload_sha256(state)
    assert entries["header_sha256"] == _header_hash(entries)


def test_defaults_and_layouts(tmp_path):
    path = tmp_path / "sub" / "dir" / "ck.bin"  # any suffix; directories are created
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    state = {
        "z_fortran": np.asfortranarray(base),
        "a_strided": base[:, ::2],
        "m_bigendian": base.astype(">f8"),
        "b_int8": np.array([-128, 0, 127], np.int8),
        "c_uint16": np.array([0, 65535], np.uint16),
        "d_f16": np.array([1.5, -2.0], np.float16),
    }
    save_checkpoint(path, state)
    ck = load_checkpoint(path)
    assert (ck.config, ck.metadata, ck.backend, ck.version) == ({}, {}, None, 2)
    assert list(ck.state) == list(state)  # the order given, not sorted
    for name, ref in state.items():
        np.testing.assert_array_equal(ck.state[name], ref)
        assert ck.state[name].dtype == ref.dtype.newbyteorder("=")
    # the hash depends on the values, not on the memory layout or byte order
    assert payload_sha256({"m": base.astype(">f8")}) == payload_sha256({"m": base})
    assert payload_sha256({"m": np.asfortranarray(base)}) == payload_sha256({"m": base})


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"a": np.zeros(3)})
    save_checkpoint(path, {"b": np.ones(2, np.int64)})
    _assert_same_state(load_checkpoint(path).state, {"b": np.ones(2, np.int64)})
    _no_leftovers(tmp_path, {"ck.safetensors"})


# -- hashes -------------------------------------------------------------------------------------
def test_payload_sha256_matches_hand_computation(tmp_path):
    state = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "a": np.array(5, np.int64)}
    digest = hashlib.sha256()
    for name, dtype, shape, raw in [
        ("a", "int64", "[]", (5).to_bytes(8, "little", signed=True)),
        ("w", "float32", "[2, 2]", np.array([1, 2, 3, 4], "<f4").tobytes()),
    ]:
        digest.update(name.encode() + b"\0" + dtype.encode() + b"\0" + shape.encode() + b"\0" + raw)
    assert payload_sha256(state) == digest.hexdigest()
    assert payload_sha256(dict(reversed(state.items()))) == digest.hexdigest()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, state)
    assert _entries(path)["sha256"] == digest.hexdigest()


def test_payload_sha256_sees_names_dtypes_shapes():
    ref = payload_sha256({"w": np.zeros((2, 3), np.float32)})
    assert payload_sha256({"v": np.zeros((2, 3), np.float32)}) != ref
    assert payload_sha256({"w": np.zeros((3, 2), np.float32)}) != ref
    assert payload_sha256({"w": np.zeros((2, 3), np.int32)}) != ref
    assert payload_sha256({"w": np.zeros(1, np.int64)}) != payload_sha256({"w": np.zeros((), np.int64)})


# -- damaged files -----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, _state(), config=CONFIG, metadata={"seed": 1}, backend="torch")
    return path


def _flip(path: Path, offset: int, bit: int = 0) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    out = path.with_name("flipped.safetensors")
    out.write_bytes(bytes(data))
    return out


def test_bit_flip_in_data_is_detected(saved):
    size, header = _header(saved.read_bytes())
    start, end = header["layer.weight"]["data_offsets"]
    bad = _flip(saved, 8 + size + (start + end) // 2, 3)
    with pytest.raises(CorruptFileError, match="payload SHA-256 does not match") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    # the bool tensor: 0x01 -> 0x03 is still "True" to numpy but not the bytes written
    start, _ = header["mask"]["data_offsets"]
    with pytest.raises(CorruptFileError, match="SHA-256"):
        load_checkpoint(_flip(saved, 8 + size + start, 1))


def test_bit_flip_in_header_is_detected(saved):
    data = saved.read_bytes()
    # '"width": 1' inside the JSON-encoded config: 1 -> 0 keeps every JSON valid
    offset = data.index(b'\\"width\\": 1') + len(b'\\"width\\": ')
    bad = _flip(saved, offset, 0)
    assert b'\\"width\\": 0' in bad.read_bytes()
    with pytest.raises(CorruptFileError, match="header SHA-256 does not match") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    # the version "2" -> "3" is damage, not a newer file
    offset = data.index(b'"version":"2"') + len(b'"version":"')
    with pytest.raises(CorruptFileError):
        load_checkpoint(_flip(saved, offset, 0))


def test_every_single_bit_flip_is_detected(tmp_path):
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, {"w": np.array([1.0, -2.0], np.float32), "n": np.array(3, np.int64),
                           "b": np.array([True])}, config={"width": 1}, metadata={"s": "x"}, backend="jax")
    data = path.read_bytes()
    out = tmp_path / "flipped.safetensors"
    undetected = []
    for offset in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            out.write_bytes(bytes(damaged))
            try:
                load_checkpoint(out)
            except CorruptFileError:
                continue
            undetected.append((offset, bit))
    assert not undetected


def test_truncated_file(saved):
    data = saved.read_bytes()
    size, _ = _header(data)
    out = saved.with_name("cut.safetensors")
    for n in (0, 4, 9, 8 + size // 2, 8 + size, len(data) - 1):
        out.write_bytes(data[:n])
        with pytest.raises(CorruptFileError) as info:
            load_checkpoint(out)
        assert str(out) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        b"hello, world\n",
        b"PK\x03\x04" + bytes(200),  # looks like a zip, is not one
        (100).to_bytes(8, "little") + b'{"a": 1',  # looks like safetensors, is not one
        json.dumps({"format": FORMAT}).encode(),
    ],
)
def test_junk_file(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_zip_that_is_no_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CorruptFileError, match="zip archive"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(path)


def _write_ours(path: Path, tensors: dict[str, np.ndarray], **changes: str) -> None:
    """A file of this format written by hand, with some header entries replaced (hashes kept valid)."""
    entries = {
        "format": FORMAT, "version": "2", "backend": "torch", "config": "{}", "metadata": "{}",
        "names": json.dumps(list(tensors)), "library_version": "test", "sha256": payload_sha256(tensors),
    }  # fmt: skip
    entries.update(changes)
    entries["header_sha256"] = _header_hash(entries)
    save_file(tensors, path, metadata=entries)


def test_hand_written_file_loads(tmp_path):
    path = tmp_path / "ck.safetensors"
    tensors = {"w": np.arange(3.0)}
    _write_ours(path, tensors, metadata='{"k": [1, 2]}')
    ck = load_checkpoint(path)
    assert (ck.version, ck.backend, ck.metadata) == (2, "torch", {"k": [1, 2]})
    _assert_same_state(ck.state, tensors)


def test_bad_json_in_metadata(tmp_path):
    path = tmp_path / "ck.safetensors"
    _write_ours(path, {"w": np.arange(3.0)}, metadata='{"seed": 1,')
    with pytest.raises(CorruptFileError, match="'metadata' is not valid JSON") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_newer_version(tmp_path):
    path = tmp_path / "ck.safetensors"
    _write_ours(path, {"w": np.arange(3.0)}, version="3")
    with pytest.raises(IncompatibleVersionError, match=r"version-3.*reads version 2 .* and version 1"):
        load_checkpoint(path)


def test_wrong_hash_in_hand_written_file(tmp_path):
    path = tmp_path / "ck.safetensors"
    _write_ours(path, {"w": np.arange(3.0)}, sha256=payload_sha256({"w": np.arange(4.0)}))
    with pytest.raises(CorruptFileError, match="payload SHA-256 does not match"):
        load_checkpoint(path)


# -- foreign safetensors -------------------------------------------------------------------------
def test_foreign_safetensors(tmp_path):
    path = tmp_path / "hub.safetensors"
    tensors = {"b": np.arange(4, dtype=np.int32), "a": np.ones((2, 2), np.float64), "s": np.array(2.5, np.float32)}
    save_file(tensors, path, metadata={"format": "pt", "note": "from elsewhere"})
    ck = load_checkpoint(path)
    assert (ck.version, ck.backend, ck.config) == (0, None, {})
    assert ck.metadata == {"format": "pt", "note": "from elsewhere"}
    assert set(ck.state) == set(tensors)
    for name, ref in tensors.items():
        np.testing.assert_array_equal(ck.state[name], ref, strict=True)

    save_file(tensors, path)  # no metadata at all
    ck = load_checkpoint(path)
    assert (ck.version, ck.metadata) == (0, {})


# -- saving: validation --------------------------------------------------------------------------
def test_non_plain_metadata_writes_nothing(tmp_path):
    path = tmp_path / "ck.safetensors"
    with pytest.raises(TypeError, match=r"metadata\['obj'\]"):
        save_checkpoint(path, {"w": np.zeros(2)}, metadata={"ok": 1, "obj": object()})
    assert not path.exists()
    _no_leftovers(tmp_path, set())

    save_checkpoint(path, {"w": np.zeros(2)}, metadata={"v": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"metadata\['nested'\]\['set'\]"):
        save_checkpoint(path, {"w": np.ones(2)}, metadata={"nested": {"set": {1, 2}}})
    with pytest.raises(TypeError, match="config"):
        save_checkpoint(path, {"w": np.ones(2)}, config={"width": object()})
    assert path.read_bytes() == before
    _no_leftovers(tmp_path, {"ck.safetensors"})


def test_unsupported_dtype_writes_nothing(tmp_path):
    path = tmp_path / "ck.safetensors"
    for bad in (np.array(["a"]), np.array([object()]), np.zeros(2, np.complex128)):
        with pytest.raises(TypeError, match=r"state\['w'\]"):
            save_checkpoint(path, {"w": bad})
    assert not path.exists()
    _no_leftovers(tmp_path, set())


# -- torch files -----------------------------------------------------------------------------------
def _torch_model():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(5, 1, 6, 6))  # moves the BatchNorm running statistics and its counter
    return torch, model


def _numpy_state(state) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def test_torch_state_dict_file(tmp_path):
    torch, model = _torch_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    ck = load_checkpoint(path)
    assert (ck.version, ck.backend, ck.config, ck.metadata) == (0, None, {}, {})
    want = _numpy_state(model.state_dict())
    _assert_same_state(ck.state, want)
    assert ck.state["1.num_batches_tracked"].shape == () and ck.state["1.num_batches_tracked"].dtype == np.int64
    assert int(ck.state["1.num_batches_tracked"]) == 1
    # detected by content, not by suffix
    other = tmp_path / "weights.safetensors"
    torch.save(model.state_dict(), other)
    _assert_same_state(read_state_dict(other), want)


def test_torch_legacy_pickle_file(tmp_path):
    torch, model = _torch_model()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    _assert_same_state(read_state_dict(path), _numpy_state(model.state_dict()))


def test_torch_training_script_files(tmp_path):
    torch, model = _torch_model()
    want = _numpy_state(model.state_dict())
    path = tmp_path / "ckpt.bin"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)
    ck = load_checkpoint(path)
    assert ck.version == 0
    _assert_same_state(ck.state, want)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "loss": 0.25}, path)
    _assert_same_state(read_state_dict(path), want)


def test_training_script_dicts_give_their_model_state_dict(tmp_path):
    """``{"model": ..., "optimizer": ..., "epoch": ...}`` and a model beside its EMA: the model's state dict."""
    torch, model = _torch_model()
    want = _numpy_state(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters())
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    _assert_same_state(read_state_dict(path), want)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    torch.save({"net": model.state_dict(), "ema": ema, "step": 10}, path)
    _assert_same_state(read_state_dict(path), want)
    torch.save({"student": model.state_dict(), "teacher": ema}, path)
    with pytest.raises(IncompatibleModelsError, match=r"several state dicts: 'student', 'teacher'.*\['student'\]"):
        read_state_dict(path)


def test_torch_bfloat16_becomes_float32(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.tensor([1.0, -2.5, 3.0e38], dtype=torch.bfloat16)
    path = tmp_path / "bf16.pt"
    torch.save({"w": t}, path)
    got = read_state_dict(path)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t.float().numpy())


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([1, 2, 3], "holds a list"),
        ({"w": "not a tensor"}, r"holds a str .* under 'w'"),
        ({"epoch": 3}, r"holds a int .* under 'epoch'"),
        ({"epoch": 3, "state_dict": {"w": 1.5}}, r"'state_dict' entry holds a float"),
        ({"state_dict": [1]}, "'state_dict' entry holds a list"),
    ],
)
def test_torch_file_that_is_no_state_dict(tmp_path, payload, match):
    torch = pytest.importorskip("torch")
    path = tmp_path / "x.pt"
    torch.save(payload, path)
    with pytest.raises(IncompatibleModelsError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "expected a state dict" in str(info.value)


def test_torch_whole_module_is_refused(tmp_path):
    torch, model = _torch_model()
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.raises(CorruptFileError, match=r"weights_only=True"):
        load_checkpoint(path)


def test_truncated_torch_file(tmp_path):
    torch, model = _torch_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="model.pt"):
        load_checkpoint(path)


def test_torch_file_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle, as the legacy torch.save writes
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'combinability\[torch\]'"):
        load_checkpoint(path)


def test_core_does_not_import_frameworks(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from combinability.checkpoint import save_checkpoint, load_checkpoint\n"
        f"p = {str(tmp_path / 'c.safetensors')!r}\n"
        "save_checkpoint(p, {'w': np.zeros(2)}); load_checkpoint(p)\n"
        "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# -- legacy (version 1) files -------------------------------------------------------------------
def test_legacy_torch_checkpoint(tmp_path):
    torch, model = _torch_model()
    path = tmp_path / "legacy.pt"
    # exactly what the version-1 torch backend wrote
    torch.save(
        {
            "format": "combinability-checkpoint",
            "version": 1,
            "backend": "torch",
            "architecture": "mlp",
            "config": {"width": 1, "num_classes": 10, "input_shape": (1, 28, 28)},
            "state": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
            "metadata": {"seed": 4, "tags": ["x"]},
        },
        path,
    )
    ck = load_checkpoint(path)
    assert (ck.version, ck.backend) == (1, "torch")
    assert ck.config == CONFIG
    assert ck.metadata == {"seed": 4, "tags": ["x"]}
    _assert_same_state(ck.state, _numpy_state(model.state_dict()))


def test_legacy_torch_checkpoint_other_version(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.pt"
    torch.save({"format": FORMAT, "version": 9, "backend": "torch", "architecture": "mlp", "config": {},
                "state": {}, "metadata": {}}, path)
    with pytest.raises(IncompatibleVersionError, match="version-9.*reads version 2"):
        load_checkpoint(path)


def _legacy_npz(path: Path, arrays: dict[str, np.ndarray], version: int = 1) -> None:
    """Exactly what the version-1 jax backend wrote."""
    header = {"backend": "jax", "architecture": "mlp", "config": dict(CONFIG), "metadata": {"seed": 2}}
    full = {"format": "combinability-checkpoint", "version": version, **header, "names": list(arrays)}
    text = json.dumps(full, sort_keys=True)
    payload = {"__header__": np.frombuffer(text.encode("utf-8"), dtype=np.uint8)}
    payload.update({f"a{i}": np.asarray(v) for i, v in enumerate(arrays.values())})
    with open(path, "wb") as f:
        np.savez(f, **payload)


def test_legacy_jax_checkpoint(tmp_path):
    path = tmp_path / "legacy.ckpt"  # detected by content: the suffix says nothing
    arrays = {
        "params/Dense_0/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "params/Dense_0/bias": np.array([0.5, -1.0, 2.0], np.float32),
        "batch_stats/count": np.array(4, np.int64),
    }
    _legacy_npz(path, arrays)
    ck = load_checkpoint(path)
    assert (ck.version, ck.backend, ck.metadata) == (1, "jax", {"seed": 2})
    assert ck.config == CONFIG
    _assert_same_state(ck.state, arrays)


def test_legacy_jax_checkpoint_other_version(tmp_path):
    path = tmp_path / "legacy.npz"
    _legacy_npz(path, {"w": np.zeros(2)}, version=5)
    with pytest.raises(IncompatibleVersionError, match="version-5"):
        load_checkpoint(path)


def test_legacy_jax_checkpoint_truncated(tmp_path):
    path = tmp_path / "legacy.npz"
    _legacy_npz(path, {"w": np.zeros(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])
    with pytest.raises(CorruptFileError, match="legacy.npz"):
        load_checkpoint(path)
