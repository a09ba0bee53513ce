"""Weight matching: the library against Git Re-Basin's algorithm, timed in one run.

For each pair, the reference reimplementation (:mod:`reference_rebasin`, plain numpy and
scipy, float32 as the original's jax) and :func:`combinability.weight_matching` run on
the same parameters with the same seed, alternately (``--repeats`` times each, the best
time kept), each call in a fresh process (``--no-isolate``: all in this one); the table
gives their times, the ratio, the sweeps and the objectives, then the library with restarts.

Pairs:

* ``mlp``: two 784-512-512-512-10 MLPs trained on Fashion-MNIST with Adam (seeds 0, 1
  and 2, ``--epochs``), every pair of them; the checkpoints are kept in ``--cache``
  and reused.
* ``resnet20xW``: a freshly initialised ResNet-20 at width ``W`` (``--resnet-width``)
  and a copy of it with its units randomly permuted and Gaussian noise added
  (``--noise`` times each parameter's standard deviation), so that matching has a
  planted answer that takes several sweeps to reach (at width 4: 5 sweeps with noise
  1.5, 9 with 3, 5 with 6).
* ``resnet20xW trained`` (``--trained-resnet-width``): two ResNet-20 at width ``W`` trained on
  the first ``--resnet-examples`` Fashion-MNIST images for ``--resnet-epochs`` (seeds 0, 1; Adam,
  as the paper's SGD recipe collapses on runs this short: :data:`RESNET_RECIPE`), kept in ``--cache``.

Without numba the library solves each assignment with scipy, like the reference; with
it (``pip install numba``), warm-started from the last solve.

Both matchers' processes run with the library's allocator settings
(:mod:`combinability.host_memory`; the warm-up's library call sets them), so that
neither pays fresh pages for memory the other would reuse.

``--backend torch`` keeps the library's cost terms on torch's device (a GPU when there is
one; see ``weight_matching(backend=...)``); the reference stays numpy on the CPU.

Run from the repository root::

    .venv/bin/python benchmarks/measure_matching.py --epochs 3 --resnet-width 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_rebasin as reference  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.data import load_dataset  # noqa: E402
from combinability.models import build_model  # noqa: E402
from combinability.training import TrainRecipe  # noqa: E402


def mlp_pairs(epochs: int, cache: Path, seeds: tuple[int, ...], width: float = 1.0) -> dict:
    """``{"mlp sA-sB": (spec, params_a, params_b)}`` for every pair of trained MLPs (``width`` x 512 hidden units)."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = "mlp" if width == 1.0 else f"mlp{width:g}"
    models = {s: cb.train("mlp", "fashion_mnist", seed=s, epochs=epochs, width=width,
                          checkpoint=cache / f"{stem}_fashion_mnist_e{epochs}_s{s}.ckpt") for s in seeds}
    out = {}
    for s, t in itertools.combinations(seeds, 2):
        pair = cb.ModelPair(models[s], models[t], architecture="mlp", backend="torch")
        out[f"{stem} s{s}-s{t}"] = (pair.spec, pair.params(0), pair.params(1))
    return out


#: How the trained ResNet-20s learn: Adam. The paper's SGD recipe (lr 0.1 after a one-epoch warm-up) collapses
#: a LayerNorm ResNet-20 on runs this short to a constant output (test accuracy 10-12 %, the library now warns):
#: the pairs measured before 2026-12-06 were such untrained pairs.
RESNET_RECIPE = TrainRecipe(epochs=2, lr=1e-3, optimizer="adam", weight_decay=0.0)


def trained_resnet_pair(width: int, epochs: int, cache: Path, examples: int, batch_size: int = 100) -> dict:
    """Two ResNet-20 at ``width`` trained with Adam on the first ``examples`` Fashion-MNIST images (seeds 0, 1);
    their test accuracy (1,000 images) is printed."""
    cache.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion_mnist", "train").subset(examples)
    recipe = RESNET_RECIPE.with_(epochs=epochs, batch_size=batch_size)
    batch = "" if batch_size == 100 else f"_b{batch_size}"
    models = [cb.train("resnet20", data, seed=s, width=width, recipe=recipe,
                       checkpoint=cache / f"resnet20x{width}_fashion_mnist_n{examples}_e{epochs}{batch}_adam_s{s}.ckpt")
              for s in (0, 1)]
    if multiprocessing.current_process().name != "MainProcess":  # a timed child rebuilds the pair: no report
        pair = cb.ModelPair(*models, architecture="resnet20", backend="torch")
        return {f"resnet20x{width} trained": (pair.spec, pair.params(0), pair.params(1))}
    test = load_dataset("fashion_mnist", "test").subset(1000)
    ends = cb.sweep(cb.ModelPair(*models), cb.Linear(), data=test, values=[0.0, 1.0], samples=1)
    print(f"resnet20x{width} trained: test accuracy {ends['accuracy'].values.ravel().round(3).tolist()}",
          file=sys.stderr)
    pair = cb.ModelPair(*models, architecture="resnet20", backend="torch")
    return {f"resnet20x{width} trained": (pair.spec, pair.params(0), pair.params(1))}


def resnet_pair(width: int, noise: float, seed: int = 0) -> dict:
    """A random ResNet-20 and a permuted, noisy copy of it."""
    model = build_model("resnet20", width=width, input_shape=(3, 32, 32), seed=seed)
    pair = cb.ModelPair(model, model, architecture="resnet20", backend="torch")
    spec, a = pair.spec, pair.params(0)
    rng = np.random.default_rng(seed + 1)
    b = cb.apply_permutation(spec, cb.random_permutation(spec, a, seed=rng), a)
    b = {k: (v + noise * (np.std(v) or 0.1) * rng.standard_normal(v.shape, dtype=np.float32)).astype(v.dtype)
         for k, v in b.items()}
    return {f"resnet20x{width}": (spec, a, b)}


def run_matcher(matcher: str, recipe: tuple, name: str, seed: int, restarts: int = 0, backend: str | None = None):
    """Build pair ``name`` from ``recipe`` (a builder and its arguments), then time one call of ``matcher``.

    ``matcher`` is ``"reference"`` or ``"library"`` (its cost terms on ``backend``'s device
    when given); returns its result and wall time. Both matchers first run once on a small
    pair (:func:`_warm_up`), so that what a process loads once (numba's compiled solver,
    BLAS threads, a GPU's context) is not timed.
    """
    builder, args = recipe
    spec, a, b = builder(*args)[name]
    _warm_up(backend)
    if matcher == "reference":
        start = time.perf_counter()
        result = reference.weight_matching(seed, spec, a, b)
    else:
        start = time.perf_counter()
        result = cb.weight_matching(spec, a, b, seed=seed, restarts=restarts, backend=backend)
    return result, time.perf_counter() - start


def warm_up_pair() -> tuple[cb.PermutationSpec, dict, dict]:
    """A small random MLP pair ``(spec, params_a, params_b)`` to run a matcher on once, untimed."""
    rng = np.random.default_rng(0)
    sizes = (64, 48, 32, 10)
    names = [f"l{i}" for i in range(len(sizes) - 1)]
    axes = {f"{n}.weight": (f"P{i}" if i < len(names) - 1 else None, f"P{i - 1}" if i else None)
            for i, n in enumerate(names)}
    pair = [{f"{n}.weight": rng.normal(size=(sizes[i + 1], sizes[i])).astype(np.float32)
             for i, n in enumerate(names)} for _ in range(2)]
    return cb.PermutationSpec(axes), *pair


def _warm_up(backend: str | None = None) -> None:
    """Both matchers once on :func:`warm_up_pair`: code paths, BLAS threads and numba's solver loaded."""
    spec, a, b = warm_up_pair()
    reference.weight_matching(0, spec, a, b)
    cb.weight_matching(spec, a, b, seed=0, backend=backend)


def timed(matcher: str, recipe: tuple, name: str, seed: int, restarts: int = 0, isolate: bool = True,
          backend: str | None = None):
    """:func:`run_matcher` in a fresh process (``isolate``), or in this one.

    A fresh process builds the pair itself, so that neither matcher inherits the heap the
    other left (on this project's machine, numpy's large allocations fault their pages in
    up to 9x slower after another matcher's run, which would favour whichever runs first).
    """
    if not isolate:
        return run_matcher(matcher, recipe, name, seed, restarts, backend)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_matcher, matcher, recipe, name, seed, restarts, backend).result()


def compare(name: str, recipe: tuple, *, seed: int, repeats: int, restarts: int, isolate: bool = True,
            backend: str | None = None) -> list[str]:
    """Table rows for one pair: the reference, the library single run, the library with restarts."""
    ref_perm, ref_time, lib_time = None, float("inf"), float("inf")
    lib = None
    for _ in range(repeats):  # alternate, so that a busy machine slows both alike
        (ref_perm, sweeps), t = timed("reference", recipe, name, seed, isolate=isolate)
        ref_time = min(ref_time, t)
        lib, t = timed("library", recipe, name, seed, isolate=isolate, backend=backend)
        lib_time = min(lib_time, t)
    spec, a, b = recipe[0](*recipe[1])[name]
    ref_obj = reference.objective(spec, a, b, ref_perm)
    same = all(np.array_equal(ref_perm[p], lib[p]) for p in ref_perm)
    many, many_time = timed("library", recipe, name, seed, restarts, isolate=isolate, backend=backend)
    return [
        f"| {name} | reference | {ref_time:.2f} | 1.00 | {sweeps} | {ref_obj:.6f} | |",
        f"| {name} | library | {lib_time:.2f} | {ref_time / lib_time:.1f} | {lib.iterations} | {lib.objective:.6f} "
        f"| {'same permutation' if same else f'{(lib.objective - ref_obj) / abs(ref_obj):+.2e} rel.'} |",
        f"| {name} | library, restarts={restarts} | {many_time:.2f} | {ref_time / many_time:.1f} | "
        f"{many.iterations} | {many.objective:.6f} | {(many.objective - ref_obj) / abs(ref_obj):+.2e} rel. |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the MLPs")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="MLP training seeds")
    parser.add_argument("--mlp-width", type=float, default=1.0, help="MLP width multiplier (2: 1,024 hidden units)")
    parser.add_argument("--cache", type=Path, default=Path(".asv/matching-models"), help="checkpoint folder")
    parser.add_argument("--resnet-width", type=int, nargs="*", default=[16], help="ResNet-20 width multipliers")
    parser.add_argument("--noise", type=float, default=3.0,
                        help="noise of the ResNet copy, in parameter stds (3: the most sweeps of 1.5, 3, 6)")
    parser.add_argument("--trained-resnet-width", type=int, nargs="*", default=[],
                        help="ResNet-20 width multipliers of trained pairs (Fashion-MNIST)")
    parser.add_argument("--resnet-epochs", type=int, default=2, help="training epochs of the trained ResNet-20s")
    parser.add_argument("--resnet-examples", type=int, default=20000, help="training images of the trained ResNet-20s")
    parser.add_argument("--resnet-batch-size", type=int, default=100, help="training batch of the trained ResNet-20s")
    parser.add_argument("--seed", type=int, default=0, help="matching seed (visit orders)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each matcher (best kept)")
    parser.add_argument("--restarts", type=int, default=3, help="restarts of the last row of each pair")
    parser.add_argument("--backend", default=None,
                        help="the library's cost terms on this backend's device (e.g. torch on a GPU); "
                             "default numpy on the CPU")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="time every call in this process (default: each in a fresh process)")
    args = parser.parse_args(argv)

    recipes: dict[str, tuple] = {}  # pair name -> (builder, its arguments): built again in each fresh process
    if args.seeds:
        recipe = (mlp_pairs, (args.epochs, args.cache, tuple(args.seeds), args.mlp_width))
        recipes.update(dict.fromkeys(mlp_pairs(*recipe[1]), recipe))  # trains the missing checkpoints once
    for width in args.trained_resnet_width:
        recipe = (trained_resnet_pair, (width, args.resnet_epochs, args.cache, args.resnet_examples,
                                        args.resnet_batch_size))
        recipes.update(dict.fromkeys(trained_resnet_pair(*recipe[1]), recipe))
    for width in args.resnet_width:
        recipes[f"resnet20x{width}"] = (resnet_pair, (width, args.noise))
    from combinability.assignment import compiled_warm_assignment as _compiled_warm_assignment

    solver = ("warm-started Jonker-Volgenant (numba; cold from an auction from 512 units)"
              if _compiled_warm_assignment() else "scipy (numba not installed)")
    where = "numpy (CPU)" if args.backend is None else f"{args.backend} ({cb.get_backend(args.backend).device()})"
    print(f"library's assignment solver: {solver}; cost terms: {where}\n")
    print("| pair | matcher | time (s) | speed-up | sweeps | objective | vs reference |")
    print("|---|---|---|---|---|---|---|")
    for name, recipe in recipes.items():
        for row in compare(name, recipe, seed=args.seed, repeats=args.repeats, restarts=args.restarts,
                           isolate=args.isolate, backend=args.backend):
            print(row, flush=True)


if __name__ == "__main__":
    main()
