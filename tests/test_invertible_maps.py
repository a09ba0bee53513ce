"""General invertible maps inside attention heads (Theus et al. 2025): the kinds, the matching step,
and their derivation on user transformers.

The references are independent of the library: an attention layer's forward pass written in numpy,
heads moved and mapped by hand (index and matrix arithmetic written out here), torch's own float64
outputs, finite differences of the fitted objective.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, PermutationSpecError
from combinability.invertible import dual_name, fit_inner, inner_objective
from combinability.kind_matching import match_symmetries
from combinability.kinds import Blocks, Dual, Invertible, Orthogonal, kind_from_json
from combinability.permutation import (
    PermutationSpec,
    apply_permutation,
    check_permutation,
    compose_permutations,
    invert_permutation,
    random_permutation,
)

H, S, D = 3, 4, 10
ATTENTION = PermutationSpec(
    {"wq": ("qk", None), "bq": ("qk",), "wk": ("qk~dual", None), "wv": ("vo", None), "bv": ("vo",),
     "wo": (None, "vo~dual")},
    kinds={"qk": Invertible("heads", H, S), "qk~dual": Dual("qk"), "vo": Invertible("heads", H, S),
           "vo~dual": Dual("vo")})
SHAPES = {"wq": (H * S, D), "bq": (H * S,), "wk": (H * S, D), "wv": (H * S, D), "bv": (H * S,), "wo": (D, H * S)}


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) for k, shape in SHAPES.items()}


def _attention(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Multi-head attention over the tokens ``x`` (t, D), written out head by head."""
    out = np.zeros((len(x), D))
    for h in range(H):
        rows = slice(h * S, (h + 1) * S)
        q, k = x @ p["wq"][rows].T + p["bq"][rows], x @ p["wk"][rows].T
        scores = q @ k.T
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        out += w @ (x @ p["wv"][rows].T + p["bv"][rows]) @ p["wo"][:, rows].T
    return out


def _by_hand(p: dict[str, np.ndarray], order: np.ndarray, g: list[np.ndarray], n: list[np.ndarray]) -> dict:
    """Head i of the result is head ``order[i]`` of ``p`` with queries ``G_i q``, keys ``G_i⁻ᵀ k``, values ``N_i v``
    and output columns ``W_O N_i⁻¹``."""
    out = {k: np.empty_like(v) for k, v in p.items()}
    for i, j in enumerate(order):
        new, old = slice(i * S, (i + 1) * S), slice(j * S, (j + 1) * S)
        out["wq"][new], out["bq"][new] = g[i] @ p["wq"][old], g[i] @ p["bq"][old]
        out["wk"][new] = np.linalg.inv(g[i]).T @ p["wk"][old]
        out["wv"][new], out["bv"][new] = n[i] @ p["wv"][old], n[i] @ p["bv"][old]
        out["wo"][:, new] = p["wo"][:, old] @ np.linalg.inv(n[i])
    return out


def test_an_invertible_map_and_its_dual_keep_attention_and_act_as_written_out():
    a = _params(0)
    rng = np.random.default_rng(1)
    order = np.array([2, 0, 1])
    g, n = ([rng.standard_normal((S, S)) + 2 * np.eye(S) for _ in range(H)] for _ in range(2))
    by_hand = _by_hand(a, order, g, n)
    x = rng.standard_normal((5, D)) * 0.3
    np.testing.assert_allclose(_attention(by_hand, x), _attention(a, x), atol=1e-10)
    inv = lambda m: np.linalg.inv(m).T  # noqa: E731
    value = {"heads": order, "qk": _block(order, g), "qk~dual": _block(order, [inv(m) for m in g]),
             "vo": _block(order, n), "vo~dual": _block(order, [inv(m) for m in n])}
    check_permutation(value, ATTENTION.perm_sizes(a), ATTENTION)
    moved = apply_permutation(ATTENTION, value, a)
    for k in a:
        np.testing.assert_allclose(moved[k], by_hand[k], atol=1e-10)
    back = apply_permutation(ATTENTION, invert_permutation(value), moved)
    assert max(np.abs(back[k] - a[k]).max() for k in a) < 1e-9
    other = random_permutation(ATTENTION, a, 5)
    both = apply_permutation(ATTENTION, compose_permutations(value, other), a)
    twice = apply_permutation(ATTENTION, other, moved)
    assert max(np.abs(both[k] - twice[k]).max() for k in a) < 1e-9


def _block(order: np.ndarray, inner: list[np.ndarray]) -> np.ndarray:
    m = np.zeros((H * S, H * S))
    for i, j in enumerate(order):
        m[i * S:(i + 1) * S, j * S:(j + 1) * S] = inner[i]
    return m


def test_random_invertible_maps_keep_the_function_and_values_are_checked():
    a = _params(2)
    x = np.random.default_rng(3).standard_normal((4, D)) * 0.3
    value = random_permutation(ATTENTION, a, 0, derange=True)
    assert not np.allclose(value["qk"], np.round(value["qk"]))  # not a permutation: a general map
    np.testing.assert_allclose(value["qk~dual"], np.linalg.inv(value["qk"]).T, atol=1e-12)
    np.testing.assert_allclose(_attention(apply_permutation(ATTENTION, value, a), x), _attention(a, x), atol=1e-9)
    with pytest.raises(PermutationSpecError, match="inverse transpose"):
        check_permutation({**value, "qk~dual": value["qk"]}, None, ATTENTION)
    with pytest.raises(PermutationSpecError, match="mixes units of different blocks"):
        check_permutation({**value, "vo": value["vo"] + 0.1}, None, ATTENTION)
    with pytest.raises(PermutationSpecError, match="not invertible"):
        check_permutation({**value, "vo": np.zeros((H * S, H * S))}, None, ATTENTION)
    assert PermutationSpec.from_json(ATTENTION.to_json()) == ATTENTION
    assert kind_from_json(Dual("qk").to_json()) == Dual("qk")
    with pytest.raises(PermutationSpecError, match="not an Invertible name"):
        PermutationSpec({"w": ("a", "b")}, kinds={"b": Dual("a")})


def test_permutations_only_binds_the_dual_sides_to_their_maps_as_block_permutations():
    plain = ATTENTION.permutations_only()
    assert plain.axes_to_perm["wk"] == ("qk", None) and plain.axes_to_perm["wo"] == (None, "vo")
    assert plain.kind("qk") == Blocks("heads", H, S) and "qk~dual" not in plain.perm_names


def test_the_fitted_objective_has_the_gradient_of_its_finite_differences():
    rng = np.random.default_rng(4)
    y, x, v, u = (rng.standard_normal((S, 7)) for _ in range(4))
    grams = {"xx": x @ x.T, "yx": y @ x.T, "uu": u @ u.T, "vu": v @ u.T}
    g = rng.standard_normal((S, S)) + 2 * np.eye(S)
    value, grad = inner_objective(g, grams)
    direct = np.sum((y - g @ x) ** 2) + np.sum((v - np.linalg.inv(g).T @ u) ** 2) - np.sum(y ** 2) - np.sum(v ** 2)
    assert value == pytest.approx(direct, rel=1e-10)
    eps, numeric = 1e-6, np.empty_like(g)
    for i in range(S):
        for j in range(S):
            step = np.zeros_like(g)
            step[i, j] = eps
            numeric[i, j] = (inner_objective(g + step, grams)[0] - inner_objective(g - step, grams)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)
    planted = rng.standard_normal((S, S)) + 2 * np.eye(S)  # Y = G X and V = G⁻ᵀ U exactly: found from the identity
    exact = {"xx": x @ x.T, "yx": planted @ x @ x.T, "uu": u @ u.T, "vu": np.linalg.inv(planted).T @ u @ u.T}
    np.testing.assert_allclose(fit_inner(exact, np.eye(S)), planted, atol=1e-6)


def test_weight_matching_undoes_planted_heads_and_invertible_maps():
    a = _params(6)
    rng = np.random.default_rng(7)
    g, n = ([rng.standard_normal((S, S)) + 0.5 * np.eye(S) for _ in range(H)] for _ in range(2))
    b = _by_hand(a, np.array([1, 2, 0]), g, n)
    perm = match_symmetries(ATTENTION, a, b, seed=0)
    back = apply_permutation(ATTENTION, perm, b)
    assert max(np.abs(back[k] - a[k]).max() for k in a) < 1e-6
    assert perm.objective == pytest.approx(0.5 * sum(np.sum(v ** 2) for v in a.values()), rel=1e-9)


torch = pytest.importorskip("torch")


def _encoder_vit():
    from tests.model_checks import randomised
    from tests.test_stream_trace_torch_encoder import EncoderViT

    return randomised(EncoderViT(True, "gelu", True), 0)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _planted_in_proj(state: dict[str, np.ndarray], layer: int, dim: int, heads: int, seed: int) -> dict:
    """``state`` with layer ``layer``'s heads reordered and mapped by hand (packed ``in_proj``: q, k, v rows)."""
    rng = np.random.default_rng(seed)
    dh, p = dim // heads, f"encoder.layers.{layer}.self_attn."
    order = rng.permutation(heads)
    out = dict(state)
    w, bias, wo = state[p + "in_proj_weight"].copy(), state[p + "in_proj_bias"].copy(), state[p + "out_proj.weight"]
    new_w, new_b, new_wo = w.copy(), bias.copy(), wo.copy()
    for i, j in enumerate(order):
        g, n = (rng.standard_normal((dh, dh)) + np.eye(dh) for _ in range(2))
        for part, m in ((0, g), (1, np.linalg.inv(g).T), (2, n)):
            new, old = slice(part * dim + i * dh, part * dim + (i + 1) * dh), slice(part * dim + j * dh,
                                                                                    part * dim + (j + 1) * dh)
            new_w[new], new_b[new] = m @ w[old], m @ bias[old]
        new_wo[:, i * dh:(i + 1) * dh] = wo[:, j * dh:(j + 1) * dh] @ np.linalg.inv(n)
    out[p + "in_proj_weight"], out[p + "in_proj_bias"], out[p + "out_proj.weight"] = new_w, new_b, new_wo
    return out


def test_a_torch_encoder_s_heads_admit_invertible_maps_found_by_tracing_and_undone_by_matching():
    from tests.model_checks import float64_outputs
    from tests.test_stream_trace_torch_encoder import DIM, HEADS, X

    model = _encoder_vit()
    spec, folds = cb.derive_symmetries(model, X)
    full = cb.invertible_symmetries(model, X, spec, folds)
    rows, _ = full.axes_to_perm["encoder.layers.1.self_attn.in_proj_weight"]
    qk, vo = rows[0], rows[2]
    assert isinstance(full.kind(qk), Invertible) and full.kind(qk).group == spec.kind(qk).group
    assert rows[1] == dual_name(qk) and full.kind(rows[1]) == Dual(qk)  # keys: the other side of qᵀk
    assert full.axes_to_perm["encoder.layers.1.self_attn.out_proj.weight"][1] == dual_name(vo)
    assert full.permutations_only() == spec.permutations_only()
    state = cb.fold_norms(_state(model), folds)
    planted = _planted_in_proj(_planted_in_proj(state, 0, DIM, HEADS, 1), 1, DIM, HEADS, 2)
    np.testing.assert_allclose(float64_outputs(model, planted, X), float64_outputs(model, state, X), atol=1e-9)
    assert not np.allclose(planted["encoder.layers.1.self_attn.in_proj_weight"],
                           state["encoder.layers.1.self_attn.in_proj_weight"])
    perm = cb.weight_matching(full, state, planted, seed=0)
    back = cb.apply_permutation(full, perm, planted)
    assert max(float(np.abs(back[k] - state[k]).max()) for k in state) < 1e-6
    plain = cb.apply_permutation(spec, cb.weight_matching(spec, state, planted, seed=0), planted)
    assert max(float(np.abs(plain[k] - state[k]).max()) for k in state) > 0.1  # permutations alone cannot


def test_a_pair_aligned_with_invertible_maps_keeps_b_s_function_and_sweeps_as_torch_scores_it():
    import torch.nn.functional as F

    from tests.model_checks import randomised
    from tests.test_stream_trace_torch_encoder import EncoderViT, X

    models = [randomised(EncoderViT(True, "gelu", True), s) for s in (1, 2)]
    pair = cb.ModelPair(*models, example_input=X)
    aligned = pair.align("weight", symmetries="invertible")
    assert any(isinstance(k, Invertible) for k in aligned.spec.kinds.values())
    assert any(isinstance(k, Orthogonal) for k in aligned.spec.kinds.values())
    y = np.arange(len(X)) % 5
    ds = cb.sweep(aligned, cb.Linear(), data=(X.numpy(), y), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(X), torch.as_tensor(y)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-4)
    gl, orth = (float(pair.align("weight", symmetries=s).transforms[1].objective) for s in ("invertible", "all"))
    assert np.isfinite(gl) and np.isfinite(orth)


def test_rotary_heads_keep_their_query_key_permutations_and_bad_requests_are_refused():
    from tests.model_checks import randomised
    from tests.test_stream_trace_llama import IDX, Llama

    model = randomised(Llama(kv_heads=4, rotary=8), 0)
    spec, folds = cb.derive_symmetries(model, IDX)
    full = cb.invertible_symmetries(model, IDX, spec, folds)
    for name, kind in full.kinds.items():  # rotary pairs fix the query/key units: no map there is invertible
        if isinstance(kind, Invertible | Dual):
            where = [p for p, entry in full.axes_to_perm.items() if name in entry]
            assert not any("q_proj" in p or "k_proj" in p for p in where), (name, where)
    mlps = [cb.train("mlp", "digits", seed=s, epochs=1, width=0.25) for s in (0, 1)]
    with pytest.raises(ConfigurationError, match="needs attention heads"):
        cb.ModelPair(*mlps).align("weight", symmetries="invertible")
    with pytest.raises(ConfigurationError, match="symmetries must be"):
        cb.ModelPair(*mlps).align("weight", symmetries="gl")
    pair = cb.ModelPair(_encoder_vit(), randomised_twin(), example_input=_x())
    with pytest.raises(ConfigurationError, match="invertible maps"):
        pair.align("ste", symmetries="invertible", data=(_x().numpy(), np.zeros(len(_x()), dtype=np.int64)))


def randomised_twin():
    from tests.model_checks import randomised
    from tests.test_stream_trace_torch_encoder import EncoderViT

    return randomised(EncoderViT(True, "gelu", True), 3)


def _x():
    from tests.test_stream_trace_torch_encoder import X

    return X


# -- learned maps ------------------------------------------------------------------------------------
STREAM = PermutationSpec(
    {"emb": (None, "S"), "wq": ("qk", "S"), "bq": ("qk",), "wk": ("qk~dual", "S"), "wv": ("vo", "S"),
     "wo": ("S", "vo~dual"), "w1": ("F", "S"), "w2": ("S", "F")},
    kinds={"qk": Invertible("heads", H, S), "qk~dual": Dual("qk"), "vo": Invertible("heads", H, S),
           "vo~dual": Dual("vo"), "S": Orthogonal(fix_ones=True)})


def test_the_learned_maps_gradient_is_the_finite_difference_of_a_loss_of_the_transformed_model():
    from types import SimpleNamespace

    from combinability.align.base import AlignTask
    from combinability.align.maps import _MapLearner
    from combinability.layout import FlatLayout

    rng = np.random.default_rng(8)
    shapes = {"emb": (6, D), "wq": (H * S, D), "bq": (H * S,), "wk": (H * S, D), "wv": (H * S, D),
              "wo": (D, H * S), "w1": (7, D), "w2": (D, 7)}
    a, b = ({k: rng.standard_normal(v) for k, v in shapes.items()} for _ in range(2))
    layout = FlatLayout.from_arrays(a)  # float64: the finite differences need the precision
    task = AlignTask(spec=STREAM, reference=a, other=b, seed=0)
    start = random_permutation(STREAM, a, 3)
    learner = _MapLearner(task, SimpleNamespace(layout=layout), start, lr=1e-3)
    learner.theta = learner.theta + 0.1 * rng.standard_normal(learner.theta.shape)  # away from the start
    c = rng.standard_normal(layout.size)

    def loss(theta: np.ndarray) -> float:  # ⟨c, T(θ_B)⟩, T recomputed from the parameters
        learner.theta = theta
        return float(c @ learner.transformed())

    theta = learner.theta.copy()
    loss(theta)
    grad = learner.gradient(c)
    eps = 1e-6
    for i in rng.choice(len(theta), 40, replace=False):
        step = np.zeros_like(theta)
        step[i] = eps
        numeric = (loss(theta + step) - loss(theta - step)) / (2 * eps)
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-6), i
    learner.theta = theta
    values = learner.values()
    check_permutation(values, STREAM.perm_sizes(a), STREAM)  # still orthogonal, fixing ones; duals consistent
    assert np.allclose(values["S"] @ np.ones(D), np.ones(D))


def test_learned_maps_lower_the_midpoint_loss_of_two_vits_and_keep_b_s_function():
    from combinability.data import load_dataset

    vits = [cb.train("tinyvit", "digits", seed=s, epochs=2, width=0.5) for s in (0, 1)]
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    pair = cb.ModelPair(*vits, example_input=test.x[:8])
    aligned = pair.align("maps", symmetries="invertible", data=(train.x, train.y), epochs=2, eval_examples=300,
                         matching_iter=10)
    perm = aligned.transforms[1]
    assert perm.method == "maps" and len(perm.history) == 3
    assert min(perm.history[1:]) < perm.history[0]  # training the maps lowered the midpoint loss
    assert perm.objective == min(perm.history)
    for p, kind in aligned.spec.kinds.items():
        if isinstance(kind, Invertible):
            assert not np.allclose(perm[p], np.round(perm[p]), atol=1e-3)  # trained maps, not permutations
    ds = cb.sweep(aligned, cb.Linear(), data="digits", values=[1.0], limit=200)
    plain = cb.sweep(pair, cb.Linear(), data="digits", values=[1.0], limit=200)
    np.testing.assert_allclose(ds["loss"].values, plain["loss"].values, rtol=1e-4)  # B's function kept


def test_learned_maps_refuse_models_without_continuous_maps():
    mlps = [cb.train("mlp", "digits", seed=s, epochs=1, width=0.25) for s in (0, 1)]
    with pytest.raises(ConfigurationError, match="has none|have none"):
        cb.ModelPair(*mlps).align("maps", data="digits", epochs=1)


def test_symmetry_comparison_checks_its_alignments_before_any_work():
    from combinability.experiments.symmetries import symmetry_comparison

    mlps = [cb.train("mlp", "digits", seed=s, epochs=1, width=0.25) for s in (0, 1)]
    pair = cb.ModelPair(*mlps)
    with pytest.raises(ConfigurationError, match="alignments must be distinct names among"):
        symmetry_comparison(pair, "digits", alignments=("naive", "rotated"))
    with pytest.raises(ConfigurationError, match="pass train_data="):
        symmetry_comparison(pair, "digits", alignments=("naive", "learned"))
    with pytest.raises(ConfigurationError, match="needs attention heads"):
        symmetry_comparison(pair, "digits", alignments=("naive", "invertible"))


def test_the_learned_maps_start_lifts_weight_matching_s_within_head_permutations_to_matrices():
    from combinability.invertible import lifted

    plain_spec = ATTENTION.without_invertible()
    plain = random_permutation(plain_spec, _params(0), 4)
    start = lifted(ATTENTION, plain)
    check_permutation(start, ATTENTION.perm_sizes(_params(0)), ATTENTION)
    for name in ("qk", "vo"):
        np.testing.assert_array_equal(start[name].argmax(axis=1), plain[name])
        np.testing.assert_array_equal(start[dual_name(name)], start[name])  # a permutation is its own dual
    a = _params(0)  # and they move the parameters as the permutations do
    by_matrix, by_index = apply_permutation(ATTENTION, start, a), apply_permutation(plain_spec, plain, a)
    assert max(np.abs(by_matrix[k] - by_index[k]).max() for k in a) < 1e-12


def test_flax_vits_admit_invertible_maps_and_keep_b_s_function_when_aligned_with_them():
    pytest.importorskip("flax")
    from combinability.data import load_dataset

    vits = [cb.train("tinyvit", "digits", seed=s, epochs=1, width=0.25, backend="jax") for s in (0, 1)]
    x = load_dataset("digits", "test", limit=8).x
    pair = cb.ModelPair(*vits, example_input=x)
    spec = pair.invertible_spec()
    assert sum(isinstance(k, Invertible) for k in spec.kinds.values()) == 4  # query and value maps of 2 blocks
    aligned = pair.align("weight", symmetries="invertible", max_iter=5)
    ends = [cb.sweep(p, cb.Linear(), data="digits", values=[1.0], limit=100) for p in (pair, aligned)]
    np.testing.assert_allclose(ends[1]["loss"].values, ends[0]["loss"].values, rtol=1e-4)
    assert not np.allclose(aligned.params(1)["params/blocks_0/attn/q/kernel"],
                           pair.params(1)["params/blocks_0/attn/q/kernel"])


def test_learned_maps_resume_from_their_state_file_as_an_uninterrupted_run(tmp_path):
    from combinability.data import load_dataset

    vits = [cb.train("tinyvit", "digits", seed=s, epochs=1, width=0.25) for s in (0, 1)]
    pair = cb.ModelPair(*vits, example_input=load_dataset("digits", "test", limit=8).x)
    options = {"symmetries": "invertible", "data": "digits", "eval_examples": 200, "matching_iter": 5}
    state = tmp_path / "maps.npz"
    pair.align("maps", epochs=1, state=state, **options)
    resumed = pair.align("maps", epochs=2, state=state, **options).transforms[1]
    whole = pair.align("maps", epochs=2, **options).transforms[1]
    assert resumed.history == whole.history and len(whole.history) == 3
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name])


def test_an_aligned_pair_aligns_again_with_the_symmetries_asked_for_not_those_it_was_aligned_with():
    from tests.test_stream_trace_torch_encoder import X

    pair = cb.ModelPair(_encoder_vit(), randomised_twin(), example_input=X)
    once = pair.align("weight", symmetries="invertible")
    again = once.align("weight", symmetries="all")
    assert not any(isinstance(k, Invertible) for k in again.spec.kinds.values())
    assert again.spec == pair.spec
    direct = pair.align("weight")
    np.testing.assert_array_equal(again.thetas[1], direct.thetas[1])
