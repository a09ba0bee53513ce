"""Shared settings of the measurement scripts (issues 12 and 13): data, sizes, the trained models.

Every script of this folder trains (or reuses) its models through :func:`mlp` and :func:`tiny`,
whose checkpoints are named exactly as :func:`combinability.experiments.asymmetry_comparison`
and :func:`combinability.experiments.width_ablation` name theirs, so every experiment sees the
same models. Checkpoints and result files go to ``results/measurements/`` (git-ignored;
``MEASURE_DIR`` overrides it); the tables the scripts print are written beside this file.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("MEASURE_DIR", ROOT / "results" / "measurements"))
MODELS = WORK / "models"
DATA = "fashion_mnist"
#: MLP: 3 hidden layers of 256 units (width 0.5), Adam 1e-3, 3 epochs on all 60,000 training images.
MLP_WIDTH, MLP_EPOCHS = 0.5, 3
#: Tiny-10 at CPU size: channels 8-32 (width 0.5), the paper's SGD recipe (lr 0.01, momentum 0.9,
#: step schedule) for 2 epochs on 20,000 training images (drawn with seed 0), without augmentation.
TINY_WIDTH, TINY_EPOCHS, TINY_TRAIN = 0.5, 2, 20000
#: Evaluation: the first LIMIT test images.
LIMIT = 2000


def single_thread() -> None:
    """One torch thread: on 2 shared cores, several threads per process slow every job down ~4x."""
    import torch

    torch.set_num_threads(1)


def _train(arch: str, seed: int, width: float, epochs: int, examples: int | None = None, **changes: Any) -> Any:
    import combinability as cb
    from combinability.data import load_dataset
    from combinability.experiments.asymmetry import _recipe

    single_thread()
    recipe = _recipe(arch, epochs).with_(**changes)
    MODELS.mkdir(parents=True, exist_ok=True)
    stem = f"{arch}_{DATA}_w{width:g}_s{seed}_e{recipe.epochs}" + (f"_n{examples}" if examples else "")
    ckpt = MODELS / f"{stem}_torch.ckpt"
    data = load_dataset(DATA, "train").subset(examples, seed=0) if examples else DATA
    t0 = time.perf_counter()
    model = cb.train(arch, data, backend="torch", seed=seed, width=width, recipe=recipe, checkpoint=ckpt)
    took = time.perf_counter() - t0
    if took > 5:
        log(f"trained {ckpt.name} in {took:.0f} s")
    return model


def mlp(seed: int, arch: str = "mlp", width: float = MLP_WIDTH, epochs: int = MLP_EPOCHS) -> Any:
    """The MLP (or an asymmetric variant) of ``seed``, trained once and reused."""
    return _train(arch, seed, width, epochs)


def tiny(seed: int, arch: str = "tiny10", width: float = TINY_WIDTH, epochs: int = TINY_EPOCHS) -> Any:
    """The Tiny-10 (or an asymmetric variant) of ``seed`` at CPU size, trained once and reused."""
    return _train(arch, seed, width, epochs, TINY_TRAIN, augment=False)


def fit_adam(model: Any, x: Any, y: Any, epochs: int = 2, name: str | None = None) -> Any:
    """``model`` (torch) trained with Adam (lr 1e-3, batches of 128, shuffled by torch's global generator,
    which the caller seeds before building the model) on ``(x, y)``, in eval mode; with ``name``, its
    state is kept in ``MODELS / f"{name}.pt"`` and a rerun loads it instead."""
    import torch
    import torch.nn.functional as F

    kept = MODELS / f"{name}.pt" if name else None
    if kept is not None and kept.exists():
        model.load_state_dict(torch.load(kept))
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), kept)
    return model.eval()


def barrier_rows(pair: Any, fit: tuple[Any, Any], test: tuple[Any, Any],
                 variants: tuple[tuple[str, str | None, Any], ...]) -> list[str]:
    """The rows of a barrier table: the permutations of ``pair``, then for each ``(label, method, repair)``
    the linear path at 0, 0.5, 1 on ``test`` after aligning by ``method`` (None: naive; activation
    matching on ``fit``), each method aligned and timed once, with ``repair`` (a dataset for
    ``repair_data``, e.g. ``("reset", data)``) or None."""
    import time

    import combinability as cb

    sizes = pair.spec.perm_sizes(pair.params(0))
    rows = [f"Permutations: {len(sizes)} ({', '.join(f'{p}: {n}' for p, n in sizes.items())}).", "",
            "| alignment | loss at 0, 0.5, 1 | loss barrier | accuracy at 0, 0.5, 1 | time (s) |",
            "|---|---|---:|---|---:|"]
    aligned: dict[Any, tuple[Any, float | None]] = {}
    for label, method, repair in variants:
        took = None
        if method not in aligned:
            start = time.perf_counter()
            p = pair.align(method, **({"data": fit} if method == "activation" else {})) if method else pair
            aligned[method] = (p, time.perf_counter() - start if method else None)
            took = aligned[method][1]
        extra = {"repair": repair[0], "repair_data": repair[1]} if repair else {}
        ds = cb.sweep(aligned[method][0], cb.Linear(), data=test, values=[0.0, 0.5, 1.0], splits=["test"], **extra)
        loss = ds["loss"].sel(split="test").values.ravel()
        acc = ds["accuracy"].sel(split="test").values.ravel()
        rows.append(f"| {label} | {', '.join(f'{v:.3f}' for v in loss)} | {loss[1] - (loss[0] + loss[2]) / 2:.3f} | "
                    f"{', '.join(f'{v:.3f}' for v in acc)} | {f'{took:.2f}' if took is not None else ''} |")
        log(rows[-1])
    return rows


def log(message: str) -> None:
    """A timestamped line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_table(name: str, text: str) -> None:
    """Write ``text`` to ``benchmarks/measurements/<name>`` and echo it."""
    (HERE / name).write_text(text)
    print(text)


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
