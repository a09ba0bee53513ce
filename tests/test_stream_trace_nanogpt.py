"""nanoGPT as its ``model.py`` writes it (rewritten here at toy size): a ``LayerNorm`` module calling
``F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)`` with an optional bias, query/key/value
split from one ``c_attn`` layer by ``.split(n_embd, dim=2)`` and viewed into heads with ``transpose(1, 2)``,
``F.scaled_dot_product_attention(..., is_causal=True)`` or the written-out attention masked by a
``tril`` buffer, the embedding tied to ``lm_head``, and ``forward(idx, targets=None)`` returning
``(logits, loss)`` with the last position's logits only when no targets are given.

References: the model's own outputs in float64 before and after a random transformation of every
traced kind, a planted transformation that weight matching must undo, and torch's cross-entropy of
the model's logits.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest

import combinability as cb
from combinability.errors import DatasetError
from combinability.kinds import Blocks
from tests.model_checks import assert_random_transformation_undone, float64_outputs, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 13
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 16
    bias: bool = True
    flash: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (``nn.LayerNorm`` takes none before torch 2.1)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(0.0)
        self.n_head, self.n_embd, self.flash = cfg.n_head, cfg.n_embd, cfg.flash
        if not self.flash:
            mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
            self.register_buffer("bias", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x):
        B, T, C = x.size()  # noqa: N806 - nanoGPT's names
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(cfg.n_embd, cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = LayerNorm(cfg.n_embd, cfg.bias), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(0.0), h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def hidden(self, idx):
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        x = self.hidden(idx)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: the last position only
            loss = None
        return logits, loss


class EveryPositionGPT(GPT):
    """What a study of a nanoGPT's loss landscape runs: the logits of every position."""

    def forward(self, idx):
        return self.lm_head(self.hidden(idx))


CFG = GPTConfig()
IDX = torch.randint(0, CFG.vocab_size, (3, CFG.block_size), generator=torch.Generator().manual_seed(0))


def _model(seed: int, cls: type = GPT, **changes) -> GPT:
    torch.manual_seed(seed)
    return randomised(cls(GPTConfig(**changes)), seed)


def _logits64(model: GPT, state: dict[str, np.ndarray]) -> np.ndarray:
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)  # lm_head: tied to wte
    with torch.no_grad():
        return m(IDX)[0].numpy()


@pytest.mark.parametrize("changes", [{}, {"flash": False}, {"bias": False}], ids=["sdpa", "written-out", "no-bias"])
def test_nanogpt_is_traced_and_a_transformation_of_every_kind_keeps_its_function(changes):
    model = _model(0, **changes)
    spec, folds = cb.derive_symmetries(model, IDX)
    stream = spec.axes_to_perm["transformer.wte.weight"][1]
    assert spec.axes_to_perm["transformer.h.0.ln_1.weight"] == (stream,)  # F.layer_norm reading its module's
    assert "lm_head.weight" not in spec.axes_to_perm and folds == []  # tied to wte: the stream stays a permutation
    rows, cols = spec.axes_to_perm["transformer.h.1.attn.c_attn.weight"]
    assert cols == stream and rows == ("transformer.h.1.attn.c_attn.q",) * 2 + ("transformer.h.1.attn.c_attn.v",)
    qk = spec.kind("transformer.h.1.attn.c_attn.q")
    assert isinstance(qk, Blocks) and (qk.blocks, qk.size) == (CFG.n_head, CFG.n_embd // CFG.n_head)
    hidden = spec.axes_to_perm["transformer.h.0.mlp.c_fc.weight"][0]
    assert spec.axes_to_perm["transformer.h.0.mlp.c_proj.weight"] == (stream, hidden)
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()
             if k != "lm_head.weight" and not k.endswith(".attn.bias")}  # the mask buffer
    assert_random_transformation_undone(model, spec, state, IDX, "transformer.h.1.attn.c_attn.weight", seed=4,
                                        outputs=lambda m, s, _: _logits64(m, s))


def test_a_nanogpt_pair_sweeps_as_torch_scores_it():
    models = [_model(s, EveryPositionGPT) for s in (1, 2)]
    g = torch.Generator().manual_seed(3)
    tokens, targets = (torch.randint(0, CFG.vocab_size, (5, CFG.block_size), generator=g) for _ in range(2))
    pair = cb.ModelPair(*models, example_input=IDX).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(tokens.numpy(), targets.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(tokens).reshape(-1, CFG.vocab_size), targets.reshape(-1)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_logits_of_the_last_position_only_are_refused_for_sequence_targets():
    pair = cb.ModelPair(_model(1), _model(2), example_input=IDX)  # (logits, loss): scored on the logits
    tokens = IDX.numpy()
    with pytest.raises(DatasetError, match=r"gives 3 rows of logits for 24 targets.*nanoGPT"):
        cb.sweep(pair, cb.Linear(), data=(tokens, np.roll(tokens, -1, 1)), values=[0.0], splits=["test"])


class UntiedGPT(EveryPositionGPT):
    """nanoGPT with its head untied from the embedding. Without biases (nanoGPT's ``bias=False``) every
    functional LayerNorm folds into the layers reading it, so the residual stream may rotate (with
    them, ``ln_f``'s shift could not fold into the bias-free head)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)


def test_untied_nanogpt_folds_its_functional_layer_norms_and_rotates_its_stream():
    from combinability.kinds import Orthogonal

    model = _model(0, UntiedGPT, bias=False)
    spec, folds = cb.derive_symmetries(model, IDX)
    stream = spec.axes_to_perm["transformer.wte.weight"][1]
    assert spec.kind(stream) == Orthogonal(fix_ones=True, requires=spec.kind(stream).requires)
    assert len(folds) == 2 * CFG.n_layer + 1  # ln_1, ln_2 of each block and ln_f
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    folded = cb.fold_norms(state, folds)
    assert np.allclose(folded["transformer.h.0.ln_1.weight"], 1) and np.allclose(folded["transformer.ln_f.weight"], 1)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=3), folded)
    assert not np.allclose(moved["transformer.wte.weight"], folded["transformer.wte.weight"])
    base = float64_outputs(model, state, IDX)
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, folded, moved, seed=0, restarts=2), moved)
    assert max(float(np.abs(back[k] - folded[k]).max()) for k in folded) < 1e-6
