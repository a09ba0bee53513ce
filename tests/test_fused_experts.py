"""Experts held as one parameter of shape (experts, ...), as transformers 5 holds Mixtral's, OLMoE's and Qwen-MoE's.

``gate_up_proj (E, 2h, d)`` holds each expert's gate rows then its up rows, ``down_proj (E, d, h)``
its output layer; a router's top-k picks the experts. transformers 5 runs them three ways, each
written out here as it does: a loop over the experts hit indexing ``W[e]`` (``eager``),
``W[expert_ids]`` per token with ``torch.bmm`` (``batched_mm``), and ``torch._grouped_mm`` over the
tokens sorted by expert (``grouped_mm``, the default). References: the model's own forward pass in
float64, and a planted map written with torch indexing (experts reordered, each expert's hidden units
in an order of its own).
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.kinds import Blocks

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

D, H, E, K, V = 8, 12, 4, 2, 16  # torch._grouped_mm needs rows of multiples of 16 bytes
GROUPED = getattr(torch, "_grouped_mm", None)


class FusedExperts(nn.Module):
    """Experts as transformers 5 holds them: ``gate_up_proj (E, 2H, D)``, ``down_proj (E, D, H)`` (``transposed``:
    ``(E, D, 2H)`` and ``(E, H, D)``, read as ``x @ W``), optional biases."""

    def __init__(self, how: str, bias: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.how, self.transposed = how, transposed
        up, down = ((E, D, 2 * H), (E, H, D)) if transposed else ((E, 2 * H, D), (E, D, H))
        self.gate_up_proj = nn.Parameter(torch.randn(*up) / D**0.5)
        self.down_proj = nn.Parameter(torch.randn(*down) / H**0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * H) / 4) if bias else None
        self.down_proj_bias = nn.Parameter(torch.randn(E, D) / 4) if bias else None

    def _gated(self, z):
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x, ids, weights):
        return getattr(self, self.how)(x, ids, weights)

    def eager(self, x, ids, weights):
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=E + 1).permute(2, 1, 0)  # one more: transformers' padding expert
        for idx in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            idx = idx[0]
            if idx == E:
                continue
            slot, rows = torch.where(mask[idx])
            w1, w2 = self.gate_up_proj[idx], self.down_proj[idx]
            b1 = self.gate_up_proj_bias[idx] if self.gate_up_proj_bias is not None else None
            b2 = self.down_proj_bias[idx] if self.down_proj_bias is not None else None
            z = x[rows] @ w1 + (b1 if b1 is not None else 0) if self.transposed else F.linear(x[rows], w1, b1)
            z = self._gated(z)
            z = z @ w2 + (b2 if b2 is not None else 0) if self.transposed else F.linear(z, w2, b2)
            out.index_add_(0, rows, z * weights[rows, slot, None])
        return out

    def batched_mm(self, x, ids, weights):
        chosen = ids.reshape(-1)
        tokens = x.repeat_interleave(K, dim=0)

        def linear(z, w, b):
            if self.transposed:
                z = torch.bmm(z.unsqueeze(1), w).squeeze(1)
            else:
                z = torch.bmm(w, z.unsqueeze(-1)).squeeze(-1)
            return z if b is None else z + b

        b1 = self.gate_up_proj_bias[chosen] if self.gate_up_proj_bias is not None else None
        b2 = self.down_proj_bias[chosen] if self.down_proj_bias is not None else None
        z = self._gated(linear(tokens, self.gate_up_proj[chosen], b1))
        z = linear(z, self.down_proj[chosen], b2) * weights.reshape(-1).unsqueeze(-1)
        return z.view(x.shape[0], K, D).sum(dim=1)

    def grouped_mm(self, x, ids, weights):
        chosen, order = torch.sort(ids.reshape(-1))
        tokens = x[order // K]
        offsets = torch.cumsum(torch.histc(chosen.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)

        def linear(z, w, b):
            w = w if self.transposed else w.transpose(-2, -1)
            if w.shape[0] != E:  # a size read off the experts' weights
                raise ValueError("one weight per expert")
            z = GROUPED(z, w, offs=offsets)
            return z if b is None else z + b

        b1 = self.gate_up_proj_bias[chosen] if self.gate_up_proj_bias is not None else None
        b2 = self.down_proj_bias[chosen] if self.down_proj_bias is not None else None
        z = self._gated(linear(tokens, self.gate_up_proj, b1))
        z = linear(z, self.down_proj, b2) * weights.reshape(-1)[order].unsqueeze(-1)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.shape[0])
        return z[back].view(x.shape[0], K, D).sum(dim=1)


class MoeLM(nn.Module):
    """Embedding, a top-2 router over the experts (renormalised weights), a residual, a head."""

    def __init__(self, how: str, bias: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.router = nn.Linear(D, E, bias=False)
        self.experts = FusedExperts(how, bias, transposed)

    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(-1, D)
        weights, ids = torch.topk(F.softmax(self.router(x), dim=-1), K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        h = x + self.experts(x, ids, weights)
        return self.head(h).reshape(*input_ids.shape, V)


HOWS = ["eager", "batched_mm"] + (["grouped_mm"] if GROUPED is not None else [])


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, (4, 16)))


def _model(how: str, seed: int, **kw) -> MoeLM:
    torch.manual_seed(seed)
    return MoeLM(how, **kw).eval()


def _planted(a: MoeLM, experts: list[int], units: list[np.ndarray]) -> MoeLM:
    """``a`` with expert ``k`` of the result being expert ``experts[k]`` of ``a``, its hidden units in the order
    ``units[k]``: the same function."""
    b = MoeLM(a.experts.how, a.experts.gate_up_proj_bias is not None, a.experts.transposed).eval()
    b.load_state_dict(a.state_dict())
    m, t = a.experts, a.experts.transposed
    with torch.no_grad():
        b.router.weight.copy_(a.router.weight[experts])
        for k, (e, u) in enumerate(zip(experts, units, strict=True)):
            rows = torch.as_tensor(np.r_[u, H + u])
            b.experts.gate_up_proj[k] = m.gate_up_proj[e][:, rows] if t else m.gate_up_proj[e][rows]
            b.experts.down_proj[k] = m.down_proj[e][torch.as_tensor(u)] if t else m.down_proj[e][:, torch.as_tensor(u)]
            if m.gate_up_proj_bias is not None:
                b.experts.gate_up_proj_bias[k] = m.gate_up_proj_bias[e][rows]
                b.experts.down_proj_bias[k] = m.down_proj_bias[e]
    return b


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("variant", [{}, {"bias": True}, {"transposed": True}], ids=["plain", "bias", "transposed"])
def test_each_experts_units_move_their_own_way_and_keep_the_function(how, variant):
    a = _model(how, 0, **variant)
    ids = _ids()
    spec, _ = cb.derive_symmetries(a, ids)
    gate = spec.axes_to_perm["router.weight"][0]
    units = {spec.kind(p) for name in spec.axes_to_perm if name.startswith("experts.")
             for p in spec.axes_to_perm[name] if isinstance(p, str) and p != gate and spec.kind(p) != spec.kind("")}
    assert Blocks(gate, E, H) in units  # each expert's hidden units permuted per expert, experts with the router
    wide = how != "grouped_mm"  # torch._grouped_mm runs in float32 at most
    tol = 1e-10 if wide else 1e-5
    state = {k: (v.double() if wide else v).detach().numpy().copy() for k, v in a.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=5, derange=True), state)
    with torch.no_grad():
        reference = (a.double() if wide else a)(ids).numpy()
        a.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
        np.testing.assert_allclose(a(ids).numpy(), reference, rtol=tol, atol=tol)
        assert not np.allclose(moved["experts.gate_up_proj"], state["experts.gate_up_proj"])


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("variant", [{}, {"bias": True}, {"transposed": True}], ids=["plain", "bias", "transposed"])
def test_a_planted_order_of_experts_and_of_each_experts_units_is_undone(how, variant):
    a = _model(how, 1, **variant)
    rng = np.random.default_rng(2)
    b = _planted(a, [2, 0, 3, 1], [rng.permutation(H) for _ in range(E)])
    ids = _ids(3)
    with torch.no_grad():
        np.testing.assert_allclose(b(ids).numpy(), a(ids).numpy(), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=ids).align("weight")
    gate = pair.spec.axes_to_perm["router.weight"][0]
    np.testing.assert_array_equal(pair.permutation[gate], np.argsort([2, 0, 3, 1]))
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


def test_experts_weights_used_any_other_way_are_refused_by_name():
    class Scaled(MoeLM):
        def forward(self, input_ids):
            x = self.embed(input_ids).reshape(-1, D)
            _, ids = torch.topk(self.router(x), 1, dim=-1)
            w = self.experts.gate_up_proj[ids[:, 0]] * 2.0  # not a product the tracer follows
            return self.head(x + torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)[:, :D]).reshape(*input_ids.shape, V)

    with pytest.raises(TracingError, match=r"experts' weights held as one parameter \('experts.gate_up_proj'\)"):
        cb.derive_symmetries(Scaled("eager"), _ids())


def test_a_branch_on_other_values_is_still_refused():
    class Branchy(MoeLM):
        def forward(self, input_ids):
            x = self.embed(input_ids).reshape(-1, D)
            if x.sum() > 0:  # the example's way would be taken for every input
                x = x * 2
            return self.head(x).reshape(*input_ids.shape, V)

    with pytest.raises(TracingError, match="branches on the values of a tensor"):
        cb.derive_symmetries(Branchy("eager"), _ids())


class OssLM(nn.Module):
    """GPT-OSS's way, written out: grouped-query attention with a learned sink per query head (``torch.cat([scores,
    sinks], -1)``, dropped after the softmax), rotary embeddings as ``x1 * cos - x2 * sin``, and experts whose gate
    and up units alternate (``gate_up[..., ::2]``, ``[..., 1::2]``), clamped, with biases, run by ``how``."""

    HEADS, KV, DH = 4, 2, 4

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.embed, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.q = nn.Linear(D, self.HEADS * self.DH)
        self.k, self.v = nn.Linear(D, self.KV * self.DH), nn.Linear(D, self.KV * self.DH)
        self.o = nn.Linear(self.HEADS * self.DH, D)
        self.sinks = nn.Parameter(torch.randn(self.HEADS))
        self.router = nn.Linear(D, E)
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * H) / D**0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * H) / 2)
        self.down_proj = nn.Parameter(torch.randn(E, H, D) / H**0.5)
        self.down_proj_bias = nn.Parameter(torch.randn(E, D) / 2)

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def attend(self, h):
        b, t, _ = h.shape
        q = self.q(h).view(b, t, self.HEADS, self.DH).transpose(1, 2)
        k = self.k(h).view(b, t, self.KV, self.DH).transpose(1, 2)
        v = self.v(h).view(b, t, self.KV, self.DH).transpose(1, 2)
        angle = torch.arange(t)[:, None] * 0.3 ** torch.arange(self.DH // 2)[None]
        q, k = self.rotate(q, angle.cos(), angle.sin()), self.rotate(k, angle.cos(), angle.sin())
        rep = self.HEADS // self.KV
        k = k[:, :, None].expand(b, self.KV, rep, t, self.DH).reshape(b, self.HEADS, t, self.DH)
        v = v[:, :, None].expand(b, self.KV, rep, t, self.DH).reshape(b, self.HEADS, t, self.DH)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.DH**-0.5
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([scores, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1)[..., :-1]
        return self.o(torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1))

    def gated(self, z):
        gate, up = z[..., ::2], z[..., 1::2]
        gate, up = gate.clamp(min=None, max=2.0), up.clamp(min=-2.0, max=2.0)
        return (up + 1) * (gate * torch.sigmoid(gate * 1.7))

    def experts(self, x, ids, weights):
        if self.how == "grouped_mm":
            chosen, order = torch.sort(ids.reshape(-1))
            offsets = torch.cumsum(torch.histc(chosen.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
            z = GROUPED(x[order // K], self.gate_up_proj, offs=offsets)
            z.add_(self.gate_up_proj_bias[chosen])
            z = GROUPED(self.gated(z), self.down_proj, offs=offsets) + self.down_proj_bias[chosen]
            z = z * weights.reshape(-1)[order].unsqueeze(-1)
            back = torch.empty_like(order)
            back[order] = torch.arange(order.shape[0])
            return z[back].view(x.shape[0], K, D).sum(dim=1)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)
        for idx in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            idx = idx[0]
            slot, rows = torch.where(mask[idx])
            z = self.gated(x[rows] @ self.gate_up_proj[idx] + self.gate_up_proj_bias[idx])
            z = z @ self.down_proj[idx] + self.down_proj_bias[idx]
            out.index_add_(0, rows, z * weights[rows, slot, None])
        return out

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.attend(h)
        x = h.reshape(-1, D)
        top, ids = torch.topk(self.router(x), K, dim=-1)
        x = x + self.experts(x, ids, F.softmax(top, dim=1))
        return self.head(x).reshape(*input_ids.shape, V)


@pytest.mark.parametrize("how", ["eager"] + (["grouped_mm"] if GROUPED is not None else []))
def test_gpt_oss_style_sinks_rotary_and_alternating_experts_keep_the_function(how):
    torch.manual_seed(4)
    a = OssLM(how).eval()
    ids = _ids(5)
    spec, _ = cb.derive_symmetries(a, ids)
    q_heads = spec.axes_to_perm["sinks"][0]
    assert isinstance(spec.kind(q_heads), Blocks) and spec.axes_to_perm["o.weight"][1].name == q_heads  # with the heads
    assert spec.stacks["gate_up_proj[1::2]"].step == 2 and spec.kind(spec.axes_of("down_proj")[1]) == Blocks(
        spec.axes_to_perm["router.weight"][0], E, H)
    wide = how != "grouped_mm"
    tol = 1e-10 if wide else 1e-5
    state = {k: (v.double() if wide else v).detach().numpy().copy() for k, v in a.state_dict().items()}
    perm = cb.random_permutation(spec, state, seed=7, derange=True)
    moved = cb.apply_permutation(spec, perm, state)
    with torch.no_grad():
        reference = (a.double() if wide else a)(ids).numpy()
        a.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
        np.testing.assert_allclose(a(ids).numpy(), reference, rtol=tol, atol=tol)
    np.testing.assert_array_equal(moved["sinks"], state["sinks"][perm[q_heads]])  # each sink moved with its head
    # expert 0's gate and up columns moved in pairs: written out from the permutation
    experts, units = perm[spec.axes_to_perm["router.weight"][0]], perm[spec.axes_of("down_proj")[1]]
    own = units.reshape(E, H)[0] - H * experts[0]
    pairs = np.ravel(np.stack([2 * own, 2 * own + 1], axis=1))
    np.testing.assert_array_equal(moved["gate_up_proj_bias"][0], state["gate_up_proj_bias"][experts[0]][pairs])


def _keeps_outputs_under_a_random_map(model: nn.Module, spec: cb.PermutationSpec, ids: torch.Tensor, seed: int,
                                      tol: float = 1e-10) -> tuple[dict, dict, dict]:
    """A random map of ``spec`` applied to ``model``'s state in float64 keeps its outputs on ``ids`` (``model``
    ends holding the moved state); returns the map, the state and the moved state."""
    state = {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}
    perm = cb.random_permutation(spec, state, seed=seed, derange=True)
    moved = cb.apply_permutation(spec, perm, state)
    model = model.double()
    with torch.no_grad():
        reference = model(ids).numpy()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
        np.testing.assert_allclose(model(ids).numpy(), reference, rtol=tol, atol=tol)
    return perm, state, moved


class BiasedRouterLM(MoeLM):
    """LFM2-MoE's and GLM-4.5's router: its weight read in float (``self.weight.type(torch.float32)``), sigmoid
    scores, and a saved buffer of one bias per expert added for the choice only (``e_score_correction_bias``)."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.router_weight = nn.Parameter(torch.randn(E, D) / D**0.5)
        self.register_buffer("expert_bias", torch.randn(E))
        del self.router

    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(-1, D)
        scores = F.linear(x.type(torch.float32), self.router_weight.type(torch.float32)).sigmoid()
        _, ids = torch.topk(scores + self.expert_bias, K, dim=-1)
        weights = torch.gather(scores, dim=1, index=ids).type_as(x)
        h = x + self.experts(x, ids, weights / weights.sum(dim=-1, keepdim=True))
        return self.head(h).reshape(*input_ids.shape, V)


def test_a_routers_float_weight_and_saved_expert_bias_move_with_the_experts():
    torch.manual_seed(6)
    a = BiasedRouterLM("eager").eval()
    ids = _ids(7)
    spec, _ = cb.derive_symmetries(a, ids)
    gate = spec.axes_to_perm["router_weight"][0]
    assert spec.axes_to_perm["expert_bias"] == (gate,)
    assert spec.kind(spec.axes_of("experts.down_proj")[2]) == Blocks(gate, E, H)
    perm, state, moved = _keeps_outputs_under_a_random_map(a, spec, ids, seed=8, tol=1e-6)  # a float32 router
    np.testing.assert_array_equal(moved["expert_bias"], state["expert_bias"][perm[gate]])


class GroupRoutedLM(MoeLM):
    """DeepSeek-V3's and GLM-4.5's group-limited routing, written out: sigmoid scores plus a saved correction bias,
    viewed as ``(tokens, groups, experts per group)``, each group scored by its top-2 scores summed, the best
    ``top_groups`` groups kept, the other groups' experts masked out, then the top-k."""

    def __init__(self, how: str, groups: int, top_groups: int) -> None:
        super().__init__(how)
        self.groups, self.top_groups = groups, top_groups
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 4)

    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(-1, D)
        scores = self.router(x).sigmoid()
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(-1, self.groups, E // self.groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.top_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.groups, E // self.groups).reshape(-1, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=K, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        h = x + self.experts(x, ids, weights / weights.sum(dim=-1, keepdim=True))
        return self.head(h).reshape(*input_ids.shape, V)


@pytest.mark.parametrize("groups, top_groups", [(1, 1), (2, 1)])
def test_group_limited_routing_moves_experts_within_their_groups(groups, top_groups):
    torch.manual_seed(9)
    a = GroupRoutedLM("eager", groups, top_groups).eval()
    ids = _ids(9)
    spec, _ = cb.derive_symmetries(a, ids)
    gate = spec.axes_to_perm["router.weight"][0]
    assert spec.axes_to_perm["e_score_correction_bias"] == (gate,)
    if groups == 1:  # any order of the experts, each expert's units its own way
        assert spec.kind(gate) == cb.Neuron() and spec.kind(spec.axes_of("experts.down_proj")[2]) == Blocks(gate, E, H)
    else:  # the groups move whole, the experts inside each: swapping two experts of different groups is no symmetry
        assert spec.kind(gate) == Blocks(f"{gate}.groups", groups, E // groups)
    state = {k: v.detach().double().numpy().copy() for k, v in a.state_dict().items()}
    perm = cb.random_permutation(spec, state, seed=10, derange=True)
    moved = cb.apply_permutation(spec, perm, state)
    a = a.double()
    with torch.no_grad():
        reference = a(ids).numpy()
        a.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
        np.testing.assert_allclose(a(ids).numpy(), reference, rtol=1e-10, atol=1e-10)
        if groups > 1:  # the control: experts 0 and 2 (of groups 0 and 1) swapped changes the choices
            swap = [2, 1, 0, 3]
            crossed = dict(state, **{"router.weight": state["router.weight"][swap],
                                     "e_score_correction_bias": state["e_score_correction_bias"][swap],
                                     "experts.gate_up_proj": state["experts.gate_up_proj"][swap],
                                     "experts.down_proj": state["experts.down_proj"][swap]})
            a.load_state_dict({k: torch.as_tensor(v) for k, v in crossed.items()})
            assert not np.allclose(a(ids).numpy(), reference, rtol=1e-6, atol=1e-6)


def test_a_value_per_head_used_otherwise_than_as_a_sink_is_refused_by_name():
    class SlopesLM(OssLM):
        """Learned ALiBi-style slopes per head, multiplied by distances and added to the scores: not followed."""

        def attend(self, h):
            b, t, _ = h.shape
            q = self.q(h).view(b, t, self.HEADS, self.DH).transpose(1, 2)
            k = self.k(h).view(b, t, self.KV, self.DH).transpose(1, 2)
            k = k[:, :, None].expand(b, self.KV, 2, t, self.DH).reshape(b, self.HEADS, t, self.DH)
            distance = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).float()
            scores = torch.matmul(q, k.transpose(2, 3)) + self.sinks.reshape(1, -1, 1, 1) * distance
            return self.o(torch.matmul(F.softmax(scores, dim=-1), k).transpose(1, 2).reshape(b, t, -1))

    torch.manual_seed(11)
    with pytest.raises(TracingError, match=r"a value per head viewed as \(1, heads, 1, 1\) is followed only when"):
        cb.derive_symmetries(SlopesLM("eager").eval(), _ids())


def _sparse_mixer(scores: torch.Tensor, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparse-mixer routing (inference), written as transformers writes it: the top expert, the scores
    too far below it masked out, a softmax read at the choice; then the same once more without the first choice."""
    chosen = []
    masked_scores = scores
    for _ in range(2):
        threshold, top = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=threshold)
        mask = ((threshold - scores) / factor) > (2 * eps)
        gates = torch.softmax(masked_scores.masked_fill(mask, float("-inf")), dim=-1)
        chosen.append((gates.gather(dim=-1, index=top), top))
        masked_scores = torch.scatter(masked_scores, -1, top, float("-inf"))
    return torch.cat([c[0] for c in chosen], dim=-1), torch.cat([c[1] for c in chosen], dim=-1)


class SparseMixerLM(MoeLM):
    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(-1, D)
        weights, ids = _sparse_mixer(self.router(x))
        return self.head(x + self.experts(x, ids, weights)).reshape(*input_ids.shape, V)


def test_phimoe_style_sparse_mixer_routing_moves_the_experts():
    torch.manual_seed(15)
    a = SparseMixerLM("eager").eval()
    ids = _ids(16)
    spec, _ = cb.derive_symmetries(a, ids)
    gate = spec.axes_to_perm["router.weight"][0]
    assert spec.kind(spec.axes_of("experts.down_proj")[2]) == Blocks(gate, E, H)
    _keeps_outputs_under_a_random_map(a, spec, ids, seed=17)


class ModuleSparseMixerLM(nn.Module):
    """The sparse mixer routing to experts held as separate modules (transformers 4.x's PhiMoE): the two choices
    concatenated (``torch.cat``) before ``one_hot`` picks each expert's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)) for _ in range(E)])

    def forward(self, input_ids):
        x = self.embed(input_ids).reshape(-1, D)
        weights, ids = _sparse_mixer(self.router(x))
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, rows = torch.where(mask[e])
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return self.head(x + out).reshape(*input_ids.shape, V)


def test_a_sparse_mixer_routing_to_expert_modules_moves_the_modules():
    torch.manual_seed(18)
    a = ModuleSparseMixerLM().eval()
    b = ModuleSparseMixerLM().eval()
    b.load_state_dict(a.state_dict())
    sigma = [2, 3, 1, 0]
    with torch.no_grad():
        b.router.weight.copy_(a.router.weight[sigma])
        for e, s in enumerate(sigma):
            b.experts[e].load_state_dict(a.experts[s].state_dict())
    ids = _ids(19)
    pair = cb.ModelPair(a, b, example_input=ids).align("weight")
    np.testing.assert_array_equal(pair.permutation[pair.spec.axes_to_perm["router.weight"][0]], np.argsort(sigma))
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
