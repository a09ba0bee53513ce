"""glibc's malloc keeps freed memory for the next batch (combinability.host_memory)."""

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
