"""ConvNeXt networks: aligned barriers now that their channels-last blocks and layer scales are traced.

Usage: ``python benchmarks/measurements/convnext.py`` from the repository root. Two copies of
torchvision's ConvNeXt layout at toy size (``tests/test_convnext.py``: a 4 x 4 patchify stem and
LayerNorm2d, two stages of two blocks — depthwise 7 x 7 conv, LayerNorm and two linear layers on
the channels-last map, layer scale, residual — a LayerNorm2d and 2 x 2 conv between the stages,
pooling, LayerNorm2d and a linear head), widths (32, 64), seeds 0 and 1, trained with Adam (lr 1e-3,
batches of 128) for 3 epochs on the first 20,000 Fashion-MNIST training images. Then weight
matching and activation matching (on 2,000 training images), and the linear path at 0, 0.5, 1 on
the first 5,000 test images. Writes ``convnext.md`` beside this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common as c
import numpy as np
import torch

import combinability as cb
from combinability.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the tests' ConvNeXt

from tests.test_convnext import ConvNeXt  # noqa: E402


def trained(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)  # the initial weights
    return c.fit_adam(ConvNeXt(dims=(32, 64)), x, y, epochs, name=f"convnext_32_64_{seed}_{epochs}")


def main() -> None:
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    x = torch.tensor(np.asarray(train.x[:20000], np.float32)).reshape(-1, 1, 28, 28)
    y = torch.tensor(np.asarray(train.y[:20000])).long()
    x_test, y_test = np.asarray(test.x[:5000], np.float32).reshape(-1, 1, 28, 28), np.asarray(test.y[:5000])
    c.log("training two ConvNeXts")
    models = [trained(seed, x, y) for seed in (0, 1)]
    pair = cb.ModelPair(*models, example_input=x_test[:8])
    rows = c.barrier_rows(pair, (x[:2000].numpy(), y[:2000].numpy()), (x_test, y_test),
                          (("naive", None, None), ("weight matching", "weight", None),
                           ("activation matching", "activation", None)))
    c.write_table("convnext.md", "# ConvNeXt networks: aligned barriers\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
