"""combinability.host_memory: glibc keeps freed memory for the next batch; large arrays map their pages at once."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from combinability import host_memory


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has not tuned the allocator yet (as far as the module knows)."""
    monkeypatch.setattr(host_memory, "_done", None)


def test_sets_the_trim_and_mmap_thresholds_once(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(host_memory, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.delenv(host_memory.ENVIRONMENT_VARIABLE, raising=False)
    assert host_memory.keep_freed_memory() is True
    assert host_memory.keep_freed_memory() is True
    # glibc's <malloc.h>: M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD is -1
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_the_environment_opts_out(fresh: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(host_memory.ENVIRONMENT_VARIABLE, value)
    monkeypatch.setattr(host_memory, "_mallopt", lambda: pytest.fail("mallopt must not be called"))
    assert host_memory.keep_freed_memory() is False


def test_a_c_library_without_mallopt_is_left_alone(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(host_memory.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(host_memory, "_mallopt", lambda: None)
    assert host_memory.keep_freed_memory() is False


def test_a_refused_setting_is_reported(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(host_memory.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(host_memory, "_mallopt", lambda: lambda param, value: 0)  # mallopt returns 0 on error
    assert host_memory.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._mallopt() is None,
                    reason="glibc's mallopt only")
def test_blocks_allocated_again_after_they_are_freed_take_no_fresh_pages(fresh: None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The effect itself, counted in page faults: three 24 MB blocks allocated, touched and freed
    together, round after round, as a forward pass's activations are batch after batch. Left to
    itself, glibc gives the 72 MB back to the kernel after each round (its trim threshold is twice
    the largest block freed) and every round faults in pages again."""
    monkeypatch.delenv(host_memory.ENVIRONMENT_VARIABLE, raising=False)
    assert host_memory.keep_freed_memory() is True
    size = 6 << 20  # float32 elements: 24 MB, under the 32 MB mmap threshold

    def faults_of_one_round() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [np.empty(size, np.float32) for _ in range(3)]
        for block in blocks:
            block.fill(1.0)  # touch every page
        del blocks, block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_one_round()  # the first round maps the pages
    later = [faults_of_one_round() for _ in range(5)]
    assert max(later) < 100, f"{later} page faults a round after the first"



@pytest.mark.parametrize("mapped", [True, False])
def test_float32_array_is_mapped_at_once_from_the_mmap_threshold(mapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the threshold up a populated mapping (on Linux), below it numpy's memory: either way a
    writable, C-contiguous float32 array of the asked shape, separate from any other."""
    import mmap

    monkeypatch.setattr(host_memory, "MMAP_THRESHOLD", 4 * 60 if mapped else 1 << 62)
    arrays = [host_memory.float32_array((3, 4, 5)) for _ in range(3)]
    for k, array in enumerate(arrays):
        assert array.shape == (3, 4, 5) and array.dtype == np.float32 and array.flags.c_contiguous
        assert array.flags.writeable
        owner = array
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base  # the memory's owner: a mapping, or the array itself
        owner = owner.obj if isinstance(owner, memoryview) else owner
        assert isinstance(owner, mmap.mmap) == (mapped and hasattr(mmap, "MAP_POPULATE"))
        array[...] = k
    for k, array in enumerate(arrays):
        assert np.all(array == k)  # no other array wrote over it


def test_float32_array_that_cannot_be_mapped_uses_numpy_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmap

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("Cannot allocate memory")

    monkeypatch.setattr(host_memory, "MMAP_THRESHOLD", 0)
    monkeypatch.setattr(mmap, "mmap", refuse)
    array = host_memory.float32_array((10, 10))
    assert array.shape == (10, 10) and array.base is None
