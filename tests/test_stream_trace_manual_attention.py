"""Attention written out by hand (nanoGPT's): a packed ``c_attn`` split into q, k, v (or three layers),
viewed as heads, ``F.scaled_dot_product_attention`` or softmax(masked q kᵀ / √dh) v (minGPT's), heads merged
back; token ids in, ``(B, T, vocab)`` out.

References: outputs of the model itself in float64 before and after a random transformation of
every traced kind, a planted transformation that weight matching must undo, and a plain
torch cross-entropy of the model's own logits.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Blocks, Orthogonal
from tests.model_checks import float64_outputs, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB, T = 13, 8


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, packed: bool, flash: bool = True) -> None:
        super().__init__()
        self.heads, self.d, self.packed, self.flash = heads, d, packed, flash
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))  # minGPT's causal mask
        if packed:
            self.c_attn = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.c_proj, self.drop = nn.Linear(d, d), nn.Dropout(0.1)

    def forward(self, x):
        b, t, c = x.size()
        if self.packed:
            q, k, v = self.c_attn(x).split(self.d, dim=2)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        if self.flash:
            y = self.drop(F.scaled_dot_product_attention(q, k, v, is_causal=True))  # on the per-head values
        else:  # nanoGPT's path without flash attention (minGPT's): scores written out
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = self.drop(F.softmax(att, dim=-1)) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, packed: bool, flash: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, packed, flash)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, depth: int = 2, packed: bool = True,
                 head_bias: bool = False, flash: bool = True, tied: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(T, d)
        self.h = nn.ModuleList([Block(d, heads, packed, flash) for _ in range(depth)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=head_bias)
        if tied:  # nanoGPT's weight tying: one tensor, the embedding's name first
            self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab), as nanoGPT returns them


IDX = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("packed,head_bias,flash", [(True, False, True), (False, True, True), (True, True, False)])
def test_hand_written_attention_is_traced_into_heads_and_keeps_the_function(packed, head_bias, flash):
    model = randomised(NanoGPT(packed=packed, head_bias=head_bias, flash=flash), 0)
    spec, folds = cb.derive_symmetries(model, IDX)
    qkv = spec.axes_to_perm["h.0.attn.c_attn.weight"][0] if packed else tuple(
        spec.axes_to_perm[f"h.0.attn.{p}.weight"][0] for p in "qkv")
    qk, vo = qkv[0], qkv[2]
    assert qkv[1] == qk != vo  # query and key rows: one name; value rows: another
    assert isinstance(spec.kind(qk), Blocks) and spec.kind(qk).blocks == 4 and spec.kind(qk).size == 4
    assert spec.kind(vo).group == spec.kind(qk).group  # both move with one head order
    assert spec.axes_to_perm["h.0.attn.c_proj.weight"][1] == vo
    stream = spec.axes_to_perm["wte.weight"][1]
    assert spec.axes_to_perm["h.1.c_fc.weight"][1] == stream
    # the stream rotates; with a bias-free lm_head (nanoGPT's) ln_f's shift stays in the norm (divided by its
    # scale) and rotates with the stream, so that only its scale must be 1
    assert isinstance(spec.kind(stream), Orthogonal)
    assert ("ln_f.bias" in dict(spec.kind(stream).requires)) == head_bias
    assert spec.axes_to_perm["ln_f.bias"] == ((None,) if head_bias else (stream,))
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    base = float64_outputs(model, state, IDX)
    folded = cb.fold_norms(state, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=2), folded)
    assert not np.allclose(moved["h.1.attn.c_proj.weight"], folded["h.1.attn.c_proj.weight"])
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-9)


@pytest.mark.parametrize("flash", [True, False])
def test_a_planted_transformation_is_undone_and_a_sweep_scores_every_token(flash):
    model = randomised(NanoGPT(flash=flash), 1)
    spec, folds = cb.derive_symmetries(model, IDX)
    a = cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}, folds)
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=5), a)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6

    other = randomised(NanoGPT(flash=flash), 2)
    g = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, VOCAB, (6, T), generator=g) for _ in range(2))
    pair = cb.ModelPair(model, other, example_input=IDX)
    ds = cb.sweep(pair, cb.Linear(), data=(tokens.numpy(), targets.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in ((model, 0.0), (other, 1.0)):
            want = F.cross_entropy(m(tokens).reshape(-1, VOCAB), targets.reshape(-1)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_tied_embedding_and_head_are_one_tensor_with_one_symmetry():
    model = randomised(NanoGPT(head_bias=True, tied=True), 3)
    spec, folds = cb.derive_symmetries(model, IDX)
    assert "lm_head.weight" not in spec.axes_to_perm  # the tied tensor is listed once, under its first name
    stream = spec.axes_to_perm["wte.weight"][1]
    assert spec.axes_to_perm["wte.weight"][0] is None and spec.axes_to_perm["h.0.c_fc.weight"][1] == stream
    # untied, a biased head takes ln_f folded in and the stream rotates; tied, the fold would change the embedding
    assert not isinstance(spec.kind(stream), Orthogonal) and folds == []
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    base = float64_outputs(model, state, IDX)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=4), state)
    assert not np.allclose(moved["wte.weight"], state["wte.weight"])
    np.testing.assert_allclose(float64_outputs(model, moved, IDX), base, atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, moved, seed=0), moved)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-9


def test_a_whole_state_dict_naming_the_tied_tensor_twice_is_transformed_under_both_names():
    """torch's ``state_dict()`` holds the tied tensor as ``wte.weight`` and ``lm_head.weight``; the spec binds
    the first. Loaded back, a copy left under the second name would overwrite the transformed one."""
    model = randomised(NanoGPT(tied=True), 4)
    spec, _ = cb.derive_symmetries(model, IDX)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["wte.weight"].data_ptr()
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=1), state)
    np.testing.assert_array_equal(moved["lm_head.weight"], moved["wte.weight"])
    assert not np.allclose(moved["wte.weight"], state["wte.weight"].numpy())
    other = copy.deepcopy(model)
    other.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
    with torch.no_grad():
        np.testing.assert_allclose(other(IDX).numpy(), model(IDX).numpy(), atol=1e-5)
    copied = {k: v.clone() for k, v in state.items()}  # two tensors that only hold equal values stay two
    untied = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=1), copied)
    np.testing.assert_array_equal(untied["lm_head.weight"], state["lm_head.weight"].numpy())


def test_a_tied_pair_is_combined_and_differentiated_as_one_tensor():
    from combinability.plugins import get_backend

    models = [randomised(NanoGPT(tied=True), s) for s in (5, 6)]
    g = torch.Generator().manual_seed(2)
    tokens, targets = (torch.randint(0, VOCAB, (6, T), generator=g) for _ in range(2))
    pair = cb.ModelPair(*models, example_input=IDX)
    assert "lm_head.weight" not in pair.layout.names
    ds = cb.sweep(pair, cb.Linear(), data=(tokens.numpy(), targets.numpy()), values=[0.25], splits=["test"])
    mid = copy.deepcopy(models[0])
    with torch.no_grad():  # by hand, in torch: the tie kept, each tensor averaged once
        for p, q in zip(mid.parameters(), pair.model(1).parameters(), strict=True):
            p.mul_(0.75).add_(0.25 * q)
        want = F.cross_entropy(mid(tokens).reshape(-1, VOCAB), targets.reshape(-1)).item()
    assert mid.lm_head.weight is mid.wte.weight
    assert float(ds["loss"].sel(split="test", lam=0.25).isel(sample=0)) == pytest.approx(want, rel=1e-5)

    be = get_backend("torch")
    prepared = be.prepare(models[0], pair.layout)
    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    # inference mode, no dropout (a training step draws its masks from a digest of the batch)
    value, grad, _ = prepared.value_and_grad(be.asarray(pair.theta(0)), tokens, targets, loss, train=False)
    reference = copy.deepcopy(models[0]).eval()
    reference.zero_grad()
    want = loss(reference(tokens), targets)
    want.backward()  # autograd sums the embedding's and the head's gradients into the one tensor
    assert float(value) == pytest.approx(want.item(), rel=1e-6)
    grads = pair.layout.unflatten(grad.numpy())
    np.testing.assert_allclose(grads["wte.weight"], reference.wte.weight.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_a_tied_model_loads_from_files_that_name_its_tensor_once_or_twice(tmp_path):
    model = randomised(NanoGPT(tied=True), 7)
    with torch.no_grad():
        want = model(IDX)
    full = model.state_dict()  # torch lists the tied tensor under both names
    only_head = {k: v for k, v in full.items() if k != "wte.weight"}  # files that keep a later name only
    cb.save_model(model, tmp_path / "lib.safetensors")  # the library's own: under its first name
    torch.save(full, tmp_path / "full.pt")
    torch.save(only_head, tmp_path / "head.pt")
    for name in ("lib.safetensors", "full.pt", "head.pt"):
        loaded = cb.load_into(NanoGPT(tied=True), tmp_path / name)
        assert loaded.lm_head.weight is loaded.wte.weight
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(IDX), want, rtol=0, atol=0)
    untied = randomised(NanoGPT(tied=False), 8)  # the same names, two different tensors
    torch.save(untied.state_dict(), tmp_path / "untied.pt")
    with pytest.raises(cb.IncompatibleModelsError, match="ties lm_head.weight to wte.weight"):
        cb.load_into(NanoGPT(tied=True), tmp_path / "untied.pt")
