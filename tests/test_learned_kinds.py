"""Learned aligners and many-model alignment on transformer specs: heads, FFN neurons, an orthogonal stream.

The references are independent of the library's evaluation: torch's own forward pass and
cross-entropy of ``TinyViT`` (fresh modules loaded with the weights), and planted random
transformations of every kind (head permutations, FFN permutations, orthogonal maps of the
residual stream) that an aligner must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from combinability_torch.transformers import TinyViT  # noqa: E402

import combinability as cb  # noqa: E402
from combinability import plugins  # noqa: E402
from combinability.align import AlignTask, align  # noqa: E402
from combinability.align.builtin import weight as weight_aligner  # noqa: E402
from combinability.align.many import pairwise_permutation  # noqa: E402
from combinability.errors import PluginError  # noqa: E402
from combinability.hookspecs import Registration, hookimpl  # noqa: E402
from combinability.kinds import Orthogonal, random_orthogonal  # noqa: E402
from combinability.permutation import check_permutation, compose_permutations  # noqa: E402
from combinability.plugins import SYMMETRY_KINDS, AlignerRegistration  # noqa: E402


def _vit(depth: int = 1) -> TinyViT:
    return TinyViT(image_size=8, patch_size=4, d_model=16, heads=4, depth=depth, mlp=24, num_classes=10)


def _load(params, depth: int = 1) -> TinyViT:
    """A fresh TinyViT holding ``params`` (a plain torch module: the forward pass is torch's own)."""
    model = _vit(depth)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in params.items()})
    return model.eval()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def digits():
    """The digits training split as tensors, and a 300-example subset as numpy arrays."""
    train = cb.load_dataset("digits", "train")
    x, y = np.asarray(train.x, np.float32), np.asarray(train.y, np.int64)
    idx = np.random.default_rng(0).permutation(len(x))[:300]
    return torch.as_tensor(x), torch.as_tensor(y), (x[idx], y[idx])


@pytest.fixture(scope="module")
def vits(digits):
    """Two TinyViTs trained briefly on digits (seeds 0 and 1): distinct basins, better than chance."""
    x, y, _ = digits
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _vit()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for idx in order.split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        models.append(model.eval())
    return models


@pytest.fixture(scope="module")
def vit_pair(vits, digits):
    return cb.ModelPair(*vits, example_input=digits[0][:8])


def _midpoint_loss(pair, x, y) -> float:
    """Cross-entropy of ``(θ_A + θ_B) / 2`` of an aligned pair, by torch's own forward pass."""
    a, b = pair.params(0), pair.params(1)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(_load({k: (a[k] + b[k]) / 2 for k in a})(x), y))


# -- STE --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetries", ["all", "permutation"])
def test_ste_on_a_transformer_keeps_b_and_is_no_worse_than_its_weight_matching_start(vits, vit_pair, digits,
                                                                                       symmetries):
    _, _, (x, y) = digits
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    weight = vit_pair.align("weight", seed=0, symmetries=symmetries)
    ste = vit_pair.align("ste", data=(x, y), epochs=2, seed=0, lr=3e-3, symmetries=symmetries,
                         eval_examples=len(x))
    perm = ste.permutation
    assert perm.method == "ste" and len(perm.history) == 3
    check_permutation(perm, ste.spec.perm_sizes(ste.params(0)), ste.spec)
    matrices = [p for p, v in perm.items() if np.ndim(v) == 2]
    assert [isinstance(ste.spec.kind(p), Orthogonal) for p in matrices] == [True] * len(matrices)
    assert bool(matrices) == (symmetries == "all")  # the stream is rotated, or permuted
    with torch.no_grad():  # T(B) computes B's function; A (norms folded or not) computes A's
        np.testing.assert_allclose(_load(ste.params(1))(xt).numpy(), vits[1](xt).numpy(), atol=1e-4)
        np.testing.assert_allclose(_load(ste.params(0))(xt).numpy(), vits[0](xt).numpy(), atol=1e-4)
    start, learned = _midpoint_loss(weight, xt, yt), _midpoint_loss(ste, xt, yt)
    assert perm.history[0] == pytest.approx(start, rel=1e-4)  # it started from weight matching's alignment
    assert perm.objective == pytest.approx(learned, rel=1e-4)
    assert learned <= start + 1e-6, (learned, start)  # and kept its best


def test_ste_from_the_identity_starts_at_the_naive_midpoint_with_an_identity_stream_map(vit_pair, digits):
    _, _, (x, y) = digits
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    ste = vit_pair.align("ste", data=(x, y), epochs=1, seed=0, init="identity", eval_examples=len(x))
    naive = vit_pair.align("identity")  # the norms folded, nothing moved
    assert any(np.ndim(v) == 2 for v in naive.permutation.values())
    assert ste.permutation.history[0] == pytest.approx(_midpoint_loss(naive, xt, yt), rel=1e-4)
    check_permutation(ste.permutation, ste.spec.perm_sizes(ste.params(0)), ste.spec)


def test_an_ste_state_file_round_trips_orthogonal_maps(vit_pair, digits, tmp_path):
    _, _, (x, y) = digits
    options = dict(data=(x, y), seed=0, lr=3e-3, eval_examples=len(x), batch_size=100)
    whole = vit_pair.align("ste", epochs=2, **options)
    state = tmp_path / "ste.npz"
    vit_pair.align("ste", epochs=1, state=state, **options)
    stream = next(p for p, k in vit_pair.spec.kinds.items() if isinstance(k, Orthogonal))
    n = vit_pair.spec.perm_sizes(vit_pair.params(0))[stream]
    with np.load(state) as saved:
        assert saved["position"].tolist() == [1, 0]
        for key in (f"best/{stream}", f"learner/perm/{stream}"):
            q = saved[key]
            assert q.dtype == np.float64 and q.shape == (n, n)
            np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-9)
            np.testing.assert_allclose(q @ np.ones(n), np.ones(n), atol=1e-9)  # a LayerNorm stream
    resumed = vit_pair.align("ste", epochs=2, state=state, **options)
    assert resumed.permutation.history == pytest.approx(whole.permutation.history, rel=1e-6)
    for p, value in whole.permutation.items():
        np.testing.assert_allclose(resumed.permutation[p], value, atol=1e-9)
        assert resumed.permutation[p].dtype == value.dtype


# -- aligners that cannot apply -----------------------------------------------------------------------
@pytest.mark.parametrize("symmetries", ["all", "permutation"])
def test_sinkhorn_refuses_heads_and_streams_before_any_work(vit_pair, symmetries):
    with pytest.raises(cb.ConfigurationError) as info:  # no data given: the kinds are checked first
        vit_pair.align("sinkhorn", symmetries=symmetries)
    message = str(info.value)
    assert "aligner 'sinkhorn'" in message and "Blocks" in message and "packed axes" in message
    assert ("Orthogonal" in message) == (symmetries == "all")
    # the learned maps have work only where there is a rotation to learn
    assert ("use 'maps', 'ste' or 'weight' instead" if symmetries == "all" else "use 'ste' or 'weight' instead") \
        in message
    assert "symmetries='permutation'" not in message  # the heads remain: it would not help


@pytest.mark.parametrize("symmetries", ["all", "permutation"])
def test_activation_matching_of_heads_and_streams_asks_for_data_first(vit_pair, symmetries):
    with pytest.raises(cb.ConfigurationError, match="activation matching needs data"):
        vit_pair.align("activation", symmetries=symmetries)


@pytest.fixture
def fresh_plugins():
    plugins.reset_plugins()
    yield
    plugins.reset_plugins()


def _stream_task():
    """A two-layer net whose hidden neurons permute and whose input stream rotates; B is A transformed."""
    spec = cb.PermutationSpec({"w1": ("P", "R"), "w2": (None, "P"), "x": ("R",)}, kinds={"R": Orthogonal()})
    rng = np.random.default_rng(0)
    a = {"w1": rng.normal(size=(6, 5)), "w2": rng.normal(size=(3, 6)), "x": rng.normal(size=5)}
    planted = {"P": rng.permutation(6).astype(np.int64), "R": random_orthogonal(5, rng)}
    return spec, a, cb.apply_permutation(spec, planted, a)


def test_a_plugin_aligner_declares_the_kinds_it_handles(fresh_plugins):
    class Plugin:
        @hookimpl
        def combinability_register_aligners(self):
            return [Registration("undeclared", weight_aligner, "declares nothing"),
                    AlignerRegistration("no_stream", weight_aligner, "no orthogonal maps",
                                        kinds=("neuron", "blocks", "packed")),
                    AlignerRegistration("everything", weight_aligner, "every kind", kinds=SYMMETRY_KINDS)]

    plugins.register_plugin(Plugin(), name="kinds-test")
    spec, a, b = _stream_task()
    task = AlignTask(spec, a, b)
    for name in ("undeclared", "no_stream"):
        with pytest.raises(cb.ConfigurationError, match=rf"aligner {name!r} aligns .* only.*, but this model's "
                                                        r"symmetries include Orthogonal \(a residual stream\); use "
                                                        r"'everything', 'maps', 'ste' or 'weight' instead, or "
                                                        r"align with symmetries='permutation'"):
            align(name, task)
    back = cb.apply_permutation(spec, align("everything", task, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-8
    # a callable passed as it is declares its kinds by an attribute; none means neuron permutations only
    mine = _named(lambda task, **_: weight_aligner(task), "mine")
    with pytest.raises(cb.ConfigurationError, match="'mine' aligns neuron permutations only"):
        align(mine, task)
    mine = _named(lambda task, **_: weight_aligner(task, restarts=2), "mine")
    mine.kinds = SYMMETRY_KINDS
    back = cb.apply_permutation(spec, align(mine, task), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-8


def _named(fn, name):
    fn.__name__ = name
    return fn


def test_an_aligner_registration_with_an_unknown_kind_is_refused():
    with pytest.raises(PluginError, match="kinds must include 'neuron' and be among neuron, blocks, orthogonal, "
                                          "packed, invertible; got .*rotations"):
        AlignerRegistration("x", weight_aligner, kinds=("neuron", "rotations"))


# -- many models ------------------------------------------------------------------------------------
X8 = torch.as_tensor(np.random.default_rng(5).normal(size=(8, 1, 8, 8)), dtype=torch.float32)


@pytest.fixture(scope="module")
def planted_copies():
    """Model 0 (norms away from 1/0) and two copies: its folded weights under random transformations of every kind."""
    torch.manual_seed(0)
    model = _vit(depth=2)
    with torch.no_grad():
        for v in model.parameters():
            v.add_(0.3 * torch.randn_like(v))
    model.eval()
    spec, folds = cb.derive_symmetries(model, X8)
    theta0 = cb.fold_norms(_state(model), folds)
    copies = [_load(cb.apply_permutation(spec, cb.random_permutation(spec, theta0, seed=s), theta0), depth=2)
              for s in (1, 2)]
    return model, copies, theta0


@pytest.mark.parametrize("method", ["reference", "mergemany", "hierarchical"])
def test_align_many_brings_planted_transformer_copies_back_onto_model_0(planted_copies, method):
    model, copies, theta0 = planted_copies
    with torch.no_grad():
        assert float((copies[0](X8) - model(X8)).abs().max()) < 1e-4  # the plants keep the function
    ms = cb.align_many([model, *copies], method, example_input=X8)
    assert ms.alignment == method and any(isinstance(k, Orthogonal) for k in ms.spec.kinds.values())
    for i in range(3):
        gap = max(float(np.abs(ms.params(i)[k] - theta0[k]).max()) for k in theta0)
        assert gap < 1e-5, (i, gap)
    with torch.no_grad():
        for i, member in enumerate([model, *copies]):
            np.testing.assert_allclose(ms.model(i)(X8).numpy(), member(X8).numpy(), atol=1e-4)
        np.testing.assert_allclose(ms.merge()(X8).numpy(), model(X8).numpy(), atol=1e-4)
    # the pairwise maps (orthogonal stream maps included) compose consistently
    p01, p12, p02 = (pairwise_permutation(ms, i, j) for i, j in ((0, 1), (1, 2), (0, 2)))
    both = compose_permutations(p01, p12)
    for p in p02:
        np.testing.assert_allclose(both[p], p02[p], atol=1e-9)


def test_align_many_with_permutations_only_leaves_the_norms_unfolded(planted_copies):
    model, _, _ = planted_copies
    spec = cb.derive_symmetries(model, X8)[0].permutations_only()
    theta = _state(model)
    copies = [_load(cb.apply_permutation(spec, cb.random_permutation(spec, theta, seed=s), theta), depth=2)
              for s in (3, 4)]
    ms = cb.align_many([model, *copies], "mergemany", example_input=X8, symmetries="permutation")
    assert not any(isinstance(k, Orthogonal) for k in ms.spec.kinds.values())
    for i in range(3):
        assert max(float(np.abs(ms.params(i)[k] - theta[k]).max()) for k in theta) < 1e-5
    with torch.no_grad():
        np.testing.assert_allclose(ms.merge()(X8).numpy(), model(X8).numpy(), atol=1e-4)


@pytest.mark.parametrize("symmetries", ["all", "permutation"])
def test_cycle_refuses_heads_and_streams_naming_the_methods_that_apply(planted_copies, symmetries):
    model, copies, _ = planted_copies
    with pytest.raises(cb.ConfigurationError, match="align_many method 'cycle' aligns neuron permutations only, "
                                                    "but this model's symmetries include .*Blocks.*; use "
                                                    "'mergemany', 'hierarchical' or 'reference' instead"):
        cb.align_many([model, *copies], "cycle", example_input=X8, symmetries=symmetries)
