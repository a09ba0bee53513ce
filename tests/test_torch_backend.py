"""The torch backend: arrays, evaluation, activations, checkpoints and training."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from combinability.data.base import ArrayDataset
from combinability.errors import (
    CorruptFileError,
    DatasetError,
    IncompatibleModelsError,
    IncompatibleVersionError,
    LayoutError,
    NonFiniteWeightsError,
    UnknownNameError,
)
from combinability.layout import FlatLayout
from combinability.testing import check_backend, perturbed_state
from combinability.training import RECIPES, TrainRecipe
from combinability.zoo import REFERENCE_ARCHITECTURES
from tests import reference_nets as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional
from combinability_torch.backend import TorchBackend  # noqa: E402
from combinability_torch.checkpoint import FORMAT  # noqa: E402

ARCH = {a.name: a for a in REFERENCE_ARCHITECTURES}


@pytest.fixture(scope="module")
def backend():
    return TorchBackend("cpu")


def random_data(shape, n=23, classes=5, seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n), classes)


def noisy_model(backend, name="mlp", width=1 / 32, shape=(12,), classes=5, seed=0):
    model = backend.build(ARCH[name], width=width, num_classes=classes, input_shape=shape, seed=seed)
    params = perturbed_state(backend.state(model), seed)
    impl = ARCH[name].implementation("torch")
    layers = impl.layers(width=width, num_classes=classes, input_shape=shape)
    return backend.with_state(model, params), params, FlatLayout.from_arrays(params, layers)


# -- plugin and arrays -----------------------------------------------------------------------------
def test_plugin_registers_without_importing_torch():
    code = ("import sys; import combinability_torch.plugin as p; "
            "r = p.combinability_register_backends(); assert set(r) == {'torch'} and r['torch'][1] == 'torch'; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "b = r['torch'][0](); assert b.name == 'torch' and 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ".:backends"}, cwd=_repo_root())
    assert out.returncode == 0, out.stderr


def _repo_root() -> str:
    import combinability

    return str(Path(combinability.__file__).resolve().parents[1])


def test_conformance(backend):
    check_backend(backend)


def test_arrays_and_random(backend):
    import array_api_compat.torch as xp_torch

    assert backend.device() == "cpu"
    assert backend.xp() is xp_torch
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    t = backend.asarray(x)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    back = backend.to_numpy(t)
    assert np.array_equal(back, x)
    back[0, 0] = 99  # a copy, not a view
    assert t[0, 0] == 0
    u = backend.random(3).uniform((4, 5), np.float64)
    assert u.dtype == torch.float64 and u.shape == (4, 5)
    assert torch.equal(backend.random(3).uniform((4, 5), "float64"), u)
    draws = backend.to_numpy(backend.random(0).uniform(20000))
    assert draws.dtype == np.float32 and 0 <= draws.min() and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 12) < 0.005


def test_build_records_config_and_leaves_global_rng(backend):
    before = torch.random.get_rng_state()
    model = backend.build("tiny10", width=0.25, num_classes=3, input_shape=(1, 8, 8), seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert model.combinability_config == {"architecture": "tiny10", "width": 0.25, "num_classes": 3,
                                          "input_shape": (1, 8, 8)}


# -- state -----------------------------------------------------------------------------------------
def test_state_and_with_state(backend):
    model = backend.build(ARCH["resnet20"], width=0.25, num_classes=3, input_shape=(3, 8, 8), seed=0)
    state = backend.state(model)
    assert list(state) == list(model.state_dict())
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    state["stem_conv.weight"][...] = 0  # a copy: the model is unchanged
    assert float(model.stem_conv.weight.detach().abs().sum()) > 0
    new_params = perturbed_state(backend.state(model), 1)
    new = backend.with_state(model, new_params)
    assert new is not model
    got = backend.state(new)
    assert all(np.array_equal(got[k], new_params[k]) for k in new_params)
    assert not np.array_equal(backend.state(model)["head.weight"], new_params["head.weight"])
    bad = dict(new_params)
    del bad["head.bias"]
    with pytest.raises(LayoutError, match="missing.*head.bias"):
        backend.with_state(model, bad)
    bad = {**new_params, "head.bias": np.zeros(7, np.float32)}
    with pytest.raises(LayoutError, match="wrong shapes"):
        backend.with_state(model, bad)


# -- evaluation ------------------------------------------------------------------------------------
def direct(model, params, data):
    """Reference: load params into the model, plain forward pass, F.cross_entropy."""
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(torch.from_numpy(params[k]))
        logits = model(torch.from_numpy(data.x))
        loss = F.cross_entropy(logits, torch.from_numpy(data.y)).item()
    pred = logits.argmax(1).numpy()
    return loss, float(np.mean(pred == data.y)), pred


@pytest.mark.parametrize(("name", "width", "shape"), [("mlp", 1 / 32, (12,)), ("tiny10", 0.25, (2, 6, 6)),
                                                       ("resnet20", 0.25, (2, 6, 6))])
@pytest.mark.parametrize("vectorize", [False, True])
def test_evaluate_matches_direct_forward(backend, name, width, shape, vectorize):
    model, params, layout = noisy_model(backend, name, width, shape)
    other = perturbed_state(params, 7)
    data = random_data(shape, n=23)
    flats = np.stack([layout.flatten(params), layout.flatten(other)])
    evs = backend.evaluate(model, layout, flats, data, batch_size=10, vectorize=vectorize)
    for ev, p in zip(evs, (params, other), strict=True):
        loss, acc, pred = direct(backend.build(ARCH[name], width=width, num_classes=5, input_shape=shape, seed=0),
                                 p, data)
        assert ev.loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert ev.accuracy == acc
        assert ev.predictions.dtype == np.int64 and np.array_equal(ev.predictions, pred)


def test_loop_and_vmap_agree_and_inputs_forms(backend):
    model, params, layout = noisy_model(backend, "tiny10", 0.25, (1, 8, 8))
    data = random_data((1, 8, 8), n=17)
    flats = np.stack([layout.flatten(perturbed_state(params, s)) for s in range(5)])
    loop = backend.evaluate(model, layout, flats, data, batch_size=6, vectorize=False)
    vm = TorchBackend("cpu", vectorize=True, vmap_chunk=2).evaluate(model, layout, flats, data, batch_size=100)
    listed = backend.evaluate(model, layout, [torch.from_numpy(f) for f in flats], data)
    as_tensor = backend.evaluate(model, layout, torch.from_numpy(flats).double(), data)
    for a, b, c, d in zip(loop, vm, listed, as_tensor, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5) == pytest.approx(c.loss, rel=1e-5)
        assert a.loss == pytest.approx(d.loss, rel=1e-5)
        assert np.array_equal(a.predictions, b.predictions) and np.array_equal(a.predictions, c.predictions)


def test_evaluate_rejects_bad_input(backend):
    model, params, layout = noisy_model(backend)
    data = random_data((12,))
    with pytest.raises(LayoutError, match="expects"):
        backend.evaluate(model, layout, np.zeros(layout.size + 1, np.float32), data)
    wrong = FlatLayout.from_arrays({"nope.weight": np.zeros(3, np.float32)})
    with pytest.raises(LayoutError, match="unknown names"):
        backend.evaluate(model, wrong, np.zeros(3, np.float32), data)
    with pytest.raises(DatasetError):
        backend.evaluate(model, layout, layout.flatten(params), ArrayDataset(data.x[:0], data.y[:0], 5))


def test_evaluate_does_not_touch_model_weights(backend):
    model, params, layout = noisy_model(backend)
    before = backend.state(model)
    backend.evaluate(model, layout, np.zeros(layout.size, np.float32), random_data((12,)))
    after = backend.state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# -- activations -----------------------------------------------------------------------------------
def test_conv_activations_are_flattened_positions(backend):
    model, params, _ = noisy_model(backend, "tiny10", 0.25, (2, 6, 6))
    data = random_data((2, 6, 6), n=5)
    acts = backend.activations(model, data, ["act_0", "act_2"], batch_size=2)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    a0 = ref.relu(ref.layer_norm_channels(ref.conv2d(data.x.astype(np.float64), p["conv_0.weight"], p["conv_0.bias"]),
                                          p["norm_0.weight"], p["norm_0.bias"]))
    assert acts["act_0"].shape == (5 * 6 * 6, 4)
    np.testing.assert_allclose(acts["act_0"], a0.transpose(0, 2, 3, 1).reshape(-1, 4), atol=1e-5)
    assert acts["act_2"].shape == (5 * 3 * 3, 8)  # stride 2 at the third conv


def test_unknown_activation_point(backend):
    model, _, _ = noisy_model(backend)
    with pytest.raises(UnknownNameError, match="hidden_0"):
        backend.activations(model, random_data((12,)), ["hidden_9"])


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip(backend, tmp_path):
    model, params, _ = noisy_model(backend, "resnet20", 0.25, (3, 8, 8))
    meta = {"seed": np.int64(3), "dataset": "digits", "accuracy": np.float32(0.5), "shape": (1, 2),
            "curve": np.array([1.0, 2.0]), "nested": {"a": [1, None, True]}}
    path = tmp_path / "sub" / "model.ckpt"
    backend.save(model, path, meta)
    assert [p.name for p in path.parent.iterdir()] == ["model.ckpt"]  # no temporary file left
    loaded, got_meta = backend.load(path)  # architecture resolved by name
    assert got_meta == {"seed": 3, "dataset": "digits", "accuracy": 0.5, "shape": (1, 2), "curve": [1.0, 2.0],
                        "nested": {"a": [1, None, True]}}
    state = backend.state(loaded)
    assert list(state) == list(params) and all(np.array_equal(state[k], params[k]) for k in params)
    assert loaded.combinability_config == model.combinability_config
    loaded2, _ = backend.load(path, ARCH["resnet20"])
    assert np.array_equal(backend.state(loaded2)["head.weight"], params["head.weight"])
    with pytest.raises(IncompatibleModelsError, match="holds a 'resnet20' model"):
        backend.load(path, ARCH["mlp"])


def test_checkpoint_errors(backend, tmp_path):
    model, _, _ = noisy_model(backend)
    good = tmp_path / "good.ckpt"
    backend.save(model, good, {})
    payload = torch.load(good, weights_only=True)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:300])
    for path in (garbage, truncated):
        with pytest.raises(CorruptFileError, match="not a readable combinability checkpoint"):
            backend.load(path)

    other = tmp_path / "other.ckpt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(CorruptFileError, match=FORMAT):
        backend.load(other)

    newer = tmp_path / "newer.ckpt"
    torch.save({**payload, "version": 2}, newer)
    with pytest.raises(IncompatibleVersionError, match="version-2 checkpoint.*reads version 1"):
        backend.load(newer)

    no_state = tmp_path / "no_state.ckpt"
    torch.save({k: v for k, v in payload.items() if k != "state"}, no_state)
    with pytest.raises(CorruptFileError, match="state"):
        backend.load(no_state)

    jax_file = tmp_path / "jax.ckpt"
    torch.save({**payload, "backend": "jax"}, jax_file)
    with pytest.raises(IncompatibleModelsError, match="'jax' backend"):
        backend.load(jax_file)

    with pytest.raises(FileNotFoundError):
        backend.load(tmp_path / "missing.ckpt")
    with pytest.raises(IncompatibleModelsError, match="combinability_config"):
        backend.save(torch.nn.Linear(2, 2), tmp_path / "x.ckpt", {})
    with pytest.raises(TypeError, match=r"metadata\['bad'\]"):
        backend.save(model, tmp_path / "y.ckpt", {"bad": object()})
    assert not (tmp_path / "y.ckpt").exists()


# -- training --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from combinability.data.registry import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_mlp_learns_digits(backend, digits):
    train, test = digits
    model = backend.build("mlp", width=0.25, num_classes=10, input_shape=train.input_shape, seed=0)
    backend.train(model, train, RECIPES["mlp"].with_(epochs=8), seed=0)
    layout = FlatLayout.from_arrays(backend.state(model))
    ev = backend.evaluate(model, layout, layout.flatten(backend.state(model)), test)[0]
    assert ev.accuracy > 0.9


def test_training_is_deterministic_and_seeded(backend, digits):
    train, _ = digits
    recipe = TrainRecipe(epochs=1, lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=64, schedule="warmup_cosine",
                         warmup_epochs=0.5)

    def run(seed):
        model = backend.build("mlp", width=1 / 16, num_classes=10, input_shape=train.input_shape, seed=0)
        return backend.state(backend.train(model, train, recipe, seed=seed, progress=seed == 0))

    a, b, c = run(0), run(0), run(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["layers.0.weight"], c["layers.0.weight"])


def _full_batch_gradient(backend, model, data):
    clone = backend.with_state(model, backend.state(model))
    loss = F.cross_entropy(clone(torch.from_numpy(data.x)), torch.from_numpy(data.y))
    loss.backward()
    return {k: p.grad.numpy().copy() for k, p in clone.named_parameters()}


def test_one_sgd_step_is_gradient_descent_with_weight_decay(backend):
    data = random_data((12,), n=40)
    model, params, _ = noisy_model(backend)
    grad = _full_batch_gradient(backend, model, data)
    recipe = TrainRecipe(epochs=1, lr=0.1, momentum=0.9, weight_decay=0.01, batch_size=40)
    new = backend.state(backend.train(model, data, recipe, seed=0))
    for k in params:  # first momentum step: buffer = gradient
        np.testing.assert_allclose(new[k], params[k] - 0.1 * (grad[k] + 0.01 * params[k]), rtol=1e-5, atol=1e-6)


def test_one_adam_step_moves_by_lr_times_sign(backend):
    data = random_data((12,), n=40)
    model, params, _ = noisy_model(backend)
    grad = _full_batch_gradient(backend, model, data)
    recipe = TrainRecipe(epochs=1, lr=1e-3, optimizer="adam", weight_decay=0.0, batch_size=40)
    new = backend.state(backend.train(model, data, recipe, seed=0))
    for k in params:  # bias-corrected first step: g / (|g| + eps)
        np.testing.assert_allclose(new[k], params[k] - 1e-3 * grad[k] / (np.abs(grad[k]) + 1e-8), atol=1e-6)


def test_learning_rate_comes_from_the_recipe_schedule(backend):
    data = random_data((12,), n=40)
    model, params, _ = noisy_model(backend)
    # one step per epoch; step 0 of the warm-up has learning rate warmup_start = 0
    recipe = TrainRecipe(epochs=1, lr=0.5, weight_decay=0.0, batch_size=40, schedule="warmup_cosine", warmup_start=0.0)
    assert recipe.learning_rate(0, 1) == 0.0
    new = backend.state(backend.train(model, data, recipe, seed=0))
    assert all(np.array_equal(new[k], params[k]) for k in params)


def test_divergence_raises(backend):
    data = random_data((12,), n=40)
    model, _, _ = noisy_model(backend)
    with pytest.raises(NonFiniteWeightsError, match="lower the learning rate"):
        backend.train(model, data, TrainRecipe(epochs=2, lr=1e30, batch_size=10), seed=0)


@pytest.mark.skipif(importlib.util.find_spec("combinability_torch.augment") is None,
                    reason="combinability_torch.augment not written yet")
def test_augmented_training_is_seeded(backend):
    data = random_data((1, 8, 8), n=32, classes=3)
    recipe = TrainRecipe(epochs=1, lr=0.01, batch_size=16, augment=True)

    def run(seed, augment=True):
        model = backend.build("tiny10", width=0.25, num_classes=3, input_shape=(1, 8, 8), seed=0)
        return backend.state(backend.train(model, data, recipe.with_(augment=augment), seed=seed))

    a, b, c, plain = run(0), run(0), run(1), run(0, augment=False)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.weight"], c["head.weight"])
    assert not np.array_equal(a["head.weight"], plain["head.weight"])  # the augmentation changed the batches
