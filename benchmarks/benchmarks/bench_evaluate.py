"""Evaluating many parameter vectors with the torch backend: plain loop against vmap.

The issue asks which path is faster where; on this CPU the loop wins or ties for the
MLP and clearly wins for conv nets, so the backend loops on CPU and vmaps on CUDA.
"""

import numpy as np

import combinability as cb
from combinability.data.base import ArrayDataset


class TorchEvaluate:
    params = (["mlp", "tiny10"], [False, True])
    param_names = ["architecture", "vectorize"]
    timeout = 600

    def setup(self, architecture, vectorize):
        self.be = cb.get_backend("torch")
        arch = cb.get_architecture(architecture)
        rng = np.random.default_rng(0)
        n = 2000 if architecture == "mlp" else 500
        self.data = ArrayDataset(rng.normal(size=(n, 1, 28, 28)).astype(np.float32),
                                 rng.integers(0, 10, n), num_classes=10, name="synthetic", split="test")
        self.model = self.be.build(arch, width=1 if architecture == "mlp" else 0.5, num_classes=10,
                                   input_shape=(1, 28, 28), seed=0)
        state = self.be.state(self.model)
        self.layout = cb.FlatLayout.from_arrays(state)
        base = self.layout.flatten(state)
        self.flats = np.stack([base * (1 + 0.01 * k) for k in range(8)])

    def time_evaluate_8_vectors(self, architecture, vectorize):
        self.be.evaluate(self.model, self.layout, self.flats, self.data, vectorize=vectorize)
