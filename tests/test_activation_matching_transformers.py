"""Activation matching of transformers: attention heads, gated MLPs and the residual stream read in the
models' activations.

References: a closed form (scipy's orthogonal Procrustes; a rotation planted in features), a brute force
over every head order and every order inside each head, transformations planted in users' models
(written out by hand with index arithmetic, or drawn from the derived spec) that activation matching must
undo exactly, and a head matching written out here from torch forward hooks, numpy correlations and
scipy's assignment on two independently initialised models.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment

import combinability as cb
from combinability.align import AlignTask, align
from combinability.kinds import Blocks, Orthogonal, random_orthogonal
from combinability.observation import observed_units

torch = pytest.importorskip("torch")


def _task(spec, features, observations, n_params):
    """An AlignTask whose two models' activations are the arrays ``features[which][point]``."""
    params = {k: np.zeros(shape) for k, shape in n_params.items()}
    return AlignTask(spec=spec, reference=params, other=params,
                     features=lambda which, pts: {p: features[which][p] for p in pts},
                     feature_points={p: ps[0][0] for p, ps in observations.items()}, observations=observations)


# -- the aligner on features given by hand ---------------------------------------------------------------------
def test_a_stream_is_the_orthogonal_procrustes_solution_of_its_features():
    rng = np.random.default_rng(0)
    d = 6
    spec = cb.PermutationSpec({"w": ("R", None)}, kinds={"R": Orthogonal()})
    a = rng.normal(size=(500, d))
    b = a @ random_orthogonal(d, rng).T + 0.3 * rng.normal(size=(500, d))  # B's stream: A's rotated, with noise
    task = _task(spec, {"reference": {"s": a}, "other": {"s": b}}, {"R": (("s", 0, d),)}, {"w": (d, 3)})
    q = align("activation", task)["R"]
    # Q h_B ≈ h_A: scipy's R minimises ‖B R − A‖, so Q = Rᵀ
    want, _ = orthogonal_procrustes(b, a)
    np.testing.assert_allclose(q, want.T, atol=1e-8)


def test_a_layernorm_stream_keeps_the_ones_vector_and_undoes_a_planted_rotation_exactly():
    rng = np.random.default_rng(1)
    d = 7
    spec = cb.PermutationSpec({"w": ("R", None)}, kinds={"R": Orthogonal(fix_ones=True)})
    planted = random_orthogonal(d, rng, fix_ones=True)
    points = {}
    for k, scale in enumerate((1.0, 30.0)):  # two points of different scales, counted alike
        a = rng.normal(size=(200, d)) * scale
        points[f"s{k}"] = (a, a @ planted.T)
    features = {"reference": {p: a for p, (a, _) in points.items()}, "other": {p: b for p, (_, b) in points.items()}}
    task = _task(spec, features, {"R": (("s0", 0, d), ("s1", 0, d))}, {"w": (d, 3)})
    q = align("activation", task)["R"]
    np.testing.assert_allclose(q @ np.ones(d), np.ones(d), atol=1e-10)
    np.testing.assert_allclose(q, planted.T, atol=1e-8)


def test_heads_are_the_best_of_every_head_order_and_every_order_inside_each_head():
    rng = np.random.default_rng(2)
    heads, size = 3, 2
    n = heads * size
    kind = Blocks("H", heads, size)
    spec = cb.PermutationSpec({"qk": ("Q", None), "v": ("V", None), "o": (None, "V")},
                              kinds={"Q": kind, "V": kind})
    a = {p: rng.normal(size=(400, n)) for p in ("q", "k", "v")}
    b = {p: 0.6 * a[p][:, rng.permutation(n)] + rng.normal(size=(400, n)) for p in a}  # scrambled, noisy
    observations = {"Q": (("q", 0, n), ("k", 0, n)), "V": (("v", 0, n),)}
    task = _task(spec, {"reference": a, "other": b}, observations, {"qk": (n, 4), "v": (n, 4), "o": (4, n)})
    got = align("activation", task)

    def corr(p):
        return np.corrcoef(a[p].T, b[p].T)[:n, n:]

    costs = {"Q": (corr("q") + corr("k")) / 2, "V": corr("v")}
    best, best_value = None, -np.inf
    inner = list(itertools.permutations(range(size)))
    for sigma in itertools.permutations(range(heads)):
        for taus in itertools.product(itertools.product(inner, repeat=heads), repeat=2):
            value, perms = 0.0, {}
            for member, tau in zip(("Q", "V"), taus, strict=True):
                perm = np.array([sigma[i] * size + tau[i][u] for i in range(heads) for u in range(size)])
                value += costs[member][np.arange(n), perm].sum()
                perms[member] = perm
            if value > best_value:
                best, best_value = (sigma, perms), value
    assert got["H"].tolist() == list(best[0])
    for member in ("Q", "V"):
        assert got[member].tolist() == best[1][member].tolist()


def test_observed_units_finds_a_packed_output_and_ignores_outputs_a_transformation_leaves_alone():
    rng = np.random.default_rng(3)
    spec = cb.PermutationSpec({"qkv": (("Q", "Q", "V"), None), "o": (None, "V")},
                              kinds={"Q": Blocks("H", 2, 2), "V": Blocks("H", 2, 2)})
    t = {"H": np.array([1, 0]), "Q": np.array([3, 2, 0, 1]), "V": np.array([2, 3, 1, 0])}
    x = rng.normal(size=(5, 12))
    after = np.concatenate([x[:, t["Q"]], x[:, 4 + t["Q"]], x[:, 8 + t["V"]]], axis=1)
    found = observed_units(spec, {"qkv": x, "kept": x[:, :4]}, [(t, {"qkv": after, "kept": x[:, :4]})], ["Q", "V"],
                           {"qkv": np.zeros((12, 3))})
    assert {n: [tuple(piece)[:3] for piece in ps] for n, ps in found.pieces.items()} == \
        {"Q": [("qkv", 0, 4), ("qkv", 4, 8)], "V": [("qkv", 8, 12)]}


# -- users' transformers -----------------------------------------------------------------------------------------
def _tokens(n: int, vocab: int, length: int, seed: int) -> np.ndarray:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("untied", [False, True], ids=["tied-permuted-stream", "untied-rotated-stream"])
def test_a_planted_transformation_of_a_nanogpt_is_undone(untied):
    from tests.model_checks import randomised
    from tests.test_stream_trace_nanogpt import CFG, IDX, EveryPositionGPT, UntiedGPT, _model

    cls = UntiedGPT if untied else EveryPositionGPT
    a = _model(1, cls)
    pair = cb.ModelPair(a, _model(2, cls), example_input=IDX)
    params = pair._folded_for(pair.spec).params(0)
    moved = cb.apply_permutation(pair.spec, cb.random_permutation(pair.spec, params, seed=5), params)
    b = randomised(cls(CFG), 0)
    b.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in moved.items()}, strict=False)
    planted = cb.ModelPair(a, b, example_input=IDX)
    assert any(isinstance(k, Orthogonal) for k in planted.spec.kinds.values()) == untied
    tokens = _tokens(100, CFG.vocab_size, CFG.block_size, 1)
    aligned = planted.align("activation", data=(tokens, tokens))
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_llama_with_grouped_query_heads_and_a_gated_mlp_planted_by_hand_is_undone(kv_heads):
    from tests.test_stream_trace_llama import IDX, VOCAB, Llama, T, _planted, _state

    torch.manual_seed(0)
    a = Llama(kv_heads=kv_heads).eval()
    b = Llama(kv_heads=kv_heads).eval()
    b.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in _planted(_state(a), kv_heads,
                                                                                        seed=3).items()})
    pair = cb.ModelPair(a, b, example_input=IDX)
    observed = pair._observed(pair.spec, pair, "activation", 0).pieces
    hidden = next(p for p in pair.spec.perm_names if "gate_proj" in p or "up_proj" in p)
    assert {piece.point for piece in observed[hidden]} >= {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"}
    tokens = _tokens(64, VOCAB, T, 2)
    aligned = pair.align("activation", data=(tokens, tokens), symmetries="permutation")
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-5)


class _Attention(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class _LM(torch.nn.Module):
    def __init__(self, vocab: int = 11, d: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.norm1, self.attn = torch.nn.LayerNorm(d), _Attention(d, heads)
        self.norm2, self.fc1, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x)


def test_heads_of_two_independent_models_match_as_a_hand_written_head_matching_does():
    torch.manual_seed(0)
    a, b = _LM().eval(), _LM().eval()
    tokens = _tokens(80, 11, 6, 4)
    pair = cb.ModelPair(a, b, example_input=torch.as_tensor(tokens[:2]))
    aligned = pair.align("activation", data=(tokens, tokens), symmetries="permutation")
    perm = aligned.permutation

    def outputs(model):
        seen = {}
        hooks = [getattr(model.attn, m).register_forward_hook(lambda _m, _i, o, m=m: seen.__setitem__(m, o))
                 for m in "qkv"]
        with torch.no_grad():
            model(torch.as_tensor(tokens))
        for h in hooks:
            h.remove()
        return {m: seen[m].reshape(-1, 12).double().numpy() for m in "qkv"}

    fa, fb = outputs(a), outputs(b)

    def corr(m):
        return np.corrcoef(fa[m].T, fb[m].T)[:12, 12:]

    costs = {"qk": (corr("q") + corr("k")) / 2, "v": corr("v")}
    size, heads = 4, 3
    value = np.zeros((heads, heads))
    inner = {}
    for m, c in costs.items():
        for i, j in itertools.product(range(heads), repeat=2):
            block = c[i * size:(i + 1) * size, j * size:(j + 1) * size]
            rows, cols = linear_sum_assignment(block, maximize=True)
            inner[m, i, j] = cols[np.argsort(rows)]
            value[i, j] += block[rows, cols].sum()
    rows, cols = linear_sum_assignment(value, maximize=True)
    sigma = cols[np.argsort(rows)]
    group = next(p for p in perm if p.endswith("heads"))
    assert perm[group].tolist() == sigma.tolist()
    for m, member in (("qk", next(p for p in perm if isinstance(pair.spec.kinds.get(p), Blocks) and "q" in p)),):
        want = np.concatenate([sigma[i] * size + inner[m, i, sigma[i]] for i in range(heads)])
        assert perm[member].tolist() == want.tolist()


def test_a_planted_transformation_of_a_flax_vit_with_dense_general_heads_is_undone():
    pytest.importorskip("flax")
    from tests.test_stream_trace_vit_flax import ViT, X, _variables

    net = ViT()
    pair = cb.ModelPair((net, _variables(net, 0)), (net, _variables(net, 1)), example_input=X)
    params = pair._folded_for(pair.spec).params(0)
    moved = cb.apply_permutation(pair.spec, cb.random_permutation(pair.spec, params, seed=5), params)
    be = pair.backend_obj
    b = be.with_state(pair.models[0], {**be.state(pair.models[0]), **{k: v.astype(np.float32)
                                                                     for k, v in moved.items()}})
    planted = cb.ModelPair(pair.models[0], b, example_input=X)
    observed = planted._observed(planted.spec, planted._folded_for(planted.spec), "activation", 0)
    # the heads' queries and keys at the DenseGeneral outputs (n, tokens, heads, head_dim), read heads-major
    assert {p.point for p in observed.pieces["P_b0/attn/query"]} == {"b0/attn/query", "b0/attn/key"}
    assert observed.readings["b0/attn/query"] == "heads"
    inputs = np.random.default_rng(1).normal(size=(200, 12, 12, 2)).astype(np.float32)
    aligned = planted.align("activation", data=(inputs, np.zeros(200, dtype=np.int64)))
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-5)


class _WrittenOutAttention(torch.nn.Module):
    """Attention written with bare parameters: ``x @ self.w_q``, no Linear modules."""

    def __init__(self, d: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.w_q, self.w_k, self.w_v, self.w_o = (torch.nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = ((x @ w).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for w in (self.w_q, self.w_k, self.w_v))
        y = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
        return y.transpose(1, 2).reshape(b, t, d) @ self.w_o


class _WrittenOutLM(_LM):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _WrittenOutAttention()


def test_heads_of_attention_written_with_bare_parameters_are_read_at_the_products_and_a_planted_map_undone():
    torch.manual_seed(0)
    a = _WrittenOutLM().eval()
    idx = torch.as_tensor(_tokens(2, 11, 6, 5))
    pair = cb.ModelPair(a, _WrittenOutLM().eval(), example_input=idx)
    params = pair._folded_for(pair.spec).params(0)
    moved = cb.apply_permutation(pair.spec, cb.random_permutation(pair.spec, params, seed=2), params)
    b = _WrittenOutLM().eval()
    b.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in moved.items()})
    planted = cb.ModelPair(a, b, example_input=idx)
    tokens = _tokens(100, 11, 6, 6)
    aligned = planted.align("activation", data=(tokens, tokens))
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-5)


def _undone(a, example, tokens, *, seed=0, symmetries="all", vocab_targets=True):
    """A planted random transformation of ``a``'s derived spec, undone by activation matching (its gap)."""
    import copy

    pair = cb.ModelPair(a, copy.deepcopy(a), example_input=example)
    spec = pair.spec if symmetries == "all" else pair.spec.permutations_only()
    params = pair._folded_for(spec).params(0)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, params, seed=5), params)
    b = copy.deepcopy(a)
    b.load_state_dict({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in moved.items()},
                      strict=False)
    planted = cb.ModelPair(a, b, example_input=example)
    aligned = planted.align("activation", data=(tokens, tokens), seed=seed, symmetries=symmetries)
    return float(np.abs(aligned.theta(1) - aligned.theta(0)).max())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_module_per_head_keys_and_values_are_told_apart_whatever_they_draw(seed):
    # Karpathy's Head modules: one head each, whose key/query and value units may draw the same derangement
    # of a few units in the probe; they must not be credited with each other's outputs
    from tests.model_checks import randomised
    from tests.test_stream_trace_idioms import IDX, VOCAB, BigramLanguageModel

    tokens = _tokens(200, VOCAB, IDX.shape[1], 1)
    assert _undone(randomised(BigramLanguageModel(), 0), IDX, tokens, seed=seed) < 1e-5
    assert _undone(randomised(BigramLanguageModel(), 0), IDX, tokens, seed=seed, symmetries="permutation") < 1e-5


@pytest.mark.parametrize("case", ["encoder", "qk-norm", "fused-qkv-one-kv-head"])
def test_heads_inside_torch_encoder_layers_and_in_qkv_layers_cut_into_parts_are_observed(case):
    from tests.model_checks import randomised

    if case == "encoder":  # nn.TransformerEncoder, kept whole by the tracer; its fused fast path bypasses hooks
        from tests.test_stream_trace_torch_encoder import SEQ, TOKENS, VOCAB, EncoderGPT

        model, example, tokens = randomised(EncoderGPT(), 0), TOKENS, _tokens(200, VOCAB, SEQ, 1)
    elif case == "qk-norm":  # one qkv layer whose query/key rows the spec binds as parts (heads kept whole)
        from tests.test_stream_trace_idioms import IDX, VOCAB, NormedLM

        model, example, tokens = randomised(NormedLM("rms", "after", "view"), 5), IDX, _tokens(200, VOCAB,
                                                                                                 IDX.shape[1], 1)
    else:  # Phi-3's qkv_proj with one key/value head (which no transformation moves), with biases
        from tests.test_stream_trace_llama import IDX, VOCAB, Llama, T

        torch.manual_seed(0)
        model, example, tokens = Llama(kv_heads=1, sdpa=True, fused="bias").eval(), IDX, _tokens(200, VOCAB, T, 1)
    assert _undone(model, example, tokens) < 1e-5


def test_invertible_maps_inside_heads_are_refused_pointing_to_every_kind_before_any_work():
    from tests.test_stream_trace_nanogpt import IDX, UntiedGPT, _model

    pair = cb.ModelPair(_model(1, UntiedGPT), _model(2, UntiedGPT), example_input=IDX)
    with pytest.raises(cb.ConfigurationError, match=r"Invertible.*symmetries='all'") as info:
        pair.align("activation", data=(IDX.numpy(), IDX.numpy()), symmetries="invertible")
    assert "no output of these models" not in str(info.value)  # the stream is observable: not the reason


def test_experts_fused_into_one_tensor_cut_into_gate_and_up_rows_are_refused_naming_routed_experts():
    from tests.test_fused_experts import HOWS, V, _ids, _model

    a, b = _model(HOWS[0], 1), _model(HOWS[0], 2)
    pair = cb.ModelPair(a, b, example_input=_ids())
    tokens = _tokens(50, V, 16, 1)
    with pytest.raises(cb.ConfigurationError, match="experts held as modules or parameters of their own"):
        pair.align("activation", data=(tokens, tokens))


class _NeoX(torch.nn.Module):
    """GPT-NeoX's attention: one ``query_key_value`` layer whose rows are packed per head (``[q|k|v]`` of head 0,
    then head 1, …), rotary position embedding on the first ``rotary`` units of each query and key, and an MLP."""

    def __init__(self, rotary: int, vocab: int = 20, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        nn = torch.nn
        self.h, self.dh, self.rotary = heads, d // heads, rotary
        self.emb, self.ln, self.qkv, self.dense = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.Linear(d, 3 * d), \
            nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def _rope(self, z, cos, sin):
        r = self.rotary
        turned = torch.cat((-z[..., r // 2:r], z[..., :r // 2]), -1)
        return torch.cat((z[..., :r] * cos + turned * sin, z[..., r:]), -1)

    def forward(self, ids):
        F = torch.nn.functional
        x = self.emb(ids)
        b, t, _ = x.shape
        qkv = self.qkv(self.ln(x)).view(b, t, self.h, 3 * self.dh)
        q, k, v = (qkv[..., i * self.dh:(i + 1) * self.dh].permute(0, 2, 1, 3) for i in range(3))
        angles = torch.arange(t, dtype=torch.float32)[:, None] / 10000 ** (
            torch.arange(0, self.rotary, 2).float() / max(self.rotary, 1))
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(0, 2, 1, 3).reshape(b, t, -1)
        x = x + self.dense(o)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.lnf(x))


@pytest.mark.parametrize("rotary", [4, 0])
@pytest.mark.parametrize("symmetries", ["all", "permutation"])
def test_heads_packed_per_head_are_observed_when_the_stream_is_aligned_by_permutations(rotary, symmetries):
    """With ``symmetries="permutation"`` the stream has a feature point and no other name is a block or a rotation:
    the heads, which move whole (a Repeat axis), were then not probed, and activation matching refused them as
    "units inside a layer"; rotary over none of a head's units made an empty output the probe could not read."""
    torch.manual_seed(0)
    a = _NeoX(rotary).eval()
    b = _NeoX(rotary).eval()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    heads = np.array([2, 0, 3, 1])  # B's head i is A's head heads[i]; rows of a head: 3 * dh
    rows = (heads[:, None] * 24 + np.arange(24)).reshape(-1)
    cols = (heads[:, None] * 8 + np.arange(8)).reshape(-1)
    hidden = np.random.default_rng(1).permutation(64)
    state["qkv.weight"], state["qkv.bias"] = state["qkv.weight"][rows], state["qkv.bias"][rows]
    state["dense.weight"] = state["dense.weight"][:, cols]
    state["fc1.weight"], state["fc1.bias"] = state["fc1.weight"][hidden], state["fc1.bias"][hidden]
    state["fc2.weight"] = state["fc2.weight"][:, hidden]
    b.load_state_dict(state)
    tokens = torch.from_numpy(_tokens(64, 20, 8, seed=2))
    with torch.no_grad():
        np.testing.assert_allclose(b(tokens).numpy(), a(tokens).numpy(), atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=tokens[:4])
    aligned = pair.align("activation", data=(tokens.numpy(), tokens.numpy()), symmetries=symmetries)
    got_a, got_b = aligned.params(0), aligned.params(1)
    assert max(float(np.abs(got_a[k] - got_b[k]).max()) for k in got_a) < 1e-5
