"""Channel concatenations (DenseNet, Inception): a layer reading one binds its input axis to the
parts' permutations as the segments of a packed axis.

References: plain numpy forward passes of layer tables on both backends, specs written by
hand, and permutations planted by hand (plain torch indexing) that weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from combinability.layout import FlatLayout
from tests.model_checks import table_logits
from tests.reference_nets import conv2d_general, relu

PAD1 = ((1, 1), (1, 1))

# -- a layer table: a dense block, then an Inception-style head on vectors ---------------------------
NODES = (
    Node("stem", "conv", units=5, kernel=3, padding=1),
    Node("c1", "conv", units=3, kernel=3, padding=1),
    Node("r1", "relu"),
    Node("cat1", "concat", ("stem", "r1")),
    Node("bn", "norm", norm="batchnorm"),
    Node("c2", "conv", units=4, kernel=(1, 3), padding=(0, 1)),
    Node("cat2", "concat", ("cat1", "c2")),
    Node("pool", "avgpool"),
    Node("fa", "dense", units=6),
    Node("ra", "relu"),
    Node("fb", "dense", ("pool",), units=2),
    Node("cat3", "concat", ("ra", "fb", "ra")),
    Node("out", "dense", units=4),
)
TABLE = LayerTable("dense_block", (2, 6, 6), 4, NODES)


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    def conv(name, x, padding=PAD1):
        return conv2d_general(x, p[f"{name}.weight"], p[f"{name}.bias"], (1, 1), padding, (1, 1), 1)

    stem = conv("stem", x)
    cat1 = np.concatenate([stem, relu(conv("c1", stem))], axis=1)
    scale = p["bn.weight"] / np.sqrt(p["bn.running_var"] + 1e-5)
    bn = (cat1 - p["bn.running_mean"][:, None, None]) * scale[:, None, None] + p["bn.bias"][:, None, None]
    cat2 = np.concatenate([cat1, conv("c2", bn, ((0, 0), (1, 1)))], axis=1)
    pool = cat2.mean(axis=(2, 3))
    ra = relu(pool @ p["fa.weight"].T + p["fa.bias"])
    fb = pool @ p["fb.weight"].T + p["fb.bias"]
    return np.concatenate([ra, fb, ra], axis=1) @ p["out.weight"].T + p["out.bias"]


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, dtype) in TABLE.parameters().items()
           if dtype == "float32"}
    out["bn.running_var"] = np.abs(out["bn.running_var"]) + 0.5
    return out


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_match_the_numpy_reference(backend):
    pytest.importorskip(backend)
    params = _params()
    x = np.random.default_rng(1).normal(size=(3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_spec_packs_the_parts_and_is_a_symmetry_of_the_reference():
    assert TABLE.shapes()["cat2"].channels == 12 and TABLE.shapes()["cat3"].channels == 14
    spec = TABLE.spec()
    parts = ("P_stem", "P_c1")
    assert spec.axes_to_perm["bn.weight"] == (parts,)
    assert spec.axes_to_perm["c2.weight"] == ("P_c2", parts, None, None)
    assert spec.axes_to_perm["fa.weight"] == ("P_fa", ("P_stem", "P_c1", "P_c2"))
    assert spec.axes_to_perm["out.weight"] == (None, ("P_fa", "P_fb", "P_fa"))  # a part used twice
    assert TABLE.activation_points() == {"P_stem": "stem", "P_c1": "r1", "P_c2": "c2", "P_fa": "ra", "P_fb": "fb"}
    params = {k: v.astype(np.float64) for k, v in _params(2).items()}
    x = np.random.default_rng(3).normal(size=(2, 2, 6, 6))
    perm = cb.random_permutation(spec, params, seed=5)
    permuted = cb.apply_permutation(spec, perm, params)
    assert not np.array_equal(permuted["bn.running_mean"], params["bn.running_mean"])
    np.testing.assert_allclose(_reference(permuted, x), _reference(params, x), rtol=1e-10, atol=1e-10)


def test_a_concatenation_with_a_fixed_part_is_fixed_whole():
    nodes = (Node("c", "conv", units=3, kernel=3, padding=1), Node("cat", "concat", ("<input>", "c")),
             Node("d", "conv", units=4, kernel=3, padding=1), Node("pool", "avgpool"), Node("out", "dense", units=2))
    spec = LayerTable("t", (2, 5, 5), 2, nodes).spec()
    assert spec.axes_to_perm["c.weight"][0] is None and spec.axes_to_perm["d.weight"] == ("P_d", None, None, None)
    # a sum of two concatenations split differently, [a | b] + [b | a]: its parts are cut where the other's
    # meet until pieces of one size meet, which here leaves single channels, tied: no unit can move
    nodes = (Node("a", "dense", units=3), Node("b", "dense", ("<input>",), units=2),
             Node("ab", "concat", ("a", "b")), Node("ba", "concat", ("b", "a")), Node("s", "add", ("ab", "ba")),
             Node("out", "dense", units=2))
    table = LayerTable("t", (4,), 2, nodes)
    spec = table.spec()
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=shape) for k, (shape, _) in table.parameters().items()}
    assert set(spec.perm_sizes(params).values()) == {1}
    with pytest.raises(ConfigurationError, match=r"a concatenation needs two or more inputs of one spatial size"):
        LayerTable("t", (2, 5, 5), 2, (Node("c", "conv", units=3, stride=2), Node("cat", "concat", ("<input>", "c")),
                                       Node("pool", "avgpool"), Node("out", "dense", units=2)))


# -- a user's torch DenseNet block ------------------------------------------------------------------
torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class DenseBlockNet(nn.Module):
    """A stem and two DenseNet layers (BN-ReLU-conv, output concatenated to the input), then BN and a head."""

    def __init__(self, stem: int = 6, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, padding=1)
        self.bn1, self.c1 = nn.BatchNorm2d(stem), nn.Conv2d(stem, growth, 3, padding=1)
        self.bn2, self.c2 = nn.BatchNorm2d(stem + growth), nn.Conv2d(stem + growth, growth, 3, padding=1)
        self.bn3, self.fc = nn.BatchNorm2d(stem + 2 * growth), nn.Linear(stem + 2 * growth, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.c1(F.relu(self.bn1(x)))], 1)
        x = torch.cat((x, self.c2(F.relu(self.bn2(x)))), dim=1)
        return self.fc(F.relu(self.bn3(x)).mean((2, 3)))


def _x(n: int = 5, seed: int = 0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32))


def _randomised(seed: int) -> DenseBlockNet:
    torch.manual_seed(seed)
    net = DenseBlockNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _planted(a: DenseBlockNet, seed: int) -> DenseBlockNet:
    """``a`` with the stem's (S), c1's (G1) and c2's (G2) channels shuffled by hand, the
    concatenated layers' inputs shuffled part by part."""
    g = torch.Generator().manual_seed(seed)
    s, g1, g2 = (torch.randperm(n, generator=g) for n in (6, 4, 4))
    sg1 = torch.cat([s, 6 + g1])
    sg1g2 = torch.cat([s, 6 + g1, 10 + g2])
    st = {k: v.clone() for k, v in a.state_dict().items()}

    def rows(name, p):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if f"{name}.{leaf}" in st:
                st[f"{name}.{leaf}"] = st[f"{name}.{leaf}"][p]

    rows("stem", s), rows("bn1", s), rows("c1", g1), rows("bn2", sg1), rows("c2", g2), rows("bn3", sg1g2)
    st["c1.weight"] = st["c1.weight"][:, s]
    st["c2.weight"] = st["c2.weight"][:, sg1]
    st["fc.weight"] = st["fc.weight"][:, sg1g2]
    b = DenseBlockNet().eval()
    b.load_state_dict(st)
    return b


def test_derived_spec_of_a_dense_block_is_the_hand_written_one():
    spec = cb.derive_spec(DenseBlockNet(), _x())
    bn = lambda name, p: {f"{name}.{leaf}": (p,) for leaf in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731
    want = {"stem.weight": ("P_stem", None, None, None), "stem.bias": ("P_stem",), **bn("bn1", "P_stem"),
            "c1.weight": ("P_c1", "P_stem", None, None), "c1.bias": ("P_c1",), **bn("bn2", ("P_stem", "P_c1")),
            "c2.weight": ("P_c2", ("P_stem", "P_c1"), None, None), "c2.bias": ("P_c2",),
            **bn("bn3", ("P_stem", "P_c1", "P_c2")), "fc.weight": (None, ("P_stem", "P_c1", "P_c2")),
            "fc.bias": (None,)}
    assert dict(spec.axes_to_perm) == want


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_hand_planted_permutation_is_undone_on_a_dense_block(method):
    a = _randomised(0)
    b = _planted(a, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(b(_x()).numpy(), a(_x()).numpy(), rtol=1e-4, atol=1e-5)
    data = (_x(64, 1).numpy(), np.arange(64) % 10)
    pair = cb.ModelPair(a, b, example_input=_x()).align(method, **({"data": data} if method == "activation" else {}))
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, rtol=0, atol=0)
    ds = cb.sweep(pair.naive, cb.Linear(), data=data, values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        want = F.cross_entropy(a(_x(64, 1)), torch.arange(64) % 10).item()
    assert float(ds["loss"].values[0, 1, 0]) == pytest.approx(want, rel=1e-4)  # B computes A's function


def test_a_concatenation_along_another_axis_is_refused_by_name():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.cat([self.c1(x), self.c2(x)], dim=2)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(TracingError, match=r"node 'cat'.*only concatenations along the channel axis.*got dim 2"):
        cb.derive_spec(Stacked(), _x())


def test_repair_weighs_each_concatenated_part_by_the_layer_that_made_it():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from combinability.repairs.batchnorm import channel_weights

    layout = FlatLayout.from_arrays(_params())
    v = np.random.default_rng(4).uniform(size=layout.size).astype(np.float32)
    ctx = SimpleNamespace(backend=cb.get_backend("torch"), layout=layout, table=TABLE)
    got = channel_weights(ctx, TABLE.node("bn"), torch.as_tensor(v)).numpy()
    arrays = layout.unflatten(v.astype(np.float64))

    def rows(name):  # each output channel's weight row and bias entry
        w = arrays[f"{name}.weight"]
        return np.concatenate([w.reshape(len(w), -1), arrays[f"{name}.bias"][:, None]], axis=1).mean(axis=1)

    np.testing.assert_allclose(got, np.concatenate([rows("stem"), rows("c1")]), rtol=1e-5)
