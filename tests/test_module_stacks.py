"""Experts held as separate modules: stacked parameters in a spec (core, numpy only).

The reference is a plain numpy forward pass of a top-2 mixture of SwiGLU experts, each
expert its own set of parameters (``moe.experts.<e>.w1`` ...), as Mixtral keeps them.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import PermutationSpecError
from combinability.kinds import Blocks, expand_blocks
from combinability.module_stacks import Stack, join_members, split_members, stack_modules
from combinability.permutation import apply_permutation, random_permutation

D, H, E, K, N_IN = 6, 5, 4, 2, 7


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"inp.weight": rng.normal(size=(D, N_IN)), "gate.weight": rng.normal(size=(E, D))}
    for e in range(E):
        out[f"moe.experts.{e}.w1.weight"] = rng.normal(size=(H, D))
        out[f"moe.experts.{e}.w3.weight"] = rng.normal(size=(H, D))
        out[f"moe.experts.{e}.w2.weight"] = rng.normal(size=(D, H))
        out[f"moe.experts.{e}.w2.bias"] = rng.normal(size=(D,))
    out["out.weight"] = rng.normal(size=(3, D))
    return out


def _forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Top-2 routing, each token through its two experts, weighted by its renormalised gate values."""
    h = x @ p["inp.weight"].T
    logits = h @ p["gate.weight"].T
    top = np.argsort(-logits, axis=1)[:, :K]
    w = np.take_along_axis(logits, top, 1)
    w = np.exp(w - w.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    y = np.zeros_like(h)
    for t in range(len(x)):
        for slot, e in enumerate(top[t]):
            a = h[t] @ p[f"moe.experts.{e}.w1.weight"].T
            g = a / (1 + np.exp(-a)) * (h[t] @ p[f"moe.experts.{e}.w3.weight"].T)
            y[t] += w[t, slot] * (g @ p[f"moe.experts.{e}.w2.weight"].T + p[f"moe.experts.{e}.w2.bias"])
    return (h + y) @ p["out.weight"].T


def _unstacked_spec() -> cb.PermutationSpec:
    """The spec a tracer finds: each expert's hidden units a permutation of their own."""
    axes = {"inp.weight": ("S", None), "gate.weight": ("G", "S")}
    for e in range(E):
        m = f"moe.experts.{e}"
        axes |= {f"{m}.w1.weight": (f"P_{m}.w1", "S"), f"{m}.w3.weight": (f"P_{m}.w1", "S"),
                 f"{m}.w2.weight": ("S", f"P_{m}.w1"), f"{m}.w2.bias": ("S",)}
    return cb.PermutationSpec(axes | {"out.weight": (None, "S")})


def _spec() -> cb.PermutationSpec:
    return stack_modules(_unstacked_spec(), "G", [f"moe.experts.{e}" for e in range(E)], _params(0))


def test_stack_modules_binds_expert_units_as_blocks_of_the_gate() -> None:
    spec = _spec()
    assert dict(spec.axes_to_perm)["moe.experts.*.w1.weight"] == ("P_moe.experts.*.w1", "S")
    assert dict(spec.axes_to_perm)["moe.experts.*.w2.weight"] == ("S", "P_moe.experts.*.w1")
    assert dict(spec.axes_to_perm)["moe.experts.*.w2.bias"] == ("G", "S")  # one per expert: a new axis
    assert spec.kind("P_moe.experts.*.w1") == Blocks("G", E, H)
    assert spec.stacks["moe.experts.*.w2.weight"] == Stack(tuple(f"moe.experts.{e}.w2.weight" for e in range(E)), 1)
    assert spec.perm_sizes(_params(0)) == {"S": D, "G": E, "P_moe.experts.*.w1": E * H}
    assert not spec.is_plain
    assert set(spec.parameters) == set(_params(0))


def test_a_random_transformation_keeps_the_function() -> None:
    """Experts moved with the gate's rows, units permuted inside each: the same outputs (numpy reference)."""
    spec, p = _spec(), _params(1)
    x = np.random.default_rng(2).normal(size=(16, N_IN))
    perm = random_permutation(spec, p, seed=3, derange=True)
    moved = apply_permutation(spec, perm, p)
    assert list(moved) == list(p)  # the model's own names, in its order
    assert not np.allclose(moved["moe.experts.0.w1.weight"], p["moe.experts.0.w1.weight"])
    np.testing.assert_allclose(_forward(moved, x), _forward(p, x), rtol=1e-10, atol=1e-10)
    # moving the experts without the gate's rows changes the function: the expert order matters
    wrong = dict(moved, **{"gate.weight": p["gate.weight"] @ np.eye(D)[perm["S"]].T})
    assert not np.allclose(_forward(wrong, x), _forward(p, x), atol=1e-3)


def test_weight_matching_undoes_a_planted_expert_permutation() -> None:
    spec, a = _spec(), _params(4)
    rng = np.random.default_rng(5)
    sigma = np.array([2, 0, 3, 1])
    inner = np.stack([rng.permutation(H) for _ in range(E)])
    planted = {"S": rng.permutation(D), "G": sigma, "P_moe.experts.*.w1": expand_blocks(sigma, inner, H)}
    b = apply_permutation(spec, planted, a)
    b = {k: v + 0.01 * rng.normal(size=v.shape) for k, v in b.items()}
    perm = cb.weight_matching(spec, a, b, seed=0)
    assert list(perm["G"]) == list(np.argsort(sigma))
    aligned = apply_permutation(spec, perm, b)
    for k in a:
        np.testing.assert_allclose(aligned[k], a[k], atol=0.05)
    # the objective is the plain sum over the model's own parameters
    expected = sum(float(np.vdot(a[k], aligned[k])) for k in a if k in spec.parameters)
    assert perm.objective == pytest.approx(expected, rel=1e-9)
    assert cb.matching_objective(spec, a, b, perm) == pytest.approx(expected, rel=1e-9)


def test_join_and_split_are_inverse() -> None:
    spec, p = _spec(), _params(6)
    joined = spec.joined(p)
    assert joined["moe.experts.*.w1.weight"].shape == (E * H, D)
    assert joined["moe.experts.*.w2.weight"].shape == (D, E * H)
    assert joined["moe.experts.*.w2.bias"].shape == (E, D)
    np.testing.assert_array_equal(joined["moe.experts.*.w2.weight"][:, H:2 * H], p["moe.experts.1.w2.weight"])
    back = split_members(spec.stacks, joined)
    assert set(back) == set(p)
    for k in p:
        np.testing.assert_array_equal(back[k], p[k])


def test_json_round_trip_keeps_the_stacks() -> None:
    spec = _spec()
    text = spec.to_json()
    assert '"version": 3' in text
    assert cb.PermutationSpec.from_json(text) == spec


def test_errors_name_what_is_wrong() -> None:
    spec, p = _spec(), _params(0)
    partial = {k: v for k, v in p.items() if k != "moe.experts.2.w1.weight"}
    with pytest.raises(PermutationSpecError, match=r"needs all its members together.*moe.experts.2.w1.weight"):
        spec.validate(partial, allow_unlisted=True)
    with pytest.raises(PermutationSpecError, match="differ in shape"):
        join_members(spec.stacks, {**p, "moe.experts.1.w1.weight": np.zeros((H + 1, D))})
    with pytest.raises(PermutationSpecError, match="both a parameter of the spec and a member"):
        cb.PermutationSpec({"a": ("P",), "s": ("P",)}, stacks={"s": Stack(("a", "b"), 0)})
    with pytest.raises(PermutationSpecError, match="bound by no entry"):
        cb.PermutationSpec({"a": ("P",)}, stacks={"s": Stack(("b", "c"), 0)})
    unstacked = _unstacked_spec()
    axes = dict(unstacked.axes_to_perm)
    axes["moe.experts.3.w2.bias"] = (None,)  # expert 3 bound unlike the others
    with pytest.raises(PermutationSpecError, match="bound alike"):
        stack_modules(cb.PermutationSpec(axes), "G", [f"moe.experts.{e}" for e in range(E)], p)
    del axes["moe.experts.3.w2.bias"]
    with pytest.raises(PermutationSpecError, match="differ in parameters"):
        stack_modules(cb.PermutationSpec(axes), "G", [f"moe.experts.{e}" for e in range(E)], p)


def test_a_merged_view_joins_blocks_and_their_units_and_splits_back():
    """``(d, heads, head_dim)``: the heads axis merged into the units' (block-major), and back."""
    from combinability.module_stacks import Merge, merge_blocks

    rng = np.random.default_rng(7)
    w = rng.normal(size=(5, 3, 4))  # (d, heads, units)
    view = Merge("q", 1, 2, 3)
    merged = view.join([w], "q:H")
    assert merged.shape == (5, 12) and view.axis == 1
    np.testing.assert_array_equal(merged[:, 4:8], w[:, 1, :])  # head 1's units
    np.testing.assert_array_equal(view.split(merged, "q:H")[0], w)
    out = rng.normal(size=(3, 4, 5))  # (heads, units, d)
    params = {"q": w, "o": out, "e": np.zeros((2, 5)), "n": np.ones(5), "g": np.ones(3)}  # g: a scale per head
    spec = cb.PermutationSpec({"q": ("S", "H", "U"), "o": ("H", "U", "S"), "e": (None, "S"), "n": ("S",),
                               "g": ("H",)})
    finer = merge_blocks(spec, params)
    assert finer.kind("U") == Blocks("H", 3, 4) and finer.axes_of("q") == ("S", "H", "U")
    assert dict(finer.axes_to_perm)["o:H"] == ("U", "S") and finer.stacks["o:H"] == Merge("o", 0, 1, 3)
    assert cb.PermutationSpec.from_json(finer.to_json()) == finer
    perm = random_permutation(finer, params, seed=1, derange=True)
    moved = apply_permutation(finer, perm, {"q": w, "o": out})
    heads, units = perm["H"], perm["U"].reshape(3, 4) - 4 * perm["H"][:, None]
    for h in range(3):  # head h of the result is head heads[h], its units in that head's own new order
        np.testing.assert_array_equal(moved["q"][:, h, :], w[perm["S"]][:, heads[h], units[h]])
        np.testing.assert_array_equal(moved["o"][h], out[heads[h]][units[h]][:, perm["S"]])
    same = cb.PermutationSpec({"q": ("S", "H", "U"), "o": ("H", "U", "S")})  # H and U bind the same: which blocks?
    assert merge_blocks(same, params) is same


def _cut_layer(seed: int) -> tuple[cb.PermutationSpec, dict[str, np.ndarray]]:
    """A layer whose 10 rows are 3 rotary heads of 2 units (kept in order) then 4 plain units, cut
    into two parts (Phi-3's query rows, then others), read by an output layer."""
    from combinability.module_stacks import Part
    from combinability.permutation import Repeat

    rng = np.random.default_rng(seed)
    spec = cb.PermutationSpec({"w[0:6]": (Repeat("H", 2), "S"), "w[6:]": ("V", "S"), "b[0:6]": (Repeat("H", 2),),
                               "b[6:]": ("V",), "o": ("S", "V")},
                              stacks={"w[0:6]": Part("w", 0, 0, 6), "w[6:]": Part("w", 0, 6),
                                      "b[0:6]": Part("b", 0, 0, 6), "b[6:]": Part("b", 0, 6)})
    return spec, {"w": rng.normal(size=(10, 3)), "b": rng.normal(size=(10,)), "o": rng.normal(size=(3, 4))}


def test_parts_of_one_parameter_each_move_their_own_way() -> None:
    spec, params = _cut_layer(0)
    assert spec.parameters == ("w", "b", "o") and spec.perm_sizes(params) == {"H": 3, "S": 3, "V": 4}
    perm = {"H": np.array([2, 0, 1]), "S": np.array([1, 2, 0]), "V": np.array([3, 2, 1, 0])}
    rows = np.r_[4, 5, 0, 1, 2, 3, 9, 8, 7, 6]  # written out: head 2's two rows, head 0's, head 1's, V reversed
    out = apply_permutation(spec, perm, params)
    assert list(out) == ["w", "b", "o"]
    np.testing.assert_array_equal(out["w"], params["w"][rows][:, [1, 2, 0]])
    np.testing.assert_array_equal(out["b"], params["b"][rows])
    np.testing.assert_array_equal(out["o"], params["o"][[1, 2, 0]][:, [3, 2, 1, 0]])
    assert cb.PermutationSpec.from_json(spec.to_json()) == spec
    assert spec.axes_of("w")[0] == (spec.axes_to_perm["w[0:6]"][0], "V")


def _assert_planted_map_undone(spec: cb.PermutationSpec, a: dict[str, np.ndarray], seed: int) -> None:
    """Weight matching of ``a`` and ``a`` moved by a random map of ``spec`` brings the moved copy back to ``a``."""
    b = apply_permutation(spec, random_permutation(spec, a, seed=seed, derange=True), a)
    back = apply_permutation(spec, cb.weight_matching(spec, a, b, seed=0), b)
    assert max(float(np.abs(back[k] - a[k]).max()) for k in a) < 1e-12


def test_weight_matching_undoes_a_planted_map_of_parts() -> None:
    spec, a = _cut_layer(1)
    _assert_planted_map_undone(spec, a, seed=3)


def test_parts_that_do_not_tile_their_parameter_are_refused() -> None:
    from combinability.module_stacks import Part

    with pytest.raises(PermutationSpecError, match="tile its axis"):
        cb.PermutationSpec({"w[0:6]": ("H", None), "w[7:]": ("V", None)},
                           stacks={"w[0:6]": Part("w", 0, 0, 6), "w[7:]": Part("w", 0, 7)})
    with pytest.raises(PermutationSpecError, match="stop"):
        Part("w", 0, 6, 6)
    spec, params = _cut_layer(0)
    with pytest.raises(PermutationSpecError, match=r"'w' is joined from all its parts"):
        split_members(spec.stacks, {"w[0:6]": params["w"][:6]})
    with pytest.raises(PermutationSpecError, match=r"'w'\[0:6\] along axis 0, but its shape is \(5, 3\)"):
        spec.validate({**params, "w": params["w"][:5]})
    with pytest.raises(PermutationSpecError, match=r"'w'\[6:None\] along axis 0, but its shape is \(6, 3\)"):
        spec.validate({**params, "w": params["w"][:6]})


def _fused_experts(seed: int) -> tuple[cb.PermutationSpec, dict[str, np.ndarray]]:
    """transformers 5's experts: a router ``(E, d)``, ``gate_up (E, 2h, d)`` (each expert's gate rows, then its up
    rows) and ``down (E, d, h)``, bound coarsely (every expert's units alike), with ``gate_up`` cut into halves."""
    from combinability.module_stacks import Part

    rng = np.random.default_rng(seed)
    e, h, d = 3, 4, 5
    spec = cb.PermutationSpec({"router": ("G", "S"), "gate_up[0:4]": ("G", "U", "S"), "gate_up[4:]": ("G", "U", "S"),
                               "down": ("G", "S", "U"), "embed": (None, "S")},
                              stacks={"gate_up[0:4]": Part("gate_up", 1, 0, h), "gate_up[4:]": Part("gate_up", 1, h)})
    return spec, {"router": rng.normal(size=(e, d)), "gate_up": rng.normal(size=(e, 2 * h, d)),
                  "down": rng.normal(size=(e, d, h)), "embed": rng.normal(size=(7, d))}


def _moe_forward(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Every expert on every token, weighted by the router's softmax (a dense mixture), in plain numpy."""
    logits = x @ params["router"].T
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    h = params["down"].shape[-1]
    out = np.zeros_like(x)
    for k in range(params["router"].shape[0]):
        gate, up = params["gate_up"][k, :h] @ x.T, params["gate_up"][k, h:] @ x.T
        out += weights[:, k:k + 1] * (params["down"][k] @ (np.tanh(gate) * up)).T
    return out


def test_parts_merged_per_expert_move_each_experts_units_its_own_way() -> None:
    """A view of a view: each half of ``gate_up`` is a part, then merged (experts x units) into blocks."""
    from combinability.module_stacks import Merge, Part, merge_blocks, view_levels

    spec, params = _fused_experts(0)
    finer = merge_blocks(spec, params)
    assert finer.kind("U") == Blocks("G", 3, 4)
    assert finer.stacks["gate_up[0:4]:G"] == Merge("gate_up[0:4]", 0, 1, 3)
    assert finer.stacks["gate_up[0:4]"] == Part("gate_up", 1, 0, 4)
    assert [sorted(level) for level in view_levels(finer.stacks)] == [["down:G", "gate_up[0:4]", "gate_up[4:]"],
                                                                      ["gate_up[0:4]:G", "gate_up[4:]:G"]]
    assert finer.parameters == ("router", "gate_up", "down", "embed")
    assert finer.axes_of("gate_up") == ("G", ("U", "U"), "S") and finer.axes_of("down") == ("G", "S", "U")
    assert cb.PermutationSpec.from_json(finer.to_json()) == finer
    joined = finer.joined(params)
    assert joined["gate_up[4:]:G"].shape == (12, 5)
    np.testing.assert_array_equal(joined["gate_up[4:]:G"][4:8], params["gate_up"][1, 4:])  # expert 1's up rows
    perm = random_permutation(finer, params, seed=2, derange=True)
    moved = apply_permutation(finer, perm, params)
    assert list(moved) == list(params)
    experts, units, stream = perm["G"], perm["U"].reshape(3, 4) - 4 * perm["G"][:, None], perm["S"]
    for k in range(3):  # expert k of the result is expert experts[k], its units in that expert's own new order
        rows = np.r_[units[k], 4 + units[k]]
        np.testing.assert_array_equal(moved["gate_up"][k], params["gate_up"][experts[k]][rows][:, stream])
        np.testing.assert_array_equal(moved["down"][k], params["down"][experts[k]][stream][:, units[k]])
    np.testing.assert_array_equal(moved["router"], params["router"][experts][:, stream])
    x = np.random.default_rng(3).normal(size=(6, 5))
    np.testing.assert_allclose(_moe_forward(moved, x[:, stream]), _moe_forward(params, x)[:, stream], atol=1e-12)


def test_weight_matching_undoes_a_planted_map_of_merged_parts() -> None:
    from combinability.module_stacks import merge_blocks

    spec, a = _fused_experts(1)
    _assert_planted_map_undone(merge_blocks(spec, a), a, seed=4)


def test_views_naming_each_other_in_a_cycle_are_refused() -> None:
    from combinability.module_stacks import Merge

    with pytest.raises(PermutationSpecError, match="cycle"):
        cb.PermutationSpec({"a": ("U", None)}, stacks={"b": Merge("c", 0, 1, 2), "c": Merge("b", 0, 1, 2)})
    with pytest.raises(PermutationSpecError, match="bound by no entry"):
        cb.PermutationSpec({"a": ("U", None)}, stacks={"b": Merge("c", 0, 1, 2)})


def test_strided_parts_move_alternating_entries_and_interleave_back() -> None:
    """GPT-OSS's gate and up units alternate (g0, u0, g1, u1, ...): ``[0::2]`` and ``[1::2]`` parts of one axis."""
    from combinability.module_stacks import Part, merge_blocks

    rng = np.random.default_rng(5)
    e, h, d = 3, 4, 5
    spec = cb.PermutationSpec({"router": ("G", "S"), "gate_up[0::2]": ("G", "S", "U"), "gate_up[1::2]": ("G", "S", "U"),
                               "down": ("G", "U", "S")},
                              stacks={"gate_up[0::2]": Part("gate_up", 2, 0, None, 2),
                                      "gate_up[1::2]": Part("gate_up", 2, 1, None, 2)})
    params = {"router": rng.normal(size=(e, d)), "gate_up": rng.normal(size=(e, d, 2 * h)),
              "down": rng.normal(size=(e, h, d))}
    finer = merge_blocks(spec, params)
    assert finer.kind("U") == Blocks("G", e, h) and cb.PermutationSpec.from_json(finer.to_json()) == finer
    np.testing.assert_array_equal(finer.joined(params)["gate_up[1::2]:G"][:, h:2 * h], params["gate_up"][1, :, 1::2])
    perm = random_permutation(finer, params, seed=6, derange=True)
    moved = apply_permutation(finer, perm, params)
    experts, units, stream = perm["G"], perm["U"].reshape(e, h) - h * perm["G"][:, None], perm["S"]
    for k in range(e):  # written out: unit j of expert k is unit units[k][j] of expert experts[k], gate and up
        columns = np.ravel(np.stack([2 * units[k], 2 * units[k] + 1], axis=1))
        np.testing.assert_array_equal(moved["gate_up"][k], params["gate_up"][experts[k]][stream][:, columns])
        np.testing.assert_array_equal(moved["down"][k], params["down"][experts[k]][units[k]][:, stream])
    with pytest.raises(PermutationSpecError, match="strided parts of 'w'"):
        cb.PermutationSpec({"w[0::2]": ("U", None), "w[1::3]": ("U", None)},
                           stacks={"w[0::2]": Part("w", 0, 0, None, 2), "w[1::3]": Part("w", 0, 1, None, 3)})
    with pytest.raises(PermutationSpecError, match="a step"):
        Part("w", 0, 2, None, 2)
