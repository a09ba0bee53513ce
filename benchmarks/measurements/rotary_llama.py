"""Llama-style character models: the aligned barrier with rotary-aware heads against alignments that
hold the heads in place.

Usage: ``python benchmarks/measurements/rotary_llama.py``. Two copies of a small Llama (d 64, 4 query
heads of 16 units sharing 2 key/value heads, rotary position embeddings, SwiGLU MLP of 128, depth 2,
``nn.RMSNorm``, untied head), seeds 0 and 1, trained with AdamW (lr 3e-3, cosine decay, batches of 32
windows of 64 characters) for ``EPOCHS`` epochs on the Jargon File (``apt-get install jargon-text``).
The linear path at 11 points on the test windows, for:

* naive: no alignment;
* heads held: weight matching of the MLP neurons and the residual stream (a permutation) only —
  what a spec that could not express rotary heads would align;
* permutations: weight matching with every head, query-head group and neuron permuted (query/key
  heads rigid, ``Repeat`` of their order), the stream a permutation (``symmetries="permutation"``);
* rotated stream: the same with the residual stream an orthogonal map (RMSNorm folded).

Writes ``rotary_llama.md`` beside this file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb
from combinability.data.text import load_jargon_arrays
from combinability.permutation import Repeat

D, HEADS, KV, DH, MLP, DEPTH, EPOCHS = 64, 4, 2, 16, 128, 2, 2


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, HEADS * DH, bias=False), nn.Linear(D, KV * DH, bias=False)
        self.v_proj, self.o_proj = nn.Linear(D, KV * DH, bias=False), nn.Linear(HEADS * DH, D, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, DH).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = (z[:, :, None].expand(b, KV, HEADS // KV, t, DH).reshape(b, HEADS, t, DH) for z in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, HEADS * DH))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2, self.attn = nn.RMSNorm(D), nn.RMSNorm(D), Attention()
        self.gate, self.up, self.down = nn.Linear(D, MLP, bias=False), nn.Linear(D, MLP, bias=False), nn.Linear(
            MLP, D, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class CharLlama(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm, self.head = nn.RMSNorm(D), nn.Linear(D, vocab, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, DH, 2).float() / DH), persistent=False)

    def forward(self, idx):
        x = self.embed(idx)
        freqs = torch.arange(idx.shape[1], dtype=torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def trained(seed: int, x: np.ndarray, y: np.ndarray, vocab: int) -> nn.Module:
    torch.manual_seed(seed)
    model = CharLlama(vocab)
    steps = EPOCHS * math.ceil(len(x) / 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i : i + 32].numpy()
            logits = model(torch.from_numpy(x[idx]))
            loss = F.cross_entropy(logits.reshape(-1, vocab), torch.from_numpy(y[idx]).reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def heads_held(spec: cb.PermutationSpec) -> cb.PermutationSpec:
    """``spec`` without its head names (and any kind): the MLP neurons and the stream, as permutations."""
    heads = {e.name if isinstance(e, Repeat) else e for v in spec.axes_to_perm.values() for e in v
             if isinstance(e, Repeat) or (isinstance(e, str) and ".attn." in e)}
    heads |= {k.group for k in spec.kinds.values() if hasattr(k, "group")}
    return cb.PermutationSpec({k: tuple(None if isinstance(e, Repeat) or e in heads else e for e in v)
                               for k, v in spec.axes_to_perm.items()})


def main() -> None:
    x, y, vocab = load_jargon_arrays("train")
    x_test, y_test, _ = load_jargon_arrays("test")
    start = time.perf_counter()
    models = [trained(seed, x, y, len(vocab)) for seed in (0, 1)]
    print(f"trained in {time.perf_counter() - start:.0f} s")
    pair = cb.ModelPair(*models, example_input=x_test[:2])
    rows = ["| alignment | loss at 0, 0.5, 1 | loss barrier | accuracy at 0.5 | objective |",
            "|---|---|---:|---:|---:|"]
    held = cb.ModelPair(*models, spec=heads_held(pair.spec.permutations_only()))
    runs = (("naive", pair, None, None), ("heads held (MLP neurons, stream permuted)", held, "weight", None),
            ("permutations (rigid rotary heads, groups, neurons, stream)", pair, "weight", "permutation"),
            ("rotated stream (the same, RMSNorm folded)", pair, "weight", "all"))
    values = np.linspace(0, 1, 11)
    for label, p, method, symmetries in runs:
        aligned = p.align(method, symmetries=symmetries) if symmetries else (p.align(method) if method else p)
        ds = cb.sweep(aligned, cb.Linear(), data=(x_test, y_test), values=list(values), splits=["test"])
        loss = ds["loss"].sel(split="test").values.ravel()
        acc = ds["accuracy"].sel(split="test").values.ravel()
        barrier = float(np.max(loss - ((1 - values) * loss[0] + values * loss[-1])))
        objective = f"{aligned.permutation.objective:.1f}" if method else ""
        rows.append(f"| {label} | {loss[0]:.3f}, {loss[5]:.3f}, {loss[-1]:.3f} | {barrier:.3f} | {acc[5]:.3f} | "
                    f"{objective} |")
        print(rows[-1])
    text = (f"# Llama-style character models: aligned barriers\n\n{EPOCHS} epochs on the Jargon File, test "
            f"windows; barrier = max over 11 points of the loss above the straight line.\n\n" + "\n".join(rows) + "\n")
    (Path(__file__).parent / "rotary_llama.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
