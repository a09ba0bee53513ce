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


def test_entry_point_registers_every_kind():
    assert "tiny_mlp" in cb.list_architectures()
    from combinability.plugins import list_aligners, list_metrics, list_repairs

    assert "shuffle" in list_aligners() and "shrink" in list_repairs() and "margin" in list_metrics()


def test_conformance_and_a_real_sweep_with_every_kind():
    check_architecture("tiny_mlp", "torch", width=1, num_classes=10, input_shape=(1, 8, 8))
    a = cb.train("tiny_mlp", "digits", seed=0, epochs=2)
    b = cb.train("tiny_mlp", "digits", seed=1, epochs=2)
    pair = cb.ModelPair(a, b).align("weight")
    assert set(pair.permutation) == {"P_fc1", "P_fc2"}
    ds = cb.sweep(pair, cb.Linear(), data="digits", values=[0.0, 0.5, 1.0], splits=["test"], metrics=["margin"])
    assert np.all(ds["loss"].values[0, 0] == float(ds["loss_a"].sel(split="test")))
    # the margin metric, checked against numpy on model A's logits
    from tests.reference_nets import relu

    test = cb.load_dataset("digits", "test")
    p = pair.params("a")
    z = relu(relu(test.x.reshape(len(test.x), -1) @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T
             + p["fc2.bias"]) @ p["out.weight"].T + p["out.bias"]
    true = z[np.arange(len(z)), test.y]
    z[np.arange(len(z)), test.y] = -np.inf
    assert float(ds["margin"].values[0, 0, 0]) == pytest.approx(np.mean(true - z.max(axis=1)), rel=1e-4)
    # the repair moves the midpoint 1 % towards A: its loss is that of θ = A + 0.505 (B - A)
    repaired = cb.sweep(pair, cb.Linear(), data="digits", values=[0.5], splits=["test"], repair="shrink")
    manual = cb.sweep(pair, cb.Linear(), data="digits", values=[0.495], splits=["test"])
    assert float(repaired["loss"].values.ravel()[0]) == pytest.approx(float(manual["loss"].values.ravel()[0]),
                                                                      rel=1e-5)
    # the aligner: a random permutation keeps B's function, and is worse than weight matching
    shuffled = cb.ModelPair(a, b).align("shuffle", seed=3)
    ends = cb.sweep(shuffled, cb.Linear(), data="digits", values=[1.0, 0.5], splits=["test"])
    assert float(ends["loss"].values[0, 0, 0]) == pytest.approx(float(ds["loss_b"].sel(split="test")), rel=1e-5)
    assert float(ends["loss"].values[0, 1, 0]) > float(ds["loss"].values[0, 1, 0])
