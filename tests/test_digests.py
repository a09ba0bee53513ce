"""Content hashes are computed once for arrays nobody can write, and every time otherwise."""

from __future__ import annotations

import gc
import hashlib

import numpy as np
import pytest

import combinability as cb
from combinability import digests
from combinability.data import load_dataset
from combinability.models import build_model
from combinability.results import data_digest
from combinability.sets import fingerprint


def _sha256(x: np.ndarray, y: np.ndarray) -> str:
    """The digest's definition, written out: dtype and shape, then the bytes, of each array."""
    h = hashlib.sha256()
    for arr in (x, y):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times SHA-256 hashed data (its constructor is called once per digest)."""
    calls = [0]
    real = hashlib.sha256

    def counting(*args: object) -> object:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(hashlib, "sha256", counting)
    return calls


def test_a_frozen_arrays_digest_is_computed_once_and_is_the_plain_sha256(counted: list[int]) -> None:
    rng = np.random.default_rng(0)
    x, y = digests.freeze(rng.normal(size=(50, 7)).astype(np.float32)), digests.freeze(np.arange(50))
    expected = _sha256(x, y)
    assert counted[0] == 1
    assert data_digest(x, y) == expected
    assert data_digest(x, y) == expected
    assert counted[0] == 2  # once for the reference above, once for both calls


def test_a_writable_array_is_hashed_every_time_and_a_change_is_seen(counted: list[int]) -> None:
    x, y = np.zeros((4, 3), np.float32), np.arange(4)
    first = data_digest(x, y)
    x[0, 0] = 1.0
    second = data_digest(x, y)
    assert first != second == _sha256(x, y)
    assert counted[0] == 3


def test_a_read_only_view_of_a_writable_array_is_not_remembered() -> None:
    base = np.zeros((4, 3), np.float32)
    view = base[:2]
    view.flags.writeable = False
    y = digests.freeze(np.arange(2))
    assert not digests.is_frozen(view)
    before = data_digest(view, y)
    base[0, 0] = 5.0  # written through the base: the view's content changed
    assert data_digest(view, y) != before


def test_an_array_made_writable_again_is_hashed_again() -> None:
    x, y = digests.freeze(np.zeros(3, np.float32)), digests.freeze(np.arange(3))
    before = data_digest(x, y)
    x.flags.writeable = True
    x[1] = 2.0
    assert data_digest(x, y) == _sha256(x, y) != before


def test_a_freed_arrays_entry_is_dropped() -> None:
    x, y = digests.freeze(np.ones(5, np.float32)), digests.freeze(np.arange(5))
    data_digest(x, y)
    key = ("sha256", id(x), id(y))
    assert key in digests._memo
    del x
    gc.collect()
    assert key not in digests._memo  # (other tests' entries may go too: only this one is checked)


def test_arrays_over_immutable_bytes_count_as_frozen() -> None:
    arr = np.frombuffer(bytes(range(16)), dtype=np.uint8)
    assert digests.is_frozen(arr)
    assert not digests.is_frozen(np.frombuffer(bytearray(16), dtype=np.uint8))


def test_loaded_datasets_their_subsets_and_a_sets_vectors_are_read_only() -> None:
    test = load_dataset("digits", "test")
    assert digests.is_frozen(test.x) and digests.is_frozen(test.y)
    part = test.subset(20, seed=1)
    assert digests.is_frozen(part.x) and digests.is_frozen(part.y)
    with pytest.raises(ValueError, match="read-only"):
        part.x[0] = 0.0
    a = build_model("mlp", width=0.05, input_shape=test.input_shape, num_classes=10, seed=0)
    b = build_model("mlp", width=0.05, input_shape=test.input_shape, num_classes=10, seed=1)
    pair = cb.ModelPair(a, b)
    assert all(digests.is_frozen(t) for t in pair.thetas)
    assert pair.fingerprints()["theta_a"] == hashlib.blake2b(pair.thetas[0].tobytes(), digest_size=8).hexdigest()
    assert fingerprint(pair.thetas[1]) == hashlib.blake2b(pair.thetas[1].tobytes(), digest_size=8).hexdigest()


def test_torch_shares_a_read_only_vector_without_a_warning_and_copies_bytes() -> None:
    """A set's read-only vectors reach torch without a copy (a copy would double a sweep's end
    models in memory); memory numpy did not allocate is copied, never aliased."""
    import warnings

    torch = pytest.importorskip("torch")
    from combinability.plugins import get_backend

    be = get_backend("torch")
    theta = digests.freeze(np.arange(12, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = be.asarray(theta)
    assert tensor.data_ptr() == theta.ctypes.data
    assert torch.equal(tensor, torch.arange(12, dtype=torch.float32))
    raw = np.frombuffer(np.arange(3, dtype=np.float32).tobytes(), np.float32)
    assert not digests.in_numpy_memory(raw)
    copied = be.asarray(raw)
    assert copied.data_ptr() != raw.ctypes.data and copied.tolist() == [0.0, 1.0, 2.0]
