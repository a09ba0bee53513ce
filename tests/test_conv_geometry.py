"""Convolutions beyond square, ungrouped and evenly padded ones: non-square kernels and strides,
per-side padding, dilation, depthwise and grouped convolutions.

References: a plain numpy convolution (:func:`tests.reference_nets.conv2d_general`) for the
layer tables' forward passes on both backends, specs written by hand, and permutations
planted by hand (plain torch indexing) that weight matching must undo exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.kinds import Blocks
from combinability.layers import LayerTable, Node
from combinability.permutation import Repeat
from tests.model_checks import table_logits
from tests.reference_nets import conv2d_general, relu

# -- layer tables: both backends against the numpy reference ---------------------------------------
NODES = (
    Node("row", "conv", units=6, kernel=(1, 5), padding=(0, 2)),
    Node("a1", "relu"),
    Node("dw", "conv", units=6, kernel=3, padding=1, groups=6),
    Node("a2", "act", fn="tanh"),
    Node("dil", "conv", units=6, kernel=3, padding=2, dilation=2),
    Node("a3", "relu"),
    Node("asym", "conv", units=8, kernel=(2, 3), stride=(2, 1), padding=((0, 1), (1, 1))),
    Node("grp", "conv", units=8, kernel=3, padding=1, groups=2, bias=False),
    Node("a4", "relu"),
    Node("pool", "avgpool"),
    Node("out", "dense", units=5),
)
TABLE = LayerTable("geometry", (3, 9, 7), 5, NODES)


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    x = relu(conv2d_general(x, p["row.weight"], p["row.bias"], (1, 1), ((0, 0), (2, 2)), (1, 1), 1))
    x = np.tanh(conv2d_general(x, p["dw.weight"], p["dw.bias"], (1, 1), ((1, 1), (1, 1)), (1, 1), 6))
    x = relu(conv2d_general(x, p["dil.weight"], p["dil.bias"], (1, 1), ((2, 2), (2, 2)), (2, 2), 1))
    x = conv2d_general(x, p["asym.weight"], p["asym.bias"], (2, 1), ((0, 1), (1, 1)), (1, 1), 1)
    x = relu(conv2d_general(x, p["grp.weight"], None, (1, 1), ((1, 1), (1, 1)), (1, 1), 2))
    return x.mean(axis=(2, 3)) @ p["out.weight"].T + p["out.bias"]


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}


def test_table_shapes_follow_the_geometry():
    shapes = TABLE.shapes()
    assert shapes["row"].spatial == (9, 7) and shapes["dil"].spatial == (9, 7)
    assert shapes["asym"].spatial == (5, 7)  # (9 + 1 - 2) // 2 + 1, (7 + 2 - 3) + 1
    params = TABLE.parameters()
    assert params["row.weight"][0] == (6, 3, 1, 5)
    assert params["dw.weight"][0] == (6, 1, 3, 3)
    assert params["grp.weight"][0] == (8, 4, 3, 3)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_match_the_numpy_convolution(backend):
    pytest.importorskip(backend)
    params = _params()
    x = np.random.default_rng(1).normal(size=(4, 3, 9, 7)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_spec_keeps_depthwise_spaces_and_moves_grouped_ones_by_blocks():
    spec = TABLE.spec()
    assert {p: set(axes) for p, axes in spec.perm_to_axes.items()} == {
        "P_row": {("row.weight", 0), ("row.bias", 0), ("dw.weight", 0), ("dw.bias", 0), ("dil.weight", 1)},
        "P_dil": {("dil.weight", 0), ("dil.bias", 0), ("asym.weight", 1)},
        "P_grp": {("grp.weight", 0), ("out.weight", 1)},
    }
    # the grouped conv's output: its 2 groups move whole and channels move within them; its input
    # (asym's output) moves whole groups only, in the same order
    assert dict(spec.kinds) == {"P_grp": Blocks("P_grp/groups", 2, 4)}
    assert spec.axes_to_perm["asym.weight"][0] == Repeat("P_grp/groups", 4)
    assert spec.axes_to_perm["grp.weight"][1] is None
    # the spec is a symmetry of the numpy reference network
    params = {k: v.astype(np.float64) for k, v in _params(2).items()}
    x = np.random.default_rng(3).normal(size=(3, 3, 9, 7))
    permuted = cb.apply_permutation(spec, cb.random_permutation(spec, params, seed=5), params)
    assert not np.array_equal(permuted["dw.weight"], params["dw.weight"])
    np.testing.assert_allclose(_reference(permuted, x), _reference(params, x), rtol=1e-10, atol=1e-10)


def test_bad_conv_geometry_is_refused_with_what_is_valid():
    with pytest.raises(ConfigurationError, match=r"groups must be an int >= 1 dividing its 6 units"):
        Node("c", "conv", units=6, groups=4)
    with pytest.raises(ConfigurationError, match=r"kernel must be an int >= 1 or a \(height, width\) pair"):
        Node("c", "conv", units=6, kernel=(0, 3))
    with pytest.raises(ConfigurationError, match=r"padding must be an int >= 0"):
        Node("c", "conv", units=6, padding=((1, -1), (0, 0)))
    with pytest.raises(ConfigurationError, match=r"only a conv node takes \(height, width\) pairs"):
        Node("p", "maxpool", kernel=(2, 3))
    with pytest.raises(ConfigurationError, match=r"3 input channels do not split into groups=2"):
        LayerTable("t", (3, 4, 4), 2, (Node("c", "conv", units=4, groups=2), Node("p", "avgpool"),
                                       Node("o", "dense", units=2)))


# -- a user's torch model -------------------------------------------------------------------------
torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class MobileBlockNet(nn.Module):
    """A MobileNetV2-style inverted residual block, factorised and dilated convs, an unevenly
    padded one (``padding="same"`` with an even kernel) and a grouped one."""

    def __init__(self, w: int = 6) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.expand, self.bn1 = nn.Conv2d(w, 2 * w, 1), nn.BatchNorm2d(2 * w)
        self.dw, self.bn2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False), nn.BatchNorm2d(2 * w)
        self.project, self.bn3 = nn.Conv2d(2 * w, w, 1, bias=False), nn.BatchNorm2d(w)
        self.row, self.col = nn.Conv2d(w, w, (1, 5), padding=(0, 2)), nn.Conv2d(w, w, (5, 1), padding=(2, 0))
        self.dilated = nn.Conv2d(w, w, 3, padding=2, dilation=2)
        self.even = nn.Conv2d(w, w, 4, padding="same")
        self.grouped = nn.Conv2d(w, w, 3, padding=1, groups=2)
        self.fc = nn.Linear(w, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        x = x + self.bn3(self.project(h))
        x = F.relu(self.col(F.relu(self.row(x))))
        x = F.relu(self.even(F.relu(self.dilated(x))))
        return self.fc(self.grouped(x).mean((2, 3)))


def _x(n: int = 5, seed: int = 0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32))


def _randomised(seed: int) -> MobileBlockNet:
    torch.manual_seed(seed)
    net = MobileBlockNet()
    with torch.no_grad():  # running statistics away from (0, 1), so that permuting them matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


BN = ("weight", "bias", "running_mean", "running_var")


def _planted(a: MobileBlockNet, seed: int) -> MobileBlockNet:
    """``a`` with its stem/residual (S), expanded (E), row (R), column (C) and dilated (D) channels
    shuffled by hand, and the grouped conv's two groups swapped: its input channels (``even``'s
    output) in whole blocks, its output channels by blocks and within them."""
    g = torch.Generator().manual_seed(seed)
    s, e, r, c, d = (torch.randperm(n, generator=g) for n in (6, 12, 6, 6, 6))
    st = {k: v.clone() for k, v in a.state_dict().items()}

    def rows(name, p):
        st[f"{name}.weight"] = st[f"{name}.weight"][p]
        if f"{name}.bias" in st:
            st[f"{name}.bias"] = st[f"{name}.bias"][p]

    def cols(name, p):
        st[f"{name}.weight"] = st[f"{name}.weight"][:, p]

    def norm(name, p):
        for leaf in BN:
            st[f"{name}.{leaf}"] = st[f"{name}.{leaf}"][p]

    rows("stem", s), norm("bn0", s), cols("expand", s), rows("project", s), norm("bn3", s), cols("row", s)
    rows("expand", e), norm("bn1", e), rows("dw", e), norm("bn2", e), cols("project", e)
    rows("row", r), cols("col", r)
    rows("col", c), cols("dilated", c)
    rows("dilated", d), cols("even", d)
    blocks, within = torch.tensor([3, 4, 5, 0, 1, 2]), torch.tensor([5, 3, 4, 1, 2, 0])
    rows("even", blocks), rows("grouped", within), cols("fc", within)
    b = MobileBlockNet().eval()
    b.load_state_dict(st)
    return b


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")  # torch on the user's own conv
def test_derived_spec_of_a_mobile_block_net_is_the_hand_written_one():
    spec = cb.derive_spec(MobileBlockNet(), _x())
    bn = lambda name: {(f"{name}.{leaf}", 0) for leaf in BN}  # noqa: E731
    want = [
        {("stem.weight", 0), ("stem.bias", 0), *bn("bn0"), ("expand.weight", 1), ("project.weight", 0), *bn("bn3"),
         ("row.weight", 1)},
        {("expand.weight", 0), ("expand.bias", 0), *bn("bn1"), ("dw.weight", 0), *bn("bn2"), ("project.weight", 1)},
        {("row.weight", 0), ("row.bias", 0), ("col.weight", 1)},
        {("col.weight", 0), ("col.bias", 0), ("dilated.weight", 1)},
        {("dilated.weight", 0), ("dilated.bias", 0), ("even.weight", 1)},
        {("grouped.weight", 0), ("grouped.bias", 0), ("fc.weight", 1)},
    ]
    assert sorted(map(sorted, (set(v) for v in spec.perm_to_axes.values()))) == sorted(map(sorted, want))
    assert dict(spec.kinds) == {"P_grouped": Blocks("P_grouped/groups", 2, 3)}
    assert dict(spec.repeats) == {"P_grouped/groups": [("even.weight", 0, 3), ("even.bias", 0, 3)]}


def test_a_hand_planted_permutation_is_undone_on_a_mobile_block_net():
    a = _randomised(0)
    b = _planted(a, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(b(_x()).numpy(), a(_x()).numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(b.dw.weight, a.dw.weight)
    pair = cb.ModelPair(a, b, example_input=_x()).align("weight", seed=0)
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)
    ds = cb.sweep(pair.naive, cb.Linear(), data=(_x(40, 1).numpy(), np.arange(40) % 10), values=[0.0, 1.0],
                  splits=["test"])
    with torch.no_grad():
        want = F.cross_entropy(a(_x(40, 1)), torch.arange(40) % 10).item()
    assert float(ds["loss"].values[0, 0, 0]) == pytest.approx(want, rel=1e-5)
    assert float(ds["loss"].values[0, 1, 0]) == pytest.approx(want, rel=1e-4)  # B computes A's function


def test_a_conv_padded_by_reflection_before_a_flatten_is_traced_and_verified():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(256, 3))
    spec = cb.derive_spec(net, _x())  # verified: a random permutation of the spec keeps the outputs
    assert spec.axes_to_perm["2.weight"] == (None, Repeat(spec.axes_to_perm["0.weight"][0], 64))
