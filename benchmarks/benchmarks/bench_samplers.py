"""Drawing coefficient vectors and combining models, float32, ``d = 10**7``, per array library and device.

Run with asv, or directly for a quick look (numpy, torch and jax on the CPU)::

    .venv/bin/python benchmarks/benchmarks/bench_samplers.py
"""

from __future__ import annotations

import numpy as np

from combinability.combination import combine, combine_into
from combinability.layout import FlatLayout
from combinability.samplers import DrawContext, get_sampler

try:
    from .common import DEVICES, LIBRARIES, asarray, random_source, require, synchronize
except ImportError:  # run as a script
    from common import DEVICES, LIBRARIES, asarray, random_source, require, synchronize

D = 10**7
LAYERS = 10

#: A representative value of each sampler's parameter (inside the range, away from the ends).
VALUES = {
    "uniform": 0.3,
    "subcube": 0.7,
    "hyperplane": 0.2,
    "bernoulli": 0.3,
    "linear": 0.4,
    "stitch": 5,
    "minmax": 0.3,
    "box": 0.2,
    "triangle": (0.2, 0.3),
}


def _context(library: str = "numpy", device: str = "cpu", d: int = D) -> DrawContext:
    layout = FlatLayout.from_arrays({f"layer{i}": np.zeros(d // LAYERS, np.float32) for i in range(LAYERS)})
    rng = np.random.default_rng(0)
    theta_a = asarray(library, device, rng.standard_normal(layout.size, dtype=np.float32))
    theta_b = asarray(library, device, rng.standard_normal(layout.size, dtype=np.float32))
    return DrawContext(layout, random_source(library, device), theta_a=theta_a, theta_b=theta_b)


class Draw:
    """One ``sampler.draw(value, ctx)`` of ``d = 10**7`` float32 coefficients, on the library's device."""

    params = [list(VALUES), LIBRARIES, DEVICES]
    param_names = ["sampler", "library", "device"]
    timeout = 120

    def setup(self, name: str, library: str, device: str) -> None:
        require(library, device)
        self.ctx = _context(library, device)
        self.sampler = get_sampler(name)
        self.value = VALUES[name]
        synchronize(self.sampler.draw(self.value, self.ctx))  # warm caches (layer index, rate, compilation)

    def time_draw(self, name: str, library: str, device: str) -> None:
        synchronize(self.sampler.draw(self.value, self.ctx))

    def peakmem_draw(self, name: str, library: str, device: str) -> None:
        synchronize(self.sampler.draw(self.value, self.ctx))


class Combine:
    """``(1 − v) θ_A + v θ_B`` for ``d = 10**7`` float32, allocating or in place (mutable arrays)."""

    params = [["vector", "scalar"], LIBRARIES, DEVICES]
    param_names = ["v", "library", "device"]
    timeout = 120

    def setup(self, kind: str, library: str, device: str) -> None:
        require(library, device)
        ctx = _context(library, device)
        self.a, self.b = ctx.theta_a, ctx.theta_b
        self.v = get_sampler("uniform").draw(0.5, ctx) if kind == "vector" else 0.3
        synchronize(combine(self.a, self.b, self.v))

    def time_combine(self, kind: str, library: str, device: str) -> None:
        synchronize(combine(self.a, self.b, self.v))

    def peakmem_combine(self, kind: str, library: str, device: str) -> None:
        synchronize(combine(self.a, self.b, self.v))


class CombineInto:
    """The same, written into a preallocated vector (mutable arrays: numpy and torch)."""

    params = [["vector", "scalar"], ["numpy", "torch"], DEVICES]
    param_names = ["v", "library", "device"]
    timeout = 120

    def setup(self, kind: str, library: str, device: str) -> None:
        Combine.setup(self, kind, library, device)
        self.out = self.a * 0

    def time_combine_into(self, kind: str, library: str, device: str) -> None:
        synchronize(combine_into(self.out, self.a, self.b, self.v))


if __name__ == "__main__":  # plain timing without asv
    import resource
    import time
    from functools import partial

    def best_of(fn, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    for lib in LIBRARIES:
        bench = Draw()
        for sampler_name in VALUES:
            bench.setup(sampler_name, lib, "cpu")
            seconds = best_of(partial(bench.time_draw, sampler_name, lib, "cpu"))
            print(f"{lib:<6} draw {sampler_name:<12} {seconds * 1e3:7.1f} ms")
        comb = Combine()
        comb.setup("vector", lib, "cpu")
        print(f"{lib:<6} combine (vector)   {best_of(partial(comb.time_combine, 'vector', lib, 'cpu')) * 1e3:7.1f} ms")
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
