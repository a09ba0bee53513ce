"""A user's flax DenseNet block: channel concatenations (``jnp.concatenate`` on the last axis) traced
into packed axes.

References: a spec written by hand, direct ``module.apply`` calls on permuted variables, and a
planted permutation weight matching must undo exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import flax_planted_permutation
from tests.test_user_models_flax import _init

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")
jnp = jax.numpy


class DenseBlockNet(nn.Module):
    """A stem and two DenseNet layers (BN-ReLU-conv, concatenated to their input), BN and a head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3))(x)
        for _ in range(2):
            h = nn.Conv(4, (3, 3))(nn.relu(nn.BatchNorm(use_running_average=not train)(x)))
            x = jnp.concatenate([x, h], axis=-1)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _x(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def test_derived_spec_packs_the_concatenated_parts():
    net, x = DenseBlockNet(), _x()
    spec = cb.derive_spec((net, _init(net, 0, x)), x)
    parts = ("P_Conv_0", "P_Conv_1", "P_Conv_2")
    assert spec.axes_to_perm["Conv_2.weight"] == ("P_Conv_2", parts[:2], None, None)
    assert spec.axes_to_perm["BatchNorm_1.running_var"] == (parts[:2],)
    assert spec.axes_to_perm["BatchNorm_2.weight"] == (parts,)
    # specs are in the reference (torch) convention, (out, in): the logits are fixed, the input packs the parts
    assert spec.axes_to_perm["Dense_0.weight"] == (None, parts)


def test_a_planted_permutation_keeps_the_function_and_is_undone():
    net, x = DenseBlockNet(), _x()
    va = _init(net, 0, x)
    flax_planted_permutation(net, va, x)


def test_a_concatenation_with_a_constant_is_refused_by_name():
    class Padded(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(3)(x)
            return nn.Dense(2)(jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=-1))

    x = np.ones((2, 4), np.float32)
    with pytest.raises(TracingError, match=r"operation 'concatenate'"):
        cb.derive_spec((Padded(), _init(Padded(), 0, x)), x)
