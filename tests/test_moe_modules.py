"""Mixtures of experts whose experts are separate torch modules (Mixtral's layout), traced and aligned.

References: planted permutations (experts reordered with the gate's rows, units permuted
inside each expert), the models' own torch forward passes and torch's cross-entropy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.kinds import Blocks

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

D, H, E, N_IN = 8, 6, 4, 10


class SwiGLU(nn.Module):
    def __init__(self, d: int = D, h: int = H) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gated(nn.Module):
    """A gate of ``E`` rows and ``E`` SwiGLU experts; subclasses route."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=bias)
        self.experts = nn.ModuleList([SwiGLU() for _ in range(E)])


class Mixtral(Gated):
    """Top-2 routing written as transformers' ``MixtralSparseMoeBlock`` writes it."""

    def forward(self, x):
        weights = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, 2, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros((x.shape[0], D), dtype=x.dtype)
        mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, rows = torch.where(mask[e])
            current = x[None, rows].reshape(-1, D)
            out.index_add_(0, rows, self.experts[e](current) * weights[rows, slot, None])
        return out


class Switch(nn.Module):
    """Top-1 routing by argmax, each expert's tokens picked by ``torch.where(ids == e)``."""

    def __init__(self, expert: type = SwiGLU, skip_idle: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(D, E)
        self.experts = nn.ModuleList([expert() for _ in range(E)])
        self.skip_idle = skip_idle  # skip an expert no token goes to, as older transformers' Mixtral did

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        ids, top = probs.argmax(-1), probs.max(-1).values
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.where(ids == e)[0]
            if self.skip_idle and rows.shape[0] == 0:
                continue
            out.index_add_(0, rows, top[rows, None] * expert(x[rows]))
        return out


class Masked(Gated):
    """Top-2 routing with boolean masks and in-place writes (``out[rows] += ...``)."""

    def forward(self, x):
        w, ids = self.gate(x).topk(2, dim=-1)
        w = w.softmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = ids == e
            rows = hit.any(-1)
            out[rows] += (w * hit).sum(-1)[rows, None] * expert(x[rows])
        return out


class Dense(Gated):
    """Soft gating: every expert, weighted by its gate value ``p[:, e:e + 1]``."""

    def __init__(self) -> None:
        super().__init__(bias=True)

    def forward(self, x):
        p = self.gate(x).softmax(-1)
        return sum(p[:, e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class Net(nn.Module):
    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.inp, self.norm, self.moe, self.out = nn.Linear(N_IN, D), nn.LayerNorm(D), moe, nn.Linear(D, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(h + self.moe(self.norm(h)))


def _x(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, N_IN)).astype(np.float32))


def _planted(model: Net, seed: int) -> Net:
    """``model`` with its experts reordered (and the gate's rows with them) and each expert's units permuted."""
    rng = np.random.default_rng(seed)
    moe = model.moe
    gate = moe.gate if hasattr(moe, "gate") else moe.router
    sigma = rng.permutation(E)
    out = copy.deepcopy(model)
    with torch.no_grad():
        new_gate = out.moe.gate if hasattr(out.moe, "gate") else out.moe.router
        new_gate.weight.copy_(gate.weight[sigma])
        if gate.bias is not None:
            new_gate.bias.copy_(gate.bias[sigma])
        for e, s in enumerate(sigma):
            tau = torch.from_numpy(rng.permutation(H))
            source, target = moe.experts[int(s)], out.moe.experts[e]
            target.w1.weight.copy_(source.w1.weight[tau])
            target.w3.weight.copy_(source.w3.weight[tau])
            target.w2.weight.copy_(source.w2.weight[:, tau])
            target.w2.bias.copy_(source.w2.bias)
    return out


@pytest.mark.parametrize("moe", [Mixtral, Switch, Masked, Dense])
def test_a_planted_expert_permutation_is_undone(moe):
    torch.manual_seed(0)
    a = Net(moe()).eval()
    b = _planted(a, seed=1)
    x = _x()
    with torch.no_grad():
        np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), rtol=1e-5, atol=1e-5)  # the same function
        assert not torch.allclose(b.moe.experts[0].w1.weight, a.moe.experts[0].w1.weight)
    pair = cb.ModelPair(a, b, example_input=x).align("weight")
    spec = pair.spec
    gate = "moe.gate" if hasattr(a.moe, "gate") else "moe.router"
    group = spec.axes_to_perm[f"{gate}.weight"][0]
    assert spec.kind("P_moe.experts.*.w1") == Blocks(group, E, H)
    assert spec.axes_to_perm["moe.experts.*.w2.bias"][0] == group  # one per expert: moves with its expert
    assert spec.stacks["moe.experts.*.w1.weight"].members == tuple(f"moe.experts.{e}.w1.weight" for e in range(E))
    aligned = pair.model_b.state_dict()
    for name, value in a.state_dict().items():
        np.testing.assert_allclose(aligned[name].numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_aligned_independent_models_keep_their_function_and_sweep():
    torch.manual_seed(2)
    a, b = Net(Mixtral()).eval(), Net(Mixtral()).eval()
    x = _x(200, seed=3)
    y = torch.from_numpy(np.random.default_rng(4).integers(0, 3, 200))
    pair = cb.ModelPair(a, b, example_input=x[:64]).align("weight")
    with torch.no_grad():
        np.testing.assert_allclose(pair.model_b(x).numpy(), b(x).numpy(), rtol=1e-4, atol=1e-5)
    result = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        want = [F.cross_entropy(m(x).double(), y).item() for m in (a, b)]
    np.testing.assert_allclose(result["loss"].values[0, :, 0], want, rtol=1e-5)
    again = cb.PermutationSpec.from_json(pair.spec.to_json())
    assert again == pair.spec


def test_experts_that_do_not_move_with_the_gate_are_refused():
    class Shifted(Switch):
        """Tokens of expert id e run through module e + 1: the modules' order is not the gate's."""

        def forward(self, x):
            probs = self.router(x).softmax(-1)
            ids, top = probs.argmax(-1), probs.max(-1).values
            out = torch.zeros_like(x)
            for e in range(E):
                rows = torch.where(ids == e)[0]
                out.index_add_(0, rows, top[rows, None] * self.experts[(e + 1) % E](x[rows]))
            return out

    torch.manual_seed(5)
    with pytest.raises(TracingError, match="do not preserve its function"):
        cb.derive_symmetries(Net(Shifted()), _x())


def test_experts_that_cannot_move_stay_with_a_warning_or_a_clear_error():
    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, D)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    torch.manual_seed(6)
    stay = r"experts moe.experts.0, ... of 'P_moe.router' stay in place.*has 2 axes"
    with pytest.warns(cb.CombinabilityWarning, match=stay):
        spec, _ = cb.derive_symmetries(Net(Switch(Deep)), _x())
    assert spec.axes_to_perm["moe.router.weight"][0] is None and not spec.stacks  # sound: nothing moves them
    assert spec.axes_to_perm["moe.experts.2.b.weight"] == ("P_moe.experts.2.b", "P_moe.experts.2.a")

    idle = Net(Switch(skip_idle=True))
    with torch.no_grad():
        idle.moe.router.bias[3] = -1e4  # no token of the example goes to expert 3
    with pytest.raises(TracingError, match=r"experts \['moe.experts.3'\] of router 'moe.router' received no token"):
        cb.derive_symmetries(idle, _x())
