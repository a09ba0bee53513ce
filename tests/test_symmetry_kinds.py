"""Symmetry kinds beyond neuron permutations, against a plain numpy transformer and MoE.

The forward passes below are written here, independently of the library: a pre-LN
transformer with torch's packed ``in_proj_weight`` layout, and a top-1 mixture of
experts whose experts are stored as blocks of one wide layer. Every kind must keep
the function (f(T(θ)) = f(θ)), and weight matching must undo a planted transformation.
"""

import numpy as np
import pytest

import combinability as cb
from combinability.errors import PermutationSpecError
from combinability.folding import NormFold, Reader, fold_norms
from combinability.kinds import Blocks, Orthogonal, act, random_orthogonal
from combinability.permutation import check_permutation

D, HEADS, DH, M, T, FIN, C, DEPTH = 12, 3, 4, 10, 5, 6, 4, 2


def _norm(x, w, b, kind):
    if kind == "ln":
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w + b


def transformer(p, x, norm="ln"):
    h = x @ p["embed.weight"].T + p["embed.bias"] + p["pos"]
    n = x.shape[0]
    for i in range(DEPTH):
        y = _norm(h, p[f"b{i}.ln1.weight"], p[f"b{i}.ln1.bias"], norm)
        qkv = y @ p[f"b{i}.attn.in_proj_weight"].T + p[f"b{i}.attn.in_proj_bias"]
        q, k, v = (z.reshape(n, T, HEADS, DH).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(DH)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = (s / s.sum(-1, keepdims=True)) @ v
        o = o.transpose(0, 2, 1, 3).reshape(n, T, D)
        h = h + o @ p[f"b{i}.attn.out_proj.weight"].T + p[f"b{i}.attn.out_proj.bias"]
        y = _norm(h, p[f"b{i}.ln2.weight"], p[f"b{i}.ln2.bias"], norm)
        z = np.tanh(y @ p[f"b{i}.fc1.weight"].T + p[f"b{i}.fc1.bias"])
        h = h + z @ p[f"b{i}.fc2.weight"].T + p[f"b{i}.fc2.bias"]
    y = _norm(h, p["lnf.weight"], p["lnf.bias"], norm).mean(1)
    return y @ p["head.weight"].T + p["head.bias"]


def transformer_params(seed):
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (D, FIN), "embed.bias": (D,), "pos": (T, D), "lnf.weight": (D,), "lnf.bias": (D,),
              "head.weight": (C, D), "head.bias": (C,)}
    for i in range(DEPTH):
        shapes |= {f"b{i}.ln1.weight": (D,), f"b{i}.ln1.bias": (D,), f"b{i}.attn.in_proj_weight": (3 * D, D),
                   f"b{i}.attn.in_proj_bias": (3 * D,), f"b{i}.attn.out_proj.weight": (D, D),
                   f"b{i}.attn.out_proj.bias": (D,), f"b{i}.ln2.weight": (D,), f"b{i}.ln2.bias": (D,),
                   f"b{i}.fc1.weight": (M, D), f"b{i}.fc1.bias": (M,), f"b{i}.fc2.weight": (D, M),
                   f"b{i}.fc2.bias": (D,)}
    p = {k: rng.normal(size=s) / np.sqrt(s[-1]) for k, s in shapes.items()}
    for k in p:
        if k.endswith("ln1.weight") or k.endswith("ln2.weight") or k == "lnf.weight":
            p[k] = 1 + 0.3 * rng.normal(size=p[k].shape)
    return p


def transformer_spec(orthogonal, norm="ln"):
    r = "R"
    norms = ["lnf"] + [f"b{i}.{ln}" for i in range(DEPTH) for ln in ("ln1", "ln2")]
    axes = {"embed.weight": (r, None), "embed.bias": (r,), "pos": (None, r),
            "head.weight": (None, r), "head.bias": (None,)}
    kinds = {}
    for i in range(DEPTH):
        qk, vo, f = f"b{i}.qk", f"b{i}.vo", f"b{i}.F"
        axes |= {f"b{i}.attn.in_proj_weight": ((qk, qk, vo), r), f"b{i}.attn.in_proj_bias": ((qk, qk, vo),),
                 f"b{i}.attn.out_proj.weight": (r, vo), f"b{i}.attn.out_proj.bias": (r,),
                 f"b{i}.fc1.weight": (f, r), f"b{i}.fc1.bias": (f,), f"b{i}.fc2.weight": (r, f), f"b{i}.fc2.bias": (r,)}
        kinds |= {qk: Blocks(f"b{i}.heads", HEADS, DH), vo: Blocks(f"b{i}.heads", HEADS, DH)}
    for n in norms:
        axes |= {f"{n}.weight": (None,) if orthogonal else (r,), f"{n}.bias": (None,) if orthogonal else (r,)}
    if orthogonal:
        requires = [(f"{n}.weight", 1.0) for n in norms] + [(f"{n}.bias", 0.0) for n in norms]
        kinds[r] = Orthogonal(fix_ones=norm == "ln", requires=requires)
    return cb.PermutationSpec(axes, kinds)


def transformer_folds():
    folds = [NormFold("lnf.weight", "lnf.bias", (Reader("head.weight", 1, "head.bias"),))]
    for i in range(DEPTH):
        folds += [NormFold(f"b{i}.ln1.weight", f"b{i}.ln1.bias",
                           (Reader(f"b{i}.attn.in_proj_weight", 1, f"b{i}.attn.in_proj_bias"),)),
                  NormFold(f"b{i}.ln2.weight", f"b{i}.ln2.bias", (Reader(f"b{i}.fc1.weight", 1, f"b{i}.fc1.bias"),))]
    return folds


X = np.random.default_rng(99).normal(size=(7, T, FIN))


@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_folding_norms_keeps_the_function(norm):
    p = transformer_params(0)
    folded = fold_norms(p, transformer_folds())
    np.testing.assert_allclose(transformer(folded, X, norm), transformer(p, X, norm), atol=1e-10)
    assert np.all(folded["b1.ln2.weight"] == 1) and np.all(folded["b1.ln2.bias"] == 0)


@pytest.mark.parametrize("norm", ["ln", "rms"])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_every_kind_keeps_the_function(norm, orthogonal):
    p = transformer_params(1)
    if orthogonal:
        p = fold_norms(p, transformer_folds())
    spec = transformer_spec(orthogonal, norm)
    spec.validate(p)
    t = cb.random_permutation(spec, p, seed=3)
    check_permutation(t, spec.perm_sizes(p), spec)
    moved = cb.apply_permutation(spec, t, p)
    assert not np.allclose(moved["b0.attn.in_proj_weight"], p["b0.attn.in_proj_weight"])
    np.testing.assert_allclose(transformer(moved, X, norm), transformer(p, X, norm), atol=1e-9)
    back = cb.apply_permutation(spec, cb.invert_permutation(t), moved)
    np.testing.assert_allclose(back["b1.fc2.weight"], p["b1.fc2.weight"], atol=1e-12)


def test_an_orthogonal_map_on_a_norm_that_is_not_folded_is_refused():
    p = transformer_params(2)
    spec = transformer_spec(True)
    t = cb.random_permutation(spec, p, seed=0)
    with pytest.raises(PermutationSpecError, match="lnf.weight.*fold_norms"):
        cb.apply_permutation(spec, t, p)


def test_a_layernorm_stream_map_must_fix_the_ones_vector():
    rng = np.random.default_rng(0)
    q = random_orthogonal(D, rng, fix_ones=True)
    np.testing.assert_allclose(q @ np.ones(D), np.ones(D), atol=1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(D), atol=1e-12)
    spec = transformer_spec(True)
    free = random_orthogonal(D, rng)
    with pytest.raises(PermutationSpecError, match="all-ones"):
        check_permutation({"R": free}, {"R": D}, spec)


def test_a_permutation_acts_like_its_permutation_matrix():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 4, 3))
    idx = rng.permutation(4)
    matrix = np.eye(4)[idx]
    np.testing.assert_allclose(act(matrix, w, 1), act(idx, w, 1))


def test_compose_and_invert_over_mixed_kinds():
    p = fold_norms(transformer_params(3), transformer_folds())
    spec = transformer_spec(True)
    t1, t2 = cb.random_permutation(spec, p, seed=1), cb.random_permutation(spec, p, seed=2)
    both = cb.apply_permutation(spec, cb.compose_permutations(t1, t2), p)
    step = cb.apply_permutation(spec, t2, cb.apply_permutation(spec, t1, p))
    for k in p:
        np.testing.assert_allclose(both[k], step[k], atol=1e-12)


def test_blocks_move_whole_heads():
    p = transformer_params(4)
    spec = transformer_spec(False)
    t = cb.random_permutation(spec, p, seed=5)
    sigma = t["b0.heads"]
    for name in ("b0.qk", "b0.vo"):
        assert np.array_equal(t[name].reshape(HEADS, DH) // DH, np.repeat(sigma[:, None], DH, 1))
    broken = dict(t)
    broken["b0.qk"] = np.roll(t["b0.qk"], 1)
    with pytest.raises(PermutationSpecError, match="splits a block"):
        check_permutation(broken, spec.perm_sizes(p), spec)


def test_spec_with_kinds_survives_json():
    spec = transformer_spec(True)
    again = cb.PermutationSpec.from_json(spec.to_json())
    assert again == spec and not again.is_plain
    assert again.kind("b1.vo") == Blocks("b1.heads", HEADS, DH)


def test_segments_that_do_not_fill_their_axis_are_named():
    spec = cb.PermutationSpec({"w": (("a", "a", "b"), None), "v": (None, "b")},
                              {"a": Blocks("h", 2, 3), "b": Blocks("h", 2, 3)})
    with pytest.raises(PermutationSpecError, match="'w' axis 0 has size 20"):
        spec.validate({"w": np.zeros((20, 2)), "v": np.zeros((1, 6))})


@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_weight_matching_undoes_a_planted_head_ffn_and_orthogonal_map(norm):
    a = fold_norms(transformer_params(5), transformer_folds())
    spec = transformer_spec(True, norm)
    planted = cb.random_permutation(spec, a, seed=11)
    b = cb.apply_permutation(spec, planted, a)
    found = cb.weight_matching(spec, a, b, seed=0, restarts=2)
    back = cb.apply_permutation(spec, found, b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-6
    np.testing.assert_allclose(found.objective, sum(float((v**2).sum()) for k, v in a.items()
                                                    if k in spec.axes_to_perm), rtol=1e-9)


def test_weight_matching_of_two_unrelated_transformers_reports_its_exact_objective():
    """Two independent networks (no planted answer): each step is valued on the parameters it
    moves only; the reported objective is still Σ⟨θ_A, T(θ_B)⟩ of the returned transformation,
    computed here from scratch, the history never falls, and a descent started from the
    result finds nothing to improve (a coordinate optimum)."""
    a = fold_norms(transformer_params(8), transformer_folds())
    b = fold_norms(transformer_params(9), transformer_folds())
    spec = transformer_spec(True)
    found = cb.weight_matching(spec, a, b, seed=0, restarts=1)
    moved = cb.apply_permutation(spec, found, b)
    exact = sum(float(np.vdot(np.asarray(a[k], np.float64), np.asarray(moved[k], np.float64)))
                for k in spec.axes_to_perm)
    start = sum(float(np.vdot(a[k], b[k])) for k in spec.axes_to_perm)
    assert found.objective == pytest.approx(exact, rel=1e-12)
    assert found.objective > start
    assert np.all(np.diff(found.history) >= 0)
    again = cb.weight_matching(spec, a, b, seed=3, init=found)
    assert again.iterations == 1
    assert again.objective == pytest.approx(found.objective, rel=1e-12)


def test_matching_objective_of_an_orthogonal_transformation():
    """``cb.matching_objective`` with an orthogonal map: Σ⟨θ_A, T(θ_B)⟩ computed here from the
    transformed model; B's norms must be folded (refused, naming the norm, otherwise)."""
    a = fold_norms(transformer_params(8), transformer_folds())
    b = fold_norms(transformer_params(9), transformer_folds())
    spec = transformer_spec(True)
    t = cb.random_permutation(spec, a, seed=1)
    moved = cb.apply_permutation(spec, t, b)
    exact = sum(float(np.vdot(np.asarray(a[k], np.float64), np.asarray(moved[k], np.float64)))
                for k in spec.axes_to_perm)
    assert cb.matching_objective(spec, a, b, t) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(PermutationSpecError, match="needs 'lnf.weight' to be all 1"):
        cb.matching_objective(spec, a, transformer_params(9), t)


def test_a_large_parameter_elsewhere_does_not_stop_the_descent():
    """A separate parameter of huge values (objective ~1e16) must not make the other steps' gains
    look negligible: the transformer's part of the result is a coordinate optimum of the
    transformer alone (a descent started from it, without that parameter, finds nothing)."""
    a = fold_norms(transformer_params(8), transformer_folds())
    b = fold_norms(transformer_params(9), transformer_folds())
    spec = transformer_spec(True)
    rng = np.random.default_rng(3)
    stats = 1e6 * np.arange(1.0, 33.0)
    big = cb.PermutationSpec({**spec.axes_to_perm, "stats": ("Q",)}, spec.kinds)
    found = cb.weight_matching(big, {**a, "stats": stats}, {**b, "stats": stats[rng.permutation(32)]}, seed=0)
    assert found.objective > 1e16
    part = {p: found[p] for p in spec.perm_names}
    again = cb.weight_matching(spec, a, b, seed=3, init=part)
    assert again.iterations == 1
    assert again.objective == pytest.approx(cb.matching_objective(spec, a, b, part), rel=1e-12)


@pytest.mark.parametrize("stream", ["none", "permutation", "orthogonal"])
def test_skipping_steps_whose_inputs_did_not_change_takes_the_same_steps(monkeypatch, stream):
    """A step is skipped when no name its optimum reads has changed since it was taken; with
    every step marked as reading every name (no skip), the descent is the same, bit for bit."""
    from combinability import kind_matching

    a, b = transformer_params(8), transformer_params(9)
    if stream == "orthogonal":
        a, b = fold_norms(a, transformer_folds()), fold_norms(b, transformer_folds())
    spec = transformer_spec(stream == "orthogonal")
    if stream == "none":  # heads and FFN units only: a step reads its own block, not a stream
        spec = cb.PermutationSpec({k: tuple(None if e == "R" else e for e in axes)
                                   for k, axes in spec.axes_to_perm.items()},
                                  {p: k for p, k in spec.kinds.items() if p != "R"})
    calls = []
    step = kind_matching._step
    monkeypatch.setattr(kind_matching, "_step", lambda *args: calls.append(args[1]) or step(*args))
    skipping = cb.weight_matching(spec, a, b, seed=0, restarts=1)
    taken = len(calls)
    monkeypatch.setattr(kind_matching, "_readers", lambda spec, steps: {p: set(spec.perm_names) for p in steps})
    every = cb.weight_matching(spec, a, b, seed=0, restarts=1)
    assert taken < len(calls) - taken or stream != "none"  # some steps were skipped
    assert skipping.objective == every.objective and skipping.history == every.history
    for p in every:
        np.testing.assert_array_equal(skipping[p], every[p])


def test_weight_matching_undoes_a_planted_permutation_only_alignment():
    a = transformer_params(6)
    spec = transformer_spec(False)
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=4), a)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0, restarts=2), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-9


E, H, FI = 4, 5, 6


def moe(p, x):
    gate = x @ p["gate.weight"].T + p["gate.bias"]
    chosen = gate.argmax(1)
    weight = np.exp(gate - gate.max(1, keepdims=True))
    weight = weight[np.arange(len(x)), chosen] / weight.sum(1)
    hidden = np.maximum(x @ p["experts.w1"].T + p["experts.b1"], 0).reshape(len(x), E, H)
    w2 = p["experts.w2"].reshape(C, E, H)
    out = np.stack([hidden[i, chosen[i]] @ w2[:, chosen[i]].T for i in range(len(x))])
    return out * weight[:, None] + p["out.bias"]


def moe_spec():
    return cb.PermutationSpec({"gate.weight": ("experts", None), "gate.bias": ("experts",),
                               "experts.w1": ("X", None), "experts.b1": ("X",), "experts.w2": (None, "X"),
                               "out.bias": (None,)}, {"X": Blocks("experts", E, H)})


def test_a_planted_expert_and_gate_permutation_is_recovered():
    rng = np.random.default_rng(7)
    a = {"gate.weight": rng.normal(size=(E, FI)), "gate.bias": rng.normal(size=E),
         "experts.w1": rng.normal(size=(E * H, FI)), "experts.b1": rng.normal(size=E * H),
         "experts.w2": rng.normal(size=(C, E * H)), "out.bias": rng.normal(size=C)}
    spec = moe_spec()
    planted = cb.random_permutation(spec, a, seed=8)
    assert not np.array_equal(planted["experts"], np.arange(E))
    b = cb.apply_permutation(spec, planted, a)
    x = rng.normal(size=(9, FI))
    np.testing.assert_allclose(moe(b, x), moe(a, x), atol=1e-12)
    back = cb.apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-12
