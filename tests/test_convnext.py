"""ConvNeXt networks: per-position linear layers and LayerNorm on channels-last maps, layer scales.

The model is torchvision's ConvNeXt written out (``LayerNorm2d``, ``Permute``, ``CNBlock``: the
same operations, without torchvision, which this project's tests cannot import). References: a
plain numpy forward pass of a ConvNeXt-style layer table on both backends, permutations planted by
hand (plain torch indexing on the state dict) that weight and activation matching must undo, and
the module's own outputs for the tapped features.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

import combinability as cb
from combinability.errors import TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import assert_planted_permutation_undone, table_logits, tapped_features
from tests.reference_nets import conv2d_general

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class LayerNorm2d(nn.LayerNorm):  # torchvision.models.convnext.LayerNorm2d
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):  # torchvision.ops.misc.Permute
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):  # torchvision's ConvNeXt block
    def __init__(self, dim, layer_scale=1e-6):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        result = self.layer_scale * self.block(x)
        result += x
        return result


class ConvNeXt(nn.Module):
    """torchvision's ``convnext_tiny`` layout at toy size: a 4 x 4 patchify stem, two stages of two
    blocks, a LayerNorm2d and 2 x 2 conv between them, pooling, LayerNorm2d and a linear head."""

    def __init__(self, dims=(8, 16), classes=10):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(1, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, d in enumerate(dims):
            layers.append(nn.Sequential(CNBlock(d), CNBlock(d)))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def _convnext(seed: int) -> ConvNeXt:
    torch.manual_seed(seed)
    net = ConvNeXt().eval()
    with torch.no_grad():  # away from the initial ones and zeros, so that no two units are alike
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(n, 1, 16, 16)), dtype=torch.float32)


def _planted(net: ConvNeXt, seed: int) -> ConvNeXt:
    """``net`` with every hidden space permuted by hand: each stage's residual stream and each block's
    hidden units (4 x dim), through the convolutions, norms, linear layers and layer scales."""
    rng = np.random.default_rng(seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    streams = [torch.as_tensor(rng.permutation(d)) for d in (8, 16)]

    def out_axis(key, p):
        state[key] = state[key][p]

    def in_axis(key, p):
        state[key] = state[key][:, p]

    out_axis("features.0.0.weight", streams[0])
    out_axis("features.0.0.bias", streams[0])
    for leaf in ("weight", "bias"):
        out_axis(f"features.0.1.{leaf}", streams[0])
        out_axis(f"features.2.0.{leaf}", streams[0])
        out_axis(f"classifier.0.{leaf}", streams[1])
    in_axis("features.2.1.weight", streams[0])
    out_axis("features.2.1.weight", streams[1])
    out_axis("features.2.1.bias", streams[1])
    in_axis("classifier.2.weight", streams[1])
    for stage, stream in ((1, streams[0]), (3, streams[1])):
        for block in (0, 1):
            k = f"features.{stage}.{block}"
            hidden = torch.as_tensor(rng.permutation(4 * len(stream)))
            for key in (f"{k}.block.0.weight", f"{k}.block.0.bias", f"{k}.block.2.weight", f"{k}.block.2.bias",
                        f"{k}.block.5.weight", f"{k}.block.5.bias", f"{k}.layer_scale"):
                out_axis(key, stream)
            in_axis(f"{k}.block.3.weight", stream)
            out_axis(f"{k}.block.3.weight", hidden)
            out_axis(f"{k}.block.3.bias", hidden)
            in_axis(f"{k}.block.5.weight", hidden)
    out = ConvNeXt().eval()
    out.load_state_dict(state)
    return out


def test_derived_spec_of_a_convnext_binds_streams_hidden_units_and_layer_scales():
    spec = cb.derive_spec(_convnext(0), _x())  # verified: a transformation moving every unit keeps the outputs
    assert len(spec.perm_to_axes) == 6  # two residual streams, four blocks' hidden units
    stream = spec.axes_to_perm["features.1.0.layer_scale"][0]
    assert spec.axes_to_perm["features.1.0.layer_scale"] == (stream, None, None)
    assert spec.axes_to_perm["features.1.0.block.3.weight"] == ("P_features.1.0.block.3", stream)
    assert spec.axes_to_perm["features.1.0.block.5.weight"] == (stream, "P_features.1.0.block.3")
    assert spec.axes_to_perm["features.0.1.weight"] == (stream,)  # LayerNorm2d: F.layer_norm on channels-last
    assert spec.axes_to_perm["features.1.0.block.0.weight"][:2] == (stream, None)  # depthwise: the stream's own


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_hand_planted_permutation_of_a_convnext_is_undone(method):
    a = _convnext(0)
    assert_planted_permutation_undone(a, _planted(a, seed=3), _x(), (_x(32, 1).numpy(), np.arange(32) % 10), method)


def test_features_on_channels_last_maps_are_channels_by_position():
    a, x = _convnext(0), _x(3, 2)
    feats = tapped_features(a, _convnext(1), x, "features.1.0.block.3")
    with torch.no_grad():
        stem = a.features[0](x)
        want = a.features[1][0].block[:4](stem).numpy()  # (n, h, w, 4 dim): the Linear's own output
    assert feats.shape == (3 * 4 * 4, 32)
    np.testing.assert_allclose(feats, want.reshape(-1, 32), rtol=1e-5, atol=1e-5)


class OtherPermute(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(1, 2, 1), nn.Linear(32, 3)

    def forward(self, x):  # a permute of the input is its layout; of a feature map, only to or from channels-last
        return self.out(self.conv(x).permute(0, 2, 1, 3).flatten(1))


class LinearOnChannelsFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(1, 2, 1), nn.Linear(4, 4), nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.fc(self.conv(x)).flatten(1))


class BufferScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.sub, self.fc = nn.Conv2d(1, 4, 3), nn.Module(), nn.Linear(4, 2)
        self.sub.register_buffer("mask", torch.ones(4, 1, 1))

    def forward(self, x):
        return self.fc((self.conv(x) * self.sub.mask).mean((2, 3)))


def test_what_channels_last_tracing_cannot_express_is_refused_by_name():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(TracingError, match=r"parameter or buffer used directly in forward \(sub.mask\)"):
        cb.derive_spec(BufferScaled(), x)
    with pytest.raises(TracingError, match=r"permute\(0, 2, 1, 3\) on a channels-first map"):
        cb.derive_spec(OtherPermute(), x)
    with pytest.raises(TracingError, match="a Linear on a channels-first map"):
        cb.derive_spec(LinearOnChannelsFirst(), x)


# -- the layer table of a ConvNeXt block: both backends against numpy --------------------------------
TABLE = LayerTable("convnext-block", (3, 8, 8), 4, (
    Node("stem", "conv", units=6, kernel=2, stride=2),
    Node("b.dw", "conv", units=6, kernel=3, padding=1, groups=6),
    Node("b.norm", "norm", norm="layernorm"),
    Node("b.fc1", "dense", units=12), Node("b.act", "act", fn="gelu"), Node("b.fc2", "dense", units=6),
    Node("b", "scale", units=6, leaf="layer_scale", keepdims=True),
    Node("add", "add", inputs=("stem", "b")),
    Node("pool", "avgpool"), Node("head", "dense", units=4)))


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h0 = conv2d_general(x, p["stem.weight"], p["stem.bias"], (2, 2), ((0, 0), (0, 0)), (1, 1), 1)
    h = conv2d_general(h0, p["b.dw.weight"], p["b.dw.bias"], (1, 1), ((1, 1), (1, 1)), (1, 1), 6)
    h = h.transpose(0, 2, 3, 1)  # channels-last: the linear layers act on each position's channels
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * p["b.norm.weight"] \
        + p["b.norm.bias"]
    h = h @ p["b.fc1.weight"].T + p["b.fc1.bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    h = (h @ p["b.fc2.weight"].T + p["b.fc2.bias"]).transpose(0, 3, 1, 2) * p["b.layer_scale"]
    return (h0 + h).mean((2, 3)) @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_convnext_block_table_matches_numpy(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, dtype) in TABLE.parameters().items()
              if dtype == "float32"}
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert TABLE.parameters()["b.layer_scale"][0] == (6, 1, 1)
    assert TABLE.spec().axes_to_perm["b.layer_scale"] == ("P_stem", None, None)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_a_flax_convnext_with_layer_scales_is_traced_and_its_planted_permutation_undone():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax.numpy as jnp

    from tests.model_checks import flax_planted_permutation, flax_variables

    class Block(fnn.Module):
        dim: int

        @fnn.compact
        def __call__(self, x):  # NHWC throughout: Dense and LayerNorm act on each position's channels
            h = fnn.Conv(self.dim, (7, 7), padding=3, feature_group_count=self.dim)(x)
            h = fnn.Dense(self.dim)(fnn.gelu(fnn.Dense(4 * self.dim)(fnn.LayerNorm(epsilon=1e-6)(h))))
            return x + self.param("gamma", fnn.initializers.constant(0.5), (self.dim,)) * h

    class FlaxConvNeXt(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.Conv(8, (4, 4), strides=4, padding="VALID")(x)
            x = Block(8, name="block1")(Block(8, name="block0")(x))
            return fnn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    net = FlaxConvNeXt()
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
    variables = flax_variables(net, x, seed=0)
    spec = cb.derive.describe((net, variables), x).spec()
    assert spec.axes_to_perm["block0.gamma"] == ("P_Conv_0",)
    assert spec.axes_to_perm["block0.Dense_1.weight"] == ("P_block0.Dense_1", "P_Conv_0")  # made second, called first
    flax_planted_permutation(net, variables, x)


class TimmBlock(nn.Module):
    """timm's ConvNeXt block (``conv_mlp=False``): a ``(C,)`` gamma reshaped to ``(1, C, 1, 1)`` in forward."""

    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


class TimmNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stages, self.head = nn.Conv2d(1, 8, 4, stride=4), nn.Sequential(TimmBlock(8)), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_a_timm_style_gamma_is_a_layer_scale_and_a_planted_swap_is_undone():
    torch.manual_seed(0)
    a = TimmNet().eval()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    spec = cb.derive_spec(a, _x())
    assert spec.axes_to_perm["stages.0.gamma"] == ("P_stem",)
    stream = torch.as_tensor(np.random.default_rng(2).permutation(8))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for key in ("stem.weight", "stem.bias", "stages.0.conv_dw.weight", "stages.0.conv_dw.bias", "stages.0.norm.weight",
                "stages.0.norm.bias", "stages.0.fc2.weight", "stages.0.fc2.bias", "stages.0.gamma"):
        state[key] = state[key][stream]
    for key in ("stages.0.fc1.weight", "head.weight"):
        state[key] = state[key][:, stream]
    b = TimmNet().eval()
    b.load_state_dict(state)
    assert_planted_permutation_undone(a, b, _x(), (), "weight")
