"""Learned aligners on flax models a user writes (a linen BatchNorm CNN, an NNX MLP with dropout).

References written here: the aligned B computes B's function; the loss an aligner reports is the
inference-mode midpoint loss formed in numpy and run through the user's module (linen
``train=False``, NNX ``eval()``), with optax's cross-entropy; a seed fixes the result.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

import jax.numpy as jnp  # noqa: E402

import combinability as cb  # noqa: E402

N = 160


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = sklearn_datasets.load_digits()
    idx = np.random.default_rng(0).permutation(len(d.target))[:N]
    return (d.images[idx] / 16.0).astype(np.float32)[..., None], d.target[idx].astype(np.int64)  # NHWC


class _Cnn(fnn.Module):
    @fnn.compact
    def __call__(self, x, train: bool = False):
        def unit(h):
            return fnn.BatchNorm(use_running_average=not train, momentum=0.9)(fnn.Conv(6, (3, 3))(h))

        x = fnn.relu(unit(x))
        x = fnn.relu(x + unit(fnn.relu(unit(x))))
        return fnn.Dense(10)(x.mean((1, 2)))


class _Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1, self.l2 = nnx.Linear(64, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x.reshape(x.shape[0], -1)))))


def _ce(logits, y) -> float:
    return float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), y).mean())


def _fit_linen(x, y, seed: int):
    net, tx = _Cnn(), optax.adam(1e-2)
    v = net.init(jax.random.PRNGKey(seed), x[:1])
    o = tx.init(v["params"])

    @jax.jit
    def step(v, o, xb, yb):
        def loss(p):
            z, s = net.apply({**v, "params": p}, xb, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(z, yb).mean(), s

        (_, s), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, o = tx.update(g, o)
        return {"params": optax.apply_updates(v["params"], u), **s}, o

    for b in np.array_split(np.random.default_rng(seed).permutation(len(x)), 5):
        v, o = step(v, o, x[b], y[b])
    return net, v


def test_linen_batchnorm_cnn(digits):
    x, y = digits
    (net, va), (_, vb) = _fit_linen(x, y, 0), _fit_linen(x, y, 1)
    pair = cb.ModelPair((net, va), (net, vb), example_input=x[:8])

    def loss(variables, xs, ys):
        return _ce(net.apply(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables), xs, train=False), ys)

    for method in ("ste", "sinkhorn"):
        got = pair.align(method, data=(x[:81], y[:81]), epochs=1, batch_size=40, eval_examples=81, seed=0)
        vb2 = got.model_b.variables
        assert loss(vb2, x, y) == pytest.approx(loss(vb, x, y), rel=1e-5)  # still B's function
        mid = jax.tree.map(lambda p, q: (np.asarray(p, np.float64) + np.asarray(q, np.float64)) / 2, va, vb2)
        assert got.permutation.objective == pytest.approx(loss(mid, x[:81], y[:81]), rel=1e-5)


def test_nnx_mlp_with_dropout(digits):
    x, y = digits
    x = x.reshape(len(x), -1)
    models = []
    for seed in (0, 1):
        m = _Mlp(nnx.Rngs(seed))
        opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
        m.train()
        for b in np.array_split(np.random.default_rng(seed).permutation(len(x)), 5):
            opt.update(m, nnx.grad(lambda mm, b=b: optax.softmax_cross_entropy_with_integer_labels(
                mm(x[b]), y[b]).mean())(m))
        m.eval()
        models.append(m)
    a, b = models
    pair = cb.ModelPair(a, b, example_input=x[:8])
    runs = [pair.align("ste", data=(x, y), epochs=1, batch_size=40, lr=0.05, seed=2) for _ in range(2)]
    assert runs[0].permutation.history == runs[1].permutation.history
    got = runs[0]
    mb = got.model_b.nnx()
    np.testing.assert_allclose(np.asarray(mb(x)), np.asarray(b(x)), atol=1e-5)
    mid = got.model_b.nnx()
    nnx.update(mid, jax.tree.map(lambda p, q: (p + q) / 2, nnx.state(a, nnx.Param), nnx.state(mb, nnx.Param)))
    mid.eval()
    assert got.permutation.objective == pytest.approx(_ce(mid(x), y), rel=1e-5)
