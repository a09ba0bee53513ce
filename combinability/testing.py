"""Conformance checks for plugin authors (and the library's own backend suite).

Run :func:`check_architecture` on a new architecture (its layer table and, if it has one,
its custom builder) and :func:`check_backend` on a new backend, from your own tests::

    from combinability.testing import check_architecture, check_backend

    def test_my_net():
        check_architecture("my_net", "torch", width=0.25, num_classes=10, input_shape=(3, 8, 8))

Both raise :class:`AssertionError` naming the check that failed and return ``None``
otherwise. They import no framework: they talk to the backend only through
:class:`~combinability.backend.Backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.data.base import ArrayDataset
from combinability.evaluation import Evaluator, mean_cross_entropy
from combinability.layout import FlatLayout
from combinability.permutation import apply_permutation, random_permutation

if TYPE_CHECKING:
    from combinability.backend import Backend

__all__ = ["check_architecture", "check_backend", "perturbed_state", "random_inputs"]


def perturbed_state(state: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """``state`` with every float array moved off its initial value (norm scales away from 1).

    Fresh models have all-ones norm scales and zero biases, which hide permutation
    mistakes; this makes every entry distinct.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.floating):
            noise = rng.normal(0, 0.1, v.shape).astype(v.dtype)
            base = v + noise
            if k.endswith("running_var"):
                base = np.abs(base) + 0.5
            out[k] = base.astype(v.dtype)
        else:
            out[k] = v.copy()
    return out


def random_inputs(input_shape: tuple[int, ...], num_classes: int, n: int = 12, seed: int = 0) -> ArrayDataset:
    """``n`` random inputs with random labels, for checks."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, *input_shape)).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, num_classes, n).astype(np.int64), num_classes, name="random")


def _floats(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}


def _assert_close(what: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
        err = np.max(np.abs(got - want)) if got.shape == want.shape else f"shapes {got.shape} vs {want.shape}"
        raise AssertionError(f"{what}: differs (max abs error {err})")


def check_architecture(architecture: str, backend: Backend | str = "torch", *, width: float = 0.25,
                       num_classes: int = 10, input_shape: tuple[int, ...] = (1, 16, 16), seed: int = 0,
                       reference: Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray] | None = None,
                       rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Check an architecture on a backend: state names, spec, and f(π(θ)) = f(θ).

    1. The built model's state has exactly the table's parameter names and shapes, and
       building with one seed is deterministic while another seed differs.
    2. The table's permutation spec validates against the state.
    3. For a random permutation π, the logits of π(θ) equal those of θ, and each
       permutation's feature point is permuted exactly by π.
    4. With ``reference(params, x) -> logits`` (an independent forward pass, e.g. in
       numpy), the backend's logits equal the reference's.
    """
    from combinability.models import build_model
    from combinability.plugins import get_architecture, get_backend

    be = get_backend(backend)
    arch = get_architecture(architecture)
    table = arch.layer_table(width=width, num_classes=num_classes, input_shape=input_shape)
    where = f"{arch.name} on {be.name}"
    kw = dict(backend=be.name, width=width, num_classes=num_classes, input_shape=input_shape)
    model = build_model(arch.name, seed=seed, **kw)
    state = be.state(model)
    expected = table.parameters()
    got = {k: tuple(np.shape(v)) for k, v in state.items()}
    if got != {k: s for k, (s, _) in expected.items()}:
        raise AssertionError(f"{where}: state names/shapes {got} differ from the layer table's {expected}")
    again = be.state(build_model(arch.name, seed=seed, **kw))
    other = be.state(build_model(arch.name, seed=seed + 1, **kw))
    if not all(np.array_equal(state[k], again[k]) for k in state):
        raise AssertionError(f"{where}: building twice with seed {seed} gives different weights")
    if all(np.array_equal(state[k], other[k]) for k in state if np.asarray(state[k]).size > 1):
        raise AssertionError(f"{where}: seeds {seed} and {seed + 1} give the same weights")
    spec = table.spec()
    spec.validate(_floats(state))  # integer counters (BatchNorm num_batches_tracked) are left alone
    state = perturbed_state(state, seed)
    floats = _floats(state)
    layout = FlatLayout.from_arrays(floats)
    model = be.with_state(model, state)
    data = random_inputs(input_shape, num_classes, seed=seed)
    evaluator = Evaluator(be, model, layout, batch_size=5)
    perm = random_permutation(spec, state, seed=seed + 7)
    permuted = apply_permutation(spec, perm, floats)
    logits = be.to_numpy(evaluator.logits([layout.flatten(floats), layout.flatten(permuted)],
                                          be.asarray(data.x)))
    _assert_close(f"{where}: f(π(θ)) vs f(θ)", logits[1], logits[0], rtol, atol)
    if reference is not None:
        want = reference({k: np.asarray(v, np.float64) for k, v in state.items()}, data.x.astype(np.float64))
        _assert_close(f"{where}: logits vs the reference forward pass", logits[0], want, rtol, atol)
    points = table.activation_points()
    feats = evaluator.features(layout.flatten(floats), data, list(points.values()))
    feats_p = evaluator.features(layout.flatten(permuted), data, list(points.values()))
    for p, point in points.items():
        _assert_close(f"{where}: features at {point!r} under permutation {p!r}", feats_p[point],
                      feats[point][:, np.asarray(perm[p])], rtol, atol)


def check_backend(backend: Backend | str, *, architecture: str = "mlp", seed: int = 0) -> None:
    """Check a backend's adapter against plain numpy on an MLP.

    Arrays round-trip; ``forward`` over k vectors equals k single calls and a numpy MLP, and
    so do the loss and predictions of one vector evaluated over several batches;
    ``features`` equal the numpy hidden layers; ``value_and_grad`` equals a central finite
    difference along a random direction; ``with_state``/``state`` round-trip; ``augment``
    with the identity map returns its input.
    """
    from combinability.models import build_model
    from combinability.plugins import get_backend

    be = get_backend(backend)
    xp = be.xp()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    if not np.array_equal(be.to_numpy(be.asarray(a)), a):
        raise AssertionError(f"{be.name}: asarray/to_numpy do not round-trip")
    u = be.to_numpy(be.random(seed).uniform((1000,)))
    if u.shape != (1000,) or not (0 <= u.min() and u.max() < 1) or abs(u.mean() - 0.5) > 0.05:
        raise AssertionError(f"{be.name}: random(seed).uniform is not U[0, 1)")
    model = build_model(architecture, backend=be.name, width=1 / 64, num_classes=4, input_shape=(6,), seed=seed)
    state = perturbed_state(be.state(model), seed)
    model = be.with_state(model, state)
    back = be.state(model)
    if set(back) != set(state) or not all(np.array_equal(back[k], state[k]) for k in state):
        raise AssertionError(f"{be.name}: with_state followed by state does not give the arrays back")
    layout = FlatLayout.from_arrays(_floats(state))
    flat = layout.flatten(_floats(state))
    flat2 = flat * 0.5
    data = random_inputs((6,), 4, n=9, seed=seed)
    evaluator = Evaluator(be, model, layout, batch_size=4, vectors=2)
    x = be.asarray(data.x)
    both = be.to_numpy(evaluator.logits(np.stack([flat, flat2, flat]), x))
    for theta, got in ((flat, both[0]), (flat2, both[1]), (flat, both[2])):
        _assert_close(f"{be.name}: batched forward vs numpy MLP", got, _numpy_mlp(layout.unflatten(theta), data.x),
                      1e-4, 1e-5)
    # one vector over three batches (a sweep's cell; through the backend's ``bind`` when it has one)
    (one,) = evaluator.evaluate(flat2, data)
    z = _numpy_mlp(layout.unflatten(flat2.astype(np.float64)), data.x.astype(np.float64))
    if not np.array_equal(one.predictions, z.argmax(axis=1)):
        raise AssertionError(f"{be.name}: predictions over several batches differ from a numpy MLP's")
    z = z - z.max(axis=1, keepdims=True)
    _assert_close(f"{be.name}: loss over several batches vs numpy MLP", one.loss,
                  float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), data.y])), 1e-4, 1e-6)
    feats = evaluator.features(flat, data, ["hidden_0"])["hidden_0"]
    hidden = np.maximum(data.x @ state["layers.0.weight"].T + state["layers.0.bias"], 0)
    _assert_close(f"{be.name}: features at hidden_0", feats, hidden, 1e-4, 1e-5)
    prepared = evaluator.prepared

    def loss(logits: Any, y: Any) -> Any:
        return mean_cross_entropy(xp, logits, y)

    direction = np.random.default_rng(seed).normal(0, 1, flat.shape)
    direction = (direction / np.linalg.norm(direction)).astype(np.float32)
    value, grad, _ = prepared.value_and_grad(be.asarray(flat), x, be.asarray(data.y), loss)
    eps = 1e-4

    def numpy_loss(theta: np.ndarray) -> float:
        z = _numpy_mlp(layout.unflatten(theta.astype(np.float64)), data.x.astype(np.float64))
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), data.y]))

    fd = (numpy_loss(flat + eps * direction) - numpy_loss(flat - eps * direction)) / (2 * eps)
    _assert_close(f"{be.name}: value_and_grad value", float(be.to_numpy(value)), numpy_loss(flat), 1e-4, 1e-5)
    _assert_close(f"{be.name}: value_and_grad gradient along a direction vs a finite difference",
                  float(be.to_numpy(grad) @ direction), fd, 1e-3, 1e-5)
    images = np.random.default_rng(seed).normal(0, 1, (2, 1, 5, 5)).astype(np.float32)
    identity = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (2, 1, 1))
    _assert_close(f"{be.name}: augment with the identity map", be.to_numpy(
        be.augment(be.asarray(images), be.asarray(identity))), images, 1e-5, 1e-5)


def _numpy_mlp(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    n = len([k for k in params if k.endswith(".weight")])
    h = x.reshape(len(x), -1)
    for i in range(n):
        h = h @ params[f"layers.{i}.weight"].T + params[f"layers.{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0)
    return h
