"""nanoGPT's attention written in flax: one ``nn.Dense(3 * d)`` for query, key and value, cut by ``jnp.split``
or by slices of the last axis. The layer's units are then packed parts, each a space of its own, so that heads
move as in the torch twin (``c_attn(x).split(d, dim=2)``): query and key as one Blocks name, value another,
both in the heads' order.

References: the spec written by hand, the model run in float32 at the highest matmul precision under a random
transformation of the derived spec (it must keep the outputs), which weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.kinds import Blocks, Orthogonal  # noqa: E402
from tests.test_stream_trace_jax import _apply, _close, _model, _state  # noqa: E402

TOKENS = np.random.default_rng(1).integers(0, 11, size=(4, 8)).astype(np.int32)


class CausalSelfAttention(nn.Module):
    d: int = 16
    heads: int = 2
    cut: str = "split"

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        qkv = nn.Dense(3 * self.d, name="c_attn")(x)
        if self.cut == "split":
            q, k, v = jnp.split(qkv, 3, axis=-1)
        else:
            q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]

        def heads(z):
            return z.reshape(b, t, self.heads, c // self.heads).transpose(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        att = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(c // self.heads)
        att = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9), axis=-1)
        return nn.Dense(self.d, name="c_proj")((att @ v).transpose(0, 2, 1, 3).reshape(b, t, c))


class GPT(nn.Module):
    cut: str = "split"

    @nn.compact
    def __call__(self, idx):
        x = nn.Embed(11, 16, name="wte")(idx)
        x = x + CausalSelfAttention(cut=self.cut, name="attn")(nn.LayerNorm(name="ln_1")(x))
        x = x + nn.Dense(16, name="c_fc2")(nn.gelu(nn.Dense(24, name="c_fc")(nn.LayerNorm(name="ln_2")(x))))
        return nn.Dense(11, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


@pytest.mark.parametrize("cut", ["split", "slices"])
def test_a_fused_query_key_value_layer_gives_heads_and_keeps_the_function(cut):
    module = GPT(cut=cut)
    state = _state(module, TOKENS, 0)
    spec, folds = cb.derive_symmetries(_model(module, state), TOKENS)
    qk, vo, res = "P_attn/c_attn.q", "P_attn/c_attn.v", "P_wte"
    assert spec.axes_to_perm["params/attn/c_attn/kernel"] == (res, (qk, qk, vo))
    assert spec.axes_to_perm["params/attn/c_attn/bias"] == ((qk, qk, vo),)
    assert spec.axes_to_perm["params/attn/c_proj/kernel"] == (vo, res)
    assert spec.kind(qk) == spec.kind(vo) == Blocks("P_attn/heads", 2, 8)
    assert isinstance(spec.kind(res), Orthogonal)
    base = _apply(module, state, TOKENS)
    folded = cb.fold_norms(state, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=3), folded)
    assert float(np.abs(moved["params/attn/c_attn/kernel"] - folded["params/attn/c_attn/kernel"]).max()) > 0.1
    _close(_apply(module, moved, TOKENS), base)
    perm_only = spec.permutations_only()
    planted = cb.apply_permutation(perm_only, cb.random_permutation(perm_only, state, seed=4), state)
    _close(_apply(module, planted, TOKENS), base)
    back = cb.apply_permutation(perm_only, cb.weight_matching(perm_only, state, planted, seed=0, restarts=2), planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-6


class PartialSlice(nn.Module):
    """Only the first half of a layer's units is read (the rest never): the slice does not tile the units."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="fc1")(x))
        return nn.Dense(3, name="fc2")(h[..., :4])


def test_slices_that_do_not_tile_a_layers_units_hold_them_in_place():
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    state = _state(PartialSlice(), x, 0)
    spec, _ = cb.derive_symmetries(_model(PartialSlice(), state), x)
    assert spec.axes_to_perm["params/fc1/kernel"] == (None, None)
    assert spec.axes_to_perm["params/fc2/kernel"] == (None, None)
