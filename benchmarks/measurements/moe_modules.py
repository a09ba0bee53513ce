"""Mixtures of experts held as separate modules (Mixtral's layout): aligned barriers with experts moved.

Usage: ``python benchmarks/measurements/moe_modules.py``. Two copies of an MoE MLP (flatten →
dense 128 → ReLU → LayerNorm → a top-2 mixture of 8 SwiGLU experts of 64 units, routed as
transformers' ``MixtralSparseMoeBlock`` routes, added back → dense 10), seeds 0 and 1, trained
with Adam (lr 1e-3, batches of 128) for 3 epochs on the first 20,000 Fashion-MNIST training
images; then weight matching, with the experts moved as blocks of the gate's permutation (the
spec the tracer derives) and, as a control, with every expert left in place and only its units
permuted (``experts in place``: the best a spec without stacked modules can do), and the linear
path at 0, 0.5, 1 on the first 5,000 test images; then the same trained weights held as transformers 5 holds
experts (one ``(E, ...)`` parameter per projection, run by ``torch._grouped_mm``), traced and aligned. Writes
``moe_modules.md`` beside this file.
"""

from __future__ import annotations

from pathlib import Path

import common as c
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb
from combinability.data import load_dataset

D, H, E, TOP = 128, 64, 8, 2


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False),
                                     nn.Linear(H, D, bias=False))

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    """Top-2 routing as ``MixtralSparseMoeBlock`` writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([SwiGLU() for _ in range(E)])

    def forward(self, x):
        weights, selected = torch.topk(F.softmax(self.gate(x), dim=1, dtype=torch.float), TOP, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros((x.shape[0], D), dtype=x.dtype)
        mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, rows = torch.where(mask[e])
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return out


class MoeMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.moe, self.out = nn.Linear(784, D), nn.LayerNorm(D), SparseMoe(), nn.Linear(D, 10)

    def forward(self, x):
        h = F.relu(self.inp(torch.flatten(x, 1)))
        return self.out(h + self.moe(self.norm(h)))


class FusedMoe(nn.Module):
    """The same experts held as transformers 5 holds them, ``gate_up_proj (E, 2H, D)`` and ``down_proj (E, D, H)``,
    run as its default ``grouped_mm`` runs them: tokens sorted by expert, ``torch._grouped_mm`` with offsets."""

    def __init__(self, moe: SparseMoe) -> None:
        super().__init__()
        self.gate = moe.gate
        self.gate_up_proj = nn.Parameter(torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in moe.experts]))
        self.down_proj = nn.Parameter(torch.stack([e.w2.weight for e in moe.experts]))

    def forward(self, x):
        weights, selected = torch.topk(F.softmax(self.gate(x), dim=1, dtype=torch.float), TOP, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        chosen, order = torch.sort(selected.reshape(-1))
        offsets = torch.cumsum(torch.histc(chosen.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x[order // TOP], self.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, -1)
        z = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
        z = z * weights.reshape(-1)[order].unsqueeze(-1)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.shape[0])
        return z[back].view(x.shape[0], TOP, D).sum(dim=1)


def fused(model: nn.Module) -> nn.Module:
    """A copy of a trained ``MoeMlp`` with its experts held as one parameter each (:class:`FusedMoe`)."""
    import copy

    out = copy.deepcopy(model)
    out.moe = FusedMoe(out.moe)
    return out.eval()


def experts_in_place(spec: cb.PermutationSpec) -> cb.PermutationSpec:
    """``spec`` with its stacked experts unstacked: each expert's units its own permutation, the gate's rows fixed."""
    groups = {k.group for k in spec.kinds.values() if isinstance(k, cb.Blocks)}
    axes: dict[str, tuple] = {}
    for name, entries in spec.axes_to_perm.items():
        stack = spec.stacks.get(name)
        if stack is None:
            axes[name] = tuple(None if e in groups else e for e in entries)
            continue
        for e, member in enumerate(stack.members):
            own = [f"{q}#{e}" if q in spec.kinds else q for q in entries]
            axes[member] = tuple(own[1:] if stack.new_axis else own)
    return cb.PermutationSpec(axes)


def trained(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return c.fit_adam(MoeMlp(), x, y, epochs, name=f"moe_modules_{seed}_{epochs}")


def main() -> None:
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    x = torch.tensor(np.asarray(train.x[:20000], np.float32)).reshape(-1, 1, 28, 28)
    y = torch.tensor(np.asarray(train.y[:20000])).long()
    x_test, y_test = np.asarray(test.x[:5000], np.float32).reshape(-1, 1, 28, 28), np.asarray(test.y[:5000])
    models = [trained(seed, x, y).eval() for seed in (0, 1)]
    spec = cb.ModelPair(*models, example_input=x_test[:256]).spec
    kinds = ", ".join(f"`{p}`: {k.blocks} blocks of {k.size}" for p, k in spec.kinds.items())
    rows = ["# Mixtures of experts held as separate modules: aligned barriers", "",
            f"Stacked parameters: {', '.join(f'`{s}`' for s in spec.stacks)}; block permutations: {kinds}.", "",
            "| alignment | loss at 0, 0.5, 1 | loss barrier | accuracy at 0, 0.5, 1 | objective |",
            "|---|---|---:|---|---:|"]
    for label, s, method in (("naive", spec, None), ("weight matching, experts in place", experts_in_place(spec),
                                                     "weight"), ("weight matching, experts moved", spec, "weight")):
        p = cb.ModelPair(*models, spec=s, example_input=x_test[:256])
        p = p.align(method) if method else p
        ds = cb.sweep(p, cb.Linear(), data=(x_test, y_test), values=[0.0, 0.5, 1.0], splits=["test"])
        loss = ds["loss"].sel(split="test").values.ravel()
        acc = ds["accuracy"].sel(split="test").values.ravel()
        objective = f"{p.permutation.objective:.5g}" if method else ""
        if method:
            moved = p.permutation[spec.axes_to_perm["moe.gate.weight"][0]] if s is spec else None
            label += f" (gate order {moved.tolist()})" if moved is not None else ""
        rows.append(f"| {label} | {', '.join(f'{v:.3f}' for v in loss)} | {loss[1] - (loss[0] + loss[2]) / 2:.3f} | "
                    f"{', '.join(f'{v:.3f}' for v in acc)} | {objective} |")
    # the same trained weights held as transformers 5 holds experts: traced from torch._grouped_mm
    fused_models = [fused(m) for m in models]
    with torch.no_grad():
        probe = torch.tensor(x_test[:512])
        drift = max(float((f(probe) - m(probe)).abs().max()) for f, m in zip(fused_models, models, strict=True))
    p = cb.ModelPair(*fused_models, example_input=x_test[:256]).align("weight")
    ds = cb.sweep(p, cb.Linear(), data=(x_test, y_test), values=[0.0, 0.5, 1.0], splits=["test"])
    loss, acc = (ds[k].sel(split="test").values.ravel() for k in ("loss", "accuracy"))
    moved = p.permutation[p.spec.axes_to_perm["moe.gate.weight"][0]]
    blocks = [f"`{q}`: {k.blocks} blocks of {k.size}" for q, k in p.spec.kinds.items() if isinstance(k, cb.Blocks)]
    barrier = loss[1] - (loss[0] + loss[2]) / 2
    rows.append(f"| weight matching, the same experts held as one parameter each (`grouped_mm`; gate order "
                f"{moved.tolist()}) | {', '.join(f'{v:.3f}' for v in loss)} | {barrier:.3f} | "
                f"{', '.join(f'{v:.3f}' for v in acc)} | {p.permutation.objective:.5g} |")
    rows += ["", f"Held as one parameter each (transformers 5's `gate_up_proj (E, 2h, d)`, `down_proj (E, d, h)`, run "
             f"by `torch._grouped_mm`; outputs within {drift:.1e} of the modules'), the traced spec has the block "
             f"permutations {', '.join(blocks)}."]
    text = "\n".join(rows) + "\n"
    (Path(__file__).parent / "moe_modules.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
