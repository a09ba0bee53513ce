"""Llama as Hugging Face writes it (``transformers``' ``modeling_llama``, rewritten here so that the
test needs no ``transformers``): RMSNorm written out, rotary position embeddings (``rotate_half``,
``cos``/``sin`` tables made from an ``inv_freq`` buffer and the positions), grouped-query attention
(``repeat_kv``: key/value heads given a new axis, expanded and merged into the query heads), a
SwiGLU MLP (``down(silu(gate(x)) * up(x))``), a partial-rotary variant (Phi's) and Phi-3's fused layers
(query, key and value rows of unequal sizes sliced out of one ``qkv_proj``, gate and up rows chunked
out of one ``gate_up_proj``); also GPT-NeoX's
query/key/value rows packed per head and OPT's heads folded into the batch axis for ``bmm``.

Rotary embeddings rotate fixed pairs of each head's units, so the query/key units must keep their
order inside each head: the heads still move. The references are written out here, not read from
the library: the head/unit index arithmetic of a planted transformation (kv heads, query heads
inside each group, MLP neurons, the residual stream), the model's own float64 outputs before and
after it, and a within-head permutation that must *change* the function (the rotary is real).
(The real ``LlamaForCausalLM``, ``Qwen2``, ``Mistral``, ``Phi``, ``Gemma``, ``GPTNeoX`` and ``OPT`` of
transformers 4.46, MHA, GQA and MQA, eager and SDPA, were traced the same way by hand;
``transformers`` is not a dependency.)
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Blocks
from combinability.permutation import Repeat
from tests.model_checks import float64_outputs, language_pair_sweep_ends_match_torch, randomised
from tests.test_stream_trace_gpt2 import HandRMSNorm

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB, T, D, HEADS, DH = 13, 7, 32, 4, 8


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def repeated(x, n_rep, how):
    """Key/value heads repeated over the query heads: Llama's ``repeat_kv``, its short index, or
    ``repeat_interleave``."""
    if how == "repeat_kv":
        return repeat_kv(x, n_rep)
    b, kv, t, dh = x.shape
    if how == "short":
        return x[:, :, None].expand(b, kv, n_rep, t, dh).reshape(b, kv * n_rep, t, dh)
    return torch.repeat_interleave(x, n_rep, dim=1)


def _permuted_stream(spec):
    """``spec`` with its residual stream permuted, not rotated: the written-out RMSNorms (Llama's) let it rotate
    once their weights are folded (checked here), and these tests move the model's own, unfolded state."""
    from combinability.kinds import Orthogonal

    rotated = [k for k in spec.kinds.values() if isinstance(k, Orthogonal)]
    assert len(rotated) == 1 and all(p.endswith("norm.weight") for p, _ in rotated[0].requires)
    return spec.permutations_only()


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: in float32, scaled by ``1 + weight``, cast back to the input's dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, kv_heads: int, rotary: int, sdpa: bool, repeat: str = "repeat_kv", qk_norm: bool | str = False,
                 softcap: float | None = None) -> None:
        super().__init__()
        self.kv_heads, self.rotary, self.sdpa, self.repeat, self.softcap = kv_heads, rotary, sdpa, repeat, softcap
        self.q_proj = nn.Linear(D, HEADS * DH, bias=False)
        self.k_proj = nn.Linear(D, kv_heads * DH, bias=False)
        self.v_proj = nn.Linear(D, kv_heads * DH, bias=False)
        self.o_proj = nn.Linear(HEADS * DH, D, bias=False)
        # Qwen3's query and key norms: an RMSNorm over each head's units, one weight shared by every head
        norm = GemmaRMSNorm if qk_norm == "gemma" else HandRMSNorm  # Gemma-3's, else Qwen3's
        self.q_norm, self.k_norm = (norm(DH), norm(DH)) if qk_norm else (nn.Identity(), nn.Identity())

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.size()
        q = self.q_norm(self.q_proj(x).view(b, t, -1, DH)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, DH)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, DH).transpose(1, 2)
        if self.rotary == DH:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        else:  # partial rotary (Phi): the first ``rotary`` units of each head rotated, the rest passed
            q_rot, q_pass = q[..., : self.rotary], q[..., self.rotary :]
            k_rot, k_pass = k[..., : self.rotary], k[..., self.rotary :]
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
            q, k = torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)
        k, v = (repeated(z, HEADS // self.kv_heads, self.repeat) for z in (k, v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) / DH**0.5
            if self.softcap is not None:  # Gemma-2's soft-capping of the scores
                scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores + mask[:, :, :, : k.shape[-2]]
            out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o_proj(out.transpose(1, 2).contiguous().reshape(b, t, -1))


class FusedAttention(Attention):
    """Phi-3's attention: query, key and value rows in one layer, sliced out at their offsets."""

    def __init__(self, kv_heads: int, rotary: int, sdpa: bool, repeat: str = "repeat_kv", bias: bool = False) -> None:
        super().__init__(kv_heads, rotary, sdpa, repeat)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = nn.Linear(D, (HEADS + 2 * kv_heads) * DH, bias=bias)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.size()
        qkv = self.qkv_proj(x)
        query_pos = HEADS * DH
        q = qkv[..., :query_pos].view(b, t, -1, DH).transpose(1, 2)
        k = qkv[..., query_pos : query_pos + self.kv_heads * DH].view(b, t, -1, DH).transpose(1, 2)
        v = qkv[..., query_pos + self.kv_heads * DH :].view(b, t, -1, DH).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (repeated(z, HEADS // self.kv_heads, self.repeat) for z in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).contiguous().reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedMLP(nn.Module):
    """Phi-3's MLP: gate and up rows in one layer, chunked in two."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Layer(nn.Module):
    def __init__(self, kv_heads: int, rotary: int, sdpa: bool, repeat: str, qk_norm: bool | str = False,
                 fused: str = "", softcap: float | None = None) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = HandRMSNorm(D), HandRMSNorm(D)
        self.self_attn, self.mlp = Attention(kv_heads, rotary, sdpa, repeat, qk_norm, softcap), MLP()
        if fused:  # Phi-3's layout ("bias": with a bias on the query, key and value rows)
            self.self_attn, self.mlp = FusedAttention(kv_heads, rotary, sdpa, repeat, fused == "bias"), FusedMLP()

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, kv_heads: int = 2, rotary: int = DH, sdpa: bool = False, depth: int = 2,
                 repeat: str = "repeat_kv", qk_norm: bool | str = False, fused: str = "",
                 softcap: float | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Layer(kv_heads, rotary, sdpa, repeat, qk_norm, fused, softcap)
                                     for _ in range(depth)])
        self.norm, self.rotary_emb = HandRMSNorm(D), RotaryEmbedding(rotary)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        position_ids = torch.arange(0, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(x, position_ids)
        t = input_ids.shape[1]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


IDX = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(0))


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _heads_moved(w: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    """``w`` with its blocks of DH rows (axis 0) or columns (axis 1) in ``order``: head i <- head order[i]."""
    rows = (order[:, None] * DH + np.arange(DH)[None, :]).ravel()
    return np.take(w, rows, axis=axis)


def _planted(state: dict[str, np.ndarray], kv_heads: int, seed: int) -> dict[str, np.ndarray]:
    """``state`` transformed by hand: key/value heads, query heads inside each group, MLP neurons and
    the residual stream permuted (index arithmetic written out here, independent of the library)."""
    rng = np.random.default_rng(seed)
    rep = HEADS // kv_heads
    stream = rng.permutation(D)
    out = {}
    for name, w in state.items():
        out[name] = w[:, stream] if name == "embed_tokens.weight" else w
        if name.endswith("norm.weight") and not name.endswith(("q_norm.weight", "k_norm.weight")):  # the stream's
            out[name] = w[stream]
        if name == "lm_head.weight":
            out[name] = w[:, stream]
    for i in range(len([k for k in state if k.endswith("q_proj.weight")])):
        p = f"layers.{i}."
        kv_order = rng.permutation(kv_heads)
        q_order = np.concatenate([g * rep + rng.permutation(rep) for g in kv_order])  # groups move with their kv head
        neurons = rng.permutation(2 * D)
        out[p + "self_attn.q_proj.weight"] = _heads_moved(state[p + "self_attn.q_proj.weight"], q_order, 0)[:, stream]
        out[p + "self_attn.k_proj.weight"] = _heads_moved(state[p + "self_attn.k_proj.weight"], kv_order, 0)[:, stream]
        out[p + "self_attn.v_proj.weight"] = _heads_moved(state[p + "self_attn.v_proj.weight"], kv_order, 0)[:, stream]
        out[p + "self_attn.o_proj.weight"] = _heads_moved(state[p + "self_attn.o_proj.weight"], q_order, 1)[stream]
        for m, order in (("q_proj", q_order), ("k_proj", kv_order), ("v_proj", kv_order)):
            if p + f"self_attn.{m}.bias" in state:  # Qwen2's (and a fused layer's) biases move with their rows
                out[p + f"self_attn.{m}.bias"] = _heads_moved(state[p + f"self_attn.{m}.bias"], order, 0)
        for m in ("gate_proj", "up_proj"):
            out[p + f"mlp.{m}.weight"] = state[p + f"mlp.{m}.weight"][neurons][:, stream]
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][stream][:, neurons]
    return out


@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1])
def test_rotary_grouped_query_llama_moves_whole_heads_and_keeps_the_function(kv_heads):
    model = randomised(Llama(kv_heads), 0)
    spec, folds = cb.derive_symmetries(model, IDX)
    spec = _permuted_stream(spec)  # the state as it is (its RMSNorms unfolded): permutations
    state = _state(model)
    base = float64_outputs(model, state, IDX)
    q_heads, kv = "layers.1.self_attn.q_proj.heads", "layers.1.self_attn.k_proj.heads"
    assert spec.axes_to_perm["layers.1.self_attn.q_proj.weight"][0] == Repeat(q_heads, DH)  # units kept in order
    if kv_heads < HEADS:
        assert spec.axes_to_perm["layers.1.self_attn.k_proj.weight"][0] == Repeat(kv, DH)
        assert spec.axes_to_perm["layers.1.self_attn.v_proj.weight"][0] == Repeat(kv, DH)
        assert spec.axes_to_perm["layers.1.self_attn.o_proj.weight"][1] == Repeat(q_heads, DH)
        assert spec.kind(q_heads) == Blocks(kv, kv_heads, HEADS // kv_heads)  # query heads move in groups
    else:  # one head order; values keep a within-head permutation of their own
        assert spec.axes_to_perm["layers.1.self_attn.k_proj.weight"][0] == Repeat(q_heads, DH)
        vo = spec.axes_to_perm["layers.1.self_attn.v_proj.weight"][0]
        assert spec.kind(vo) == Blocks(q_heads, HEADS, DH)
    hidden = spec.axes_to_perm["layers.0.mlp.gate_proj.weight"][0]
    assert spec.axes_to_perm["layers.0.mlp.up_proj.weight"][0] == hidden  # SwiGLU: one neuron permutation

    planted = _planted(state, kv_heads, seed=5)
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), base, atol=1e-5)  # the hand-made reference
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=4), state)
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-5)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12  # the planted map undone


@pytest.mark.parametrize(("sdpa", "qk_norm", "softcap"), [(False, True, None), (True, True, None),
                                                           (False, "gemma", 3.0)])
def test_query_and_key_norms_per_head_keep_heads_whole_and_their_weights_in_place(sdpa, qk_norm, softcap):
    """Qwen3's attention: an RMSNorm over each head's query and key units, its weight shared by every head;
    Gemma-3's (``1 + weight``, cast back by ``type_as``) with Gemma-2's soft-capped scores (``tanh``)."""
    model = randomised(Llama(2, sdpa=sdpa, qk_norm=qk_norm, softcap=softcap), 3)
    spec, _ = cb.derive_symmetries(model, IDX)
    spec = _permuted_stream(spec)  # the state as it is (its RMSNorms unfolded): permutations
    assert spec.axes_to_perm["layers.1.self_attn.q_norm.weight"] == (None,)
    assert spec.axes_to_perm["layers.1.self_attn.q_proj.weight"][0] == Repeat("layers.1.self_attn.q_proj.heads", DH)
    state = _state(model)
    base = float64_outputs(model, state, IDX)
    planted = _planted(state, 2, seed=6)
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), base, atol=1e-5)  # the hand-made reference
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12


def _unfused(state: dict[str, np.ndarray], kv_heads: int) -> dict[str, np.ndarray]:
    """A Phi-3-style state as the separate layers it fuses (rows cut at the model's own offsets)."""
    out = {}
    cuts = {"q_proj": (0, HEADS * DH), "k_proj": (HEADS * DH, (HEADS + kv_heads) * DH),
            "v_proj": ((HEADS + kv_heads) * DH, None)}
    for name, w in state.items():
        if ".qkv_proj." in name:
            for m, (a, b) in cuts.items():
                out[name.replace("qkv_proj", m)] = w[a:b]
        elif ".gate_up_proj." in name:
            gate, up = np.split(w, 2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            out[name] = w
    return out


def _fused(state: dict[str, np.ndarray], like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`_unfused` undone, in the order of the fused state ``like``."""
    out = {}
    for name in like:
        if ".qkv_proj." in name:
            out[name] = np.concatenate([state[name.replace("qkv_proj", m)] for m in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_up_proj." in name:
            out[name] = np.concatenate([state[name.replace("gate_up_proj", m)] for m in ("gate_proj", "up_proj")])
        else:
            out[name] = state[name]
    return out


@pytest.mark.parametrize(("kv_heads", "fused"), [(2, "plain"), (1, "bias"), (HEADS, "plain")])
def test_query_key_and_value_sliced_unequally_from_one_layer_move_as_parts_of_it(kv_heads, fused):
    """Phi-3: one layer's rows are query heads, key heads and value heads of unequal sizes, the query
    and key heads rotary; the spec binds the layer as its three parts (cb.Part), each moving its own way."""
    model = randomised(Llama(kv_heads, sdpa=True, fused=fused), 8)
    spec, _ = cb.derive_symmetries(model, IDX)
    spec = _permuted_stream(spec)  # the state as it is (its RMSNorms unfolded): permutations
    q_rows, kv_rows = HEADS * DH, kv_heads * DH
    layer = "layers.1.self_attn.qkv_proj.weight"
    assert spec.stacks[f"{layer}[0:{q_rows}]"] == cb.Part(layer, 0, 0, q_rows)
    assert spec.stacks[f"{layer}[{q_rows}:{q_rows + kv_rows}]"] == cb.Part(layer, 0, q_rows, q_rows + kv_rows)
    assert spec.stacks[f"{layer}[{q_rows + kv_rows}:]"] == cb.Part(layer, 0, q_rows + kv_rows, None)
    assert isinstance(spec.axes_to_perm[f"{layer}[0:{q_rows}]"][0], Repeat)  # rotary: units kept in order
    gate, up = spec.axes_of("layers.1.mlp.gate_up_proj.weight")[0]
    assert gate == up  # SwiGLU's factors chunked from one layer: one neuron permutation for both halves
    state = _state(model)
    base = float64_outputs(model, state, IDX)
    planted = _fused(_planted(_unfused(state, kv_heads), kv_heads, seed=7), state)
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), base, atol=1e-5)  # the hand-made reference
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=2), state)
    assert list(moved) == list(state)  # the model's own names and order, each layer whole again
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-5)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12  # the planted map undone
    assert cb.PermutationSpec.from_json(spec.to_json()) == spec


def test_a_fused_pair_aligns_and_sweeps_as_torch_scores_it():
    language_pair_sweep_ends_match_torch([randomised(Llama(2, sdpa=True, fused="plain"), s) for s in (3, 4)], IDX,
                                         VOCAB, T)


def test_the_rotary_is_real_a_within_head_permutation_of_query_and_key_changes_the_function():
    model = randomised(Llama(HEADS), 1)
    state = _state(model)
    swap = np.concatenate([h * DH + np.roll(np.arange(DH), 1) for h in range(HEADS)])  # same units in every head
    moved = dict(state)
    for m in ("q_proj", "k_proj"):
        moved[f"layers.0.self_attn.{m}.weight"] = state[f"layers.0.self_attn.{m}.weight"][swap]
    assert np.abs(float64_outputs(model, moved, IDX) - float64_outputs(model, state, IDX)).max() > 1e-3


@pytest.mark.parametrize("repeat", ["repeat_kv", "short", "repeat_interleave"])
def test_partial_rotary_and_sdpa_keep_the_function_and_weight_matching_undoes_a_planted_map(repeat):
    model = randomised(Llama(2, rotary=DH // 2, sdpa=True, repeat=repeat), 2)
    spec, _ = cb.derive_symmetries(model, IDX)
    spec = _permuted_stream(spec)  # the state as it is (its RMSNorms unfolded): permutations
    state = _state(model)
    assert spec.axes_to_perm["layers.0.self_attn.q_proj.weight"][0] == Repeat("layers.0.self_attn.q_proj.heads", DH)
    planted = _planted(state, 2, seed=6)
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), float64_outputs(model, state, IDX), atol=1e-5)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12


def test_a_llama_pair_aligns_and_sweeps_as_torch_scores_it():
    language_pair_sweep_ends_match_torch([randomised(Llama(2), s) for s in (3, 4)], IDX, VOCAB, T)


class PackedPerHead(nn.Module):  # GPT-NeoX's layout: each head's query, key and value rows together
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv, self.dense = nn.Embedding(VOCAB, D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.rotary_emb, self.head = RotaryEmbedding(DH // 2), nn.Linear(D, VOCAB)

    def forward(self, idx):
        x = self.embed(idx)
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, HEADS, 3 * DH)
        q, k, v = (qkv[..., i * DH : (i + 1) * DH].permute(0, 2, 1, 3) for i in range(3))
        cos, sin = self.rotary_emb(x, torch.arange(t).unsqueeze(0))
        q_rot, k_rot = apply_rotary_pos_emb(q[..., : DH // 2], k[..., : DH // 2], cos, sin)  # partial rotary
        q, k = torch.cat((q_rot, q[..., DH // 2 :]), dim=-1), torch.cat((k_rot, k[..., DH // 2 :]), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.dense(out.transpose(1, 2).reshape(b, t, D)))


class PackedPerHeadChunked(PackedPerHead):  # the same, as transformers 4.57 writes it: heads first, then chunked
    def forward(self, idx):
        x = self.embed(idx)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, HEADS, 3 * DH).transpose(1, 2).chunk(3, dim=-1)
        cos, sin = self.rotary_emb(x, torch.arange(t).unsqueeze(0))
        q_rot, k_rot = apply_rotary_pos_emb(q[..., : DH // 2], k[..., : DH // 2], cos, sin)  # partial rotary
        q, k = torch.cat((q_rot, q[..., DH // 2 :]), dim=-1), torch.cat((k_rot, k[..., DH // 2 :]), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.dense(out.transpose(1, 2).reshape(b, t, D)))


class FoldedHeads(nn.Module):  # OPT's attention: the heads folded into the batch axis for bmm
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.head = nn.Linear(D, VOCAB)

    def _shape(self, x, b):
        return x.view(b, -1, HEADS, DH).transpose(1, 2).contiguous().view(b * HEADS, -1, DH)

    def forward(self, idx):
        x = self.embed(idx)
        b, t, _ = x.shape
        q, k, v = (self._shape(f(x), b) for f in (self.q_proj, self.k_proj, self.v_proj))
        scores = torch.baddbmm(torch.zeros(b * HEADS, t, t, dtype=q.dtype), q, k.transpose(1, 2), alpha=DH**-0.5)
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        scores = torch.max(scores.view(b, HEADS, t, t) + mask, torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype))
        out = torch.bmm(F.softmax(scores.view(b * HEADS, t, t), dim=-1), v).view(b, HEADS, t, DH)
        return self.head(x + self.out_proj(out.transpose(1, 2).reshape(b, t, D)))


@pytest.mark.parametrize("packed", [PackedPerHead, PackedPerHeadChunked])
def test_query_key_value_packed_per_head_move_with_their_head_whole(packed):
    model = randomised(packed(), 7)
    spec, _ = cb.derive_symmetries(model, IDX)
    order = "qkv.heads"
    assert spec.axes_to_perm["qkv.weight"][0] == Repeat(order, 3 * DH)  # query, key and value rows of a head
    assert spec.axes_to_perm["dense.weight"][1] == Repeat(order, DH)
    state = _state(model)
    rng = np.random.default_rng(0)
    heads, stream = rng.permutation(HEADS), rng.permutation(D)
    planted = dict(state)
    rows = (heads[:, None] * 3 * DH + np.arange(3 * DH)).ravel()
    planted["qkv.weight"], planted["qkv.bias"] = state["qkv.weight"][rows][:, stream], state["qkv.bias"][rows]
    planted["dense.weight"] = _heads_moved(state["dense.weight"], heads, 1)[stream]
    planted["dense.bias"], planted["embed.weight"] = state["dense.bias"][stream], state["embed.weight"][:, stream]
    planted["head.weight"] = state["head.weight"][:, stream]
    base = float64_outputs(model, state, IDX)
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), base, atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12


def test_heads_folded_into_the_batch_axis_keep_their_within_head_permutations():
    model = randomised(FoldedHeads(), 8)
    spec, _ = cb.derive_symmetries(model, IDX)
    qk, vo = spec.axes_to_perm["q_proj.weight"][0], spec.axes_to_perm["v_proj.weight"][0]
    assert spec.axes_to_perm["k_proj.weight"][0] == qk and spec.axes_to_perm["out_proj.weight"][1] == vo
    assert spec.kind(qk) == Blocks("q_proj.heads", HEADS, DH) == spec.kind(vo)
    state = _state(model)
    base = float64_outputs(model, state, IDX)
    rng = np.random.default_rng(1)
    heads = rng.permutation(HEADS)
    qk_units = np.concatenate([h * DH + rng.permutation(DH) for h in heads])  # whole heads, each its own order
    vo_units = np.concatenate([h * DH + rng.permutation(DH) for h in heads])
    planted = dict(state)
    for name, units in (("q_proj", qk_units), ("k_proj", qk_units), ("v_proj", vo_units)):
        planted[f"{name}.weight"] = state[f"{name}.weight"][units]
        planted[f"{name}.bias"] = state[f"{name}.bias"][units]
    planted["out_proj.weight"] = state["out_proj.weight"][:, vo_units]
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), base, atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12


def rotate_every_two(x):
    x1, x2 = x[:, :, :, ::2], x[:, :, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class InterleavedRotary(nn.Module):  # GPT-J's: pairs of neighbouring units rotated, a constant sin/cos table
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.q_proj, self.k_proj = nn.Embedding(VOCAB, D), nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, VOCAB)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, DH, 2) / DH))
        sinusoid = torch.einsum("i,j->ij", torch.arange(T, dtype=torch.float), inv_freq)
        self.embed_positions = torch.cat((torch.sin(sinusoid), torch.cos(sinusoid)), dim=1)  # not a buffer

    def forward(self, idx):
        x = self.embed(idx)
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, HEADS, DH) for f in (self.q_proj, self.k_proj, self.v_proj))
        sin, cos = torch.split(self.embed_positions[None].to(x.dtype), DH // 2, dim=-1)  # t == T here
        sin, cos = (torch.repeat_interleave(z[:, :, None, :], 2, 3) for z in (sin, cos))
        q, k = ((z * cos) + (rotate_every_two(z) * sin) for z in (q, k))
        out = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3),
                                             is_causal=True)
        return self.head(x + self.out_proj(out.transpose(1, 2).reshape(b, t, D)))


def test_rotary_on_interleaved_pairs_keeps_heads_whole():
    model = randomised(InterleavedRotary(), 9)
    spec, _ = cb.derive_symmetries(model, IDX)
    assert spec.axes_to_perm["q_proj.weight"][0] == Repeat("q_proj.heads", DH) == spec.axes_to_perm["k_proj.weight"][0]
    assert spec.kind(spec.axes_to_perm["v_proj.weight"][0]) == Blocks("q_proj.heads", HEADS, DH)
    state = _state(model)
    base = float64_outputs(model, state, IDX)
    heads = np.random.default_rng(3).permutation(HEADS)
    planted = dict(state)
    for name in ("q_proj", "k_proj", "v_proj"):
        planted[f"{name}.weight"] = _heads_moved(state[f"{name}.weight"], heads, 0)
        planted[f"{name}.bias"] = _heads_moved(state[f"{name}.bias"], heads, 0)
    planted["out_proj.weight"] = _heads_moved(state["out_proj.weight"], heads, 1)
    np.testing.assert_allclose(float64_outputs(model, planted, IDX), base, atol=1e-9)
    swap = np.concatenate([h * DH + np.roll(np.arange(DH), 2) for h in range(HEADS)])  # pairs moved, same in each head
    moved = {**state, "q_proj.weight": state["q_proj.weight"][swap], "q_proj.bias": state["q_proj.bias"][swap],
             "k_proj.weight": state["k_proj.weight"][swap], "k_proj.bias": state["k_proj.bias"][swap]}
    assert np.abs(float64_outputs(model, moved, IDX) - base).max() > 1e-3  # the rotary is real
    perms = spec.permutations_only()  # (no norm: the stream would rotate, and settle before the heads move)
    back = cb.apply_permutation(perms, cb.weight_matching(perms, state, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12


def test_the_stream_of_a_llama_with_written_out_rmsnorms_rotates():
    """Llama's RMSNorm written out, ``weight * (x * rsqrt(mean(x ** 2) + eps))``: ``x / rms(x)`` commutes with every
    orthogonal map of the stream, and its weight folds into the layers reading it, as ``nn.RMSNorm``'s does."""
    from combinability.kinds import Orthogonal
    model = randomised(Llama(2), 0)
    spec, folds = cb.derive_symmetries(model, IDX)
    stream = spec.axes_to_perm["embed_tokens.weight"][1]
    assert spec.kind(stream) == Orthogonal(fix_ones=False, requires=tuple(
        (f"{p}.weight", 1.0) for p in ("layers.0.input_layernorm", "layers.0.post_attention_layernorm",
                                       "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm")))
    state = _state(model)
    folded = cb.fold_norms(state, folds)
    np.testing.assert_allclose(folded["layers.0.self_attn.q_proj.weight"],
                               state["layers.0.self_attn.q_proj.weight"] * state["layers.0.input_layernorm.weight"])
    base = float64_outputs(model, state, IDX)  # (its RMSNorms compute in float32, as Llama's do)
    np.testing.assert_allclose(float64_outputs(model, folded, IDX), base, atol=1e-5)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=2), folded)
    assert not np.allclose(moved["embed_tokens.weight"], folded["embed_tokens.weight"])
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-5)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, folded, moved, seed=0, restarts=2), moved)
    assert max(float(np.abs(back[k] - folded[k]).max()) for k in folded) < 1e-9
