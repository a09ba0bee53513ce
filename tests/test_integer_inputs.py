"""Integer inputs reach a model as they are (token ids); a model that reads floats (images, features) fails
on them with the framework's own error, which the library names: a DatasetError that says the inputs are
integers and how to give floats."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import DatasetError

torch = pytest.importorskip("torch")
nn = torch.nn


def _pair():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
            for _ in range(2)]
    return cb.ModelPair(*nets, example_input=torch.randn(4, 1, 4, 4))


def test_integer_images_are_named_in_a_sweep_and_in_activation_matching():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 17, size=(8, 1, 4, 4)), rng.integers(0, 3, size=8)
    with pytest.raises(DatasetError, match=r"integers \(int64\).*x\.astype\(np\.float32\)"):
        cb.sweep(_pair(), cb.Linear(), data=(x, y), values=[0.5], splits=["test"])
    with pytest.raises(DatasetError, match=r"integers \(int64\)"):
        _pair().align("activation", data=(x, y))
    ds = cb.sweep(_pair(), cb.Linear(), data=(x.astype(np.float32), y), values=[0.5], splits=["test"])
    assert np.isfinite(float(ds["loss"].squeeze()))
