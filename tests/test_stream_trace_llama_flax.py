"""A flax Llama: ``nn.RMSNorm``, rotary position embeddings (``rotate_half`` by slices and
``jnp.concatenate``, cos/sin tables of positions × head_dim), grouped-query attention (``jnp.repeat``
of the key/value heads), einsum attention and a SwiGLU MLP; also GPT-J's rotary on neighbouring
pairs (``jnp.stack`` of ``x[..., 1::2]`` and ``x[..., ::2]``).

Rotary tables fix each head's unit order; heads still move, the query heads in groups with their
key/value head. References, written out here: a hand-planted transformation (index arithmetic of kv
heads, query heads inside each group, MLP neurons and the residual stream) under which the module's
own ``apply`` must give the same outputs and which weight matching must undo, and a within-head
permutation of query and key that must change them (the rotary is real).
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Blocks, Orthogonal
from combinability.permutation import Repeat
from tests.model_checks import flax_variables

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")

VOCAB, T, D, HEADS, DH = 13, 7, 16, 4, 4


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return jnp.concatenate((-x2, x1), axis=-1)


def rotate_every_two(x):  # GPT-J's: neighbouring pairs (jax's stack primitive)
    return jnp.stack((-x[..., 1::2], x[..., ::2]), axis=-1).reshape(x.shape)


class Attention(nn.Module):
    kv: int
    interleaved: bool = False

    @nn.compact
    def __call__(self, x, cos, sin):
        b, t, _ = x.shape
        q = nn.Dense(HEADS * DH, use_bias=False, name="q")(x).reshape(b, t, HEADS, DH)
        k = nn.Dense(self.kv * DH, use_bias=False, name="k")(x).reshape(b, t, self.kv, DH)
        v = nn.Dense(self.kv * DH, use_bias=False, name="v")(x).reshape(b, t, self.kv, DH)
        rotate = rotate_every_two if self.interleaved else rotate_half
        q = q * cos[:, None] + rotate(q) * sin[:, None]
        k = k * cos[:, None] + rotate(k) * sin[:, None]
        k, v = jnp.repeat(k, HEADS // self.kv, axis=2), jnp.repeat(v, HEADS // self.kv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / DH**0.5
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, HEADS * DH)
        return nn.Dense(D, use_bias=False, name="o")(out)


class Block(nn.Module):
    kv: int
    interleaved: bool = False

    @nn.compact
    def __call__(self, x, cos, sin):
        x = x + Attention(self.kv, self.interleaved, name="attn")(nn.RMSNorm(name="n1")(x), cos, sin)
        h = nn.RMSNorm(name="n2")(x)
        gated = nn.silu(nn.Dense(2 * D, use_bias=False, name="gate")(h)) * nn.Dense(2 * D, use_bias=False,
                                                                                      name="up")(h)
        return x + nn.Dense(D, use_bias=False, name="down")(gated)


class Llama(nn.Module):
    kv: int = 2
    interleaved: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="embed")(ids)
        freqs = jnp.arange(ids.shape[1])[:, None] / (10000 ** (jnp.arange(0, DH, 2) / DH))[None]
        emb = jnp.concatenate([freqs, freqs], -1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        for i in range(2):
            x = Block(self.kv, self.interleaved, name=f"b{i}")(x, cos, sin)
        return nn.Dense(VOCAB, use_bias=False, name="head")(nn.RMSNorm(name="nf")(x))


IDS = np.random.default_rng(0).integers(0, VOCAB, (3, T))


def _flat(variables) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in traverse.flatten_dict(variables, sep="/").items()}


def _apply(net, flat):
    return np.asarray(net.apply(traverse.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()},
                                                        sep="/"), IDS))


def _heads_moved(w: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    return np.take(w, (order[:, None] * DH + np.arange(DH)[None, :]).ravel(), axis=axis)


def _planted(flat: dict[str, np.ndarray], kv: int, seed: int) -> dict[str, np.ndarray]:
    """The hand-made transformation: flax kernels are (in, out)."""
    rng = np.random.default_rng(seed)
    rep, stream = HEADS // kv, rng.permutation(D)
    out = dict(flat)
    out["params/embed/embedding"] = flat["params/embed/embedding"][:, stream]
    out["params/head/kernel"] = flat["params/head/kernel"][stream]
    for name in flat:
        if name.endswith("/scale"):
            out[name] = flat[name][stream]
    for i in range(2):
        p = f"params/b{i}/"
        kv_order = rng.permutation(kv)
        q_order = np.concatenate([g * rep + rng.permutation(rep) for g in kv_order])
        neurons = rng.permutation(2 * D)
        out[p + "attn/q/kernel"] = _heads_moved(flat[p + "attn/q/kernel"], q_order, 1)[stream]
        for m in ("k", "v"):
            out[p + f"attn/{m}/kernel"] = _heads_moved(flat[p + f"attn/{m}/kernel"], kv_order, 1)[stream]
        out[p + "attn/o/kernel"] = _heads_moved(flat[p + "attn/o/kernel"], q_order, 0)[:, stream]
        for m in ("gate", "up"):
            out[p + f"{m}/kernel"] = flat[p + f"{m}/kernel"][stream][:, neurons]
        out[p + "down/kernel"] = flat[p + "down/kernel"][neurons][:, stream]
    return out


@pytest.mark.parametrize(("kv", "interleaved"), [(HEADS, False), (2, False), (2, True)])
def test_flax_llama_heads_move_whole_query_heads_in_groups_and_the_function_is_kept(kv, interleaved):
    net = Llama(kv, interleaved)
    variables = flax_variables(net, IDS, 0)
    spec, folds = cb.derive_symmetries((net, variables), IDS)
    q_rows = spec.axes_to_perm["params/b1/attn/q/kernel"][1]
    assert isinstance(q_rows, Repeat) and q_rows.times == DH
    if kv < HEADS:
        k_rows = spec.axes_to_perm["params/b1/attn/k/kernel"][1]
        assert isinstance(k_rows, Repeat) and spec.axes_to_perm["params/b1/attn/v/kernel"][1] == k_rows
        assert spec.kind(q_rows.name) == Blocks(k_rows.name, kv, HEADS // kv)
        assert spec.axes_to_perm["params/b1/attn/o/kernel"][0] == q_rows
    else:
        assert spec.axes_to_perm["params/b1/attn/k/kernel"][1] == q_rows
        assert spec.kind(spec.axes_to_perm["params/b1/attn/v/kernel"][1]) == Blocks(q_rows.name, HEADS, DH)
    assert isinstance(spec.kind(spec.axes_to_perm["params/embed/embedding"][1]), Orthogonal)  # RMSNorm folds
    flat = _flat(variables)
    direct = _apply(net, flat)
    np.testing.assert_allclose(_apply(net, _planted(flat, kv, seed=3)), direct, rtol=1e-4, atol=1e-4)
    folded = cb.fold_norms(flat, folds)  # the stream rotates once its norms' scales are in the readers
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=5), folded)
    np.testing.assert_allclose(_apply(net, moved), direct, rtol=1e-4, atol=1e-4)
    planted = _planted(folded, kv, seed=3)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, folded, planted, seed=0), planted)
    assert max(float(np.abs(back[k] - folded[k]).max()) for k in folded) < 1e-6


def test_the_flax_rotary_is_real():
    net = Llama(HEADS)
    flat = _flat(flax_variables(net, IDS, 1))
    swap = np.concatenate([h * DH + np.roll(np.arange(DH), 1) for h in range(HEADS)])
    moved = dict(flat)
    for m in ("q", "k"):
        moved[f"params/b0/attn/{m}/kernel"] = flat[f"params/b0/attn/{m}/kernel"][:, swap]
    assert np.abs(_apply(net, moved) - _apply(net, flat)).max() > 1e-3


def test_an_rmsnorm_written_out_in_flax_folds_as_nn_rmsnorm_and_the_stream_rotates():
    """``w * (x * lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps))`` (in float32, cast back): read
    whole, its weight folded into the layers reading it; a rotation of the folded model keeps its function and
    weight matching undoes it."""
    from tests.test_stream_trace_jax import _folded_map_undone, _model, _state

    class HandRMSNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
            h = x.astype(jnp.float32)
            h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)
            return w * h.astype(x.dtype)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, idx):
            x = nn.Embed(VOCAB, D, name="embed")(idx)
            h = HandRMSNorm(name="n1")(x)
            gated = nn.silu(nn.Dense(2 * D, use_bias=False, name="gate")(h))
            x = x + nn.Dense(D, use_bias=False, name="down")(gated * nn.Dense(2 * D, use_bias=False, name="up")(h))
            return nn.Dense(VOCAB, use_bias=False, name="head")(HandRMSNorm(name="nf")(x))

    idx = np.random.default_rng(0).integers(0, VOCAB, (3, 6)).astype(np.int32)
    module = Net()
    state = _state(module, idx, 0)
    spec, folds = cb.derive_symmetries(_model(module, state), idx)
    stream = spec.axes_to_perm["params/embed/embedding"][1]
    assert spec.kind(stream) == Orthogonal(fix_ones=False, requires=(("params/n1/weight", 1.0),
                                                                    ("params/nf/weight", 1.0)))
    folded = cb.fold_norms(state, folds)
    np.testing.assert_allclose(folded["params/head/kernel"], state["params/nf/weight"][:, None]
                               * state["params/head/kernel"])
    _folded_map_undone(module, state, folded, spec, idx, "params/embed/embedding")
