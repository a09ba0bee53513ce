"""U-Nets: aligned barriers now that transposed convolutions and upsampling are traced.

Usage: ``python benchmarks/measurements/unet.py`` from the repository root. Two copies of the
U-Net classifier of ``tests/test_unet.py`` (two encoder stages of 3 x 3 conv, BatchNorm and ReLU
with max pooling, a middle conv, a 2 x 2 stride-2 transposed conv and a bilinear upsampling, each
decoder stage joined to its encoder stage by a skip concatenation, global pooling and a linear
head) at channels (16, 32, 64), seeds 0 and 1, trained with Adam (lr 1e-3, batches of 128) for 3
epochs on the first 20,000 Fashion-MNIST training images. Then weight matching and activation
matching (on 2,000 training images), and the linear path at 0, 0.5, 1 on the first 5,000 test
images, BatchNorm statistics as interpolated, then reset on those 2,000 training images (``repair="reset"``).
Writes ``unet.md`` beside this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common as c
import numpy as np
import torch

import combinability as cb
from combinability.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the tests' U-Net

from tests.test_unet import UNet  # noqa: E402

CHANNELS = (16, 32, 64)


def trained(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)  # the initial weights
    name = f"unet_{'_'.join(map(str, CHANNELS))}_{seed}_{epochs}"
    return c.fit_adam(UNet(CHANNELS, classes=10), x, y, epochs, name=name)


def main() -> None:
    c.single_thread()
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    x = torch.tensor(np.asarray(train.x[:20000], np.float32)).reshape(-1, 1, 28, 28)
    y = torch.tensor(np.asarray(train.y[:20000])).long()
    x_test, y_test = np.asarray(test.x[:5000], np.float32).reshape(-1, 1, 28, 28), np.asarray(test.y[:5000])
    c.log("training two U-Nets")
    models = [trained(seed, x, y) for seed in (0, 1)]
    pair = cb.ModelPair(*models, example_input=x_test[:8])
    fit = (x[:2000].numpy(), y[:2000].numpy())
    reset = ("reset", cb.ArrayDataset(x=fit[0], y=fit[1], num_classes=10, name="fashion_mnist_train_2000",
                                      split="train"))
    rows = c.barrier_rows(pair, fit, (x_test, y_test), (
        ("naive", None, None), ("weight matching", "weight", None), ("activation matching", "activation", None),
        ("naive, BatchNorm statistics reset", None, reset),
        ("weight matching, BatchNorm statistics reset", "weight", reset),
        ("activation matching, BatchNorm statistics reset", "activation", reset)))
    c.write_table("unet.md", "# U-Nets: aligned barriers\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
