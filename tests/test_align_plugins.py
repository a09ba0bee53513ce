"""Aligners by name: the built-ins recover planted permutations; a plugin's aligner is used like them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import combinability.align.builtin as builtin
from combinability import plugins
from combinability.align import AlignTask, align
from combinability.errors import ConfigurationError, PluginError, UnknownNameError
from combinability.hookspecs import Registration, hookimpl
from combinability.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    invert_permutation,
)

SPEC = PermutationSpec({
    "fc1.weight": ("P1", None), "fc1.bias": ("P1",),
    "fc2.weight": ("P2", "P1"), "fc2.bias": ("P2",),
    "fc3.weight": (None, "P2"), "fc3.bias": (None,),
})
SIZES = {"P1": 24, "P2": 16}


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset_plugins()
    yield
    plugins.reset_plugins()


def _mlp(seed: int) -> dict[str, np.ndarray]:
    """A 3-layer MLP 32 -> 24 -> 16 -> 10 with Gaussian weights (reference names and axes)."""
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.normal(size=(24, 32)), "fc1.bias": rng.normal(size=24),
            "fc2.weight": rng.normal(size=(16, 24)), "fc2.bias": rng.normal(size=16),
            "fc3.weight": rng.normal(size=(10, 16)), "fc3.bias": rng.normal(size=10)}


def _planted(seed: int = 1) -> Permutation:
    rng = np.random.default_rng(seed)
    return Permutation({p: rng.permutation(n).astype(np.int64) for p, n in SIZES.items()})


def _assert_recovers(found: Permutation, planted: Permutation) -> None:
    inverse = invert_permutation(planted)
    for p in SIZES:
        np.testing.assert_array_equal(found[p], inverse[p])
        np.testing.assert_array_equal(compose_permutations(planted, found)[p], np.arange(SIZES[p]))


def test_weight_aligner_recovers_a_planted_permutation():
    a = _mlp(0)
    planted = _planted()
    b = apply_permutation(SPEC, planted, a)  # B is A with its hidden units shuffled
    assert not np.array_equal(b["fc1.weight"], a["fc1.weight"])
    found = align("weight", AlignTask(SPEC, a, b, seed=3))
    assert found.method == "weight"
    _assert_recovers(found, planted)
    realigned = apply_permutation(SPEC, found, b)
    assert all(np.array_equal(realigned[n], a[n]) for n in a)
    assert plugins.get_aligner("weight") is builtin.weight


def test_weight_aligner_passes_its_options_and_ignores_unknown_ones():
    a, b = _mlp(0), _mlp(1)
    one = align("weight", AlignTask(SPEC, a, b), max_iter=1, examples=10)
    assert one.iterations == 1
    several = align("weight", AlignTask(SPEC, a, b), restarts=2)
    assert several.objective >= one.objective


def _features(planted: Permutation, noise: float = 0.05, n: int = 400):
    """Synthetic activations: "other"'s unit j is "reference"'s unit planted[P][j], plus a little noise."""
    rng = np.random.default_rng(7)
    points = {"P1": "layer1", "P2": "layer2"}
    ref = {points[p]: rng.normal(size=(n, size)) for p, size in SIZES.items()}
    other = {points[p]: ref[points[p]][:, planted[p]] + noise * rng.normal(size=(n, size))
             for p, size in SIZES.items()}
    calls = []

    def features(which, wanted):
        calls.append((which, tuple(wanted)))
        source = {"reference": ref, "other": other}[which]
        return {pt: source[pt] for pt in wanted}

    return points, features, calls


def test_activation_aligner_recovers_a_planted_permutation_from_features():
    planted = _planted(2)
    points, features, calls = _features(planted)
    a = _mlp(0)
    task = AlignTask(SPEC, a, apply_permutation(SPEC, planted, a), feature_points=points, features=features)
    found = align("activation", task)
    assert found.method == "activation"
    _assert_recovers(found, planted)
    assert sorted(calls) == [("other", ("layer1", "layer2")), ("reference", ("layer1", "layer2"))]


def test_activation_aligner_needs_data():
    a = _mlp(0)
    with pytest.raises(ConfigurationError, match="activation matching needs data: pass data=\\(x, y\\) or a dataset"):
        align("activation", AlignTask(SPEC, a, a))
    assert plugins.get_registration("aligners", "activation").needs == ("data",)


def test_identity_aligner():
    a = _mlp(0)
    found = align("identity", AlignTask(SPEC, a, _mlp(1)))
    assert found.method == "identity"
    assert {p: v.tolist() for p, v in found.items()} == {p: list(range(n)) for p, n in SIZES.items()}


def test_a_third_party_aligner_is_usable_by_name():
    seen = {}

    def reverse(task, *, flip=True, **_):
        seen["options"] = flip
        seen["seed"] = task.seed
        return Permutation({p: np.arange(n)[::-1].astype(np.int64) for p, n in task.sizes().items()})

    class Plugin:
        @hookimpl
        def combinability_register_aligners(self):
            return [Registration("reverse", reverse, "reverses every layer's units")]

    plugins.register_plugin(Plugin(), name="reverser")
    assert "reverse" in plugins.list_aligners()
    found = align("reverse", AlignTask(SPEC, _mlp(0), _mlp(1), seed=5), flip=False)
    assert found.method == "reverse"  # filled in with the aligner's name
    assert found["P1"].tolist() == list(range(24))[::-1]
    assert seen == {"options": False, "seed": 5}


@pytest.mark.parametrize(("result", "match"), [
    ({"P1": np.arange(24), "P2": np.arange(16)}, "'bad' returned dict, not a combinability.Permutation"),
    (None, "'bad' returned NoneType"),
    (Permutation({"P1": np.arange(24)}), "'bad' returned an invalid permutation"),
    (Permutation({"P1": np.zeros(24, np.int64), "P2": np.arange(16)}), "'bad' returned an invalid permutation"),
])
def test_an_aligner_returning_the_wrong_thing_is_a_plugin_error_naming_it(result, match):
    class Plugin:
        @hookimpl
        def combinability_register_aligners(self):
            return [Registration("bad", lambda task, **_: result)]

    plugins.register_plugin(Plugin(), name="bad-plugin")
    with pytest.raises(PluginError, match=match):
        align("bad", AlignTask(SPEC, _mlp(0), _mlp(1)))


def test_unknown_aligner_lists_the_installed_ones():
    with pytest.raises(UnknownNameError, match=r"installed aligners: activation, identity, .*weight"):
        align("nope", AlignTask(SPEC, _mlp(0), _mlp(1)))


def test_listing_aligners_imports_no_framework():
    code = ("import sys; from combinability.align import list_aligners; from combinability import plugins; "
            "names = list_aligners(); plugins.list_repairs(); plugins.list_metrics(); "
            "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules), "
            "'combinability.align.builtin' in sys.modules, {'activation', 'identity', 'weight'} <= set(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False True"
