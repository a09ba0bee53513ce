"""Run the asv suite's benchmarks for one device, in this process, without asv.

asv runs every parameter combination in a fresh process, with its own repeats: on a
lent GPU whose minutes are counted, the suite's ``cuda`` variants are run here instead,
each once after a warm-up, following asv's conventions (``params``, ``param_names``,
``setup`` raising ``NotImplementedError`` to skip, ``time_``, ``track_`` and ``peakmem_``
methods). Only classes with a ``device`` parameter are run, and only their combinations on
``--device``; ``peakmem_`` methods are left out (a process-wide peak says nothing per
benchmark here). ``--skip`` leaves classes out. Prints one markdown table row per figure as it is measured.

Run: ``python benchmarks/device/run_device_benchmarks.py --device cuda [--budget 120]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import os
import pkgutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def device_benchmarks(device: str):
    """``(name, class, combination)`` for every class with a ``device`` parameter, on ``device``."""
    import benchmarks as suite

    for info in pkgutil.iter_modules(suite.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or "device" not in getattr(cls, "param_names", ()):
                continue
            params = cls.params if isinstance(cls.params, tuple | list) and isinstance(cls.params[0], list) \
                else [cls.params]
            at = list(cls.param_names).index("device")
            for combination in itertools.product(*params):
                if combination[at] == device:
                    yield f"{info.name}.{name}", cls, combination


def run_one(cls, combination, repeats: int) -> list[tuple[str, str]]:
    """``(method, figure)`` for each ``time_`` and ``track_`` method of one combination."""
    bench = cls()
    try:
        bench.setup(*combination)
    except NotImplementedError as exc:
        return [("setup", f"skipped: {exc}")]
    out = []
    for method in sorted(m for m in dir(bench) if m.startswith(("time_", "track_"))):
        fn = getattr(bench, method)
        if method.startswith("time_"):
            fn(*combination)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(*combination)
                best = min(best, time.perf_counter() - t0)
            out.append((method, f"{best * 1e3:.2f} ms"))
        else:
            value = fn(*combination)
            out.append((method, f"{value:.4g} {getattr(fn, 'unit', '')}".strip()))
    if hasattr(bench, "teardown"):
        bench.teardown(*combination)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; later benchmarks are left out")
    parser.add_argument("--skip", nargs="*", default=["ResNetThroughput"],
                        help="classes left out (default: ResNetThroughput, which measure_gpu.py runs)")
    args = parser.parse_args()
    if args.device != "cpu":  # list the device's variants even where /dev shows no NVIDIA node
        os.environ.setdefault("COMBINABILITY_BENCH_DEVICES", f"cpu,{args.device}")
    start = time.perf_counter()
    print("| benchmark | parameters | figure | value |")
    print("|---|---|---|---:|")
    for name, cls, combination in device_benchmarks(args.device):
        if cls.__name__ in args.skip:
            continue
        if time.perf_counter() - start > args.budget:
            print(f"| {name} | {combination} | left out: over the {args.budget:.0f} s budget | |", flush=True)
            continue
        try:
            rows = run_one(cls, combination, args.repeats)
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not lose the others
            rows = [("error", f"{type(exc).__name__}: {exc}")]
        for method, figure in rows:
            print(f"| {name} | {', '.join(map(str, combination))} | {method} | {figure} |", flush=True)


if __name__ == "__main__":
    main()
