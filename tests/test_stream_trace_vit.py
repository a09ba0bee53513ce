"""A timm-style ViT written by a user: a convolutional patch embedding (``Conv2d`` with stride =
kernel, ``flatten(2).transpose(1, 2)``), a class token, and attention whose ``qkv`` output is viewed
as ``(b, n, 3, heads, head_dim)``, permuted and unbound (``F.scaled_dot_product_attention``, or the
scores written out with ``q * scale``).

References: the model's own outputs in float64 before and after a random transformation of every
traced kind (norms folded), a planted transformation that weight matching must undo, and a plain
torch cross-entropy of the model's logits.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.kinds import Blocks, Orthogonal
from tests.model_checks import assert_random_transformation_undone, float64_outputs, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

DIM, HEADS, PATCH, SIDE = 16, 4, 4, 12


class Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.head_dim, self.fused = DIM // HEADS, fused
        self.scale = self.head_dim**-0.5
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.q_norm, self.k_norm, self.attn_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.1)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            x = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = Attention(fused)
        self.fc1, self.act, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, fused: bool = True, classes: int = 5, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (SIDE // PATCH) ** 2, DIM))
        self.blocks = nn.Sequential(*[Block(fused) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _randomised(seed, **kw):
    return randomised(ViT(**kw), seed)


X = torch.randn(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fused", [True, False])
def test_patch_embedding_and_stacked_qkv_are_traced_into_a_stream_and_heads(fused):
    model = _randomised(0, fused=fused)
    spec, folds = cb.derive_symmetries(model, X)
    stream = spec.axes_to_perm["patch.weight"][0]
    assert spec.axes_to_perm["patch.weight"][1:] == (None, None, None)  # the image's channels and pixels
    assert spec.axes_to_perm["cls_token"] == (None, None, stream) == spec.axes_to_perm["pos_embed"]
    assert spec.kind(stream) == Orthogonal(fix_ones=True, requires=spec.kind(stream).requires)
    rows, cols = spec.axes_to_perm["blocks.1.attn.qkv.weight"]
    assert rows == ("blocks.1.attn.qkv.q", "blocks.1.attn.qkv.q", "blocks.1.attn.qkv.v") and cols == stream
    qk, vo = spec.kind(rows[0]), spec.kind(rows[2])
    assert isinstance(qk, Blocks) and (qk.blocks, qk.size) == (HEADS, DIM // HEADS) and vo.group == qk.group
    assert spec.axes_to_perm["blocks.1.attn.proj.weight"] == (stream, "blocks.1.attn.qkv.v")
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    base = float64_outputs(model, state, X)
    folded = cb.fold_norms(state, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=3), folded)
    assert not np.allclose(moved["patch.weight"], folded["patch.weight"])
    np.testing.assert_allclose(float64_outputs(model, moved, X), base, atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, folded, moved, seed=0, restarts=2), moved)
    assert max(float(np.abs(back[k] - folded[k]).max()) for k in folded) < 1e-6


def test_a_vit_pair_sweeps_as_torch_scores_it():
    models = [_randomised(s) for s in (1, 2)]
    y = np.arange(len(X)) % 5
    pair = cb.ModelPair(*models, example_input=X)
    ds = cb.sweep(pair, cb.Linear(), data=(X.numpy(), y), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(X), torch.as_tensor(y)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_a_convolutional_stem_is_traced_and_other_qkv_layouts_are_refused_by_name():
    class ConvStem(ViT):  # convolutions and an activation before the patch embedding (a hybrid ViT's stem)
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.patch = nn.Conv2d(3, self.patch.out_channels, self.patch.kernel_size, self.patch.stride)

        def forward(self, x):
            return super().forward(torch.relu(self.stem(x)))

    spec, _ = cb.derive_symmetries(ConvStem().eval(), X)  # checked: a random map keeps the outputs
    stem = spec.axes_to_perm["stem.weight"][0]
    assert stem is not None and spec.axes_to_perm["patch.weight"][1] == stem  # the stem's channels move

    class Cumulative(ConvStem):  # a sum over the stem's channels mixes them: refused
        def forward(self, x):
            return ViT.forward(self, torch.cumsum(self.stem(x), dim=1))

    with pytest.raises(TracingError, match="cumsum.*an operation on a convolution's channels-first output"):
        cb.derive_symmetries(Cumulative().eval(), X)

    class HeadsFirst(Attention):
        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, HEADS, self.head_dim).permute(3, 0, 2, 1, 4)  # heads first
            return self.proj(qkv[0].sum(1).repeat(1, 1, HEADS))

    net = ViT()
    net.blocks[0].attn = HeadsFirst(True)
    with pytest.raises(TracingError, match=r"permute\(2, 0, 3, 1, 4\)"):
        cb.derive_symmetries(net.eval(), X)


def test_parameters_read_for_their_dtype_bind_nothing():
    class CastingViT(ViT):  # Hugging Face's ViTModel casts its input to the patch kernel's dtype
        def forward(self, x):
            expected_dtype = self.patch.weight.dtype
            if x.dtype != expected_dtype:
                x = x.to(expected_dtype)
            return super().forward(x)

    spec, _ = cb.derive_symmetries(CastingViT().eval(), X)
    assert isinstance(spec.kind(spec.axes_to_perm["patch.weight"][0]), Orthogonal)


# -- ViT as vit-pytorch writes it (its einops rearranges written as reshape and permute) -----------------
class LucidAttention(nn.Module):
    def __init__(self, dim_head: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = HEADS, dim_head**-0.5
        self.norm, self.attend, self.dropout = nn.LayerNorm(DIM), nn.Softmax(dim=-1), nn.Dropout(0.0)
        self.to_qkv = nn.Linear(DIM, 3 * HEADS * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(HEADS * dim_head, DIM), nn.Dropout(0.0))

    def forward(self, x):
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = self.dropout(self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale))  # an nn.Softmax module
        return self.to_out(torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, -1))


class LucidViT(nn.Module):
    def __init__(self, pool: str) -> None:
        super().__init__()
        patch_dim = PATCH * PATCH
        self.to_patch_embedding = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, DIM), nn.LayerNorm(DIM))
        self.pos_embedding = nn.Parameter(torch.randn(1, (SIDE // PATCH) ** 2 + 1, DIM))
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.layers = nn.ModuleList([nn.ModuleList([
            LucidAttention(), nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Dropout(0.0),
                                            nn.Linear(2 * DIM, DIM), nn.Dropout(0.0))]) for _ in range(2)])
        self.norm, self.pool, self.mlp_head = nn.LayerNorm(DIM), pool, nn.Linear(DIM, 5)

    def forward(self, img):
        b, c, h, w = img.shape
        x = img.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
        x = self.to_patch_embedding(x.reshape(b, (h // PATCH) * (w // PATCH), -1))
        n = x.shape[1]
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x += self.pos_embedding[:, :(n + 1)]
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        x = self.norm(x)
        return self.mlp_head(x.mean(dim=1) if self.pool == "mean" else x[:, 0])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_attention_with_a_softmax_module_is_traced_and_keeps_the_function(pool):
    model = randomised(LucidViT(pool), 0)
    spec, _ = cb.derive_symmetries(model, X)
    stream = spec.axes_to_perm["cls_token"][2]
    rows, cols = spec.axes_to_perm["layers.1.0.to_qkv.weight"]
    assert cols == stream and rows == ("layers.1.0.to_qkv.q", "layers.1.0.to_qkv.q", "layers.1.0.to_qkv.v")
    qk = spec.kind(rows[0])
    assert isinstance(qk, Blocks) and (qk.blocks, qk.size) == (HEADS, 4)
    assert spec.axes_to_perm["to_patch_embedding.0.weight"] == (None,)  # the pixels of a patch stay in place
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, spec, state, X, "layers.1.0.to_qkv.weight")
