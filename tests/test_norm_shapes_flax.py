"""Flax norms of every shape in CNNs and MLPs: LayerNorm over each example's whole map (``reduction_axes`` and
``feature_axes`` ``(1, 2, 3)``, or ``reduction_axes`` alone: one scale per channel), GroupNorm by
``group_size``, RMSNorm and LayerNorm without a bias.

Independent references: the module's own ``apply`` with the hidden channels permuted by hand (written out
below, not read from the library) computes the same function and is undone by weight matching; a sweep's
end losses are optax's cross-entropy of each model.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from tests.model_checks import flax_planted_permutation

jax = pytest.importorskip("jax")
linen = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")


class MapNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = linen.relu(linen.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3), name="n1")(
            linen.Conv(4, (3, 3), name="c1")(x)))
        h = linen.relu(linen.LayerNorm(reduction_axes=(1, 2, 3), name="n2")(linen.Conv(4, (3, 3), name="c2")(h)))
        h = linen.relu(linen.GroupNorm(num_groups=None, group_size=2, name="n3")(linen.Conv(4, (1, 1), name="c3")(h)))
        return linen.Dense(3, name="fc")(h.mean((1, 2)))


class MLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = linen.relu(linen.RMSNorm(name="n1")(linen.Dense(6, name="fc1")(x)))
        h = linen.relu(linen.LayerNorm(use_bias=False, name="n2")(linen.Dense(6, name="fc2")(h)))
        return linen.Dense(3, name="fc")(h)


def _variables(net, x, seed):
    v = net.init(jax.random.PRNGKey(seed), x)
    leaves, tree = jax.tree_util.tree_flatten(v)
    keys = jax.random.split(jax.random.PRNGKey(seed + 10), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [leaf + 0.4 * jax.random.normal(k, leaf.shape)
                                               for leaf, k in zip(leaves, keys, strict=True)])


def test_a_whole_map_layernorm_permuted_by_hand_keeps_the_function_and_is_undone():
    x = np.random.default_rng(0).normal(size=(6, 5, 5, 2)).astype(np.float32)
    net = MapNet()
    v = _variables(net, x, 0)
    p = jax.tree_util.tree_map(np.asarray, v)["params"]
    perm = np.random.default_rng(1).permutation(4)
    q = {k: dict(d) for k, d in p.items()}
    q["c1"]["kernel"], q["c1"]["bias"] = p["c1"]["kernel"][..., perm], p["c1"]["bias"][perm]
    q["n1"]["scale"], q["n1"]["bias"] = p["n1"]["scale"][..., perm], p["n1"]["bias"][..., perm]  # (h, w, c)
    q["c2"]["kernel"] = p["c2"]["kernel"][:, :, perm, :]
    moved = {"params": q}
    np.testing.assert_allclose(net.apply(moved, x), net.apply(v, x), rtol=1e-5, atol=1e-5)
    spec = cb.derive_spec((net, v), x)
    assert ("n1.weight", 0) in spec.perm_to_axes["P_c1"] and spec.axes_to_perm["n1.weight"] == ("P_c1", None, None)
    pair = cb.ModelPair((net, v), (net, moved), example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
    flax_planted_permutation(net, v, x)  # every space, GroupNorm's blocks included


@pytest.mark.parametrize("net, shape", [(MapNet(), (5, 5, 2)), (MLP(), (7,))], ids=["map", "mlp"])
def test_sweep_end_losses_are_optax_cross_entropy_and_spec_moves_the_scales(net, shape):
    x = np.random.default_rng(2).normal(size=(30, *shape)).astype(np.float32)
    y = np.arange(30) % 3
    a, b = (net, _variables(net, x, 0)), (net, _variables(net, x, 1))
    if isinstance(net, MLP):
        table = cb.derive.describe(a, x)
        assert [(n.norm, n.norm_leaves()) for n in table.norm_nodes()] == [("rmsnorm", ("weight",)),
                                                                           ("layernorm", ("weight",))]
        flax_planted_permutation(net, a[1], x)
    pair = cb.ModelPair(a, b, example_input=x[:6]).align("weight", seed=0)
    loss = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0, 1], splits=["test"])["loss"].values.ravel()
    expected = [float(optax.softmax_cross_entropy_with_integer_labels(m.apply(v, x), y).mean()) for m, v in (a, b)]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
