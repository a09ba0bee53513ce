"""CIFAR ResNets with the option-A shortcut (He et al., 2016; akamaster/pytorch_resnet_cifar10): where a
stage halves the map and widens the stream, the shortcut takes every other position, ``x[:, :, ::2, ::2]``,
and puts zero channels around the stream's, ``F.pad(x, (0, 0, 0, 0, p, p))``. The wider stream is then the
narrower one with zero channels on each side: its permutation moves the narrower stream's channels as the
narrower one's does, and the channels of each zero block among themselves.

References: a plain numpy forward pass of a layer table with both steps, the spec written by hand, and
the user's module run in float64 with a random transformation of the derived spec (it must keep the
outputs), which weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import assert_random_transformation_undone, randomise_batchnorms, randomised, table_logits
from tests.reference_nets import conv2d_general

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

TABLE = LayerTable("option-a", (2, 6, 6), 3, (
    Node("stem", "conv", units=4, kernel=3, padding=1), Node("r0", "relu"),
    Node("c1", "conv", units=8, kernel=3, stride=2, padding=1), Node("r1", "relu"),
    Node("c2", "conv", units=8, kernel=3, padding=1),
    Node("every_other", "maxpool", inputs=("r0",), kernel=1, stride=2),
    Node("zeros", "pad", channel_padding=(2, 2)),
    Node("add", "add", inputs=("c2", "zeros")), Node("r2", "relu"),
    Node("pool", "avgpool"), Node("fc", "dense", units=3)))


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """A 3 x 3 convolution with padding 1, channels-first (the tests' numpy reference)."""
    return conv2d_general(x, w, b, (stride, stride), ((1, 1), (1, 1)), (1, 1), 1)


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    r0 = np.maximum(_conv(x, p["stem.weight"], p["stem.bias"], 1), 0)
    c2 = _conv(np.maximum(_conv(r0, p["c1.weight"], p["c1.bias"], 2), 0), p["c2.weight"], p["c2.bias"], 1)
    shortcut = np.pad(r0[:, :, ::2, ::2], ((0, 0), (2, 2), (0, 0), (0, 0)))
    return np.maximum(c2 + shortcut, 0).mean((2, 3)) @ p["fc.weight"].T + p["fc.bias"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_shortcuts_steps_match_numpy_on_both_backends(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}
    x = rng.normal(size=(3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_the_wider_stream_is_the_narrower_one_between_two_zero_blocks():
    stream = ("P_zeros.before", "P_stem", "P_zeros.after")
    assert TABLE.spec().axes_to_perm == {
        "stem.weight": ("P_stem", None, None, None), "stem.bias": ("P_stem",),
        "c1.weight": ("P_c1", "P_stem", None, None), "c1.bias": ("P_c1",),
        "c2.weight": (stream, "P_c1", None, None), "c2.bias": (stream,),
        "fc.weight": (None, stream), "fc.bias": (None,)}


def test_channel_padding_belongs_to_zero_pad_nodes():
    with pytest.raises(ConfigurationError, match=r"channel_padding is a zero pad node's \(before, after\) channels"):
        Node("c", "conv", units=2, channel_padding=(1, 1))
    with pytest.raises(ConfigurationError, match=r"channel_padding is a zero pad node's"):
        Node("p", "pad", padding_mode="reflect", channel_padding=(1, 1))


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):
    """akamaster's block, option A."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4),
                                                        "constant", 0))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2))
        self.linear = nn.Linear(4 * width, 5)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def test_akamasters_cifar_resnet_is_traced_and_a_transformation_of_its_streams_undone():
    model = randomise_batchnorms(randomised(CifarResNet(), 0))
    x = torch.randn(3, 3, 12, 12)
    table = cb.derive.describe(model, x)
    spec = table.spec()
    assert spec.axes_to_perm["linear.weight"][1] == ("P_pad_1.before", "P_pad.before", "P_conv1", "P_pad.after",
                                                      "P_pad_1.after")
    state = {k: v.double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    assert_random_transformation_undone(model, spec, state, x, "layer3.0.conv2.weight")


class OffsetSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c(x))[:, :, 1::2, 1::2].mean((2, 3)))


def test_a_subsampling_from_another_position_is_refused_by_name():
    with pytest.raises(TracingError, match=r"node 'getitem'"):
        cb.derive.describe(OffsetSlice(), torch.randn(2, 1, 6, 6))


def test_activation_matching_reads_each_piece_of_a_stream_at_its_channels():
    assert TABLE.activation_parts() == {"P_zeros.before": ("r2", 0, 2), "P_zeros.after": ("r2", 6, 8)}
    a = randomise_batchnorms(randomised(CifarResNet(), 0))
    x = torch.randn(48, 3, 12, 12)
    spec = cb.derive_spec(a, x[:4])
    state = {k: v.numpy() for k, v in a.state_dict().items()}
    perm = cb.random_permutation(spec, {k: v for k, v in state.items() if v.dtype.kind == "f"}, seed=5)
    assert any(not np.array_equal(perm[p], np.arange(len(perm[p]))) for p in ("P_pad.before", "P_pad_1.after"))
    b = CifarResNet().eval()
    b.load_state_dict({k: torch.as_tensor(v) for k, v in {**state, **cb.apply_permutation(spec, perm, state)}.items()})
    y = np.zeros(len(x), np.int64)
    aligned = cb.ModelPair(a, b, example_input=x[:4]).align("activation", data=(x.numpy(), y))
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def test_a_cut_stream_flattened_into_a_dense_layer_is_held_in_place():
    table = LayerTable("flattened", (3, 4, 4), 5, (
        Node("stem", "conv", units=4, kernel=3, padding=1), Node("r0", "relu"),
        Node("c1", "conv", units=8, kernel=3, padding=1), Node("r1", "relu"),
        Node("c2", "conv", units=8, kernel=3, padding=1),
        Node("zeros", "pad", inputs=("r0",), channel_padding=(2, 2)),
        Node("add", "add", inputs=("c2", "zeros")), Node("r2", "relu"),
        Node("flat", "flatten"), Node("fc", "dense", units=5)))
    spec = table.spec()
    assert spec.axes_to_perm["fc.weight"] == (None, None) and spec.axes_to_perm["c2.weight"][0] is None
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in table.parameters().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, params, seed=1), params)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(table_logits("torch", table, moved, x), table_logits("torch", table, params, x),
                               rtol=1e-5, atol=1e-5)


def test_a_flax_option_a_block_is_traced_and_a_planted_permutation_undone():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax.numpy as jnp

    from tests.model_checks import flax_planted_permutation, flax_variables

    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # NHWC: the stream of 4 channels widened to 8 at stride 2
            h = fnn.Conv(8, (3, 3), strides=2)(fnn.relu(x))
            h = fnn.Conv(8, (3, 3))(fnn.relu(h))
            return h + jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = Block()(fnn.Conv(4, (3, 3))(x))
            return fnn.Dense(3)(jnp.mean(fnn.relu(x), axis=(1, 2)))

    net = Net()
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype(np.float32)
    variables = flax_variables(net, x, seed=0)
    table = cb.derive.describe((net, variables), x)
    assert [(n.op, n.stride, n.channel_padding) for n in table.nodes if n.op in ("maxpool", "pad")] == \
        [("maxpool", 2, (0, 0)), ("pad", 1, (2, 2))]
    assert table.spec().axes_to_perm["Dense_0.weight"][1] == ("P_Block_0.pad.before", "P_Conv_0",
                                                              "P_Block_0.pad.after")
    flax_planted_permutation(net, variables, x)
