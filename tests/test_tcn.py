"""Temporal convolutional networks as locuslab/TCN writes them (Bai, Kolter and Koltun, 2018): causal
dilated convolutions padded on both sides whose last positions are cropped (``Chomp1d``: ``x[:, :, :-k]``),
weight norms, each convolution registered twice (``self.conv1`` and again in ``self.net``), a residual
1 x 1 downsample, and the classifier reading the last step (``y[:, :, -1]``) through a final
``log_softmax``. A crop is a zero pad node with negative widths; the last step is a crop to one position
and a flatten.

References: a plain numpy forward pass of a layer table with both crops (on both backends), the spec
written by hand, and the user's module run in float64 with a random transformation of the derived spec
(it must keep the outputs), which weight matching must undo; sweep ends equal to torch's own losses.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import assert_random_transformation_undone, randomised, table_logits

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
weight_norm = nn.utils.parametrizations.weight_norm

TABLE = LayerTable("causal", (2, 9), 3, (
    Node("c1", "conv", units=4, kernel=3, padding=4, dilation=2), Node("chomp1", "pad", padding=((0, -4),)),
    Node("r1", "relu"),
    Node("c2", "conv", units=4, kernel=2, padding=1), Node("chomp2", "pad", padding=((0, -1),)),
    Node("down", "conv", inputs=("<input>",), units=4, kernel=1),
    Node("add", "add", inputs=("chomp2", "down")), Node("r2", "relu"),
    Node("last", "pad", padding=((-8, 0),)), Node("squeeze", "flatten"),
    Node("fc", "dense", units=3)))


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int, dilation: int) -> np.ndarray:
    """A 1-D convolution, channels-first, padded by ``pad`` zeros on both sides (the tests' numpy reference)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    k = w.shape[2]
    length = xp.shape[2] - dilation * (k - 1)
    out = sum(np.einsum("oi,nit->not", w[:, :, j], xp[:, :, j * dilation:j * dilation + length]) for j in range(k))
    return out + b[None, :, None]


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(_conv1d(x, p["c1.weight"], p["c1.bias"], 4, 2)[:, :, :-4], 0)
    h = _conv1d(h, p["c2.weight"], p["c2.bias"], 1, 1)[:, :, :-1]
    h = np.maximum(h + _conv1d(x, p["down.weight"], p["down.bias"], 0, 1), 0)
    return h[:, :, -1] @ p["fc.weight"].T + p["fc.bias"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_crops_and_the_last_step_match_numpy_on_both_backends(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}
    x = rng.normal(size=(3, 2, 9)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_a_crop_keeps_the_channels_space():
    assert TABLE.shapes()["last"].spatial == (1,) and TABLE.shapes()["squeeze"].channels == 4
    spec = TABLE.spec().axes_to_perm
    assert spec["c1.weight"] == ("P_c1", None, None) and spec["c2.weight"] == ("P_c2", "P_c1", None)
    assert spec["down.weight"] == ("P_c2", None, None) and spec["fc.weight"] == (None, "P_c2")


def test_crops_are_checked():
    with pytest.raises(ConfigurationError, match="crops the map"):
        LayerTable("t", (2, 4), 3, (Node("crop", "pad", padding=((-2, -2),)), Node("f", "flatten"),
                                    Node("fc", "dense", units=3))).shapes()
    with pytest.raises(ConfigurationError, match="padding must be an int >= 0"):
        Node("crop", "pad", padding=((0, -1),), padding_mode="reflect")
    with pytest.raises(ConfigurationError, match="padding must be an int >= 0"):
        Node("c", "conv", units=2, padding=-1)


class Chomp1d(nn.Module):
    def __init__(self, chomp_size: int) -> None:
        super().__init__()
        self.chomp_size = chomp_size

    def forward(self, x):
        return x[:, :, :-self.chomp_size].contiguous()


class TemporalBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, kernel: int, dilation: int, normed: bool) -> None:
        super().__init__()
        padding = (kernel - 1) * dilation
        norm = weight_norm if normed else (lambda m: m)
        self.conv1 = norm(nn.Conv1d(n_in, n_out, kernel, padding=padding, dilation=dilation))
        self.chomp1, self.relu1, self.dropout1 = Chomp1d(padding), nn.ReLU(), nn.Dropout(0.2)
        self.conv2 = norm(nn.Conv1d(n_out, n_out, kernel, padding=padding, dilation=dilation))
        self.chomp2, self.relu2, self.dropout2 = Chomp1d(padding), nn.ReLU(), nn.Dropout(0.2)
        self.net = nn.Sequential(self.conv1, self.chomp1, self.relu1, self.dropout1,
                                 self.conv2, self.chomp2, self.relu2, self.dropout2)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.net(x)
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(out + res)


class TCN(nn.Module):
    """locuslab/TCN's sequence classifier (its MNIST example), small."""

    def __init__(self, normed: bool = True, channels: tuple[int, ...] = (5, 5, 6)) -> None:
        super().__init__()
        self.network = nn.Sequential(*(TemporalBlock(1 if i == 0 else channels[i - 1], c, 3, 2 ** i, normed)
                                       for i, c in enumerate(channels)))
        self.linear = nn.Linear(channels[-1], 4)

    def forward(self, inputs):
        y1 = self.network(inputs)
        return F.log_softmax(self.linear(y1[:, :, -1]), dim=1)


def _state(model):
    from combinability_torch.trace import tensor_aliases

    aliases = tensor_aliases(model)  # each convolution's tensors are also named under net.*: once
    return {k: v.double().numpy() for k, v in model.state_dict().items() if k not in aliases}


def test_the_plain_tcn_is_a_layer_table_with_its_crops():
    model = randomised(TCN(normed=False), 0)
    table = cb.derive.describe(model, torch.randn(2, 1, 20))
    ops = [(n.op, n.padding) for n in table.nodes if n.op in ("pad", "flatten")]
    assert ops == [("pad", ((0, -2),)), ("pad", ((0, -2),)), ("pad", ((0, -4),)), ("pad", ((0, -4),)),
                   ("pad", ((0, -8),)), ("pad", ((0, -8),)), ("pad", ((-19, 0),)), ("flatten", 0)]
    spec = table.spec().axes_to_perm
    stream, inner = "P_network.0.conv2", "P_network.1.conv1"  # block 1's shortcut is the identity: one stream
    assert {k: v for k, v in spec.items() if k.endswith("weight")} == {
        "network.0.conv1.weight": ("P_network.0.conv1", None, None),
        "network.0.conv2.weight": (stream, "P_network.0.conv1", None),
        "network.0.downsample.weight": (stream, None, None),
        "network.1.conv1.weight": (inner, stream, None), "network.1.conv2.weight": (stream, inner, None),
        "network.2.conv1.weight": ("P_network.2.conv1", stream, None),
        "network.2.conv2.weight": ("P_network.2.conv2", "P_network.2.conv1", None),
        "network.2.downsample.weight": ("P_network.2.conv2", stream, None),
        "linear.weight": (None, "P_network.2.conv2")}


@pytest.mark.parametrize("normed", [False, True])
def test_a_random_transformation_of_the_tcn_is_undone(normed):
    model = randomised(TCN(normed=normed), 0)
    x = torch.randn(3, 1, 20)
    if normed:  # traced with each weight as computed, on a plain copy (derive_symmetries)
        spec, folds = cb.derive_symmetries(model, x)
        assert folds == []
    else:
        spec = cb.derive.describe(model, x).spec()
    moved = "network.0.conv2." + ("parametrizations.weight.original1" if normed else "weight")
    assert_random_transformation_undone(model, spec, _state(model), x, moved)


def test_a_pair_of_tcns_is_aligned_swept_and_repaired():
    a, b = randomised(TCN(), 0), randomised(TCN(), 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 20, generator=g), torch.randint(0, 4, (16,), generator=g)
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    with torch.no_grad():
        torch.testing.assert_close(pair.model(1)(x), b(x), rtol=1e-5, atol=1e-5)
    ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.nll_loss(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_activation_matching_reads_the_plain_tcns_features_and_undoes_a_planted_permutation():
    a, b = randomised(TCN(normed=False), 0), randomised(TCN(normed=False), 1)
    g = torch.Generator().manual_seed(1)  # b, and b moved by a random permutation of the spec
    x, y = torch.randn(24, 1, 20, generator=g), torch.randint(0, 4, (24,), generator=g)
    data = (x.numpy(), y.numpy())
    spec = cb.ModelPair(a, b, example_input=x[:4]).spec
    state = _state(b)
    planted = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3), state)
    assert not np.allclose(planted["network.1.conv1.weight"], state["network.1.conv1.weight"])
    b_moved = TCN(normed=False).eval()
    b_moved.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in planted.items()}, strict=False)
    aligned = cb.ModelPair(b, b_moved, example_input=x[:4]).align("activation", data=data)
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


class CenterCropSkip(nn.Module):
    """The original U-Net's skip connection: the encoder's map cropped to the decoder's size, sizes read
    from the tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 4, 3)  # no padding: 2 positions fewer per axis
        self.fuse = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        up = F.relu(self.dec(skip))
        dy, dx = (skip.size(2) - up.size(2)) // 2, (skip.size(3) - up.size(3)) // 2
        crop = skip[:, :, dy:dy + up.size(2), dx:dx + up.size(3)]
        return self.fc(F.relu(self.fuse(torch.cat([crop, up], 1))).mean((2, 3)))


def test_a_center_crop_with_traced_sizes_is_a_crop():
    model = randomised(CenterCropSkip(), 0)
    x = torch.randn(3, 2, 7, 7)
    table = cb.derive.describe(model, x)
    assert [n.padding for n in table.nodes if n.op == "pad"] == [((-1, -1), (-1, -1))]
    spec = table.spec()
    assert spec.axes_to_perm["fuse.weight"] == ("P_fuse", ("P_enc", "P_dec"), None, None)
    assert_random_transformation_undone(model, spec, _state(model), x, "fuse.weight")


class OneAxisIndexed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x)[:, :, -1, :].mean(-1))


def test_an_index_that_drops_one_of_two_spatial_axes_is_refused_by_name():
    with pytest.raises(TracingError, match="getitem"):
        cb.derive.describe(OneAxisIndexed(), torch.randn(2, 2, 5, 5))


def test_a_flax_tcn_is_traced_with_its_crops_and_a_planted_permutation_undone():
    pytest.importorskip("flax")
    import flax.linen as fnn

    from tests.model_checks import flax_planted_permutation, flax_variables

    class Block(fnn.Module):
        features: int
        dilation: int

        @fnn.compact
        def __call__(self, x):  # (n, length, channels): padded on both sides, the last positions cropped
            pad = 2 * self.dilation
            h = fnn.Conv(self.features, (3,), kernel_dilation=self.dilation, padding=[(pad, pad)])(x)[:, :-pad, :]
            h = fnn.Conv(self.features, (3,), kernel_dilation=self.dilation, padding=[(pad, pad)])(fnn.relu(h))
            res = x if x.shape[-1] == self.features else fnn.Conv(self.features, (1,))(x)
            return fnn.relu(h[:, :-pad, :] + res)

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = Block(4, 1)(x)
            h = Block(4, 2)(h)
            return fnn.Dense(3)(h[:, -1, :])

    net = Net()
    x = np.random.default_rng(0).normal(size=(3, 9, 2)).astype(np.float32)
    variables = flax_variables(net, x, seed=0)
    table = cb.derive.describe((net, variables), x)
    assert [n.padding for n in table.nodes if n.op == "pad"] == [((0, -2),), ((0, -2),), ((0, -4),), ((0, -4),),
                                                                 ((-8, 0),)]
    spec = table.spec().axes_to_perm
    assert spec["Dense_0.weight"][1] == spec["Block_1.Conv_1.weight"][0] == spec["Block_0.Conv_2.weight"][0]
    flax_planted_permutation(net, variables, x)


class CalledTwice(nn.Module):
    """One convolution registered under two names and called twice: shared weights, not an alias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.again = self.conv
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.again(torch.relu(self.conv(x))).mean(-1))


def test_a_module_registered_twice_and_called_twice_is_still_refused_as_shared():
    with pytest.raises(TracingError, match="is called 2 times"):
        cb.derive.describe(CalledTwice(), torch.randn(2, 3, 5))
