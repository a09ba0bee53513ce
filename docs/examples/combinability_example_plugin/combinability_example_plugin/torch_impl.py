"""Torch implementation of ``tiny_mlp`` (the :class:`combinability.ArchitectureImpl` protocol)."""

from __future__ import annotations

import math

import torch
from torch import nn

from combinability import SpecBuilder


class _Net(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyMLP:
    """Two hidden layers of ``32 * width`` units."""

    @staticmethod
    def _hidden(width: float) -> int:
        return max(1, round(32 * width))

    @classmethod
    def build(cls, *, width, num_classes, input_shape, seed):
        gen = torch.Generator().manual_seed(seed)
        net = _Net(math.prod(input_shape), cls._hidden(width), num_classes)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return net

    @staticmethod
    def spec(*, width, num_classes, input_shape):
        return SpecBuilder("torch").dense("fc1", None, "H1").dense("fc2", "H1", "H2").dense("out", "H2", None).build()

    @staticmethod
    def layers(*, width, num_classes, input_shape):
        return {f"{m}.{leaf}": i for i, m in enumerate(["fc1", "fc2", "out"]) for leaf in ("weight", "bias")}

    @staticmethod
    def layer_names(*, width, num_classes, input_shape):
        return ["fc1", "fc2", "out"]

    @staticmethod
    def activation_points(*, width, num_classes, input_shape):
        return {"H1": "fc1", "H2": "fc2"}

    @staticmethod
    def to_reference(params):
        return dict(params)

    @staticmethod
    def from_reference(params):
        return dict(params)
