"""Naive, permutation-only, permutation+orthogonal (and invertible, learned) alignment of trained transformers.

Loads the pairs trained by ``benchmarks/train_transformers.py`` (seeds 0 and 1), traces
their symmetries (``cb.ModelPair(..., example_input=x)``), and runs
``symmetry_comparison`` on the test split: barriers of the linear path and of the uniform
sampler, the weight-matching objective and time of each alignment. Prints a markdown
table; writes each result next to the models and the ViT's figure to ``--figure``. With
``--alignments ... activation invertible learned``, also activation matching of every kind (on the first
``--train-limit`` training examples), weight matching with invertible maps inside heads and
the ``"maps"`` aligner (the continuous maps trained on the midpoint loss for ``--learn-epochs`` on
the first ``--train-limit`` training examples).

    python benchmarks/measure_transformers.py results/transformers_ref --limit 2000
    python benchmarks/measure_transformers.py results/transformers_ref --only vit chargpt \
        --alignments naive permutation all invertible learned
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_transformers import build  # noqa: E402

import combinability as cb  # noqa: E402
from combinability.data import load_dataset  # noqa: E402
from combinability.data.text import load_jargon_arrays  # noqa: E402
from combinability.experiments.symmetries import symmetry_comparison  # noqa: E402

IMAGE_MODELS = ("vit", "vit_moe", "moe_mlp", "moe_mlp_dense")
MODELS = (*IMAGE_MODELS, "chargpt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="folder of <model>_seed<k>.safetensors and summary.json")
    parser.add_argument("--limit", type=int, default=2000,
                        help="test examples evaluated (images; for chargpt, limit/8 windows of 64 characters)")
    parser.add_argument("--only", nargs="+", default=list(IMAGE_MODELS), choices=MODELS)
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the ViT's comparison")
    parser.add_argument("--alignments", nargs="+", default=["naive", "permutation", "all"],
                        choices=["naive", "permutation", "all", "activation", "invertible", "learned"])
    parser.add_argument("--learn-epochs", type=int, default=2, help="epochs of the 'learned' alignment")
    parser.add_argument("--train-limit", type=int, default=10000,
                        help="training examples of the 'activation' and 'learned' alignments (chargpt: limit/8 "
                             "windows)")
    args = parser.parse_args(argv)
    summary = {(r["model"], r["seed"]): r for r in json.loads((args.models / "summary.json").read_text())}
    rows = []
    for name in args.only:
        record = summary[(name, 0)]
        if name == "chargpt":  # next-character prediction: x token ids (n, 64), y the next ids (n, 64)
            x_te, y_te, vocab = load_jargon_arrays("test")
            x, y, geometry = x_te[: args.limit // 8].astype(np.float32), y_te[: args.limit // 8], {}
            x_tr, y_tr, _ = load_jargon_arrays("train")
            train = (x_tr[: args.train_limit // 8].astype(np.float32), y_tr[: args.train_limit // 8])
        else:
            data = load_dataset(record["dataset"], "test", limit=args.limit)
            x, y, vocab = data.x, data.y, None
            train = load_dataset(record["dataset"], "train", limit=args.train_limit)
            geometry = {"image_size": x.shape[-1], "patch_size": 7 if x.shape[-1] == 28 else 2,
                        "in_features": int(np.prod(x.shape[1:]))}
        models = []
        for seed in (0, 1):
            model, _ = build(name, geometry, vocab=len(vocab) if vocab is not None else 0)
            model.load_state_dict(load_file(args.models / f"{name}_seed{seed}.safetensors"))
            models.append(model.eval())
        pair = cb.ModelPair(*models, example_input=torch.tensor(x[:16]))
        start = time.perf_counter()
        ds = symmetry_comparison(pair, {"test": (x, y)}, samplers=[cb.Linear(), cb.Uniform()],
                                 values={"linear": list(np.linspace(0, 1, 11)), "uniform": [0.5]}, samples=4,
                                 restarts=2, alignments=args.alignments,
                                 train_data=train if {"activation", "learned"} & set(args.alignments) else None,
                                 learn_options={"epochs": args.learn_epochs},
                                 out=args.models / f"symmetries_{name}.nc", overwrite=False)
        seconds = time.perf_counter() - start
        if name == "vit" and args.figure is not None:
            from combinability.plots import plot_symmetries

            plot_symmetries(ds, args.figure)
        test = ds.sel(split="test")
        for alignment in (str(a) for a in test["alignment"].values):
            t = test.sel(alignment=alignment)
            rows.append((name, alignment, float(t["loss_barrier"].sel(sampler="linear")),
                         float(t["accuracy_barrier"].sel(sampler="linear")),
                         float(t["loss_barrier"].sel(sampler="uniform")), float(t["objective"]),
                         float(t["accuracy_a"]), float(t["accuracy_b"])))
        print(f"{name}: {seconds:.0f} s (align twice + sweeps), orthogonal stream: {bool(ds['has_orthogonal'])}",
              flush=True)
    print("\n| model | alignment | loss barrier (linear) | accuracy barrier (linear) | loss barrier (uniform s=0.5) "
          "| objective | acc A | acc B |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f} | {r[6]:.3f} | {r[7]:.3f} |")


if __name__ == "__main__":
    main()
