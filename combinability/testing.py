"""Conformance checks for plugin authors.

Run :func:`check_architecture` on a new architecture and :func:`check_backend` on a
new backend (e.g. from your own test suite)::

    from combinability.testing import check_architecture, check_backend

    def test_my_net():
        check_architecture("my_net", "torch", width=0.25, num_classes=10, input_shape=(3, 8, 8))

Both raise :class:`AssertionError` with a message naming the check that failed and
return ``None`` otherwise. They import no framework themselves: they talk to the
backend only through :class:`~combinability.backend.Backend`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.data.base import ArrayDataset
from combinability.errors import PermutationSpecError
from combinability.layout import FlatLayout
from combinability.permutation import apply_permutation, random_permutation

if TYPE_CHECKING:
    from collections.abc import Mapping

    from combinability.architecture import Architecture
    from combinability.backend import Backend

__all__ = ["check_architecture", "check_backend", "perturbed_state"]


def _resolve(architecture: Architecture | str | None, backend: Backend | str) -> tuple[Any, Backend]:
    from combinability.plugins import get_architecture, get_backend

    be = get_backend(backend) if isinstance(backend, str) else backend
    arch = get_architecture(architecture) if isinstance(architecture, str) else architecture
    return arch, be


def perturbed_state(state: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """``state`` plus Gaussian noise of each array's own scale (0.1 for constant arrays).

    Freshly initialised models have constant arrays (LayerNorm scales of one, zero
    biases) on which a missing permutation goes unnoticed; the checks run on this.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in state.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            out[name] = arr.copy()
            continue
        scale = float(arr.std()) if arr.size > 1 and float(arr.std()) > 0 else 0.1
        out[name] = (arr + rng.normal(0.0, scale, arr.shape)).astype(arr.dtype)
    return out


def _inputs(input_shape: tuple[int, ...], num_classes: int, n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, n).astype(np.int64)
    return ArrayDataset(x, y, num_classes, name="random", split="test")


def _close(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[bool, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    err = float(np.abs(a - b).max(initial=0.0))
    return err <= atol * scale, err


def check_architecture(
    architecture: Architecture | str,
    backend: Backend | str,
    *,
    width: float,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int = 0,
    atol: float = 1e-5,
    n_examples: int = 16,
) -> None:
    """Check one backend's implementation of an architecture.

    Checks that the permutation spec validates against the model's state, that every
    state array has a layer index (``0 .. L-1``, all used, one name per layer), that
    every permutation has an activation point, and that permuting the hidden units
    does not change the function: for a random permutation π (no permutation of more
    than one unit left as the identity) of a randomly perturbed model B, the losses and
    predictions of π(B) and B agree on random inputs, and π(B)'s activation at each
    permutation's point is B's with its units reordered by π.

    Parameters
    ----------
    architecture : Architecture or str
    backend : Backend or str
    width, num_classes, input_shape
        The configuration to check (small widths keep it fast; use at least 2 units
        per permutation or the check is vacuous).
    seed : int
        Seeds the model, the noise, the permutation and the inputs.
    atol : float
        Tolerance on losses and activations, relative to their magnitude (at least 1).
    n_examples : int
        Random inputs used.

    Raises
    ------
    AssertionError
        Naming the check that failed.
    """
    arch, be = _resolve(architecture, backend)
    cfg = {"width": width, "num_classes": int(num_classes), "input_shape": tuple(int(s) for s in input_shape)}
    where = f"{arch.name!r} on backend {be.name!r} ({cfg})"
    impl = arch.implementation(be.name)
    model = be.build(arch, seed=seed, **cfg)
    state = perturbed_state(be.state(model), seed)

    spec = impl.spec(**cfg)
    try:
        spec.validate(state)
    except PermutationSpecError as exc:
        raise AssertionError(f"{where}: the permutation spec does not fit the model's state: {exc}") from exc

    layers = impl.layers(**cfg)
    missing = [n for n in state if n not in layers]
    unknown = [n for n in layers if n not in state]
    if missing or unknown:
        raise AssertionError(f"{where}: layers() must give every state name a layer index; "
                             f"missing {missing}, names not in the state {unknown}")
    names = list(impl.layer_names(**cfg))
    used = sorted({int(v) for v in layers.values()})
    if used != list(range(len(names))):
        raise AssertionError(f"{where}: layer indices {used} must be exactly 0..{len(names) - 1}, one per "
                             f"layer name {names}")

    points = impl.activation_points(**cfg)
    if set(points) != set(spec.perm_names):
        raise AssertionError(f"{where}: activation_points() must name one point per permutation; "
                             f"permutations {list(spec.perm_names)}, points given for {list(points)}")

    perm = random_permutation(spec, state, seed)
    for p, idx in perm.items():
        if len(idx) > 1 and np.array_equal(idx, np.arange(len(idx))):
            perm[p] = np.roll(idx, 1)
    if all(len(idx) < 2 for idx in perm.values()):
        raise AssertionError(f"{where}: every permutation has a single unit; use a larger width")
    permuted = apply_permutation(spec, perm, state)

    data = _inputs(cfg["input_shape"], cfg["num_classes"], n_examples, seed)
    layout = FlatLayout.from_arrays(state, layers)
    ev_b, ev_pb = be.evaluate(model, layout, [layout.flatten(state), layout.flatten(permuted)], data)
    ok, err = _close(ev_b.loss, ev_pb.loss, atol)
    if not ok or not np.array_equal(ev_b.predictions, ev_pb.predictions):
        raise AssertionError(
            f"{where}: permuting the hidden units changed the function: loss {ev_b.loss:.7g} vs {ev_pb.loss:.7g} "
            f"(|diff| {err:.3g}), {int(np.sum(ev_b.predictions != ev_pb.predictions))} of {n_examples} predictions "
            "differ. Is a permutation missing on some axis, or bound to the wrong axis or the wrong permutation?"
        )

    acts_b = be.activations(be.with_state(model, state), data, list(points.values()))
    acts_pb = be.activations(be.with_state(model, permuted), data, list(points.values()))
    for p, point in points.items():
        a, b = np.asarray(acts_b[point]), np.asarray(acts_pb[point])
        if a.ndim != 2 or a.shape[1] != len(perm[p]):
            raise AssertionError(f"{where}: the activations at point {point!r} of permutation {p!r} have shape "
                                 f"{a.shape}; expected (positions, {len(perm[p])})")
        ok, err = _close(b, a[:, np.asarray(perm[p])], atol)
        if not ok:
            raise AssertionError(f"{where}: at point {point!r}, the permuted model's units are not the original "
                                 f"units reordered by permutation {p!r} (max |diff| {err:.3g})")


def _reference_mlp(params: Mapping[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and hidden activations of the reference MLP (torch names, ``(out, in)`` weights), float64."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    n_layers = sum(1 for k in params if k.startswith("layers.") and k.endswith(".weight"))
    hidden = []
    for i in range(n_layers):
        h = h @ np.asarray(params[f"layers.{i}.weight"], np.float64).T + np.asarray(params[f"layers.{i}.bias"])
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
            hidden.append(h)
    return h, hidden


def check_backend(
    backend: Backend | str,
    architecture: Architecture | str = "mlp",
    *,
    width: float = 1 / 64,
    num_classes: int = 3,
    input_shape: tuple[int, ...] = (12,),
    seed: int = 0,
    atol: float = 1e-5,
    n_examples: int = 50,
) -> None:
    """Basic conformance of a backend, on the reference MLP.

    Checks arrays (``asarray``/``to_numpy`` round trip, seeded ``random``), seeded
    ``build``, the ``state``/``with_state`` round trip, that ``evaluate`` agrees with a
    plain numpy forward pass of the MLP (read through ``to_reference``) for one vector,
    a stack of vectors and any batch size, that ``activations`` at the MLP's points are
    its hidden ReLU outputs, and the ``save``/``load`` round trip.

    Parameters
    ----------
    backend : Backend or str
    architecture : Architecture or str
        The reference MLP (``"mlp"``) or an architecture with the same reference names
        (``layers.{i}.weight`` of shape ``(out, in)``, ``layers.{i}.bias``).

    Raises
    ------
    AssertionError
        Naming the check that failed.
    """
    arch, be = _resolve(architecture, backend)
    cfg = {"width": width, "num_classes": int(num_classes), "input_shape": tuple(int(s) for s in input_shape)}
    where = f"backend {be.name!r}"
    impl = arch.implementation(be.name)

    if not isinstance(be.device(), str):
        raise AssertionError(f"{where}: device() must return a str, got {be.device()!r}")
    if not hasattr(be.xp(), "asarray"):
        raise AssertionError(f"{where}: xp() must return an array-API namespace")
    arr = np.random.default_rng(seed).normal(size=(3, 4)).astype(np.float32)
    back = be.to_numpy(be.asarray(arr))
    if not (isinstance(back, np.ndarray) and back.dtype == arr.dtype and np.array_equal(back, arr)):
        raise AssertionError(f"{where}: to_numpy(asarray(x)) must give x back exactly")

    u1 = be.to_numpy(be.random(seed).uniform((200,)))
    u2 = be.to_numpy(be.random(seed).uniform((200,)))
    u3 = be.to_numpy(be.random(seed + 1).uniform((200,)))
    if u1.shape != (200,) or u1.dtype != np.float32 or u1.min() < 0 or u1.max() >= 1:
        raise AssertionError(f"{where}: random(seed).uniform((200,)) must give float32 values in [0, 1)")
    if not np.array_equal(u1, u2) or np.array_equal(u1, u3):
        raise AssertionError(f"{where}: random(seed) must repeat for the same seed and differ for another")

    model = be.build(arch, seed=seed, **cfg)
    state = be.state(model)
    again = be.state(be.build(arch, seed=seed, **cfg))
    other = be.state(be.build(arch, seed=seed + 1, **cfg))
    if list(state) != list(again) or not all(np.array_equal(state[k], again[k]) for k in state):
        raise AssertionError(f"{where}: build() with the same seed must give the same state, in the same order")
    if all(np.array_equal(state[k], other[k]) for k in state):
        raise AssertionError(f"{where}: build() with different seeds gave identical models")

    noisy = perturbed_state(state, seed)
    model_b = be.with_state(model, noisy)
    round_trip = be.state(model_b)
    if list(round_trip) != list(state) or not all(np.array_equal(round_trip[k], noisy[k]) for k in noisy):
        raise AssertionError(f"{where}: state(with_state(model, params)) must return params exactly")

    data = _inputs(cfg["input_shape"], cfg["num_classes"], n_examples, seed)
    ref = impl.to_reference(noisy)
    logits, hidden = _reference_mlp(ref, data.x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ref_loss = float(-log_p[np.arange(len(data)), data.y].mean())
    ref_pred = logits.argmax(axis=1)

    layout = FlatLayout.from_arrays(noisy, impl.layers(**cfg))
    flat = layout.flatten(noisy)
    flat2 = layout.flatten(perturbed_state(noisy, seed + 1))
    single = be.evaluate(model, layout, flat, data, batch_size=7)
    if len(single) != 1:
        raise AssertionError(f"{where}: evaluate() of one (d,) vector must return one Evaluation")
    ev = single[0]
    ok, err = _close(ref_loss, ev.loss, atol)
    n_wrong = int(np.sum(np.asarray(ev.predictions) != ref_pred))
    if not ok or n_wrong:
        raise AssertionError(f"{where}: evaluate() disagrees with a numpy forward pass: loss {ev.loss:.7g} vs "
                             f"{ref_loss:.7g}; {n_wrong} predictions differ")
    if abs(ev.accuracy - float(np.mean(ref_pred == data.y))) > 1e-12:
        raise AssertionError(f"{where}: evaluate()'s accuracy {ev.accuracy} is not the fraction of correct predictions")
    stacked = be.evaluate(model, layout, np.stack([flat, flat2]), data, batch_size=n_examples)
    listed = be.evaluate(model, layout, [flat2, flat], data, batch_size=1000)
    if len(stacked) != 2 or len(listed) != 2:
        raise AssertionError(f"{where}: evaluate() must return one Evaluation per vector")
    for a, b in ((stacked[0], ev), (stacked[1], listed[0]), (listed[1], ev)):
        ok, err = _close(a.loss, b.loss, atol)
        if not ok or not np.array_equal(a.predictions, b.predictions):
            raise AssertionError(f"{where}: evaluate() depends on the batch size or on how vectors are passed "
                                 f"(loss {a.loss:.7g} vs {b.loss:.7g})")

    points = impl.activation_points(**cfg)
    acts = be.activations(model_b, data, list(points.values()), batch_size=7)
    for i, h in enumerate(hidden):
        point = points.get(f"P{i}")
        if point is None:
            continue
        ok, err = _close(h, acts[point], atol)
        if not ok:
            raise AssertionError(f"{where}: activations at {point!r} are not the MLP's hidden layer {i} "
                                 f"(max |diff| {err:.3g})")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.ckpt"
        metadata = {"seed": seed, "note": "conformance"}
        be.save(model_b, path, metadata)
        loaded, meta = be.load(path, arch)
        got = be.state(loaded)
        if list(got) != list(noisy) or not all(np.array_equal(got[k], noisy[k]) for k in noisy):
            raise AssertionError(f"{where}: load(save(model)) must give back the same state exactly")
        if dict(meta) != metadata:
            raise AssertionError(f"{where}: load(save(model, metadata)) returned metadata {meta!r}, not {metadata!r}")
