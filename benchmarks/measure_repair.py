"""Measure what BatchNorm reset and REPAIR do to the midpoint of two aligned networks.

A script, not a test: it trains a pair of ``resnet20_bn`` (BatchNorm) and a pair of
``resnet20`` (LayerNorm) networks, width 1, on a 10 000-example subset of Fashion-MNIST,
aligns each pair by weight matching and prints the test loss and accuracy of the midpoint
(``v = 0.5``, ``cb.Linear()``): naive, weight-matched, weight-matched + reset (BatchNorm
only), weight-matched + REPAIR.

    python benchmarks/measure_repair.py --epochs 4 --out /tmp/measure_repair

Trained models are checkpointed under ``--out`` and reused by a second run with the same
settings. Both normalisations train with one recipe, ``--epochs`` epochs of batches of 100:
``--recipe adam`` (default: Adam, rate 1e-3, constant, no weight decay, no augmentation),
or ``--recipe paper``, the paper's ResNet-20 recipe (``recipe_for("resnet20")``: SGD,
momentum 0.9, peak rate 0.1, warm-up + cosine, augmentation), with which the LayerNorm
network does not train in so few epochs (it stays at chance on Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import combinability as cb
from combinability.training import TrainRecipe, recipe_for

ARCHITECTURES = ("resnet20_bn", "resnet20")


def _midpoint(pair, test, repair: str | None, repair_data) -> tuple[float, float, float, str]:
    """Test loss, accuracy, seconds, and the end models' scores, of the midpoint ``v = 0.5``."""
    start = time.perf_counter()
    ds = cb.sweep(pair, cb.Linear(), data={"test": test}, values=[0.5], repair=repair,
                  repair_data=repair_data if repair else None)
    ends = ", ".join(f"{m.upper()} {float(ds[f'loss_{m}'].values[0]):.4f} / {float(ds[f'accuracy_{m}'].values[0]):.4f}"
                     for m in "ab")
    return (float(ds["loss"].values.ravel()[0]), float(ds["accuracy"].values.ravel()[0]),
            time.perf_counter() - start, ends)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per model (4: ~6 min on 2 cores)")
    parser.add_argument("--examples", type=int, default=10_000, help="training subset size")
    parser.add_argument("--repair-examples", type=int, default=2_000, help="training examples the repairs see")
    parser.add_argument("--test-examples", type=int, default=None, help="test examples (default: all 10 000)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--recipe", choices=("adam", "paper"), default="adam", help="training recipe (see above)")
    parser.add_argument("--out", default="/tmp/measure_repair", help="checkpoint folder")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = cb.load_dataset("fashion_mnist", "train").subset(args.examples, seed=0)
    test = cb.load_dataset("fashion_mnist", "test").subset(args.test_examples)
    repair_data = train.subset(args.repair_examples, seed=1)
    recipe = (recipe_for("resnet20", epochs=args.epochs) if args.recipe == "paper" else
              TrainRecipe(epochs=args.epochs, lr=1e-3, optimizer="adam", weight_decay=0.0, batch_size=100))
    print(f"Fashion-MNIST: {len(train)} training examples, {len(test)} test, {len(repair_data)} for the repairs; "
          f"{args.epochs} epochs, width {args.width}; recipe {recipe}", flush=True)

    rows = []
    for arch in ARCHITECTURES:
        models = []
        for seed in (0, 1):
            start = time.perf_counter()
            path = out / f"{arch}_w{args.width:g}_e{args.epochs}_{args.recipe}_s{seed}.safetensors"
            models.append(cb.train(arch, train, seed=seed, epochs=args.epochs, width=args.width, recipe=recipe,
                                   checkpoint=path))
            print(f"{arch} seed {seed}: trained/loaded in {time.perf_counter() - start:.0f} s", flush=True)
        naive = cb.ModelPair(*models, backend="torch")
        start = time.perf_counter()
        aligned = naive.align("weight", seed=0)
        print(f"{arch}: weight matching in {time.perf_counter() - start:.1f} s", flush=True)
        has_bn = any(n.norm == "batchnorm" for n in aligned.table.norm_nodes())
        variants = [("naive", naive, None), ("weight-matched", aligned, None),
                    ("weight-matched + reset", aligned, "reset"), ("weight-matched + REPAIR", aligned, "repair")]
        for label, pair, repair in variants:
            if repair == "reset" and not has_bn:
                rows.append((arch, label, float("nan"), float("nan")))
                continue
            loss, acc, seconds, ends = _midpoint(pair, test, repair, repair_data)
            if label == "naive":
                print(f"{arch}: end models (test loss / accuracy) {ends}", flush=True)
            rows.append((arch, label, loss, acc))
            print(f"{arch:12s} {label:26s} loss {loss:.4f}  accuracy {acc:.4f}  ({seconds:.0f} s)", flush=True)

    print("\nmidpoint (v = 0.5) on the Fashion-MNIST test set\n")
    print("| architecture | combination | test loss | test accuracy |")
    print("|---|---|---|---|")
    for arch, label, loss, acc in rows:
        if loss != loss:  # NaN: reset does not apply to LayerNorm
            print(f"| {arch} | {label} | n/a (no BatchNorm) | n/a |")
        else:
            print(f"| {arch} | {label} | {loss:.4f} | {acc:.4f} |")


if __name__ == "__main__":
    main()
