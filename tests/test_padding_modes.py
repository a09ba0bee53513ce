"""Convolutions padded by reflection, replication or wrapping (torch's ``padding_mode``, flax's
``"CIRCULAR"`` and ``"REFLECT"``): layer tables, their forward passes and traced user models.

References: a numpy convolution of the input padded by ``numpy.pad`` in the matching mode
(:func:`tests.reference_nets.conv2d_general`), permutations planted by hand that weight matching
must undo, and each framework's own forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.layers import LayerTable, Node
from tests.model_checks import assert_planted_permutation_undone, table_logits
from tests.reference_nets import conv2d_general, relu

#: torch's padding_mode as numpy.pad's mode
NUMPY_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _table(mode: str) -> LayerTable:
    nodes = (
        Node("c1", "conv", units=5, kernel=3, padding=1, padding_mode=mode),
        Node("a1", "relu"),
        Node("c2", "conv", units=6, kernel=(3, 2), stride=(2, 1), padding=((1, 1), (0, 1)), padding_mode=mode),
        Node("a2", "relu"),
        Node("pool", "avgpool"),
        Node("out", "dense", units=4),
    )
    return LayerTable(f"padded_{mode}", (2, 7, 6), 4, nodes)


def _reference(p: dict[str, np.ndarray], x: np.ndarray, mode: str) -> np.ndarray:
    def conv(h, name, stride, pads):
        h = np.pad(h, ((0, 0), (0, 0), *pads), mode=NUMPY_MODES[mode])  # then unpadded
        return conv2d_general(h, p[f"{name}.weight"], p[f"{name}.bias"], stride, ((0, 0), (0, 0)), (1, 1), 1)

    h = relu(conv(x, "c1", (1, 1), ((1, 1), (1, 1))))
    h = relu(conv(h, "c2", (2, 1), ((1, 1), (0, 1))))
    return h.mean(axis=(2, 3)) @ p["out.weight"].T + p["out.bias"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_table_padded_in_each_mode_computes_the_numpy_convolution(backend, mode):
    pytest.importorskip(backend if backend == "torch" else "flax")
    table = _table(mode)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in table.parameters().items()}
    x = rng.normal(size=(3, 2, 7, 6)).astype(np.float32)
    got = table_logits(backend, table, params, x)  # channels-first for both: the backends' prepared models take it
    np.testing.assert_allclose(got, _reference(params, x.astype(np.float64), mode), rtol=1e-4, atol=1e-4)
    assert table.shapes()["c2"].spatial == (4, 6)  # as zero padding: (7 + 2 - 3) // 2 + 1, 6 + 1 - 2 + 1


def test_a_padding_mode_is_a_conv_or_pad_nodes_and_one_of_the_known():
    with pytest.raises(ConfigurationError, match="padding_mode is a conv or pad node's, one of zeros, reflect"):
        Node("c", "conv", units=2, padding_mode="mirror")
    with pytest.raises(ConfigurationError, match="on a 'dense' node"):
        Node("d", "dense", units=2, padding_mode="reflect")


def test_a_torch_net_padded_by_reflection_is_traced_and_its_planted_permutation_undone():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 6, 3, padding=1, padding_mode="reflect")
            self.bn = nn.BatchNorm2d(6)
            self.c2 = nn.Conv2d(6, 5, 3, padding=1, padding_mode="circular")
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            h = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    a = Net().eval()
    x = torch.randn(4, 1, 8, 8)
    spec = cb.derive_spec(a, x)  # verified: a random permutation of the spec keeps the outputs
    assert spec.axes_to_perm["c2.weight"] == ("P_c2", "P_c1", None, None)
    table = cb.derive.describe(a, x)
    assert [n.padding_mode for n in table.nodes if n.op == "conv"] == ["reflect", "circular"]
    rng = np.random.default_rng(1)
    p1, p2 = (torch.as_tensor(rng.permutation(n)) for n in (6, 5))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for key in ("c1.weight", "c1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        state[key] = state[key][p1]
    state["c2.weight"], state["c2.bias"] = state["c2.weight"][p2][:, p1], state["c2.bias"][p2]
    state["fc.weight"] = state["fc.weight"][:, p2]
    b = Net().eval()
    b.load_state_dict(state)
    assert_planted_permutation_undone(a, b, x, (), "weight")


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT"])
def test_a_flax_net_padded_circularly_or_by_reflection_is_traced_into_its_table(padding):
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax

    from tests.model_checks import flax_planted_permutation

    class FlaxNet(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.relu(fnn.Conv(6, (3, 3), padding=padding)(x))
            h = fnn.relu(fnn.Conv(5, (2, 3), strides=(2, 1), padding=padding)(h))
            return fnn.Dense(3)(h.mean(axis=(1, 2)))

    x = np.random.default_rng(2).normal(size=(4, 8, 7, 1)).astype(np.float32)
    net = FlaxNet()
    variables = net.init(jax.random.PRNGKey(0), x)
    table = cb.derive.describe((net, variables), x)
    convs = [n for n in table.nodes if n.op == "conv"]
    assert [n.padding_mode for n in convs] == [padding.lower()] * 2
    assert convs[1].conv_geometry().padding == ((0, 1), (1, 1))  # flax: (k - 1) // 2 before, k // 2 after
    # the library's own model of the table computes flax's outputs
    from flax import traverse_util as traverse

    state = table.from_flax(traverse.flatten_dict(variables, sep="/"))
    got = table_logits("jax", table, {k: np.asarray(v) for k, v in state.items()}, np.moveaxis(x, -1, 1))
    np.testing.assert_allclose(got, np.asarray(net.apply(variables, x)), rtol=1e-4, atol=1e-5)
    flax_planted_permutation(net, variables, x)
