"""BatchNorm reset and REPAIR on flax models a user writes (linen and NNX), against a reference by hand.

The reference computes each place's channel statistics in numpy from the model's own outputs
(linen's ``capture_intermediates``, the NNX model's explicit feature dict) and sets the
parameters as ``docs/repairs.md`` defines: BatchNorm statistics reset first (flax keeps the
biased variance), every norm output and every hidden layer without a norm given the end
models' interpolated mean and standard deviation.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb

jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
jnp = jax.numpy


def _data(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, (n, 6, 6, 1)) + rng.normal(0.3, 0.5, (1, 6, 6, 1))).astype(np.float32)
    return x, rng.integers(0, 3, n).astype(np.int64)


def _moments(t) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t, np.float64)
    t = t.reshape(-1, t.shape[-1])
    return t.mean(0), t.std(0)


def _target(ends: list, key: str, w: float) -> tuple[np.ndarray, np.ndarray]:
    (ma, sa), (mb, sb) = (_moments(e[key]) for e in ends)
    return (1 - w) * ma + w * mb, (1 - w) * sa + w * sb


# -- linen: conv + BatchNorm blocks and a hidden Dense without a norm -----------------------------------------
class LinenNet(fnn.Module):
    @fnn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate((4, 6)):
            x = fnn.Conv(width, (3, 3), name=f"conv{i}")(x)
            x = fnn.relu(fnn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
        x = fnn.relu(fnn.Dense(5, name="hid")(x.mean((1, 2))))
        return fnn.Dense(3, name="out")(x)


def _linen_variables(seed: int) -> dict:
    net = LinenNet()
    v = jax.tree_util.tree_map(np.asarray, net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6, 6, 1))))
    rng = np.random.default_rng(seed + 10)
    for i, c in enumerate((4, 6)):
        v["batch_stats"][f"bn{i}"] = {"mean": rng.normal(0, 0.3, c).astype(np.float32),
                                      "var": rng.uniform(0.5, 1.5, c).astype(np.float32)}
        v["params"][f"bn{i}"] = {"scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
                                 "bias": rng.normal(0, 0.3, c).astype(np.float32)}
    return v


def _linen_features(v: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    _, state = LinenNet().apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    return {k: np.asarray(inter[k]["__call__"][0]) for k in inter if k != "__call__"}


def _linen_reference(va: dict, vb: dict, x: np.ndarray, w: float) -> tuple[dict, dict]:
    """(reset, REPAIR) of the ``w``-combination, by hand."""
    mid = jax.tree_util.tree_map(lambda p, q: ((1 - w) * p.astype(np.float64) + w * q).astype(np.float32), va, vb)
    ends = [_linen_features(e, x) for e in (va, vb)]
    reset = jax.tree_util.tree_map(np.array, mid)
    for i in range(2):  # each BatchNorm reads its conv directly: reset from the convs' outputs
        mean, std = _moments(_linen_features(reset, x)[f"conv{i}"])
        reset["batch_stats"][f"bn{i}"] = {"mean": mean.astype(np.float32), "var": (std**2).astype(np.float32)}
    repaired = jax.tree_util.tree_map(np.array, mid)
    for site in ("bn0", "bn1", "hid"):
        if site.startswith("bn"):
            conv = f"conv{site[-1]}"
            mean, std = _moments(_linen_features(repaired, x)[conv])
            repaired["batch_stats"][site] = {"mean": mean.astype(np.float32), "var": (std**2).astype(np.float32)}
        mu_t, sd_t = _target(ends, site, w)
        mu_c, sd_c = _moments(_linen_features(repaired, x)[site])
        r = sd_t / sd_c
        p = repaired["params"][site]
        scale = "scale" if site.startswith("bn") else "kernel"
        p[scale] = (p[scale] * r).astype(np.float32)  # a Dense kernel (in, out): its output columns
        p["bias"] = ((p["bias"] - mu_c) * r + mu_t).astype(np.float32)
    return reset, repaired


def _assert_tree_close(got, want, atol: float = 2e-4) -> None:
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, leaf in jax.tree_util.tree_leaves_with_path(want):
        np.testing.assert_allclose(np.asarray(flat_got[path]), leaf, rtol=2e-4, atol=atol, err_msg=str(path))


def test_linen_midpoint_reset_and_repair_equal_the_hand_reference():
    net, (x, y) = LinenNet(), _data()
    va, vb = _linen_variables(0), _linen_variables(1)
    pair = cb.ModelPair((net, va), (net, vb), example_input=x[:4])
    reset, repaired = _linen_reference(va, vb, x, 0.5)
    _assert_tree_close(pair.merge(repair="reset", repair_data=(x, y)).variables, reset, atol=1e-5)
    _assert_tree_close(pair.merge(repair="repair", repair_data=(x, y)).variables, repaired)


# -- NNX: LayerNorm CNN (a LayerNorm over the channels of each position) and a hidden Linear ----------------------
class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1, self.n1 = nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.LayerNorm(4, rngs=rngs)
        self.c2, self.n2 = nnx.Conv(4, 6, (3, 3), rngs=rngs), nnx.LayerNorm(6, rngs=rngs)
        self.hid, self.out = nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x, feats: dict | None = None):
        feats = {} if feats is None else feats
        x = feats.setdefault("n1", self.n1(self.c1(x)))
        x = feats.setdefault("n2", self.n2(self.c2(nnx.relu(x))))
        x = feats.setdefault("hid", self.hid(nnx.relu(x).mean((1, 2))))
        return self.out(nnx.relu(x))


def _nnx_model(seed: int) -> NnxNet:
    m = NnxNet(nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 10)
    for n in (m.n1, m.n2):
        n.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n.scale[...].shape), jnp.float32)
        n.bias[...] = jnp.asarray(rng.normal(0, 0.3, n.bias[...].shape), jnp.float32)
    return m


def test_nnx_layernorm_cnn_midpoint_repair_equals_the_hand_reference():
    x, y = _data()
    a, b = _nnx_model(0), _nnx_model(1)
    pair = cb.ModelPair(a, b, example_input=x[:4])
    graph, sa = nnx.split(a)
    _, sb = nnx.split(b)
    ref = nnx.merge(graph, jax.tree_util.tree_map(lambda p, q: (p + q) / 2, sa, sb))
    ends = [{}, {}]
    a(x, ends[0]), b(x, ends[1])
    for site in ("n1", "n2", "hid"):
        mu_t, sd_t = _target(ends, site, 0.5)
        got: dict = {}
        ref(x, got)
        mu_c, sd_c = _moments(got[site])
        r = sd_t / sd_c
        layer = getattr(ref, site)
        leaf = layer.kernel if site == "hid" else layer.scale
        leaf[...] = jnp.asarray(np.asarray(leaf[...]) * r, jnp.float32)
        layer.bias[...] = jnp.asarray((np.asarray(layer.bias[...]) - mu_c) * r + mu_t, jnp.float32)
    merged = pair.merge(repair="repair", repair_data=(x, y)).nnx()
    _assert_tree_close(nnx.state(merged, nnx.Param), jax.tree_util.tree_map(np.asarray, nnx.state(ref, nnx.Param)))
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(ref(x)), rtol=1e-3, atol=1e-4)
