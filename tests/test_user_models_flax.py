"""Any user flax linen model, no plugin: traced into a layer table, its spec derived and verified.

References: specs written by hand with :class:`~combinability.SpecBuilder` over the reference names (compared as
partitions of (parameter, axis) pairs), planted permutations, and direct ``module.apply`` calls scored with a
numpy cross-entropy. Flax models take channels-last inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import IncompatibleModelsError, TracingError
from tests.model_checks import flax_planted_permutation

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")


class Block(nn.Module):
    """A residual block: conv-BN-relu-conv-BN, plus the input, relu."""

    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        h = nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3), use_bias=False)(h))
        return nn.relu(x + h)


class ResCNN(nn.Module):
    """A user's BatchNorm CNN with a residual block (channels-last, as flax convolutions are)."""

    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3))(x)))
        x = Block(self.width)(x, train)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _x(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _init(module, seed: int, x: np.ndarray):
    """Random variables of ``module`` (numpy draws on flax's shapes: ``module.init`` compiles slowly on CPUs)."""
    shapes = traverse.flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0), x), sep="/")
    rng = np.random.default_rng(seed)
    out = {}
    for k, leaf in shapes.items():
        z = rng.normal(size=leaf.shape).astype(np.float32)
        value = (z / np.sqrt(np.prod(leaf.shape[:-1])) if k.endswith("/kernel") else
                 np.abs(z) + 0.5 if k.endswith(("/var", "/scale")) else 0.1 * z)
        out[k] = value.astype(np.float32)
    return traverse.unflatten_dict(out, sep="/")


def _partition(spec) -> set[frozenset]:
    return {frozenset(axes) for axes in spec.perm_to_axes.values()}


def _cross_entropy(logits, y) -> float:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def test_derived_spec_of_a_residual_bn_cnn_is_the_hand_written_one():
    net = ResCNN()
    spec = cb.derive_spec((net, _init(net, 0, _x())), _x())
    b = cb.SpecBuilder("torch").conv("Conv_0", None, "S").norm("BatchNorm_0", "S").buffers("BatchNorm_0", "S")
    b.conv("Block_0.Conv_0", "S", "I", bias=False).norm("Block_0.BatchNorm_0", "I").buffers("Block_0.BatchNorm_0", "I")
    b.conv("Block_0.Conv_1", "I", "S", bias=False).norm("Block_0.BatchNorm_1", "S").buffers("Block_0.BatchNorm_1", "S")
    assert _partition(spec) == _partition(b.dense("Dense_0", "S", None).build())
    assert cb.PermutationSpec.from_json(spec.to_json()) == spec


def test_names_round_trip_between_flax_variables_and_reference_arrays():
    net = ResCNN()
    variables = _init(net, 0, _x())
    table = cb.derive.describe((net, variables), _x())
    assert table.flax_names()["Block_0.Conv_1.weight"] == "params/Block_0/Conv_1/kernel"
    assert table.flax_names()["Block_0.BatchNorm_1.running_var"] == "batch_stats/Block_0/BatchNorm_1/var"
    flat = traverse.flatten_dict(variables, sep="/")
    state = table.from_flax(flat)
    assert state["Block_0.Conv_0.weight"].shape == (8, 8, 3, 3) and state["Dense_0.weight"].shape == (10, 8)
    back = table.to_flax(state)
    assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)


def test_a_planted_permutation_is_recovered_and_logits_match_module_apply():
    net, x = ResCNN(width=12), _x()
    va = _init(net, 0, x)
    pair, direct = flax_planted_permutation(net, va, x)
    be = cb.get_backend("jax")
    logits = be.to_numpy(cb.evaluation.Evaluator(be, pair.model_a, pair.layout).logits(
        [pair.theta_a, pair.naive.theta_b], be.asarray(x)))
    np.testing.assert_allclose(logits[0], direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(net.apply(pair.model("b").variables, x)), direct, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def digits_pair():
    digits = cb.load_dataset("digits", "test")
    x, y = digits.x[:200], digits.y[:200]  # channels-first (n, 1, 8, 8), as the library's datasets are
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    net = ResCNN()
    va, vb = _init(net, 0, x_nhwc[:4]), _init(net, 1, x_nhwc[:4])
    return net, va, cb.ModelPair((net, va), (net, vb), example_input=x_nhwc[:4]).align("weight"), x, x_nhwc, y


def test_sweep_of_a_user_pair_starts_at_module_apply(digits_pair):
    net, va, pair, x, x_nhwc, y = digits_pair
    assert pair.layer_names == ["Conv_0", "Block_0.Conv_0", "Block_0.Conv_1", "Dense_0"]
    ds = cb.sweep(pair, cb.Linear(), data=(x_nhwc, y), values=[0, 0.5, 1], splits=["test"])
    assert float(ds["loss"].values[0, 0, 0]) == pytest.approx(_cross_entropy(net.apply(va, x_nhwc), y), rel=1e-5)
    assert float(ds["loss_b"].sel(split="test")) == pytest.approx(float(ds["loss"].values[0, 2, 0]), rel=1e-6)
    feats = pair.naive.align("activation", data=(x_nhwc, y))
    assert set(feats.permutation) == set(pair.permutation)


def test_data_must_be_in_the_models_own_layout(digits_pair):
    """A flax model takes channels-last images: channels-first data is refused, naming both shapes."""
    _, _, pair, x, _, y = digits_pair
    with pytest.raises(cb.DatasetError, match=r"\(1, 8, 8\), the models take \(8, 8, 1\)"):
        cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0], splits=["test"])


def test_training_steps_update_batchnorm_statistics(digits_pair):
    net, va, pair, x, x_nhwc, y = digits_pair
    be = cb.get_backend("jax")
    prepared = be.prepare(pair.model_a, pair.layout)
    xp = be.xp()

    def loss(logits, labels):
        return -xp.mean(xp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    value, grad, after = prepared.value_and_grad(be.asarray(pair.theta_a), be.asarray(x_nhwc[:32]),
                                                 be.asarray(y[:32]), loss)
    logits_train, _ = net.apply(va, x_nhwc[:32], train=True, mutable=["batch_stats"])
    assert float(value) == pytest.approx(_cross_entropy(logits_train, y[:32]), rel=1e-5)
    after, grad = be.to_numpy(after), be.to_numpy(grad)
    moved = {e.name for e in pair.layout.entries if not np.array_equal(after[e.offset:e.stop],
                                                                       pair.theta_a[e.offset:e.stop])}
    assert moved == {e.name for e in pair.layout.entries if e.name.endswith(("running_mean", "running_var"))}
    assert all(np.abs(grad[e.offset:e.stop]).sum() > 0 for e in pair.layout.entries if e.name.endswith("weight"))


def test_mlp_with_layernorm_and_gelu():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            x = nn.gelu(nn.LayerNorm()(nn.Dense(12)(x)))
            x = nn.tanh(nn.Dense(12)(x))
            return nn.Dense(3)(x)

    x = np.random.default_rng(0).normal(size=(4, 4, 4, 1)).astype(np.float32)
    net = MLP()
    table = cb.derive.describe((net, _init(net, 0, x)), x)
    assert [n.op for n in table.nodes] == ["flatten", "dense", "norm", "act", "dense", "act", "dense"]
    assert [n.fn for n in table.nodes if n.op == "act"] == ["gelu", "tanh"] and table.input_shape == (1, 4, 4)
    want = cb.SpecBuilder("torch").dense("Dense_0", None, "A").norm("LayerNorm_0", "A").dense("Dense_1", "A", "B")
    assert _partition(table.spec()) == _partition(want.dense("Dense_2", "B", None).build())


def test_unsupported_operations_raise_tracing_errors_naming_them():
    class Cumulative(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jax.numpy.cumsum(nn.Dense(3)(x), axis=1))

    x = np.ones((2, 4), np.float32)
    with pytest.raises(TracingError, match=r"operation 'cumsum' in the top-level Cumulative.*cannot follow.*spec="):
        cb.derive_spec((Cumulative(), Cumulative().init(jax.random.PRNGKey(0), x)), x)

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x) * self.param("gain", nn.initializers.ones, (2,))

    with pytest.raises(TracingError, match=r"variable 'params/gain' of shape \(2,\): .*a submodule's parameter"):
        cb.derive_spec((Scaled(), Scaled().init(jax.random.PRNGKey(0), x)), x)
    with pytest.raises(TracingError, match=r"running ResCNN.apply on example_input of shape \(2, 8, 8\) failed"):
        cb.derive_spec((ResCNN(), _init(ResCNN(), 0, _x())), np.ones((2, 8, 8), np.float32))  # a sequence
    with pytest.raises(TracingError, match=r"channels-last sequences \(n, length, c\), images"):
        cb.derive_spec((ResCNN(), _init(ResCNN(), 0, _x())), np.ones((2, 1, 8, 8, 1, 1), np.float32))


def test_models_of_different_widths_cannot_be_paired():
    x = _x()
    with pytest.raises(IncompatibleModelsError, match="trace to different networks"):
        cb.ModelPair((ResCNN(8), _init(ResCNN(8), 0, x)), (ResCNN(6), _init(ResCNN(6), 1, x)), example_input=x)


def test_a_reset_keeps_the_batch_statistics_flax_itself_keeps():
    """flax's BatchNorm keeps the biased variance of the batch (torch the unbiased one): the reset statistics of
    a merged pair equal those of flax's own training-mode pass over the data in one batch (momentum 0)."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.0)(nn.Conv(4, (3, 3))(x)))
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.0)(nn.Conv(4, (3, 3))(x)))
            return nn.Dense(3)(x.mean((1, 2)))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, size=8)
    net = Net()
    va, vb = _init(net, 0, x), _init(net, 1, x)
    merged = cb.ModelPair((net, va), (net, vb), example_input=x).merge(repair="reset", repair_data=(x, y))
    average = {"params": jax.tree_util.tree_map(lambda a, b: (a + b) / 2, va["params"], vb["params"]),
               "batch_stats": va["batch_stats"]}
    _, updated = net.apply(average, x, train=True, mutable=["batch_stats"])
    got, want = (traverse.flatten_dict(v, sep="/") for v in (merged.variables["batch_stats"], updated["batch_stats"]))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5, atol=1e-6, err_msg=str(k))
