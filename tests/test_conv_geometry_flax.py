"""A user's flax model with non-square, dilated, unevenly padded, depthwise and grouped convolutions.

References: a spec written by hand (as a partition of (parameter, axis) pairs), direct
``module.apply`` calls on permuted variables, and a planted permutation weight matching
must undo exactly.
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


class MobileBlockNet(nn.Module):
    """Stem, an inverted residual block (expand, depthwise, project), factorised, dilated,
    unevenly padded (SAME, stride 2, even kernel) and grouped convolutions."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3), padding="SAME")(x)))
        h = nn.relu6(nn.Conv(12, (1, 1))(x))
        h = nn.relu6(nn.Conv(12, (3, 3), padding="SAME", feature_group_count=12, use_bias=False)(h))
        x = x + nn.Conv(6, (1, 1))(h)
        x = nn.relu(nn.Conv(6, (1, 5), padding=((0, 0), (2, 2)))(x))
        x = nn.relu(nn.Conv(6, (3, 3), kernel_dilation=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(8, (4, 4), strides=2, padding="SAME")(x))
        x = nn.Conv(8, (3, 3), padding=1, feature_group_count=2)(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _x(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def test_derived_spec_is_the_hand_written_one():
    net, x = MobileBlockNet(), _x()
    spec = cb.derive_spec((net, _init(net, 0, x)), x)
    bn = {(f"BatchNorm_0.{leaf}", 0) for leaf in ("weight", "bias", "running_mean", "running_var")}
    want = [
        {("Conv_0.weight", 0), ("Conv_0.bias", 0), *bn, ("Conv_1.weight", 1), ("Conv_3.weight", 0),
         ("Conv_3.bias", 0), ("Conv_4.weight", 1)},
        {("Conv_1.weight", 0), ("Conv_1.bias", 0), ("Conv_2.weight", 0), ("Conv_3.weight", 1)},  # depthwise
        {("Conv_4.weight", 0), ("Conv_4.bias", 0), ("Conv_5.weight", 1)},
        {("Conv_5.weight", 0), ("Conv_5.bias", 0), ("Conv_6.weight", 1)},
        {("Conv_7.weight", 0), ("Conv_7.bias", 0), ("Dense_0.weight", 1)},  # the grouped conv: blocks
    ]  # Conv_6's output feeds the grouped conv: its two blocks move whole, in the same order
    assert sorted(map(sorted, (set(v) for v in spec.perm_to_axes.values()))) == sorted(map(sorted, want))
    assert dict(spec.kinds) == {"P_Conv_7": cb.Blocks("P_Conv_7/groups", 2, 4)}
    assert dict(spec.repeats) == {"P_Conv_7/groups": [("Conv_6.weight", 0, 4), ("Conv_6.bias", 0, 4)]}


def test_a_planted_permutation_keeps_the_function_and_is_undone():
    net, x = MobileBlockNet(), _x()
    va = _init(net, 0, x)
    flax_planted_permutation(net, va, x)


def test_a_conv_with_input_dilation_is_refused_by_name():
    class Up(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.Conv(4, (3, 3), padding=1, input_dilation=2)(x).mean(axis=(1, 2)))

    net, x = Up(), _x()
    with pytest.raises(TracingError, match=r"module 'Conv_0'.*without input dilation.*input_dilation 2"):
        cb.derive_spec((net, _init(net, 0, x)), x)
