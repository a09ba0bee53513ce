"""A whole sweep: models evaluated per second and peak memory, per backend and device.

An MLP pair (random weights; the sweep's cost does not depend on training) swept with 8
uniform draws at one value on 2,000 synthetic examples, test split only: 10 evaluations
with the two end models. ``track_models_per_second`` times one sweep inside the benchmark
(evaluations / wall seconds); ``peakmem_sweep`` is the process's peak resident memory;
``SweepGPUMemory`` the device's high-water mark (CUDA only).
"""

import time

import combinability as cb
from combinability.models import build_model

try:
    from .bench_evaluate import synthetic
    from .common import BACKENDS, DEVICES, backend, gpu_peak_bytes, require, reset_gpu_peak, synchronize
except ImportError:  # run as a script
    from bench_evaluate import synthetic
    from common import BACKENDS, DEVICES, backend, gpu_peak_bytes, require, reset_gpu_peak, synchronize

SAMPLES = 8


class Sweep:
    params = (BACKENDS, DEVICES)
    param_names = ["backend", "device"]
    timeout = 300

    def setup(self, library, device):
        require(library, device)
        self.be = backend(library, device)
        a, b = (build_model("mlp", backend=library, input_shape=(1, 28, 28), seed=s) for s in (0, 1))
        self.pair = cb.ModelPair(a, b)
        self.data = {"test": synthetic(2000)}
        self._sweep()  # compile (jax), device copy of the data

    def _sweep(self):
        return cb.sweep(self.pair, cb.Uniform(), backend=self.be, data=self.data, splits=["test"], values=[0.25],
                        samples=SAMPLES, seed=0)

    def time_sweep(self, library, device):
        self._sweep()

    def peakmem_sweep(self, library, device):
        self._sweep()

    def track_models_per_second(self, library, device):
        start = time.perf_counter()
        self._sweep()
        synchronize()
        return (SAMPLES + 2) / (time.perf_counter() - start)

    track_models_per_second.unit = "models/s"



class SweepGPUMemory:
    """The GPU memory high-water mark of :class:`Sweep` (CUDA only: skipped elsewhere)."""

    params = (BACKENDS, ["cuda"])
    param_names = ["backend", "device"]
    timeout = 300

    def setup(self, library, device):
        require(library, device)  # before any work: a machine without CUDA skips at once
        Sweep.setup(self, library, device)

    _sweep = Sweep._sweep

    def track_gpu_peak_memory(self, library, device):
        reset_gpu_peak(library)
        self._sweep()
        synchronize()
        return gpu_peak_bytes(library)

    track_gpu_peak_memory.unit = "bytes"
