"""asv benchmarks: drawing coefficient vectors and combining models, numpy float32, d = 10**7.

Run with asv (``asv run --environment existing``) or directly for a quick look::

    PYTHONPATH=. python benchmarks/bench_samplers.py
"""

from __future__ import annotations

import numpy as np

from combinability.backend import NumpyRandom
from combinability.combination import combine, combine_into
from combinability.layout import FlatLayout
from combinability.samplers import DrawContext, get_sampler

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


def _context(d: int = D) -> DrawContext:
    layout = FlatLayout.from_arrays({f"layer{i}": np.zeros(d // LAYERS, np.float32) for i in range(LAYERS)})
    rng = np.random.default_rng(0)
    theta_a = rng.standard_normal(layout.size, dtype=np.float32)
    theta_b = rng.standard_normal(layout.size, dtype=np.float32)
    return DrawContext(layout, NumpyRandom(0), theta_a=theta_a, theta_b=theta_b)


class Draw:
    """One ``sampler.draw(value, ctx)`` of ``d = 10**7`` float32 coefficients."""

    params = [list(VALUES)]
    param_names = ["sampler"]
    timeout = 120

    def setup(self, name: str) -> None:
        self.ctx = _context()
        self.sampler = get_sampler(name)
        self.value = VALUES[name]
        self.sampler.draw(self.value, self.ctx)  # warm caches (layer index, rate)

    def time_draw(self, name: str) -> None:
        self.sampler.draw(self.value, self.ctx)

    def peakmem_draw(self, name: str) -> None:
        self.sampler.draw(self.value, self.ctx)


class Combine:
    """``(1 − v) θ_A + v θ_B`` for ``d = 10**7`` float32, allocating or in place."""

    params = [["vector", "scalar"]]
    param_names = ["v"]

    def setup(self, kind: str) -> None:
        ctx = _context()
        self.a, self.b = ctx.theta_a, ctx.theta_b
        self.v = get_sampler("uniform").draw(0.5, ctx) if kind == "vector" else 0.3
        self.out = np.empty_like(self.a)

    def time_combine(self, kind: str) -> None:
        combine(self.a, self.b, self.v)

    def time_combine_into(self, kind: str) -> None:
        combine_into(self.out, self.a, self.b, self.v)

    def peakmem_combine(self, kind: str) -> None:
        combine(self.a, self.b, self.v)


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

    bench = Draw()
    for sampler_name in VALUES:
        bench.setup(sampler_name)
        print(f"draw {sampler_name:<18} {best_of(partial(bench.time_draw, sampler_name)) * 1e3:7.1f} ms")
    for kind in Combine.params[0]:
        comb = Combine()
        comb.setup(kind)
        print(f"combine      ({kind:<6}) {best_of(partial(comb.time_combine, kind)) * 1e3:7.1f} ms")
        print(f"combine_into ({kind:<6}) {best_of(partial(comb.time_combine_into, kind)) * 1e3:7.1f} ms")
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
