"""The GPU figures of issue 11, item 5, in one short run (for a session that is lent a GPU).

On a CUDA device, for torch and jax and for float32 and bfloat16 forward passes
(``Backend.with_compute_dtype``):

* a ResNet-20 x``--width`` (default 32) evaluated on 1,024 CIFAR-shaped images, four
  parameter vectors per forward call: full evaluations per second and the fraction of the
  card's dense rate reached (FLOPs counted by torch's ``FlopCounterMode``; the rate by device
  name, see ``bench_precision.PEAK_TFLOPS``, or ``COMBINABILITY_PEAK_TFLOPS``); the goal is at
  least 0.5 in bfloat16; then one vector a call in bfloat16, and for torch the same through
  ``TorchBackend(compile=True)``;
* a whole ``cb.sweep`` (16 uniform draws and the end models on 10,000 synthetic images) of the
  MLP and Tiny-10: models per second (torch's also through ``torch.compile``, in float32);
* the same ResNet-20 as plain torch modules (``build_model``, no library code on the path)
  under bfloat16 autocast, in both memory formats: the ceiling the library's evaluation is
  measured against;
* weight matching of a ResNet-20 x``--matching-width`` (default 16) pair with a planted
  permutation (``measure_matching.resnet_pair``), and of a trained ResNet-20
  x``--trained-width`` (default 8; several widths, several pairs) pair, trained on the device on the first 20,000
  Fashion-MNIST images for 2 epochs (the CPU measurement's recipe): the reference with its
  products in numpy on the CPU and in torch on the device (as the original, jax, runs them
  on a GPU), the library with its cost terms in numpy and on the device
  (``weight_matching(backend=...)``); times, sweeps, objectives and whether each finds the
  reference's permutation.

Each row is measured on its own: an error in one prints its message in place of the row and
the rest still run (torch first, then matching, then jax).

Without a CUDA device it says so and exits 0, unless ``--device cpu`` asks for a smoke run
(small sizes) of the same code on the CPU.

Run: ``.venv/bin/python benchmarks/measure_gpu.py [--device cuda] [--width 32] [--backends torch jax]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_precision as bp  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.data.base import ArrayDataset  # noqa: E402
from combinability.models import build_model  # noqa: E402


def resnet_figures(library: str, device: str, dtype: str, width: int, examples: int, vectors: int,
                   compiled: bool = False) -> str:
    bench = bp.ResNetThroughput()
    bench.width, bench.examples, bench.vectors = width, examples, vectors
    bench.setup(library, device, dtype, compiled)  # on the CPU: a smoke run of the same code
    seconds = min(bench._seconds() for _ in range(3))
    rate = bench.flops / seconds
    frac = f"{rate / bench.peak:.3f}" if bench.peak else "n/a (unknown card)"
    if bench.peak and library == "torch" and dtype == "float32":
        import torch

        dtype = "float32 (TF32 convolutions)" if torch.backends.cudnn.allow_tf32 else dtype
    how = ", torch.compile" if compiled else ""
    return (f"| ResNet-20 x{width}, {examples} images, {bench.vectors} vectors/call{how} | {library} | {dtype} | "
            f"{bench.vectors / seconds:.2f} models/s | {rate / 1e12:.1f} TFLOP/s | {frac} |")


def sweep_figures(library: str, device: str, dtype: str, arch: str, examples: int, compiled: bool = False) -> str:
    be = cb.get_backend(library)
    be = (be if device == "cpu" else be.on_device(device)).with_compute_dtype(dtype).with_compile(compiled)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(examples, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, examples),
                        num_classes=10, name="synthetic", split="test")
    width = 1.0 if arch == "mlp" else 0.5
    models = [build_model(arch, backend=library, width=width, input_shape=(1, 28, 28), seed=s) for s in (0, 1)]
    pair = cb.ModelPair(*models, backend=be)
    kw = dict(data={"test": data}, splits=["test"], values=[0.25], samples=16, seed=0)
    cb.sweep(pair, cb.Uniform(), **kw)  # compile (jax's jit, torch.compile), copy the data to the device
    t0 = time.perf_counter()
    cb.sweep(pair, cb.Uniform(), **kw)
    seconds = time.perf_counter() - t0
    how = ", torch.compile" if compiled else ""
    return f"| sweep, {arch}, {examples} images{how} | {library} | {dtype} | {18 / seconds:.1f} models/s | | |"


def bare_torch_figures(width: int, examples: int, device: str = "cuda") -> list[str]:
    """The same ResNet-20 forward passes as a plain torch module under bfloat16 autocast (the ceiling).

    One pass over the images timed (``profile_torch_gpu``'s plain module: batches of 256, best
    of 3 after a warm-up), in NCHW and channels-last; models/s compare with the library's rows.
    """
    import profile_torch_gpu as ptg
    import torch

    data = ptg._images(examples, (3, 32, 32))
    flops = bp.forward_flops(width, examples)
    peak = bp.peak_flops(torch.cuda.get_device_name(), "bfloat16") if device.startswith("cuda") else None
    rows = []
    for layout, channels_last in (("NCHW", False), ("channels_last", True)):
        run = ptg._plain(device, "resnet20", width, (3, 32, 32), data, 256, "bfloat16", channels_last)
        seconds = ptg._best(run)
        frac = f"{flops / seconds / peak:.3f}" if peak else "n/a (unknown card)"
        rows.append(f"| ResNet-20 x{width}, {examples} images, plain torch module ({layout}) | torch | "
                    f"bfloat16 autocast | {1 / seconds:.2f} models/s | {flops / seconds / 1e12:.1f} TFLOP/s | "
                    f"{frac} |")
    return rows


def trained_resnet_pair(device: str, width: int, examples: int, epochs: int) -> tuple:
    """Two ResNet-20 at ``width`` trained with the library's loop on ``device`` (seeds 0, 1), with Adam
    (:data:`measure_matching.RESNET_RECIPE`: the paper's SGD recipe collapses such short runs to chance)."""
    from combinability import training
    from combinability.data import load_dataset

    data = load_dataset("fashion_mnist", "train").subset(examples)
    be = cb.get_backend("torch")
    be = be if device == "cpu" else be.on_device(device)
    import measure_matching as mm

    recipe = mm.RESNET_RECIPE.with_(epochs=epochs)
    models = []
    for seed in (0, 1):
        t0 = time.perf_counter()
        model = build_model("resnet20", backend="torch", width=width, num_classes=data.num_classes,
                            input_shape=data.input_shape, seed=seed)
        models.append(training.fit(be, model, data, recipe, seed=seed))
        print(f"<!-- trained ResNet-20 x{width} seed {seed} on {device} in {time.perf_counter() - t0:.0f} s -->",
              flush=True)
    pair = cb.ModelPair(*(m.cpu() for m in models), architecture="resnet20", backend="torch")
    return pair.spec, pair.params(0), pair.params(1)


def matching_figures(library: str, device: str, name: str, spec, a, b) -> list[str]:
    """Reference and library, each on the CPU (numpy) and with its products on ``device``."""
    import measure_matching as mm
    import reference_rebasin as reference

    be = cb.get_backend(library)
    be = be if device == "cpu" else be.on_device(device)
    mm._warm_up(be)  # the compiled solver, BLAS threads and the device's context, untimed
    reference.weight_matching(0, *mm.warm_up_pair(), device=device)
    rows = []
    t0 = time.perf_counter()
    ref, sweeps = reference.weight_matching(0, spec, a, b)
    ref_time = time.perf_counter() - t0
    ref_obj = reference.objective(spec, a, b, ref)
    rows.append(f"| weight matching, {name} | reference (numpy, CPU) | | {ref_time:.2f} s | "
                f"{sweeps} sweeps, 1.0x | objective {ref_obj:.6g} |")
    t0 = time.perf_counter()
    ref_dev, dev_sweeps = reference.weight_matching(0, spec, a, b, device=device)
    dev_time = time.perf_counter() - t0
    same = all(np.array_equal(ref_dev[p], ref[p]) for p in ref)
    rows.append(f"| weight matching, {name} | reference (torch, {device}) | | {dev_time:.2f} s | "
                f"{dev_sweeps} sweeps, {ref_time / dev_time:.1f}x | "
                f"{'same permutation' if same else 'other permutation'} |")
    for where, backend in (("library (numpy, CPU)", None), (f"library ({library}, {device})", be)):
        t0 = time.perf_counter()
        ours = cb.weight_matching(spec, a, b, seed=0, backend=backend)
        seconds = time.perf_counter() - t0
        same = all(np.array_equal(ours[p], ref[p]) for p in ref)
        verdict = "same permutation" if same else f"objective {(ours.objective - ref_obj) / abs(ref_obj):+.2e} rel."
        rows.append(f"| weight matching, {name} | {where} | | {seconds:.2f} s | "
                    f"{ours.iterations} sweeps, {ref_time / seconds:.1f}x; {dev_time / seconds:.1f}x the device "
                    f"reference | {verdict} |")
    rows.append(_profiled(lambda: cb.weight_matching(spec, a, b, seed=0, backend=be),
                          f"library ({library}, {device}) on {name}"))
    return rows


def _profiled(call, what: str, top: int = 12) -> str:
    """``call()`` once more under cProfile: where the host's time goes, as a fenced block."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    call()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    body = "\n".join(line for line in text.getvalue().splitlines() if line.strip())
    return f"\n<details><summary>host profile: {what}</summary>\n\n```\n{body}\n```\n</details>\n"


def _row(what, *args) -> None:
    """Print the row(s) ``what(*args)`` returns, or the error in their place."""
    try:
        rows = what(*args)
    except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others
        traceback.print_exc()
        rows = f"| {what.__name__}{args} | failed: {type(exc).__name__}: {exc} | | | | |"
    for row in [rows] if isinstance(rows, str) else rows:
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--sweep-examples", type=int, default=10_000)
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"])
    parser.add_argument("--matching-width", type=int, default=16, help="ResNet-20 width of the planted pair (0: none)")
    parser.add_argument("--trained-width", type=int, nargs="+", default=[8],
                        help="ResNet-20 widths of the trained pairs (0: none)")
    parser.add_argument("--skip-evaluation", action="store_true",
                        help="matching rows only (no evaluation, sweep or plain-module rows)")
    parser.add_argument("--trained-examples", type=int, default=20_000, help="training images of the trained pair")
    args = parser.parse_args()
    if args.device != "cpu":
        try:
            bp.require(args.backends[0], args.device)
        except NotImplementedError as exc:
            print(f"no GPU figures: {exc}")
            return
    print("| case | backend | compute type | throughput | achieved | fraction of the card's rate |")
    print("|---|---|---|---:|---:|---:|")
    first, *others = args.backends
    libraries = [first] + [lib for lib in others if lib != first]

    def evaluation_rows(library: str) -> None:
        for dtype in ("float32", "bfloat16"):
            _row(resnet_figures, library, args.device, dtype, args.width, args.examples, 4)
            for arch in ("mlp", "tiny10"):
                _row(sweep_figures, library, args.device, dtype, arch, args.sweep_examples)
        _row(resnet_figures, library, args.device, "bfloat16", args.width, args.examples, 1)
        if library == "torch":
            _row(resnet_figures, library, args.device, "bfloat16", args.width, args.examples, 1, True)
            for arch in ("mlp", "tiny10"):
                _row(sweep_figures, library, args.device, "float32", arch, args.sweep_examples, True)

    if not args.skip_evaluation:
        evaluation_rows(libraries[0])
        _row(bare_torch_figures, args.width, args.examples, args.device)
    if args.matching_width:
        _row(lambda: matching_figures(first, args.device, f"ResNet-20 x{args.matching_width} planted",
                                      *mm_resnet_pair(args.matching_width)))
    for width in (w for w in args.trained_width if w):
        _row(lambda width=width: matching_figures(
            first, args.device, f"ResNet-20 x{width} trained on the device",
            *trained_resnet_pair(args.device, width, args.trained_examples, 2)))
    for library in libraries[1:] if not args.skip_evaluation else ():
        evaluation_rows(library)


def mm_resnet_pair(width: int) -> tuple:
    """The planted ResNet-20 pair of ``measure_matching`` at ``width``."""
    import measure_matching as mm

    return mm.resnet_pair(width, 3.0)[f"resnet20x{width}"]


if __name__ == "__main__":
    main()
