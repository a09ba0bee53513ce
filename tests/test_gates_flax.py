"""A user's flax network with squeeze-and-excitation gates (``x * gate`` broadcast over the positions) and
a gated head: the factors of each product move together.

References: a spec written by hand, direct ``module.apply`` calls on permuted variables, and a
planted permutation weight matching must undo exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from tests.model_checks import flax_planted_permutation
from tests.test_user_models_flax import _init

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")
jnp = jax.numpy


class SE(nn.Module):
    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)  # (n, 1, 1, c), which Dense reads as a vector
        return x * nn.hard_sigmoid(nn.Dense(x.shape[-1], name="expand")(nn.relu(nn.Dense(4, name="reduce")(s))))


class GatedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = SE()(nn.hard_swish(nn.Conv(8, (3, 3))(x)))
        x = x + SE()(nn.relu(nn.Conv(8, (3, 3), feature_group_count=8)(x)))
        x = x.mean(axis=(1, 2))
        return nn.Dense(10)(nn.silu(nn.Dense(12)(x)) * nn.Dense(12)(x))


def _x(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def test_derived_spec_ties_the_gates_to_the_stream():
    net, x = GatedNet(), _x()
    spec = cb.derive_spec((net, _init(net, 0, x)), x)
    # flax names modules as they are made: Dense_0 is the head (made first), Dense_1 and Dense_2 its factors
    stream = {("Conv_0.weight", 0), ("Conv_0.bias", 0), ("Conv_1.weight", 0), ("Conv_1.bias", 0), ("Dense_1.weight", 1),
              ("Dense_2.weight", 1)}
    for se in ("SE_0", "SE_1"):
        stream |= {(f"{se}.reduce.weight", 1), (f"{se}.expand.weight", 0), (f"{se}.expand.bias", 0)}
    want = [stream, *({(f"{se}.reduce.weight", 0), (f"{se}.reduce.bias", 0), (f"{se}.expand.weight", 1)}
                      for se in ("SE_0", "SE_1")),
            {("Dense_1.weight", 0), ("Dense_1.bias", 0), ("Dense_2.weight", 0), ("Dense_2.bias", 0),
             ("Dense_0.weight", 1)}]
    assert sorted(map(sorted, (set(v) for v in spec.perm_to_axes.values()))) == sorted(map(sorted, want))


def test_a_planted_permutation_keeps_the_function_and_is_undone():
    net, x = GatedNet(), _x()
    va = _init(net, 0, x)
    flax_planted_permutation(net, va, x)
