"""Networks with fewer symmetries (issue 13 item 4; Lim et al., 2024): W- and σ-Asymmetric layers.

Every check is against an independent reference: the numpy forward pass and the frozen-value
recipe of ``tests/reference_nets.py``, permutations applied by hand, the standard network.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, UnknownNameError
from combinability.layers import LayerTable, Node
from combinability.layout import FlatLayout
from combinability.models import build_model, load_model, save_model
from combinability.plugins import get_backend
from combinability.testing import check_architecture, perturbed_state, random_inputs
from combinability.training import TrainRecipe
from combinability.zoo import mlp_table
from tests.reference_nets import frozen_entries, zoo_forward

ASYM = ("mlp_wasym", "mlp_sigmaasym", "tiny10_wasym", "tiny10_sigmaasym")
SHAPES = {"mlp": (1, 6, 6), "tiny10": (1, 10, 10)}


def _shape(arch: str) -> tuple[int, ...]:
    return SHAPES[arch.split("_")[0]]


def _logits(backend: str, model, x: np.ndarray) -> np.ndarray:
    be = get_backend(backend)
    state = {k: v for k, v in be.state(model).items() if v.dtype.kind == "f"}
    layout = FlatLayout.from_arrays(state)
    prepared = be.prepare(model, layout)
    out = prepared.forward(be.asarray(layout.flatten(state)[None]), be.asarray(x.astype(np.float32)))
    return be.to_numpy(out)[0]


def _hidden_shuffle(state: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The MLP's 3 hidden layers' units shuffled by hand: rows of layers.i, columns of layers.i+1."""
    out = dict(state)
    for i in range(3):
        p = rng.permutation(len(state[f"layers.{i}.bias"]))
        out[f"layers.{i}.weight"] = out[f"layers.{i}.weight"][p]
        out[f"layers.{i}.bias"] = out[f"layers.{i}.bias"][p]
        out[f"layers.{i + 1}.weight"] = out[f"layers.{i + 1}.weight"][:, p]
    return out


# -- the forward pass: both backends against the numpy reference -----------------------------------
@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("architecture", ASYM)
def test_backends_match_the_numpy_reference(backend, architecture):
    check_architecture(architecture, backend, width=0.25, num_classes=5, input_shape=_shape(architecture),
                       reference=lambda params, x: zoo_forward(architecture, params, x))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_stored_entries_under_the_mask_are_not_used(backend):
    """Perturbing the stored weight under the mask leaves the logits; perturbing one entry off it does not."""
    shape = _shape("mlp")
    model = build_model("mlp_wasym", backend=backend, width=0.25, num_classes=5, input_shape=shape, seed=1)
    be = get_backend(backend)
    state = be.state(model)
    mask, _ = frozen_entries("layers.1", state["layers.1.weight"].shape, 1 / 8)
    x = random_inputs(shape, 5, n=8).x
    base = _logits(backend, model, x)
    under = dict(state, **{"layers.1.weight": state["layers.1.weight"] + 5.0 * mask})
    off = dict(state, **{"layers.1.weight": state["layers.1.weight"] + 5.0 * (~mask & (np.cumsum(~mask) == 1)
                                                                             .reshape(mask.shape))})
    np.testing.assert_allclose(_logits(backend, be.with_state(model, under), x), base, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_logits(backend, be.with_state(model, off), x), base, atol=1e-3)


# -- the symmetry is broken, and the spec says so --------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("architecture", ["mlp_wasym", "mlp_sigmaasym"])
def test_asymmetric_mlp_is_not_invariant_under_hidden_permutations(backend, architecture):
    """f(π(θ)) = f(θ) for the standard MLP, ≠ for its asymmetric variants (same θ, same π)."""
    shape, rng = _shape("mlp"), np.random.default_rng(3)
    be = get_backend(backend)
    x = random_inputs(shape, 5, n=16).x
    for arch, invariant in (("mlp", True), (architecture, False)):
        model = build_model(arch, backend=backend, width=0.25, num_classes=5, input_shape=shape, seed=0)
        state = perturbed_state(be.state(model), 0)
        model = be.with_state(model, state)
        permuted = be.with_state(model, _hidden_shuffle(state, np.random.default_rng(rng.integers(2**31))))
        same = np.allclose(_logits(backend, permuted, x), _logits(backend, model, x), rtol=1e-4, atol=1e-4)
        assert same is invariant, arch


def test_spec_drops_exactly_the_permutations_an_asymmetric_node_breaks():
    def table(**nodes):
        layers = [Node("l0", "dense", units=4, **nodes.get("l0", {})), Node("a0", "relu"),
                  Node("l1", "dense", units=4, **nodes.get("l1", {})), nodes.get("a1", Node("a1", "relu")),
                  Node("l2", "dense", units=4), Node("a2", "relu"), Node("l3", "dense", units=2)]
        return LayerTable("t", (5,), 2, tuple(layers))

    assert table().spec().perm_names == ("P_l0", "P_l1", "P_l2")
    # frozen entries in l1's rows break its units' permutation, in its columns l0's; l2's units still move
    assert table(l1={"fixed": 1}).spec().perm_names == ("P_l2",)
    assert table(l1={"fixed": 1}).spec().axes_to_perm["l2.weight"] == ("P_l2", None)
    # a gate on l1's output only breaks that space
    assert table(a1=Node("a1", "gate")).spec().perm_names == ("P_l0", "P_l2")
    assert table(a1=Node("a1", "gate")).activation_points() == {"P_l0": "a0", "P_l2": "a2"}
    assert table(l0={"fixed": 2}).spec().perm_names == ("P_l1", "P_l2")


def test_align_of_an_asymmetric_pair_is_the_identity():
    shape = _shape("mlp")
    a, b = (build_model("mlp_wasym", width=0.25, num_classes=5, input_shape=shape, seed=s) for s in (0, 1))
    pair = cb.ModelPair(a, b, architecture="mlp_wasym", backend="torch").align("weight", seed=0)
    assert dict(pair.permutation) == {}
    np.testing.assert_array_equal(pair.theta_b, pair.naive.theta_b)


# -- frozen arrays: deterministic, shared, fixed through training -------------------------------------
def test_frozen_arrays_follow_the_documented_recipe_and_the_seed():
    t = mlp_table(width=0.25, num_classes=5, input_shape=(36,), asymmetry="w")
    frozen = t.frozen_weights()
    for name in ("layers.0", "layers.1", "layers.2", "layers.3"):
        shape = t.parameters()[f"{name}.weight"][0]
        mask, values = frozen_entries(name, shape, 1 / 2 if name == "layers.3" else 1 / 8)
        np.testing.assert_array_equal(frozen[f"{name}.weight"][0], mask)
        np.testing.assert_allclose(frozen[f"{name}.weight"][1], values, rtol=1e-6)
    other = mlp_table(width=0.25, num_classes=5, input_shape=(36,), asymmetry="w", asymmetry_seed=1).frozen_weights()
    assert not np.array_equal(other["layers.0.weight"][0], frozen["layers.0.weight"][0])
    sig = mlp_table(width=0.25, num_classes=5, input_shape=(36,), asymmetry="sigma")
    g = np.random.default_rng([0, __import__("zlib").crc32(b"hidden_1")]).standard_normal((128, 128))
    np.testing.assert_allclose(sig.gate_matrix("hidden_1"), g, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_training_keeps_the_frozen_entries_fixed(backend):
    """SGD with weight decay for some steps: the entries under the mask stay the recipe's values, the rest move."""
    recipe = TrainRecipe(epochs=1, lr=0.05, weight_decay=0.05, batch_size=200, optimizer="sgd")
    be = get_backend(backend)
    init = be.state(build_model("mlp_wasym", backend=backend, width=1 / 16, input_shape=(1, 8, 8), seed=0))
    trained = be.state(cb.train("mlp_wasym", "digits", backend=backend, seed=0, width=1 / 16, recipe=recipe))
    for i in range(4):
        name = f"layers.{i}.weight"
        mask, values = frozen_entries(f"layers.{i}", trained[name].shape, 1 / 2 if i == 3 else 1 / 8)
        np.testing.assert_allclose(trained[name][mask], values[mask], rtol=1e-6)
        assert np.mean(trained[name][~mask] != init[name][~mask]) > 0.9


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("architecture", "backend", "into"), [("mlp_wasym", "torch", "jax"),
                                                               ("tiny10_sigmaasym", "jax", "torch"),
                                                               ("tiny10_wasym", "torch", "torch")])
def test_checkpoint_round_trip_gives_the_same_logits(tmp_path, architecture, backend, into):
    shape = _shape(architecture)
    be = get_backend(backend)
    model = build_model(architecture, backend=backend, width=0.25, num_classes=5, input_shape=shape, seed=2)
    model = be.with_state(model, perturbed_state(be.state(model), 2))
    x = random_inputs(shape, 5, n=6).x
    save_model(model, tmp_path / "m.ckpt", backend=backend)
    loaded = load_model(tmp_path / "m.ckpt", backend=into)
    state = {k: v.astype(np.float64) for k, v in get_backend(into).state(loaded).items()}
    want = zoo_forward(architecture, state, x.astype(np.float64))
    np.testing.assert_allclose(_logits(into, loaded, x), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_logits(backend, model, x), want, rtol=1e-4, atol=1e-4)


# -- bad input -------------------------------------------------------------------------------------
def test_bad_asymmetry_settings_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigurationError, match="need a dense or conv node"):
        Node("a", "relu", fixed=2)
    with pytest.raises(ConfigurationError, match="fixed must be an int >= 0"):
        Node("d", "dense", units=2, fixed=-1)
    with pytest.raises(ConfigurationError, match="finite scale >= 0"):
        Node("g", "gate", scale=float("nan"))
    with pytest.raises(ConfigurationError, match=r"exceed the fan-in of 3; valid: 0 to 3"):
        LayerTable("t", (3,), 2, (Node("d", "dense", units=2, fixed=4),))
    with pytest.raises(ConfigurationError, match=r"unknown asymmetry 'x'; valid: 'none', 'w', 'sigma'"):
        mlp_table(asymmetry="x")
    with pytest.raises(ConfigurationError, match=r"'hidden_0' is not a gate node; gate nodes: \[\]"):
        mlp_table().gate_matrix("hidden_0")
    assert issubclass(ConfigurationError, ValueError)


def test_experiment_refuses_bad_settings_before_training():
    from combinability.experiments import asymmetry_comparison

    with pytest.raises(ConfigurationError, match="two different training seeds"):
        asymmetry_comparison("digits", seeds=(0, 0))
    with pytest.raises(ConfigurationError, match=r"in \[0, 1\]"):
        asymmetry_comparison("digits", values=[0, 1.5])
    with pytest.raises(ConfigurationError, match="distinct"):
        asymmetry_comparison("digits", architectures=["mlp", "mlp"])
    with pytest.raises(UnknownNameError):
        asymmetry_comparison("digits", architectures=["mlp", "no_such_net"])


# -- the experiment and its figure ---------------------------------------------------------------------
def test_asymmetry_comparison_and_its_figure(tmp_path):
    from combinability.experiments import asymmetry_comparison
    from combinability.plots import plot_asymmetry

    ds = asymmetry_comparison("digits", architectures=("mlp", "mlp_wasym"), epochs=1, width=1 / 16,
                              values=[0, 0.5, 1], splits=["test"], out=tmp_path / "asym.nc")
    assert ds["permutable_units"].sel(architecture="mlp") == 3 * 32
    assert ds["permutable_units"].sel(architecture="mlp_wasym") == 0
    assert ds["moved_units"].sel(architecture="mlp_wasym") == 0
    w = ds.sel(architecture="mlp_wasym", split="test")
    np.testing.assert_array_equal(w["loss"].sel(alignment="naive"), w["loss"].sel(alignment="aligned"))
    # the path's ends are the end models; the barrier is the worst point against their mean
    m = ds.sel(architecture="mlp", split="test", alignment="naive")
    assert float(m["loss"].sel(lam=0.0)) == pytest.approx(float(m["loss_a"]))
    assert float(m["loss_barrier"]) == pytest.approx(float(m["loss"].max()) - (float(m["loss_a"])
                                                                               + float(m["loss_b"])) / 2)
    again = cb.open_results(tmp_path / "asym.nc")
    np.testing.assert_allclose(again["loss_barrier"].values, ds["loss_barrier"].values)
    fig = plot_asymmetry(again, tmp_path / "asym.png")
    assert (tmp_path / "asym.png").stat().st_size > 0 and len(fig.axes) == 3
    gids = {line.get_gid() for line in fig.axes[0].get_lines()}
    assert gids == {"mlp|naive", "mlp|aligned", "mlp_wasym|naive", "mlp_wasym|aligned"}
