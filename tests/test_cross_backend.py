"""The torch and the JAX/Flax implementations of every reference architecture are one network.

The same reference (torch-named) weights loaded into both give the same logits; the
two permutation specs describe the same symmetry; and weight matching finds the same
permutation whichever backend's names and axes it runs on.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("combinability_torch.backend")
pytest.importorskip("combinability_jax.backend")

from combinability_jax.backend import JaxBackend  # noqa: E402
from combinability_torch.backend import TorchBackend  # noqa: E402

from combinability.matching import weight_matching  # noqa: E402
from combinability.permutation import apply_permutation, random_permutation  # noqa: E402
from combinability.testing import perturbed_state  # noqa: E402
from combinability.zoo import REFERENCE_ARCHITECTURES  # noqa: E402

ARCH = {a.name: a for a in REFERENCE_ARCHITECTURES}
#: Two input channels, so that a mix-up of channel and spatial axes cannot hide.
SHAPE = (2, 8, 8)
WIDTHS = {"mlp": 1 / 32, "tiny10": 0.25, "resnet20": 0.25, "vgg16": 0.125}


@pytest.fixture(scope="module")
def backends() -> tuple[TorchBackend, JaxBackend]:
    return TorchBackend("cpu"), JaxBackend()


def config(name: str) -> dict:
    return {"width": WIDTHS[name], "num_classes": 10, "input_shape": SHAPE}


def reference_weights(tb: TorchBackend, name: str, seed: int) -> dict[str, np.ndarray]:
    """A torch model's state, with noise so that no LayerNorm scale is a constant one."""
    return perturbed_state(tb.state(tb.build(ARCH[name], seed=seed, **config(name))), seed)


@pytest.mark.parametrize("name", list(WIDTHS))
def test_same_reference_weights_give_the_same_function(backends, name):
    tb, jb = backends
    cfg = config(name)
    jimpl = ARCH[name].implementation("jax")
    ref = reference_weights(tb, name, seed=0)
    tmodel = tb.with_state(tb.build(ARCH[name], seed=0, **cfg), ref)
    jparams = jimpl.from_reference(ref)
    jmodel = jb.with_state(jb.build(ARCH[name], seed=0, **cfg), jparams)

    back = jimpl.to_reference(jparams)
    assert list(back) == list(ref) and all(np.array_equal(back[k], ref[k]) for k in ref)  # bitwise, same order

    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        torch_logits = tmodel.eval()(torch.from_numpy(x)).numpy()
    jax_logits = jb.logits(jmodel, x)
    assert np.abs(torch_logits).max() > 0.1
    np.testing.assert_allclose(jax_logits, torch_logits, atol=1e-4 * max(1.0, np.abs(torch_logits).max()))


@pytest.mark.parametrize("name", list(WIDTHS))
def test_specs_layers_and_points_describe_the_same_network(backends, name):
    tb, _ = backends
    cfg = config(name)
    timpl, jimpl = ARCH[name].implementation("torch"), ARCH[name].implementation("jax")
    tspec, jspec = timpl.spec(**cfg), jimpl.spec(**cfg)
    assert tspec.perm_names == jspec.perm_names  # same names, same order (weight matching's sweeps)
    assert set(timpl.activation_points(**cfg)) == set(jimpl.activation_points(**cfg))
    assert timpl.layer_names(**cfg) == jimpl.layer_names(**cfg)

    ref = reference_weights(tb, name, seed=0)
    jparams = jimpl.from_reference(ref)
    perm = random_permutation(tspec, ref, seed=2)
    via_torch = apply_permutation(tspec, perm, ref)
    via_jax = jimpl.to_reference(apply_permutation(jspec, perm, jparams))
    assert all(np.array_equal(via_torch[k], via_jax[k]) for k in ref)
    assert not all(np.array_equal(via_torch[k], ref[k]) for k in ref)

    jlayers = jimpl.layers(**cfg)
    tlayers = timpl.layers(**cfg)
    index_of = {k: jlayers[j] for k, j in zip(jimpl.to_reference(jparams), jparams, strict=True)}
    assert index_of == tlayers


@pytest.mark.parametrize("name", list(WIDTHS))
def test_weight_matching_finds_the_same_permutation_on_both_conventions(backends, name):
    tb, jb = backends
    cfg = config(name)
    timpl, jimpl = ARCH[name].implementation("torch"), ARCH[name].implementation("jax")
    tspec, jspec = timpl.spec(**cfg), jimpl.spec(**cfg)

    ref_a, ref_b = reference_weights(tb, name, 0), reference_weights(tb, name, 1)
    on_torch = weight_matching(tspec, ref_a, ref_b, seed=0)
    on_jax = weight_matching(jspec, jimpl.from_reference(ref_a), jimpl.from_reference(ref_b), seed=0)
    assert set(on_torch) == set(jspec.perm_names)
    assert all(np.array_equal(on_torch[p], on_jax[p]) for p in on_torch)
    assert any(not np.array_equal(v, np.arange(len(v))) for v in on_torch.values())

    ja = perturbed_state(jb.state(jb.build(ARCH[name], seed=0, **cfg)), 0)
    jb_ = perturbed_state(jb.state(jb.build(ARCH[name], seed=1, **cfg)), 1)
    native = weight_matching(jspec, ja, jb_, seed=0)
    converted = weight_matching(tspec, jimpl.to_reference(ja), jimpl.to_reference(jb_), seed=0)
    assert all(np.array_equal(native[p], converted[p]) for p in native)
