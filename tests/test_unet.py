"""Encoder-decoder networks: transposed convolutions and upsampling in layer tables, traced U-Nets.

References: a plain numpy transposed convolution (the scatter of each input position's
kernel-weighted contribution, then the crop) and closed forms of nearest and linear
upsampling by 2 for the tables' forward pass; torch's own ``F.interpolate`` for the
resizing weights; specs written by hand; permutations planted by hand (plain torch
indexing) that weight and activation matching must undo; a user's flax module's own
outputs for the tables traced from it.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from combinability.upsampling import resize_weights
from tests.model_checks import (
    assert_planted_permutation_undone,
    flax_planted_permutation,
    flax_variables,
    randomise_batchnorms,
    table_logits,
    tapped_features,
)
from tests.reference_nets import conv2d_general, relu

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


# -- references -------------------------------------------------------------------------------------
def conv_transpose2d(x, w, b, stride, crops, dilation, output_padding):
    """Each input position adds its values times the kernel at ``stride x position + dilation x tap``;
    then ``crops`` come off each side and ``output_padding`` positions (bias only) are added at the end."""
    n, _, height, width = x.shape
    _, c_out, kh, kw = w.shape
    full = [(s - 1) * st + d * (k - 1) + 1
            for s, st, d, k in zip((height, width), stride, dilation, (kh, kw), strict=True)]
    y = np.zeros((n, c_out, full[0] + output_padding[0], full[1] + output_padding[1]))
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            rows = slice(top, top + (height - 1) * stride[0] + 1, stride[0])
            cols = slice(left, left + (width - 1) * stride[1] + 1, stride[1])
            y[:, :, rows, cols] += np.einsum("nihw,io->nohw", x, w[:, :, i, j])
    (t, bottom), (lft, right) = crops
    y = y[:, :, t:full[0] + output_padding[0] - bottom, lft:full[1] + output_padding[1] - right]
    return y + b[:, None, None]


def nearest_x2(x):
    return x.repeat(2, axis=2).repeat(2, axis=3)


def linear_x2(x, axis):
    """Half-pixel linear upsampling by 2 along ``axis``: output 2i is 3/4 of input i and 1/4 of input i - 1,
    output 2i + 1 is 3/4 of input i and 1/4 of input i + 1 (edges repeated)."""
    x = np.moveaxis(x, axis, -1)
    before = np.concatenate([x[..., :1], x[..., :-1]], -1)
    after = np.concatenate([x[..., 1:], x[..., -1:]], -1)
    out = np.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], -1).reshape(*x.shape[:-1], -1)
    return np.moveaxis(out, -1, axis)


# -- resizing weights -------------------------------------------------------------------------------
def test_resize_weights_are_the_closed_forms():
    x = np.random.default_rng(0).normal(size=(1, 1, 5, 5))
    np.testing.assert_allclose(np.einsum("oi,ncij->ncoj", resize_weights(5, 10, "nearest"), x),
                               x.repeat(2, axis=2), atol=1e-7)
    np.testing.assert_allclose(np.einsum("oi,ncij->ncoj", resize_weights(5, 10, "linear"), x), linear_x2(x, 2),
                               atol=1e-6)
    corners = resize_weights(2, 3, "linear", align_corners=True)
    np.testing.assert_allclose(corners, [[1, 0], [0.5, 0.5], [0, 1]])


@pytest.mark.parametrize("mode,corners", [("nearest", False), ("nearest-exact", False), ("linear", False),
                                          ("linear", True)])
def test_resize_weights_match_torch_interpolate(mode, corners):
    rng = np.random.default_rng(1)
    for size_in, size_out in [(1, 3), (3, 7), (4, 8), (5, 3), (6, 17), (7, 7)]:
        x = rng.normal(size=(2, 3, size_in)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x), size=size_out, mode=mode,
                             align_corners=corners if mode == "linear" else None).numpy()
        got = np.einsum("oi,nci->nco", resize_weights(size_in, size_out, mode, corners), x)
        np.testing.assert_allclose(got, want, atol=1e-6)


# -- a layer table with transposed convolutions and upsampling ------------------------------------------
NODES = (
    Node("c1", "conv", units=6, kernel=3, padding=1),
    Node("n1", "norm", norm="batchnorm"),
    Node("a1", "relu"),
    Node("p", "maxpool", kernel=2, stride=2),
    Node("t1", "conv_transpose", units=5, kernel=(3, 2), stride=(2, 3), padding=((1, 0), (0, 1)), dilation=(1, 2),
         output_padding=(2, 0)),  # unequal crops, an output_padding at the stride: the general path
    Node("a2", "act", fn="tanh"),
    Node("u1", "upsample", fn="nearest", output_size=(16, 16)),
    Node("c2", "conv", units=4, kernel=3, stride=2, padding=1),
    Node("t2", "conv_transpose", units=5, kernel=2, stride=2),  # a plain nn.ConvTranspose2d
    Node("u2", "upsample", fn="linear", output_size=(32, 32)),
    Node("gap", "avgpool"),
    Node("out", "dense", units=4),
)
TABLE = LayerTable("decoder", (3, 7, 6), 4, NODES)


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = conv2d_general(x, p["c1.weight"], p["c1.bias"], (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    scale = p["n1.weight"] / np.sqrt(p["n1.running_var"] + 1e-5)
    h = relu((h - p["n1.running_mean"][:, None, None]) * scale[:, None, None] + p["n1.bias"][:, None, None])
    h = h[:, :, :6, :6].reshape(len(h), 6, 3, 2, 3, 2).max(axis=(3, 5))
    h = np.tanh(conv_transpose2d(h, p["t1.weight"], p["t1.bias"], (2, 3), ((1, 0), (0, 1)), (1, 2), (2, 0)))
    assert h.shape[2:] == (8, 8)
    h = conv2d_general(nearest_x2(h), p["c2.weight"], p["c2.bias"], (2, 2), ((1, 1), (1, 1)), (1, 1), 1)
    h = conv_transpose2d(h, p["t2.weight"], p["t2.bias"], (2, 2), ((0, 0), (0, 0)), (1, 1), (0, 0))
    h = linear_x2(linear_x2(h, 2), 3).mean(axis=(2, 3))
    return h @ p["out.weight"].T + p["out.bias"]


def test_decoder_table_shapes_parameters_and_spec():
    shapes = TABLE.shapes()
    assert shapes["t1"].spatial == (8, 8) and shapes["u1"].spatial == (16, 16) and shapes["t2"].spatial == (16, 16)
    params = TABLE.parameters()
    assert params["t1.weight"][0] == (6, 5, 3, 2) and params["t2.weight"][0] == (4, 5, 2, 2)
    spec = TABLE.spec()
    assert spec.axes_to_perm["t1.weight"] == ("P_c1", "P_t1", None, None)
    assert spec.axes_to_perm["c2.weight"] == ("P_c2", "P_t1", None, None)  # the upsampled channels are t1's
    assert spec.axes_to_perm["t2.weight"] == ("P_c2", "P_t2", None, None)
    assert spec.axes_to_perm["out.weight"] == (None, "P_t2")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_decoder_table_forward_matches_numpy(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, dtype) in TABLE.parameters().items()
              if dtype == "float32"}
    params["n1.running_var"] = np.abs(params["n1.running_var"]) + 0.5
    x = rng.normal(size=(3, 3, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_flax_conversion_of_a_transposed_kernel_round_trips():
    rng = np.random.default_rng(2)
    params = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, dtype) in TABLE.parameters().items()
              if dtype == "float32"}
    flax = TABLE.to_flax(params)
    assert flax["params/t1/kernel"].shape == (3, 2, 6, 5)
    np.testing.assert_array_equal(flax["params/t1/kernel"][0, 1], params["t1.weight"][:, :, 2, 0])  # reversed taps
    back = TABLE.from_flax(flax)
    assert all(np.array_equal(back[k], params[k]) for k in params)


@pytest.mark.parametrize("node,message", [
    (dict(op="upsample", fn="nearest"), "needs output_size and a mode"),
    (dict(op="upsample", fn="bicubic", output_size=(4, 4)), "needs output_size and a mode"),
    (dict(op="upsample", fn="nearest", output_size=(4, 4), align_corners=True), "align_corners with 'linear' only"),
    (dict(op="conv", units=2, output_padding=1), "output_padding belongs to a conv_transpose node"),
    (dict(op="conv_transpose", units=2, groups=2), "groups=1 and fixed=0"),
    (dict(op="conv_transpose", units=2, output_padding=-1), "output_padding must be an int >= 0"),
])
def test_bad_nodes_are_refused(node, message):
    with pytest.raises(ConfigurationError, match=message):
        Node("bad", **node)


# -- a user's U-Net (torch) ---------------------------------------------------------------------------
class UNet(nn.Module):
    """A small U-Net classifier: two encoder stages, a transposed-conv and a bilinear decoder stage,
    each joined to its encoder stage by a skip concatenation, then global pooling."""

    def __init__(self, channels: tuple[int, int, int] = (8, 12, 16), classes: int = 5) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.enc1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(2 * c2, c2, 3, padding=1), nn.ReLU())
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear")
        self.dec2 = nn.Sequential(nn.Conv2d(c2 + c1, c1, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(c1, classes)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d1 = self.dec1(torch.cat([self.up1(m), e2], 1))
        d2 = self.dec2(torch.cat([self.up2(d1), e1], 1))
        return self.head(d2.mean((2, 3)))


BN = ("weight", "bias", "running_mean", "running_var")


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(n, 1, 16, 16)), dtype=torch.float32)


def _randomised(seed: int) -> UNet:
    torch.manual_seed(seed)
    return randomise_batchnorms(UNet())


def _planted(net: UNet, seed: int) -> UNet:
    """``net`` with every hidden channel space permuted by hand: the same function, other weights."""
    rng = np.random.default_rng(seed)
    p1, p2, p3, p4, p5, p6 = (torch.as_tensor(rng.permutation(c)) for c in (8, 12, 16, 12, 12, 8))
    s = {k: v.clone() for k, v in net.state_dict().items()}
    for key in ("enc1.0.weight", "enc1.0.bias", *(f"enc1.1.{leaf}" for leaf in BN)):
        s[key] = s[key][p1]
    for key in ("enc2.0.weight", "enc2.0.bias", *(f"enc2.1.{leaf}" for leaf in BN)):
        s[key] = s[key][p2]
    s["enc2.0.weight"] = s["enc2.0.weight"][:, p1]
    s["mid.0.weight"], s["mid.0.bias"] = s["mid.0.weight"][p3][:, p2], s["mid.0.bias"][p3]
    s["up1.weight"], s["up1.bias"] = s["up1.weight"][p3][:, p4], s["up1.bias"][p4]  # (in, out, kh, kw)
    s["dec1.0.weight"] = s["dec1.0.weight"][p5][:, torch.cat([p4, 12 + p2])]
    s["dec1.0.bias"] = s["dec1.0.bias"][p5]
    s["dec2.0.weight"] = s["dec2.0.weight"][p6][:, torch.cat([p5, 12 + p1])]
    s["dec2.0.bias"] = s["dec2.0.bias"][p6]
    s["head.weight"] = s["head.weight"][:, p6]
    out = UNet().eval()
    out.load_state_dict(s)
    return out


def test_derived_spec_of_a_unet_is_the_hand_written_one():
    spec = cb.derive_spec(_randomised(0), _x())  # verified: a random permutation keeps the outputs
    axes = spec.axes_to_perm
    assert axes["up1.weight"] == ("P_mid.0", "P_up1", None, None)
    assert axes["dec1.0.weight"] == ("P_dec1.0", ("P_up1", "P_enc2.0"), None, None)
    assert axes["dec2.0.weight"] == ("P_dec2.0", ("P_dec1.0", "P_enc1.0"), None, None)  # through the upsampling
    assert axes["head.weight"] == (None, "P_dec2.0")
    assert sorted(spec.perm_names) == sorted(["P_enc1.0", "P_enc2.0", "P_mid.0", "P_up1", "P_dec1.0", "P_dec2.0"])


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_hand_planted_permutation_of_a_unet_is_undone(method):
    a = _randomised(0)
    data = (_x(48, 1).numpy(), np.arange(48) % 5)
    assert_planted_permutation_undone(a, _planted(a, seed=3), _x(), data, method)


def test_features_of_a_transposed_conv_are_its_channels_by_position():
    a, x = _randomised(0), _x(3, 2)
    feats = tapped_features(a, _randomised(1), x, "up1", batch_size=2)
    with torch.no_grad():
        want = a.up1(a.mid(F.max_pool2d(a.enc2(F.max_pool2d(a.enc1(x), 2)), 2))).numpy()
    assert feats.shape == (3 * 8 * 8, 12)
    np.testing.assert_allclose(feats, want.transpose(0, 2, 3, 1).reshape(-1, 12), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda: nn.Upsample(scale_factor=2, mode="bicubic"), "modes nearest, nearest-exact, linear"),
    (lambda: nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), "groups=1"),
])
def test_unfollowed_decoders_are_refused_by_name(make, message):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.up, self.fc = nn.Conv2d(1, 4, 3, padding=1), make(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.up(self.c(x)).mean((2, 3)))

    with pytest.raises(TracingError, match=message):
        cb.derive_spec(Net().eval(), _x(2))


# -- a user's U-Net (flax) ------------------------------------------------------------------------------
def _flax_unet():
    nnx = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")

    class FlaxUNet(nnx.Module):
        @nnx.compact
        def __call__(self, x):
            e1 = nnx.relu(nnx.Conv(8, (3, 3))(x))
            e2 = nnx.relu(nnx.Conv(12, (3, 3))(nnx.max_pool(e1, (2, 2), (2, 2))))
            up = nnx.ConvTranspose(8, (3, 3), strides=(2, 2), padding="SAME")(e2)  # crops (0, 1) in torch's terms
            d = nnx.relu(nnx.Conv(8, (3, 3))(jnp.concatenate([up, e1], -1)))
            up2 = nnx.ConvTranspose(6, (2, 2), strides=(2, 2), padding=((1, 2), (1, 1)))(d)
            return nnx.Dense(3)(jnp.mean(nnx.relu(up2), axis=(1, 2)))

    return FlaxUNet()


def test_flax_unet_is_traced_and_its_table_computes_the_module():
    net = _flax_unet()
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
    variables = flax_variables(net, x, 0)
    table = cb.derive.describe((net, variables), x)
    t0, t1 = (table.node(name) for name in ("ConvTranspose_0", "ConvTranspose_1"))
    assert (t0.op, t0.padding, t0.output_padding) == ("conv_transpose", ((0, 1), (0, 1)), (0, 0))
    assert (t1.padding, t1.output_padding) == (((0, 0), (0, 0)), (1, 0))
    assert table.spec().axes_to_perm["ConvTranspose_0.weight"] == ("P_Conv_1", "P_ConvTranspose_0", None, None)
    from flax import traverse_util

    state = table.from_flax(traverse_util.flatten_dict(variables, sep="/"))
    want = np.asarray(net.apply(variables, x))
    for backend in ("torch", "jax"):  # the table's own models, fed the module's weights
        got = table_logits(backend, table, state, x.transpose(0, 3, 1, 2))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_flax_unet_planted_permutation_is_undone():
    net = _flax_unet()
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 2)).astype(np.float32)
    flax_planted_permutation(net, flax_variables(net, x, 1), x)


def test_flax_transposed_kernel_is_refused_by_name():
    nnx = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")

    class Flipped(nnx.Module):
        @nnx.compact
        def __call__(self, x):
            h = nnx.ConvTranspose(4, (2, 2), strides=(2, 2), transpose_kernel=True)(nnx.Conv(4, (3, 3))(x))
            return nnx.Dense(2)(jnp.mean(h, axis=(1, 2)))

    x = np.zeros((2, 4, 4, 1), np.float32)
    net = Flipped()
    with pytest.raises(TracingError, match="transpose_kernel=False"):
        cb.derive.describe((net, flax_variables(net, x, 0)), x)


def test_repair_weighs_a_transposed_conv_channel_by_its_output_column():
    """REPAIR's per-channel weight of B after a transposed conv: the mean of ``v`` over the channel's
    column of the ``(in, out, kh, kw)`` weight and its bias entry (as many inputs as outputs here, so
    reading rows instead would go unnoticed by the shapes)."""
    from types import SimpleNamespace

    from combinability.layout import FlatLayout
    from combinability.repairs.batchnorm import channel_weights

    table = LayerTable("up", (4, 3, 3), 2, (Node("t", "conv_transpose", units=4, kernel=2, stride=2),
                                             Node("bn", "norm", norm="batchnorm"), Node("gap", "avgpool"),
                                             Node("out", "dense", units=2)))
    params = {k: np.zeros(shape, np.float32) for k, (shape, dtype) in table.parameters().items() if dtype == "float32"}
    layout = FlatLayout.from_arrays(params)
    v = np.random.default_rng(5).uniform(size=layout.size).astype(np.float32)
    ctx = SimpleNamespace(backend=cb.get_backend("torch"), layout=layout, table=table)
    got = channel_weights(ctx, table.node("bn"), torch.as_tensor(v)).numpy()
    arrays = layout.unflatten(v.astype(np.float64))
    w, b = arrays["t.weight"], arrays["t.bias"]  # (in 4, out 4, 2, 2)
    want = [(w[:, c].sum() + b[c]) / (w[:, c].size + 1) for c in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _flax_resize_net(method: str):
    nnx = pytest.importorskip("flax.linen")
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    class Resized(nnx.Module):
        """Encoder, a strided conv, then back up by jax.image.resize (diffusers' FlaxUpsample2D) and a skip."""

        @nnx.compact
        def __call__(self, x):
            e = nnx.relu(nnx.Conv(6, (3, 3))(x))
            d = nnx.relu(nnx.Conv(8, (3, 3), strides=(2, 2))(e))
            b, h, w, c = d.shape
            up = jax.image.resize(d, (b, 2 * h, 2 * w, c), method=method)
            y = nnx.relu(nnx.Conv(5, (3, 3))(jnp.concatenate([up, e], -1)))
            return nnx.Dense(3)(jnp.mean(y, axis=(1, 2)))

    return Resized()


def test_flax_nearest_resize_is_traced_and_its_table_computes_the_module():
    from flax import traverse_util

    net = _flax_resize_net("nearest")
    x = np.random.default_rng(3).normal(size=(2, 8, 6, 2)).astype(np.float32)
    variables = flax_variables(net, x, 2)
    table = cb.derive.describe((net, variables), x)
    resized = [n for n in table.nodes if n.op == "upsample"]  # one gather per axis, half-pixel nearest
    assert [(n.fn, n.output_size) for n in resized] == [("nearest-exact", (8, 3)), ("nearest-exact", (8, 6))]
    assert table.spec().axes_to_perm["Conv_2.weight"][1] == ("P_Conv_1", "P_Conv_0")  # the resized map, the skip
    state = table.from_flax(traverse_util.flatten_dict(variables, sep="/"))
    want = np.asarray(net.apply(variables, x))
    for backend in ("torch", "jax"):
        np.testing.assert_allclose(table_logits(backend, table, state, x.transpose(0, 3, 1, 2)), want, rtol=1e-4,
                                   atol=1e-5)
    flax_planted_permutation(net, variables, x)


def test_flax_linear_resize_is_refused():
    net = _flax_resize_net("linear")
    x = np.zeros((2, 8, 6, 2), np.float32)
    with pytest.raises(TracingError):
        cb.derive.describe((net, flax_variables(net, x, 0)), x)
