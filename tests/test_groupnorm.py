"""GroupNorm networks keep their channel symmetry as block permutations: groups move whole, and
channels move within their group (:class:`combinability.kinds.Blocks`).

References: a hand-written GroupNorm in numpy, permutations planted by hand (plain torch indexing
over groups and within groups), the models' own forward passes, and an exhaustive search of the
block assignment on small costs.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb
from combinability.kind_matching import block_assignment
from combinability.kinds import Blocks
from combinability.layers import LayerTable, Node
from tests.model_checks import randomised

GROUPS, WIDTH = 2, 6


class GroupNormNet(nn.Module):
    """conv → GN → ReLU, a residual block (conv → GN → ReLU → conv → GN, added), mean pool, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(2, WIDTH, 3, padding=1), nn.GroupNorm(GROUPS, WIDTH)
        self.conv2, self.norm2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.GroupNorm(GROUPS, WIDTH)
        self.conv3, self.norm3 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.GroupNorm(GROUPS, WIDTH)
        self.fc = nn.Linear(WIDTH, 4)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(x)))
        return self.fc(F.relu(x + self.norm3(self.conv3(h))).mean((2, 3)))


def _x(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, 5, 5, generator=torch.Generator().manual_seed(seed))


def _group_norm(x: np.ndarray, groups: int, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def _block_perm(sigma: list[int], inner: list[list[int]], size: int) -> torch.Tensor:
    """Channel ``i * size + a`` of the result is channel ``sigma[i] * size + inner[i][a]``."""
    return torch.tensor([sigma[i] * size + inner[i][a] for i in range(len(sigma)) for a in range(size)])


def _planted(a: GroupNormNet, stream: torch.Tensor, hidden: torch.Tensor) -> GroupNormNet:
    """``a`` with its stream channels (conv1, norm1, conv3, norm3) and its hidden channels (conv2, norm2)
    permuted by hand."""
    b = copy.deepcopy(a)
    with torch.no_grad():
        for conv, norm, rows, cols in ((b.conv1, b.norm1, stream, None), (b.conv2, b.norm2, hidden, stream),
                                       (b.conv3, b.norm3, stream, hidden)):
            w = conv.weight[rows]
            conv.weight.copy_(w if cols is None else w[:, cols])
            conv.bias.copy_(conv.bias[rows])
            norm.weight.copy_(norm.weight[rows])
            norm.bias.copy_(norm.bias[rows])
        b.fc.weight.copy_(b.fc.weight[:, stream])
    return b


def test_the_numpy_group_norm_is_torchs():
    x = _x().numpy()
    w, b = np.linspace(0.5, 1.5, 2), np.linspace(-1, 1, 2)
    want = F.group_norm(torch.tensor(x), 2, torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    np.testing.assert_allclose(_group_norm(x, 2, w, b), want.numpy(), rtol=1e-4, atol=1e-5)


def test_only_block_permutations_keep_a_group_norms_function():
    """The symmetry the spec declares is the real one: moving groups whole and channels within their
    group keeps GroupNorm's output (moved alike); a swap of two channels of different groups does not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 4, 4))
    w, b = rng.normal(size=6), rng.normal(size=6)
    out = _group_norm(x, 2, w, b)
    block = _block_perm([1, 0], [[2, 0, 1], [1, 2, 0]], 3).numpy()
    np.testing.assert_allclose(_group_norm(x[:, block], 2, w[block], b[block]), out[:, block], atol=1e-12)
    across = np.array([3, 1, 2, 0, 4, 5])
    assert not np.allclose(_group_norm(x[:, across], 2, w[across], b[across]), out[:, across], atol=1e-3)


def test_a_group_normalised_space_is_a_block_permutation_of_its_groups():
    spec = cb.derive_spec(GroupNormNet(), _x())
    assert dict(spec.kinds) == {"P_conv1": Blocks("P_conv1/groups", GROUPS, WIDTH // GROUPS),
                                "P_conv2": Blocks("P_conv2/groups", GROUPS, WIDTH // GROUPS)}
    assert spec.axes_to_perm["norm3.weight"] == ("P_conv1",) and spec.axes_to_perm["conv3.weight"][:2] == (
        "P_conv1", "P_conv2")
    assert cb.PermutationSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(("nodes", "fixed"), [
    # two GroupNorms of different group counts on one residual stream: no block structure fits both
    ((Node("c1", "conv", units=8, kernel=3, padding=1), Node("g1", "norm", norm="groupnorm", groups=2),
      Node("c2", "conv", units=8, kernel=3, padding=1), Node("g2", "norm", norm="groupnorm", groups=4),
      Node("sum", "add", inputs=("g1", "g2")), Node("pool", "avgpool"), Node("out", "dense", units=3)),
     {"P_c1"}),
    # a GroupNorm over a concatenation: its groups straddle the parts
    ((Node("c1", "conv", units=4, kernel=3, padding=1), Node("c2", "conv", units=4, kernel=3, padding=1,
                                                              inputs=("<input>",)),
      Node("cat", "concat", inputs=("c1", "c2")), Node("g", "norm", norm="groupnorm", groups=2),
      Node("pool", "avgpool"), Node("out", "dense", units=3)),
     {"P_c1", "P_c2"}),
])
def test_groups_that_no_block_permutation_respects_leave_the_space_in_place(nodes, fixed):
    spec = LayerTable("t", (2, 5, 5), 3, nodes).spec()
    assert not spec.kinds
    assert fixed.isdisjoint(spec.perm_names)


def test_a_planted_block_permutation_is_undone_by_weight_and_activation_matching():
    torch.manual_seed(0)
    a = randomised(GroupNormNet(), 1)
    b = _planted(a, _block_perm([1, 0], [[2, 0, 1], [1, 2, 0]], 3), _block_perm([1, 0], [[0, 2, 1], [2, 1, 0]], 3))
    x = _x()
    with torch.no_grad():
        np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(b.conv2.weight, a.conv2.weight)
    pair = cb.ModelPair(a, b, example_input=x)
    for method, options in (("weight", {}), ("activation", {"data": (_x(200, 1).numpy(), np.zeros(200, int))})):
        aligned = pair.align(method, **options)
        np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)
        assert aligned.permutation["P_conv1/groups"].tolist() == [1, 0]


def test_a_flax_group_norm_net_gets_the_same_blocks_and_a_planted_permutation_is_undone():
    flax_nn = pytest.importorskip("flax.linen")
    from tests.model_checks import flax_planted_permutation, flax_variables

    class FlaxGroupNormNet(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = flax_nn.relu(flax_nn.GroupNorm(num_groups=GROUPS)(flax_nn.Conv(WIDTH, (3, 3))(x)))
            h = flax_nn.relu(flax_nn.GroupNorm(num_groups=GROUPS)(flax_nn.Conv(WIDTH, (3, 3))(x)))
            x = flax_nn.relu(x + flax_nn.GroupNorm(num_groups=GROUPS)(flax_nn.Conv(WIDTH, (3, 3))(h)))
            return flax_nn.Dense(4)(x.mean((1, 2)))

    net, x = FlaxGroupNormNet(), _x().numpy().transpose(0, 2, 3, 1)
    variables = flax_variables(net, x, 0)
    spec = cb.derive_spec((net, variables), x)
    assert sorted((k.blocks, k.size) for k in spec.kinds.values()) == [(GROUPS, WIDTH // GROUPS)] * 2
    flax_planted_permutation(net, variables, x)


def test_block_assignment_is_the_exhaustive_maximum():
    rng = np.random.default_rng(3)
    h, s = 3, 2
    costs = {"m": (rng.normal(size=(h * s, h * s)), s), "n": (rng.normal(size=(h * s, h * s)), s)}
    group = rng.normal(size=(h, h))
    got = block_assignment("g", group, costs)

    def value(sigma, units):
        return group[np.arange(h), sigma].sum() + sum(c[np.arange(h * s), units[m]].sum()
                                                      for m, (c, _) in costs.items())

    best = -np.inf
    inner = list(itertools.permutations(range(s)))
    for sigma in itertools.permutations(range(h)):
        for m_inner in itertools.product(inner, repeat=h):
            for n_inner in itertools.product(inner, repeat=h):
                units = {m: _block_perm(list(sigma), [list(t) for t in tau], s).numpy()
                         for m, tau in (("m", m_inner), ("n", n_inner))}
                best = max(best, value(np.array(sigma), units))
    assert value(got["g"], got) == pytest.approx(best, abs=1e-12)
    for m in costs:  # blocks move whole, as the group does
        assert (got[m].reshape(h, s) // s == got["g"][:, None]).all()


def test_aligning_models_with_no_permutation_says_so():
    """A grouped conv on the input: its groups read the input's channels in place, so its blocks cannot
    move, and it has the only hidden space."""
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3)).eval()

    pair = cb.ModelPair(net(0), net(1), example_input=_x())
    assert not pair.spec.perm_names
    with pytest.warns(cb.NothingToAlignWarning, match="'weight' alignment leaves the models as they are"):
        aligned = pair.align("weight")
    np.testing.assert_array_equal(aligned.theta_b, pair.theta_b)


def test_an_affine_instance_norm_is_a_group_norm_with_a_group_per_channel():
    """InstanceNorm2d(affine=True) normalises each channel alone: any permutation of its channels keeps it."""
    def net():
        return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.InstanceNorm2d(5, affine=True), nn.ReLU(),
                             nn.Conv2d(5, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))

    a = randomised(net(), 2)
    spec = cb.derive_spec(a, _x())
    assert not spec.kinds and spec.axes_to_perm["1.weight"] == ("P_0",)
    rows = torch.tensor([3, 0, 4, 1, 2])
    b = copy.deepcopy(a)
    with torch.no_grad():
        for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
            b.get_parameter(name).copy_(a.get_parameter(name)[rows])
        b[3].weight.copy_(a[3].weight[:, rows])
        np.testing.assert_allclose(b(_x()).numpy(), a(_x()).numpy(), rtol=1e-4, atol=1e-5)
    aligned = cb.ModelPair(a, b, example_input=_x()).align("weight")
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def test_a_flax_instance_norm_is_a_group_norm_with_a_group_per_channel():
    flax_nn = pytest.importorskip("flax.linen")
    from tests.model_checks import flax_planted_permutation, flax_variables

    class FlaxInstanceNormNet(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = flax_nn.relu(flax_nn.InstanceNorm()(flax_nn.Conv(5, (3, 3))(x)))
            return flax_nn.Dense(4)(flax_nn.Conv(5, (3, 3))(x).mean((1, 2)))

    net, x = FlaxInstanceNormNet(), _x().numpy().transpose(0, 2, 3, 1)
    variables = flax_variables(net, x, 0)
    spec = cb.derive_spec((net, variables), x)
    assert not spec.kinds and spec.axes_to_perm["InstanceNorm_0.weight"] == ("P_Conv_0",)
    flax_planted_permutation(net, variables, x)
