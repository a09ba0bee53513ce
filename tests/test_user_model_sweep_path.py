"""A sweep of models a user writes gives the numbers of the loop a researcher would write.

The loop: the pair's flat vectors combined as ``(1 − v) θ_A + v θ_B``, views into the combined
vector passed to ``torch.func.functional_call``, summed cross-entropy and correct count (and, for
``repair="reset"``, the BatchNorm statistics recomputed in one training-mode pass over the repair
data, which equals the library's exact statistics when the data are one batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb

VALUES = [0.0, 0.3, 1.0]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class _BNCNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.block = _Block(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))


class _LNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln1, self.out = nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.ln1(self.fc1(x.flatten(1)))))


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _models(build: Any) -> list[nn.Module]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build().eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(1, 1.2)
        out.append(model)
    return out


def _bare(model: nn.Module, pair: cb.ModelPair, x: torch.Tensor, y: torch.Tensor,
          reset: bool) -> list[tuple[float, float]]:
    ta, tb = (torch.from_numpy(np.asarray(t, np.float32)) for t in (pair.theta_a, pair.theta_b))
    out = []
    for v in VALUES:
        theta = (1 - v) * ta + v * tb
        params = {e.name: theta[e.offset:e.stop].view(e.shape) for e in pair.layout.entries}
        if reset:  # one training-mode pass over all of the repair data: exact batch statistics
            bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
            stats = {}
            for n, m in bns:
                stats.update({f"{n}.running_mean": torch.zeros(m.num_features),
                              f"{n}.running_var": torch.ones(m.num_features)})
                m.momentum = None
            model.train()
            with torch.no_grad():
                torch.func.functional_call(model, {**params, **stats}, (x,))
            model.eval()
            params = {**params, **stats}
        with torch.no_grad():
            logits = torch.func.functional_call(model, params, (x,))
        out.append((float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())))
    return out


@pytest.mark.parametrize(("build", "reset"), [(_sequential, False), (_LNMLP, False), (_BNCNN, False)],
                         ids=["sequential", "layernorm", "bncnn"])
def test_sweep_of_a_user_model_matches_the_bare_loop(build: Any, reset: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 96).astype(np.int64)
    a, b = _models(build)
    pair = cb.ModelPair(a, b, example_input=torch.as_tensor(x[:8])).align("weight")
    kwargs: dict[str, Any] = {"repair": "reset", "repair_data": (x, y)} if reset else {}
    ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=VALUES, **kwargs)
    ref = _bare(_models(build)[0], pair, torch.as_tensor(x), torch.as_tensor(y), reset)
    np.testing.assert_allclose(np.asarray(ds["loss"].values, np.float64).ravel(), [r[0] for r in ref],
                               rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ds["accuracy"].values, np.float64).ravel(), [r[1] for r in ref],
                               atol=1.5 / len(y))
