"""Parts of a map's channels and reductions over them: a gated convolution's halves, ``tanh(a) *
sigmoid(b)`` of ``x.chunk(2, dim=1)`` (WaveNet's gate; ``x.split``, ``x[:, :c]`` alike), and CBAM's
spatial attention, the mean and maximum over the channels at each position turned into one factor that
scales every channel.

References: plain numpy forward passes of layer tables on both backends, the spec written by hand (the
gate's two halves move by one permutation), the user's module run in float64 with a random
transformation of the derived spec, which weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import assert_random_transformation_undone, randomised, table_logits
from tests.reference_nets import conv2d_general

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

GATED = LayerTable("gated", (2, 5, 5), 3, (
    Node("c1", "conv", units=8, kernel=3, padding=1),
    Node("a", "slice", channel_range=(0, 4)), Node("ta", "act", fn="tanh"),
    Node("b", "slice", inputs=("c1",), channel_range=(4, 8)), Node("sb", "act", fn="sigmoid"),
    Node("gate", "mul", inputs=("ta", "sb")),
    Node("mean", "channel_reduce", fn="mean"), Node("max", "channel_reduce", inputs=("gate",), fn="max"),
    Node("both", "concat", inputs=("mean", "max")), Node("sa", "conv", units=1, kernel=3, padding=1),
    Node("att", "act", fn="sigmoid"), Node("scaled", "mul", inputs=("gate", "att")),
    Node("pool", "avgpool"), Node("fc", "dense", units=3)))


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A 3 x 3 convolution with padding 1, channels-first (the tests' numpy reference)."""
    return conv2d_general(x, w, b, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = _conv(x, p["c1.weight"], p["c1.bias"])
    gate = np.tanh(h[:, :4]) / (1 + np.exp(-h[:, 4:]))
    both = np.concatenate([gate.mean(1, keepdims=True), gate.max(1, keepdims=True)], 1)
    att = 1 / (1 + np.exp(-_conv(both, p["sa.weight"], p["sa.bias"])))
    return (gate * att).mean((2, 3)) @ p["fc.weight"].T + p["fc.bias"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_slices_channel_reductions_and_spread_factors_match_numpy_on_both_backends(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in GATED.parameters().items()}
    x = rng.normal(size=(3, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, GATED, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_a_gates_two_halves_move_by_one_permutation_and_the_attention_reads_no_channel_order():
    gate = ("P_c1.0-4", "P_c1.0-4")
    assert GATED.spec().axes_to_perm == {  # the attention conv reads the reductions' fixed channels
        "c1.weight": (gate, None, None, None), "c1.bias": (gate,),
        "sa.weight": ("P_sa", None, None, None), "sa.bias": ("P_sa",),
        "fc.weight": (None, "P_c1.0-4"), "fc.bias": (None,)}


def test_a_slice_node_checks_its_range():
    with pytest.raises(ConfigurationError, match=r"a slice node takes the channels \(start, stop\) of its input"):
        Node("s", "slice", channel_range=(3, 3))
    with pytest.raises(ConfigurationError, match=r"channels 2:9 of an input of 8 channels"):
        LayerTable("t", (1, 4, 4), 2, (Node("c", "conv", units=8), Node("s", "slice", channel_range=(2, 9)),
                                       Node("p", "avgpool"), Node("fc", "dense", units=2))).shapes()
    with pytest.raises(ConfigurationError, match=r"the fn of channel_reduce nodes is one of 'mean', 'max'"):
        Node("r", "channel_reduce")


class Gated(nn.Module):
    """WaveNet's gated activation on a conv's two halves, cut three ways."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        self.cut = cut
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        h = self.c1(x)
        if self.cut == "chunk":
            a, b = h.chunk(2, dim=1)
        elif self.cut == "split":
            a, b = torch.split(h, [4, 4], dim=1)
        else:
            a, b = h[:, :4], h[:, 4:]
        return self.fc(F.relu(self.c2(torch.tanh(a) * torch.sigmoid(b))).mean((2, 3)))


class CBAM(nn.Module):
    """A conv, CBAM's spatial attention (mean and max over the channels, a 7 x 7 conv, a sigmoid), a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.sa = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(2, 1, 7, padding=3)
        self.c2, self.fc = nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        pooled = torch.cat([torch.mean(h, dim=1, keepdim=True), torch.max(h, dim=1, keepdim=True)[0]], dim=1)
        h = h * torch.sigmoid(self.sa(pooled))
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("model, moved", [(Gated("chunk"), "c1.weight"), (Gated("split"), "c1.weight"),
                                          (Gated("index"), "c1.weight"), (CBAM(), "c2.weight")])
def test_users_gated_and_attentive_cnns_are_traced_and_a_transformation_undone(model, moved):
    model = randomised(model, 0)
    x = torch.randn(3, 1, 6, 6)
    table = cb.derive.describe(model, x)
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, table.spec(), state, x, moved)


class ChunkOverPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        top, bottom = self.c1(x).chunk(2, dim=2)
        return self.fc((top * bottom).mean((2, 3)))


def test_a_split_of_another_axis_is_refused_by_name():
    with pytest.raises(TracingError, match=r"a split the tracer follows cuts the channels \(dim 1\)"):
        cb.derive.describe(ChunkOverPositions(), torch.randn(2, 1, 6, 6))


def test_flax_gates_and_spatial_attention_are_traced_and_a_planted_permutation_undone():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp

    from tests.model_checks import flax_planted_permutation, flax_variables

    class GatedAttentive(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            a, b = jnp.split(fnn.Conv(8, (3, 3))(x), 2, axis=-1)
            h = jnp.tanh(a) * jax.nn.sigmoid(b)
            pooled = jnp.concatenate([jnp.mean(h, axis=-1, keepdims=True), jnp.max(h, axis=-1, keepdims=True)], -1)
            h = h * jax.nn.sigmoid(fnn.Conv(1, (3, 3))(pooled))
            return fnn.Dense(3)(jnp.mean(fnn.relu(fnn.Conv(5, (3, 3))(h[..., 1:])), axis=(1, 2)))

    net = GatedAttentive()
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 1)).astype(np.float32)
    variables = flax_variables(net, x, seed=0)
    table = cb.derive.describe((net, variables), x)
    assert [n.op for n in table.nodes if n.op in ("slice", "channel_reduce")] == \
        ["slice", "slice", "channel_reduce", "channel_reduce", "slice"]
    # the gate's halves move alike, each cut where the last conv's slice starts
    pieces = ("P_Conv_0.0-4.0-1", "P_Conv_0.0-4.1-4")
    assert table.spec().axes_to_perm["Conv_0.weight"][0] == (*pieces, *pieces)
    flax_planted_permutation(net, variables, x)


class GhostModule(nn.Module):
    """GhostNet's module as huawei-noah/ghostnet writes it: a primary conv, a cheap depthwise conv of its
    output, both concatenated and cut to ``oup`` channels (a cut inside the second copy when ``oup`` is odd,
    a slice that keeps every channel when it is even)."""

    def __init__(self, inp: int, oup: int) -> None:
        super().__init__()
        self.oup, init = oup, -(-oup // 2)
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, init, 1, bias=False), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap_operation = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False),
                                             nn.BatchNorm2d(init), nn.ReLU())

    def forward(self, x):
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, :self.oup, :, :]


class Ghost(nn.Module):
    def __init__(self, oup: int) -> None:
        super().__init__()
        self.stem, self.g, self.fc = nn.Conv2d(2, 6, 3, padding=1), GhostModule(6, oup), nn.Linear(oup, 3)
        self.pooler = nn.Linear(oup, oup)  # never called by forward: carried along untouched

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.g(F.relu(self.stem(x))), 1), 1))


@pytest.mark.parametrize("oup", [7, 8])
def test_ghostnets_sliced_concatenation_is_traced_and_a_transformation_undone(oup):
    model = randomised(Ghost(oup), 3)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    spec = cb.derive_spec(model, x)
    if oup == 7:  # the cut falls inside the second copy: pieces of 3 and 1 channels, read as (3, 1, 3) by fc
        pieces = spec.axes_to_perm["fc.weight"][1]
        assert len(pieces) == 3 and pieces[0] == pieces[2] != pieces[1]
        assert spec.perm_sizes({k: v.numpy() for k, v in model.state_dict().items()})[pieces[0]] == 3
    assert "pooler.weight" not in spec.axes_to_perm
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, spec, state, x, "g.primary_conv.0.weight")
    other = randomised(Ghost(oup), 4)
    pair = cb.ModelPair(model, other, example_input=x).align("weight")
    with torch.no_grad():
        np.testing.assert_allclose(pair.model(1)(x).numpy(), other(x).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pair.model(1).pooler.weight.detach().numpy(), other.pooler.weight.detach().numpy())


def test_segment_sizes_are_solved_from_every_axis_that_packs_them():
    from combinability.permutation import PermutationSpec

    # a, b cut one space of 4 units into 3 + 1; no axis binds either alone, two axes pack them differently
    spec = PermutationSpec({"w1": (("a", "b"), None), "w2": (None, ("a", "b", "a"))})
    assert spec.perm_sizes({"w1": np.zeros((4, 2)), "w2": np.zeros((5, 7))}) == {"a": 3, "b": 1}
    # left undetermined by the axes (one axis, two unknown segments): they share the axis equally, as before
    alone = PermutationSpec({"w1": (("a", "b"), None)})
    assert alone.perm_sizes({"w1": np.zeros((4, 2))}) == {"a": 2, "b": 2}
