"""Many models a user wrote in flax (an NNX module, linen ``(module, variables)`` pairs), trained with optax:
``align_many`` (every method), ``ModelSet.align`` with a many-model method, merging and sweeps on selections.

References, independent of the library: a planted permutation written by hand into an NNX module's
variables, each member's function by its own ``__call__`` / ``module.apply``, the merged variables as a numpy
mean of the aligned members', and pairwise maps composed as index arrays.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

import combinability as cb
from combinability.align.many import METHODS, pairwise_permutation
from tests.model_checks import digits_images

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
fnn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


X, Y = digits_images()
TRAIN, TEST = np.arange(0, 600), np.arange(1400, 1797)
FLAT, NHWC = X.reshape(len(X), -1), X[..., None]


class NnxMLP(nnx.Module):
    """Linear, BatchNorm, relu; linear, dropout, relu; linear."""

    def __init__(self, rngs: nnx.Rngs, h: int = 16) -> None:
        self.fc1, self.bn1 = nnx.Linear(64, h, rngs=rngs), nnx.BatchNorm(h, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(h, h, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(h, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.fc1(x)))
        return self.out(self.drop(nnx.relu(self.fc2(x))))


class LinenCNN(fnn.Module):
    """Conv-BatchNorm-relu, a residual conv-BatchNorm block, global mean, dense (channels-last)."""

    @fnn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def unit(h: jax.Array) -> jax.Array:
            return fnn.BatchNorm(use_running_average=not train, momentum=0.9)(fnn.Conv(6, (3, 3))(h))

        x = fnn.relu(unit(x))
        x = fnn.relu(x + unit(fnn.relu(unit(x))))
        return fnn.Dense(10)(x.mean((1, 2)))


def _batches(seed: int, epochs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [b for _ in range(epochs) for b in np.array_split(rng.permutation(TRAIN), len(TRAIN) // 50)]


def _fit_nnx(seed: int, epochs: int = 5) -> NnxMLP:
    model = NnxMLP(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model: NnxMLP, opt: Any, xb: jax.Array, yb: jax.Array) -> None:
        def loss(m: NnxMLP) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        opt.update(model, nnx.grad(loss)(model))

    model.train()
    for b in _batches(seed, epochs):
        step(model, opt, FLAT[b], Y[b])
    model.eval()
    return model


_NET = LinenCNN()


@jax.jit
def _linen_step(v: Any, o: Any, xb: jax.Array, yb: jax.Array) -> tuple[Any, Any]:
    def loss(p: Any) -> tuple[jax.Array, Any]:
        z, s = _NET.apply({**v, "params": p}, xb, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(z, yb).mean(), s

    (_, s), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    u, o = optax.adam(1e-2).update(g, o)
    return {"params": optax.apply_updates(v["params"], u), **s}, o


def _fit_linen(seed: int, epochs: int = 4) -> tuple[LinenCNN, Any]:
    v = _NET.init(jax.random.PRNGKey(seed), NHWC[:1])
    o = optax.adam(1e-2).init(v["params"])
    for b in _batches(seed, epochs):
        v, o = _linen_step(v, o, NHWC[b], Y[b])
    return _NET, v


@pytest.fixture(scope="module")
def nnx_nets() -> list[NnxMLP]:
    return [_fit_nnx(s) for s in range(3)]


@pytest.fixture(scope="module")
def linen_nets() -> list[tuple[LinenCNN, Any]]:
    return [_fit_linen(s) for s in range(3)]


def _nnx_logits(model: Any, x: np.ndarray) -> np.ndarray:
    m = model if isinstance(model, nnx.Module) else model.nnx()
    m.eval()
    return np.asarray(m(x), dtype=np.float64)


def _linen_variables(model: Any) -> dict[str, np.ndarray]:
    variables = model.variables if hasattr(model, "variables") else model[1]
    return {k: np.asarray(v) for k, v in traverse.flatten_dict(variables, sep="/").items()}


def _planted_twin(src: NnxMLP, p1: np.ndarray, p2: np.ndarray) -> NnxMLP:
    """``src`` with its hidden units reordered by hand: unit ``j`` of the twin is unit ``p[j]`` of ``src``."""
    twin = NnxMLP(nnx.Rngs(99))
    twin.fc1.kernel[...] = src.fc1.kernel[...][:, p1]
    twin.fc1.bias[...] = src.fc1.bias[...][p1]
    for name in ("scale", "bias", "mean", "var"):
        getattr(twin.bn1, name)[...] = getattr(src.bn1, name)[...][p1]
    twin.fc2.kernel[...] = src.fc2.kernel[...][p1][:, p2]
    twin.fc2.bias[...] = src.fc2.bias[...][p2]
    twin.out.kernel[...] = src.out.kernel[...][p2]
    twin.out.bias[...] = src.out.bias[...]
    twin.eval()
    return twin


@pytest.mark.parametrize("method", list(METHODS))
def test_nnx_set_planted_permutation_function_and_merge(nnx_nets, method):
    a, b, c = nnx_nets
    rng = np.random.default_rng(3)
    p1, p2 = rng.permutation(16), rng.permutation(16)
    twin = _planted_twin(a, p1, p2)
    probe = FLAT[TEST][:64]
    np.testing.assert_allclose(_nnx_logits(twin, probe), _nnx_logits(a, probe), rtol=1e-5, atol=1e-5)
    ms = cb.align_many([a, twin, b, c], method=method, example_input=FLAT[:16], seed=0)
    np.testing.assert_array_equal(ms.transforms[1]["P_fc1"], np.argsort(p1))
    np.testing.assert_array_equal(ms.transforms[1]["P_fc2"], np.argsort(p2))
    aligned_twin = ms.models[1].nnx()
    assert type(aligned_twin) is NnxMLP
    np.testing.assert_array_equal(np.asarray(aligned_twin.fc2.kernel[...]), np.asarray(a.fc2.kernel[...]))
    np.testing.assert_array_equal(np.asarray(aligned_twin.bn1.var[...]), np.asarray(a.bn1.var[...]))
    for given, aligned in zip([a, twin, b, c], ms.models, strict=True):
        np.testing.assert_allclose(_nnx_logits(aligned, probe), _nnx_logits(given, probe), rtol=1e-5, atol=1e-5)
    for i, j, k in itertools.permutations(range(4), 3):
        pij, pjk, pik = (pairwise_permutation(ms, s, t) for s, t in ((i, j), (j, k), (i, k)))
        for name in pik:
            np.testing.assert_array_equal(np.asarray(pij[name])[np.asarray(pjk[name])], pik[name])
    merged = ms.merge().nnx()
    members = [m.nnx() for m in ms.models]
    for path in (("fc1", "kernel"), ("bn1", "mean"), ("bn1", "var"), ("out", "kernel")):
        mean = np.mean([np.asarray(getattr(getattr(m, path[0]), path[1])[...], np.float64) for m in members], 0)
        np.testing.assert_allclose(np.asarray(getattr(getattr(merged, path[0]), path[1])[...]), mean,
                                   rtol=1e-6, atol=1e-7)


def test_nnx_selection_sweeps_with_reset_and_set_align(nnx_nets):
    test, train = (FLAT[TEST], Y[TEST]), (FLAT[TRAIN], Y[TRAIN])
    naive = cb.ModelSet(nnx_nets, example_input=FLAT[:16])
    ms = naive.align("cycle", seed=0)
    again = cb.align_many(nnx_nets, method="cycle", example_input=FLAT[:16], seed=0)
    for i in range(3):
        np.testing.assert_array_equal(ms.theta(i), again.theta(i))
    ds = cb.sweep(ms.select(2, 0, 1), cb.Triangle(resolution=1), data=test, repair="reset", repair_data=train)
    assert np.all(np.isfinite(ds["loss"].values))
    # the ends of a two-model sweep are the selected members themselves
    ds = cb.sweep(ms.select(1, 2), cb.Linear(), data=test, values=[0.0, 1.0])
    for k, member in enumerate((1, 2)):
        logits = _nnx_logits(ms.models[member], test[0])
        acc = float(np.mean(logits.argmax(1) == test[1]))
        assert float(ds["accuracy"].sel(split="test").values[k, 0]) == pytest.approx(acc)


@pytest.mark.parametrize("method", list(METHODS))
def test_linen_set_each_method_keeps_functions_and_merges_the_mean(linen_nets, method):
    ms = cb.align_many(linen_nets, method=method, example_input=NHWC[:8], seed=0)
    probe = NHWC[TEST][:64]
    for (module, variables), aligned in zip(linen_nets, ms.models, strict=True):
        np.testing.assert_allclose(np.asarray(module.apply(aligned.variables, probe)),
                                   np.asarray(module.apply(variables, probe)), rtol=1e-4, atol=1e-5)
    merged = _linen_variables(ms.merge())
    members = [_linen_variables(m) for m in ms.models]
    assert any(k.startswith("batch_stats/") for k in merged)
    for k, v in merged.items():
        np.testing.assert_allclose(v, np.mean([m[k].astype(np.float64) for m in members], 0), rtol=1e-6, atol=1e-7)


def test_a_set_of_two_frameworks_is_refused_naming_both(nnx_nets):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with pytest.raises(cb.IncompatibleModelsError, match=r"model A \(Sequential\) is a model of the 'torch' backend, "
                       r"model C \(NnxMLP\) one of the 'jax' backend"):
        cb.align_many([net, net, nnx_nets[0]], example_input=FLAT[:16])
    with pytest.raises(cb.IncompatibleModelsError, match=r"model A \(NnxMLP\) is a model of the 'jax' backend"):
        cb.ModelSet([nnx_nets[0], net], example_input=FLAT[:16])
