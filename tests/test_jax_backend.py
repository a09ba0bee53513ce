"""The JAX/Flax backend and its reference architectures.

References: plain numpy forward passes (float64) of every architecture, read through
``to_reference``; ``optax.softmax_cross_entropy_with_integer_labels`` on a direct flax
forward; closed-form SGD weight decay; the conformance checks of
:mod:`combinability.testing` (random permutations must not change the function).

Compilation dominates the run time: every test reuses one backend (its compiled
functions are cached) and the shapes of :data:`CONFIGS`.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

from combinability_jax import architectures as jarch  # noqa: E402
from combinability_jax.backend import JaxBackend  # noqa: E402
from combinability_jax.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from combinability_jax.models import FlaxModel  # noqa: E402

from combinability.architecture import Architecture  # noqa: E402
from combinability.data.base import ArrayDataset  # noqa: E402
from combinability.errors import (  # noqa: E402
    CorruptFileError,
    DatasetError,
    IncompatibleModelsError,
    IncompatibleVersionError,
    LayoutError,
    NonFiniteWeightsError,
    UnknownNameError,
)
from combinability.layout import FlatLayout  # noqa: E402
from combinability.testing import check_architecture, check_backend, perturbed_state  # noqa: E402
from combinability.training import RECIPES, TrainRecipe  # noqa: E402
from combinability.zoo import REFERENCE_ARCHITECTURES  # noqa: E402
from tests import reference_nets as ref  # noqa: E402

ARCH = {a.name: a for a in REFERENCE_ARCHITECTURES}
#: Small configurations shared by all tests (same shapes: compiled once).
CONFIGS = {
    "mlp": {"width": 1 / 32, "num_classes": 10, "input_shape": (64,)},
    "tiny10": {"width": 0.25, "num_classes": 10, "input_shape": (1, 8, 8)},
    "resnet20": {"width": 0.25, "num_classes": 10, "input_shape": (1, 8, 8)},
    "vgg16": {"width": 0.125, "num_classes": 10, "input_shape": (1, 8, 8)},
}
N_EXAMPLES = 16  # as check_architecture's default


@pytest.fixture(scope="module")
def backend() -> JaxBackend:
    return JaxBackend()


def random_data(input_shape, n=N_EXAMPLES, seed=0, classes=10) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, *input_shape)).astype(np.float32),
                        rng.integers(0, classes, n).astype(np.int64), classes)


# -- plain numpy forward passes in the reference (torch) convention, float64 ------------------------
def _ln(p, h, name):
    return ref.layer_norm_channels(h, p[f"{name}.weight"], p[f"{name}.bias"])


def _to_points(h: np.ndarray) -> np.ndarray:
    """NCHW activations as (positions, channels), positions in (n, h, w) order."""
    return h.transpose(0, 2, 3, 1).reshape(-1, h.shape[1])


def np_mlp(p, x):
    h, acts = x.reshape(len(x), -1), {}
    for i in range(4):
        h = h @ p[f"layers.{i}.weight"].T + p[f"layers.{i}.bias"]
        if i < 3:
            h = acts[f"hidden_{i}"] = ref.relu(h)
    return h, acts


def np_tiny10(p, x):
    h, acts = x, {}
    for i, stride in enumerate((1, 1, 2, 1, 1, 2, 1, 1)):
        pad = 0 if i == 7 else 1
        h = ref.relu(_ln(p, ref.conv2d(h, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"], stride, pad), f"norm_{i}"))
        acts[f"act_{i}"] = _to_points(h)
    return h.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"], acts


def np_resnet20(p, x):
    h = ref.relu(_ln(p, ref.conv2d(x, p["stem_conv.weight"], None, 1, 1), "stem_norm"))
    acts = {}
    for s in range(3):
        for b in range(3):
            blk, stride = f"stage{s}_block{b}", (2 if s > 0 and b == 0 else 1)
            z = ref.relu(_ln(p, ref.conv2d(h, p[f"{blk}.conv1.weight"], None, stride, 1), f"{blk}.norm1"))
            acts[f"{blk}/inner"] = _to_points(z)
            z = _ln(p, ref.conv2d(z, p[f"{blk}.conv2.weight"], None, 1, 1), f"{blk}.norm2")
            if f"{blk}.shortcut_conv.weight" in p:
                h = _ln(p, ref.conv2d(h, p[f"{blk}.shortcut_conv.weight"], None, stride, 0), f"{blk}.shortcut_norm")
            h = ref.relu(z + h)
            acts[f"{blk}/out"] = _to_points(h)
    return h.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"], acts


def np_vgg16(p, x):
    h, acts, i = x, {}, 0
    for c in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if c == "M":
            n, ch, hh, ww = h.shape
            if min(hh, ww) >= 2:
                h = h[:, :, : hh // 2 * 2, : ww // 2 * 2].reshape(n, ch, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
            continue
        h = ref.relu(_ln(p, ref.conv2d(h, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"], 1, 1), f"norm_{i}"))
        acts[f"act_{i}"] = _to_points(h)
        i += 1
    return h.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"], acts


NUMPY_FORWARD = {"mlp": np_mlp, "tiny10": np_tiny10, "resnet20": np_resnet20, "vgg16": np_vgg16}


def mean_ce(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


# -- plugin and conformance ---------------------------------------------------------------------
def test_plugin_registers_without_importing_jax():
    code = (
        "import sys; import combinability_jax.plugin as p; r = p.combinability_register_backends();"
        "assert set(r) == {'jax'} and r['jax'][1] == 'jax', r;"
        "assert not {'jax', 'flax', 'optax'} & set(sys.modules), sorted(m for m in sys.modules if 'jax' in m);"
        "b = r['jax'][0](); assert type(b).__name__ == 'JaxBackend' and b.name == 'jax'; print('ok')"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": f"{root}:{root / 'backends'}", "PATH": "/usr/bin:/bin",
                              "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_backend_conformance(backend):
    check_backend(backend)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_permuting_hidden_units_keeps_the_function(backend, name):
    check_architecture(ARCH[name], backend, **CONFIGS[name], n_examples=N_EXAMPLES)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_activations_match_numpy(backend, name):
    cfg = CONFIGS[name]
    impl = ARCH[name].implementation("jax")
    model = backend.build(ARCH[name], seed=3, **cfg)
    state = perturbed_state(backend.state(model), seed=3)
    data = random_data(cfg["input_shape"], seed=1)
    reference = {k: v.astype(np.float64) for k, v in impl.to_reference(state).items()}
    logits, acts = NUMPY_FORWARD[name](reference, data.x.astype(np.float64))

    layout = FlatLayout.from_arrays(state, impl.layers(**cfg))
    flat = layout.flatten(state)
    ev, _ = backend.evaluate(model, layout, [flat, flat], data)  # k = 2 like check_architecture: no recompile
    assert ev.loss == pytest.approx(mean_ce(logits, data.y), rel=1e-5, abs=1e-6)
    np.testing.assert_array_equal(ev.predictions, logits.argmax(axis=1))
    assert ev.accuracy == pytest.approx(np.mean(logits.argmax(axis=1) == data.y))

    points = list(impl.activation_points(**cfg).values())
    got = backend.activations(backend.with_state(model, state), data, points)
    for point in points:
        scale = max(1.0, np.abs(acts[point]).max())
        np.testing.assert_allclose(got[point], acts[point], atol=2e-5 * scale, err_msg=point)


def test_mlp_logits_are_a_numpy_forward_pass_of_the_flax_params(backend):
    """The flax names and axes directly: kernel (in, out), images flattened channels-first."""
    impl = jarch.MLP
    for shape in [(64,), (2, 4, 4)]:
        model = backend.build(ARCH["mlp"], width=1 / 32, num_classes=10, input_shape=shape, seed=0)
        params = perturbed_state(backend.state(model), 1)
        x = random_data(shape, seed=2).x
        h = x.reshape(len(x), -1).astype(np.float64)  # (c, h, w) order, as torch's Flatten
        for i in range(4):
            h = h @ params[f"layers_{i}/kernel"] + params[f"layers_{i}/bias"]
            h = np.maximum(h, 0) if i < 3 else h
        got = backend.logits(backend.with_state(model, params), x)
        np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)
        assert impl.to_reference(params)["layers.0.weight"].shape == (16, int(np.prod(shape)))


# -- architecture descriptions (no compilation) -------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_order_names_and_reference_round_trip(backend, name):
    cfg = CONFIGS[name]
    impl = ARCH[name].implementation("jax")
    model = backend.build(ARCH[name], seed=0, **cfg)
    state = backend.state(model)
    assert isinstance(model, FlaxModel) and model.combinability_config == {
        "architecture": name, "width": cfg["width"], "num_classes": 10, "input_shape": list(cfg["input_shape"])}
    assert list(state) == list(impl.layers(**cfg))  # forward order, kernel/scale before bias
    assert all("/" in k and k.rsplit("/", 1)[1] in ("kernel", "bias", "scale") for k in state)
    impl.spec(**cfg).validate(state)
    reference = impl.to_reference(state)
    back = impl.from_reference(reference)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)
    for e in impl.table():  # axes: dense (in, out) -> (out, in); conv (kh, kw, in, out) -> (out, in, kh, kw)
        first = "scale" if e.kind == "norm" else "kernel"
        w, w_ref = state[f"{e.flax}/{first}"], reference[f"{e.torch}.weight"]
        if e.kind == "dense":
            np.testing.assert_array_equal(w_ref, w.T)
        elif e.kind == "conv":
            np.testing.assert_array_equal(w_ref, w.transpose(3, 2, 0, 1))
        else:
            np.testing.assert_array_equal(w_ref, w)
    with pytest.raises(IncompatibleModelsError, match="missing"):
        impl.from_reference({k: v for k, v in list(reference.items())[1:]})
    with pytest.raises(IncompatibleModelsError, match="unexpected"):
        impl.to_reference({**state, "extra/kernel": np.zeros(2)})


def test_build_is_seeded_and_validates_its_configuration(backend):
    a = backend.state(backend.build("tiny10", seed=5, **CONFIGS["tiny10"]))
    b = backend.state(backend.build("tiny10", seed=5, **CONFIGS["tiny10"]))
    c = backend.state(backend.build("tiny10", seed=6, **CONFIGS["tiny10"]))
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["conv_0/kernel"], c["conv_0/kernel"])
    kernel = a["conv_3/kernel"]  # LeCun normal: std 1/sqrt(fan_in), truncated at 2 std
    fan_in = np.prod(kernel.shape[:-1])
    assert np.abs(kernel).max() <= 2 / np.sqrt(fan_in) / 0.8796 + 1e-6
    assert np.all(a["norm_3/scale"] == 1) and np.all(a["norm_3/bias"] == 0)
    with pytest.raises(IncompatibleModelsError, match="takes images"):
        backend.build("tiny10", width=1, num_classes=10, input_shape=(64,), seed=0)
    with pytest.raises(IncompatibleModelsError, match="num_classes"):
        backend.build("mlp", width=1, num_classes=0, input_shape=(64,), seed=0)


# -- evaluate, activations, state -----------------------------------------------------------------------
def test_evaluate_equals_direct_forward_and_optax_loss(backend):
    cfg = CONFIGS["mlp"]
    model = backend.build(ARCH["mlp"], seed=0, **cfg)
    layout = FlatLayout.from_arrays(backend.state(model))
    flats = np.stack([layout.flatten(perturbed_state(backend.state(model), s)) for s in range(3)])
    data = random_data(cfg["input_shape"], n=23, seed=4)
    expected = []
    apply = jax.jit(model.module.apply)
    for flat in flats:
        variables = {"params": __import__("flax").traverse_util.unflatten_dict(
            {k: jax.numpy.asarray(v) for k, v in layout.unflatten(flat).items()}, sep="/")}
        logits = apply(variables, jax.numpy.asarray(data.x))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jax.numpy.asarray(data.y)).mean()
        expected.append((float(loss), np.asarray(jax.numpy.argmax(logits, -1))))
    for got in (backend.evaluate(model, layout, backend.asarray(flats), data, batch_size=10),
                JaxBackend(vectors_per_call=2).evaluate(model, layout, list(flats), data, batch_size=23)):
        assert len(got) == 3
        for ev, (loss, pred) in zip(got, expected, strict=True):
            assert ev.loss == pytest.approx(loss, rel=1e-5)
            np.testing.assert_array_equal(ev.predictions, pred)
            assert ev.predictions.dtype == np.int64
            assert ev.accuracy == pytest.approx(np.mean(pred == data.y))


def test_evaluate_and_friends_reject_bad_input(backend):
    cfg = CONFIGS["mlp"]
    model = backend.build(ARCH["mlp"], seed=0, **cfg)
    state = backend.state(model)
    layout = FlatLayout.from_arrays(state)
    data = random_data(cfg["input_shape"])
    with pytest.raises(LayoutError, match="layout expects"):
        backend.evaluate(model, layout, np.zeros(layout.size + 1, np.float32), data)
    other = backend.state(backend.build(ARCH["mlp"], width=1 / 16, num_classes=10, input_shape=(64,), seed=0))
    with pytest.raises(LayoutError, match="shape"):
        backend.evaluate(model, FlatLayout.from_arrays(other), FlatLayout.from_arrays(other).flatten(other), data)
    with pytest.raises(IncompatibleModelsError, match="inputs of shape"):
        backend.evaluate(model, layout, layout.flatten(state), random_data((1, 8, 8)))
    with pytest.raises(DatasetError, match="empty"):
        backend.evaluate(model, layout, layout.flatten(state), ArrayDataset(data.x[:0], data.y[:0], 10))
    with pytest.raises(IncompatibleModelsError, match="FlaxModel"):
        backend.state(object())
    with pytest.raises(LayoutError, match="missing"):
        backend.with_state(model, {k: v for k, v in state.items() if k != "layers_0/bias"})
    with pytest.raises(LayoutError, match="shape"):
        backend.with_state(model, {**state, "layers_0/bias": np.zeros(3, np.float32)})
    with pytest.raises(UnknownNameError, match="hidden_0"):
        backend.activations(model, data, ["no_such_point"])


def test_with_state_keeps_dtype_and_order(backend):
    model = backend.build(ARCH["mlp"], seed=0, **CONFIGS["mlp"])
    state = {k: v.astype(np.float64) + 1 for k, v in reversed(backend.state(model).items())}
    got = backend.state(backend.with_state(model, state))
    assert list(got) == list(backend.state(model))
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], state[k].astype(np.float32)) for k in got)


def test_random_source_and_namespace(backend):
    import array_api_compat

    rng = backend.random(7)
    a, b = rng.uniform(1000), rng.uniform((10, 3), dtype="float32")
    assert a.shape == (1000,) and b.shape == (10, 3) and a.dtype == b.dtype == np.float32
    assert array_api_compat.array_namespace(a) is backend.xp()
    again = backend.random(7)
    np.testing.assert_array_equal(backend.to_numpy(again.uniform(1000)), backend.to_numpy(a))
    assert not np.array_equal(backend.to_numpy(again.uniform(1000)), backend.to_numpy(a))  # the key moves on
    mean = float(backend.to_numpy(a).mean())
    assert abs(mean - 0.5) < 4 * np.sqrt(1 / 12 / 1000)
    assert backend.device().startswith(("cpu", "gpu", "cuda", "tpu"))
    assert set(backend.versions()) >= {"jax", "flax", "optax"}


# -- checkpoints -----------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_by_name_and_atomic(backend, tmp_path):
    model = backend.build(ARCH["tiny10"], seed=0, **CONFIGS["tiny10"])
    state = perturbed_state(backend.state(model), 0)
    model = backend.with_state(model, state)
    path = tmp_path / "m.npz"
    path.write_bytes(b"old content")
    backend.save(model, path, {"seed": np.int64(3), "epochs": [1, 2], "note": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # replaced, no temporary left
    loaded, meta = backend.load(path)  # architecture resolved by the recorded name
    assert meta == {"seed": 3, "epochs": [1, 2], "note": "x"}
    assert loaded.config == model.config
    got = backend.state(loaded)
    assert list(got) == list(state) and all(np.array_equal(got[k], state[k]) for k in state)
    header, _ = read_checkpoint(path)
    assert header["format"] == "combinability-checkpoint" and header["version"] == 1 and header["backend"] == "jax"
    assert header["architecture"] == "tiny10"
    with pytest.raises(IncompatibleModelsError, match="tiny10"):
        backend.load(path, ARCH["mlp"])
    with pytest.raises(TypeError, match="checkpoint metadata may hold only"):
        backend.save(model, tmp_path / "bad.npz", {"f": object()})
    assert not (tmp_path / "bad.npz").exists() and len(list(tmp_path.iterdir())) == 1


def test_corrupt_or_foreign_checkpoints_raise(backend, tmp_path):
    model = backend.build(ARCH["mlp"], seed=0, **CONFIGS["mlp"])
    good = tmp_path / "good.npz"
    backend.save(model, good, {})
    arrays = backend.state(model)
    base = {"backend": "jax", "architecture": "mlp", "config": dict(model.config), "metadata": {}}

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.zeros(3))
    for path in (garbage, truncated, plain):
        with pytest.raises(CorruptFileError):
            backend.load(path)

    cases = {
        "version.npz": ({**base, "version": 2}, arrays, IncompatibleVersionError, "version 2"),
        "format.npz": ({**base, "format": "something-else"}, arrays, CorruptFileError, "not a combinability"),
        "torch.npz": ({**base, "backend": "torch"}, arrays, IncompatibleModelsError, "torch"),
        "shapes.npz": (base, {**arrays, "layers_0/bias": np.zeros(5, np.float32)}, CorruptFileError, "do not fit"),
        "config.npz": ({**base, "config": {"width": 1}}, arrays, CorruptFileError, "config"),
    }
    for name, (header, payload, error, match) in cases.items():
        write_checkpoint(tmp_path / name, header, payload)
        with pytest.raises(error, match=match):
            backend.load(tmp_path / name, ARCH["mlp"])
    with zipfile.ZipFile(tmp_path / "format.npz") as z:  # the header really is JSON inside the archive
        assert "__header__.npy" in z.namelist()
    with pytest.raises(FileNotFoundError):
        backend.load(tmp_path / "missing.npz")


# -- training -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(y))
    train, test = idx[:1400], idx[1400:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    return (ArrayDataset((x[train] - mean) / std, y[train], 10, "digits", "train"),
            ArrayDataset((x[test] - mean) / std, y[test], 10, "digits", "test"))


def test_mlp_learns_digits_reproducibly(backend, digits):
    train, test = digits
    recipe = RECIPES["mlp"]  # Adam, 5 epochs
    start = backend.build(ARCH["mlp"], width=0.25, num_classes=10, input_shape=(64,), seed=0)
    a = backend.train(start, train, recipe, seed=0)
    b = backend.train(start, train, recipe, seed=0)
    c = backend.train(start, train, recipe, seed=1)
    sa, sb, sc = backend.state(a), backend.state(b), backend.state(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)  # CPU: bitwise reproducible
    assert not np.array_equal(sa["layers_0/kernel"], sc["layers_0/kernel"])  # another batch order
    layout = FlatLayout.from_arrays(sa)
    ev_start, ev_a = backend.evaluate(a, layout, [layout.flatten(backend.state(start)), layout.flatten(sa)], test)
    assert ev_a.accuracy > 0.9 > ev_start.accuracy + 0.3


def test_sgd_follows_the_recipes_rates_momentum_and_weight_decay(backend):
    """Dead ReLU units get no data gradient: their weights only decay, as torch's SGD would do it."""
    cfg = CONFIGS["mlp"]
    model = backend.build(ARCH["mlp"], seed=0, **cfg)
    state = backend.state(model)
    for i in range(3):
        state[f"layers_{i}/bias"] = np.full_like(state[f"layers_{i}/bias"], -50.0)  # every hidden unit dead
    model = backend.with_state(model, state)
    data = random_data(cfg["input_shape"], n=24, seed=5)
    recipe = TrainRecipe(epochs=3, lr=0.5, momentum=0.9, weight_decay=0.05, batch_size=10, schedule="step")
    trained = backend.state(backend.train(model, data, recipe, seed=0))

    steps_per_epoch = 3  # ceil(24 / 10)
    factor, buf = 1.0, 0.0
    for t in range(recipe.epochs * steps_per_epoch):
        buf = recipe.momentum * buf + recipe.weight_decay * factor  # gradient = weight decay only
        factor -= recipe.learning_rate(t, steps_per_epoch) * buf
    assert abs(factor - 1.0) > 0.1 and recipe.learning_rate(8, 3) < recipe.lr
    for name in ("layers_0/kernel", "layers_1/kernel", "layers_1/bias", "layers_2/bias"):
        np.testing.assert_allclose(trained[name], state[name] * factor, rtol=1e-5, atol=1e-7, err_msg=name)
    assert not np.allclose(trained["layers_3/bias"], state["layers_3/bias"] * factor)  # the head did learn

    frozen = backend.state(backend.train(model, data, recipe.with_(lr=0.0), seed=0))
    assert all(np.array_equal(frozen[k], state[k]) for k in state)


def test_training_with_augmentation_is_seeded(backend):
    pytest.importorskip("combinability_jax.augment")
    shape = (1, 8, 8)
    data = random_data(shape, n=24, seed=6)
    model = backend.build(ARCH["mlp"], width=1 / 32, num_classes=10, input_shape=shape, seed=0)
    recipe = TrainRecipe(epochs=2, lr=0.01, batch_size=12, optimizer="adam", augment=True)
    a = backend.state(backend.train(model, data, recipe, seed=0))
    b = backend.state(backend.train(model, data, recipe, seed=0))
    plain = backend.state(backend.train(model, data, recipe.with_(augment=False), seed=0))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["layers_0/kernel"], plain["layers_0/kernel"])  # the images were augmented


def test_diverging_training_raises(backend):
    model = backend.build(ARCH["mlp"], seed=0, **CONFIGS["mlp"])
    data = random_data(CONFIGS["mlp"]["input_shape"], n=24, seed=5)
    recipe = TrainRecipe(epochs=2, lr=1e30, momentum=0.9, weight_decay=0.05, batch_size=10)  # compiled above
    with pytest.raises(NonFiniteWeightsError, match="diverged"):
        backend.train(model, data, recipe, seed=0)


def test_build_accepts_a_name_or_an_architecture(backend):
    custom = Architecture("my_mlp", {"jax": "combinability_jax.architectures:MLP"})
    model = backend.build(custom, seed=0, **CONFIGS["mlp"])
    assert model.config["architecture"] == "my_mlp"
    with pytest.raises(UnknownNameError, match="jax"):
        backend.build(Architecture("torch_only", {"torch": "x:y"}), seed=0, **CONFIGS["mlp"])
