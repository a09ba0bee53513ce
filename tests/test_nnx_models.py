"""Flax NNX models brought by a user (``combinability_jax.nnx_bridge``).

References: the NNX model's own forward pass (its outputs, its cross-entropy, its
BatchNorm's update in train mode), planted permutations applied to its state by hand in
numpy, and functional invariance of the aligned model run by NNX itself.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.errors import IncompatibleModelsError, TracingError  # noqa: E402


class ConvNet(nnx.Module):
    """Conv, BatchNorm, a residual pair of convs in an ``nnx.List``, a hidden dense layer."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([nnx.Conv(8, 8, (3, 3), rngs=rngs) for _ in range(2)])
        self.hidden = nnx.Linear(8, 12, rngs=rngs)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        for conv in self.blocks:
            h = h + nnx.relu(conv(h))
        return self.head(nnx.relu(self.hidden(h.mean(axis=(1, 2)))))


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.fc2(nnx.gelu(self.fc1(self.ln2(x)))))


class TokenClassifier(nnx.Module):
    """Embedding, a learned position table held as a bare ``nnx.Param``, two pre-LN blocks with dropout."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 11, length: int = 6, d: int = 16) -> None:
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (length, d)) * 0.5)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(2)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        x = self.embed(t) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(axis=1))


def _images(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype(np.float32), rng.integers(0, 5, n).astype(np.int32)


def _with_stats(model: ConvNet, seed: int) -> ConvNet:
    """Non-trivial running statistics, as after training."""
    rng = np.random.default_rng(seed)
    model.bn1.mean[...] = jnp.asarray(rng.normal(size=8).astype(np.float32) * 0.3)
    model.bn1.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 8).astype(np.float32))
    model.eval()
    return model


def _cross_entropy(logits: jax.Array, y: np.ndarray) -> float:
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return float(-np.mean(np.take_along_axis(np.asarray(logp), y[:, None], axis=1)))


def _planted(model: ConvNet, seed: int) -> tuple[ConvNet, dict[str, np.ndarray]]:
    """A copy of ``model`` with its channels (one permutation: the residual stream) and hidden units permuted."""
    rng = np.random.default_rng(seed)
    p, q = rng.permutation(8), rng.permutation(12)
    twin = nnx.clone(model)
    twin.conv1.kernel[...] = twin.conv1.kernel[...][..., p]
    twin.conv1.bias[...] = twin.conv1.bias[...][p]
    for leaf in ("scale", "bias", "mean", "var"):
        getattr(twin.bn1, leaf)[...] = getattr(twin.bn1, leaf)[...][p]
    for conv in twin.blocks:
        conv.kernel[...] = conv.kernel[...][:, :, p][..., p]
        conv.bias[...] = conv.bias[...][p]
    twin.hidden.kernel[...] = twin.hidden.kernel[...][p][:, q]
    twin.hidden.bias[...] = twin.hidden.bias[...][q]
    twin.head.kernel[...] = twin.head.kernel[...][q]
    twin.eval()
    return twin, {"stream": p, "hidden": q}


def test_conv_net_is_traced_into_a_layer_table_named_by_nnx_paths():
    x, _ = _images()
    model = _with_stats(ConvNet(nnx.Rngs(0)), 0)
    pair = cb.ModelPair(model, _with_stats(ConvNet(nnx.Rngs(1)), 1), example_input=x[:4])
    assert pair.backend == "jax"
    assert pair.table is not None  # a layer table: REPAIR, layer analyses
    assert pair.layer_names == ["conv1", "blocks.0", "blocks.1", "hidden", "head"]
    assert pair.table.config["model"] == "ConvNet"
    state = cb.get_backend("jax").state(pair.models[0])
    np.testing.assert_array_equal(state["blocks.1.weight"],
                                  np.transpose(np.asarray(model.blocks[1].kernel[...]), (3, 2, 0, 1)))
    np.testing.assert_array_equal(state["bn1.running_var"], np.asarray(model.bn1.var[...]))


def test_planted_permutation_is_undone_and_sweep_ends_are_the_models_own_losses():
    x, y = _images()
    a = _with_stats(ConvNet(nnx.Rngs(0)), 0)
    b, _ = _planted(a, 3)
    np.testing.assert_allclose(np.asarray(b(x)), np.asarray(a(x)), rtol=1e-5, atol=1e-5)  # the plant is a symmetry
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    aligned = pair.model_b.nnx()
    assert isinstance(aligned, ConvNet)
    for (path, va), (_, vb) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)),
                                   nnx.to_flat_state(nnx.state(aligned, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(vb.get_value()), np.asarray(va.get_value()), atol=1e-6, err_msg=path)
    np.testing.assert_allclose(np.asarray(aligned.bn1.var[...]), np.asarray(a.bn1.var[...]), atol=1e-6)
    naive = cb.ModelPair(a, _with_stats(ConvNet(nnx.Rngs(1)), 1), example_input=x[:4])
    result = cb.sweep(naive, cb.Linear(), data=(x, y), values=[0.0, 1.0])
    ends = result["loss"].values.ravel()
    np.testing.assert_allclose(ends, [_cross_entropy(m(x), y) for m in (a, naive.model_b.nnx())], rtol=1e-5)


def test_features_and_batchnorm_updates_are_the_nnx_models_own():
    x, y = _images()
    a = _with_stats(ConvNet(nnx.Rngs(0)), 0)
    pair = cb.ModelPair(a, _with_stats(ConvNet(nnx.Rngs(1)), 1), example_input=x[:4])
    be = cb.get_backend("jax")
    prepared = be.prepare(pair.models[0], pair.layout)
    flat = be.asarray(pair.theta_a)
    feats = prepared.features(flat, jnp.asarray(x), ["blocks.0"])
    h = nnx.relu(a.bn1(a.conv1(x)))
    expected = a.blocks[0](h)  # the point of a conv node is its output
    np.testing.assert_allclose(np.asarray(feats["blocks.0"]), np.moveaxis(np.asarray(expected), -1, 1),
                               rtol=1e-5, atol=1e-5)
    # one training step's new statistics: BatchNorm's update in nnx's train mode, momentum 0.99
    _, grad, updated = prepared.value_and_grad(flat, jnp.asarray(x), jnp.asarray(y),
                                                    lambda logits, labels: be.cross_entropy(logits, labels).mean())
    twin = nnx.clone(a)
    twin.train()
    twin(x)
    entries = {e.name: e for e in pair.layout.entries}
    mean = entries["bn1.running_mean"]
    np.testing.assert_allclose(np.asarray(updated)[mean.offset:mean.stop], np.asarray(twin.bn1.mean[...]),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(twin.bn1.mean[...]), np.asarray(a.bn1.mean[...]))
    assert float(np.abs(np.asarray(grad)[mean.offset:mean.stop]).max()) == 0.0  # statistics are not trained
    kernel = entries["hidden.weight"]
    assert float(np.abs(np.asarray(grad)[kernel.offset:kernel.stop]).max()) > 0.0


def test_transformer_is_traced_by_its_feature_spaces_and_aligned_without_changing_its_function():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, (20, 6)).astype(np.int32)
    labels = rng.integers(0, 3, 20).astype(np.int32)
    a, b = TokenClassifier(nnx.Rngs(0)), TokenClassifier(nnx.Rngs(1))
    a.eval(), b.eval()
    pair = cb.ModelPair(a, b, example_input=tokens[:4])
    assert pair.table is None
    assert "blocks/0/fc1" in pair.layer_names and "pos" in pair.layout.names[0] + " ".join(pair.layout.names)
    aligned = pair.align("weight")
    b_aligned = aligned.model_b.nnx()
    np.testing.assert_allclose(np.asarray(b_aligned(tokens)), np.asarray(b(tokens)), rtol=2e-4, atol=2e-5)
    assert not np.allclose(np.asarray(b_aligned.blocks[0].fc1.kernel[...]), np.asarray(b.blocks[0].fc1.kernel[...]))
    result = cb.sweep(aligned, cb.Linear(), data=(tokens, labels), values=[0.0, 1.0])
    np.testing.assert_allclose(result["loss"].values.ravel(),
                               [_cross_entropy(a(tokens), labels), _cross_entropy(b(tokens), labels)], rtol=1e-4)
    points = cb.llfc(aligned, data=(tokens, labels), values=[0.5])
    assert "blocks/0/fc1" in list(points["point"].values)
    assert not any(":" in p for p in points["point"].values)


def test_classes_are_restored_and_errors_name_the_model():
    x, _ = _images()
    call = nnx.Linear.__call__

    class Broken(ConvNet):
        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(x)  # (n, 6, 6, 1) into Linear(12, 5)

    broken = Broken(nnx.Rngs(0))
    with pytest.raises(TracingError, match="Broken"):
        cb.ModelPair(broken, Broken(nnx.Rngs(1)), example_input=x[:4])
    assert nnx.Linear.__call__ is call and Broken.__dict__["__call__"] is not call
    with pytest.raises(IncompatibleModelsError, match="NNX"):
        cb.get_backend("jax").state(object())
    import flax.linen as fnn

    linen = fnn.Dense(3)
    variables = linen.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
    with pytest.raises(TypeError, match="not a converted NNX model"):
        cb.get_backend("jax").with_state((linen, variables), cb.get_backend("jax").state((linen, variables))).nnx()


class _Sequential(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.net = nnx.Sequential(nnx.Linear(10, 16, rngs=rngs), nnx.relu, nnx.Linear(16, 16, rngs=rngs), nnx.gelu,
                                  nnx.Linear(16, 4, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net(x)


class _DensePrediction(nnx.Module):
    """Circular padding, GroupNorm, a strided conv, LayerNorm on a map, a transposed conv and a skip."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1 = nnx.Conv(3, 8, (3, 3), padding="CIRCULAR", rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.up = nnx.ConvTranspose(8, 8, (2, 2), strides=(2, 2), rngs=rngs)
        self.out = nnx.Conv(8, 4, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.silu(self.gn(self.c1(x)))
        return self.out(self.up(nnx.relu(self.ln(self.c2(h)))) + h)


class _Recurrent(nnx.Module):
    """``nnx.RNN`` over an LSTM cell: its initial carry is drawn from the cell's rng stream (a counter
    updated in place, constants only)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.rnn = nnx.RNN(nnx.LSTMCell(5, 12, rngs=rngs))
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.rnn(x)[:, -1])


class _Mixer(nnx.Module):
    """An MLP-Mixer block: token mixing across positions (a transposed map), then channel mixing."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.tok1, self.tok2 = nnx.Linear(7, 14, rngs=rngs), nnx.Linear(14, 7, rngs=rngs)
        self.ch1, self.ch2 = nnx.Linear(5, 10, rngs=rngs), nnx.Linear(10, 5, rngs=rngs)
        self.ln1, self.ln2 = nnx.LayerNorm(5, rngs=rngs), nnx.LayerNorm(5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + jnp.swapaxes(self.tok2(nnx.gelu(self.tok1(jnp.swapaxes(self.ln1(x), 1, 2)))), 1, 2)
        x = x + self.ch2(nnx.gelu(self.ch1(self.ln2(x))))
        return self.head(x.mean(1))


@pytest.mark.parametrize(("make", "shape", "table"), [
    (_Sequential, (10,), True), (_DensePrediction, (8, 8, 3), True), (_Recurrent, (7, 5), False),
    (_Mixer, (7, 5), False)])
def test_more_nnx_models_align_and_sweep_as_their_own_forward_passes(make, shape, table):
    x = np.random.default_rng(0).normal(size=(12, *shape)).astype(np.float32)
    a, b = make(nnx.Rngs(0)), make(nnx.Rngs(1))
    pair = cb.ModelPair(a, b, example_input=x[:4])
    assert (pair.table is not None) == table
    aligned = pair.align("weight")
    b_aligned = aligned.model_b.nnx()
    np.testing.assert_allclose(np.asarray(b_aligned(x)), np.asarray(b(x)), rtol=1e-4, atol=1e-5)
    changed = [path for (path, old), (_, new) in zip(nnx.to_flat_state(nnx.state(b, nnx.Param)),
                                                     nnx.to_flat_state(nnx.state(b_aligned, nnx.Param)), strict=True)
               if old.get_value().shape == new.get_value().shape and not np.allclose(old.get_value(), new.get_value())]
    assert changed  # the alignment moved units (two random inits are not aligned already)
    y = np.random.default_rng(1).integers(0, 3, np.asarray(a(x)).shape[:-1]).astype(np.int32)
    result = cb.sweep(aligned, cb.Linear(), data=(x, y), values=[0.0, 1.0])
    own = [float(np.mean(-np.take_along_axis(np.asarray(jax.nn.log_softmax(m(x)), np.float64), y[..., None], -1)))
           for m in (a, b)]
    np.testing.assert_allclose(result["loss"].values.ravel(), own, rtol=1e-4)


def test_cli_takes_an_nnx_class_and_its_files_fit_it_again(tmp_path, monkeypatch):
    """``--model pkg:Class`` of an NNX module: backend jax inferred; the aligned file holds flax names and
    loads into the class, computing B's function."""
    import sys
    import textwrap

    from combinability.cli import main
    from combinability.results import open_results

    (tmp_path / "nnx_nets.py").write_text(textwrap.dedent("""
        from flax import nnx

        class Tiny(nnx.Module):
            def __init__(self, rngs=None):
                rngs = rngs or nnx.Rngs(0)
                self.fc1, self.fc2 = nnx.Linear(64, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)

            def __call__(self, x):
                return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("nnx_nets", None)
    from nnx_nets import Tiny

    models = [Tiny(nnx.Rngs(seed)) for seed in (0, 1)]
    for seed, model in enumerate(models):
        cb.save_model(model, tmp_path / f"tiny{seed}.safetensors")
    from combinability.checkpoint import read_state_dict

    assert sorted(read_state_dict(tmp_path / "tiny0.safetensors")) == [
        "params/fc1/bias", "params/fc1/kernel", "params/fc2/bias", "params/fc2/kernel"]
    assert main(["align", "tiny0.safetensors", "tiny1.safetensors", "--model", "nnx_nets:Tiny", "--data", "digits",
                 "--out", "aligned.safetensors", "-q"]) == 0
    aligned = cb.load_into(Tiny(), tmp_path / "aligned.safetensors").nnx()
    test = cb.load_dataset("digits", "test", limit=64)
    np.testing.assert_allclose(np.asarray(aligned(test.x)), np.asarray(models[1](test.x)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(aligned.fc1.kernel[...]), np.asarray(models[1].fc1.kernel[...]))
    assert main(["sweep", "tiny0.safetensors", "aligned.safetensors", "--model", "nnx_nets:Tiny", "--data", "digits",
                 "--align", "none", "--values", "0,1", "--limit", "64", "--out", "s.nc", "-q"]) == 0
    loss = open_results(tmp_path / "s.nc")["loss"].sel(split="test").transpose("lam", ...).values
    own = [_cross_entropy(m(test.x), test.y) for m in models]
    np.testing.assert_allclose(loss.reshape(2, -1), np.repeat(np.array(own)[:, None], loss[0].size, 1), rtol=1e-4)


def _save_orbax(path, tree) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), tree)
    checkpointer.wait_until_finished()


@pytest.mark.parametrize("what", ["state", "pure"])
def test_orbax_checkpoints_of_an_nnx_model_load_into_its_class(tmp_path, what):
    """The Flax guide's ``StandardCheckpointer().save(path, state)`` of ``nnx.split(model)``'s whole state (rng
    streams included) or of its pure dict: the weights are the model's, the rng streams left out."""
    x, _ = _images()
    model = _with_stats(ConvNet(nnx.Rngs(3)), 3)
    tree = nnx.split(model)[1] if what == "state" else nnx.state(model).to_pure_dict()
    _save_orbax(tmp_path / "ckpt", tree)
    from combinability.checkpoint import read_state_dict

    names = read_state_dict(tmp_path / "ckpt")
    assert "bn1/mean" in names and "blocks/1/kernel" in names and not any("rngs" in k for k in names)
    loaded = cb.load_into(ConvNet(nnx.Rngs(0)), tmp_path / "ckpt").nnx()
    loaded.eval()
    np.testing.assert_array_equal(np.asarray(loaded.bn1.var[...]), np.asarray(model.bn1.var[...]))
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_whole_training_states_load_their_model_part(tmp_path):
    """An Orbax checkpoint of a training state: a linen ``TrainState``'s params beside its optax state and step,
    and an NNX script's ``{"model": ..., "optimizer": ..., "step": ...}``; only the model's part is loaded."""
    import flax.linen as fnn
    import optax
    from flax.training import train_state

    class Linen(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3)(fnn.relu(fnn.Dense(5)(x)))

    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    variables = Linen().init(jax.random.PRNGKey(1), x)
    state = train_state.TrainState.create(apply_fn=Linen().apply, params=variables["params"], tx=optax.adam(1e-3))
    _save_orbax(tmp_path / "linen", {"params": state.params, "opt_state": state.opt_state, "step": state.step})
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables)
    loaded = cb.load_into((Linen(), zeros), tmp_path / "linen")
    np.testing.assert_array_equal(np.asarray(loaded.module.apply(loaded.variables, x)),
                                  np.asarray(Linen().apply(variables, x)))

    images, _ = _images()
    model = _with_stats(ConvNet(nnx.Rngs(3)), 3)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    _save_orbax(tmp_path / "nnx", {"model": nnx.state(model).to_pure_dict(),
                                   "optimizer": nnx.state(optimizer).to_pure_dict(), "step": 7})
    again = cb.load_into(ConvNet(nnx.Rngs(0)), tmp_path / "nnx").nnx()
    again.eval()
    np.testing.assert_allclose(np.asarray(again(images)), np.asarray(model(images)), rtol=1e-6, atol=1e-6)


def test_flax_msgpack_files_and_bad_folders(tmp_path):
    import flax.linen as fnn
    from flax import serialization

    from combinability.errors import CorruptFileError

    class Linen(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3)(fnn.relu(fnn.BatchNorm(use_running_average=True)(fnn.Dense(5)(x))))

    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    variables = Linen().init(jax.random.PRNGKey(1), x)
    (tmp_path / "linen.msgpack").write_bytes(serialization.to_bytes(variables))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables)
    loaded = cb.load_into((Linen(), zeros), tmp_path / "linen.msgpack")
    np.testing.assert_array_equal(np.asarray(loaded.module.apply(loaded.variables, x)),
                                  np.asarray(Linen().apply(variables, x)))
    with pytest.raises(IncompatibleModelsError, match="does not fit ConvNet"):
        cb.load_into(ConvNet(nnx.Rngs(0)), tmp_path / "linen.msgpack")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CorruptFileError, match="is a folder but not a checkpoint: it has no Orbax checkpoint"):
        cb.load_into(ConvNet(nnx.Rngs(0)), tmp_path / "plain")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "_CHECKPOINT_METADATA").write_text("{")
    with pytest.raises(CorruptFileError, match="could not be read as an Orbax checkpoint"):
        cb.load_into(ConvNet(nnx.Rngs(0)), tmp_path / "broken")


def test_training_steps_draw_dropout_masks_per_batch():
    """A training step runs dropout (a linen ``nn.Dropout`` needs its ``"dropout"`` rng, an NNX model reseeds its
    streams): reproducible for a batch, other masks for another batch, none in evaluation."""
    import flax.linen as fnn

    class LinenDrop(fnn.Module):
        @fnn.compact
        def __call__(self, x, train: bool = False):
            h = fnn.Dropout(0.5, deterministic=not train)(fnn.relu(fnn.Dense(32)(x)))
            return fnn.Dense(3)(h)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    linen = LinenDrop()
    tokens = rng.integers(0, 11, (16, 6)).astype(np.int32)
    be = cb.get_backend("jax")

    def loss(logits, labels):
        return be.cross_entropy(logits, labels).mean()

    for model, inputs in (((linen, linen.init(jax.random.PRNGKey(0), x)), x), (TokenClassifier(nnx.Rngs(0)), tokens)):
        pair = cb.ModelPair(model, model, example_input=inputs[:4])
        prepared = be.prepare(pair.models[0], pair.layout)
        flat = be.asarray(pair.theta_a)

        first = [float(prepared.value_and_grad(flat, jnp.asarray(b), jnp.asarray(y), loss)[0])
                 for b in (inputs, inputs, inputs[::-1])]
        evaluated = float(loss(prepared.forward(flat, jnp.asarray(inputs))[0], jnp.asarray(y)))
        assert first[0] == first[1]  # the same batch, the same masks
        assert first[0] != pytest.approx(evaluated, rel=1e-4)  # dropout is on in training only
        reversed_eval = float(loss(prepared.forward(flat, jnp.asarray(inputs[::-1]))[0], jnp.asarray(y)))
        assert first[2] != pytest.approx(reversed_eval, rel=1e-4)


def test_a_pair_keeps_what_jax_compiled_for_its_models():
    """A model traced by its feature spaces is the backend's own object in the pair, so its compiled forward
    pass serves every sweep of the pair (each sweep compiled it again: ~1 s each for a tiny transformer)."""
    from combinability_jax.backend import _PROGRAMS
    from combinability_jax.models import FlaxModel

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, (12, 6)).astype(np.int32)
    labels = rng.integers(0, 3, 12).astype(np.int32)
    a, b = TokenClassifier(nnx.Rngs(0)), TokenClassifier(nnx.Rngs(1))
    pair = cb.ModelPair(a, b, example_input=tokens[:4])
    assert all(isinstance(m, FlaxModel) for m in pair.models)
    first = cb.sweep(pair, cb.Linear(), data=(tokens, labels), values=[0.5])
    programs = dict(_PROGRAMS[pair.models[0]])
    second = cb.sweep(pair, cb.Uniform(), data=(tokens, labels), samples=2)
    assert dict(_PROGRAMS[pair.models[0]]) == programs  # the same compiled program objects, none added
    assert np.isfinite(first["loss"].values).all() and np.isfinite(second["loss"].values).all()


def test_a_bfloat16_nnx_model_is_traced_at_its_precision_and_keeps_it():
    """Parameters and computation in bfloat16: the activations are told apart at bfloat16's precision, the
    state is given as float32 (exactly), a planted permutation is undone and the aligned model is bfloat16."""

    class Half(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            kw = {"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16, "rngs": rngs}
            self.fc1, self.fc2, self.out = nnx.Linear(10, 16, **kw), nnx.Linear(16, 16, **kw), nnx.Linear(16, 3, **kw)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.out(nnx.silu(self.fc2(nnx.gelu(self.fc1(x)))))

    x = np.random.default_rng(0).normal(size=(24, 10)).astype(np.float32)
    a = Half(nnx.Rngs(0))
    b = nnx.clone(a)
    p, q = np.random.default_rng(1).permutation(16), np.random.default_rng(2).permutation(16)
    b.fc1.kernel[...], b.fc1.bias[...] = a.fc1.kernel[...][:, p], a.fc1.bias[...][p]
    b.fc2.kernel[...], b.fc2.bias[...] = a.fc2.kernel[...][p][:, q], a.fc2.bias[...][q]
    b.out.kernel[...] = a.out.kernel[...][q]
    pair = cb.ModelPair(a, b, example_input=x[:4])
    assert [n.fn for n in pair.table.nodes if n.op == "act"] == ["gelu", "silu"]
    state = cb.get_backend("jax").state(pair.models[0])
    assert state["fc1.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["fc1.weight"], np.asarray(a.fc1.kernel[...], np.float32).T)
    aligned = pair.align("weight").model_b.nnx()
    assert aligned.fc2.kernel[...].dtype == jnp.bfloat16
    for layer in ("fc1", "fc2", "out"):
        np.testing.assert_array_equal(np.asarray(getattr(aligned, layer).kernel[...], np.float32),
                                      np.asarray(getattr(a, layer).kernel[...], np.float32))
