"""Reference transformers and MoEs (torch and flax) against a plain numpy forward; the text dataset.

The numpy reference below is written from the architecture's definition (pre-LN blocks,
torch's multi-head attention maths, top-k / soft gating), on the torch state names; the
flax models run on weights converted by ``torch_to_flax``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from combinability_jax import transformers as J  # noqa: E402
from combinability_torch import transformers as T  # noqa: E402

from combinability.data import text  # noqa: E402
from combinability.errors import DatasetError, DatasetNotFoundError, UnknownNameError  # noqa: E402

# ---------------------------------------------------------------- numpy reference


def np_norm(x, sd, prefix, kind):
    if kind == "layer":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * sd[f"{prefix}.weight"]


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_linear(x, sd, prefix):
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def np_attention(x, sd, prefix, heads, causal):
    n, t, d = x.shape
    dh = d // heads
    w, b = sd[f"{prefix}.in_proj_weight"], sd[f"{prefix}.in_proj_bias"]
    q, k, v = ((x @ w[j * d:(j + 1) * d].T + b[j * d:(j + 1) * d]).reshape(n, t, heads, dh).transpose(0, 2, 1, 3)
               for j in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    if causal:
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    o = (np_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
    return np_linear(o, sd, f"{prefix}.out_proj")


def np_moe(x, sd, prefix, experts, hidden, top_k, dense, act=np_gelu):
    logits = x @ sd[f"{prefix}gate.weight"].T
    if dense:
        g = np_softmax(logits)
    else:
        g = np.zeros_like(logits)
        flat_l, flat_g = logits.reshape(-1, experts), g.reshape(-1, experts)
        for row in range(len(flat_l)):
            top = np.argsort(-flat_l[row])[:top_k]
            flat_g[row, top] = np_softmax(flat_l[row, top])
    h = act(np_linear(x, sd, f"{prefix}fc1"))
    out = sd[f"{prefix}fc2.bias"] * g.sum(-1, keepdims=True)
    w2 = sd[f"{prefix}fc2.weight"]
    for e in range(experts):
        block = slice(e * hidden, (e + 1) * hidden)
        out = out + g[..., e:e + 1] * (h[..., block] @ w2[:, block].T)
    return out


def np_blocks(h, sd, cfg, causal=False):
    for i in range(cfg["depth"]):
        p = f"blocks.{i}"
        h = h + np_attention(np_norm(h, sd, f"{p}.norm1", cfg["norm"]), sd, f"{p}.attn", cfg["heads"], causal)
        z = np_norm(h, sd, f"{p}.norm2", cfg["norm"])
        if cfg.get("experts"):
            h = h + np_moe(z, sd, f"{p}.mlp.", cfg["experts"], cfg["mlp"], cfg["top_k"], cfg["dense"])
        else:
            h = h + np_linear(np_gelu(np_linear(z, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
    return np_norm(h, sd, "norm", cfg["norm"])


def np_vit(sd, x, cfg):
    n, c, hh, ww = x.shape
    p = cfg["patch_size"]
    patches = np.stack([x[:, :, r * p:(r + 1) * p, s * p:(s + 1) * p].reshape(n, -1)
                        for r in range(hh // p) for s in range(ww // p)], axis=1)
    h = np_linear(patches, sd, "patch")
    if cfg["pool"] == "cls":
        h = np.concatenate([np.broadcast_to(sd["cls"], (n, 1, h.shape[-1])), h], axis=1)
    h = np_blocks(h + sd["pos"], sd, cfg)
    return np_linear(h[:, 0] if cfg["pool"] == "cls" else h.mean(1), sd, "head")


def np_gpt(sd, tokens, cfg):
    t = tokens.shape[1]
    h = np_blocks(sd["tok.weight"][tokens] + sd["pos"][:, :t], sd, cfg, causal=True)
    return np_linear(h, sd, "head")


def numpy_state(model):
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def randomise(model, seed=0):
    """Random weights everywhere (also norm scales, biases, class token) so no term hides at its init value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5) + (p.ndim == 1) * 0.5)
    return model.eval()


def torch_out(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy()


_JITTED: dict[str, object] = {}


def flax_out(module, model, x):
    """The flax module's output on the torch model's weights (jitted: one compilation, not one per operation)."""
    apply = _JITTED.setdefault(repr(module), jax.jit(module.apply))
    return np.asarray(apply(J.torch_to_flax(model.state_dict()), jnp.asarray(x)))


VIT = dict(image_size=8, patch_size=2, d_model=16, heads=4, depth=2, mlp=8)
VIT_CASES = {
    "cls-layernorm": dict(pool="cls", norm="layer"),
    "mean-rmsnorm": dict(pool="mean", norm="rms"),
    "moe-top2": dict(pool="cls", norm="layer", experts=3, top_k=2),
    "moe-top1-rms": dict(pool="mean", norm="rms", experts=3, top_k=1),
    "moe-dense": dict(pool="cls", norm="layer", experts=3, dense=True),
}


def _cfg(kwargs):
    return {"experts": 0, "top_k": 1, "dense": False, "pool": "cls", "norm": "layer", **VIT, **kwargs}


# ---------------------------------------------------------------- forward passes


@pytest.mark.parametrize("case", list(VIT_CASES))
def test_tiny_vit_torch_and_flax_match_numpy(case):
    kwargs = {**VIT, **VIT_CASES[case]}
    torch.manual_seed(0)
    model = randomise(T.TinyViT(**kwargs))
    x = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype(np.float32)
    ref = np_vit(numpy_state(model), x.astype(np.float64), _cfg(VIT_CASES[case]))
    assert ref.shape == (5, 10)
    np.testing.assert_allclose(torch_out(model, x), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flax_out(J.TinyViT(**kwargs), model, x), ref, rtol=1e-4, atol=1e-4)


def test_default_vit_shapes_on_28x28():
    model = T.TinyViT()
    sd = model.state_dict()
    assert sd["pos"].shape == (1, 17, 64) and sd["patch.weight"].shape == (64, 49)
    assert sd["blocks.1.attn.in_proj_weight"].shape == (192, 64) and sd["blocks.0.mlp.fc1.weight"].shape == (128, 64)
    assert torch_out(model.eval(), np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("module", ["vit", "vit-moe", "gpt", "moe-net"])
def test_flax_init_has_the_converted_shapes_and_round_trips(module):
    torch.manual_seed(0)
    build = {"vit": (T.TinyViT(**VIT, norm="rms"), J.TinyViT(**VIT, norm="rms"), (2, 1, 8, 8)),
             "vit-moe": (T.TinyViT(**VIT, experts=2), J.TinyViT(**VIT, experts=2), (2, 1, 8, 8)),
             "gpt": (T.CharGPT(vocab=7, context=6, d_model=8, heads=2, depth=1, mlp=4),
                     J.CharGPT(vocab=7, context=6, d_model=8, heads=2, depth=1, mlp=4), (2, 6)),
             "moe-net": (T.MoEMLPNet(64, 5, 3), J.MoEMLPNet(5, 3), (2, 1, 8, 8))}
    tmodel, fmodule, shape = build[module]
    converted = J.torch_to_flax(tmodel.state_dict())
    init = jax.eval_shape(fmodule.init, jax.random.key(0), jnp.zeros(shape))  # shapes only, nothing computed
    assert jax.tree_util.tree_map(np.shape, dict(init)) == jax.tree_util.tree_map(np.shape, converted)
    back = J.flax_to_torch(converted)
    assert sorted(back) == sorted(tmodel.state_dict())
    for name, value in tmodel.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy())


def _gpt(**kw):
    torch.manual_seed(0)
    args = dict(vocab=11, context=8, d_model=16, heads=4, depth=2, mlp=8, **kw)
    return randomise(T.CharGPT(**args)), J.CharGPT(**args)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_chargpt_torch_and_flax_match_numpy(norm):
    model, module = _gpt(norm=norm)
    tokens = np.random.default_rng(2).integers(0, 11, size=(3, 8))
    ref = np_gpt(numpy_state(model), tokens, dict(depth=2, heads=4, norm=norm)).reshape(24, 11)
    np.testing.assert_allclose(torch_out(model, tokens), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flax_out(module, model, tokens.astype(np.float32)), ref, rtol=1e-4, atol=1e-4)
    # float token ids (the library's data cache holds float32) and shorter sequences work too
    np.testing.assert_allclose(torch_out(model, tokens[:, :5].astype(np.float32)),
                               np_gpt(numpy_state(model), tokens[:, :5], dict(depth=2, heads=4, norm=norm))
                               .reshape(15, 11), rtol=1e-4, atol=1e-4)
    model.flatten = False
    assert torch_out(model, tokens).shape == (3, 8, 11)


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    model, module = _gpt()
    tokens = np.random.default_rng(3).integers(0, 11, size=(2, 8))
    changed = tokens.copy()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    for run in (lambda t: torch_out(model, t), lambda t: flax_out(module, model, t.astype(np.float32))):
        a, b = run(tokens).reshape(2, 8, 11), run(changed).reshape(2, 8, 11)
        np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-6)
        assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3  # the change is seen from its position on


def test_chargpt_logits_work_with_the_library_cross_entropy():
    import array_api_compat.numpy as xp

    from combinability.evaluation import cross_entropy, mean_cross_entropy

    model, _ = _gpt()
    tokens = np.random.default_rng(4).integers(0, 11, size=(3, 8))
    targets = np.random.default_rng(5).integers(0, 11, size=(3, 8))
    logits = torch_out(model, tokens).astype(np.float64)  # (n*T, V), example-major
    z = logits - logits.max(-1, keepdims=True)
    ref = np.log(np.exp(z).sum(-1)) - z[np.arange(24), targets.reshape(-1)]  # row i*T+t <-> targets[i, t]
    np.testing.assert_allclose(cross_entropy(xp, logits, targets.reshape(-1)), ref, rtol=1e-5)
    stacked = np.stack([logits, logits])  # the evaluator's (k, n*T, V)
    np.testing.assert_allclose(cross_entropy(xp, stacked, targets.reshape(-1)), np.stack([ref, ref]), rtol=1e-5)
    # the training loss (combinability.training.fit) takes the (n, T) targets as they are
    np.testing.assert_allclose(mean_cross_entropy(xp, logits, targets), ref.mean(), rtol=1e-5)
    loss = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(targets).reshape(-1))
    np.testing.assert_allclose(float(loss), ref.mean(), rtol=1e-6)


@pytest.mark.parametrize("top_k,dense", [(1, False), (2, False), (1, True)])
def test_moe_mlp_torch_and_flax_match_numpy(top_k, dense):
    torch.manual_seed(0)
    model = randomise(T.MoEMLP(6, 5, 4, top_k=top_k, dense=dense, d_out=3))
    x = np.random.default_rng(6).normal(size=(7, 6)).astype(np.float32)
    ref = np_moe(x.astype(np.float64), numpy_state(model), "", 4, 5, top_k, dense)
    np.testing.assert_allclose(torch_out(model, x), ref, rtol=1e-4, atol=1e-5)
    module = J.MoEMLP(3, 5, 4, top_k, dense)
    np.testing.assert_allclose(flax_out(module, model, x), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- planted symmetries


def permute_experts(sd, prefix, experts, hidden, order, within):
    """New expert ``j`` is old expert ``order[j]``, its neuron ``u`` the old neuron ``within[order[j]][u]``."""
    rows = np.concatenate([order[j] * hidden + within[order[j]] for j in range(experts)])
    out = dict(sd)
    out[f"{prefix}gate.weight"] = sd[f"{prefix}gate.weight"][order]
    out[f"{prefix}fc1.weight"] = sd[f"{prefix}fc1.weight"][rows]
    out[f"{prefix}fc1.bias"] = sd[f"{prefix}fc1.bias"][rows]
    out[f"{prefix}fc2.weight"] = sd[f"{prefix}fc2.weight"][:, rows]
    return out


def _load(model, sd):
    model.load_state_dict({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in sd.items()})
    return model


@pytest.mark.parametrize("top_k,dense", [(1, False), (2, False), (1, True)])
def test_planted_expert_and_neuron_permutation_leaves_the_moe_unchanged(top_k, dense):
    rng = np.random.default_rng(7)
    torch.manual_seed(0)
    experts, hidden = 4, 5
    model = randomise(T.MoEMLP(6, hidden, experts, top_k=top_k, dense=dense))
    x = rng.normal(size=(50, 6)).astype(np.float32)
    order, within = rng.permutation(experts), [rng.permutation(hidden) for _ in range(experts)]
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    permuted = _load(T.MoEMLP(6, hidden, experts, top_k=top_k, dense=dense).eval(),
                     permute_experts(sd, "", experts, hidden, order, within))
    np.testing.assert_allclose(torch_out(permuted, x), torch_out(model, x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        before, after = model.routes(torch.as_tensor(x)).numpy(), permuted.routes(torch.as_tensor(x)).numpy()
    np.testing.assert_array_equal(order[after], before)  # the same experts, under their new indices
    # moving the experts' weights without their gate rows is not a symmetry (so the check can fail)
    broken = permute_experts(sd, "", experts, hidden, order, within)
    broken["gate.weight"] = sd["gate.weight"]
    assert np.abs(torch_out(_load(T.MoEMLP(6, hidden, experts, top_k=top_k, dense=dense).eval(), broken), x)
                  - torch_out(model, x)).max() > 1e-3


def test_planted_expert_and_head_permutations_leave_the_moe_vit_unchanged():
    rng = np.random.default_rng(8)
    torch.manual_seed(0)
    kwargs = {**VIT, "experts": 3, "top_k": 2}
    model = randomise(T.TinyViT(**kwargs))
    x = rng.normal(size=(6, 1, 8, 8)).astype(np.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    d, heads = VIT["d_model"], VIT["heads"]
    dh = d // heads
    for i in range(VIT["depth"]):
        p = f"blocks.{i}."
        sd = permute_experts(sd, f"{p}mlp.", 3, VIT["mlp"], rng.permutation(3),
                             [rng.permutation(VIT["mlp"]) for _ in range(3)])
        head_order = rng.permutation(heads)
        cols = np.concatenate([np.arange(h * dh, (h + 1) * dh) for h in head_order])
        rows = np.concatenate([cols + j * d for j in range(3)])
        sd[f"{p}attn.in_proj_weight"] = sd[f"{p}attn.in_proj_weight"][rows]
        sd[f"{p}attn.in_proj_bias"] = sd[f"{p}attn.in_proj_bias"][rows]
        sd[f"{p}attn.out_proj.weight"] = sd[f"{p}attn.out_proj.weight"][:, cols]
    permuted = _load(T.TinyViT(**kwargs).eval(), sd)
    np.testing.assert_allclose(torch_out(permuted, x), torch_out(model, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flax_out(J.TinyViT(**kwargs), permuted, x), torch_out(model, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("build,match", [
    (lambda: T.TinyViT(d_model=30, heads=4), "multiple of heads"),
    (lambda: T.TinyViT(image_size=28, patch_size=5), "not divisible"),
    (lambda: T.TinyViT(pool="max"), "pool must be"),
    (lambda: T.TinyViT(norm="batch"), "norm must be"),
    (lambda: T.MoEMLP(4, 4, 2, top_k=3), "top_k must be in 1..experts=2"),
    (lambda: T.CharGPT(vocab=1), "vocab must be"),
    (lambda: T.CharGPT(vocab=8, depth=0), "depth must be >= 1"),
    (lambda: J.TinyViT(d_model=30, heads=4).init(jax.random.key(0), np.zeros((1, 1, 28, 28), np.float32)),
     "multiple of heads"),
    (lambda: J.CharGPT(vocab=8, depth=0).init(jax.random.key(0), np.zeros((1, 4), np.int32)), "depth must be >= 1"),
])
def test_bad_arguments_name_what_is_valid(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_chargpt_rejects_sequences_longer_than_the_context():
    model, _ = _gpt()
    with pytest.raises(ValueError, match="exceeds the context 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------- text data

SAMPLE = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))


def test_vocabulary_round_trip_and_unknown_characters():
    vocab = text.build_vocab(SAMPLE)
    assert vocab.chars == "".join(sorted(set(SAMPLE)))
    ids = vocab.encode(SAMPLE)
    assert ids.dtype == np.int64 and vocab.decode(ids) == SAMPLE
    with pytest.raises(DatasetError, match="'Z'"):
        vocab.encode("Zebra")
    with pytest.raises(DatasetError, match="empty"):
        text.build_vocab("")


def test_windows_are_disjoint_shifted_and_split_by_position():
    context, group, every = 7, 3, 4
    vocab = text.build_vocab(SAMPLE)
    x, y = text.text_windows(vocab.encode(SAMPLE), context)
    n = len(SAMPLE) // (context + 1)
    assert x.shape == y.shape == (n, context)
    for i in (0, 1, n - 1):  # window i is characters [i*(T+1), (i+1)*(T+1)) of the text
        chunk = SAMPLE[i * (context + 1):(i + 1) * (context + 1)]
        assert vocab.decode(x[i]) == chunk[:-1] and vocab.decode(y[i]) == chunk[1:]
    train = text.split_indices(n, "train", group, every)
    test = text.split_indices(n, "test", group, every)
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).tolist() == list(range(n))
    assert test[:6].tolist() == [9, 10, 11, 21, 22, 23]  # the 4th, 8th, ... run of 3 windows
    xt, yt, v2 = text.text_split(SAMPLE, "test", context, group=group, test_every=every)
    assert v2 == vocab
    np.testing.assert_array_equal(xt, x[test])
    np.testing.assert_array_equal(yt, y[test])


def test_text_bad_input():
    with pytest.raises(DatasetError, match="context must be a positive integer"):
        text.text_windows(np.arange(10), 0)
    with pytest.raises(DatasetError, match="holds no window"):
        text.text_windows(np.arange(5), 8)
    with pytest.raises(UnknownNameError, match="valid splits"):
        text.split_indices(10, "valid")


def test_missing_corpus_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "JARGON_DIRS", ())
    monkeypatch.setenv("COMBINABILITY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install jargon-text") as err:
        text.read_jargon(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "jargon.txt").write_text("   indented line\n\n\n\n   another   \n")  # a file in root is found
    assert text.read_jargon(tmp_path) == "indented line\n\nanother\n"


def _jargon_installed() -> bool:
    try:
        text.read_jargon()
    except DatasetNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _jargon_installed(), reason="the Jargon File is not installed (apt-get install jargon-text)")
def test_jargon_corpus_splits():
    corpus = text.read_jargon()
    assert len(corpus) > 1_000_000
    train, test = text.load_jargon("train"), text.load_jargon("test")
    assert train.num_classes == test.num_classes == text.JARGON_VOCAB_SIZE == len(set(corpus))
    assert train.x.shape[1] == test.x.shape[1] == text.CONTEXT and train.y.shape == train.x.shape
    assert len(train) + len(test) == len(corpus) // (text.CONTEXT + 1)
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.12
    vocab = text.Vocabulary("".join(train.classes))
    assert vocab.decode(train.x[0]).startswith("The Jargon File")
