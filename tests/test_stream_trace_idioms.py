"""Transformers as tutorials and popular repositories write them, traced into their symmetries.

Karpathy's "Let's build GPT" (one ``Head`` module per head, ``q @ k.transpose(-2, -1)`` on
``(batch, tokens, head_size)`` features with no view into heads, the heads joined by ``torch.cat``),
single-head attention written with ``torch.bmm`` or ``F.scaled_dot_product_attention`` on 3-D
features, sentence-transformers' masked mean pooling, query/key norms held as ``nn.LayerNorm`` or
``nn.RMSNorm`` modules (OLMo-2's, Qwen3's), heads split with ``unflatten``, one block applied several
times (ALBERT's sharing), and the final hidden states returned beside the logits.

References: the model itself in float64 before and after a random transformation of every traced
kind (outputs equal to 1e-9), a planted transformation that weight matching undoes, and torch's
own cross-entropy at the ends of a sweep.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.kinds import Blocks, Orthogonal
from tests.model_checks import assert_random_transformation_undone, float64_outputs, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB, T, D = 13, 8, 16
IDX = torch.randint(1, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))


class Head(nn.Module):
    """One head of self-attention, as Karpathy's "Let's build GPT" writes it."""

    def __init__(self, head_size: int, product: str = "matmul") -> None:
        super().__init__()
        self.key = nn.Linear(D, head_size, bias=False)
        self.query = nn.Linear(D, head_size, bias=False)
        self.value = nn.Linear(D, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(T, T)))
        self.dropout, self.product = nn.Dropout(0.1), product

    def forward(self, x):
        _, t, c = x.shape
        k, q = self.key(x), self.query(x)
        if self.product == "sdpa":
            return F.scaled_dot_product_attention(q, k, self.value(x), is_causal=True)
        if self.product == "bmm":
            wei = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(k.size(-1))
        else:
            wei = q @ k.transpose(-2, -1) * c ** -0.5
        wei = wei.masked_fill(self.tril[:t, :t] == 0, float("-inf"))
        wei = self.dropout(F.softmax(wei, dim=-1))
        return wei @ self.value(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, heads: int, product: str) -> None:
        super().__init__()
        self.heads = nn.ModuleList([Head(D // heads, product) for _ in range(heads)])
        self.proj, self.dropout = nn.Linear(D, D), nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.proj(torch.cat([h(x) for h in self.heads], dim=-1)))


class Block(nn.Module):
    def __init__(self, heads: int, product: str) -> None:
        super().__init__()
        self.sa = MultiHeadAttention(heads, product)
        self.ffwd = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D), nn.Dropout(0.1))
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class BigramLanguageModel(nn.Module):
    """Karpathy's model (its ``forward`` returns ``(logits, loss)``; the loss is None without targets)."""

    def __init__(self, heads: int = 4, product: str = "matmul", depth: int = 2) -> None:
        super().__init__()
        self.token_embedding_table = nn.Embedding(VOCAB, D)
        self.position_embedding_table = nn.Embedding(T, D)
        self.blocks = nn.Sequential(*[Block(heads, product) for _ in range(depth)])
        self.ln_f, self.lm_head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, idx, targets=None):
        _, t = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(t, device=idx.device))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
        return logits, loss


def _logits64(model, state, x):
    return float64_outputs(_First(model), state, x)


class _First(nn.Module):
    """The model's first output (its logits), for :func:`float64_outputs`."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]

    def load_state_dict(self, state, strict=True):
        return self.model.load_state_dict(state, strict=strict)


def _folded64(model, folds):
    return cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}, folds)


@pytest.mark.parametrize("product", ["matmul", "bmm", "sdpa"])
def test_one_module_per_head_is_traced_into_heads_and_a_rotating_stream(product):
    model = randomised(BigramLanguageModel(product=product), 0)
    spec, folds = cb.derive_symmetries(model, IDX)
    prefix = "blocks.0.sa.heads"
    qk = [spec.axes_to_perm[f"{prefix}.{i}.query.weight"][0] for i in range(4)]
    vo = [spec.axes_to_perm[f"{prefix}.{i}.value.weight"][0] for i in range(4)]
    for i in range(4):  # each head: its query and key rows one permutation, its value rows another
        assert spec.axes_to_perm[f"{prefix}.{i}.key.weight"][0] == qk[i] != vo[i]
        assert isinstance(spec.kind(qk[i]), Blocks) and spec.kind(qk[i]).size == D // 4
    assert len(set(qk + vo)) == 8  # the heads are modules of their own: none shares another's permutation
    assert spec.axes_to_perm["blocks.0.sa.proj.weight"][1] == tuple(vo)  # proj's columns: the heads' values, joined
    stream = spec.axes_to_perm["token_embedding_table.weight"][1]
    assert isinstance(spec.kind(stream), Orthogonal)
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "blocks.1.sa.heads.2.value.weight", outputs=_logits64)


def test_a_pair_of_karpathy_models_aligns_and_sweeps_as_torch_scores_them():
    a, b = randomised(BigramLanguageModel(), 1), randomised(BigramLanguageModel(), 2)
    g = torch.Generator().manual_seed(3)
    tokens, targets = (torch.randint(0, VOCAB, (6, T), generator=g) for _ in range(2))
    pair = cb.ModelPair(a, b, example_input=IDX).align("weight")
    with torch.no_grad():
        np.testing.assert_allclose(pair.model(1)(tokens)[0].numpy(), b(tokens)[0].numpy(), rtol=1e-4, atol=1e-4)
        ds = cb.sweep(pair, cb.Linear(), data=(tokens.numpy(), targets.numpy()), values=[0.0, 1.0], splits=["test"])
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = m(tokens, targets)[1].item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


class Pooled(nn.Module):
    """An encoder whose tokens are averaged over a padding mask made from the ids (token 0 is padding)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.enc(self.emb(ids))
        keep = ids != 0
        if self.how == "expand":  # sentence-transformers' mean_pooling
            m = keep.long().unsqueeze(-1).expand(h.size()).float()
            pooled = torch.sum(h * m, 1) / torch.clamp(m.sum(1), min=1e-9)
        elif self.how == "expand_as":
            m = keep.unsqueeze(-1).expand_as(h).float()
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        else:  # "type_as"
            m = keep.unsqueeze(-1).type_as(h)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.head(pooled)


@pytest.mark.parametrize("how", ["expand", "expand_as", "type_as"])
def test_a_padding_mask_broadcast_over_the_features_keeps_the_stream_rotating(how):
    model = randomised(Pooled(how), 3)
    ids = IDX.clone()
    ids[:, -3:] = 0  # padded positions, left out of the mean
    spec, folds = cb.derive_symmetries(model, ids)
    stream = spec.axes_to_perm["emb.weight"][1]
    assert isinstance(spec.kind(stream), Orthogonal)
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, ids, "head.weight")


def test_a_mask_that_differs_between_features_is_not_taken_for_one_per_token():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin, self.head = nn.Embedding(VOCAB, D), nn.Linear(D, D), nn.Linear(D, 3)
            self.register_buffer("table", torch.linspace(0.5, 2.0, D))

        def forward(self, ids):
            h = self.lin(self.emb(ids))
            m = (ids != 0).float().unsqueeze(-1) * self.table  # one value per feature: not a mask per token
            return self.head((h * m).mean(1))

    with pytest.raises(TracingError, match=r"node 'mul_1'.*cannot follow this operation on features"):
        cb.derive_symmetries(randomised(Scaled(), 4), IDX)


class NormedAttention(nn.Module):
    """Self-attention with a norm on each head's queries and keys (a module), heads split by ``unflatten``
    or ``view``, before or after the heads move to axis 1."""

    def __init__(self, norm: str, where: str, split: str, heads: int = 4) -> None:
        super().__init__()
        self.h, self.where, self.split = heads, where, split
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        dh = D // heads
        make = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "none": lambda _: nn.Identity()}[norm]
        self.q_norm, self.k_norm = make(dh), make(dh)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.split == "unflatten":
            q, k, v = (z.unflatten(-1, (self.h, D // self.h)) for z in (q, k, v))
        else:
            q, k, v = (z.view(b, t, self.h, D // self.h) for z in (q, k, v))
        if self.where == "before":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if self.where == "after":
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class NormedLM(nn.Module):
    def __init__(self, norm: str, where: str, split: str, shared: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.ln1, self.ln2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attn = NormedAttention(norm, where, split)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.repeats = 2 if shared else 1
        self.ln_f, self.head = nn.RMSNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for _ in range(self.repeats):  # ALBERT's sharing: one block's weights applied again
            x = x + self.attn(self.ln1(x))
            x = x + self.down(F.silu(self.up(self.ln2(x))))
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("norm,where,split", [("layer", "before", "view"), ("rms", "after", "view"),
                                              ("rms", "before", "unflatten"), ("none", "before", "unflatten")])
def test_query_key_norm_modules_and_unflattened_heads_are_traced(norm, where, split):
    model = randomised(NormedLM(norm, where, split), 5)
    spec, folds = cb.derive_symmetries(model, IDX)
    if norm == "none":  # query and key rows one permutation, value rows another, moving with one head order
        q, k, v = spec.axes_to_perm["attn.qkv.weight"][0]
        assert q == k != v and spec.kind(q).group == spec.kind(v).group
    else:  # each head's query/key units keep their order (the norm's weight is every head's): rows in segments
        v = spec.axes_to_perm["attn.qkv.weight[32:]"][0]
        assert spec.axes_to_perm["attn.qkv.weight[0:16]"][0].name == spec.kind(v).group
    assert spec.axes_to_perm["attn.proj.weight"][1] == v
    assert isinstance(spec.kind(v), Blocks) and spec.kind(v).blocks == 4
    if norm != "none":  # the norm's weight, shared by every head, stays; so do each head's query/key units
        assert spec.axes_to_perm["attn.q_norm.weight"] == (None,)
    stream = spec.axes_to_perm["emb.weight"][1]
    assert isinstance(spec.kind(stream), Orthogonal)
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "attn.proj.weight")


def test_one_block_applied_twice_shares_its_symmetries():
    model = randomised(NormedLM("rms", "before", "view", shared=True), 6)
    spec, folds = cb.derive_symmetries(model, IDX)
    hidden = spec.axes_to_perm["up.weight"][0]
    assert hidden is not None and spec.axes_to_perm["down.weight"][1] == hidden  # the shared MLP's units permute
    assert isinstance(spec.kind(spec.axes_to_perm["attn.qkv.weight[32:]"][0]), Blocks)  # and the heads
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "up.weight")


def test_final_hidden_states_returned_beside_the_logits_leave_the_stream_rotating():
    class WithHidden(NormedLM):
        def forward(self, ids):
            x = self.emb(ids)
            x = x + self.attn(self.ln1(x))
            x = x + self.down(F.silu(self.up(self.ln2(x))))
            x = self.ln_f(x)
            return {"logits": self.head(x), "hidden_states": x}

    model = randomised(WithHidden("none", "before", "view"), 7)
    spec, folds = cb.derive_symmetries(model, IDX)
    assert isinstance(spec.kind(spec.axes_to_perm["emb.weight"][1]), Orthogonal)
    assert any("ln_f" in str(f) for f in folds)  # ln_f's scale folds into the head that reads it

    def logits(m, state, x):
        return float64_outputs(_Logits(m), state, x)

    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "head.weight", outputs=logits)


class _Logits(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["logits"]

    def load_state_dict(self, state, strict=True):
        return self.model.load_state_dict(state, strict=strict)


class TemperedAttention(nn.Module):
    """A learned temperature per head, ``(heads, 1, 1)`` (exponentiated), or ALiBi's slopes, on the scores;
    the attention weights then pass an ``nn.Dropout`` module."""

    def __init__(self, how: str, heads: int = 4) -> None:
        super().__init__()
        self.h, self.how = heads, how
        self.emb, self.qkv, self.proj = nn.Embedding(VOCAB, D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.logit_scale = nn.Parameter(torch.zeros(heads, 1, 1))
        self.register_buffer("slopes", torch.tensor([0.5 ** (i + 1) for i in range(heads)]), persistent=False)
        self.attn_drop, self.head = nn.Dropout(0.1), nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, self.h, -1).permute(0, 2, 1, 3) for z in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt(D // self.h)
        if self.how == "temperature":
            s = s * self.logit_scale.exp()
        else:  # ALiBi
            s = s + self.slopes.view(1, -1, 1, 1) * (torch.arange(t)[None, :] - torch.arange(t)[:, None]).float()
        o = self.attn_drop(s.softmax(-1)) @ v
        return self.head(x + self.proj(o.permute(0, 2, 1, 3).reshape(b, t, -1)))


@pytest.mark.parametrize("how", ["temperature", "alibi"])
def test_heads_kept_in_place_by_their_scores_stay_so_through_a_dropout_module(how):
    model = randomised(TemperedAttention(how), 8)
    spec, folds = cb.derive_symmetries(model, IDX)
    assert spec.axes_to_perm["qkv.weight"][0] is None and spec.axes_to_perm["proj.weight"][1] is None
    assert spec.axes_to_perm["logit_scale"] == (None, None, None)
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "emb.weight")


class ResidualAttentionBlock(nn.Module):
    """open_clip's block: ``nn.MultiheadAttention`` (sequence first) with a causal mask, QuickGELU."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.ln_1, self.ln_2 = nn.MultiheadAttention(D, 2), nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_fc, self.c_proj = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x, attn_mask):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        h = self.c_fc(self.ln_2(x))
        return x + self.c_proj(h * torch.sigmoid(1.702 * h))


class TextCLIP(nn.Module):
    """CLIP's text tower: pooled at the end-of-text token (the largest id), ``@ self.text_projection``."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, D)
        self.positional_embedding = nn.Parameter(torch.randn(T, D) * 0.1)
        self.blocks = nn.ModuleList([ResidualAttentionBlock() for _ in range(2)])
        self.ln_final = nn.LayerNorm(D)
        self.text_projection = nn.Parameter(torch.randn(D, 12) * D ** -0.5)
        self.register_buffer("attn_mask", torch.empty(T, T).fill_(float("-inf")).triu_(1), persistent=False)
        self.head = nn.Linear(12, 3)

    def forward(self, text):
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        for block in self.blocks:
            x = block(x, self.attn_mask)
        x = self.ln_final(x.permute(1, 0, 2))
        return self.head(x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection)


def test_clips_final_norm_folds_into_its_text_projection_and_the_stream_rotates():
    model = randomised(TextCLIP(), 9)
    spec, folds = cb.derive_symmetries(model, IDX)
    assert isinstance(spec.kind(spec.axes_to_perm["token_embedding.weight"][1]), Orthogonal)
    fold = next(f for f in folds if f.scale == "ln_final.weight")
    assert [(r.weight, r.axis) for r in fold.readers] == [("text_projection", 0)]
    state = _folded64(model, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=2), state)
    assert not np.allclose(moved["text_projection"], state["text_projection"])
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), float64_outputs(model, state, IDX), atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, moved, seed=0), moved)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-5  # rotations: to Procrustes' rounding


class BeitAttention(nn.Module):
    """timm's BEiT attention: a bias-free qkv layer applied by ``F.linear`` (keywords) with a bias concatenated
    from a query bias, a zero key bias (a buffer) and a value bias; heads by timm's reshape and permute."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.register_buffer("k_bias", torch.zeros(D), persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Beit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm1, self.attn = nn.Embedding(VOCAB, D), nn.LayerNorm(D), BeitAttention()
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.attn(self.norm1(x))
        return self.head(self.norm(x).mean(1))


def test_beits_concatenated_query_and_value_biases_move_with_their_rows():
    model = randomised(Beit(), 10)
    spec, folds = cb.derive_symmetries(model, IDX)
    q, k, v = spec.axes_to_perm["attn.qkv.weight"][0]
    assert spec.axes_to_perm["attn.q_bias"] == (q,) and spec.axes_to_perm["attn.v_bias"] == (v,)
    assert isinstance(spec.kind(v), Blocks) and spec.kind(v).blocks == 4
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "attn.v_bias")


class TransposedReads(nn.Module):
    """Parameters read transposed: a projection ``F.linear(h, self.proj.t())`` (``proj`` stored ``(in, out)``) and
    a head tied to the embedding, ``h @ self.wte.weight.t()``."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        self.wte, self.fc, self.ln_f = nn.Embedding(VOCAB, D), nn.Linear(D, D), nn.LayerNorm(D)
        self.proj = nn.Parameter(torch.randn(2 * D, D) * D ** -0.5)
        self.fc = nn.Linear(D, 2 * D)
        self.head = nn.Parameter(torch.randn(D, VOCAB) * D ** -0.5)

    def forward(self, idx):
        x = self.wte(idx)
        x = x + F.linear(F.gelu(self.fc(x)), self.proj.t())
        h = self.ln_f(x)
        return h @ self.wte.weight.t() if self.tied else F.linear(h, self.head.t())


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_read_transposed_are_traced(tied):
    model = randomised(TransposedReads(tied), 11)
    spec, folds = cb.derive_symmetries(model, IDX)
    hidden = spec.axes_to_perm["fc.weight"][0]
    assert spec.axes_to_perm["proj"][0] == hidden  # (in, out) read by F.linear as .t(): its rows are fc's units
    stream = spec.axes_to_perm["wte.weight"][1]
    assert isinstance(spec.kind(stream), Orthogonal) != tied  # ln_f folds into an untied head read transposed
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "fc.weight")


class TiedDecoder(nn.Module):
    """An autoencoder's decoder tied to its encoder, ``F.linear(z, self.enc.weight.t())``, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec_bias = nn.Linear(12, 8), nn.Parameter(torch.randn(12) * 0.1)
        self.h, self.out = nn.Linear(12, 6), nn.Linear(6, 4)

    def forward(self, x):
        z = F.relu(self.enc(x))
        return self.out(F.relu(self.h(F.linear(z, self.enc.weight.t(), self.dec_bias))))


def test_a_decoder_tied_to_its_encoder_keeps_the_encoders_units():
    """Read again transposed after its layer bound it, the encoder's weight kept a (wrongly) fixed row axis: the
    permutation of its units, which the decoder's columns follow, was silently dropped."""
    torch.manual_seed(0)
    a = TiedDecoder()
    x = torch.randn(32, 12)
    b = TiedDecoder()
    p = torch.randperm(8)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # the encoder's units shuffled by hand; the tied decoder reads the same rows
        b.enc.weight.copy_(a.enc.weight[p])
        b.enc.bias.copy_(a.enc.bias[p])
        np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), atol=1e-6)
    spec, _ = cb.derive_symmetries(a, x)
    assert spec.axes_to_perm["enc.weight"][0] is not None
    assert spec.axes_to_perm["enc.weight"][1] is None
    pair = cb.ModelPair(a, b, example_input=x).align("weight")
    np.testing.assert_allclose(pair.params("b")["enc.weight"], a.enc.weight.detach().numpy(), atol=0)


class MultiQueryLM(nn.Module):
    """Multi-query attention as it is often written: one key/value head, ``view(b, t, 1, dh).transpose(1, 2)``,
    expanded over the query heads (``expand(b, h, t, dh)``)."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.h, self.dh = heads, D // heads
        self.wte, self.ln, self.ln_f = nn.Embedding(VOCAB, D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.o = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.k, self.v = nn.Linear(D, self.dh, bias=False), nn.Linear(D, self.dh, bias=False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx):
        x = self.wte(idx)
        b, t, _ = x.shape
        h = self.ln(x)
        q = self.q(h).view(b, t, self.h, self.dh).transpose(1, 2)
        k = self.k(h).view(b, t, 1, self.dh).transpose(1, 2).expand(b, self.h, t, self.dh)
        v = self.v(h).view(b, t, 1, self.dh).transpose(1, 2).expand(b, self.h, t, self.dh)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        return self.head(self.ln_f(x + self.o(o)))


def test_one_key_value_head_expanded_over_the_query_heads_lets_the_query_heads_move():
    """``expand`` of the single key/value head was refused ("an operation on per-head features"); the query heads
    share it, so they move as one group's heads do."""
    model = randomised(MultiQueryLM(), 12)
    spec, folds = cb.derive_symmetries(model, IDX)
    rows = spec.axes_to_perm["q.weight"][0]  # whole heads move (their units follow the one key head's order)
    heads = spec.kinds[rows.name]
    assert isinstance(heads, Blocks) and heads.blocks == 1 and heads.size == 4 and rows.times == 4  # 4 heads, 1 group
    assert spec.axes_to_perm["o.weight"][1] == rows
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "q.weight")


class SharedBiasLM(nn.Module):
    """A learned bias of (query, key) positions added to every head's scores alike (``(1, 1, T, T)``)."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.h, self.dh = heads, D // heads
        self.wte, self.ln, self.ln_f = nn.Embedding(VOCAB, D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o, self.head = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, VOCAB)
        self.bias = nn.Parameter(torch.randn(1, 1, T, T))

    def forward(self, idx):
        x = self.wte(idx)
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.h, self.dh).transpose(1, 2) for z in self.qkv(self.ln(x)).split(D, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dh) + self.bias[:, :, :t, :t]
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        return self.head(self.ln_f(x + self.o(o)))


def test_a_learned_position_bias_shared_by_every_head_leaves_the_heads_free():
    """A ``(1, 1, T, T)`` parameter added to the scores was refused as "a parameter or features added to attention
    scores"; it is the same for every head, and its axes are positions."""
    model = randomised(SharedBiasLM(), 13)
    spec, folds = cb.derive_symmetries(model, IDX)
    query, key, value = spec.axes_to_perm["qkv.weight"][0]  # packed rows: q | k | v
    assert query == key and isinstance(spec.kind(query), Blocks) and spec.kind(query).blocks == 4  # the heads move
    assert spec.axes_to_perm["bias"] == (None, None, None, None)
    state = _folded64(model, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "qkv.weight")
