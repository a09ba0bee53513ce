"""Products of branches: squeeze-and-excitation gates (MobileNetV3, EfficientNet, SE-ResNet) and gated
units (SwiGLU), whose factors' channels move together; hard-swish and hard-sigmoid.

References: plain numpy forward passes of a layer table on both backends, specs written by
hand, and permutations planted by hand (plain torch indexing) that weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.layers import LayerTable, Node
from tests.model_checks import table_logits
from tests.reference_nets import conv2d_general, relu

NODES = (
    Node("stem", "conv", units=6, kernel=3, padding=1),
    Node("hs", "act", fn="hardswish"),
    Node("pool", "avgpool", keepdims=True),
    Node("fc1", "conv", units=3, kernel=1),
    Node("r", "relu"),
    Node("fc2", "conv", units=6, kernel=1),
    Node("gate", "act", fn="hardsigmoid"),
    Node("se", "mul", ("hs", "gate")),
    Node("gpool", "avgpool"),
    Node("flat", "flatten", ("gpool",)),
    Node("g", "dense", units=5),
    Node("silu", "act", fn="silu"),
    Node("u", "dense", ("flat",), units=5),
    Node("glu", "mul", ("silu", "u")),
    Node("out", "dense", units=4),
)
TABLE = LayerTable("gates", (2, 5, 5), 4, NODES)


def _hardsigmoid(x):
    return np.clip(x + 3, 0, 6) / 6


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    def conv(name, x, pad):
        return conv2d_general(x, p[f"{name}.weight"], p[f"{name}.bias"], (1, 1), ((pad, pad), (pad, pad)), (1, 1), 1)

    h = conv("stem", x, 1)
    h = h * _hardsigmoid(h)  # hard-swish
    s = h.mean(axis=(2, 3), keepdims=True)
    s = _hardsigmoid(conv("fc2", relu(conv("fc1", s, 0)), 0))
    v = (h * s).mean(axis=(2, 3))
    g = v @ p["g.weight"].T + p["g.bias"]
    u = v @ p["u.weight"].T + p["u.bias"]
    return (g / (1 + np.exp(-g)) * u) @ p["out.weight"].T + p["out.bias"]


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.7, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_match_the_numpy_reference(backend):
    pytest.importorskip(backend)
    params = _params()
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_a_gate_ties_its_factors_and_the_spec_is_a_symmetry_of_the_reference():
    assert TABLE.shapes()["pool"].spatial == (1, 1) and TABLE.shapes()["se"].spatial == (5, 5)
    spec = TABLE.spec()
    assert {p: set(a) for p, a in spec.perm_to_axes.items()} == {
        "P_stem": {("stem.weight", 0), ("stem.bias", 0), ("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0),
                   ("g.weight", 1), ("u.weight", 1)},
        "P_fc1": {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)},
        "P_g": {("g.weight", 0), ("g.bias", 0), ("u.weight", 0), ("u.bias", 0), ("out.weight", 1)},
    }
    params = {k: v.astype(np.float64) for k, v in _params(2).items()}
    x = np.random.default_rng(3).normal(size=(2, 2, 5, 5))
    permuted = cb.apply_permutation(spec, cb.random_permutation(spec, params, seed=5), params)
    np.testing.assert_allclose(_reference(permuted, x), _reference(params, x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ConfigurationError, match=r"a product needs two or more inputs of as many channels"):
        LayerTable("t", (2, 5, 5), 2, (Node("c", "conv", units=3), Node("m", "mul", ("<input>", "c")),
                                       Node("p", "avgpool"), Node("o", "dense", units=2)))


# -- a user's torch network with squeeze-and-excitation and a gated head ---------------------------
torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class SEConv(nn.Module):
    """torchvision's squeeze-and-excitation: pooled to 1 x 1, two 1 x 1 convs, a hard-sigmoid gate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class SELinear(nn.Module):
    """The other common form: a spatial mean, two linear layers, viewed as (b, c, 1, 1) and expanded."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x):
        b, c, _, _ = x.shape
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))).view(b, c, 1, 1)
        return x * y.expand_as(x)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1, self.dw, self.se2 = SEConv(8), nn.Conv2d(8, 8, 3, padding=1, groups=8), SELinear(8)
        self.pool, self.out = nn.AdaptiveAvgPool2d(1), nn.Linear(12, 10)
        self.g, self.u = nn.Linear(8, 12), nn.Linear(8, 12)

    def forward(self, x):
        x = self.se1(F.hardswish(self.bn(self.stem(x))))
        x = x + self.se2(F.relu(self.dw(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.out(F.silu(self.g(x)) * self.u(x))  # SwiGLU


def _x(n: int = 5, seed: int = 0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32))


def _planted(a: GatedNet, seed: int) -> GatedNet:
    """``a`` with its stream (S), both gates' hidden units (H1, H2) and the gated head's units (G) shuffled by hand."""
    g = torch.Generator().manual_seed(seed)
    s, h1, h2, gu = (torch.randperm(n, generator=g) for n in (8, 4, 4, 12))
    st = {k: v.clone() for k, v in a.state_dict().items()}

    def rows(name, p):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if f"{name}.{leaf}" in st:
                st[f"{name}.{leaf}"] = st[f"{name}.{leaf}"][p]

    def cols(name, p):
        st[f"{name}.weight"] = st[f"{name}.weight"][:, p]

    rows("stem", s), rows("bn", s), cols("se1.fc1", s), rows("se1.fc2", s), rows("dw", s), cols("se2.fc1", s)
    rows("se2.fc2", s), cols("g", s), cols("u", s)
    rows("se1.fc1", h1), cols("se1.fc2", h1), rows("se2.fc1", h2), cols("se2.fc2", h2)
    rows("g", gu), rows("u", gu), cols("out", gu)
    b = GatedNet().eval()
    b.load_state_dict(st)
    return b


def test_derived_spec_ties_the_gates_to_the_stream():
    spec = cb.derive_spec(GatedNet(), _x())
    stream = {("stem.weight", 0), ("stem.bias", 0), *{(f"bn.{k}", 0) for k in ("weight", "bias", "running_mean",
                                                                              "running_var")},
              ("se1.fc1.weight", 1), ("se1.fc2.weight", 0), ("se1.fc2.bias", 0), ("dw.weight", 0), ("dw.bias", 0),
              ("se2.fc1.weight", 1), ("se2.fc2.weight", 0), ("se2.fc2.bias", 0), ("g.weight", 1), ("u.weight", 1)}
    assert sorted(map(sorted, (set(v) for v in spec.perm_to_axes.values()))) == sorted(map(sorted, [
        stream, {("se1.fc1.weight", 0), ("se1.fc1.bias", 0), ("se1.fc2.weight", 1)},
        {("se2.fc1.weight", 0), ("se2.fc1.bias", 0), ("se2.fc2.weight", 1)},
        {("g.weight", 0), ("g.bias", 0), ("u.weight", 0), ("u.bias", 0), ("out.weight", 1)}]))


def _gated_net() -> GatedNet:
    """A GatedNet (seed 0) with BatchNorm statistics away from the identity."""
    torch.manual_seed(0)
    a = GatedNet().eval()
    with torch.no_grad():
        a.bn.running_mean.normal_(0, 0.3)
        a.bn.running_var.uniform_(0.5, 2.0)
    return a


def test_a_hand_planted_permutation_is_undone_on_a_gated_net():
    a = _gated_net()
    b = _planted(a, seed=2)
    with torch.no_grad():
        np.testing.assert_allclose(b(_x()).numpy(), a(_x()).numpy(), rtol=1e-4, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=_x()).align("weight", seed=0)
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)


def test_activation_points_skip_gates_that_only_multiply():
    """A squeeze-and-excitation gate (read only by the product) barely tells channels apart: the stream is read
    at the last activation that is not a gate, a gated unit at its product."""
    assert TABLE.activation_points() == {"P_stem": "hs", "P_fc1": "r", "P_g": "glu"}


def test_activation_matching_undoes_a_hand_planted_permutation_on_a_gated_net():
    """Read at its sigmoid gate, the stream's channels were told apart by a function of 4 hidden units, and a
    planted permutation came back wrong (max |B − A| ≈ 1 on random weights)."""
    a = _gated_net()
    b = _planted(a, seed=3)
    x = _x(256, seed=1)
    pair = cb.ModelPair(a, b, example_input=_x())
    assert pair.feature_points["P_stem"] != "sigmoid"
    aligned = pair.align("activation", data=(x.numpy(), np.zeros(len(x), np.int64)))
    g = torch.Generator().manual_seed(3)  # _planted's draws: B's unit i is A's unit s[i]
    s, _, _, gu = (torch.randperm(n, generator=g).numpy() for n in (8, 4, 4, 12))
    np.testing.assert_array_equal(aligned.permutation["P_stem"], np.argsort(s))
    np.testing.assert_array_equal(aligned.permutation["P_g"], np.argsort(gu))
    # (two of each gate's four hidden units are dead on these inputs: ties no correlation can break)
