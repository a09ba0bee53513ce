"""Where torch's evaluation spends its time on a GPU: the two open questions of the H200 run.

1. Small convolutional models: the torch backend evaluated Tiny-10 and ResNet-20 x1 3-13x
   slower than jax on an H200 (``benchmarks/measurements/gpu_h200.md``). Here one Tiny-10
   evaluation (``Evaluator.evaluate``, one vector, 10,000 images) is timed against the plain
   module on the same device batches, then profiled (``torch.profiler``: the operators by
   device time and by host time).
2. ResNet-20 x32 in bfloat16: the library reached 0.39 of the card's rate, a plain module
   0.45-0.47, jax 0.68. Its LayerNorms, ReLUs and residual sums are memory-bound passes that
   eager torch runs one by one and XLA fuses. Here the plain module (NCHW, channels-last, and
   ``torch.compile``d) and the library, eager and with ``TorchBackend(compile=True)``, at batch
   sizes 256 and 1,024, each with the fraction of the card's bfloat16 rate it reaches.

Both parts time the library's compiled evaluation too (its first call, which compiles, untimed).

Run (on a GPU machine): ``python benchmarks/device/profile_torch_gpu.py [--device cuda]``;
``--device cpu --small`` is a smoke run of the same code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from combinability_torch.backend import TorchBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_precision as bp  # noqa: E402
from bench_precision import _images  # noqa: E402  (the suite's synthetic images)

import combinability as cb
from combinability.evaluation import Evaluator
from combinability.models import build_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn, repeats: int = 3) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def _library(device, arch, width, shape, data, batch, dtype="float32", compiled=False):
    """The library's evaluation (its parameters are views into one flat vector: NCHW only)."""
    be = TorchBackend(device, compute_dtype=dtype, compile=compiled)
    model = build_model(arch, backend="torch", width=width, input_shape=shape, seed=0)
    state = be.state(model)
    layout = cb.FlatLayout.from_arrays(state)
    evaluator = Evaluator(be, model, layout, batch_size=batch, vectors=1)
    flat = be.asarray(layout.flatten(state)[None])
    return lambda: evaluator.evaluate(flat, data)


def _plain(device, arch, width, shape, data, batch, dtype="float32", channels_last=False, compiled=False):
    model = build_model(arch, backend="torch", width=width, input_shape=shape, seed=0).to(device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if compiled:  # fuses the LayerNorms, ReLUs and residual sums that eager runs as separate passes
        model = torch.compile(model)
    x = torch.as_tensor(data.x, device=device).to(memory_format=fmt)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype),
                                                    enabled=dtype != "float32"):
            for chunk in x.split(batch):
                model(chunk)
        _sync(device)

    return run


def small_models(device: str, images: int) -> None:
    print("## Small models: the library's evaluation against the plain module (one vector)\n")
    print("| model | images | batch | library (ms) | plain module (ms) | library / plain | library compiled (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arch, width, shape in (("tiny10", 0.5, (1, 28, 28)), ("resnet20", 1, (3, 32, 32)), ("mlp", 1.0, (1, 28, 28))):
        data = _images(images, shape)
        for batch in (500, 2000):
            lib = _best(_library(device, arch, width, shape, data, batch))
            plain = _best(_plain(device, arch, width, shape, data, batch))
            compiled = "" if batch != 2000 else _timed_or_error(_library, device, arch, width, shape, data, batch,
                                                                 compiled=True)
            print(f"| {arch} x{width} | {images} | {batch} | {lib * 1e3:.1f} | {plain * 1e3:.1f} | {lib / plain:.2f} | "
                  f"{compiled} |", flush=True)
    data = _images(images, (1, 28, 28))
    run = _library(device, "tiny10", 0.5, (1, 28, 28), data, 500)
    run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
    averages = prof.key_averages()
    for key in (("self_cuda_time_total",) if device.startswith("cuda") else ()) + ("self_cpu_time_total",):
        print(f"\n### One Tiny-10 evaluation (10,000 images, batch 500), by {key}\n\n```")
        print(averages.table(sort_by=key, row_limit=15, max_name_column_width=48))
        print("```", flush=True)


def _timed_or_error(make, *args, **kwargs) -> str:
    """Milliseconds of the best run of ``make(*args, **kwargs)`` after an untimed first call, or the error."""
    try:
        return f"{_best(make(*args, **kwargs)) * 1e3:.1f}"
    except Exception as exc:  # noqa: BLE001 - torch.compile may fail where eager runs
        return f"failed: {type(exc).__name__}: {str(exc)[:160]}"


def large_model(device: str, width: int, images: int) -> None:
    print(f"\n## ResNet-20 x{width}, bfloat16, {images} images: batch size and memory format\n")
    print("| path | batch | layout | seconds | models/s | fraction of the card's bf16 rate |")
    print("|---|---:|---|---:|---:|---:|")
    data = _images(images, (3, 32, 32))
    args = ("resnet20", width, (3, 32, 32), data)
    flops = bp.forward_flops(width, images)
    peak = bp.peak_flops(torch.cuda.get_device_name(), "bfloat16") if device.startswith("cuda") else None
    for batch in (256, 1024):
        runs = [("plain module", "NCHW", _plain, {}),
                ("plain module", "channels_last", _plain, {"channels_last": True}),
                ("plain module, torch.compile", "NCHW", _plain, {"compiled": True}),
                ("library", "NCHW", _library, {}),
                ("library, compile=True", "NCHW", _library, {"compiled": True})]
        for name, layout, make, options in runs:
            try:
                t0 = time.perf_counter()
                seconds = _best(make(device, *args, batch, "bfloat16", **options), repeats=2)
                total = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - torch.compile may fail where the others run
                print(f"| {name} | {batch} | {layout} | failed: {type(exc).__name__}: {str(exc)[:200]} | | |",
                      flush=True)
                continue
            frac = f"{flops / seconds / peak:.3f}" if peak else "n/a"
            print(f"| {name} | {batch} | {layout} | {seconds:.3f} | {1 / seconds:.2f} | {frac} |"
                  f"<!-- {total:.0f} s with the first call -->", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    large_model(args.device, 1 if args.small else 32, 64 if args.small else 1024)  # the goal's figure first
    small_models(args.device, 600 if args.small else 10_000)


if __name__ == "__main__":
    main()
