"""GPT-2 as Hugging Face writes it (``transformers``' ``modeling_gpt2``, rewritten here so that the
test needs no ``transformers``): ``Conv1D`` layers that multiply by their parameters
(``torch.addmm(bias, x, weight)``, the weight ``(in, out)``), query/key/value split from one layer and
viewed into heads with ``permute(0, 2, 1, 3)``, scores divided by ``torch.full``, masked with
``torch.where`` and a causal-mask buffer, ``gelu_new`` written with ``pow`` and ``tanh``, and the
embedding tied to the head.

References: the model's own outputs in float64 before and after a random transformation of every
traced kind, a planted transformation that weight matching must undo, and torch's cross-entropy of
the model's logits. (The real ``GPT2LMHeadModel`` of transformers 4.46, eager and SDPA attention,
was traced the same way by hand; ``transformers`` is not a dependency.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Blocks, Orthogonal
from tests.model_checks import (
    assert_random_transformation_undone,
    float64_outputs,
    language_pair_sweep_ends_match_torch,
    randomised,
)

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB, T, D, HEADS = 11, 6, 16, 4


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class NewGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((T, T), dtype=torch.bool)).view(1, 1, T, T),
                             persistent=False)
        self.num_heads, self.head_dim, self.split_size = HEADS, D // HEADS, D
        self.c_attn, self.c_proj = Conv1D(3 * D, D), Conv1D(D, D)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)

    def _split_heads(self, tensor, num_heads, attn_head_size):
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor, num_heads, attn_head_size):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        return tensor.view(tensor.size()[:-2] + (num_heads * attn_head_size,))

    def _attn(self, query, key, value):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype,
                                                 device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = self.attn_dropout(attn_weights.type(value.dtype))
        return torch.matmul(attn_weights, value)

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        attn_output = self._merge_heads(self._attn(query, key, value), self.num_heads, self.head_dim)
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = GPT2Attention()
        self.c_fc, self.c_proj, self.act, self.dropout = Conv1D(4 * D, D), Conv1D(D, 4 * D), NewGELU(), nn.Dropout(0.1)

    def forward(self, hidden_states):
        hidden_states = self.attn(self.ln_1(hidden_states)) + hidden_states
        return hidden_states + self.dropout(self.c_proj(self.act(self.c_fc(self.ln_2(hidden_states)))))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = nn.Embedding(VOCAB, D), nn.Embedding(T, D), nn.Dropout(0.1)
        self.h = nn.ModuleList([GPT2Block() for _ in range(depth)])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tie_weights()

    def forward(self, input_ids):
        position_ids = torch.arange(0, input_ids.size(-1), dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.lm_head(self.ln_f(hidden_states))


def _randomised(seed):
    return randomised(GPT2LMHeadModel(), seed)


IDX = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))


def test_gpt2_conv1d_layers_and_permuted_heads_are_traced_and_keep_the_function():
    model = _randomised(0)
    spec, folds = cb.derive_symmetries(model, IDX)
    stream = spec.axes_to_perm["wte.weight"][1]
    assert "lm_head.weight" not in spec.axes_to_perm and folds == []  # tied: the stream stays a permutation
    assert not isinstance(spec.kind(stream), Orthogonal)
    rows_in, cols_out = spec.axes_to_perm["h.1.attn.c_attn.weight"]  # Conv1D: (in, out)
    assert rows_in == stream and cols_out == ("h.1.attn.c_attn.q", "h.1.attn.c_attn.q", "h.1.attn.c_attn.v")
    assert spec.axes_to_perm["h.1.attn.c_attn.bias"] == (cols_out,)
    qk = spec.kind("h.1.attn.c_attn.q")
    assert isinstance(qk, Blocks) and (qk.blocks, qk.size) == (HEADS, D // HEADS)
    assert spec.axes_to_perm["h.1.attn.c_proj.weight"] == ("h.1.attn.c_attn.v", stream)
    hidden = spec.axes_to_perm["h.0.c_fc.weight"][1]
    assert spec.axes_to_perm["h.0.c_fc.weight"] == (stream, hidden) and spec.axes_to_perm["h.0.c_proj.weight"] == (
        hidden, stream)
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    base = float64_outputs(model, state, IDX)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=4), state)
    assert not np.allclose(moved["h.1.attn.c_attn.weight"], state["h.1.attn.c_attn.weight"])
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, moved, seed=0, restarts=2), moved)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-9


def test_a_gpt2_pair_sweeps_as_torch_scores_it():
    language_pair_sweep_ends_match_torch([_randomised(s) for s in (1, 2)], IDX, VOCAB, T)


class HandRMSNorm(nn.Module):  # Llama's, T5's
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HandLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        mu = x.mean(dim=-1, keepdim=True)
        return (x - mu) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + 1e-5) * self.weight + self.bias


class HandNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.n1, self.n2 = nn.Embedding(VOCAB, D), HandRMSNorm(), HandLayerNorm()
        self.fc, self.proj, self.head = nn.Linear(D, 2 * D), nn.Linear(2 * D, D), nn.Linear(D, VOCAB)

    def forward(self, idx):
        if len(idx.shape) == 2:  # len() of a traced shape, and its unpacking, read on the example
            b, t = idx.shape
        x = self.wte(idx)
        x = x + self.proj(F.gelu(self.fc(self.n1(x))))
        return self.head(self.n2(x)).view(b, t, VOCAB)


def test_norms_written_out_keep_their_stream_a_permutation_and_the_function():
    torch.manual_seed(0)
    model = HandNormNet().eval()
    with torch.no_grad():
        for norm in (model.n1, model.n2):
            norm.weight.uniform_(0.5, 1.5)
        model.n2.bias.normal_()
    spec, folds = cb.derive_symmetries(model, IDX)
    stream = spec.axes_to_perm["wte.weight"][1]
    assert spec.axes_to_perm["n1.weight"] == (stream,) == spec.axes_to_perm["n2.bias"] and folds == []
    assert spec.kind(stream) == cb.kinds.Neuron()  # statistics over the features: permutations only
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=1), state)
    assert not np.allclose(moved["n1.weight"], state["n1.weight"])
    # (the RMSNorm computes in float32 whatever the model's dtype, as Llama's does)
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), float64_outputs(model, state, IDX), atol=1e-6)


class GPT2WithOutputs(GPT2LMHeadModel):
    """As transformers' models are called: keyword arguments with defaults besides the input, and an
    output object carrying the last hidden state (and caches) besides the logits."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=True):
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        position_ids = torch.arange(0, input_ids.size(-1), dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            hidden = block(hidden)
        hidden = self.ln_f(hidden)
        return {"logits": self.lm_head(hidden), "hidden_states": hidden if output_hidden_states else None}


def test_a_model_called_with_defaults_and_returning_an_output_object_is_traced_and_scored_on_its_logits():
    models = []
    for seed in (4, 5):
        model = GPT2WithOutputs()
        model.load_state_dict(_randomised(seed).state_dict())
        models.append(model.eval())
    spec, _ = cb.derive_symmetries(models[0], IDX)
    stream = spec.axes_to_perm["wte.weight"][1]
    assert stream is not None and spec.axes_to_perm["ln_f.weight"] == (stream,)  # the hidden states are no output
    g = torch.Generator().manual_seed(6)
    tokens, targets = (torch.randint(0, VOCAB, (5, T), generator=g) for _ in range(2))
    ds = cb.sweep(cb.ModelPair(*models, example_input=IDX), cb.Linear(), data=(tokens.numpy(), targets.numpy()),
                  values=[0.0], splits=["test"])
    with torch.no_grad():
        want = F.cross_entropy(models[0](tokens)["logits"].reshape(-1, VOCAB), targets.reshape(-1)).item()
    assert float(ds["loss"].sel(split="test", lam=0.0).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_an_untied_gpt2s_norms_fold_into_its_conv1d_layers_and_the_stream_rotates():
    """ln_1 and ln_2 read by ``torch.addmm(b, x.view(-1, d), W)`` (Conv1D), ln_f by a head of its own."""
    model = _randomised(3)
    model.lm_head = nn.Linear(D, VOCAB, bias=False)  # untied
    model = randomised(model, 3)
    spec, folds = cb.derive_symmetries(model, IDX)
    stream = spec.axes_to_perm["wte.weight"][1]
    assert isinstance(spec.kind(stream), Orthogonal)
    readers = {r.weight: r.axis for f in folds for r in f.readers}
    assert readers["h.0.attn.c_attn.weight"] == 0 and readers["h.1.c_fc.weight"] == 0  # (in, out): axis 0
    assert readers["lm_head.weight"] == 1
    state = cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}, folds)
    assert_random_transformation_undone(model, spec, state, IDX, "h.1.c_fc.weight")
