"""The framework-free part of the transformer tracers: feature spaces and the spec they add up to.

The facts are built here by hand, as a tracer would report them for small networks whose
forward passes are written below in plain numpy (torch's layout: weights ``(out, in)``,
packed query/key/value rows). Each derived spec is compared with the spec written out by
hand, and its transformations must keep the numpy function (f(T(θ)) = f(θ), norms folded).
"""

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.feature_spaces import (
    ANY,
    FIXED,
    Experts,
    FeatureSpaces,
    Heads,
    Norm,
    ReshapeGroups,
    spec_from_spaces,
)
from combinability.folding import NormFold, Reader
from combinability.kinds import Blocks, Orthogonal
from combinability.permutation import Repeat, apply_permutation

D, H, DH, M, T, FIN, C = 6, 2, 3, 5, 4, 3, 2
E, U = 3, 2  # experts, units per expert


def test_unions_keep_the_first_opened_space_and_both_marks():
    sp = FeatureSpaces()
    a, b, c, d = sp.new("a"), sp.new("b"), sp.new("c", 4), sp.new("d", name="custom")
    sp.mark([b, None])
    assert sp.union(b, a) == a and sp.find(b) == a
    assert sp.is_nonlinear(a) and not sp.is_nonlinear(c)
    assert sp.union(None, c) == c and sp.union(c, None) == c
    assert sp.union(c, FIXED) == FIXED and sp.is_fixed(c) and not sp.is_fixed(a)
    assert sp.union(a, c) == a and sp.is_fixed(b)  # fixed spreads through later unions
    assert not sp.is_fixed(None) and not sp.is_fixed(d)
    assert (sp.name(b), sp.name(d), sp.size[c], len(sp)) == ("P_a", "custom", 4, 5)
    with pytest.raises(ValueError, match="not a space"):
        sp.find(7)


def _layer_norm(x, w, b, centre):
    if centre:
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w + (0 if b is None else b)


def transformer(p, x, centre=True, tail=False):
    """Pre-norm block: embed + pos, x + attn(norm1 x), x + fc2(tanh(fc1(norm2 x))), norm, mean, head."""
    n = x.shape[0]
    h = x @ p["embed.weight"].T + p["embed.bias"] + p["pos"][0]
    y = _layer_norm(h, p["ln1.weight"], p.get("ln1.bias"), centre)
    qkv = y @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]
    q, k, v = (z.reshape(n, T, H, DH).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(DH)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(n, T, D)
    h = h + o @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    y = _layer_norm(h, p["ln2.weight"], p.get("ln2.bias"), centre)
    h = h + np.tanh(y @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T + p["fc2.bias"]
    y = _layer_norm(h, p["lnf.weight"], p.get("lnf.bias"), centre)
    y = np.tanh(y) if tail else y
    return y.mean(1) @ p["head.weight"].T + p["head.bias"]


HEAD = (Reader("head.weight", 1, "head.bias"),)


def transformer_facts(centre=True, final_readers=HEAD):
    """What a tracer reports for :func:`transformer` (LayerNorm when ``centre``, else RMSNorm: no shift)."""
    sp = FeatureSpaces()
    stream = sp.new("embed")
    binds = {"embed.weight": (stream, FIXED), "embed.bias": (stream,)}
    pos = sp.new("pos")
    binds["pos"] = (None, FIXED, pos)
    sp.union(stream, pos)
    norms = []

    def norm(name, readers):
        shift = f"{name}.bias" if centre else None
        binds.update({p: (stream,) for p in (f"{name}.weight", shift) if p})
        norms.append(Norm(stream, f"{name}.weight", shift, centre, readers))

    norm("ln1", (Reader("attn.in_proj_weight", 1, "attn.in_proj_bias"),))
    qk, vo, order = (sp.new(f"attn.{n}", name=f"attn.{n}") for n in ("qk", "vo", "heads"))
    binds |= {"attn.in_proj_weight": ((qk, qk, vo), stream), "attn.in_proj_bias": ((qk, qk, vo),)}
    out = sp.new("attn.out_proj")
    binds |= {"attn.out_proj.weight": (out, vo), "attn.out_proj.bias": (out,)}
    sp.union(stream, out)
    norm("ln2", (Reader("fc1.weight", 1, "fc1.bias"),))
    hidden, fc2 = sp.new("fc1"), sp.new("fc2")
    sp.mark([hidden])
    binds |= {"fc1.weight": (hidden, stream), "fc1.bias": (hidden,), "fc2.weight": (fc2, hidden), "fc2.bias": (fc2,)}
    sp.union(fc2, stream)
    norm("lnf", final_readers)
    binds |= {"head.weight": (FIXED, stream), "head.bias": (FIXED,)}
    heads = [Heads(qk, order, H, DH), Heads(vo, order, H, DH)]
    return sp, binds, norms, heads


def transformer_params(seed, centre=True):
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (D, FIN), "embed.bias": (D,), "pos": (1, T, D), "attn.in_proj_weight": (3 * D, D),
              "attn.in_proj_bias": (3 * D,), "attn.out_proj.weight": (D, D), "attn.out_proj.bias": (D,),
              "fc1.weight": (M, D), "fc1.bias": (M,), "fc2.weight": (D, M), "fc2.bias": (D,),
              "head.weight": (C, D), "head.bias": (C,)}
    for name in ("ln1", "ln2", "lnf"):
        shapes |= {f"{name}.weight": (D,)} | ({f"{name}.bias": (D,)} if centre else {})
    p = {k: rng.normal(size=s) / np.sqrt(s[-1]) for k, s in shapes.items()}
    return p | {k: 1 + 0.3 * rng.normal(size=D) for k in p if k.startswith("ln") and k.endswith("weight")}


def _stream_axes(stream):
    qkv = ("attn.qk", "attn.qk", "attn.vo")
    return {"embed.weight": (stream, None), "embed.bias": (stream,), "pos": (None, None, stream),
            "attn.in_proj_weight": (qkv, stream), "attn.in_proj_bias": (qkv,),
            "attn.out_proj.weight": (stream, "attn.vo"), "attn.out_proj.bias": (stream,),
            "fc1.weight": ("P_fc1", stream), "fc1.bias": ("P_fc1",), "fc2.weight": (stream, "P_fc1"),
            "fc2.bias": (stream,), "head.weight": (None, stream), "head.bias": (None,)}


def _keeps_function(forward, spec, folds, params, seed, **kw):
    folded = cb.fold_norms(params, folds)
    np.testing.assert_allclose(forward(folded, X, **kw), forward(params, X, **kw), atol=1e-10)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=seed), folded)
    assert max(float(np.abs(moved[k] - folded[k]).max()) for k in folded) > 0.1
    np.testing.assert_allclose(forward(moved, X, **kw), forward(params, X, **kw), atol=1e-10)


X = np.random.default_rng(0).normal(size=(5, T, FIN))


@pytest.mark.parametrize("centre", [True, False], ids=["layernorm", "rmsnorm"])
def test_a_foldable_linear_stream_is_orthogonal_with_its_norms_required(centre):
    sp, binds, norms, heads = transformer_facts(centre)
    spec, folds = spec_from_spaces(sp, binds, norms, heads)
    norm_params = [(f"{n}.{leaf}", v) for n in ("ln1", "ln2", "lnf") for leaf, v in (("weight", 1.0), ("bias", 0.0))
                   if centre or leaf == "weight"]
    expected = _stream_axes("P_embed") | {p: (None,) for p, _ in norm_params}
    assert dict(spec.axes_to_perm) == expected and list(spec.axes_to_perm) == list(binds)
    assert dict(spec.kinds) == {"attn.qk": Blocks("attn.heads", H, DH), "attn.vo": Blocks("attn.heads", H, DH),
                                "P_embed": Orthogonal(fix_ones=centre, requires=tuple(norm_params))}
    assert folds == [NormFold(f"{n}.weight", f"{n}.bias" if centre else None, readers) for n, readers in
                     (("ln1", (Reader("attn.in_proj_weight", 1, "attn.in_proj_bias"),)),
                      ("ln2", (Reader("fc1.weight", 1, "fc1.bias"),)), ("lnf", HEAD))]
    _keeps_function(transformer, spec, folds, transformer_params(1, centre), seed=2, centre=centre)


def test_a_stream_whose_norm_cannot_fold_is_a_plain_permutation():
    sp, binds, norms, heads = transformer_facts(final_readers=None)
    spec, folds = spec_from_spaces(sp, binds, norms, heads)
    assert folds == [] and "P_embed" not in spec.kinds
    assert dict(spec.axes_to_perm) == _stream_axes("P_embed") | {
        f"{n}.{leaf}": ("P_embed",) for n in ("ln1", "ln2", "lnf") for leaf in ("weight", "bias")}
    _keeps_function(transformer, spec, folds, transformer_params(3), seed=4, tail=True)  # tanh before the head


def test_a_norm_read_by_a_bias_free_layer_keeps_its_shift_in_the_stream():
    """The final norm's reader has no bias: its scale folds into the reader, its shift stays (divided by the
    scale) and moves with the stream, which stays orthogonal."""
    sp, binds, norms, heads = transformer_facts(final_readers=(Reader("head.weight", 1, None),))
    spec, folds = spec_from_spaces(sp, binds, norms, heads)
    kind = spec.kind("P_embed")
    assert isinstance(kind, Orthogonal) and "lnf.weight" in dict(kind.requires)
    assert "lnf.bias" not in dict(kind.requires)
    assert spec.axes_to_perm["lnf.bias"] == ("P_embed",) and spec.axes_to_perm["lnf.weight"] == (None,)
    assert folds[-1] == NormFold("lnf.weight", "lnf.bias", (Reader("head.weight", 1, None),), keep_shift=True)
    params = transformer_params(3)
    folded = cb.fold_norms(params, folds)
    np.testing.assert_allclose(folded["lnf.bias"], params["lnf.bias"] / params["lnf.weight"])
    np.testing.assert_array_equal(folded["head.bias"], params["head.bias"])  # nothing folded into it
    _keeps_function(transformer, spec, folds, params, seed=4)


def test_a_tied_reader_takes_no_fold_and_keeps_the_stream_a_permutation():
    sp, binds, norms, heads = transformer_facts()
    spec, folds = spec_from_spaces(sp, binds, norms, heads, tied={"head.weight"})
    assert folds == [] and "P_embed" not in spec.kinds  # folding lnf into a tied head would change its twin
    assert spec.axes_to_perm["lnf.bias"] == ("P_embed",)
    _keeps_function(transformer, spec, folds, transformer_params(5), seed=6)


def test_two_uses_of_a_tied_weight_merge_their_spaces_axis_by_axis():
    sp = FeatureSpaces()
    vocab, stream, head_in, out = sp.new("wte"), sp.new("stream"), sp.new("ln_f"), sp.new("head")
    tied = sp.tie("w", [None, stream], [out, head_in])
    assert sp.find(head_in) == sp.find(stream) and sp.is_fixed(out) and not sp.is_fixed(stream)
    assert sp.is_fixed(tied[0]) and sp.find(tied[1]) == sp.find(stream) and not sp.is_fixed(vocab)
    qk, v = sp.new("qk"), sp.new("v")
    assert sp.tie("qkv", [(qk, qk, v)], [(v, qk, qk)]) == [(qk, qk, qk)] and sp.find(v) == qk
    with pytest.raises(TracingError, match="'w' is used by two layers with 2 and 1 axes"):
        sp.tie("w", [None, stream], [stream])
    with pytest.raises(TracingError, match="'qkv' is used by two layers that split an axis differently"):
        sp.tie("qkv", [(qk, qk, v)], [qk])


def moe(p, x):
    """Dense mixture: fc2(repeat(softmax(gate x), U) * relu(fc1 x)), experts stored as blocks of fc1's rows."""
    g = np.exp(x @ p["gate.weight"].T)
    g = np.repeat(g / g.sum(-1, keepdims=True), U, axis=-1)
    return (g * np.maximum(x @ p["fc1.weight"].T + p["fc1.bias"], 0)) @ p["fc2.weight"].T + p["fc2.bias"]


def moe_facts(fixed_gate=False):
    sp = FeatureSpaces()
    gate, hidden = sp.new("gate"), sp.new("fc1")
    sp.mark([gate])  # softmax
    repeated = sp.new("repeat")
    sp.mark([sp.union(hidden, repeated)])  # relu, and the product with the gates
    if fixed_gate:
        sp.fix([gate])
    binds = {"gate.weight": (gate, FIXED), "fc1.weight": (hidden, FIXED), "fc1.bias": (hidden,),
             "fc2.weight": (FIXED, hidden), "fc2.bias": (FIXED,)}
    return sp, binds, [Experts(repeated, gate, E, U)]


def test_experts_are_blocks_moving_with_their_gate():
    sp, binds, experts = moe_facts()
    spec, folds = spec_from_spaces(sp, binds, experts=experts)
    assert dict(spec.kinds) == {"P_fc1": Blocks("P_gate", E, U)} and folds == []
    assert dict(spec.axes_to_perm) == {"gate.weight": ("P_gate", None), "fc1.weight": ("P_fc1", None),
                                       "fc1.bias": ("P_fc1",), "fc2.weight": (None, "P_fc1"), "fc2.bias": (None,)}
    rng = np.random.default_rng(5)
    shapes = {"gate.weight": (E, FIN), "fc1.weight": (E * U, FIN), "fc1.bias": (E * U,), "fc2.weight": (C, E * U),
              "fc2.bias": (C,)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    x = X[:, 0]
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, params, seed=6), params)
    np.testing.assert_allclose(moe(moved, x), moe(params, x), atol=1e-12)


def test_a_fixed_gate_fixes_its_experts():
    sp, binds, experts = moe_facts(fixed_gate=True)
    spec, _ = spec_from_spaces(sp, binds, experts=experts)
    assert not spec.kinds and all(e is None for axes in spec.axes_to_perm.values() for e in axes)


def _split_heads(fix_heads=False, meet=True):
    """Query, key and value spaces split into heads, as a jaxpr shows them (q·k contracts their within-head axes)."""
    sp = FeatureSpaces()
    spaces = {n: (sp.new(n), sp.new(f"{n}/heads"), sp.new(f"{n}/head_dim")) for n in ("q", "k", "v")}
    (q, hq, cq), (k, hk, ck), (v, hv, cv) = spaces.values()
    sp.union(cq, ck)  # scores: contracted within-head axes
    if meet:
        sp.union(hq, hk)  # scores: batched head axes
    sp.union(hk, hv)  # mixing: the weights' head axis meets the value's
    if fix_heads:
        sp.fix([hv])
    binds = {f"{n}.kernel": (FIXED, s) for n, (s, _, _) in spaces.items()}
    return sp, binds, [Heads(s, h, H, DH, c) for s, h, c in spaces.values()]


def test_query_and_key_heads_contracted_together_are_one_name():
    sp, binds, heads = _split_heads()
    spec, _ = spec_from_spaces(sp, binds, heads=heads)
    assert dict(spec.axes_to_perm) == {"q.kernel": (None, "P_q"), "k.kernel": (None, "P_q"), "v.kernel": (None, "P_v")}
    assert dict(spec.kinds) == {"P_q": Blocks("P_q/heads", H, DH), "P_v": Blocks("P_q/heads", H, DH)}


def test_fixed_heads_fix_their_spaces():
    sp, binds, heads = _split_heads(fix_heads=True)
    spec, _ = spec_from_spaces(sp, binds, heads=heads)
    assert not spec.kinds and all(axes == (None, None) for axes in spec.axes_to_perm.values())


def test_a_fixed_within_head_axis_keeps_the_heads_moving_as_repeats_of_their_order():
    sp, binds, heads = _split_heads()
    sp.fix([heads[0].within])  # rotary tables along q's (and so k's) head_dim
    spec, _ = spec_from_spaces(sp, binds, heads=heads)
    qk = Repeat("P_q/heads", DH)  # each head's DH units move with it, in order
    assert dict(spec.axes_to_perm) == {"q.kernel": (None, qk), "k.kernel": (None, qk), "v.kernel": (None, "P_v")}
    assert dict(spec.kinds) == {"P_v": Blocks("P_q/heads", H, DH)}  # values keep their within-head permutation
    kernel = np.arange(2 * H * DH, dtype=float).reshape(2, H * DH)
    moved = apply_permutation(spec, {"P_q/heads": np.array([1, 0]), "P_v": np.arange(H * DH)},
                              dict.fromkeys(binds, kernel))["q.kernel"]
    np.testing.assert_array_equal(moved, np.concatenate([kernel[:, DH:], kernel[:, :DH]], axis=1))  # heads swapped


def test_grouped_query_heads_are_blocks_of_the_key_value_order_and_rigid_spaces_repeat_them():
    sp = FeatureSpaces()
    q, k, out = sp.new("q"), sp.new("k"), sp.new("o")
    q_order, kv_order = sp.new("q.heads", name="q.heads"), sp.new("k.heads", name="k.heads")
    heads = [Heads(q, q_order, H, DH), Heads(k, kv_order, 2, DH), Heads(q_order, kv_order, 2, H // 2),
             Heads(out, q_order, H, DH)]
    sp.rigid([q, k, out])
    binds = {"q.w": (q, FIXED), "k.w": (k, FIXED), "o.w": (FIXED, out)}
    spec, _ = spec_from_spaces(sp, binds, heads=heads)
    assert dict(spec.axes_to_perm) == {"q.w": (Repeat("q.heads", DH), None), "k.w": (Repeat("k.heads", DH), None),
                                       "o.w": (None, Repeat("q.heads", DH))}
    assert dict(spec.kinds) == {"q.heads": Blocks("k.heads", 2, H // 2)}
    with pytest.raises(TracingError, match="rigid heads"):
        spec_from_spaces(sp, {"qkv.w": ((q, q, k), FIXED)}, heads=heads)


def test_inconsistent_heads_and_bad_entries_are_refused():
    sp, binds, heads = _split_heads(meet=False)
    with pytest.raises(TracingError, match="within-head axes of 'k' and 'q' meet but their heads do not; do this"):
        spec_from_spaces(sp, binds, heads=heads, hint="; do this")
    sp, binds, heads = _split_heads()
    with pytest.raises(TracingError, match="within-head axis of 'q' is bound"):
        spec_from_spaces(sp, binds | {"scale": (heads[0].within,)}, heads=heads)
    sp, binds, heads = _split_heads()
    with pytest.raises(TracingError, match="both heads and experts"):
        spec_from_spaces(sp, binds, heads=heads, experts=[Experts(heads[2].space, heads[0].group, H + 1, DH)])
    with pytest.raises(ValueError, match="'w': an axis is bound to a space.*got 'P_a'"):
        spec_from_spaces(FeatureSpaces(), {"w": ("P_a",)})
    sp = FeatureSpaces()
    a = sp.new("a")
    with pytest.raises(TracingError, match="segment of a packed axis is fixed"):
        spec_from_spaces(sp, {"w": ((a, FIXED), None)})


def test_reshapes_split_heads_merge_them_back_and_spread_gates():
    """What a tracer reports for (B, T, 12) -> (B, T, 3, 4) -> (B, T, 12), tokens merged, and a gate repeat."""
    sp = FeatureSpaces()
    groups = ReshapeGroups(sp, "; hint")
    q = sp.new("attn.q", 12)
    split = groups.reshape((2, 5, 12), [FIXED, FIXED, q], (2, 5, 3, 4), "reshape 1", "attn")
    heads, within = split[2], split[3]
    assert split[:2] == [FIXED, FIXED] and sp.name(heads) != sp.name(within)
    assert groups.heads() == [Heads(q, heads, 3, 4, within)]
    assert groups.reshape((2, 5, 3, 4), split, (2, 5, 12), "reshape 2", "attn") == [FIXED, FIXED, q]
    assert groups.reshape((2, 5, 12), [FIXED, FIXED, q], (2, 5, 3, 4), "again", "attn") == split  # one split
    assert groups.reshape((2, 5, 12), [FIXED, FIXED, q], (10, 12), "tokens", "attn") == [FIXED, q]
    assert groups.reshape((1, 12), [ANY, q], (12,), "squeeze", "attn") == [q]
    gate = sp.new("router", 4)
    (repeated,) = groups.reshape((4, 3), [gate, ANY], (12,), "repeat", "moe")
    assert groups.experts() == [Experts(repeated, gate, 4, 3)]


@pytest.mark.parametrize("src, dst, match", [
    ((12,), (2, 6), "split as 3x4 and as 2x6"),
    ((6, 4), (4, 6), r"a reshape of feature axes \(6, 4\) -> \(4, 6\)"),
])
def test_reshapes_that_cannot_be_followed_are_refused(src, dst, match):
    sp = FeatureSpaces()
    groups = ReshapeGroups(sp, "; pass spec= by hand")
    q = sp.new("q", 12)
    groups.reshape((12,), [q], (3, 4), "first", "attn")
    labels = [q] if len(src) == 1 else [sp.new("a", 6), sp.new("b", 4)]
    with pytest.raises(TracingError, match=match + ".*pass spec= by hand"):
        groups.reshape(src, labels, dst, "op", "attn")


def test_a_merge_of_axes_no_split_made_is_refused():
    sp = FeatureSpaces()
    groups = ReshapeGroups(sp)
    with pytest.raises(TracingError, match="merges a head axis and a within-head axis that no split made"):
        groups.reshape((3, 4), [sp.new("h", 3), sp.new("d", 4)], (12,), "merge", "attn")
