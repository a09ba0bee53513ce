"""Convolutions on sequences (and volumes): ``Conv1d`` / ``Conv3d`` networks, their layer tables,
derived specs, matching and activation statistics.

References: a plain numpy convolution (:func:`tests.reference_nets.conv2d_general` on a
height-1 image) for the tables' forward pass, specs written by hand, permutations planted by
hand (plain torch indexing) that weight and activation matching must undo, and the channel
statistics of the features computed with numpy from the module's own output.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.layers import LayerTable, Node
from combinability.permutation import Repeat
from tests.model_checks import assert_planted_permutation_undone, randomise_batchnorms, table_logits, tapped_features
from tests.reference_nets import conv2d_general, relu

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

# -- a layer table on sequences: the torch model against numpy -------------------------------------
NODES = (
    Node("c1", "conv", units=6, kernel=5, padding=2),
    Node("n1", "norm", norm="batchnorm"),
    Node("a1", "relu"),
    Node("c2", "conv", units=8, kernel=(3,), stride=(2,), padding=((0, 1),), dilation=(1,)),
    Node("a2", "act", fn="tanh"),
    Node("p", "maxpool", kernel=2, stride=2),
    Node("f", "flatten"),
    Node("out", "dense", units=4),
)
TABLE = LayerTable("sequence", (3, 20), 4, NODES)


def _conv1d(x, w, b, stride, padding, dilation=1):
    """A sequence ``(n, c, length)`` as a height-1 image through the numpy convolution."""
    out = conv2d_general(x[:, :, None], w[:, :, None], b, (1, stride), ((0, 0), padding), (1, dilation), 1)
    return out[:, :, 0]


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = _conv1d(x, p["c1.weight"], p["c1.bias"], 1, (2, 2))
    scale = p["n1.weight"] / np.sqrt(p["n1.running_var"] + 1e-5)
    h = relu((h - p["n1.running_mean"][:, None]) * scale[:, None] + p["n1.bias"][:, None])
    h = np.tanh(_conv1d(h, p["c2.weight"], p["c2.bias"], 2, (0, 1)))  # (20 + 1 - 3) // 2 + 1 = 10 positions
    h = h.reshape(h.shape[0], h.shape[1], 5, 2).max(axis=3)
    return h.reshape(h.shape[0], -1) @ p["out.weight"].T + p["out.bias"]


def test_sequence_table_shapes_and_parameters():
    shapes = TABLE.shapes()
    assert shapes["c1"].spatial == (20,) and shapes["c2"].spatial == (10,) and shapes["p"].spatial == (5,)
    assert shapes["f"].channels == 40
    params = TABLE.parameters()
    assert params["c1.weight"][0] == (6, 3, 5) and params["c2.weight"][0] == (8, 6, 3)
    spec = TABLE.spec()
    assert spec.axes_to_perm["c2.weight"] == ("P_c2", "P_c1", None)
    assert spec.axes_to_perm["out.weight"] == (None, Repeat("P_c2", 5))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sequence_table_forward_matches_numpy(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, dtype) in TABLE.parameters().items()
              if dtype == "float32"}
    params["n1.running_var"] = np.abs(params["n1.running_var"]) + 0.5
    x = rng.normal(size=(5, 3, 20)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_geometry_of_the_wrong_rank_is_refused():
    table_nodes = (Node("c", "conv", units=4, kernel=(3, 3)), Node("f", "flatten"), Node("out", "dense", units=2))
    with pytest.raises(ConfigurationError, match="2-axis geometry reads an input with 1 spatial axes"):
        LayerTable("bad", (3, 20), 2, table_nodes)
    with pytest.raises(ConfigurationError, match=r"input_shape must be \(features,\), or channels first"):
        LayerTable("bad", (3, 4, 4, 4, 4), 2, (Node("out", "dense", units=2),))


# -- a user's Conv1d network ----------------------------------------------------------------------
class SequenceNet(nn.Module):
    """A 1-D CNN of the kind used on audio and time series: conv-BN-ReLU blocks, a residual, pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 5, padding=2, bias=False)
        self.bn0 = nn.BatchNorm1d(8)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 8, 3, padding=1)
        self.down = nn.Conv1d(8, 16, 4, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.conv2(F.relu(self.bn1(self.conv1(h)))))
        h = F.max_pool1d(F.relu(self.down(h)), 2)
        return self.fc(self.pool(h).flatten(1))


def _x(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(n, 2, 24)), dtype=torch.float32)


def _randomised(seed: int) -> SequenceNet:
    torch.manual_seed(seed)
    return randomise_batchnorms(SequenceNet())


def _planted(net: SequenceNet, seed: int) -> SequenceNet:
    """``net`` with its hidden channels permuted by hand: the same function, other weights."""
    rng = np.random.default_rng(seed)
    stream, inner, down = (torch.as_tensor(rng.permutation(n)) for n in (8, 12, 16))
    out = SequenceNet().eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for key in ("stem.weight", "conv2.weight", "conv2.bias", *(f"bn0.{leaf}" for leaf in BN)):
        state[key] = state[key][stream]
    for key in ("conv1.weight", "conv1.bias", *(f"bn1.{leaf}" for leaf in BN)):
        state[key] = state[key][inner]
    state["conv1.weight"] = state["conv1.weight"][:, stream]
    state["conv2.weight"] = state["conv2.weight"][:, inner]
    state["down.weight"], state["down.bias"] = state["down.weight"][down][:, stream], state["down.bias"][down]
    state["fc.weight"] = state["fc.weight"][:, down]
    out.load_state_dict(state)
    return out


BN = ("weight", "bias", "running_mean", "running_var")


def test_derived_spec_of_a_sequence_net_is_the_hand_written_one():
    spec = cb.derive_spec(_randomised(0), _x())
    bn = lambda name: {(f"{name}.{leaf}", 0) for leaf in BN}  # noqa: E731
    want = [
        {("stem.weight", 0), *bn("bn0"), ("conv1.weight", 1), ("conv2.weight", 0), ("conv2.bias", 0),
         ("down.weight", 1)},
        {("conv1.weight", 0), ("conv1.bias", 0), *bn("bn1"), ("conv2.weight", 1)},
        {("down.weight", 0), ("down.bias", 0), ("fc.weight", 1)},
    ]
    assert sorted(map(sorted, (set(v) for v in spec.perm_to_axes.values()))) == sorted(map(sorted, want))
    assert len(spec.axes_to_perm["conv1.weight"]) == 3


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_hand_planted_permutation_of_a_sequence_net_is_undone(method):
    a = _randomised(0)
    assert_planted_permutation_undone(a, _planted(a, seed=3), _x(), (_x(64, 1).numpy(), np.arange(64) % 5), method)


def test_features_of_a_sequence_are_channels_by_position():
    a, x = _randomised(0), _x(7, 2)
    feats = tapped_features(a, _randomised(1), x, "bn1", batch_size=4)
    with torch.no_grad():
        want = a.bn1(a.conv1(F.relu(a.bn0(a.stem(x))))).numpy()  # (n, c, length)
    assert feats.shape == (7 * 24, 12)
    np.testing.assert_allclose(feats, want.transpose(0, 2, 1).reshape(-1, 12), rtol=1e-5, atol=1e-5)


class M5(nn.Module):
    """An audio classifier in the style of M5 (Dai et al., 2017): a strided first convolution, and a
    global average pool written as ``F.avg_pool1d(x, x.shape[-1])``, the kernel the input's length."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 8, 9, stride=4), nn.BatchNorm1d(8)
        self.conv2, self.bn2 = nn.Conv1d(8, 12, 3), nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.avg_pool1d(x, x.shape[-1]).squeeze(-1))


def test_a_pool_sized_by_a_traced_length_is_read_from_the_example():
    torch.manual_seed(0)
    a = randomise_batchnorms(M5())
    x = torch.randn(4, 2, 80)
    spec = cb.derive_spec(a, x)  # verified: a random permutation of the spec keeps the outputs
    assert spec.axes_to_perm["fc.weight"] == (None, "P_conv2")
    rng = np.random.default_rng(2)
    p1, p2 = torch.as_tensor(rng.permutation(8)), torch.as_tensor(rng.permutation(12))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for key in ("conv1.weight", "conv1.bias", *(f"bn1.{leaf}" for leaf in BN)):
        state[key] = state[key][p1]
    for key in ("conv2.bias", *(f"bn2.{leaf}" for leaf in BN)):
        state[key] = state[key][p2]
    state["conv2.weight"], state["fc.weight"] = state["conv2.weight"][p2][:, p1], state["fc.weight"][:, p2]
    b = M5().eval()
    b.load_state_dict(state)
    assert_planted_permutation_undone(a, b, x, (), "weight")


# -- a user's Conv3d network ----------------------------------------------------------------------
class VolumeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm3d(6)
        self.c2 = nn.Conv3d(6, 4, (1, 3, 3), stride=(1, 2, 2))
        self.fc = nn.Linear(4 * 4 * 2 * 2, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = F.avg_pool3d(F.relu(self.c2(h)), 1)
        return self.fc(torch.flatten(h, 1))


def test_a_volume_net_is_traced_verified_and_its_planted_permutation_undone():
    torch.manual_seed(0)
    a = VolumeNet().eval()
    x = torch.randn(3, 1, 4, 6, 6)
    spec = cb.derive_spec(a, x)  # verified: a random permutation of the spec keeps the outputs
    assert spec.axes_to_perm["c2.weight"] == ("P_c2", "P_c1", None, None, None)
    assert spec.axes_to_perm["fc.weight"] == (None, Repeat("P_c2", 16))
    rng = np.random.default_rng(5)
    p1, p2 = torch.as_tensor(rng.permutation(6)), torch.as_tensor(rng.permutation(4))
    b = VolumeNet().eval()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for key in ("c1.weight", "c1.bias", *(f"bn.{leaf}" for leaf in BN)):
        state[key] = state[key][p1]
    state["c2.weight"], state["c2.bias"] = state["c2.weight"][p2][:, p1], state["c2.bias"][p2]
    state["fc.weight"] = state["fc.weight"].reshape(3, 4, 16)[:, p2].reshape(3, 64)
    b.load_state_dict(state)
    assert_planted_permutation_undone(a, b, x, (), "weight")


# -- flax: a user's nn.Conv on sequences ----------------------------------------------------------
def test_a_flax_sequence_net_is_traced_and_its_planted_permutation_undone():
    pytest.importorskip("flax")
    import flax.linen as fnn

    from tests.model_checks import flax_planted_permutation, flax_variables

    class FlaxSequenceNet(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.relu(fnn.BatchNorm(use_running_average=True)(fnn.Conv(8, (5,), padding="SAME")(x)))
            h = fnn.relu(h + fnn.Conv(8, (3,), padding=1)(fnn.relu(fnn.Conv(12, (3,), padding=1)(h))))
            h = fnn.max_pool(fnn.relu(fnn.Conv(16, (4,), strides=2, padding=1)(h)), (2,), (2,))
            return fnn.Dense(5)(h.reshape(h.shape[0], -1))

    net = FlaxSequenceNet()
    x = np.random.default_rng(0).normal(size=(6, 24, 2)).astype(np.float32)  # channels-last (n, length, c)
    variables = flax_variables(net, x, seed=0)
    table = cb.derive.describe((net, variables), x)
    assert table.input_shape == (2, 24)
    spec = table.spec()
    assert [len(spec.axes_to_perm[f"Conv_{i}.weight"]) for i in range(4)] == [3, 3, 3, 3]
    assert spec.axes_to_perm["Dense_0.weight"] == (None, Repeat("P_Conv_3", 6, True))  # flattened position by position
    flax_planted_permutation(net, variables, x)
