"""Mixtures of experts held as separate flax modules (linen submodules, an NNX list), traced and aligned.

The experts are weighted densely by their top-2 gate values taken by number (``gates[:, e:e + 1]``), as jax
code without data-dependent shapes routes. References: planted permutations (experts reordered with the gate's
columns, units permuted inside each expert) and flax's own forward passes.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Blocks

jax = pytest.importorskip("jax")
jnp = jax.numpy
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

D, H, E, N_IN = 8, 6, 4, 10


def _gates(logits):
    """Top-2 softmax gate values scattered back to their experts (zero elsewhere)."""
    w, ids = jax.lax.top_k(jax.nn.softmax(logits), 2)
    return (jax.nn.one_hot(ids, E) * w[..., None]).sum(1)


class Expert(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(H, name="fc1")(x)))


class LinenMoe(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(D, name="inp")(x))
        gates = _gates(nn.Dense(E, name="gate")(h))
        out = jnp.zeros_like(h)
        for e in range(E):
            out = out + gates[:, e:e + 1] * Expert(name=f"experts_{e}")(h)
        return nn.Dense(3, name="out")(h + out)


class NnxExpert(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1, self.fc2 = nnx.Linear(D, H, rngs=rngs), nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class NnxMoe(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.inp, self.gate, self.out = nnx.Linear(N_IN, D, rngs=rngs), nnx.Linear(D, E, rngs=rngs), \
            nnx.Linear(D, 3, rngs=rngs)
        self.experts = nnx.List([NnxExpert(rngs) for _ in range(E)])

    def __call__(self, x):
        h = nnx.relu(self.inp(x))
        gates = _gates(self.gate(h))
        out = jnp.zeros_like(h)
        for e, expert in enumerate(self.experts):
            out = out + gates[:, e:e + 1] * expert(h)
        return self.out(h + out)


def _x(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, N_IN)).astype(np.float32)


def _planted(params: dict, experts: list[str], seed: int) -> dict:
    """``params`` (a nested dict) with its experts reordered, the gate's columns with them, units permuted inside."""
    rng = np.random.default_rng(seed)
    sigma = rng.permutation(E)
    out = jax.tree_util.tree_map(np.array, params)

    def node(tree, path):
        for key in path.split("/"):
            tree = tree[int(key) if key.isdigit() and key not in tree else key]  # an NNX list's entries by int
        return tree

    gate = node(out, "gate")
    gate["kernel"], gate["bias"] = gate["kernel"][:, sigma], gate["bias"][sigma]
    for e, s in enumerate(sigma):
        tau = rng.permutation(H)
        source, target = node(params, experts[s]), node(out, experts[e])
        target["fc1"]["kernel"] = np.asarray(source["fc1"]["kernel"])[:, tau]
        target["fc1"]["bias"] = np.asarray(source["fc1"]["bias"])[tau]
        target["fc2"]["kernel"] = np.asarray(source["fc2"]["kernel"])[tau]
        target["fc2"]["bias"] = np.asarray(source["fc2"]["bias"])
    return out


def test_linen_experts_move_with_the_gate_and_a_planted_permutation_is_undone():
    x = _x()
    module = LinenMoe()
    a = module.init(jax.random.PRNGKey(0), x)
    b = {"params": _planted(a["params"], [f"experts_{e}" for e in range(E)], seed=1)}
    np.testing.assert_allclose(module.apply(b, x), module.apply(a, x), rtol=1e-5, atol=1e-5)  # the same function
    pair = cb.ModelPair((module, a), (module, b), example_input=x).align("weight")
    spec = pair.spec
    assert spec.kind("P_experts_*/fc1") == Blocks("P_gate", E, H)
    assert spec.axes_to_perm["params/experts_*/fc2/bias"] == ("P_gate", "P_inp")
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
    other = module.init(jax.random.PRNGKey(2), x)
    aligned = cb.ModelPair((module, a), (module, other), example_input=x).align("weight").model_b
    np.testing.assert_allclose(np.asarray(aligned.module.apply(aligned.variables, x)),
                               np.asarray(module.apply(other, x)), rtol=1e-5, atol=1e-5)


def test_nnx_experts_in_a_list_move_with_the_gate():
    x = _x()
    a = NnxMoe(nnx.Rngs(0))
    b = NnxMoe(nnx.Rngs(1))
    nnx.update(b, _planted(nnx.state(a).to_pure_dict(), [f"experts/{e}" for e in range(E)], seed=3))
    np.testing.assert_allclose(np.asarray(b(x)), np.asarray(a(x)), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=x).align("weight")
    assert pair.spec.kind("P_experts/*/fc1") == Blocks("P_gate", E, H)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
    other = NnxMoe(nnx.Rngs(4))
    aligned = cb.ModelPair(a, other, example_input=x).align("weight").model_b.nnx()
    np.testing.assert_allclose(np.asarray(aligned(x)), np.asarray(other(x)), rtol=1e-5, atol=1e-5)
