"""Mixed precision and the GPU's bf16 rate (issue 11, item 5).

``EvaluatePrecision``: one model evaluated in float32 and in bfloat16
(``Backend.with_compute_dtype``), per backend and device; on this kind of CPU bfloat16 is
measured, not assumed, to be slower or faster, and float32 stays the default.

``ResNetThroughput`` (CUDA only, skipped elsewhere): a ResNet-20 x32 evaluated on 1,024
CIFAR-shaped images, four parameter vectors per forward call; ``track_models_per_second``
(full evaluations per second) and ``track_fraction_of_peak`` (achieved FLOP/s over the card's
dense rate for the compute type: FLOPs of the forward pass counted by
:class:`torch.utils.flop_counter.FlopCounterMode`, the rate from :data:`PEAK_TFLOPS` by
device name, or ``COMBINABILITY_PEAK_TFLOPS``). The goal: at least 0.5 in bfloat16.
"""

import os
import time

import numpy as np

import combinability as cb
from combinability.data.base import ArrayDataset
from combinability.evaluation import Evaluator
from combinability.models import build_model

try:
    from .common import BACKENDS, DEVICES, backend, require, synchronize
except ImportError:  # run as a script
    from common import BACKENDS, DEVICES, backend, require, synchronize

#: Dense tensor-core rates (TFLOP/s) by compute type, for device names containing the key.
PEAK_TFLOPS = {"H200": {"bfloat16": 989.0, "tfloat32": 494.7, "float32": 67.0},
               "H100": {"bfloat16": 989.0, "tfloat32": 494.7, "float32": 67.0},
               "A100": {"bfloat16": 312.0, "tfloat32": 156.0, "float32": 19.5},
               "L4": {"bfloat16": 121.0, "tfloat32": 60.0, "float32": 30.3}}


def _images(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, n),
                        num_classes=10, name="synthetic", split="test")


class EvaluatePrecision:
    """One MLP / Tiny-10 evaluation on 2,000 / 500 examples in float32 and bfloat16."""

    params = (["mlp", "tiny10"], BACKENDS, DEVICES, ["float32", "bfloat16"])
    param_names = ["architecture", "backend", "device", "compute_dtype"]
    timeout = 300

    def setup(self, architecture, library, device, dtype):
        require(library, device)
        self.be = backend(library, device).with_compute_dtype(dtype)
        self.data = _images(2000 if architecture == "mlp" else 500, (1, 28, 28))
        model = build_model(architecture, backend=library, width=1 if architecture == "mlp" else 0.5,
                            input_shape=(1, 28, 28), seed=0)
        state = self.be.state(model)
        layout = cb.FlatLayout.from_arrays(state)
        self.evaluator = Evaluator(self.be, model, layout, batch_size=500)
        self.theta = self.be.asarray(layout.flatten(state))
        self.evaluator.evaluate([self.theta], self.data)

    def time_evaluate(self, architecture, library, device, dtype):
        self.evaluator.evaluate([self.theta], self.data)


def forward_flops(width, n):
    """FLOPs of one ResNet-20 forward pass over ``n`` 32x32 images (torch's counter; multiply-add = 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("resnet20", backend="torch", width=width, input_shape=(3, 32, 32), seed=0).to("meta")
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(n, 3, 32, 32, device="meta"))
    return float(counter.get_total_flops())


def peak_flops(device_name, dtype):
    """The card's dense rate in FLOP/s for ``dtype``, or None when unknown.

    ``"tfloat32"`` is the tensor cores' float32 rate, which torch's float32 convolutions run at
    while ``torch.backends.cudnn.allow_tf32`` is set (its default); jax's float32 is exact
    (the backend's ``precision="highest"``).
    """
    if os.environ.get("COMBINABILITY_PEAK_TFLOPS"):
        return float(os.environ["COMBINABILITY_PEAK_TFLOPS"]) * 1e12
    rate = next((r for key, r in PEAK_TFLOPS.items() if key in device_name), None)
    return None if rate is None else rate[dtype] * 1e12


class ResNetThroughput:
    """ResNet-20 x32 on a GPU: full evaluations per second and the fraction of the card's rate,
    eager or (torch) through ``torch.compile`` (``compiled``; compiled untimed, in the setup)."""

    params = (BACKENDS, ["cuda"], ["float32", "bfloat16"], [False, True])
    param_names = ["backend", "device", "compute_dtype", "compiled"]
    timeout = 900
    width, examples, vectors = 32, 1024, 4

    def setup(self, library, device, dtype, compiled=False):
        require(library, device)  # before any work: a machine without CUDA skips at once
        if compiled and library != "torch":
            raise NotImplementedError(f"{library}'s evaluations are always compiled")
        import torch

        self.be = backend(library, device).with_compute_dtype(dtype).with_compile(compiled)
        self.data = _images(self.examples, (3, 32, 32))
        model = build_model("resnet20", backend=library, width=self.width, input_shape=(3, 32, 32), seed=0)
        state = self.be.state(model)
        layout = cb.FlatLayout.from_arrays(state)
        self.evaluator = Evaluator(self.be, model, layout, batch_size=256, vectors=self.vectors)
        base = layout.flatten(state)
        self.flats = self.be.asarray(np.stack([base * (1 + 0.01 * k) for k in range(self.vectors)]))
        synchronize(self.evaluator.evaluate(self.flats, self.data))  # compile, warm the caches
        self.flops = forward_flops(self.width, self.examples) * self.vectors
        tf32 = library == "torch" and dtype == "float32" and torch.backends.cudnn.allow_tf32
        self.peak = (peak_flops(torch.cuda.get_device_name(), "tfloat32" if tf32 else dtype)
                     if device.startswith("cuda") else None)

    def _seconds(self):
        t0 = time.perf_counter()
        synchronize(self.evaluator.evaluate(self.flats, self.data))
        self.be.synchronize()
        return time.perf_counter() - t0

    def track_models_per_second(self, library, device, dtype, compiled):
        return self.vectors / min(self._seconds() for _ in range(3))

    track_models_per_second.unit = "models/s"

    def track_fraction_of_peak(self, library, device, dtype, compiled):
        if self.peak is None:
            raise NotImplementedError("unknown card: set COMBINABILITY_PEAK_TFLOPS")
        return self.flops / min(self._seconds() for _ in range(3)) / self.peak

    track_fraction_of_peak.unit = "fraction"
