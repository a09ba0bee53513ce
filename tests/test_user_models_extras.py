"""Users' torch models as popular codebases write them: activations beyond ReLU (Mish, SELU, CELU,
Softsign, Tanhshrink, LogSigmoid), submodules ``forward`` never calls, a tied head registered before
its embedding, routers by ``topk`` with no ``dim``, attention probabilities cast with ``type_as``,
and refusals that name their cause.

References: plain numpy activations run through layer tables on both backends, outputs of the
user's own module, and permutations planted by hand that alignment must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.layers import ACTIVATIONS, LayerTable, Node
from tests.model_checks import assert_random_transformation_undone, randomised, table_logits

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

#: Two heads of 8 units swapped, each head's units in their order.
SWAPPED = torch.arange(16).view(2, 8).flip(0).reshape(-1)


def _swap_heads(source, target, rows=("q", "k", "v"), out="o") -> None:
    """``target`` gets ``source``'s attention with its two heads swapped by hand: the rows of the query,
    key and value layers (and biases), the columns of the output layer."""
    with torch.no_grad():
        for name in rows:
            getattr(target, name).weight.copy_(getattr(source, name).weight[SWAPPED])
            if getattr(source, name).bias is not None:
                getattr(target, name).bias.copy_(getattr(source, name).bias[SWAPPED])
        getattr(target, out).weight.copy_(getattr(source, out).weight[:, SWAPPED])


def _undone_by_weight_matching(a, planted, x) -> None:
    """The plant keeps the function (plain torch), and weight matching undoes it exactly."""
    torch.testing.assert_close(planted(x), a(x), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, planted, example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _erf(x):
    from scipy.special import erf

    return erf(x)


#: Each activation in plain numpy, torch's defaults.
NUMPY = {
    "relu": lambda x: np.maximum(x, 0), "gelu": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))), "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "softplus": _softplus, "relu6": lambda x: np.clip(x, 0, 6), "hardtanh": lambda x: np.clip(x, -1, 1),
    "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6, "hardsigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(np.minimum(x, 0))),
    "celu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))), "softsign": lambda x: x / (1 + np.abs(x)),
    "tanhshrink": lambda x: x - np.tanh(x), "logsigmoid": lambda x: -_softplus(-x),
}


def test_every_activation_has_a_numpy_reference():
    assert set(NUMPY) == set(ACTIVATIONS)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("fn", ["mish", "selu", "celu", "softsign", "tanhshrink", "logsigmoid"])
def test_table_activations_match_numpy_on_both_backends(backend, fn):
    pytest.importorskip(backend)
    table = LayerTable("act", (5,), 3, (Node("fc1", "dense", units=7), Node("a", "act", fn=fn),
                                       Node("fc2", "dense", units=3)))
    rng = np.random.default_rng(0)
    p = {k: rng.normal(0, 1.5, shape).astype(np.float32) for k, (shape, _) in table.parameters().items()}
    x = rng.normal(size=(4, 5)).astype(np.float32)
    want = NUMPY[fn](x.astype(np.float64) @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T + p["fc2.bias"]
    np.testing.assert_allclose(table_logits(backend, table, p, x), want, rtol=1e-4, atol=1e-4)


class ActNet(nn.Module):
    """A residual CNN with the activation ``act`` as a module and as a function."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 4)
        self.act = act()

    def forward(self, x):
        h = self.act(self.c1(x))
        h = h + self.act(self.c2(h))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("act", [nn.Mish, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid])
def test_a_cnn_with_any_listed_activation_module_is_traced_and_a_planted_permutation_undone(act):
    torch.manual_seed(0)
    a = ActNet(act).eval()
    x = torch.randn(5, 2, 6, 6)
    planted = ActNet(act).eval()
    planted.load_state_dict(a.state_dict())
    perm = torch.randperm(6)
    with torch.no_grad():  # the stream's channels moved by hand: c1's rows, c2's rows and columns, fc's columns
        planted.c1.weight.copy_(a.c1.weight[perm]), planted.c1.bias.copy_(a.c1.bias[perm])
        planted.c2.weight.copy_(a.c2.weight[perm][:, perm]), planted.c2.bias.copy_(a.c2.bias[perm])
        planted.fc.weight.copy_(a.fc.weight[:, perm])
    _undone_by_weight_matching(a, planted, x)


class Unused(nn.Module):
    """An MLP that holds a layer (a pooler, a disabled position bias) ``forward`` never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(4, 16), nn.Linear(16, 3), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_submodule_never_called_is_carried_and_the_pair_evaluates_like_the_module():
    torch.manual_seed(1)
    a, b = Unused().eval(), Unused().eval()
    x, y = torch.randn(32, 4), torch.arange(32) % 3
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    assert "unused.weight" in {e.name for e in pair.layout.entries}
    result = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
    loss = result["loss"].sel(split="test").squeeze().values
    with torch.no_grad():
        assert loss[0] == pytest.approx(float(F.cross_entropy(a(x), y)), rel=1e-5)
        assert loss[-1] == pytest.approx(float(F.cross_entropy(b(x), y)), rel=1e-5)


class HeadFirstLM(nn.Module):
    """A tied LM head written before its embedding (``self.embed.weight = self.lm_head.weight``)."""

    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.embed = nn.Embedding(vocab, d)
        self.embed.weight = self.lm_head.weight
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.fc2(torch.relu(self.fc1(h))))


def test_a_head_tied_before_its_embedding_stays_tied_and_evaluates_like_the_module():
    torch.manual_seed(2)
    a, b = HeadFirstLM().eval(), HeadFirstLM().eval()
    ids = torch.randint(0, 20, (6, 5))
    pair = cb.ModelPair(a, b, example_input=ids[:2])
    names = {e.name for e in pair.layout.entries}
    assert len(names & {"embed.weight", "lm_head.weight"}) == 1  # one tensor, once
    be = cb.get_backend("torch")
    logits = be.to_numpy(cb.evaluation.Evaluator(be, pair.model_a, pair.layout).logits(
        [pair.theta_a], be.asarray(ids.numpy())))
    np.testing.assert_allclose(logits[0], a(ids).detach().numpy().reshape(-1, 20), rtol=1e-5, atol=1e-5)


class TopkMoE(nn.Module):
    """mistral-src's router: ``torch.topk(logits, k)`` with no ``dim`` (the last axis), softmax over the chosen."""

    def __init__(self, d: int = 8, experts: int = 4, hidden: int = 12) -> None:
        super().__init__()
        self.embed, self.gate = nn.Embedding(16, d), nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                     for _ in range(experts))
        self.head = nn.Linear(d, 16)

    def forward(self, ids):
        h = self.embed(ids)
        flat = h.reshape(-1, h.shape[-1])
        weights, chosen = torch.topk(self.gate(flat), 2)
        weights = F.softmax(weights, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            out[rows] += weights[rows, slot, None] * expert(flat[rows])
        return self.head(h + out.reshape(h.shape))


def test_a_router_by_topk_without_dim_moves_experts_with_the_router_rows():
    torch.manual_seed(3)
    a = TopkMoE().eval()
    ids = torch.randint(0, 16, (4, 12))
    spec, _ = cb.derive_symmetries(a, ids)
    planted = TopkMoE().eval()
    planted.load_state_dict(a.state_dict())
    order = [2, 0, 3, 1]
    with torch.no_grad():  # the experts reordered by hand, with the router's rows
        planted.gate.weight.copy_(a.gate.weight[order])
        for i, e in enumerate(order):
            planted.experts[i].load_state_dict(a.experts[e].state_dict())
    torch.testing.assert_close(planted(ids), a(ids), rtol=1e-5, atol=1e-5)
    assert any("gate.weight" in {n for n, _ in axes} for axes in spec.perm_to_axes.values())
    pair = cb.ModelPair(a, planted, example_input=ids).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


class LlamaAttention(nn.Module):
    """Meta's llama spelling of the probabilities: ``F.softmax(scores.float(), dim=-1).type_as(q)``."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.embed, self.q, self.k, self.v, self.o = nn.Embedding(12, d), *(nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 12)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.h, self.dh).transpose(1, 2) for lin in (self.q, self.k, self.v))
        p = F.softmax((q @ k.transpose(-2, -1) / self.dh ** 0.5).float(), dim=-1).type_as(q)
        return self.head(x + self.o((p @ v).transpose(1, 2).reshape(b, t, -1)))


def test_attention_probabilities_cast_with_type_as_are_traced_and_heads_recovered():
    torch.manual_seed(4)
    a = LlamaAttention().eval()
    ids = torch.randint(0, 12, (3, 5))
    planted = LlamaAttention().eval()
    planted.load_state_dict(a.state_dict())
    _swap_heads(a, planted)
    _undone_by_weight_matching(a, planted, ids)


class PaddedUNetUp(nn.Module):
    """A CNN whose refusal is the layer-table tracer's alone (not the transformer tracer's as well)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.cumsum(self.c(x), dim=1).mean((2, 3)))


def test_a_cnn_refusal_gives_the_layer_table_reason_only():
    with pytest.raises(TracingError, match=r"node 'cumsum'.*cannot follow") as info:
        cb.ModelPair(PaddedUNetUp(), PaddedUNetUp(), example_input=torch.randn(2, 2, 6, 6))
    assert "traced as a transformer" not in str(info.value)


class PackedKeyValue(nn.Module):
    """Keys and values packed per head in one layer, the query in its own: not followed, said as a TracingError."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.embed, self.q, self.kv = nn.Embedding(10, d), nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.o, self.head = nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(b, t, self.h, 2 * self.dh).transpose(1, 2).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(y.transpose(1, 2).reshape(b, t, -1)))


def test_features_packed_in_a_way_not_followed_are_a_tracing_error():
    with pytest.raises(TracingError, match=r"do not fit its parameters.*pass spec= by hand"):
        cb.derive_symmetries(PackedKeyValue(), torch.randint(0, 10, (2, 6)))


class Iterated(nn.Module):
    """One conv applied twice (an iterated block): its weights serve two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.c(F.relu(self.c(F.relu(self.c0(x))))))
        return self.fc(x.mean((2, 3)))


def test_a_module_called_twice_is_refused_by_layer_tables_and_traced_by_its_feature_spaces():
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(TracingError, match=r"module 'c' \(Conv2d\) is called 2 times: one set of weights"):
        cb.derive.describe(Iterated(), x)
    model = randomised(Iterated(), 0)
    pair = cb.ModelPair(model, randomised(Iterated(), 1), example_input=x)
    assert pair.table is None
    assert pair.spec.axes_to_perm["c.weight"] == ("P_c0", "P_c0", None, None)  # reads and writes one space
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, pair.spec, state, x, "c.weight")


def _complex_rotary(x, freqs):
    """Meta's llama ``apply_rotary_emb``: unit pairs as complex numbers, turned by ``freqs`` (positions x pairs)."""
    paired = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(paired * freqs.view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


class MetaAttention(nn.Module):
    """Meta's llama attention: (b, t, heads, head_dim) rotated by ``view_as_complex`` before the transpose."""

    def __init__(self, d: int = 16, heads: int = 2, tokens: int = 5) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.embed, self.wq, self.wk, self.wv, self.wo = nn.Embedding(12, d), *(nn.Linear(d, d, bias=False)
                                                                                for _ in range(4))
        self.head = nn.Linear(d, 12)
        angles = torch.outer(torch.arange(tokens).float(), 1.0 / 100 ** (torch.arange(0, self.dh, 2) / self.dh))
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.h, self.dh) for w in (self.wq, self.wk, self.wv))
        q, k = _complex_rotary(q, self.freqs[:t]), _complex_rotary(k, self.freqs[:t])
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.head(x + self.wo(y.transpose(1, 2).reshape(b, t, -1)))


def test_complex_rotary_keeps_units_in_their_heads_and_planted_heads_are_recovered():
    torch.manual_seed(5)
    a = MetaAttention().eval()
    ids = torch.randint(0, 12, (3, 5))
    spec, _ = cb.derive_symmetries(a, ids)
    planted = MetaAttention().eval()
    planted.load_state_dict(a.state_dict())
    _swap_heads(a, planted, rows=("wq", "wk", "wv"), out="wo")
    torch.testing.assert_close(planted(ids), a(ids), rtol=1e-5, atol=1e-5)
    within = torch.arange(16).view(2, 8)[:, torch.randperm(8)].reshape(-1)  # units moved within each head
    moved = MetaAttention().eval()
    moved.load_state_dict(planted.state_dict())
    with torch.no_grad():
        moved.wq.weight.copy_(planted.wq.weight[within]), moved.wk.weight.copy_(planted.wk.weight[within])
    assert not torch.allclose(moved(ids), a(ids), atol=1e-3)  # rotary pairs: not a symmetry, and not in the spec
    pair = cb.ModelPair(a, planted, example_input=ids).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
    assert len(spec.perm_to_axes) >= 2


class CumulativeLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 8), nn.Linear(8, 10)

    def forward(self, ids):
        return self.fc(torch.cumsum(self.embed(ids), dim=-1))


def test_a_language_model_refusal_gives_the_transformer_tracer_reason_only():
    with pytest.raises(TracingError, match=r"stream tracer cannot follow") as info:
        cb.ModelPair(CumulativeLM(), CumulativeLM(), example_input=torch.randint(0, 10, (2, 4)))
    assert "Embedding" not in str(info.value)


class T5Attention(nn.Module):
    """T5's self-attention: no biases, no scaling, a relative position bias made by the first layer
    (an embedding of position buckets, permuted to (1, heads, q, k)) and passed on to the next."""

    def __init__(self, d: int = 16, heads: int = 2, buckets: int = 8, has_bias: bool = False) -> None:
        super().__init__()
        self.h, self.dh, self.buckets = heads, d // heads, buckets
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(buckets, heads) if has_bias else None

    def forward(self, x, position_bias=None):
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.h, self.dh).transpose(1, 2) for lin in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1)
        if position_bias is None:
            distance = torch.arange(t)[None, :] - torch.arange(t)[:, None]
            buckets = distance.clamp(-(self.buckets // 2), self.buckets // 2 - 1) + self.buckets // 2
            position_bias = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
        scores = scores + position_bias
        p = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, -1)), position_bias


class T5Encoder(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(12, d), nn.Linear(d, 12, bias=False)
        self.layers = nn.ModuleList([T5Attention(d, has_bias=True), T5Attention(d)])

    def forward(self, ids):
        h, bias = self.embed(ids), None
        for layer in self.layers:
            out, bias = layer(h, bias)
            h = h + out
        return self.head(h)


def test_a_relative_position_bias_shared_by_layers_moves_with_every_layers_heads():
    torch.manual_seed(6)
    a = T5Encoder().eval()
    ids = torch.randint(0, 12, (3, 6))
    spec, _ = cb.derive_symmetries(a, ids)
    table_order = spec.axes_to_perm["layers.0.relative_attention_bias.weight"][1]
    assert table_order is not None  # the table's heads move (with the query heads)
    planted = T5Encoder().eval()
    planted.load_state_dict(a.state_dict())
    for layer, source in zip(planted.layers, a.layers, strict=True):  # both layers' heads, as the shared table's
        _swap_heads(source, layer)
    with torch.no_grad():
        planted.layers[0].relative_attention_bias.weight.copy_(a.layers[0].relative_attention_bias.weight.flip(1))
    _undone_by_weight_matching(a, planted, ids)


class LearnedTable(T5Encoder):
    """A learned (heads, T, T) table added to the scores: refused naming the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2, 6, 6))

    def forward(self, ids):
        h = self.embed(ids)
        b, t, _ = h.shape
        layer = self.layers[1]
        q, k, v = (lin(h).view(b, t, 2, 8).transpose(1, 2) for lin in (layer.q, layer.k, layer.v))
        p = F.softmax(q @ k.transpose(-2, -1) + self.table, dim=-1)
        return self.head(h + layer.o((p @ v).transpose(1, 2).reshape(b, t, -1)))


def test_a_parameter_added_to_attention_scores_is_refused_naming_it():
    with pytest.raises(TracingError, match=r"'table' \(a parameter or features\) added to attention scores"):
        cb.derive_symmetries(LearnedTable(), torch.randint(0, 12, (2, 6)))


class ALiBi(nn.Module):
    """Bloom/MPT's ALiBi: a fixed slope per head times the key-query distance added to the scores."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.embed, self.qkv, self.o, self.head = nn.Embedding(12, d), nn.Linear(d, 3 * d), nn.Linear(d, d), \
            nn.Linear(d, 12)
        self.register_buffer("slopes", torch.tensor([0.5 ** (i + 1) for i in range(heads)]), persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q, k, v = (part.view(b, t, self.h, self.dh).transpose(1, 2) for part in self.qkv(x).split(x.shape[-1], -1))
        distance = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).float()
        scores = q @ k.transpose(-2, -1) / self.dh ** 0.5 + self.slopes.view(1, -1, 1, 1) * distance
        return self.head(x + self.o((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, -1)))


def test_attention_on_a_single_token_is_refused_as_it_cannot_check_the_heads():
    torch.manual_seed(7)
    with pytest.raises(TracingError, match=r"attention over a single position on example_input.*two or more tokens"):
        cb.derive_symmetries(ALiBi().eval(), torch.randint(0, 12, (3, 1)))


def test_a_bias_per_head_keeps_the_heads_in_place_and_the_stream_still_moves():
    torch.manual_seed(7)
    a = ALiBi().eval()
    ids = torch.randint(0, 12, (3, 6))
    spec, _ = cb.derive_symmetries(a, ids)
    assert spec.axes_to_perm["qkv.weight"][0] is None and spec.axes_to_perm["o.weight"][1] is None
    stream = spec.axes_to_perm["embed.weight"][1]
    assert stream is not None and spec.axes_to_perm["qkv.weight"][1] == stream
    state = {k: v.double().numpy() for k, v in a.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3), state)
    b = ALiBi().double().eval()
    b.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
    torch.testing.assert_close(b(ids), a.double()(ids), rtol=1e-9, atol=1e-9)
    heads_swapped = ALiBi().double().eval()
    heads_swapped.load_state_dict(a.state_dict())
    with torch.no_grad():  # what the spec leaves out: exchanging heads of different slopes changes the function
        order = torch.arange(48).view(3, 2, 8).flip(1).reshape(-1)
        heads_swapped.qkv.weight.copy_(a.qkv.weight[order]), heads_swapped.qkv.bias.copy_(a.qkv.bias[order])
        heads_swapped.o.weight.copy_(a.o.weight[:, torch.arange(16).view(2, 8).flip(0).reshape(-1)])
    assert not torch.allclose(heads_swapped(ids), a(ids), atol=1e-3)


class AuxMoE(TopkMoE):
    """A top-k mixture returning ``(logits, load-balancing loss)`` (Switch's and Mixtral's training code)."""

    def forward(self, ids):
        h = self.embed(ids)
        flat = h.reshape(-1, h.shape[-1])
        probs = F.softmax(self.gate(flat), dim=-1)
        weights, chosen = probs.topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            out[rows] += weights[rows, slot, None] * expert(flat[rows])
        load = F.one_hot(chosen[:, 0], len(self.experts)).float().mean(0)
        return self.head(h + out.reshape(h.shape)), (load * probs.mean(0)).sum() * len(self.experts)


def test_a_model_returning_logits_and_an_auxiliary_loss_is_traced_on_its_logits():
    torch.manual_seed(8)
    a = AuxMoE().eval()
    ids = torch.randint(0, 16, (4, 12))
    spec, _ = cb.derive_symmetries(a, ids)
    assert any("gate.weight" in {n for n, _ in axes} for axes in spec.perm_to_axes.values())
    planted = AuxMoE().eval()
    planted.load_state_dict(a.state_dict())
    order = [1, 3, 0, 2]
    with torch.no_grad():
        planted.gate.weight.copy_(a.gate.weight[order])
        for i, e in enumerate(order):
            planted.experts[i].load_state_dict(a.experts[e].state_dict())
    torch.testing.assert_close(planted(ids)[0], a(ids)[0], rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, planted, example_input=ids).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


class AssigningAttention(nn.Module):
    """openai/CLIP's block: ``forward`` moves its mask to the input's dtype by assigning ``self.attn_mask``."""

    def __init__(self, d: int = 16, tokens: int = 5) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Embedding(12, d), nn.MultiheadAttention(d, 2), nn.Linear(d, 12)
        self.attn_mask = torch.full((tokens, tokens), float("-inf")).triu(1)

    def forward(self, ids):
        x = self.embed(ids).permute(1, 0, 2)
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        x = x + self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]
        return self.head(F.rms_norm(x.permute(1, 0, 2), (x.shape[-1],)))


def test_a_forward_assigning_a_module_attribute_is_traced_and_left_intact():
    torch.manual_seed(9)
    a = AssigningAttention().eval()
    ids = torch.randint(0, 12, (3, 5))
    before = a(ids).detach()
    spec, _ = cb.derive_symmetries(a, ids)
    assert isinstance(a.attn_mask, torch.Tensor)  # not a traced value left behind
    torch.testing.assert_close(a(ids), before)
    pair = cb.ModelPair(a, AssigningAttention().eval(), example_input=ids).align("weight")
    be = cb.get_backend("torch")
    logits = be.to_numpy(cb.evaluation.Evaluator(be, pair.model_a, pair.layout).logits(
        [pair.theta_a], be.asarray(ids.numpy())))
    np.testing.assert_allclose(logits[0], before.numpy().reshape(-1, 12), rtol=1e-5, atol=1e-5)


class MPTAttention(ALiBi):
    """MPT's spelling: keys permuted straight to (b, heads, head_dim, t), ALiBi as (1, heads, 1, t)."""

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q, k, v = (part.view(b, t, self.h, self.dh) for part in self.qkv(x).chunk(3, dim=-1))
        bias = torch.arange(1 - t, 1).float().view(1, 1, 1, t) * self.slopes.view(1, -1, 1, 1)
        scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / self.dh ** 0.5 + bias
        y = F.softmax(scores, -1) @ v.permute(0, 2, 1, 3)
        return self.head(x + self.o(y.permute(0, 2, 1, 3).reshape(b, t, -1)))


def test_mpt_keys_permuted_for_the_scores_are_traced_with_their_heads_in_place():
    torch.manual_seed(10)
    a = MPTAttention().eval()
    ids = torch.randint(0, 12, (3, 6))
    spec, _ = cb.derive_symmetries(a, ids)
    assert spec.axes_to_perm["qkv.weight"][0] is None and spec.axes_to_perm["qkv.weight"][1] is not None
    state = {k: v.double().numpy() for k, v in a.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=4), state)
    b = MPTAttention().double().eval()
    b.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
    torch.testing.assert_close(b(ids), a.double()(ids), rtol=1e-9, atol=1e-9)


class DigitRows(nn.Module):
    """A transformer over the 8 rows of a digit (tokens of 8 pixels), LayerNorms with learned scales."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.head(self.norm(self.block(self.embed(x.reshape(x.shape[0], 8, 8)))).mean(1))


def test_alignment_robustness_of_a_transformer_moves_b_as_aligned():
    """The perturbed alignments are moves of B as aligned (a transformer's norms folded): no refusal."""
    from combinability import experiments as ex

    digits = cb.load_dataset("digits", "test")
    torch.manual_seed(11)
    pair = cb.ModelPair(DigitRows().eval(), DigitRows().eval(), example_input=torch.tensor(digits.x[:4]))
    pair = pair.align("weight")
    robust = ex.alignment_robustness(pair, (digits.x[:100], digits.y[:100]), steps=2, lambdas=(0.5,), examples=100)
    assert np.isfinite(robust["loss_barrier"].values[robust["k"].values >= 0]).all()


class ConvStem1d(nn.Conv1d):
    """Whisper's ``Conv1d``: ``F.conv1d`` on its own weight and bias, cast to the input's type."""

    def forward(self, x):
        return F.conv1d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)


class AudioEncoder(nn.Module):
    """Whisper's encoder, small: two convolutions and GELUs over (n, mel, frames), then tokens and attention."""

    def __init__(self, mels: int = 6, d: int = 16, functional: bool = False) -> None:
        super().__init__()
        conv = ConvStem1d if functional else nn.Conv1d
        self.conv1, self.conv2 = conv(mels, d, 3, padding=1), conv(d, d, 3, stride=2, padding=1)
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        h = F.gelu(self.conv2(F.gelu(self.conv1(x)))).permute(0, 2, 1)
        q = self.ln1(h)
        h = h + self.attn(q, q, q, need_weights=False)[0]
        return self.head(self.ln2(h).mean(1))


@pytest.mark.parametrize("functional", [False, True])
def test_a_convolutional_stem_before_attention_is_traced_and_its_channels_recovered(functional):
    torch.manual_seed(12)
    a = AudioEncoder(functional=functional).eval()
    x = torch.randn(3, 6, 10)
    cb.derive_symmetries(a, x)
    stem = torch.randperm(16)  # conv1's output channels, read by conv2
    planted = AudioEncoder(functional=functional).eval()
    planted.load_state_dict(a.state_dict())
    with torch.no_grad():
        planted.conv1.weight.copy_(a.conv1.weight[stem]), planted.conv1.bias.copy_(a.conv1.bias[stem])
        planted.conv2.weight.copy_(a.conv2.weight[:, stem])
    _undone_by_weight_matching(a, planted, x)


class HeadTemperature(ALiBi):
    """A learned temperature per head multiplying the scores, and a learned global one (harmless)."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(2, 1, 1) + 0.5)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q, k, v = (part.view(b, t, self.h, self.dh).transpose(1, 2) for part in self.qkv(x).split(16, -1))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.h_temperature:
            scores = scores * self.temperature
        return self.head(x + self.o((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("per_head", [False, True])
def test_a_learned_temperature_per_head_keeps_the_heads_in_place_and_a_global_one_lets_them_move(per_head):
    torch.manual_seed(13)
    model = HeadTemperature().eval()
    model.h_temperature = per_head
    ids = torch.randint(0, 12, (3, 6))
    spec, _ = cb.derive_symmetries(model, ids)  # checked: a random map keeps the outputs
    # a temperature per head stays with its head, as ALiBi's slope does: the heads stay in place
    assert (spec.axes_to_perm["qkv.weight"][0] is None) == per_head
    assert spec.axes_to_perm["temperature"] == (None, None, None)
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3), state)
    assert not np.allclose(moved["embed.weight"], state["embed.weight"])
    other = HeadTemperature().double().eval()
    other.h_temperature = per_head
    other.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
    torch.testing.assert_close(other(ids), model.double()(ids), rtol=1e-9, atol=1e-9)


class EinsumAttention(nn.Module):
    """Attention written with ``torch.einsum``, heads on axis 1 (``bhqd``) or 2 (``bqhd``), a mask added by ``.add``."""

    def __init__(self, heads_second: bool, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.dh, self.heads_second = heads, d // heads, heads_second
        self.embed, self.q, self.k, self.v, self.o = nn.Embedding(12, d), *(nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 12)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.h, self.dh) for lin in (self.q, self.k, self.v))
        mask = torch.full((t, t), float("-inf")).triu(1)
        if self.heads_second:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))
            p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(self.dh ** -0.5).add(mask).softmax(dim=-1)
            y = torch.einsum("bhqk,bhkd->bhqd", p, v).transpose(1, 2)
        else:
            p = (torch.einsum("bqhd,bkhd->bhqk", q, k) / self.dh ** 0.5 + mask).softmax(dim=-1)
            y = torch.einsum("bhqk,bkhd->bqhd", p, v)
        return self.head(x + self.o(y.reshape(b, t, -1)))


@pytest.mark.parametrize("heads_second", [True, False])
def test_einsum_attention_is_traced_and_planted_heads_recovered(heads_second):
    torch.manual_seed(14)
    a = EinsumAttention(heads_second).eval()
    ids = torch.randint(0, 12, (3, 6))
    cb.derive_symmetries(a, ids)
    planted = EinsumAttention(heads_second).eval()
    planted.load_state_dict(a.state_dict())
    _swap_heads(a, planted)
    _undone_by_weight_matching(a, planted, ids)
