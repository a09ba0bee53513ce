"""The torch reference architectures: permutation invariance, numpy forward passes, structure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from combinability.architecture import Architecture
from combinability.permutation import PermutationSpec
from combinability.testing import check_architecture, perturbed_state
from combinability.zoo import REFERENCE_ARCHITECTURES
from tests import reference_nets as ref

torch = pytest.importorskip("torch")
archs = pytest.importorskip("combinability_torch.architectures")
from combinability_torch.backend import TorchBackend  # noqa: E402

ARCH = {a.name: a for a in REFERENCE_ARCHITECTURES}
CONFIGS = [
    ("mlp", 1 / 32, (64,)),
    ("mlp", 1 / 32, (1, 8, 8)),
    ("tiny10", 0.5, (3, 8, 8)),
    ("resnet20", 0.25, (3, 8, 8)),
    ("vgg16", 1 / 16, (3, 8, 8)),
]


@pytest.fixture(scope="module")
def backend():
    return TorchBackend("cpu")


@pytest.mark.parametrize(("name", "width", "shape"), CONFIGS)
def test_check_architecture_passes(backend, name, width, shape):
    check_architecture(ARCH[name], backend, width=width, num_classes=5, input_shape=shape, seed=3)


# -- the check can fail ---------------------------------------------------------------------------
class Patched:
    """An architecture implementation with some methods replaced."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.base = base
        self.__dict__.update(overrides)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.base, attr)


def broken_spec(base: Any, param: str, axes: tuple) -> Patched:
    def spec(**cfg) -> PermutationSpec:
        table = dict(base.spec(**cfg).axes_to_perm)
        assert param in table
        table[param] = axes
        return PermutationSpec(table)

    return Patched(base, spec=spec)


@dataclass(frozen=True)
class InlineArchitecture(Architecture):
    impl: Any = None

    def implementation(self, backend: str) -> Any:
        return self.impl


@pytest.mark.parametrize(
    ("name", "width", "shape", "param", "axes", "message"),
    [
        # equal sizes: the spec validates, but the function changes
        ("mlp", 1 / 32, (64,), "layers.1.weight", ("P1", "P2"), "changed the function"),
        # a LayerNorm scale left unpermuted (invisible on a fresh model: its scales are all one)
        ("tiny10", 0.5, (3, 8, 8), "norm_3.weight", (None,), "changed the function"),
        # a bias bound to the wrong permutation of the same size
        ("vgg16", 1 / 16, (3, 8, 8), "conv_6.bias", ("P5",), "changed the function"),
        # sizes differ: the spec itself is rejected
        ("resnet20", 0.25, (3, 8, 8), "stage1_block0.shortcut_conv.weight",
         ("P_stage1", "P_s1_b0_inner", None, None), "does not fit"),
    ],
)
def test_check_architecture_detects_a_broken_spec(backend, name, width, shape, param, axes, message):
    broken = InlineArchitecture(name, impl=broken_spec(ARCH[name].implementation("torch"), param, axes))
    with pytest.raises(AssertionError, match=message):
        check_architecture(broken, backend, width=width, num_classes=5, input_shape=shape, seed=3)


def test_check_architecture_detects_a_wrong_activation_point(backend):
    def activation_points(**cfg):
        points = archs.MLP.activation_points(**cfg)
        return {**points, "P1": points["P0"]}

    arch = InlineArchitecture("mlp", impl=Patched(archs.MLP, activation_points=activation_points))
    with pytest.raises(AssertionError, match="at point 'hidden_0'"):
        check_architecture(arch, backend, width=1 / 32, num_classes=5, input_shape=(64,))


def test_check_architecture_detects_missing_layer_indices(backend):
    def layers(**cfg):
        table = archs.MLP.layers(**cfg)
        del table["layers.2.bias"]
        return table

    arch = InlineArchitecture("mlp", impl=Patched(archs.MLP, layers=layers))
    with pytest.raises(AssertionError, match=r"missing \['layers.2.bias'\]"):
        check_architecture(arch, backend, width=1 / 32, num_classes=5, input_shape=(64,))


# -- independent numpy forward passes -------------------------------------------------------------
def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy().astype(np.float64)


def _model_with_noise(backend, name, width, shape, seed=0):
    model = backend.build(ARCH[name], width=width, num_classes=4, input_shape=shape, seed=seed)
    params = perturbed_state(backend.state(model), seed)
    return backend.with_state(model, params), {k: v.astype(np.float64) for k, v in params.items()}


def _ln_relu(x, p, name):
    return ref.relu(ref.layer_norm_channels(x, p[f"{name}.weight"], p[f"{name}.bias"]))


def _head(x, p):
    return x.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]


def test_mlp_matches_numpy_forward(backend):
    model, p = _model_with_noise(backend, "mlp", 1 / 32, (1, 8, 8))
    x = np.random.default_rng(1).normal(size=(10, 1, 8, 8)).astype(np.float32)
    expected = ref.mlp_forward(p, x.reshape(10, -1).astype(np.float64), 4)
    np.testing.assert_allclose(_torch_logits(model, x), expected, rtol=1e-5, atol=1e-5)


def test_tiny10_matches_numpy_forward(backend):
    model, p = _model_with_noise(backend, "tiny10", 0.25, (2, 8, 8))
    x = np.random.default_rng(1).normal(size=(6, 2, 8, 8)).astype(np.float32)
    h = x.astype(np.float64)
    for i, stride in enumerate((1, 1, 2, 1, 1, 2, 1, 1)):
        pad = 0 if i == 7 else 1
        h = _ln_relu(ref.conv2d(h, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"], stride=stride, pad=pad), p, f"norm_{i}")
    assert h.shape == (6, 16, 2, 2)  # 64 x 0.25 channels, 8 -> 4 -> 2 pixels
    np.testing.assert_allclose(_torch_logits(model, x), _head(h, p), rtol=1e-4, atol=1e-4)


def test_resnet20_matches_numpy_forward(backend):
    model, p = _model_with_noise(backend, "resnet20", 0.25, (3, 8, 8))
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float64)
    h = _ln_relu(ref.conv2d(x, p["stem_conv.weight"]), p, "stem_norm")
    for s in range(3):
        for b in range(3):
            blk = f"stage{s}_block{b}"
            stride = 2 if s > 0 and b == 0 else 1
            inner = _ln_relu(ref.conv2d(h, p[f"{blk}.conv1.weight"], stride=stride), p, f"{blk}.norm1")
            out = ref.layer_norm_channels(ref.conv2d(inner, p[f"{blk}.conv2.weight"]), p[f"{blk}.norm2.weight"],
                                          p[f"{blk}.norm2.bias"])
            if stride == 2:
                h = ref.layer_norm_channels(ref.conv2d(h, p[f"{blk}.shortcut_conv.weight"], stride=2, pad=0),
                                            p[f"{blk}.shortcut_norm.weight"], p[f"{blk}.shortcut_norm.bias"])
            h = ref.relu(out + h)
    assert h.shape == (4, 16, 2, 2)
    np.testing.assert_allclose(_torch_logits(model, x.astype(np.float32)), _head(h, p), rtol=1e-4, atol=1e-4)


def test_vgg16_matches_numpy_forward(backend):
    model, p = _model_with_noise(backend, "vgg16", 1 / 16, (3, 8, 8))
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float64)
    h, i = x, 0
    for c in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if c == "M":
            n, ch, hh, ww = h.shape
            if min(hh, ww) >= 2:
                h = h[:, :, : hh // 2 * 2, : ww // 2 * 2].reshape(n, ch, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
            continue
        h = _ln_relu(ref.conv2d(h, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"]), p, f"norm_{i}")
        i += 1
    assert h.shape == (4, 32, 1, 1)  # 8 -> 4 -> 2 -> 1 pixels, then no more pooling
    np.testing.assert_allclose(_torch_logits(model, x.astype(np.float32)), _head(h, p), rtol=1e-4, atol=1e-4)


# -- structure --------------------------------------------------------------------------------------
def _param_count(impl, width, num_classes, shape) -> int:
    with torch.device("meta"):
        net = impl.module(width=width, num_classes=num_classes, input_shape=shape)
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_at_width_one():
    def conv(cin, cout, k=3, bias=True):
        return cin * cout * k * k + (cout if bias else 0)

    # MLP 784-512-512-512-10
    assert _param_count(archs.MLP, 1, 10, (1, 28, 28)) == 784 * 512 + 512 + 2 * (512 * 512 + 512) + 5130
    # Tiny-10: 8 convs with bias, 8 LayerNorms (scale + bias), head
    ch = [3, 16, 16, 32, 32, 32, 64, 64, 64]
    pairs = zip(ch[:-1], ch[1:], strict=True)
    tiny = sum(conv(a, b, 1 if i == 7 else 3) for i, (a, b) in enumerate(pairs)) + 2 * sum(ch[1:])
    assert _param_count(archs.Tiny10, 1, 10, (3, 32, 32)) == tiny + 64 * 10 + 10 == 86778
    # ResNet-20 without conv biases, 2 projection shortcuts (1x1 conv + LayerNorm)
    resnet = conv(3, 16, bias=False) + 2 * 16
    for cin, c in ((16, 16), (16, 32), (32, 64)):
        resnet += conv(cin, c, bias=False) + 5 * conv(c, c, bias=False) + 6 * 2 * c
        if cin != c:
            resnet += conv(cin, c, 1, bias=False) + 2 * c
    assert _param_count(archs.ResNet20, 1, 10, (3, 32, 32)) == resnet + 650 == 272474
    # VGG-16: torchvision's conv part has 14,714,688 parameters; plus LayerNorms and the head
    ln = 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)
    assert _param_count(archs.VGG16, 1, 10, (3, 32, 32)) == 14_714_688 + ln + 512 * 10 + 10


@pytest.mark.parametrize(
    ("impl", "n_layers", "head", "perms"),
    [
        (archs.MLP, 4, "layers.3.weight", {"P0", "P1", "P2"}),
        (archs.Tiny10, 9, "head.weight", {f"P{i}" for i in range(8)}),
        (archs.ResNet20, 11, "head.weight", {"P_stage0", "P_stage1", "P_stage2"}
         | {f"P_s{s}_b{b}_inner" for s in range(3) for b in range(3)}),
        (archs.VGG16, 14, "head.weight", {f"P{i}" for i in range(13)}),
    ],
)
def test_layers_spec_and_points(impl, n_layers, head, perms):
    cfg = {"width": 0.25, "num_classes": 7, "input_shape": (3, 16, 16)}
    names = impl.layer_names(**cfg)
    layers = impl.layers(**cfg)
    assert len(names) == n_layers and names[-1] == "head"
    assert sorted(set(layers.values())) == list(range(n_layers))
    assert layers[head] == n_layers - 1
    assert set(impl.spec(**cfg).perm_names) == perms
    points = impl.activation_points(**cfg)
    assert set(points) == perms
    modules = dict(impl.build(seed=0, **cfg).named_modules())
    assert all(isinstance(modules[p], torch.nn.ReLU) for p in points.values())


def test_resnet_layers_follow_blocks():
    layers = archs.ResNet20.layers(width=0.25, num_classes=3, input_shape=(3, 8, 8))
    assert layers["stem_conv.weight"] == 0
    assert layers["stage0_block0.conv1.weight"] == 1
    assert layers["stage1_block0.shortcut_norm.bias"] == 4
    assert layers["stage2_block2.norm2.weight"] == 9


def test_width_rounds_channels():
    net = archs.Tiny10.build(width=0.3, num_classes=3, input_shape=(1, 8, 8), seed=0)
    assert [getattr(net, f"conv_{i}").out_channels for i in range(8)] == [
        max(1, round(c * 0.3)) for c in (16, 16, 32, 32, 32, 64, 64, 64)
    ] == [5, 5, 10, 10, 10, 19, 19, 19]


def test_build_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a = archs.ResNet20.build(width=0.25, num_classes=3, input_shape=(3, 8, 8), seed=1)
    b = archs.ResNet20.build(width=0.25, num_classes=3, input_shape=(3, 8, 8), seed=1)
    c = archs.ResNet20.build(width=0.25, num_classes=3, input_shape=(3, 8, 8), seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem_conv.weight"], sc["stem_conv.weight"])


def test_conv_nets_reject_vector_inputs():
    with pytest.raises(ValueError, match=r"\(c, h, w\)"):
        archs.Tiny10.build(width=1, num_classes=3, input_shape=(64,), seed=0)


def test_reference_conversion_is_a_copy():
    params = {"layers.0.weight": np.ones((2, 3), np.float32)}
    out = archs.MLP.to_reference(params)
    back = archs.MLP.from_reference(out)
    assert np.array_equal(back["layers.0.weight"], params["layers.0.weight"])
    out["layers.0.weight"][0, 0] = 5
    assert params["layers.0.weight"][0, 0] == 1


def test_vgg_pools_only_while_image_is_large_enough():
    net = archs.VGG16.build(width=1 / 16, num_classes=3, input_shape=(1, 3, 3), seed=0)
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 3, 3))  # 3 -> 1 pixel after the first pool, then no pooling
    assert out.shape == (2, 3) and math.isfinite(float(out.sum()))
