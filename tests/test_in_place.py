"""Models that overwrite tensors in place, as torchvision writes them: ``nn.ReLU(inplace=True)`` after a
BatchNorm, ``out += identity`` in a residual block. The features the library reads at a node (REPAIR's
statistics, LLFC, activation matching) must be that node's output, not what a later in-place operation
made of it.

References: the BatchNorm's output computed by plain torch calls of the model's own submodules, and the
ends of a REPAIR sweep, which give back A and B (their losses computed by torch).
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from tests.model_checks import randomise_batchnorms, randomised, tapped_features

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Block(nn.Module):
    """torchvision's BasicBlock, small."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                                  nn.ReLU(inplace=True))
        self.block = Block(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))


def _net(seed: int) -> Net:
    return randomise_batchnorms(randomised(Net(), seed))


def _as_read(h: torch.Tensor) -> np.ndarray:
    """A map ``(n, c, h, w)`` as the library reads features: ``(n x positions, c)``."""
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).numpy()


def test_a_batchnorms_output_is_read_before_the_in_place_relu_overwrites_it():
    model, other = _net(0), _net(1)
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        stem_bn = model.stem[1](model.stem[0](x))
        block_in = F.relu(stem_bn)
        bn2 = model.block.bn2(model.block.conv2(F.relu(model.block.bn1(model.block.conv1(block_in)))))
    assert (stem_bn < 0).any() and (bn2 < 0).any()  # the ReLUs after them change them
    np.testing.assert_allclose(tapped_features(model, other, x, "stem.1"), _as_read(stem_bn), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tapped_features(model, other, x, "block.bn2"), _as_read(bn2), rtol=1e-5, atol=1e-5)


def test_repair_gives_back_both_ends_of_models_written_in_place():
    a, b = _net(0), _net(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, 5, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    data = (x.numpy(), y.numpy())
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=data, values=[0.0, 1.0], splits=["test"], repair="repair",
                  repair_data=data)
    with torch.no_grad():
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.cross_entropy(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-4)


class Functional(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        if self.how == "keyword":
            h = F.relu(h, inplace=True)
        elif self.how == "positional":
            h = F.relu(h, True)
        elif self.how == "method":
            h = h.relu_()
        elif self.how == "augmented":
            h += 1.0
        else:
            h = F.relu(h)
        return self.fc2(h)


@pytest.mark.parametrize("how, writes", [("keyword", True), ("positional", True), ("method", True),
                                         ("augmented", False), ("plain", False)])
def test_every_way_of_writing_in_place_is_seen(how, writes):
    """(torch.fx records ``h += 1.0`` as ``operator.add``: the traced module makes a new tensor there.)"""
    from combinability_torch.trace import trace, writes_in_place

    assert writes_in_place(trace(Functional(how))) is writes
    assert writes_in_place(trace(Net())) is True
