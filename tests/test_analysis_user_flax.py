"""Feature-level analyses on flax models a user writes (linen with BatchNorm, NNX), against references
from the papers' definitions computed with the user's own ``apply`` and ``jax.grad``."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")
from flax import nnx  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

import combinability as cb  # noqa: E402


class LinenBn(fnn.Module):
    """A BatchNorm CNN with a residual block (tanh: a smooth loss, so finite differences converge)."""

    @fnn.compact
    def __call__(self, x, train: bool = False):
        def unit(h):
            return fnn.BatchNorm(use_running_average=not train, momentum=0.5)(fnn.Conv(4, (3, 3))(h))

        x = fnn.tanh(unit(x))
        x = fnn.tanh(x + unit(fnn.tanh(unit(x))))
        return fnn.Dense(10)(x.mean((1, 2)))


class NnxMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1, self.l2 = nnx.Linear(64, 12, rngs=rngs), nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = cb.load_dataset("digits", "train").subset(300)
    return np.array(data.x.transpose(0, 2, 3, 1), dtype=np.float32), np.array(data.y)


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fit_linen(net, x, y, seed: int, steps: int = 15):
    v, tx = net.init(jax.random.PRNGKey(seed), x[:1]), optax.adam(1e-2)
    o = tx.init(v["params"])

    @jax.jit
    def step(v, o, xb, yb):
        def loss(p):
            z, s = net.apply({**v, "params": p}, xb, train=True, mutable=["batch_stats"])
            return ce(z, yb), s

        (_, s), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, o = tx.update(g, o)
        return {"params": optax.apply_updates(v["params"], u), **s}, o

    for s in range(steps):
        idx = np.arange(s * 32, s * 32 + 32) % len(x)
        v, o = step(v, o, x[idx], y[idx])
    return net, v


def test_layerwise_curvature_linen_batchnorm_counts_batch_stats(digits):
    """ΔᵀHΔ and the slope difference of each cumulative path against ``jax.grad`` over params and batch_stats."""
    x, y = digits
    net = LinenBn()
    pair = cb.ModelPair(fit_linen(net, x, y, 0), fit_linen(net, x, y, 1), example_input=x[:8]).align("weight")
    ends = [flatten_dict(jax.tree.map(np.asarray, dict(pair.model(i).variables)), sep="/") for i in (0, 1)]
    layer = {"Conv_0": 0, "BatchNorm_0": 0, "Conv_1": 1, "BatchNorm_1": 1, "Conv_2": 2, "BatchNorm_2": 2, "Dense_0": 3}
    assert pair.layer_names == ["Conv_0", "Conv_1", "Conv_2", "Dense_0"]
    xe, ye = x[:120], y[:120]
    grad = jax.jit(jax.grad(lambda v: ce(net.apply(v, xe), ye)))
    ds = cb.layerwise_barriers(pair, (xe, ye), lambdas=[0.5], modes=["cumulative"])

    def along(theta, delta, eps=1e-2):
        g = [flatten_dict(jax.tree.map(np.asarray, grad(unflatten_dict(
            {k: (theta[k] + s * eps * delta[k]).astype(np.float32) for k in theta}, sep="/"))), sep="/")
            for s in (1.0, -1.0)]
        dots = [sum(float(np.sum(delta[k] * gi[k].astype(np.float64))) for k in theta) for gi in g]
        return (dots[0] - dots[1]) / (2 * eps), (dots[0] + dots[1]) / 2

    for j, name in enumerate(pair.layer_names):
        delta = {k: (ends[1][k].astype(np.float64) - ends[0][k]) * (layer[k.split("/")[1]] <= j) for k in ends[0]}
        start = {k: v.astype(np.float64) for k, v in ends[0].items()}
        h0, s0 = along(start, delta)
        h1, s1 = along({k: start[k] + delta[k] for k in start}, delta)
        got = ds.sel(mode="cumulative", layer=name)
        np.testing.assert_allclose([float(got["curvature_start"]), float(got["curvature_end"])], [h0, h1],
                                   rtol=5e-3, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(float(got["slope_difference"]), s0 - s1, rtol=5e-3, atol=1e-4, err_msg=name)


def test_llfc_and_calibration_nnx_mlp(digits, tmp_path):
    """LLFC of an NNX MLP against a numpy forward pass; the fitted β against scipy; both files reopen."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    x, y = digits[0].reshape(-1, 64), digits[1]

    def fit(seed: int) -> NnxMlp:
        model = NnxMlp(nnx.Rngs(seed))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        for s in range(15):
            idx = np.arange(s * 32, s * 32 + 32) % len(x)
            opt.update(model, nnx.grad(lambda m, idx=idx: ce(m(x[idx]), y[idx]))(model))
        model.eval()
        return model

    pair = cb.ModelPair(fit(0), fit(1), example_input=x[:8]).align("weight")
    pa, pb = pair.params(0), pair.params(1)

    def forward(lam: float, xs: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        p = {k: (1 - lam) * pa[k].astype(np.float64) + lam * pb[k] for k in pa}
        z = xs @ p["l1.weight"].T + p["l1.bias"]
        return {"l1": z, "relu": np.maximum(z, 0)}, np.maximum(z, 0) @ p["l2.weight"].T + p["l2.bias"]

    ds = cb.llfc(pair, (x[:150], y[:150]), values=[0.3], out=tmp_path / "llfc.nc")
    (fa, _), (fb, _), (fm, _) = (forward(c, x[:150]) for c in (0.0, 1.0, 0.3))
    for p in ("l1", "relu"):
        g = 0.7 * fa[p] + 0.3 * fb[p]
        cos = np.mean(np.sum(fm[p] * g, 1) / np.linalg.norm(fm[p], axis=1) / np.linalg.norm(g, axis=1))
        got = ds.sel(point=p, value=0.3, sample=0)
        np.testing.assert_allclose([float(got["cosine"]), float(got["scale"])],
                                   [cos, np.sum(fm[p] * g) / np.sum(g * g)], rtol=1e-5, err_msg=p)
    assert cb.open_results(tmp_path / "llfc.nc")["cosine"].shape == ds["cosine"].shape

    cal = cb.calibrate(pair, (x[150:], y[150:]), lambdas=[0.5], calibration_data=(x[:150], y[:150]),
                       out=tmp_path / "cal.nc")
    _, z = forward(0.5, x[:150])

    def nll(t: float) -> float:
        return float(np.mean(logsumexp(np.exp(t) * z, 1) - np.exp(t) * z[np.arange(150), y[:150]]))

    beta = np.exp(minimize_scalar(nll, bounds=(np.log(1e-2), np.log(1e2)), method="bounded",
                                  options={"xatol": 1e-9}).x)
    np.testing.assert_allclose(float(cal["inverse_temperature"].sel(alignment="aligned", lam=0.5)), beta, rtol=1e-4)
    assert "inverse_temperature" in cb.open_results(tmp_path / "cal.nc")
