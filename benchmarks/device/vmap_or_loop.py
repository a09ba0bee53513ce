"""Several vectors per forward call on a GPU: vmapped or one after the other, which is faster.

For each backend (torch, jax), model and compute type, ``Evaluator.evaluate`` of ``k``
parameter vectors on synthetic images, with the backend's ``vectorize=True`` (one vmapped
call over the vectors) and ``vectorize=False`` (a loop over them), in one process: models
per second each way and the loop's speed-up. What it measures sets the backends' default
on an accelerator (``vectorize=None``).

Run (on a GPU machine): ``python benchmarks/device/vmap_or_loop.py [--device cuda]``;
``--device cpu --small`` is a smoke run of the same code.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import combinability as cb
from combinability.evaluation import Evaluator
from combinability.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_precision import _images  # noqa: E402  (the suite's synthetic images)

#: (architecture, width, input shape, images, vectors, compute type)
CASES = [
    ("mlp", 1.0, (1, 28, 28), 10_000, 16, "float32"),
    ("tiny10", 0.5, (1, 28, 28), 10_000, 16, "float32"),
    ("tiny10", 1.0, (3, 32, 32), 10_000, 16, "bfloat16"),
    ("resnet20", 1, (3, 32, 32), 10_000, 8, "float32"),
    ("resnet20", 4, (3, 32, 32), 4_096, 8, "bfloat16"),
    ("resnet20", 32, (3, 32, 32), 1_024, 4, "bfloat16"),
]
SMALL = [(a, 1 if a == "resnet20" else w, s, 64, 2, d) for a, w, s, _, _, d in CASES[:4]]


def backend(library: str, device: str, vectorize: bool, dtype: str):
    if library == "torch":
        from combinability_torch.backend import TorchBackend

        return TorchBackend(device, vectorize=vectorize, compute_dtype=dtype)
    import jax
    from combinability_jax.backend import JaxBackend

    return JaxBackend(jax.devices("gpu" if device.startswith("cuda") else "cpu")[0], vectorize=vectorize,
                      compute_dtype=dtype)


def models_per_second(library, device, vectorize, arch, width, shape, images, vectors, dtype) -> float:
    be = backend(library, device, vectorize, dtype)
    data = _images(images, shape)
    model = build_model(arch, backend=library, width=width, input_shape=shape, seed=0)
    state = be.state(model)
    layout = cb.FlatLayout.from_arrays(state)
    evaluator = Evaluator(be, model, layout, batch_size=500 if arch != "resnet20" or width < 8 else 256,
                          vectors=vectors)
    base = layout.flatten(state)
    flats = be.asarray(np.stack([base * (1 + 0.01 * k) for k in range(vectors)]))
    evaluator.evaluate(flats, data)  # compile, warm the caches; evaluate returns host numbers (synchronised)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        evaluator.evaluate(flats, data)
        seconds.append(time.perf_counter() - t0)
    return vectors / min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"])
    parser.add_argument("--small", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    print("| backend | model | compute type | images | vectors | vmap (models/s) | loop (models/s) | loop / vmap |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for library in args.backends:
        for arch, width, shape, images, vectors, dtype in SMALL if args.small else CASES:
            try:
                rates = [models_per_second(library, args.device, v, arch, width, shape, images, vectors, dtype)
                         for v in (True, False)]
                print(f"| {library} | {arch} x{width} {shape} | {dtype} | {images} | {vectors} | {rates[0]:.1f} | "
                      f"{rates[1]:.1f} | {rates[1] / rates[0]:.2f} |", flush=True)
            except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
                traceback.print_exc(file=sys.stdout)
                print(f"| {library} | {arch} x{width} | {dtype} | failed: {type(exc).__name__}: {exc} | | | | |",
                      flush=True)


if __name__ == "__main__":
    main()
