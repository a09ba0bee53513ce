"""Peak memory of a sweep at paper scale (issue 11, item 3): ResNet-20 x16, random pair, 25 values.

Each measurement runs in a fresh process (``ru_maxrss`` is a high-water mark): it imports
the library and torch, notes its resident memory (the *baseline*), builds two randomly
initialised ResNet-20 x16 (no training), and sweeps 25 values of a sampler on ``examples``
synthetic CIFAR-shaped images (the forward pass, not the data, is what is measured). The
report gives the peak resident memory above the baseline against the two models' own size
(``2 x d x 4`` bytes); the goal is at most 4x, and flat in the number of samples per value.

A third part evaluates one model on one batch of 256 images: the activations' peak (the
library's torch models drop each activation after its last reader).

A second part collects the unit correlations of a (narrower) pair at every feature point
over ``n`` images: streamed (``Evaluator.correlations``) against holding every activation
(``Evaluator.features`` then ``unit_correlations``, as activation matching and the
robustness experiment did), to show memory flat in ``n``.

Run: ``.venv/bin/python benchmarks/measure_memory.py [width] [examples] [batch_size]``
(defaults 16, 2, 2; about 15 minutes on 2 busy cores).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

MIB = 2**20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakWatcher:
    """The peak resident memory while it runs, sampled every millisecond by a thread."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = _rss_now(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_now())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_now())


def child(kind: str, width: float, examples: int, batch_size: int, samples: int, backend: str = "torch") -> dict:
    """One measurement in this process (models of ``backend``); prints and returns a JSON record."""
    import numpy as np
    import torch

    import combinability as cb
    from combinability.data.base import ArrayDataset
    from combinability.models import build_model

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(examples, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, examples),
                        num_classes=10, name="noise", split="test")
    if backend == "jax":
        import jax

        jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory in the baseline
    baseline = _rss_now()
    models = [build_model("resnet20", backend=backend, width=width, input_shape=(3, 32, 32), seed=s) for s in (0, 1)]
    pair = cb.ModelPair(*models, backend=backend)
    model_bytes = 2 * pair.layout.size * 4
    t0 = time.perf_counter()
    if kind == "sweep":
        cb.sweep(pair, cb.Uniform(), data={"test": data}, splits=["test"], samples=samples, seed=0,
                 batch_size=batch_size)
        collection = None
    else:
        from combinability.evaluation import Evaluator

        ev = Evaluator(pair.backend_obj, pair.template, pair.layout, batch_size=batch_size)
        points = list(dict.fromkeys(pair.feature_points.values()))
        before, watcher = _rss_now(), _PeakWatcher()
        if kind == "correlations":
            ev.correlations(pair.theta_a, pair.theta_b, data, points)
        elif kind == "evaluate":  # one model's loss on the data: the activations of one batch at a time
            ev.evaluate(pair.theta_a, data)
        else:  # what activation matching and robustness did: every activation of both models, then correlations
            from combinability.matching import unit_correlations

            fa, fb = ev.features(pair.theta_a, data, points), ev.features(pair.theta_b, data, points)
            for p in points:
                unit_correlations(fa[p], fb[p])
        collection = (watcher.stop() - before) / MIB
    record = {"kind": kind, "backend": backend,
              "width": width, "examples": examples, "batch_size": batch_size, "samples": samples,
              "parameters": pair.layout.size, "models_mib": model_bytes / MIB, "baseline_mib": baseline / MIB,
              "peak_mib": _peak() / MIB, "above_baseline_mib": (_peak() - baseline) / MIB,
              "ratio_to_models": (_peak() - baseline) / model_bytes, "seconds": time.perf_counter() - t0,
              "collection_peak_mib": collection}
    print(json.dumps(record))
    return record


def run(kind: str, width: float, examples: int, batch_size: int, samples: int = 1, backend: str = "torch") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(width), str(examples), str(batch_size),
                          str(samples), backend], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(width: float = 16, examples: int = 2, batch_size: int = 2, stats_width: float = 4) -> None:
    print(f"ResNet-20 x{width:g}, random pair, Uniform sweep of 25 values on {examples} images (batch {batch_size})")
    for kind, samples in (("sweep", 1), ("sweep", 2)):
        r = run(kind, width, examples, batch_size, samples)
        print(f"  {kind}, {samples} sample(s)/value ({25 * samples} evaluations): peak {r['peak_mib']:.0f} MiB, "
              f"{r['above_baseline_mib']:.0f} MiB above the {r['baseline_mib']:.0f} MiB baseline = "
              f"{r['ratio_to_models']:.2f}x the two models ({r['models_mib']:.0f} MiB, d = {r['parameters']:,}); "
              f"{r['seconds']:.0f} s")
    print(f"activation statistics of a ResNet-20 x{stats_width:g} pair at all its feature points, batches of 32: "
          "peak memory of the collection above the memory before it")
    for n in (64, 256):
        for kind in ("correlations", "features"):
            r = run(kind, stats_width, n, 32)
            print(f"  {kind:<12} n = {n:>4} images: {r['collection_peak_mib']:.0f} MiB ({r['seconds']:.0f} s)")
    r = run("evaluate", stats_width, 256, 256)
    print(f"one evaluation of a ResNet-20 x{stats_width:g} on 256 images in one batch: "
          f"{r['collection_peak_mib']:.0f} MiB above the memory before it (the activations of that batch)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, width, examples, batch, samples = sys.argv[2:7]
        child(kind, float(width), int(examples), int(batch), int(samples), *sys.argv[7:8])
    else:
        args = sys.argv[1:]
        main(float(args[0]) if args else 16, int(args[1]) if len(args) > 1 else 2,
             int(args[2]) if len(args) > 2 else 2)
