"""A flax ViT with a convolutional patch embedding (``nn.Conv`` with stride = kernel, reshaped into
tokens) and ``nn.MultiHeadDotProductAttention``: the kernel's output channels open the stream.

References: the module's own ``apply`` before and after a random transformation of every traced
kind (norms folded), and a planted transformation that weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.kinds import Orthogonal
from tests.model_checks import flax_variables

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")

D, HEADS = 16, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(2 * D, name="fc1")(nn.LayerNorm(name="ln2")(x))))


class ViT(nn.Module):
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(D, (4, 4), strides=(4, 4), feature_group_count=self.groups, name="patch")(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, D))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, D)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, 1 + h * w, D))
        x = Block(name="b1")(Block(name="b0")(x))
        return nn.Dense(5, name="head")(nn.LayerNorm(name="norm")(x)[:, 0])


X = np.random.default_rng(0).normal(size=(4, 12, 12, 2)).astype(np.float32)


def _variables(net, seed):
    return flax_variables(net, X, seed)


def test_the_patch_kernel_opens_the_stream_and_transformations_keep_the_function():
    net = ViT()
    variables = _variables(net, 0)
    spec, folds = cb.derive_symmetries((net, variables), X)
    stream = spec.axes_to_perm["params/patch/kernel"][3]
    assert spec.axes_to_perm["params/patch/kernel"][:3] == (None, None, None)  # pixels and image channels
    assert spec.axes_to_perm["params/patch/bias"] == (stream,) and spec.axes_to_perm["params/cls"] == (None, None,
                                                                                                      stream)
    assert isinstance(spec.kind(stream), Orthogonal) and spec.kind(stream).fix_ones
    assert spec.axes_of("params/b0/attn/query/kernel")[0] == stream
    flat = {k: np.asarray(v, np.float64) for k, v in traverse.flatten_dict(variables, sep="/").items()}
    folded = cb.fold_norms(flat, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=5), folded)
    assert not np.allclose(moved["params/patch/kernel"], folded["params/patch/kernel"])
    direct = np.asarray(net.apply(variables, X))
    np.testing.assert_allclose(np.asarray(net.apply(traverse.unflatten_dict(moved, sep="/"), X)), direct,
                               rtol=1e-4, atol=1e-4)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, folded, moved, seed=0, restarts=2), moved)
    assert max(float(np.abs(back[k] - folded[k]).max()) for k in folded) < 1e-6


def test_a_grouped_patch_convolution_is_refused_by_name():
    net = ViT(groups=2)
    with pytest.raises(TracingError, match="grouped convolutions are not followed"):
        cb.derive_symmetries((net, _variables(net, 1)), X)
