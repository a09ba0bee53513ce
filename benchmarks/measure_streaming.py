"""Measure what streaming a sweep to a file costs (issue 10, item 5), in one run.

1. Time per appended evaluation at 10², 10³ and 10⁴ evaluations (a sweep-shaped file, every
   evaluation appended once, median and mean per append).
2. A 200-evaluation digits sweep of two trained MLPs, with ``out=`` and without, interleaved
   (best of 3 each), and the ratio.

Run: ``.venv/bin/python benchmarks/measure_streaming.py``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))

from bench_streaming import sweep_template  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.result_stream import ResultStream  # noqa: E402


def per_append(evaluations: int) -> tuple[float, float]:
    folder = Path(tempfile.mkdtemp())
    stream = ResultStream.create(folder / "s.nc", sweep_template(evaluations))
    cells = {"loss": np.array([0.1, 0.2]), "accuracy": np.array([0.9, 0.8]),
             "agreement": np.ones((2, 8), dtype=np.int64)}
    times = []
    for k in range(evaluations):
        t0 = time.perf_counter()
        stream.append({"lam": k // 4, "sample": k % 4}, cells)
        times.append(time.perf_counter() - t0)
    stream.close()
    return float(np.median(times)), float(np.mean(times))


def sweep_overhead() -> tuple[float, float]:
    a = cb.train("mlp", "digits", seed=0, epochs=5)
    b = cb.train("mlp", "digits", seed=1, epochs=5)
    pair = cb.ModelPair(a, b).align("weight", seed=0)
    kw = dict(data="digits", values=list(np.linspace(0, 0.5, 25)), samples=8, seed=0)  # 200 evaluations
    plain, streamed = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        cb.sweep(pair, cb.Uniform(), **kw)
        plain.append(time.perf_counter() - t0)
        out = Path(tempfile.mkdtemp()) / "s.nc"
        t0 = time.perf_counter()
        cb.sweep(pair, cb.Uniform(), out=out, **kw)
        streamed.append(time.perf_counter() - t0)
    return min(plain), min(streamed)


if __name__ == "__main__":
    for n in (100, 1000, 10000):
        med, mean = per_append(n)
        print(f"{n:>6} evaluations: {med * 1e3:.3f} ms per append (median), {mean * 1e3:.3f} ms (mean)")
    plain, streamed = sweep_overhead()
    print(f"200-evaluation digits sweep: {plain:.2f} s without out=, {streamed:.2f} s with out= "
          f"(ratio {streamed / plain:.3f})")
