"""Distributed sweeps (issue 15): speed-up of 2 local Dask workers over 1, and the cost of a task.

The sweep: two MLPs (width 1) on the Fashion-MNIST test split (10,000 images), uniform
coefficients at 4 values × ``samples`` cells, each cell one combination evaluated on the
whole split. It runs in-process (torch with its default threads, and with 1 thread as
each worker has) and on two local clusters of 1 and of 2 worker processes, one thread each,
as ``--workers N`` starts them (:func:`combinability.executors.dask_cluster.connect`), both
started and warmed up (workers import torch) before any timing. The runs are
interleaved, one of each per round, and the best of ``rounds`` is reported, so that load
from other jobs on the machine hits every configuration alike. Every distributed Dataset
is checked bit for bit against the in-process one.

The per-task overhead is the difference between the same sweep of 64 cheap cells (100
examples each) cut into one task per cell and into a single task, per extra task, on the
1-worker cluster; beside it, the round trip of a no-op task (``submit``, run,
``as_completed``) on 2 workers.

Run: ``.venv/bin/python benchmarks/measure_distributed.py [samples] [rounds]``
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import combinability as cb
from combinability.data import load_dataset
from combinability.models import build_model

VALUES = [0.1, 0.2, 0.3, 0.4]


def _same(ds, ref) -> bool:
    return all(np.asarray(ds[v].values).tobytes() == np.asarray(ref[v].values).tobytes() for v in ref.data_vars)


def _noop(i: int) -> int:
    return i


def _time(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(samples: int = 4, rounds: int = 5, noops: int = 200) -> None:
    from distributed import as_completed

    from combinability.executors.dask_cluster import connect

    test = load_dataset("fashion_mnist", "test")
    a = build_model("mlp", backend="torch", width=1.0, input_shape=test.input_shape, seed=0)
    b = build_model("mlp", backend="torch", width=1.0, input_shape=test.input_shape, seed=1)
    pair = cb.ModelPair(a, b)
    big = dict(data={"test": (test.x, test.y)}, values=VALUES, samples=samples, seed=0)
    small = dict(data={"test": (test.x[:100], test.y[:100])}, values=VALUES, samples=16, seed=0)
    cells, small_cells = len(VALUES) * samples, len(VALUES) * 16
    print(f"sweep: MLP ({pair.layout.size:,} parameters), Fashion-MNIST test ({len(test):,} images), {cells} cells; "
          f"best of {rounds} interleaved rounds", flush=True)
    threads = torch.get_num_threads()

    def local(n_threads: int, kw: dict) -> object:
        torch.set_num_threads(n_threads)
        try:
            return cb.sweep(pair, cb.Uniform(), **kw)
        finally:
            torch.set_num_threads(threads)

    ref = local(1, big)
    ref_small = local(1, small)
    clients = {n: connect(workers=n) for n in (1, 2)}  # what --workers N starts
    try:
        for c in clients.values():  # warm-up: workers import torch, build their evaluators once
            cb.sweep(pair, cb.Uniform(), client=c, **{**small, "samples": 2})
        runs: dict[str, Callable[[], object]] = {
            f"in-process, torch {threads} threads": lambda: local(threads, big),
            "in-process, torch 1 thread": lambda: local(1, big),
            "dask, 1 worker": lambda: cb.sweep(pair, cb.Uniform(), client=clients[1], **big),
            "dask, 2 workers": lambda: cb.sweep(pair, cb.Uniform(), client=clients[2], **big),
            f"dask, 1 worker, {small_cells} cheap cells, 1 per task":
                lambda: cb.sweep(pair, cb.Uniform(), client=clients[1], cells_per_task=1, **small),
            f"dask, 1 worker, {small_cells} cheap cells, 1 task":
                lambda: cb.sweep(pair, cb.Uniform(), client=clients[1], cells_per_task=small_cells, **small),
        }
        best = dict.fromkeys(runs, float("inf"))
        checks: dict[str, str] = {}
        for _ in range(rounds):
            for name, fn in runs.items():
                t, ds = _time(fn)
                best[name] = min(best[name], t)
                if name.startswith("dask"):
                    ok = _same(ds, ref_small if "cheap" in name else ref)
                    checks[name] = "bitwise equal" if ok and checks.get(name, "bitwise equal") == "bitwise equal" \
                        else "DIFFERS"
        c2 = clients[2]
        c2.gather(c2.map(_noop, range(8), pure=False))
        t0 = time.perf_counter()
        for f in as_completed(c2.map(_noop, range(noops), pure=False)):
            f.result()
        noop = (time.perf_counter() - t0) / noops
    finally:
        for c in clients.values():
            cluster = c.cluster
            c.close()
            cluster.close()

    print(f"\n{'run':<52} {'best (s)':>9}  check")
    for name, t in best.items():
        print(f"{name:<52} {t:>9.2f}  {checks.get(name, '')}")
    names = list(runs)
    overhead = 1000 * (best[names[4]] - best[names[5]]) / (small_cells - 1)
    print(f"\n{'figure':<60} {'value':>10}")
    print(f"{'speed-up, 2 workers over 1':<60} {best['dask, 1 worker'] / best['dask, 2 workers']:>9.2f}x")
    print(f"{'speed-up, 2 workers over in-process (1 thread)':<60} "
          f"{best['in-process, torch 1 thread'] / best['dask, 2 workers']:>9.2f}x")
    print(f"{'per-task overhead in a sweep, 1 worker (ms/task)':<60} {overhead:>10.1f}")
    print(f"{f'no-op task round trip, 2 workers, {noops} tasks (ms/task)':<60} {1000 * noop:>10.2f}")
    print(f"{'cell, in-process 1 thread (ms/cell)':<60} {1000 * best['in-process, torch 1 thread'] / cells:>10.1f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
