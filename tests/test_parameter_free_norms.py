"""Norms without a learned scale and shift: torch's default ``InstanceNorm2d`` (CycleGAN, style transfer),
``BatchNorm2d(affine=False)`` (running statistics only), ``GroupNorm(affine=False)``,
``LayerNorm(elementwise_affine=False)``, and flax's ``use_scale=False, use_bias=False``.

References: numpy normalisations through layer tables on both backends, the user's own module,
and permutations planted by hand that weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import flax_planted_permutation, table_logits
from tests.reference_nets import conv2d_general, relu

TABLE = LayerTable("plain-norms", (2, 5, 5), 3, (
    Node("c1", "conv", units=4, kernel=3, padding=1),
    Node("bn", "norm", norm="batchnorm", affine=False),
    Node("r1", "relu"),
    Node("c2", "conv", units=4, kernel=3, padding=1),
    Node("inorm", "norm", norm="groupnorm", groups=4, affine=False),
    Node("r2", "relu"),
    Node("pool", "avgpool"),
    Node("fc1", "dense", units=6),
    Node("ln", "norm", norm="layernorm", affine=False),
    Node("fc2", "dense", units=3),
))


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    def conv(name, h):
        return conv2d_general(h, p[f"{name}.weight"], p[f"{name}.bias"], (1, 1), ((1, 1), (1, 1)), (1, 1), 1)

    h = conv("c1", x)
    mean, var = p["bn.running_mean"][None, :, None, None], p["bn.running_var"][None, :, None, None]
    h = relu((h - mean) / np.sqrt(var + 1e-5))
    h = conv("c2", h)
    mu, sd = h.mean(axis=(2, 3), keepdims=True), h.var(axis=(2, 3), keepdims=True)
    h = relu((h - mu) / np.sqrt(sd + 1e-5)).mean(axis=(2, 3))
    h = h @ p["fc1.weight"].T + p["fc1.bias"]
    h = (h - h.mean(axis=1, keepdims=True)) / np.sqrt(h.var(axis=1, keepdims=True) + 1e-5)
    return h @ p["fc2.weight"].T + p["fc2.bias"]


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, (shape, dtype) in TABLE.parameters().items():
        out[k] = (np.zeros(shape, dtype) if dtype == "int64" else rng.uniform(0.5, 2, shape).astype(np.float32)
                  if k.endswith("running_var") else rng.normal(0, 0.7, shape).astype(np.float32))
    return out


def test_parameter_free_norms_hold_no_weights_and_batchnorm_keeps_its_statistics():
    params = TABLE.parameters()
    assert not any(k.startswith(("bn.weight", "bn.bias", "inorm.", "ln.")) for k in params)
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(params)
    spec = TABLE.spec()
    assert ("bn.running_mean", 0) in spec.perm_to_axes["P_c1"] and ("bn.running_var", 0) in spec.perm_to_axes["P_c1"]
    with pytest.raises(ConfigurationError, match="affine=False belongs to a norm node"):
        Node("d", "dense", units=2, affine=False)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_normalise_as_numpy_does(backend):
    pytest.importorskip(backend)
    params = _params()
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    floats = {k: v for k, v in params.items() if v.dtype.kind == "f"}
    np.testing.assert_allclose(table_logits(backend, TABLE, floats, x), _reference(params, x), rtol=1e-4, atol=1e-4)


# -- users' torch networks -------------------------------------------------------------------------
torch = pytest.importorskip("torch")
nn = torch.nn


class StyleNet(nn.Module):
    """CycleGAN's residual generator style: reflection padding, convs, default (parameter-free) InstanceNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 5, 3), nn.InstanceNorm2d(5), nn.ReLU())
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(5, 5, 3), nn.InstanceNorm2d(5), nn.ReLU(),
                                   nn.ReflectionPad2d(1), nn.Conv2d(5, 5, 3), nn.InstanceNorm2d(5))
        self.head = nn.Sequential(nn.BatchNorm2d(5, affine=False), nn.Conv2d(5, 3, 1), nn.GroupNorm(1, 3, affine=False))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.block(h)).mean((2, 3))


def _statistics(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn = model.head[0]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_a_generator_with_default_instance_norms_is_traced_and_a_planted_permutation_undone():
    torch.manual_seed(0)
    a = _statistics(StyleNet())
    x = torch.randn(3, 2, 7, 7)
    table = cb.derive.describe(a, x)
    assert [n.affine for n in table.nodes if n.op == "norm"] == [False] * 5
    stream, inner = torch.randperm(5), torch.randperm(5)
    b = StyleNet().eval()
    with torch.no_grad():
        b.stem[1].weight.copy_(a.stem[1].weight[stream]), b.stem[1].bias.copy_(a.stem[1].bias[stream])
        b.block[1].weight.copy_(a.block[1].weight[inner][:, stream]), b.block[1].bias.copy_(a.block[1].bias[inner])
        b.block[5].weight.copy_(a.block[5].weight[stream][:, inner]), b.block[5].bias.copy_(a.block[5].bias[stream])
        b.head[0].running_mean.copy_(a.head[0].running_mean[stream])
        b.head[0].running_var.copy_(a.head[0].running_var[stream])
        b.head[1].weight.copy_(a.head[1].weight[:, stream]), b.head[1].bias.copy_(a.head[1].bias)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.n1(self.c1(x)))
        return self.fc(torch.relu(self.n2(self.c2(h))).mean((2, 3)))


def test_repair_rescales_only_learned_scales_and_leaves_an_end_model_as_it_is():
    torch.manual_seed(1)
    x = torch.randn(64, 2, 6, 6)
    y = torch.arange(64) % 3
    a = Mixed().eval()
    with torch.no_grad():  # statistics of the data: REPAIR's end statistics then match the model's own
        for m in (a.n1, a.n2):
            m.momentum = None
        a.train()(x)
    a.eval()
    pair = cb.ModelPair(a, Mixed().eval(), example_input=x[:4]).align("weight")
    assert "n2.weight" not in {e.name for e in pair.layout.entries}
    data = (x.numpy(), y.numpy())
    result = cb.sweep(pair, cb.Linear(), data=data, values=[0.0, 0.5], splits=["test"], repair="repair",
                      repair_data=data)
    loss = result["loss"].sel(split="test").squeeze().values
    with torch.no_grad():
        assert loss[0] == pytest.approx(float(torch.nn.functional.cross_entropy(a(x), y)), rel=1e-3)
    assert np.isfinite(loss[1])
    reset = cb.sweep(pair, cb.Linear(), data=data, values=[0.0], splits=["test"], repair="reset", repair_data=data)
    assert float(reset["loss"].sel(split="test").squeeze()) == pytest.approx(loss[0], rel=1e-3)


def test_instance_norm_with_running_statistics_is_refused_naming_it():
    class Tracked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 2)
            self.n = nn.InstanceNorm2d(4, track_running_stats=True)

        def forward(self, x):
            return self.fc(self.n(self.c(x)).mean((2, 3)))

    with pytest.raises(TracingError, match=r"InstanceNorm with running statistics"):
        cb.derive_spec(Tracked().eval(), torch.randn(2, 2, 6, 6))


# -- a user's flax network -------------------------------------------------------------------------
def test_flax_norms_without_scale_and_bias_are_traced_and_a_planted_permutation_undone():
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")

    class Plain(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.relu(linen.LayerNorm(use_scale=False, use_bias=False)(linen.Dense(12)(x)))
            h = linen.relu(linen.LayerNorm()(linen.Dense(10)(h)))
            return linen.Dense(3)(h)

    net = Plain()
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    variables = net.init(jax.random.PRNGKey(0), x)
    table = cb.derive.describe((net, variables), x)
    assert [n.affine for n in table.nodes if n.op == "norm"] == [False, True]
    flax_planted_permutation(net, variables, x)
