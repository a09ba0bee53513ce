"""Checks shared by the tests of traced user models and layer tables (helpers, not tests)."""

from __future__ import annotations

from typing import Any

import numpy as np

import combinability as cb
from combinability.layers import LayerTable
from combinability.layout import FlatLayout


def table_logits(backend: str, table: LayerTable, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of ``params`` on ``x`` through ``backend``'s model of ``table`` (its own forward pass)."""
    be = cb.get_backend(backend)
    model = be.build(table, seed=0)
    state = {k: v for k, v in be.state(model).items() if v.dtype.kind == "f"}
    assert {k: v.shape for k, v in state.items()} == {k: np.shape(v) for k, v in params.items()}
    layout = FlatLayout.from_arrays(state)
    out = be.prepare(model, layout).forward(be.asarray(layout.flatten(params)[None]), be.asarray(x))
    return be.to_numpy(out)[0]


def flax_planted_permutation(net: Any, variables: Any, x: np.ndarray, seed: int = 4) -> tuple[Any, Any]:
    """``variables`` moved by a random permutation of the derived spec, checked to compute the same
    function by ``module.apply``, and the pair ``(variables, moved)`` aligned by weight matching,
    checked to be undone exactly. Returns the aligned pair and the function's output on ``x``."""
    from flax import traverse_util as traverse

    table = cb.derive.describe((net, variables), x)
    spec = table.spec()
    state = table.from_flax(traverse.flatten_dict(variables, sep="/"))
    perm = cb.random_permutation(spec, state, seed=seed)
    moved = traverse.unflatten_dict(table.to_flax(cb.apply_permutation(spec, perm, state)), sep="/")
    direct = np.asarray(net.apply(variables, x))
    np.testing.assert_allclose(np.asarray(net.apply(moved, x)), direct, rtol=1e-4, atol=1e-5)
    pair = cb.ModelPair((net, variables), (net, moved), example_input=x).align("weight", seed=0)
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)
    return pair, direct


def randomised(model: Any, seed: int) -> Any:
    """``model`` (torch) with every parameter redrawn from ``seed``, in eval mode: matrices N(0, 0.3²),
    vectors N(0, 0.5²), and the scales of norms (names with ``ln`` or ``norm``) around 1, so that no
    two units are alike and a transformation that should keep the function is put to the test."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_scale = ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if norm_scale else 0))
    return model.eval()


def randomise_batchnorms(model: Any) -> Any:
    """``model`` (torch) with every BatchNorm's statistics and affine parameters drawn away from the
    identity (running mean U(-0.5, 0.5), variance U(0.5, 2), weight U(0.5, 1.5), bias U(-0.2, 0.2)),
    so that permuting them matters; in eval mode."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def flax_variables(net: Any, x: Any, seed: int) -> Any:
    """``net.init`` on ``x`` with every leaf moved by N(0, 0.3²) noise (flax's zero biases and unit
    scales would make units alike)."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(net.init(jax.random.PRNGKey(seed), x))
    keys = jax.random.split(jax.random.PRNGKey(100 + seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                               for a, k in zip(leaves, keys, strict=True)])


def float64_outputs(model: Any, state: dict[str, np.ndarray], x: Any) -> np.ndarray:
    """``model`` (torch) run in float64 with ``state`` loaded: every name of its state but the aliases of
    tied tensors (which the state lists once), and nothing else."""
    import copy

    import torch
    from combinability_torch.trace import tensor_aliases

    m = copy.deepcopy(model).double()
    missing, unexpected = m.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= set(tensor_aliases(m)), (missing, unexpected)
    x = torch.as_tensor(x)
    with torch.no_grad():
        return m(x.double() if x.is_floating_point() else x).numpy()


def assert_random_transformation_undone(model: Any, spec: Any, state: dict[str, np.ndarray], x: Any, moved: str,
                                        seed: int = 2, outputs: Any = None) -> None:
    """A random transformation of ``spec`` (seeded) changes parameter ``moved`` of ``state`` (float64), keeps
    ``model``'s outputs on ``x`` (``outputs(model, state, x)``, default :func:`float64_outputs`) to 1e-9, and
    weight matching with two restarts brings every parameter back to 1e-9."""
    outputs = float64_outputs if outputs is None else outputs
    moved_state = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=seed), state)
    assert not np.allclose(moved_state[moved], state[moved])
    np.testing.assert_allclose(outputs(model, moved_state, x), outputs(model, state, x), atol=1e-9)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, state, moved_state, seed=0, restarts=2), moved_state)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-9


def language_pair_sweep_ends_match_torch(models: list[Any], example: Any, vocab: int, seq: int, seed: int = 3) -> None:
    """Two torch language models aligned by weight matching and swept along the linear path: the
    losses at both ends equal torch's cross-entropy of each model's own logits on random tokens."""
    import pytest
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    tokens, targets = (torch.randint(0, vocab, (4, seq), generator=g) for _ in range(2))
    pair = cb.ModelPair(*models, example_input=example).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(tokens.numpy(), targets.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(tokens).reshape(-1, vocab), targets.reshape(-1)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def assert_planted_permutation_undone(a: Any, b: Any, x: Any, data: tuple, method: str) -> None:
    """``b`` (torch: ``a`` with its units permuted by hand) computes ``a``'s function on ``x``, differs from
    it, and ``method`` ("weight", or "activation" on ``data``) aligns it back to ``a`` exactly."""
    import torch

    with torch.no_grad():
        np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    pair = cb.ModelPair(a, b, example_input=x)
    aligned = pair.align(method, **({"data": data} if method == "activation" else {}))
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def tapped_features(model: Any, other: Any, x: Any, point: str, batch_size: int = 2) -> np.ndarray:
    """The features of ``model`` (torch) at ``point`` on ``x``, as the library reads them
    (``(examples x positions, units)``), through a pair with ``other``."""
    pair = cb.ModelPair(model, other, example_input=x)
    evaluator = cb.Evaluator(cb.get_backend(pair.backend), pair.model(0), pair.layout, batch_size=batch_size)
    data = cb.ArrayDataset(x=x.numpy(), y=np.zeros(len(x), np.int64), num_classes=2, name="probe", split="test")
    return evaluator.features(pair.theta_a, data, [point])[point]


def agreement_by_hand(pred: Any, pred_a: Any, pred_b: Any, labels: Any) -> dict[str, int]:
    """The §6.1 agreement categories counted one example at a time, in plain Python."""
    from combinability.metrics import AGREEMENT_CATEGORIES

    counts = dict.fromkeys(AGREEMENT_CATEGORIES, 0)
    for p, pa, pb, y in zip(pred, pred_a, pred_b, labels, strict=True):
        if p == pa and p == pb:
            group = "both"
        elif p == pa:
            group = "a_only"
        elif p == pb:
            group = "b_only"
        else:
            group = "neither"
        counts[f"{group}_{'correct' if p == y else 'wrong'}"] += 1
    return counts


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ``(n, 8, 8)`` float32 images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
