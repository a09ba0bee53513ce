"""Padding of a map's spatial axes as a layer of its own: torch's ``F.pad`` (with widths computed from
sizes, as milesial's U-Net pads to the skip's size), ``nn.ZeroPad2d`` and ``nn.ReflectionPad2d``
(CycleGAN's generator), and flax's ``jnp.pad``.

References: numpy's ``np.pad`` through layer tables on both backends, the user's own module, and
permutations planted by hand that weight matching must undo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import flax_planted_permutation, table_logits
from tests.reference_nets import conv2d_general, relu

TABLE = LayerTable("padded", (2, 5, 6), 3, (
    Node("c1", "conv", units=4, kernel=3),
    Node("r", "relu"),
    Node("zero", "pad", padding=((0, 1), (2, 1))),
    Node("mirror", "pad", padding=1, padding_mode="reflect"),
    Node("c2", "conv", units=4, kernel=3),
    Node("pool", "avgpool"),
    Node("fc", "dense", units=3),
))


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = relu(conv2d_general(x, p["c1.weight"], p["c1.bias"], (1, 1), ((0, 0), (0, 0)), (1, 1), 1))
    h = np.pad(h, ((0, 0), (0, 0), (0, 1), (2, 1)))
    h = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    h = conv2d_general(h, p["c2.weight"], p["c2.bias"], (1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    return h.mean(axis=(2, 3)) @ p["fc.weight"].T + p["fc.bias"]


def test_pad_nodes_shape_the_map_and_keep_its_channels():
    shapes = TABLE.shapes()
    assert shapes["c1"].spatial == (3, 4) and shapes["zero"].spatial == (4, 7) and shapes["mirror"].spatial == (6, 9)
    spec = TABLE.spec()
    assert {p: set(a) for p, a in spec.perm_to_axes.items()} == {
        "P_c1": {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1)},
        "P_c2": {("c2.weight", 0), ("c2.bias", 0), ("fc.weight", 1)},
    }
    with pytest.raises(ConfigurationError, match=r"a pad node takes padding \(and padding_mode\) only"):
        Node("p", "pad", padding=1, kernel=3)
    with pytest.raises(ConfigurationError, match=r"padding must be an int >= 0"):  # a zero pad's would crop
        Node("p", "pad", padding=((0, -1), (1, 1)), padding_mode="reflect")
    with pytest.raises(ConfigurationError, match=r"a pad node pads the spatial axes of a map"):
        LayerTable("t", (4,), 2, (Node("p", "pad", padding=1), Node("o", "dense", units=2))).shapes()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_pad_as_numpy_does(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.7, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}
    x = rng.normal(size=(3, 2, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


# -- users' torch networks -------------------------------------------------------------------------
torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class UNetUp(nn.Module):
    """milesial/Pytorch-UNet's ``Up``: the upsampled map padded to the skip's size, then concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.inc = nn.Conv2d(2, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x1 = torch.relu(self.inc(x))
        x2 = self.up(torch.relu(self.down(x1)))
        dy, dx = x1.size()[2] - x2.size()[2], x1.size()[3] - x2.size()[3]
        x2 = F.pad(x2, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.out(torch.cat([x1, x2], dim=1))


class Generator(nn.Module):
    """CycleGAN's generator style: reflection padding before unpadded convs, a zero-padded residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(2, 5, 5), nn.ReLU())
        self.block = nn.Sequential(nn.ZeroPad2d((1, 1, 1, 1)), nn.Conv2d(5, 5, 3), nn.ReLU(),
                                   nn.ReplicationPad2d(1), nn.Conv2d(5, 5, 3))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.head((h + self.block(h)).mean((2, 3)))


def _planted(model: nn.Module, perms: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with the output channels of the named convs moved by ``perms`` and their readers' inputs."""
    import copy

    moved = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (perm, readers) in perms.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = state[f"{name}.weight"][perm], state[f"{name}.bias"][perm]
        for reader, offset, axis in readers:
            w = state[f"{reader}.weight"]
            index = torch.arange(w.shape[axis])
            index[offset:offset + len(perm)] = perm + offset
            state[f"{reader}.weight"] = w.index_select(axis, index)
    moved.load_state_dict(state)
    return moved.eval()


def test_a_unet_padding_to_the_skip_is_traced_and_a_planted_permutation_undone():
    torch.manual_seed(0)
    a = UNetUp().eval()
    x = torch.randn(3, 2, 9, 11)  # odd sizes: the upsampled map is smaller and padded
    table = cb.derive.describe(a, x)
    pads = [n for n in table.nodes if n.op == "pad"]
    assert len(pads) == 1 and pads[0].paddings(2) == ((0, 1), (0, 1))
    up_out = torch.randperm(4)
    b = _planted(a, {"inc": (torch.randperm(4), [("down", 0, 1), ("out", 0, 1)]),
                     "down": (torch.randperm(6), [("up", 0, 0)])})
    b.up.weight.data, b.up.bias.data = b.up.weight.data[:, up_out], b.up.bias.data[up_out]
    index = torch.cat([torch.arange(4), up_out + 4])
    b.out.weight.data = b.out.weight.data[:, index]
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


def test_reflection_zero_and_replication_paddings_are_traced_and_a_planted_permutation_undone():
    torch.manual_seed(1)
    a = Generator().eval()
    x = torch.randn(3, 2, 7, 7)
    table = cb.derive.describe(a, x)
    assert [n.padding_mode for n in table.nodes if n.op == "pad"] == ["reflect", "zeros", "replicate"]
    stream, inner = torch.randperm(5), torch.randperm(5)  # the residual stream's channels, the block's inner ones
    b = Generator().eval()
    with torch.no_grad():
        b.stem[1].weight.copy_(a.stem[1].weight[stream]), b.stem[1].bias.copy_(a.stem[1].bias[stream])
        b.block[1].weight.copy_(a.block[1].weight[inner][:, stream]), b.block[1].bias.copy_(a.block[1].bias[inner])
        b.block[4].weight.copy_(a.block[4].weight[stream][:, inner]), b.block[4].bias.copy_(a.block[4].bias[stream])
        b.head.weight.copy_(a.head.weight[:, stream]), b.head.bias.copy_(a.head.bias)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


class ChannelPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.pad(self.c(x), (0, 0, 0, 0, 1, 1)).mean((2, 3)))


def test_zero_channels_padded_around_a_map_get_permutations_of_their_own():
    spec = cb.derive_spec(ChannelPad(), torch.randn(2, 2, 6, 6))
    assert spec.axes_to_perm["fc.weight"] == (None, ("P_pad.before", "P_c", "P_pad.after"))


def test_padding_by_a_value_is_refused_naming_the_operation():
    class ValuePad(ChannelPad):
        def forward(self, x):
            return self.fc(F.pad(self.c(x), (1, 1), value=2.0).mean((2, 3)).repeat(1, 2)[:, :6])

    with pytest.raises(TracingError, match=r"padding with mode 'zeros' and value 2.0"):
        cb.derive_spec(ValuePad(), torch.randn(2, 2, 6, 6))


# -- a user's flax network -------------------------------------------------------------------------
def test_flax_zero_padding_is_traced_and_a_planted_permutation_undone():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    linen = pytest.importorskip("flax.linen")

    class Padded(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.relu(linen.Conv(5, (3, 3), padding="VALID")(x))
            h = jnp.pad(h, ((0, 0), (1, 2), (1, 0), (0, 0)))
            h = linen.Conv(5, (3, 3), padding="VALID")(h)
            return linen.Dense(3)(h.mean(axis=(1, 2)))

    net = Padded()
    x = np.random.default_rng(0).normal(size=(4, 7, 7, 2)).astype(np.float32)
    variables = net.init(jax.random.PRNGKey(0), x)
    table = cb.derive.describe((net, variables), x)
    assert [n.paddings(2) for n in table.nodes if n.op == "pad"] == [((1, 2), (1, 0))]
    flax_planted_permutation(net, variables, x)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow's "same" padding worked out from the input's size, then ``F.conv2d``."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    """An EfficientNet-style stem and depthwise block on ``Conv2dSame`` (odd padding at stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = Conv2dSame(2, 6, 3, stride=2), nn.BatchNorm2d(6)
        self.dw = Conv2dSame(6, 6, 3, groups=6, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x, targets=None):  # a training script's signature: the loss when targets are given
        h = F.silu(self.bn(self.stem(x)))
        logits = self.fc(F.silu(self.dw(h)).mean((2, 3)))
        return logits if targets is None else (logits, F.cross_entropy(logits, targets))


def test_tensorflow_same_padding_and_layers_as_functions_of_their_weights_are_traced():
    torch.manual_seed(2)
    a = SameNet().eval()
    x = torch.randn(3, 2, 8, 8)
    table = cb.derive.describe(a, x)
    assert [n.paddings(2) for n in table.nodes if n.op == "pad"] == [((0, 1), (0, 1)), ((1, 1), (1, 1))]
    assert [(n.name, n.op) for n in table.nodes if n.op == "conv"] == [("stem", "conv"), ("dw", "conv")]
    perm = torch.randperm(6)
    b = SameNet().eval()
    with torch.no_grad():
        b.stem.weight.copy_(a.stem.weight[perm]), b.stem.bias.copy_(a.stem.bias[perm])
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            getattr(b.bn, leaf).copy_(getattr(a.bn, leaf)[perm])
        b.dw.weight.copy_(a.dw.weight[perm])
        b.fc.weight.copy_(a.fc.weight[:, perm]), b.fc.bias.copy_(a.fc.bias)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
