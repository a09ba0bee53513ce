"""Flax models as users write their calls: mode flags under other names, outputs that are dicts or
tuples, blocks wrapped in ``nn.remat``, and layers stacked by a scan (refused by name).

References: ``module.apply`` called directly with the model's inference flag, a numpy
cross-entropy, and planted permutations undone exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import flax_planted_permutation

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nn = pytest.importorskip("flax.linen")

D = 8


def _cross_entropy(logits, y) -> float:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def _x(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


class Training(nn.Module):
    """BatchNorm and dropout driven by ``training`` (not flax's ``train``), in training mode by default."""

    @nn.compact
    def __call__(self, x, training: bool = True):
        h = nn.relu(nn.BatchNorm(use_running_average=not training)(nn.Dense(16)(x)))
        return nn.Dense(5)(nn.Dropout(0.5, deterministic=not training)(h))


class Deterministic(nn.Module):
    """Dropout driven by ``deterministic`` (Hugging Face's flax models, lm1b), off by default."""

    @nn.compact
    def __call__(self, x, deterministic: bool = False):
        return nn.Dense(5)(nn.Dropout(0.5)(nn.relu(nn.Dense(16)(x)), deterministic=deterministic))


class RunningAverage(nn.Module):
    """BatchNorm's own flag, required."""

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        return nn.Dense(5)(nn.relu(nn.BatchNorm(use_running_average=use_running_average)(nn.Dense(16)(x))))


@pytest.mark.parametrize(("cls", "inference"), [(Training, {"training": False}),
                                                (Deterministic, {"deterministic": True}),
                                                (RunningAverage, {"use_running_average": True})])
def test_mode_flags_under_other_names_are_set_for_inference(cls, inference):
    x, net = _x(), cls()
    va, vb = (net.init(jax.random.PRNGKey(s), x, **inference) for s in (0, 1))
    if "batch_stats" in va:  # statistics away from (0, 1), so that the mode shows in the outputs
        va = {**va, "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.5, va["batch_stats"])}
    y = np.arange(len(x)) % 5
    pair = cb.ModelPair((net, va), (net, vb), example_input=x[:4])
    result = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0], splits=["test"])
    loss = result["loss"].sel(split="test").squeeze().values
    assert loss[0] == pytest.approx(_cross_entropy(net.apply(va, x, **inference), y), rel=1e-5)
    assert loss[-1] == pytest.approx(_cross_entropy(net.apply(vb, x, **inference), y), rel=1e-5)


class DictOutput(nn.Module):
    """Logits and features in a dict, or (``pair=True``) as a tuple ``(logits, features)``."""

    pair: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(12)(x))
        logits = nn.Dense(4)(nn.tanh(nn.Dense(10)(h)))
        return (logits, h) if self.pair else {"features": h, "logits": logits}


@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_model_returning_a_dict_or_tuple_is_scored_on_its_logits(as_tuple):
    x, net = _x(), DictOutput(pair=as_tuple)
    va, vb = (net.init(jax.random.PRNGKey(s), x) for s in (0, 1))

    def logits(v):
        out = net.apply(v, x)
        return out[0] if as_tuple else out["logits"]

    table = cb.derive.describe((net, va), x[:4])
    assert [n.op for n in table.nodes if n.op == "dense"] == ["dense"] * 3  # the logits' layers, traced
    y = np.arange(len(x)) % 4
    pair = cb.ModelPair((net, va), (net, vb), example_input=x[:4]).align("weight")
    result = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0], splits=["test"])
    loss = result["loss"].sel(split="test").squeeze().values
    assert loss[0] == pytest.approx(_cross_entropy(logits(va), y), rel=1e-5)
    assert loss[-1] == pytest.approx(_cross_entropy(logits(vb), y), rel=1e-5)  # aligned B computes B


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D)(nn.relu(nn.Dense(2 * D)(nn.LayerNorm()(x))))


class Remat(nn.Module):
    """Residual blocks under ``nn.remat`` (gradient checkpointing): the same parameters and function."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        for i in range(2):
            x = nn.remat(Block)(name=f"block_{i}")(x)
        return nn.Dense(4, name="head")(x)


def test_blocks_under_remat_are_traced_and_a_planted_permutation_is_undone():
    x, net = _x(), Remat()
    variables = net.init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(jax.random.PRNGKey(3), v.shape), variables)
    pair, direct = flax_planted_permutation(net, variables, x)
    np.testing.assert_allclose(np.asarray(net.apply(pair.model("b").variables, x)), direct, rtol=1e-5, atol=1e-5)
    assert len(pair.spec.perm_to_axes) == 3  # the stream and each block's hidden units


class Mixer(nn.Module):
    """google-research's MlpMixer call: a required keyword-only ``train``; traced by feature spaces."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Dense(D)(x)
        y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
        x = x + jnp.swapaxes(nn.Dense(4)(nn.gelu(nn.Dense(6)(y))), 1, 2)
        x = x + nn.Dropout(0.5, deterministic=not train)(nn.Dense(D)(nn.gelu(nn.Dense(12)(nn.LayerNorm()(x)))))
        return nn.Dense(3)(x.mean(1))


def test_features_of_a_model_with_a_required_train_flag_are_read_in_inference_mode():
    x = np.random.default_rng(0).normal(size=(32, 4, 5)).astype(np.float32)
    net = Mixer()
    va, vb = (net.init(jax.random.PRNGKey(s), x, train=False) for s in (0, 1))
    y = np.asarray(net.apply(va, x, train=False)).argmax(1)
    pair = cb.ModelPair((net, va), (net, vb), example_input=x[:4]).align("activation", data=(x, y))
    result = cb.sweep(pair, cb.Linear(), data=(x, y), values=[1.0], splits=["test"])
    loss = float(result["loss"].sel(split="test").squeeze())
    assert loss == pytest.approx(_cross_entropy(net.apply(vb, x, train=False), y), rel=1e-5)


class _ScanBody(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.relu(nn.Dense(D)(h)), None


class StackedByScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D)(x)
        x, _ = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
        return nn.Dense(4)(x)


def test_layers_stacked_by_a_scan_are_refused_naming_the_scan():
    x, net = _x(), StackedByScan()
    variables = net.init(jax.random.PRNGKey(0), x)
    with pytest.raises(TracingError, match=r"layers stacked by a scan.*unroll them into a loop over blocks") as info:
        cb.ModelPair((net, variables), (net, variables), example_input=x[:4])
    assert "traced as a transformer" not in str(info.value)  # said once, not once per tracer


def test_attention_on_a_single_token_is_refused_as_it_cannot_check_the_heads():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(D)(x)
            return nn.Dense(3)(h + nn.MultiHeadDotProductAttention(num_heads=2)(h, h)).mean(1)

    net = Attention()
    one = np.random.default_rng(0).normal(size=(3, 1, 5)).astype(np.float32)
    variables = net.init(jax.random.PRNGKey(0), one)
    with pytest.raises(TracingError, match=r"attention over a single position on example_input"):
        cb.derive_symmetries((net, variables), one)
    several = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    spec, _ = cb.derive_symmetries((net, variables), several)
    assert spec.perm_to_axes


class _FieldDropout(nn.Module):
    """The dropout flag a module field, on for training: the library cannot set it."""

    deterministic: bool = False

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.Dropout(0.2, deterministic=self.deterministic)(nn.relu(nn.Dense(6)(x))))


class _FieldBatchNorm(nn.Module):
    train: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.BatchNorm(use_running_average=not self.train)(nn.Dense(6)(x))))


class _ExtraArgument(nn.Module):
    @nn.compact
    def __call__(self, x, temperature):
        return nn.Dense(3)(x) / temperature


@pytest.mark.parametrize("cls, fixed, why", [
    (_FieldDropout, {"deterministic": True}, r"still draws random numbers \(dropout\).*Model\(deterministic=True\)"),
    (_FieldBatchNorm, {"train": False}, r"still updates variables \(BatchNorm's batch statistics\)"),
    (_ExtraArgument, None, r"missing 1 required positional argument: 'temperature'; the library calls "
                           r"module.apply\(variables, x\): give __call__'s other arguments defaults"),
])
def test_a_model_the_library_cannot_call_in_inference_mode_is_told_how(cls, fixed, why):
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    kwargs = {"temperature": 1.0} if cls is _ExtraArgument else {}
    variables = [cls().init({"params": jax.random.PRNGKey(s), "dropout": jax.random.PRNGKey(9)}, x, **kwargs)
                 for s in (0, 1)]
    with pytest.raises(TracingError, match=why):
        cb.ModelPair(*((cls(), v) for v in variables), example_input=x)
    if fixed is not None:  # built in inference mode, as the message says: traced
        pair = cb.ModelPair(*((cls(**fixed), v) for v in variables), example_input=x)
        assert pair.spec.perm_names
