"""Deriving the symmetries of a user's torch transformer (heads, FFN neurons, residual stream).

The models are written here from torch's own blocks; the checks are functional
(f(T(θ)) = f(θ) for random transformations of every kind, a planted transformation
recovered by weight matching) and against the known layout of ``nn.MultiheadAttention``.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.errors import TracingError  # noqa: E402
from combinability.kinds import Blocks, Orthogonal  # noqa: E402


class Block(nn.Module):
    def __init__(self, d, heads, norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patches of 8x8 digits -> class token + positional embedding -> pre-LN blocks -> head."""

    def __init__(self, d=16, heads=4, depth=2, norm="layer", pool="cls"):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 17 if pool == "cls" else 16, d) * 0.5)
        self.blocks = nn.ModuleList([Block(d, heads, norm) for _ in range(depth)])
        self.norm = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.head = nn.Linear(d, 10)
        self.pool = pool

    def forward(self, x):
        n = x.shape[0]
        h = self.embed(x.reshape(n, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, 4))
        if self.pool == "cls":
            h = torch.cat([self.cls.expand(n, -1, -1), h], dim=1)
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if "norm" in name and
                                                                                       name.endswith("weight") else 0))
    return model.eval()


def _out(model, state, x):
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    with torch.no_grad():
        return m(x.double()).numpy()


X = torch.randn(6, 1, 8, 8)


@pytest.mark.parametrize("norm,pool", [("layer", "cls"), ("rms", "mean")])
def test_derived_transformer_symmetries_keep_the_function(norm, pool):
    model = _randomise(ViT(norm=norm, pool=pool), 0)
    spec, folds = cb.derive_symmetries(model, X)
    assert spec.kind("blocks.0.attn.qk") == Blocks("blocks.0.attn.heads", 4, 4)
    stream = [p for p, k in spec.kinds.items() if isinstance(k, Orthogonal)]
    assert len(stream) == 1 and spec.kinds[stream[0]].fix_ones == (norm == "layer")
    assert spec.axes_to_perm["blocks.1.attn.in_proj_weight"] == (
        ("blocks.1.attn.qk", "blocks.1.attn.qk", "blocks.1.attn.vo"), stream[0])
    assert spec.axes_to_perm["blocks.0.fc2.weight"][1] == spec.axes_to_perm["blocks.0.fc1.weight"][0] is not None
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    base = _out(model, state, X)
    folded = cb.fold_norms(state, folds)
    np.testing.assert_allclose(_out(model, folded, X), base, atol=1e-9)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=2), folded)
    np.testing.assert_allclose(_out(model, moved, X), base, atol=1e-9)
    perm_only = spec.permutations_only()
    assert perm_only.is_plain is False and not any(isinstance(k, Orthogonal) for k in perm_only.kinds.values())
    moved = cb.apply_permutation(perm_only, cb.random_permutation(perm_only, state, seed=3), state)
    np.testing.assert_allclose(_out(model, moved, X), base, atol=1e-9)


def test_a_planted_transformation_of_a_traced_transformer_is_undone():
    model = _randomise(ViT(), 1)
    spec, folds = cb.derive_symmetries(model, X)
    a = cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}, folds)
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=5), a)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6


def test_cross_attention_is_refused_with_what_to_do():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            kv = self.kv(x)
            return self.head(self.attn(self.q(x), kv, kv)[0].mean(dim=1))

    with pytest.raises(TracingError, match="self-attention.*spec="):
        cb.derive_symmetries(Cross(), torch.randn(2, 5, 4))


def test_a_pair_of_user_transformers_aligns_with_every_kind_or_permutations_only():
    torch.manual_seed(0)
    a = _randomise(ViT(), 2)
    planted = _randomise(ViT(), 2)
    spec, folds = cb.derive_symmetries(a, X)
    folded = cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in a.state_dict().items()}, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=9), folded)
    planted.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in moved.items()})
    pair = cb.ModelPair(a, planted, example_input=X)
    assert pair.folds and not pair.spec.is_plain
    aligned = pair.align("weight", restarts=2)
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-4)
    with torch.no_grad():  # members keep their functions (norms folded, then transformed)
        for i, model in enumerate((a, planted)):
            np.testing.assert_allclose(aligned.model(i)(X).numpy(), model(X).numpy(), atol=1e-4)
    perm_only = pair.align("weight", symmetries="permutation")
    assert not any(isinstance(k, Orthogonal) for k in perm_only.spec.kinds.values())
    gap = float(np.abs(perm_only.theta(1) - perm_only.theta(0)).max())
    assert gap > 1e-2  # a random rotation of the stream is not a permutation
    # activation matching reads the heads at nn.MultiheadAttention's input projection and the stream at every
    # block: it undoes the planted heads, neurons and rotation as well
    inputs = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)).numpy()
    by_activations = pair.align("activation", data=(inputs, np.zeros(200, dtype=np.int64)))
    np.testing.assert_allclose(by_activations.theta(1), by_activations.theta(0), atol=1e-4)
    with pytest.raises(cb.ConfigurationError, match="symmetries must be"):
        pair.align("weight", symmetries="rotations")


def test_transformers_with_different_head_counts_are_refused_naming_the_layer():
    with pytest.raises(cb.IncompatibleModelsError, match="blocks.0.attn.qk.*blocks=4.*blocks=2"):
        cb.ModelPair(_randomise(ViT(heads=4), 0), _randomise(ViT(heads=2), 1), example_input=X)


class MoE(nn.Module):
    """Top-k mixture of experts, experts stored as blocks of one wide layer, gate values repeated per unit."""

    def __init__(self, d=6, hidden=5, experts=4, top_k=2, out=3):
        super().__init__()
        self.hidden, self.top_k = hidden, top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, experts * hidden), nn.Linear(experts * hidden, out)

    def forward(self, x):
        logits = self.gate(x)
        top, idx = logits.topk(self.top_k, dim=-1)
        g = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
        return self.fc2(torch.relu(self.fc1(x)) * g.repeat_interleave(self.hidden, dim=-1))


def test_experts_are_traced_as_blocks_moving_with_the_gate_and_a_planted_permutation_is_undone():
    torch.manual_seed(0)
    model = _randomise(MoE(), 3)
    x = torch.randn(40, 6)
    spec, folds = cb.derive_symmetries(model, x)
    assert not folds
    assert spec.kind("P_fc1") == Blocks("P_gate", 4, 5)
    assert spec.axes_to_perm["gate.weight"] == ("P_gate", None)
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    planted = cb.random_permutation(spec, state, seed=2)
    assert not np.array_equal(planted["P_gate"], np.arange(4))
    moved = cb.apply_permutation(spec, planted, state)
    np.testing.assert_allclose(_out(model, moved, x), _out(model, state, x), atol=1e-10)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, moved, seed=0), moved)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-12


def test_moes_with_different_expert_counts_are_refused():
    with pytest.raises(cb.IncompatibleModelsError, match="P_fc1.*blocks=4, size=5.*blocks=5, size=4"):
        cb.ModelPair(_randomise(MoE(experts=4, hidden=5), 0), _randomise(MoE(experts=5, hidden=4), 1),
                     example_input=torch.randn(8, 6))


class CausalLM(nn.Module):
    """A decoder that checks shapes and builds its causal mask from the input's length."""

    def __init__(self, vocab=11, d=16, context=8):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, context, d) * 0.3)
        self.block, self.norm, self.head = Block(d, 2, "layer"), nn.LayerNorm(d), nn.Linear(d, vocab)
        self.block.forward = self._block

    def _block(self, x, mask):
        b = self.block
        h = b.norm1(x)
        x = x + b.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + b.fc2(nn.functional.gelu(b.fc1(b.norm2(x))))

    def forward(self, tokens):
        n, t = tokens.shape
        if t > self.context:
            raise ValueError("too long")
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        h = self.tok(tokens.long()) + self.pos[:, :t]
        return self.head(self.norm(self.block(h, mask))).reshape(n * t, -1)


def test_a_forward_that_branches_on_shapes_and_builds_its_mask_is_traced():
    model = _randomise(CausalLM(), 6)
    tokens = torch.randint(0, 11, (5, 8)).float()
    spec, folds = cb.derive_symmetries(model, tokens)
    stream = [p for p, k in spec.kinds.items() if isinstance(k, Orthogonal)]
    assert stream and spec.axes_to_perm["tok.weight"] == (None, stream[0])
    a = cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}, folds)
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=2), a)
    np.testing.assert_allclose(_out(model, b, tokens), _out(model, a, tokens), atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6


def test_a_norm_read_by_a_bias_free_layer_keeps_its_shift_which_rotates_with_the_stream():
    """``W (γ ⊙ n + β) = (W diag γ)(n + β / γ)``: the scale folds into the bias-free reader, the shift stays in
    the norm as ``β / γ`` and moves with the stream, which an orthogonal map fixing the ones vector keeps."""
    from tests.model_checks import assert_random_transformation_undone

    class GateAfterNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm = nn.Linear(4, 8), nn.LayerNorm(8)
            self.gate = nn.Linear(8, 3, bias=False)  # nowhere to put W β

        def forward(self, x):
            return self.gate(self.norm(self.embed(x)))

    model = _randomise(GateAfterNorm(), 0)
    x = torch.randn(5, 4)
    spec, folds = cb.derive_symmetries(model, x)
    assert spec.kind("P_embed") == Orthogonal(fix_ones=True, requires=(("norm.weight", 1.0),))
    assert spec.axes_to_perm["norm.bias"] == ("P_embed",) and spec.axes_to_perm["gate.weight"] == (None, "P_embed")
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    folded = cb.fold_norms(state, folds)
    np.testing.assert_allclose(folded["norm.bias"], state["norm.bias"] / state["norm.weight"], rtol=1e-12)
    np.testing.assert_allclose(folded["gate.weight"], state["gate.weight"] * state["norm.weight"], rtol=1e-12)
    assert_random_transformation_undone(model, spec, folded, x, "norm.bias")


def test_a_sweep_of_a_language_model_scores_every_next_token():
    a, b = _randomise(CausalLM(), 7), _randomise(CausalLM(), 8)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (6, 8), generator=g)
    targets = torch.randint(0, 11, (6, 8), generator=g)
    pair = cb.ModelPair(a, b, example_input=tokens.float())
    ds = cb.sweep(pair, sampler=cb.Linear(), data={"test": (tokens.float().numpy(), targets.numpy())},
                  values=[0.0, 1.0], batch_size=4)
    with torch.no_grad():
        for model, lam in ((a, 0.0), (b, 1.0)):
            logits = model(tokens.float())
            loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1))
            accuracy = (logits.argmax(1) == targets.reshape(-1)).float().mean()
            got = ds.sel(split="test", lam=lam).isel(sample=0)
            assert float(got["loss"]) == pytest.approx(float(loss), rel=1e-5)
            assert float(got["accuracy"]) == pytest.approx(float(accuracy))


class GLUBlock(nn.Module):
    """A pre-norm block whose feed-forward is a GLU (Dauphin et al.; Shazeer's variants): ``fc1``'s
    units in two halves, the first gated by the sigmoid of the second."""

    def __init__(self, d: int = 8, hidden: int = 12, module: bool = False) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(4, d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 2 * hidden), nn.Linear(hidden, d), nn.Linear(d, 3)
        self.glu = nn.GLU() if module else None

    def forward(self, x):
        x = self.embed(x)
        h = self.fc1(self.norm(x))
        x = x + self.fc2(self.glu(h) if self.glu is not None else nn.functional.glu(h, dim=-1))
        return self.head(x.mean(1))


@pytest.mark.parametrize("module", [False, True])
def test_a_glu_moves_both_halves_of_its_layer_by_one_permutation(module):
    from tests.model_checks import assert_random_transformation_undone, randomised

    model = randomised(GLUBlock(module=module), 0)
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    spec, folds = cb.derive_symmetries(model, x)
    rows, _ = spec.axes_to_perm["fc1.weight"]
    assert isinstance(rows, tuple) and len(rows) == 2 and rows[0] == rows[1]  # both halves, one permutation
    assert spec.axes_to_perm["fc2.weight"][1] == rows[0]
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, spec, cb.fold_norms(state, folds), x, "fc1.weight")


class _PaddedStream(nn.Module):
    """Padding tokens' features zeroed (``masked_fill`` by a per-token mask, ``fill``) on a residual stream."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        self.fill = fill
        self.e, self.f, self.g, self.h = nn.Embedding(16, 8), nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 16)

    def forward(self, ids):
        x = self.e(ids).masked_fill((ids == 0)[..., None], self.fill)
        return self.h(x + self.g(torch.relu(self.f(x))))


@pytest.mark.parametrize("fill", [0.0, 1.5])
def test_tokens_masked_whole_keep_the_stream_rotatable_when_zeroed(fill):
    torch.manual_seed(12)
    model = _PaddedStream(fill).eval()
    ids = torch.from_numpy(np.random.default_rng(13).integers(0, 16, (4, 10)))
    ids[:, -2:] = 0  # padding at the end of every row
    spec, _ = cb.derive_symmetries(model, ids)
    stream = spec.axes_to_perm["e.weight"][1]
    # zeros stay zeros under any linear map; a token filled with 1.5 everywhere survives permutations only
    assert isinstance(spec.kind(stream), Orthogonal) == (fill == 0.0)
    state = {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=14), state)
    model = model.double()
    with torch.no_grad():
        reference = model(ids).numpy()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
        np.testing.assert_allclose(model(ids).numpy(), reference, rtol=1e-10, atol=1e-10)


def test_a_module_traced_through_is_a_feature_point_at_its_output():
    """A transformer block fx traces through (its operations inlined, no module call in the graph) is read at the
    one node its scope lets out, as a forward hook on it sees its output; LLFC takes it as a point."""
    from tests.model_checks import tapped_features

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.blocks, self.head = nn.Embedding(11, 8), nn.ModuleList([Block(), Block()]), nn.Linear(8, 11)

        def forward(self, ids):
            x = self.emb(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    a, b = _randomise(LM(), 0), _randomise(LM(), 1)
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = a.blocks[0].register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    with torch.no_grad():
        a(ids)
    hook.remove()
    feats = tapped_features(a, b, ids, "blocks.0")  # (examples x features, positions): as a hook's output is read
    np.testing.assert_allclose(feats.reshape(4, 8, 6).transpose(0, 2, 1), seen["out"].numpy(), rtol=1e-5, atol=1e-6)
    ds = cb.llfc(cb.ModelPair(a, b, example_input=ids), (ids.numpy(), ids.numpy()), values=[0.5], points=["blocks.0"])
    assert np.isfinite(ds["cosine"].values).all()
