"""Sweep overhead (issue 11, item 2): ``cb.sweep`` against a bare torch loop doing the same work.

Both evaluate the two end models (a sweep reports them), draw 16 uniform coefficient vectors
(``s = 0.25``), combine ``θ = θ_A + v ⊙ (θ_B − θ_A)`` and run the same forward passes (batches of
1000) over the test split of Fashion-MNIST, accumulating the loss and accuracy. The bare loop is
what a researcher would write by hand: ``torch.rand`` on the device, ``vector_to_parameters`` into
one module, ``model(x)``. Timed interleaved, in alternating order (bare first in even repeats, the
sweep first in odd ones), best of ``repeats``. The models are randomly
initialised (seeds 0 and 1; the cost of a forward pass does not depend on training): the MLP at
width 1, Tiny-10 at width 0.5.

After the ratio, one more run of each times its forward calls alone and prints the share of
wall time outside them, the bare loop's and the sweep's (in memory).

``breakdown`` runs one sweep (streaming to a temporary file), then a second one (the first file a
process writes pays xarray's one-time imports, dask.distributed among them when dask is installed),
with wall-clock timers around the
library's stages and prints where the time goes: the forward pass, drawing, combining, copying
(host/device conversions and stacking), metrics (loss, accuracy, predictions from the logits),
writing (the result stream), and bookkeeping (everything else: planning, keys, provenance, the
loop). Timers nest: each stage's time excludes the stages it calls.

``--backend jax`` compares ``cb.sweep`` on the jax backend with the bare jax loop a researcher
would write: ``jax.random.uniform`` draws, the flat vector unravelled into the flax parameters
(``jax.flatten_util.ravel_pytree``) inside one jitted function that returns a batch's summed
loss and correct count (the ratio only: jax dispatches asynchronously, so its forward calls
cannot be timed apart).

Run: ``.venv/bin/python benchmarks/measure_sweep_overhead.py [mlp|tiny10] [repeats] [examples]
[--backend jax]`` and ``... breakdown [mlp|tiny10] [examples]``.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import combinability as cb
from combinability.data import load_dataset
from combinability.models import build_model

DRAWS, S = 16, 0.25


def bare_loop(model: torch.nn.Module, theta_a: torch.Tensor, theta_b: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor, draws: int, s: float, batch: int = 1000,
              clock: list[float] | None = None) -> list[tuple[float, float]]:
    """The loop a researcher would write; ``clock[0]`` accumulates the time in ``model(x)``."""
    out = []
    gen = torch.Generator().manual_seed(0)
    delta = theta_b - theta_a
    params = [p for p in model.parameters()]
    with torch.inference_mode():
        for k in range(draws + 2):
            if k < 2:  # the end models
                theta = (theta_a, theta_b)[k]
            else:
                v = (0.5 - s) + 2 * s * torch.rand(theta_a.shape, generator=gen)
                theta = theta_a + v * delta
            torch.nn.utils.vector_to_parameters(theta, params)
            loss = correct = 0.0
            for i in range(0, len(x), batch):
                if clock is not None:
                    start = time.perf_counter()
                logits = model(x[i:i + batch])
                if clock is not None:
                    clock[0] += time.perf_counter() - start
                loss += float(torch.nn.functional.cross_entropy(logits, y[i:i + batch], reduction="sum"))
                correct += float((logits.argmax(1) == y[i:i + batch]).sum())
            out.append((loss / len(x), correct / len(x)))
    return out


def bare_jax_loop(stats: Callable[..., Any], theta_a: Any, theta_b: Any, x: Any, y: Any, draws: int, s: float,
                  batch: int = 1000) -> list[tuple[float, float]]:
    """The jax loop a researcher would write: ``stats(theta, x, y)`` is a jitted (summed loss, correct count)."""
    import jax

    out = []
    key = jax.random.PRNGKey(0)
    delta = theta_b - theta_a
    for k in range(draws + 2):
        if k < 2:
            theta = (theta_a, theta_b)[k]
        else:
            key, sub = jax.random.split(key)
            theta = theta_a + ((0.5 - s) + 2 * s * jax.random.uniform(sub, theta_a.shape)) * delta
        loss = correct = 0.0
        for i in range(0, len(x), batch):
            batch_loss, batch_correct = stats(theta, x[i:i + batch], y[i:i + batch])
            loss += float(batch_loss)
            correct += float(batch_correct)
        out.append((loss / len(x), correct / len(x)))
    return out


def main_jax(arch: str = "mlp", repeats: int = 3, examples: int | None = None) -> None:
    """:func:`main`'s ratio for the jax backend against :func:`bare_jax_loop`."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    test = load_dataset("fashion_mnist", "test").subset(examples)
    width = 1.0 if arch == "mlp" else 0.5
    a, b = (build_model(arch, backend="jax", width=width, input_shape=test.input_shape, seed=s) for s in (0, 1))
    pair = cb.ModelPair(a, b, backend="jax")
    theta_a, unravel = ravel_pytree(a.variables["params"])
    theta_b, _ = ravel_pytree(b.variables["params"])
    rest = {k: v for k, v in a.variables.items() if k != "params"}

    @jax.jit
    def stats(theta: Any, xb: Any, yb: Any) -> tuple[Any, Any]:
        logits = a.module.apply({"params": unravel(theta), **rest}, xb, train=False)
        loss = jnp.sum(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, yb[:, None], 1)[:, 0])
        return loss, jnp.sum(jnp.argmax(logits, axis=1) == yb)

    x, y = jnp.asarray(test.x), jnp.asarray(test.y)
    kwargs = dict(data={"test": test}, splits=["test"], values=[S], samples=DRAWS, seed=0)
    bare_run = functools.partial(bare_jax_loop, stats, theta_a, theta_b, x, y, DRAWS, S)
    sweep_run = functools.partial(cb.sweep, pair, cb.Uniform(), **kwargs)
    bare_run(), sweep_run()  # compile both (not timed)
    compare(f"{arch} (jax)", bare_run, sweep_run, repeats, len(x))


def compare(label: str, bare_run: Callable[[], Any], sweep_run: Callable[[], Any], repeats: int,
            examples: int) -> None:
    """Time the bare loop and the sweep interleaved, best of ``repeats`` each; print the ratio."""
    bare: list[float] = []
    lib: list[float] = []
    pairs = ((bare_run, bare), (sweep_run, lib))
    for r in range(repeats):  # ABBA: neither goes first every time (the machine's clock drifts over a run)
        for run, times in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    tb_, tl = min(bare), min(lib)
    print(f"{label}: bare loop {tb_:.2f} s, cb.sweep {tl:.2f} s for {DRAWS} draws on {examples} examples; "
          f"throughput ratio (sweep / bare) {tb_ / tl:.3f}  "
          f"[bare runs {np.round(bare, 2)}, sweep runs {np.round(lib, 2)}]")


def _setup(arch: str, examples: int | None) -> tuple[Any, ...]:
    test = load_dataset("fashion_mnist", "test").subset(examples)
    width = 1.0 if arch == "mlp" else 0.5
    a = build_model(arch, backend="torch", width=width, input_shape=test.input_shape, seed=0)
    b = build_model(arch, backend="torch", width=width, input_shape=test.input_shape, seed=1)
    pair = cb.ModelPair(a, b)
    # the bare loop needs torch's own parameter order: the library's layout may order them otherwise
    model = build_model(arch, backend="torch", width=width, input_shape=test.input_shape, seed=0).eval()
    ta = torch.nn.utils.parameters_to_vector(a.parameters()).detach()
    tb = torch.nn.utils.parameters_to_vector(b.parameters()).detach()
    return test, pair, model, ta, tb


def main(arch: str = "mlp", repeats: int = 3, examples: int | None = None) -> None:
    test, pair, model, ta, tb = _setup(arch, examples)
    x, y = torch.tensor(test.x), torch.tensor(test.y)
    kwargs = dict(data={"test": test}, splits=["test"], values=[S], samples=DRAWS, seed=0)
    compare(arch, functools.partial(bare_loop, model, ta, tb, x, y, DRAWS, S),
            functools.partial(cb.sweep, pair, cb.Uniform(), **kwargs), repeats, len(x))
    shares = non_forward_shares(pair, model, ta, tb, test)
    print(f"{arch}: everything but the forward pass (in memory, one more run of each, forward calls timed): "
          f"bare loop {100 * shares[0]:.1f} %, cb.sweep {100 * shares[1]:.1f} %")


def non_forward_shares(pair: Any, model: torch.nn.Module, ta: torch.Tensor, tb: torch.Tensor,
                       test: Any) -> tuple[float, float]:
    """The share of wall time outside the model's forward calls: the bare loop's, then the sweep's.

    The sweep's forward calls are those of the module's own ``forward`` (the backend's copy of
    the model, the combined parameters swapped in); the bare loop's, ``model(x)``. Swapping
    parameters in and out counts as the library's overhead, not as its forward pass.
    """
    from combinability_torch.models import TableNet

    x, y = torch.tensor(test.x), torch.tensor(test.y)
    clock = [0.0]
    t0 = time.perf_counter()
    bare_loop(model, ta, tb, x, y, DRAWS, S, clock=clock)
    bare_share = 1 - clock[0] / (time.perf_counter() - t0)
    sweep_clock = [0.0]
    original = TableNet.forward

    def timed_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            sweep_clock[0] += time.perf_counter() - start

    TableNet.forward = timed_call
    try:
        t0 = time.perf_counter()
        cb.sweep(pair, cb.Uniform(), data={"test": test}, splits=["test"], values=[S], samples=DRAWS, seed=0)
        sweep_share = 1 - sweep_clock[0] / (time.perf_counter() - t0)
    finally:
        TableNet.forward = original
    return bare_share, sweep_share


class Timers:
    """Wall-clock timers around functions; a stage's time excludes the timed stages it calls."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        inherited = isinstance(owner, type) and name not in owner.__dict__
        raw = owner.__dict__[name] if isinstance(owner, type) and not inherited else getattr(owner, name)
        bound = isinstance(raw, classmethod | staticmethod)  # called through the class: wrap the bound callable
        original = getattr(owner, name) if bound else raw

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [stage, time.perf_counter(), 0.0]  # stage, start, time of nested stages
            self._stack.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[1]
                self.own[stage] += elapsed - frame[2]
                self.calls[stage] += 1
                if self._stack:
                    self._stack[-1][2] += elapsed

        setattr(owner, name, staticmethod(timed) if bound else timed)
        self._undo.append(lambda: delattr(owner, name) if inherited else setattr(owner, name, raw))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()


def breakdown(arch: str = "mlp", examples: int | None = None) -> None:
    from combinability_torch import backend as torch_backend
    from combinability_torch.models import TableNet

    import combinability.combination as combination
    import combinability.evaluation as evaluation
    import combinability.result_stream as result_stream
    import combinability.sweeps as sweeps
    from combinability.samplers import Uniform

    test, pair, *_ = _setup(arch, examples)
    kwargs = dict(data={"test": test}, splits=["test"], values=[S], samples=DRAWS, seed=0)
    cb.sweep(pair, Uniform(), **kwargs)  # warm
    for run in ("the process's first", "a second"):  # the first file write pays xarray's one-time imports
        timers = Timers()
        timers.wrap(sweeps, "sweep", "bookkeeping")
        timers.wrap(Uniform, "draw", "drawing")
        timers.wrap(combination, "combine", "combining")
        timers.wrap(TableNet, "forward", "forward")  # the module's own forward on one batch
        timers.wrap(evaluation.Evaluator, "evaluate", "metrics")
        timers.wrap(evaluation.Evaluator, "_stack", "copying")
        timers.wrap(torch_backend.TorchBackend, "to_numpy", "copying")
        timers.wrap(torch_backend.TorchBackend, "asarray", "copying")
        timers.wrap(torch_backend.TorchBackend, "cross_entropy", "metrics")
        for name in ("create", "append", "close", "finish"):
            timers.wrap(result_stream.ResultStream, name, "writing")
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            try:
                sweeps.sweep(pair, Uniform(), out=Path(folder) / "sweep.nc", **kwargs)
            finally:
                timers.restore()
            wall = time.perf_counter() - t0
        print(f"{arch}: {run} cb.sweep of {DRAWS} draws + 2 end models on {len(test)} examples streamed to a file: "
              f"{wall:.2f} s")
        for stage in ("forward", "drawing", "combining", "copying", "metrics", "writing", "bookkeeping"):
            print(f"  {stage:<12} {timers.own[stage]:7.3f} s  {100 * timers.own[stage] / wall:5.1f} %"
                  f"  ({timers.calls[stage]} calls)")
        other = wall - sum(timers.own.values())
        print(f"  {'untimed':<12} {other:7.3f} s  {100 * other / wall:5.1f} %")

def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="mlp", choices=["mlp", "tiny10", "breakdown"],
                        help="the model whose ratio to measure, or 'breakdown' (one sweep by stage)")
    parser.add_argument("rest", nargs="*", help="ratio: [repeats] [examples]; breakdown: [mlp|tiny10] [examples]")
    parser.add_argument("--backend", default="torch", choices=["torch", "jax"], help="the ratio's backend")
    args = parser.parse_args(argv)
    limit = 2
    if len(args.rest) > limit:
        parser.error(f"at most {limit} more arguments, got {args.rest}")
    return args


if __name__ == "__main__":
    args = _arguments()
    rest = args.rest
    if args.what == "breakdown":
        arch = rest[0] if rest else "mlp"
        if arch not in ("mlp", "tiny10"):
            raise SystemExit(f"breakdown: the model is mlp or tiny10, got {arch!r}")
        breakdown(arch, int(rest[1]) if len(rest) > 1 else None)
    else:
        ratio = main_jax if args.backend == "jax" else main
        ratio(args.what, int(rest[0]) if rest else 3, int(rest[1]) if len(rest) > 1 else None)
