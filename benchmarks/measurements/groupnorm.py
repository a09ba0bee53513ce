"""GroupNorm networks: the aligned barrier now that a GroupNorm's channels move as blocks
(:class:`combinability.kinds.Blocks`: groups whole, channels within their group), against the spec
that left every GroupNorm space in place (before).

Usage: ``python benchmarks/measurements/groupnorm.py``. Two copies of the PyTorch MNIST example CNN
with a GroupNorm after each conv (conv 32 → GN(G) → ReLU → conv 64 → GN(G) → ReLU → max pool →
``torch.flatten`` → dense 128 → dense 10), seeds 0 and 1, trained with Adam (lr 1e-3, batches of
128) for 2 epochs on the first 20,000 Fashion-MNIST training images; then weight matching and
activation matching (on 2,000 training images), and the linear path at 0, 0.5, 1 on the first 5,000
test images. Run for G = 8 (groups of 4 and 8 channels: block permutations) and, as a control, G = 1
(one group: every permutation of the channels keeps the function). Writes ``groupnorm.md`` beside
this file.
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


class GroupNormMnistNet(nn.Module):
    """The PyTorch MNIST example CNN with a GroupNorm after each conv."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(1, 32, 3, 1), nn.GroupNorm(groups, 32)
        self.conv2, self.gn2 = nn.Conv2d(32, 64, 3, 1), nn.GroupNorm(groups, 64)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))))
        return self.fc2(F.relu(self.fc1(torch.flatten(F.max_pool2d(x, 2), 1))))


def trained(seed: int, x: torch.Tensor, y: torch.Tensor, groups: int, epochs: int = 2) -> nn.Module:
    torch.manual_seed(seed)  # the initial weights
    return c.fit_adam(GroupNormMnistNet(groups), x, y, epochs, name=f"groupnorm_{groups}_{seed}_{epochs}")


def table(groups: int, x: torch.Tensor, y: torch.Tensor, x_test: np.ndarray, y_test: np.ndarray) -> list[str]:
    models = [trained(seed, x, y, groups) for seed in (0, 1)]
    spec = cb.ModelPair(*models, example_input=x_test[:8]).spec
    before = cb.PermutationSpec({k: tuple(None if (e.name if isinstance(e, Repeat) else e) in spec.kinds else e
                                          for e in v) for k, v in spec.axes_to_perm.items()})
    kinds = ", ".join(f"`{p}`: {k.blocks} groups of {k.size}" for p, k in spec.kinds.items()) or "none"
    rows = [f"## GroupNorm({groups}, ·)", "", f"Block permutations of the spec: {kinds}.", "",
            "| alignment | loss at 0, 0.5, 1 | loss barrier | accuracy at 0, 0.5, 1 | objective |",
            "|---|---|---:|---|---:|"]
    fit = (x[:2000].numpy(), y[:2000].numpy())
    runs = [("naive", spec, None)]
    if spec.kinds:
        runs.append(("weight matching, GroupNorm spaces fixed (before)", before, "weight"))
    runs += [("weight matching", spec, "weight"), ("activation matching", spec, "activation")]
    for label, s, method in runs:
        p = cb.ModelPair(*models, spec=s, example_input=x_test[:8])
        p = p.align(method, **({"data": fit} if method == "activation" else {})) if method else p
        ds = cb.sweep(p, cb.Linear(), data=(x_test, y_test), values=[0.0, 0.5, 1.0], splits=["test"])
        loss = ds["loss"].sel(split="test").values.ravel()
        acc = ds["accuracy"].sel(split="test").values.ravel()
        objective = f"{p.permutation.objective:.4g}" if method else ""
        rows.append(f"| {label} | {', '.join(f'{v:.3f}' for v in loss)} | {loss[1] - (loss[0] + loss[2]) / 2:.3f} | "
                    f"{', '.join(f'{v:.3f}' for v in acc)} | {objective} |")
    return rows + [""]


def main() -> None:
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    x = torch.tensor(np.asarray(train.x[:20000], np.float32)).reshape(-1, 1, 28, 28)
    y = torch.tensor(np.asarray(train.y[:20000])).long()
    x_test, y_test = np.asarray(test.x[:5000], np.float32).reshape(-1, 1, 28, 28), np.asarray(test.y[:5000])
    rows = [row for groups in (8, 1) for row in table(groups, x, y, x_test, y_test)]
    text = "# GroupNorm networks: aligned barriers\n\n" + "\n".join(rows)
    (Path(__file__).parent / "groupnorm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
