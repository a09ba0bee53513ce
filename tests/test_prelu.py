"""PReLU with one learned slope per channel (which moves with its channel) or one for all.

References: a plain numpy forward pass of the layer table on both backends, the spec checked as
a symmetry of that numpy network, and a permutation planted by hand (plain torch indexing) in a
user's torch model, which weight matching must undo exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.layers import LayerTable, Node
from tests.model_checks import randomised, table_logits
from tests.reference_nets import conv2d

TABLE = LayerTable("prelu_net", (2, 5, 5), 3, (
    Node("conv", "conv", units=4, kernel=3, padding=1), Node("act1", "prelu", units=4),
    Node("pool", "avgpool"),
    Node("fc", "dense", units=6), Node("act2", "prelu", units=1),
    Node("out", "dense", units=3),
))


def _prelu(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    slope = a.reshape((1, -1) + (1,) * (x.ndim - 2)) if a.size > 1 else a
    return np.where(x >= 0, x, slope * x)


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = _prelu(conv2d(x, p["conv.weight"], p["conv.bias"]), p["act1.weight"]).mean(axis=(2, 3))
    h = _prelu(h @ p["fc.weight"].T + p["fc.bias"], p["act2.weight"])
    return h @ p["out.weight"].T + p["out.bias"]


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_match_the_numpy_reference(backend):
    pytest.importorskip(backend)
    params = _params()
    x = np.random.default_rng(1).normal(size=(7, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-5)


def test_per_channel_slopes_move_with_their_channels_and_a_shared_one_stays():
    spec = TABLE.spec()
    assert spec.axes_to_perm["act1.weight"] == ("P_conv",) and spec.axes_to_perm["act2.weight"] == (None,)
    params = {k: v.astype(np.float64) for k, v in _params(2).items()}
    x = np.random.default_rng(3).normal(size=(4, 2, 5, 5))
    permuted = cb.apply_permutation(spec, cb.random_permutation(spec, params, seed=5), params)
    assert not np.array_equal(permuted["act1.weight"], params["act1.weight"])
    np.testing.assert_allclose(_reference(permuted, x), _reference(params, x), rtol=1e-10, atol=1e-10)


def test_a_prelu_with_neither_one_slope_nor_one_per_channel_is_refused():
    nodes = (Node("fc", "dense", units=4), Node("act", "prelu", units=3), Node("out", "dense", units=2))
    with pytest.raises(ConfigurationError, match="units 1 or 4, got 3"):
        LayerTable("bad", (5,), 2, nodes).parameters()


def test_a_users_prelu_net_is_traced_and_a_planted_permutation_is_undone():
    def net():
        return nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Linear(6, 6), nn.PReLU(), nn.Linear(6, 3))

    a = randomised(net(), 0)
    rows, hidden = torch.tensor([4, 2, 0, 5, 1, 3]), torch.tensor([1, 0, 3, 2, 5, 4])
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[rows]), b[0].bias.copy_(a[0].bias[rows]), b[1].weight.copy_(a[1].weight[rows])
        b[2].weight.copy_(a[2].weight[hidden][:, rows]), b[2].bias.copy_(a[2].bias[hidden])
        b[4].weight.copy_(a[4].weight[:, hidden])
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), rtol=1e-5, atol=1e-6)
    spec = cb.derive_spec(a, x)
    assert spec.axes_to_perm["1.weight"] == ("P_0",) and spec.axes_to_perm["3.weight"] == (None,)
    aligned = cb.ModelPair(a, b, example_input=x).align("weight")
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-7)
