"""What the benchmarks share: array libraries and devices as asv parameters (scipy's ``XPBenchmark`` idea).

A benchmark parametrised over ``LIBRARIES`` x ``DEVICES`` calls :func:`require` in its
``setup``: a library that is not installed, or a device that is not there (no CUDA for the
framework; numpy on a GPU), raises ``NotImplementedError``, which asv reports as a skipped
combination. :func:`synchronize` waits for a device's queued work, so a timed GPU call is
timed whole; :func:`gpu_peak_bytes` is what ``track_`` GPU-memory benchmarks report.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np


def _nvidia_device_present() -> bool:
    """Whether this machine has an NVIDIA device, read off ``/dev`` (importing a framework costs seconds)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


LIBRARIES = ["numpy", "torch", "jax"]
BACKENDS = ["torch", "jax"]  # the frameworks that evaluate models (numpy draws and combines only)
#: ``cuda`` variants are listed only where an NVIDIA device is present: asv runs every parameter
#: combination in a fresh process (a framework import each), and on a machine without one they would
#: all be skipped. ``COMBINABILITY_BENCH_DEVICES=cpu,cuda`` lists them anyway (they skip in setup).
DEVICES = (os.environ["COMBINABILITY_BENCH_DEVICES"].split(",") if os.environ.get("COMBINABILITY_BENCH_DEVICES")
           else ["cpu", "cuda"] if _nvidia_device_present() else ["cpu"])


def require(library: str, device: str = "cpu") -> None:
    """Raise ``NotImplementedError`` (asv: skipped) unless ``library`` runs on ``device`` here."""
    if library != "numpy" and importlib.util.find_spec(library) is None:
        raise NotImplementedError(f"{library} is not installed")
    if device == "cpu":
        return
    if library == "numpy":
        raise NotImplementedError("numpy runs on the CPU only")
    if library == "torch":
        import torch

        if not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device for torch")
    if library == "jax":
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            raise NotImplementedError("no CUDA device for jax") from None


def backend(name: str, device: str = "cpu") -> Any:
    """The registered backend ``name`` on ``device`` (after :func:`require`)."""
    import combinability as cb

    be = cb.get_backend(name)
    target = _device_name(be, device)
    return be if be.device() == target else be.on_device(target)


def _device_name(be: Any, device: str) -> str:
    if device in be.devices():
        return device
    raise NotImplementedError(f"backend {be.name!r} lists no {device} device: {be.devices()}")


def random_source(library: str, device: str, seed: int = 0) -> Any:
    """A :class:`combinability.backend.RandomSource` of ``library`` on ``device``."""
    if library == "numpy":
        from combinability.backend import NumpyRandom

        return NumpyRandom(seed)
    return backend(library, device).random(seed)


def asarray(library: str, device: str, array: np.ndarray) -> Any:
    """``array`` as ``library``'s array on ``device``."""
    if library == "numpy":
        return array
    return backend(library, device).asarray(array)


def synchronize(result: Any = None) -> Any:
    """Wait until ``result`` (and the device's queue) is computed; returns ``result``."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    elif isinstance(result, tuple | list):
        for r in result:
            synchronize(r)
    elif type(result).__module__.startswith("torch") and getattr(result, "is_cuda", False):
        import torch

        torch.cuda.synchronize()
    return result


def reset_gpu_peak(library: str) -> None:
    """Start a new GPU high-water mark (torch; jax keeps one per process)."""
    if library == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()


def gpu_peak_bytes(library: str) -> float:
    """The GPU memory high-water mark in bytes (torch: since the last reset; jax: of the process)."""
    if library == "torch":
        import torch

        return float(torch.cuda.max_memory_allocated())
    import jax

    stats = jax.devices("gpu")[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", np.nan))
