"""Tied weights in flax: an embedding read back as the output layer (``nn.Embed.attend``, GPT-2's tie).

Flax holds the tied tensor once, under the embedding's name; both uses bind it. References:
the module's own ``apply`` on transformed and on averaged variables, and a numpy cross-entropy.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Orthogonal
from tests.model_checks import flax_variables

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
traverse = pytest.importorskip("flax.traverse_util")

VOCAB, D, T = 11, 8, 6


class TinyGPT(nn.Module):
    """One pre-norm MLP block on a token embedding; the head is the embedding (``tied``) or a Dense."""

    tied: bool = True

    @nn.compact
    def __call__(self, idx):
        wte = nn.Embed(VOCAB, D, name="wte")
        x = wte(idx)
        x = x + nn.Dense(D, name="proj")(nn.gelu(nn.Dense(4 * D, name="fc")(nn.RMSNorm(name="ln_1")(x))))
        x = nn.RMSNorm(name="ln_f")(x)
        return wte.attend(x) if self.tied else nn.Dense(VOCAB, use_bias=False, name="head")(x)


IDX = np.random.default_rng(0).integers(0, VOCAB, (4, T)).astype(np.int32)


def _variables(net, seed):
    return flax_variables(net, IDX, seed)


def test_the_tied_embedding_binds_one_tensor_and_keeps_the_stream_a_permutation():
    untied = TinyGPT(tied=False)
    spec, folds = cb.derive_symmetries((untied, _variables(untied, 0)), IDX)
    stream = spec.axes_to_perm["params/wte/embedding"][1]
    assert isinstance(spec.kind(stream), Orthogonal) and folds  # ln_f folds into the untied head

    net = TinyGPT()
    variables = _variables(net, 0)
    spec, folds = cb.derive_symmetries((net, variables), IDX)
    stream = spec.axes_to_perm["params/wte/embedding"][1]
    assert spec.axes_to_perm["params/wte/embedding"][0] is None  # the vocabulary reaches the output
    assert spec.axes_to_perm["params/fc/kernel"][0] == stream
    assert not isinstance(spec.kind(stream), Orthogonal) and folds == []  # a fold would change the embedding
    flat = {k: np.asarray(v, np.float64) for k, v in traverse.flatten_dict(variables, sep="/").items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, flat, seed=3), flat)
    assert not np.allclose(moved["params/wte/embedding"], flat["params/wte/embedding"])
    np.testing.assert_allclose(np.asarray(net.apply(traverse.unflatten_dict(moved, sep="/"), IDX)),
                               np.asarray(net.apply(variables, IDX)), rtol=1e-4, atol=1e-5)


def test_a_tied_pair_sweeps_as_the_module_computes_it():
    net = TinyGPT()
    va, vb = _variables(net, 1), _variables(net, 2)
    targets = np.random.default_rng(1).integers(0, VOCAB, (4, T))
    pair = cb.ModelPair((net, va), (net, vb), example_input=IDX)
    ds = cb.sweep(pair, cb.Linear(), data=(IDX, targets), values=[0.3], splits=["test"])
    mid = jax.tree_util.tree_map(lambda a, b: 0.7 * a + 0.3 * b, va, vb)
    logits = np.asarray(net.apply(mid, IDX), np.float64).reshape(-1, VOCAB)
    logits -= logits.max(1, keepdims=True)
    want = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(logits)), targets.ravel()])
    assert float(ds["loss"].sel(split="test", lam=0.3).isel(sample=0)) == pytest.approx(want, rel=1e-5)
