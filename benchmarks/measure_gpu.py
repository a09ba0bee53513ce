"""The GPU figures of issue 11, item 5, in one short run (for a session that is lent a GPU).

On a CUDA device, for torch and jax and for float32 and bfloat16 forward passes
(``Backend.with_compute_dtype``):

* a ResNet-20 x``--width`` (default 32) evaluated on 1,024 CIFAR-shaped images, four
  parameter vectors per forward call: full evaluations per second and the fraction of the
  card's dense rate reached (FLOPs counted by torch's ``FlopCounterMode``; the rate by device
  name, see ``bench_precision.PEAK_TFLOPS``, or ``COMBINABILITY_PEAK_TFLOPS``); the goal is at
  least 0.5 in bfloat16;
* a whole ``cb.sweep`` (16 uniform draws and the end models on 10,000 synthetic images) of the
  MLP and Tiny-10: models per second;
* weight matching of a ResNet-20 x``--matching-width`` (default 16) pair with a planted
  permutation (``measure_matching.resnet_pair``): the reference (numpy on the CPU), the
  library with its cost terms in numpy and on the device (``weight_matching(backend=...)``),
  times and whether each finds the reference's permutation.

Without a CUDA device it says so and exits 0, unless ``--device cpu`` asks for a smoke run
(small sizes) of the same code on the CPU.

Run: ``.venv/bin/python benchmarks/measure_gpu.py [--device cuda] [--width 32] [--backends torch jax]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_precision as bp  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.data.base import ArrayDataset  # noqa: E402
from combinability.models import build_model  # noqa: E402


def resnet_figures(library: str, device: str, dtype: str, width: int, examples: int) -> str:
    bench = bp.ResNetThroughput()
    bench.width, bench.examples = width, examples
    bench.setup(library, device, dtype)  # on the CPU: a smoke run of the same code
    seconds = min(bench._seconds() for _ in range(3))
    rate = bench.flops / seconds
    frac = f"{rate / bench.peak:.3f}" if bench.peak else "n/a (unknown card)"
    return (f"| ResNet-20 x{width}, {examples} images, {bench.vectors} vectors/call | {library} | {dtype} | "
            f"{bench.vectors / seconds:.2f} models/s | {rate / 1e12:.1f} TFLOP/s | {frac} |")


def sweep_figures(library: str, device: str, dtype: str, arch: str, examples: int) -> str:
    be = cb.get_backend(library)
    be = (be if device == "cpu" else be.on_device(device)).with_compute_dtype(dtype)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(examples, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, examples),
                        num_classes=10, name="synthetic", split="test")
    width = 1.0 if arch == "mlp" else 0.5
    models = [build_model(arch, backend=library, width=width, input_shape=(1, 28, 28), seed=s) for s in (0, 1)]
    pair = cb.ModelPair(*models, backend=be)
    kw = dict(data={"test": data}, splits=["test"], values=[0.25], samples=16, seed=0)
    cb.sweep(pair, cb.Uniform(), **kw)  # compile, copy the data to the device
    t0 = time.perf_counter()
    cb.sweep(pair, cb.Uniform(), **kw)
    seconds = time.perf_counter() - t0
    return f"| sweep, {arch}, {examples} images | {library} | {dtype} | {18 / seconds:.1f} models/s | | |"


def matching_figures(library: str, device: str, width: int) -> list[str]:
    """Reference vs library (numpy, then cost terms on ``device``) on a planted ResNet-20 pair."""
    import measure_matching as mm
    import reference_rebasin as reference

    spec, a, b = mm.resnet_pair(width, 3.0)[f"resnet20x{width}"]
    be = cb.get_backend(library)
    be = be if device == "cpu" else be.on_device(device)
    mm._warm_up(be)  # the compiled solver, BLAS threads and the device's context, untimed
    rows = []
    t0 = time.perf_counter()
    ref, sweeps = reference.weight_matching(0, spec, a, b)
    ref_time = time.perf_counter() - t0
    rows.append(f"| weight matching, ResNet-20 x{width} planted | reference (numpy, CPU) | | {ref_time:.2f} s | "
                f"{sweeps} sweeps | |")
    for where, backend in (("library (numpy, CPU)", None), (f"library ({library}, {device})", be)):
        t0 = time.perf_counter()
        ours = cb.weight_matching(spec, a, b, seed=0, backend=backend)
        seconds = time.perf_counter() - t0
        same = all(np.array_equal(ours[p], ref[p]) for p in ref)
        rows.append(f"| weight matching, ResNet-20 x{width} planted | {where} | | {seconds:.2f} s | "
                    f"{ours.iterations} sweeps, {ref_time / seconds:.1f}x | "
                    f"{'same permutation' if same else 'other permutation'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--sweep-examples", type=int, default=10_000)
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"])
    parser.add_argument("--matching-width", type=int, default=16, help="ResNet-20 width of the matching pair (0: none)")
    args = parser.parse_args()
    if args.device != "cpu":
        try:
            bp.require(args.backends[0], args.device)
        except NotImplementedError as exc:
            print(f"no GPU figures: {exc}")
            return
    print("| case | backend | compute type | throughput | achieved | fraction of the card's rate |")
    print("|---|---|---|---:|---:|---:|")
    for library in args.backends:
        for dtype in ("float32", "bfloat16"):
            print(resnet_figures(library, args.device, dtype, args.width, args.examples), flush=True)
            for arch in ("mlp", "tiny10"):
                print(sweep_figures(library, args.device, dtype, arch, args.sweep_examples), flush=True)
    if args.matching_width:
        for row in matching_figures(args.backends[0], args.device, args.matching_width):
            print(row, flush=True)


if __name__ == "__main__":
    main()
