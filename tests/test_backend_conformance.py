"""One conformance suite for every installed backend and every reference architecture.

Each architecture's layer table, built by each backend's generic builder, must compute
the same logits as an independent numpy forward pass (``tests/reference_nets.py``), be
invariant under random permutations of its spec, and permute its feature points
exactly; each backend's adapter must pass :func:`combinability.testing.check_backend`
(batched forward, features, value_and_grad against finite differences, augment).
"""

from __future__ import annotations

import numpy as np
import pytest

from combinability.layout import FlatLayout
from combinability.models import build_model
from combinability.plugins import get_backend
from combinability.testing import check_architecture, check_backend, perturbed_state, random_inputs
from tests.reference_nets import zoo_forward


def _available(name: str) -> bool:
    try:
        get_backend(name)
        import importlib

        importlib.import_module(f"combinability_{name}.backend")
        return True
    except Exception:
        return False


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"{b} not installed"))
            for b in ("torch", "jax")]
CASES = {"mlp": (1, 8, 8), "tiny10": (1, 12, 12), "vgg16": (3, 8, 8), "resnet20": (3, 10, 10),
         "resnet20_bn": (3, 10, 10), "vgg11_bn": (3, 8, 8)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_adapter(backend):
    check_backend(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", list(CASES))
def test_architecture_matches_numpy_and_permutations(backend, architecture):
    check_architecture(architecture, backend, width=0.25, num_classes=5, input_shape=CASES[architecture],
                       reference=lambda params, x: zoo_forward(architecture, params, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_state_same_logits_in_every_backend(backend):
    """A state of the reference convention gives one function in every backend (names and axes agree)."""
    shape = (3, 10, 10)
    torch_model = build_model("resnet20", backend="torch", width=0.25, num_classes=5, input_shape=shape, seed=3)
    state = perturbed_state(get_backend("torch").state(torch_model), 1)
    be = get_backend(backend)
    model = be.with_state(build_model("resnet20", backend=backend, width=0.25, num_classes=5, input_shape=shape),
                          state)
    back = be.state(model)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    from combinability.evaluation import Evaluator

    floats = {k: v for k, v in state.items() if v.dtype.kind == "f"}
    layout = FlatLayout.from_arrays(floats)
    data = random_inputs(shape, 5, n=6)
    (ev,) = Evaluator(be, model, layout).evaluate(layout.flatten(floats), data)
    logits = zoo_forward("resnet20", {k: v.astype(np.float64) for k, v in state.items()}, data.x.astype(np.float64))
    z = logits - logits.max(axis=1, keepdims=True)
    want = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(6), data.y])
    assert ev.loss == pytest.approx(want, rel=1e-4)
    assert np.array_equal(ev.predictions, logits.argmax(axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_of_a_backend_is_the_definition(backend):
    """A backend's (possibly fused) cross-entropy against logsumexp(z) - z_y in float64 numpy."""
    from combinability.plugins import get_backend

    be = get_backend(backend)
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(3, 40, 10)) * 20).astype(np.float32)  # large logits: a naive exp would overflow
    y = rng.integers(0, 10, 40)
    z64 = z.astype(np.float64)
    top = z64.max(-1, keepdims=True)
    want = np.log(np.exp(z64 - top).sum(-1)) + top[..., 0] - np.take_along_axis(z64, y[None, :, None], -1)[..., 0]
    got = be.to_numpy(be.cross_entropy(be.asarray(z), be.asarray(y)))
    assert got.shape == (3, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_torch_taps_keep_pre_activation_values_under_inference_mode():
    """In inference mode a ReLU may overwrite its input in place; never a tapped one, and never
    one another node reads later (a residual branch): logits and taps as without inference mode."""
    torch = pytest.importorskip("torch")
    model = build_model("resnet20", backend="torch", width=0.25, num_classes=5, input_shape=(3, 10, 10), seed=2)
    model.eval()
    x = torch.from_numpy(random_inputs((3, 10, 10), 5, n=4).x)
    convs = [n.name for n in model.table.nodes if n.op in ("conv", "norm")]
    with torch.no_grad():  # autograd off but not inference mode: every ReLU makes a new tensor
        want_taps = dict.fromkeys(convs)
        want = model(x, taps=want_taps)
    with torch.inference_mode():
        got_taps = dict.fromkeys(convs)
        got = model(x, taps=got_taps)
        plain = model(x)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(plain.numpy(), want.numpy())
    for name in convs:
        np.testing.assert_array_equal(got_taps[name].numpy(), want_taps[name].numpy(), err_msg=name)
    assert (want_taps[convs[0]] < 0).any()  # a pre-activation value a ReLU would have changed


def test_torch_relu_never_overwrites_a_value_read_later():
    """A pre-activation that a later node also reads (a skip from before the ReLU) stays as it was."""
    torch = pytest.importorskip("torch")
    from combinability_torch.models import TableNet

    from combinability.layers import LayerTable, Node

    table = LayerTable("skip", (5,), 2, (
        Node("l0", "dense", units=4), Node("a0", "relu"), Node("l1", "dense", units=4),
        Node("s", "add", inputs=("l1", "l0")), Node("l2", "dense", units=2)))
    torch.manual_seed(0)
    model = TableNet(table).eval()
    x = torch.randn(6, 5)
    with torch.no_grad():
        want = model(x)
        w = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    h0 = x.numpy() @ w["l0.weight"].T + w["l0.bias"]
    h1 = np.maximum(h0, 0) @ w["l1.weight"].T + w["l1.bias"]
    numpy_logits = (h1 + h0) @ w["l2.weight"].T + w["l2.bias"]
    assert (h0 < 0).any()
    with torch.inference_mode():
        got = model(x)
    np.testing.assert_allclose(want.numpy(), numpy_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_torch_vectorized_forward_conforms():
    """The vmap path (several vectors per forward call, CUDA's default) against numpy, on the CPU."""
    pytest.importorskip("torch")
    from combinability_torch.backend import TorchBackend

    check_backend(TorchBackend("cpu", vectorize=True))


def test_torch_vmaps_small_models_only_on_cuda():
    """``vectorize=None``: vmap on CUDA below ``VMAP_MAX_PARAMETERS`` parameters, else a loop; an
    explicit ``vectorize`` wins (decided from the device's type: no GPU needed)."""
    pytest.importorskip("torch")
    from combinability_torch.backend import TorchBackend

    from combinability.backend import VMAP_MAX_PARAMETERS

    gpu = TorchBackend("cuda")
    assert gpu.use_vmap(VMAP_MAX_PARAMETERS - 1) and not gpu.use_vmap(VMAP_MAX_PARAMETERS)
    assert not TorchBackend("cpu").use_vmap(10)
    assert TorchBackend("cpu", vectorize=True).use_vmap(VMAP_MAX_PARAMETERS * 4)
    assert not TorchBackend("cuda", vectorize=False).use_vmap(10)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_jax_forward_conforms_vmapped_and_looped(vectorize):
    """Both ways of running several vectors per call (jax.vmap, a loop) against numpy."""
    pytest.importorskip("jax")
    from combinability_jax.backend import JaxBackend

    check_backend(JaxBackend(vectorize=vectorize))


@pytest.mark.parametrize(("architecture", "shape", "vmapped"), [("mlp", (1, 8, 8), True),
                                                                  ("tiny10", (1, 8, 8), False)])
def test_jax_loops_over_vectors_of_a_convolutional_model_on_the_cpu(architecture, shape, vmapped):
    """On the CPU the jax backend vmaps dense models and loops over a convolutional one's vectors
    (XLA's vmapped convolutions run several times slower there); both give each vector's own logits."""
    jax = pytest.importorskip("jax")
    from combinability_jax.backend import JaxBackend

    from combinability.evaluation import Evaluator

    be = JaxBackend(jax.devices("cpu")[0])
    model = build_model(architecture, backend="jax", width=0.125, num_classes=3, input_shape=shape, seed=0)
    state = {k: v for k, v in be.state(model).items() if np.issubdtype(v.dtype, np.floating)}
    layout = FlatLayout.from_arrays(state)
    rng = np.random.default_rng(0)
    flats = np.stack([layout.flatten(state) * s for s in (1.0, 0.5, -0.7)]).astype(np.float32)
    x = be.asarray(rng.normal(size=(9, *shape)).astype(np.float32))
    # batches of 5 and 4 (the short one padded to 5 and cut back) against one batch of 9
    together = be.to_numpy(Evaluator(be, model, layout, batch_size=5, vectors=3).logits(flats, x))
    one_by_one = [be.to_numpy(Evaluator(be, model, layout, batch_size=9, vectors=1).logits(f, x))[0] for f in flats]
    np.testing.assert_allclose(together, np.stack(one_by_one), rtol=1e-5, atol=1e-6)
    assert not np.allclose(one_by_one[0], one_by_one[1])  # the vectors differ, so a mix-up would show
    evaluator = Evaluator(be, model, layout, batch_size=5, vectors=3)
    assert evaluator.logits(flats, x).shape == (3, 9, 3)
    assert evaluator.prepared._vmap_on_cpu is vmapped


def test_jax_compiles_a_model_once_for_every_evaluator_of_it():
    """A sweep's Evaluator, the next sweep's, an analysis's: one compiled forward pass per live model,
    dropped with the model."""
    jax = pytest.importorskip("jax")
    import gc
    import weakref

    from combinability_jax import backend as jax_backend

    from combinability.evaluation import Evaluator

    be = jax_backend.JaxBackend(jax.devices("cpu")[0])
    model = build_model("mlp", backend="jax", width=1 / 64, num_classes=3, input_shape=(6,), seed=0)
    state = {k: v for k, v in be.state(model).items() if np.issubdtype(v.dtype, np.floating)}
    layout = FlatLayout.from_arrays(state)
    data = random_inputs((6,), 3, n=7, seed=0)
    flat = layout.flatten(state)
    first, second = (Evaluator(be, model, layout, batch_size=7) for _ in range(2))
    scores = [ev.evaluate(flat, data)[0].loss for ev in (first, second)]
    assert first.prepared.program is second.prepared.program
    assert first.prepared.program.forward_one._cache_size() == 1  # compiled once, for both
    assert scores[0] == scores[1]
    bf16 = Evaluator(be.with_compute_dtype("bfloat16"), model, layout, batch_size=7)
    assert bf16.prepared.program is not first.prepared.program  # another compute type, another program
    alive, program = weakref.ref(model), weakref.ref(first.prepared.program)
    del model, first, second, bf16
    gc.collect()
    assert alive() is None
    assert program() is None  # the model's compiled program went with it


def test_jax_shares_a_sets_vectors_on_the_cpu():
    """A set's flat vectors are 64-byte aligned, so the jax backend's CPU arrays use their memory
    (a sweep's end models cost no copy); the values are the vectors'."""
    jax = pytest.importorskip("jax")
    from combinability_jax.backend import JaxBackend

    import combinability as cb

    be = JaxBackend(jax.devices("cpu")[0])
    models = [build_model("mlp", backend="jax", width=1 / 64, num_classes=3, input_shape=(6,), seed=s) for s in (0, 1)]
    pair = cb.ModelPair(*models, backend=be)
    for theta in pair.thetas:
        on_device = be.asarray(theta)
        assert on_device.unsafe_buffer_pointer() == theta.ctypes.data
        np.testing.assert_array_equal(np.asarray(on_device), theta)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_feature_taps_take_one_vector_and_say_so(backend):
    """``features`` and ``correlations`` read one vector, given as (d,), (1, d) or a list of one;
    two are refused with the count, not unpacked into an obscure error."""
    pytest.importorskip(backend)
    from combinability.errors import LayoutError
    from combinability.evaluation import Evaluator

    be = get_backend(backend)
    model = build_model("mlp", backend=backend, width=1 / 64, num_classes=3, input_shape=(6,), seed=0)
    state = {k: v for k, v in be.state(model).items() if np.issubdtype(v.dtype, np.floating)}
    layout = FlatLayout.from_arrays(state)
    flat = layout.flatten(state)
    data = random_inputs((6,), 3, n=5, seed=0)
    ev = Evaluator(be, model, layout, batch_size=5)
    from combinability.zoo import mlp_table

    point = mlp_table(width=1 / 64, num_classes=3, input_shape=(6,)).feature_points()[0]
    given = [ev.features(f, data, [point])[point] for f in (flat, flat[None, :], [flat])]
    assert all(np.array_equal(given[0], g) for g in given[1:])
    with pytest.raises(LayoutError, match="one parameter vector is needed here, got 2"):
        ev.features(np.stack([flat, flat]), data, [point])

