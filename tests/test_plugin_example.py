"""The third-party plugin in docs/examples, installed into the test environment, works like a built-in."""

import importlib.metadata

import numpy as np
import pytest

import combinability as cb
from combinability.testing import check_architecture


def _installed() -> bool:
    return any(ep.value == "combinability_example_plugin.plugin"
               for ep in importlib.metadata.entry_points(group="combinability.plugins"))


pytestmark = pytest.mark.skipif(not _installed(), reason="docs/examples/combinability_example_plugin not installed "
                                                         "(make test installs it)")


def test_entry_point_registers_the_architecture():
    assert "tiny_mlp" in cb.list_architectures()
    arch = cb.get_architecture("tiny_mlp")
    assert arch.backends == ("torch",)


def test_conformance_and_a_real_sweep():
    arch = cb.get_architecture("tiny_mlp")
    check_architecture(arch, "torch", width=1, num_classes=10, input_shape=(1, 8, 8))
    a = cb.train("tiny_mlp", "digits", seed=0, epochs=2)
    b = cb.train("tiny_mlp", "digits", seed=1, epochs=2)
    pair = cb.ModelPair(a, b).align("weight")
    assert set(pair.permutation) == {"H1", "H2"}
    ds = cb.sweep(pair, cb.Linear(), data="digits", values=[0.0, 1.0], splits=["test"])
    assert np.all(ds["loss"].values[0, 0] == float(ds["loss_a"].sel(split="test")))
