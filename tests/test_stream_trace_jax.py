"""Deriving the symmetries of a user's flax transformer (heads, FFN neurons and experts, residual stream).

Checks are functional (the flax model with its norms folded and transformed by a random map of every kind
computes the same outputs), planted transformations are recovered by weight matching, and the torch twins of the
reference models (``torch_to_flax``) give the same spec up to naming as the torch tracer.
"""

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from combinability_jax.transformers import CharGPT, MoEMLPNet, TinyViT, torch_to_flax  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.errors import TracingError  # noqa: E402
from combinability.kinds import Blocks, Orthogonal  # noqa: E402

IMAGES = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32)
TOKENS = np.random.default_rng(1).integers(0, 11, size=(4, 8)).astype(np.float32)
VECTORS = np.random.default_rng(2).normal(size=(40, 6)).astype(np.float32)
JAX = cb.get_backend("jax")


def _vit(**kw):
    return TinyViT(image_size=8, patch_size=4, d_model=16, heads=4, depth=1, mlp=24, **kw)


def _gpt(**kw):
    return CharGPT(vocab=11, context=8, d_model=16, heads=2, depth=1, mlp=24, **kw)


def _moe(**kw):
    return MoEMLPNet(hidden=5, experts=4, num_classes=3, top_k=2, **kw)


def _state(module, x, seed):
    """Random float64 parameters by state name, norms' scales and shifts far from 1 and 0."""
    shapes = flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x)), sep="/")
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in shapes.items():
        scale = 0.5 if len(v.shape) == 1 else 1.0 / np.sqrt(max(v.shape[0], 1))
        out[k] = rng.normal(size=v.shape) * scale + (1.0 if k.endswith("/scale") else 0.0)
    return out


@functools.cache
def _jitted(module):
    return jax.jit(module.apply)


def _apply(module, state, x):
    with jax.default_matmul_precision("highest"):
        variables = unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in state.items()}, sep="/")
        return np.asarray(_jitted(module)(variables, jnp.asarray(x)), np.float64)


def _model(module, state):
    return module, unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in state.items()}, sep="/")


def _close(out, base):
    np.testing.assert_allclose(out, base, atol=2e-4 * max(1.0, float(np.abs(base).max())))


def _folded_map_undone(module, state, folded, spec, x, moved_param):
    """The folded state computes the model's function; so does a random map of ``spec`` of it (which moves
    ``moved_param``), and weight matching undoes that map."""
    base = _apply(module, state, x)
    _close(_apply(module, folded, x), base)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=3), folded)
    assert float(np.abs(moved[moved_param] - folded[moved_param]).max()) > 0.1
    _close(_apply(module, moved, x), base)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, folded, moved, seed=0, restarts=2), moved)
    assert max(float(np.abs(back[k] - folded[k]).max()) for k in folded) < 1e-6


CASES = {
    "vit-layer-cls": (lambda: _vit(), IMAGES),
    "vit-rms-mean": (lambda: _vit(norm="rms", pool="mean"), IMAGES),
    "vit-moe": (lambda: _vit(experts=2, top_k=1), IMAGES),
    "gpt": (lambda: _gpt(), TOKENS),
    "moe": (lambda: _moe(), VECTORS),
    "moe-dense": (lambda: _moe(dense=True), VECTORS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_derived_symmetries_of_the_flax_references_keep_the_function(case):
    make, x = CASES[case]
    module = make()
    state = _state(module, x, 0)
    spec, folds = cb.derive_symmetries(_model(module, state), x)
    stream = [p for p, k in spec.kinds.items() if isinstance(k, Orthogonal)]
    if case.startswith("moe"):
        assert not folds and not stream
        assert spec.kind("P_moe/fc1") == Blocks("P_moe/gate", 4, 5)
        assert spec.axes_to_perm["params/moe/gate/kernel"] == (None, "P_moe/gate")
        assert spec.axes_to_perm["params/moe/fc2/kernel"] == ("P_moe/fc1", None)
    elif case == "vit-moe":  # LayerNorm's shift stays in the norm before the bias-free gate and rotates
        assert len(stream) == 1 and "params/blocks_0/norm2/bias" not in dict(spec.kinds[stream[0]].requires)
        assert spec.axes_to_perm["params/blocks_0/norm2/bias"] == (stream[0],)
    else:
        assert len(stream) == 1 and spec.kinds[stream[0]].fix_ones == ("rms" not in case)
    if not case.startswith("moe"):
        heads = _gpt().heads if case == "gpt" else 4
        qk, vo, res = "P_blocks_0/attn/q", "P_blocks_0/attn/v", "P_tok" if case == "gpt" else "P_patch"
        assert spec.kind(qk) == spec.kind(vo) == Blocks("P_blocks_0/attn/heads", heads, 16 // heads)
        assert spec.axes_to_perm["params/blocks_0/attn/k/kernel"] == (res, qk)  # flax (in, out)
        assert spec.axes_to_perm["params/blocks_0/attn/out/kernel"] == (vo, res)
        assert stream in ([], [res]) and {f.scale.rsplit("/", 2)[-2] for f in folds} == (
            {"norm1", "norm2", "norm"} if stream else set())
    if case == "vit-moe":
        assert spec.kind("P_blocks_0/mlp/fc1") == Blocks("P_blocks_0/mlp/gate", 2, 24)
    base = _apply(module, state, x)
    folded = cb.fold_norms(state, folds)
    _close(_apply(module, folded, x), base)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=3), folded)
    assert max(float(np.abs(moved[k] - folded[k]).max()) for k in folded) > 0.1
    _close(_apply(module, moved, x), base)
    perm_only = spec.permutations_only()
    moved = cb.apply_permutation(perm_only, cb.random_permutation(perm_only, state, seed=4), state)
    _close(_apply(module, moved, x), base)


@pytest.mark.parametrize("case", ["vit-layer-cls", "moe"])
def test_a_planted_transformation_of_a_traced_flax_model_is_undone(case):
    make, x = CASES[case]
    module = make()
    state = _state(module, x, 1)
    spec, folds = JAX.symmetries(_model(module, state), x)  # verified by function above
    a = cb.fold_norms(state, folds)
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=5), a)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6


def test_a_pair_of_flax_transformers_aligns_and_keeps_each_members_function():
    module = _vit()
    state = _state(module, IMAGES, 2)
    spec, folds = JAX.symmetries(_model(module, state), IMAGES)
    folded = cb.fold_norms(state, folds)
    planted = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=9), folded)
    a, b = _model(module, state), _model(module, planted)
    pair = cb.ModelPair(a, b, example_input=IMAGES)
    assert pair.folds and not pair.spec.is_plain
    aligned = pair.align("weight", restarts=2)
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-4)
    for i, original in enumerate((state, planted)):
        m = aligned.model(i)
        out = np.asarray(m.module.apply(m.variables, jnp.asarray(IMAGES)))
        _close(out, _apply(module, original, IMAGES))


class _Twin:
    """A torch reference model and its flax twin holding the same weights."""

    @staticmethod
    def pair(case):
        import torch
        from combinability_torch import transformers as tt

        torch.manual_seed(0)
        if case == "vit":
            return tt.TinyViT(image_size=8, patch_size=4, d_model=16, heads=4, depth=1, mlp=24), _vit(), IMAGES
        if case == "vit-moe-rms":
            return (tt.TinyViT(image_size=8, patch_size=4, d_model=16, heads=4, depth=1, mlp=24, experts=2,
                               norm="rms", pool="mean"), _vit(experts=2, norm="rms", pool="mean"), IMAGES)
        if case == "gpt":
            return tt.CharGPT(vocab=11, context=8, d_model=16, heads=2, depth=1, mlp=24), _gpt(), TOKENS
        return tt.MoEMLPNet(in_features=6, hidden=5, experts=4, num_classes=3, top_k=2), _moe(), VECTORS


def _torch_in_flax_names(spec, state):
    """The torch spec's entries re-keyed by flax name and flax axis order (in_proj split into q, k, v)."""
    out, renamed = {}, {}
    for name, entries in spec.axes_to_perm.items():
        flax_names = sorted(flatten_dict(torch_to_flax({name: state[name]})["params"], sep="/"))
        renamed[name] = [f"params/{n}" for n in flax_names]
        if name.endswith("in_proj_weight"):  # rows (q | k | v) -> kernels (in, out)
            for n, seg in zip(flax_names, entries[0], strict=True):  # sorted: k, q, v
                out[f"params/{n}"] = (entries[1], seg)
            out["params/" + flax_names[0]], out["params/" + flax_names[1]] = (entries[1], entries[0][1]), (
                entries[1], entries[0][0])
        elif name.endswith("in_proj_bias"):
            for n, seg in zip(flax_names, (entries[0][1], entries[0][0], entries[0][2]), strict=True):
                out[f"params/{n}"] = (seg,)
        else:
            (n,) = flax_names
            out[f"params/{n}"] = tuple(reversed(entries)) if n.endswith("kernel") else entries
    return out, renamed


def _same_up_to_naming(torch_spec, torch_entries, renamed, flax_spec):
    assert set(torch_entries) == set(flax_spec.axes_to_perm)
    names = {}
    for param, entries in torch_entries.items():
        for t, f in zip(entries, flax_spec.axes_to_perm[param], strict=True):
            assert (t is None) == (f is None), (param, entries, flax_spec.axes_to_perm[param])
            if t is not None:
                assert names.setdefault(t, f) == f, (param, t, f)
    assert len(set(names.values())) == len(names)
    for t, f in list(names.items()):
        kt, kf = torch_spec.kind(t), flax_spec.kind(f)
        assert type(kt) is type(kf), (t, kt, kf)
        if isinstance(kt, Blocks):
            assert (kt.blocks, kt.size) == (kf.blocks, kf.size)
            assert names.setdefault(kt.group, kf.group) == kf.group
        if isinstance(kt, Orthogonal):
            assert kt.fix_ones == kf.fix_ones
            assert sorted((renamed[p][0], v) for p, v in kt.requires) == sorted(kf.requires)


@pytest.mark.parametrize("case", ["vit", "vit-moe-rms", "gpt", "moe"])
def test_the_torch_and_flax_tracers_agree_on_the_twins(case):
    pytest.importorskip("torch")
    torch_model, flax_module, x = _Twin.pair(case)
    import torch

    torch_spec, torch_folds = cb.get_backend("torch").symmetries(torch_model.eval(), torch.tensor(x))
    tstate = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = torch_to_flax(tstate)
    flax_spec, flax_folds = JAX.symmetries((flax_module, variables), x)
    entries, renamed = _torch_in_flax_names(torch_spec, tstate)
    _same_up_to_naming(torch_spec, entries, renamed, flax_spec)
    assert len(torch_folds) == len(flax_folds)
    assert sorted(renamed[f.scale][0] for f in torch_folds) == sorted(f.scale for f in flax_folds)


class _FlaxMHA(nn.Module):
    """Pre-LN blocks around flax's own MultiHeadDotProductAttention, mean pooling."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="embed")(x)
        for i in range(2):
            h = h + nn.MultiHeadDotProductAttention(num_heads=4, name=f"attn_{i}")(nn.LayerNorm(name=f"ln_{i}")(h))
            h = h + nn.Dense(16, name=f"fc2_{i}")(nn.gelu(nn.Dense(32, name=f"fc1_{i}")(h)))
        return nn.Dense(5, name="head")(nn.LayerNorm(name="ln")(h).mean(axis=1))


def test_flax_multi_head_attention_moves_heads_on_their_own_axis():
    module, x = _FlaxMHA(), np.random.default_rng(3).normal(size=(4, 6, 3)).astype(np.float32)
    state = _state(module, x, 4)
    spec, folds = JAX.symmetries(_model(module, state), x)
    q, out = spec.axes_to_perm["params/attn_0/query/kernel"], spec.axes_to_perm["params/attn_0/out/kernel"]
    heads, qk, vo = q[1], q[2], out[1]
    assert (spec.axes_to_perm["params/attn_0/key/kernel"][1:], out[:2]) == ((heads, qk), (heads, vo))
    assert spec.axes_to_perm["params/attn_0/value/kernel"][1:] == (heads, vo) and len({heads, qk, vo}) == 3
    assert not any(isinstance(spec.kind(p), Orthogonal) for p in (heads, qk, vo))
    assert isinstance(spec.kind(q[0]), Orthogonal) and spec.kind(q[0]).fix_ones
    assert any(r.weight == "params/attn_1/query/kernel" and r.bias == "params/attn_1/query/bias"
               for f in folds for r in f.readers)
    a = cb.fold_norms(state, folds)
    _close(_apply(module, a, x), _apply(module, state, x))
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=6), a)
    _close(_apply(module, b, x), _apply(module, state, x))
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6


class _Cumsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(jnp.cumsum(nn.Dense(8, name="fc")(x), axis=-1))


class _FeatureConcat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(jnp.concatenate([nn.Dense(4, name="a")(x), nn.Dense(4, name="b")(x)], -1))


@pytest.mark.parametrize("module,match", [(_Cumsum(), "'cumsum' in the top-level _Cumsum.*spec= "),
                                          (_FeatureConcat(), "concatenating features.*spec= ")])
def test_a_flax_model_the_tracer_cannot_read_is_refused_naming_the_operation(module, match):
    x = np.ones((2, 5), np.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    with pytest.raises(TracingError, match=match):
        cb.derive_symmetries((module, variables), x)


def test_derived_flax_heads_permute_their_units_head_by_head():
    """``(d, heads, head_dim)`` kernels: the spec merges the heads and their units, so that each head's units move
    by a permutation of their own (the backend's spec shares one across heads); a planted map of that kind is
    undone."""
    module, x = _FlaxMHA(), np.random.default_rng(3).normal(size=(4, 6, 3)).astype(np.float32)
    state = _state(module, x, 4)
    spec, folds = cb.derive_symmetries(_model(module, state), x)
    _, heads, qk = spec.axes_of("params/attn_0/query/kernel")
    assert spec.kind(qk) == cb.Blocks(heads, 4, 4) and spec.axes_of("params/attn_0/key/kernel")[1:] == (heads, qk)
    a = cb.fold_norms(state, folds)
    planted = cb.random_permutation(spec, a, seed=7, derange=True)
    blocks = planted[qk].reshape(4, 4) % 4
    assert len({tuple(row) for row in blocks}) > 1  # the heads' units move differently
    b = cb.apply_permutation(spec, planted, a)
    _close(_apply(module, b, x), _apply(module, state, x))
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6


class _StackedExperts(nn.Module):
    """Experts stacked in one parameter per layer, ``(E, d, h)`` and ``(E, h, d)``, weighted densely by the gate."""

    mlp: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="inp")(x))
        gates = jax.nn.softmax(nn.Dense(4, name="gate")(h))
        w1 = self.param("w1", nn.initializers.lecun_normal(), (4, 8, 6))
        w2 = self.param("w2", nn.initializers.lecun_normal(), (4, 6, 8))
        out = jnp.einsum("neh,ehd->ned", jax.nn.gelu(jnp.einsum("nd,edh->neh", h, w1)), w2)
        h = h + jnp.einsum("ne,ned->nd", gates, out)
        if self.mlp:  # bias-free: its units are bound only beside the stream, which is no order of blocks
            h = h + nn.Dense(8, use_bias=False, name="fc2")(nn.gelu(nn.Dense(5, use_bias=False, name="fc1")(h)))
        return nn.Dense(3, name="out")(h)


def test_experts_stacked_in_one_parameter_move_with_the_gate_and_their_units_per_expert():
    module, x = _StackedExperts(), np.random.default_rng(4).normal(size=(16, 10)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    spec, _ = cb.derive_symmetries((module, variables), x)
    gate, _, units = spec.axes_of("params/w1")
    assert spec.axes_of("params/gate/kernel")[1] == gate and spec.kind(units) == cb.Blocks(gate, 4, 6)
    a = {k: np.asarray(v) for k, v in flatten_dict(variables, sep="/").items()}
    rng = np.random.default_rng(5)
    sigma, taus = rng.permutation(4), [rng.permutation(6) for _ in range(4)]
    pairs = list(zip(sigma, taus, strict=True))
    b = dict(a, **{"params/gate/kernel": a["params/gate/kernel"][:, sigma],
                   "params/gate/bias": a["params/gate/bias"][sigma],
                   "params/w1": np.stack([a["params/w1"][s][:, t] for s, t in pairs]),
                   "params/w2": np.stack([a["params/w2"][s][t] for s, t in pairs])})
    _close(module.apply(unflatten_dict(b, sep="/"), x), module.apply(variables, x))
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6


def test_only_the_merges_that_keep_the_function_are_kept():
    """A bias-free MLP's units sit only beside the stream (a permutation here), which lies before them in one layer
    and after them in the other: no blocks, never proposed (merging them per stream unit would change the function);
    the experts' units are merged."""
    module, x = _StackedExperts(mlp=True), np.random.default_rng(6).normal(size=(16, 10)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(1), x)
    raw, _ = JAX.symmetries(_model(module, {k: np.asarray(v) for k, v in flatten_dict(variables, sep="/").items()}),
                            x)
    from combinability.module_stacks import block_pairs

    stream, units = raw.axes_to_perm["params/fc1/kernel"]
    assert units not in block_pairs(raw) and stream in raw.perm_names  # not proposed from the spec alone
    spec, _ = cb.derive_symmetries((module, variables), x)
    assert spec.kind(units) == cb.Neuron() and isinstance(spec.kind(spec.axes_of("params/w1")[2]), cb.Blocks)
