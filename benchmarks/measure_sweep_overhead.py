"""Sweep overhead (issue 11, item 2): ``cb.sweep`` against a bare torch loop doing the same work.

Both evaluate the two end models (a sweep reports them), draw 16 uniform coefficient vectors
(``s = 0.25``), combine ``θ = θ_A + v ⊙ (θ_B − θ_A)`` and run the same forward passes (batches of
1000) over the test split, accumulating the loss and accuracy.
The bare loop is what a researcher would write by hand: ``torch.rand`` on the device,
``vector_to_parameters`` into one module, ``model(x)``. Timed interleaved, best of ``repeats``.

Run: ``.venv/bin/python benchmarks/measure_sweep_overhead.py [mlp|tiny10] [repeats]``
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import combinability as cb
from combinability.data import load_dataset
from combinability.models import build_model


def bare_loop(model: torch.nn.Module, theta_a: torch.Tensor, theta_b: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor, draws: int, s: float, batch: int = 1000) -> list[tuple[float, float]]:
    out = []
    gen = torch.Generator().manual_seed(0)
    delta = theta_b - theta_a
    params = [p for p in model.parameters()]
    with torch.inference_mode():
        for k in range(draws + 2):
            if k < 2:  # the end models
                theta = (theta_a, theta_b)[k]
            else:
                v = (0.5 - s) + 2 * s * torch.rand(theta_a.shape, generator=gen)
                theta = theta_a + v * delta
            torch.nn.utils.vector_to_parameters(theta, params)
            loss = correct = 0.0
            for i in range(0, len(x), batch):
                logits = model(x[i:i + batch])
                loss += float(torch.nn.functional.cross_entropy(logits, y[i:i + batch], reduction="sum"))
                correct += float((logits.argmax(1) == y[i:i + batch]).sum())
            out.append((loss / len(x), correct / len(x)))
    return out


def main(arch: str = "mlp", repeats: int = 3) -> None:
    data = "fashion_mnist"
    test = load_dataset(data, "test")
    width = 1.0 if arch == "mlp" else 0.5
    a = build_model(arch, backend="torch", width=width, input_shape=test.input_shape, seed=0)
    b = build_model(arch, backend="torch", width=width, input_shape=test.input_shape, seed=1)
    pair = cb.ModelPair(a, b)
    # the bare loop needs torch's own parameter order: the library's layout may order them otherwise
    model = build_model(arch, backend="torch", width=width, input_shape=test.input_shape, seed=0).eval()
    ta = torch.nn.utils.parameters_to_vector(a.parameters()).detach()
    tb = torch.nn.utils.parameters_to_vector(b.parameters()).detach()
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    draws, s = 16, 0.25
    bare, lib = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bare_loop(model, ta, tb, x, y, draws, s)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cb.sweep(pair, cb.Uniform(), data=data, splits=["test"], values=[s], samples=draws, seed=0)
        lib.append(time.perf_counter() - t0)
    tb_, tl = min(bare), min(lib)
    print(f"{arch}: bare loop {tb_:.2f} s, cb.sweep {tl:.2f} s for {draws} draws on {len(x)} examples; "
          f"throughput ratio (sweep / bare) {tb_ / tl:.3f}  "
          f"[bare runs {np.round(bare, 2)}, sweep runs {np.round(lib, 2)}]")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mlp", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
