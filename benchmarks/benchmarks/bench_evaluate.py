"""Evaluating one model (one flat vector on 2,000 / 500 examples), per backend and device.

``LoopOrVmap`` keeps the comparison the backends' choices rest on, on the CPU: for torch the
plain loop over vectors wins or ties for the MLP and clearly wins for conv nets, so the torch
backend loops on the CPU and vmaps on CUDA; for jax, vmap ties for the MLP (0.9-1.4x) and loses
badly for conv nets (Tiny-10: 4.8-5.5x slower), so the jax backend vmaps on the CPU unless the
forward pass has a convolution, and always on an accelerator.
"""

import numpy as np

import combinability as cb
from combinability.data.base import ArrayDataset
from combinability.evaluation import Evaluator
from combinability.models import build_model

try:
    from .common import BACKENDS, DEVICES, backend, gpu_peak_bytes, require, reset_gpu_peak, synchronize
except ImportError:  # run as a script
    from common import BACKENDS, DEVICES, backend, gpu_peak_bytes, require, reset_gpu_peak, synchronize

EXAMPLES = {"mlp": 2000, "tiny10": 500}


def synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n),
                        num_classes=10, name="synthetic", split="test")


def model_and_layout(be, architecture, seed=0):
    model = build_model(architecture, backend=be.name, width=1 if architecture == "mlp" else 0.5,
                        input_shape=(1, 28, 28), seed=seed)
    state = be.state(model)
    layout = cb.FlatLayout.from_arrays(state)
    return model, layout, layout.flatten(state)


class EvaluateOne:
    """Loss, accuracy and predictions of one parameter vector (``Evaluator.evaluate``)."""

    params = (["mlp", "tiny10"], BACKENDS, DEVICES)
    param_names = ["architecture", "backend", "device"]
    timeout = 300

    def setup(self, architecture, library, device):
        require(library, device)
        self.be = backend(library, device)
        self.data = synthetic(EXAMPLES[architecture])
        model, layout, flat = model_and_layout(self.be, architecture)
        self.evaluator = Evaluator(self.be, model, layout, batch_size=500)
        self.theta = self.be.asarray(flat)
        self.evaluator.evaluate([self.theta], self.data)  # compile (jax), device copy of the data

    def time_evaluate(self, architecture, library, device):
        self.evaluator.evaluate([self.theta], self.data)



class EvaluateOneCompiled:
    """:class:`EvaluateOne` for torch through ``torch.compile`` (``TorchBackend(compile=True)``),
    compiled in the setup (seconds on a GPU, 5-20 s on this project's CPU), beside the eager one."""

    params = (["mlp", "tiny10"], ["torch"], DEVICES)
    param_names = ["architecture", "backend", "device"]
    timeout = 600

    def setup(self, architecture, library, device):
        require(library, device)
        self.be = backend(library, device).with_compile()
        self.data = synthetic(EXAMPLES[architecture])
        model, layout, flat = model_and_layout(self.be, architecture)
        self.evaluator = Evaluator(self.be, model, layout, batch_size=500)
        self.theta = self.be.asarray(flat)
        self.evaluator.evaluate([self.theta], self.data)  # compiles

    def time_evaluate(self, architecture, library, device):
        self.evaluator.evaluate([self.theta], self.data)


class EvaluateOneGPUMemory:
    """The GPU memory high-water mark of :class:`EvaluateOne` (CUDA only: skipped elsewhere)."""

    params = (["mlp", "tiny10"], BACKENDS, ["cuda"])
    param_names = ["architecture", "backend", "device"]
    timeout = 300

    def setup(self, architecture, library, device):
        require(library, device)  # before any work: a machine without CUDA skips at once
        EvaluateOne.setup(self, architecture, library, device)

    def track_gpu_peak_memory(self, architecture, library, device):
        reset_gpu_peak(library)
        synchronize(self.evaluator.evaluate([self.theta], self.data))
        return gpu_peak_bytes(library)

    track_gpu_peak_memory.unit = "bytes"


class LoopOrVmap:
    """Eight vectors per forward call (``Evaluator(vectors=8)``), a loop against vmap, on the CPU."""

    params = (["mlp", "tiny10"], BACKENDS, [False, True])
    param_names = ["architecture", "backend", "vectorize"]
    timeout = 300

    def setup(self, architecture, library, vectorize):
        require(library)
        if library == "torch":
            from combinability_torch.backend import TorchBackend

            be = TorchBackend("cpu", vectorize=vectorize)
        else:
            import jax
            from combinability_jax.backend import JaxBackend

            be = JaxBackend(jax.devices("cpu")[0], vectorize=vectorize)
        self.data = synthetic(EXAMPLES[architecture])
        model, layout, base = model_and_layout(be, architecture)
        self.evaluator = Evaluator(be, model, layout, batch_size=500, vectors=8)
        self.flats = be.asarray(np.stack([base * (1 + 0.01 * k) for k in range(8)]))
        self.evaluator.evaluate(self.flats, self.data)  # compile (jax)

    def time_evaluate_8_vectors(self, architecture, library, vectorize):
        self.evaluator.evaluate(self.flats, self.data)
