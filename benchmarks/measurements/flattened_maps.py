"""Flattened feature maps: the aligned barrier with the last conv's channels permuted (``cb.Repeat``)
against the spec that left them in place (before ``cb.Repeat`` existed).

Usage: ``python benchmarks/measurements/flattened_maps.py``. Two copies of the PyTorch MNIST
example CNN (conv 32, conv 64, max pool, ``torch.flatten``, dense 9216→128→10), seeds 0 and 1,
trained with Adam (lr 1e-3, batches of 128) for 2 epochs on the first 20,000 Fashion-MNIST training
images; weight matching with each spec, then the linear path at 0, 0.5, 1 on the first 5,000 test
images. Writes ``flattened_maps.md`` beside this file.
"""

from __future__ import annotations

from pathlib import Path

import common as c
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb
from combinability.data import load_dataset
from combinability.permutation import Repeat


class MnistExample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def trained(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> nn.Module:
    torch.manual_seed(seed)  # the initial weights
    return c.fit_adam(MnistExample(), x, y, epochs)


def main() -> None:
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    x = torch.as_tensor(np.asarray(train.x[:20000], np.float32)).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(np.asarray(train.y[:20000])).long()
    x_test, y_test = np.asarray(test.x[:5000], np.float32).reshape(-1, 1, 28, 28), np.asarray(test.y[:5000])
    models = [trained(seed, x, y) for seed in (0, 1)]
    spec = cb.ModelPair(*models, example_input=x_test[:8]).spec
    before = cb.PermutationSpec({k: tuple(None if isinstance(e, Repeat) or e == "P_conv2" else e for e in v)
                                 for k, v in spec.axes_to_perm.items()})
    rows = ["| alignment | loss at 0, 0.5, 1 | loss barrier | accuracy at 0.5 | objective |",
            "|---|---|---:|---:|---:|"]
    for label, s, method in (("naive", spec, None), ("weight matching, conv2 fixed (before)", before, "weight"),
                             ("weight matching, `Repeat` (now)", spec, "weight")):
        pair = cb.ModelPair(*models, spec=s)
        pair = pair.align(method) if method else pair
        ds = cb.sweep(pair, cb.Linear(), data=(x_test, y_test), values=[0.0, 0.5, 1.0], splits=["test"])
        loss = ds["loss"].sel(split="test").values.ravel()
        acc = ds["accuracy"].sel(split="test").values.ravel()
        objective = f"{pair.permutation.objective:.1f}" if method else ""
        rows.append(f"| {label} | {', '.join(f'{v:.3f}' for v in loss)} | {loss[1] - (loss[0] + loss[2]) / 2:.3f} | "
                    f"{acc[1]:.3f} | {objective} |")
    text = "# Flattened feature maps: aligned barriers\n\n" + "\n".join(rows) + "\n"
    (Path(__file__).parent / "flattened_maps.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
