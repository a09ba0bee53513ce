"""Flax models as the flax examples and Scenic write them: the ImageNet ResNet's stem pooling with
``padding="SAME"`` (more padding after than before at stride 2), Scenic's class token ``jnp.tile``-d over
the batch, and the variables passed without a collection.

References: the user's module itself (``module.apply``) against the backends' own networks of the
traced table and against a planted permutation that weight matching undoes exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import flax_planted_permutation, table_logits

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
jnp = jax.numpy

X = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 9, 9, 1)))


class Stem(nn.Module):
    """Conv, BatchNorm, ReLU, then a pooling over windows of 3 at stride 2 (the flax ImageNet ResNet's)."""

    padding: object = "SAME"
    pool: str = "max"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), padding="SAME")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        window = {"max": nn.max_pool, "avg": nn.avg_pool}[self.pool]
        x = window(x, (3, 3), strides=(2, 2), padding=self.padding)
        x = nn.relu(nn.Conv(5, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def _variables(net, seed):
    v = net.init(jax.random.PRNGKey(seed), X)
    keys = jax.random.split(jax.random.PRNGKey(seed + 10), 2)
    stats = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.uniform(keys[0], a.shape), v["batch_stats"])
    return {"params": v["params"], "batch_stats": stats}


@pytest.mark.parametrize("pool,padding", [("max", "SAME"), ("avg", "SAME"), ("max", ((0, 1), (1, 2)))])
def test_pooling_padded_more_on_one_side_is_traced(pool, padding):
    net = Stem(padding, pool)
    variables = _variables(net, 0)
    table = cb.derive.describe((net, variables), X)
    node = next(n for n in table.nodes if n.op == "maxpool")
    # 9 positions, windows of 3 at stride 2: "SAME" pads 1 before and 1 after; ((0, 1), (1, 2)) as given
    assert node.paddings(2) == (((1, 1), (1, 1)) if padding == "SAME" else padding)
    want = np.asarray(net.apply(variables, X))
    from flax import traverse_util

    state = table.from_flax(traverse_util.flatten_dict(variables, sep="/"))
    params = {k: np.asarray(v) for k, v in state.items() if np.asarray(v).dtype.kind == "f"}
    for backend in ("torch", "jax"):  # channels-first for both, as the prepared models take it
        np.testing.assert_allclose(table_logits(backend, table, params, np.moveaxis(X, -1, 1)), want, rtol=1e-4,
                                   atol=1e-5)
    flax_planted_permutation(net, variables, X)


def test_uneven_padding_at_stride_two_is_traced_as_given():
    x = X[:, :8, :8]  # 8 positions, windows of 3 at stride 2: "SAME" pads 0 before and 1 after
    net = Stem("SAME", "max")
    variables = net.init(jax.random.PRNGKey(1), x)
    table = cb.derive.describe((net, variables), x)
    assert next(n for n in table.nodes if n.op == "maxpool").paddings(2) == ((0, 1), (0, 1))
    flax_planted_permutation(net, variables, x)


class ScenicViT(nn.Module):
    """Scenic's ViT: patches by a strided Conv, a class token tiled over the batch, pre-LN blocks."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(3, 3), padding="VALID")(x)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        y = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        x = x + y
        x = x + nn.Dense(c)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
        return nn.Dense(3)(nn.LayerNorm()(x)[:, 0])


def test_a_class_token_tiled_over_the_batch_is_traced():
    net = ScenicViT()
    variables = net.init(jax.random.PRNGKey(2), X)
    spec, folds = cb.derive_symmetries((net, variables), X)
    assert spec.axes_to_perm["params/cls"][-1] is not None  # the token's features move with the stream
    pair = cb.ModelPair((net, variables), (net, net.init(jax.random.PRNGKey(3), X)), example_input=X).align("weight")
    np.testing.assert_allclose(np.asarray(pair.model(1).module.apply(pair.model(1).variables, X)),
                               np.asarray(net.apply(net.init(jax.random.PRNGKey(3), X), X)), rtol=1e-4, atol=1e-5)


def test_variables_without_a_collection_are_refused_saying_what_to_pass():
    net = Stem()
    variables = net.init(jax.random.PRNGKey(0), X)
    with pytest.raises(TracingError, match=r"pass the whole variables dict as module.init returns it"):
        cb.ModelPair((net, variables["params"]), (net, variables["params"]), example_input=X)
    with pytest.raises(TracingError, match=r"collection \"batch_stats\".*pass the whole variables dict"):
        cb.ModelPair((net, {"params": variables["params"]}), (net, {"params": variables["params"]}), example_input=X)


class RotaryAttention(nn.Module):
    """Attention with a rotary embedding written as MaxText writes it: each head's units split in halves by
    ``jnp.split`` (or by slices), rotated by cos/sin tables of the positions, joined back."""

    split: bool = True

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h, dh = 2, d // 2
        q, k, v = (nn.Dense(d, use_bias=False, name=n)(x).reshape(b, t, h, dh) for n in ("wq", "wk", "wv"))
        angle = jnp.arange(t)[:, None] / (10000.0 ** (jnp.arange(0, dh, 2) / dh))[None, :]
        cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]

        def rotate(z):
            z1, z2 = jnp.split(z, 2, axis=-1) if self.split else (z[..., : dh // 2], z[..., dh // 2:])
            return jnp.concatenate([z1 * cos - z2 * sin, z1 * sin + z2 * cos], axis=-1)

        s = jnp.einsum("bqhd,bkhd->bhqk", rotate(q), rotate(k)) / jnp.sqrt(dh)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
        return nn.Dense(d, use_bias=False, name="wo")(o)


class RotaryLM(nn.Module):
    split: bool = True

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 8, name="tok")(tokens)
        x = x + RotaryAttention(self.split, name="attn")(nn.RMSNorm(name="n1")(x))
        return nn.Dense(11, use_bias=False, name="head")(nn.RMSNorm(name="nf")(x))


def test_a_rotary_written_with_jnp_split_is_traced_as_its_slices_are():
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (3, 6), 0, 11))
    kinds = {}
    for split in (True, False):
        net = RotaryLM(split)
        variables = net.init(jax.random.PRNGKey(5), tokens)
        spec, _ = cb.derive_symmetries((net, variables), tokens)  # checked: a random map keeps the outputs
        kinds[split] = {k: type(v).__name__ for k, v in spec.kinds.items()}
        pair = cb.ModelPair((net, variables), (net, net.init(jax.random.PRNGKey(6), tokens)),
                            example_input=tokens).align("weight")
        np.testing.assert_allclose(np.asarray(pair.model(1).module.apply(pair.model(1).variables, tokens)),
                                   np.asarray(net.apply(net.init(jax.random.PRNGKey(6), tokens), tokens)),
                                   rtol=1e-4, atol=1e-4)
    assert kinds[True] == kinds[False] and "Orthogonal" in kinds[True].values()
