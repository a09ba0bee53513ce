"""Train the reference transformers and MoEs on CPU (torch, AdamW) and save them with safetensors.

Models (``--models``, default all):

- ``vit``: :class:`TinyViT` (d 64, 4 heads, depth 2, MLP 128, class token, LayerNorm) on
  Fashion-MNIST (7x7 patches, 16 tokens; the first ``--train-limit`` = 20,000 training
  images, the whole test split); on scikit-learn's digits (2x2 patches) when Debian's
  ``dataset-fashion-mnist`` is not installed.
- ``vit_moe``: the same with every feed-forward block a sparse MoE of 4 experts x 32 units, top-2.
- ``moe_mlp`` / ``moe_mlp_dense``: :class:`MoEMLPNet`, one MoE hidden layer of 4 experts x 64
  ReLU units, top-1 routing / soft gating of all experts.
- ``chargpt``: :class:`CharGPT` (d 64, 4 heads, depth 2, MLP 128, context 64, untied head)
  on the Jargon File (``apt-get install jargon-text``).

Each model is trained from seeds ``--seeds`` (default 0 and 1) and saved as
``OUT/<model>_seed<k>.safetensors`` (the state dict; the constructor arguments, dataset and
test figures in the file's metadata). Test loss (mean cross-entropy, per character for
``chargpt``) and accuracy are printed and written to ``OUT/summary.json``. A model whose file
exists is kept (not trained again) unless ``--retrain``, so an interrupted run resumes.

Usage::

    .venv/bin/python benchmarks/train_transformers.py results/transformers
    .venv/bin/python benchmarks/train_transformers.py /tmp/t --models vit chargpt --seeds 0 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from combinability_torch.transformers import CharGPT, MoEMLPNet, TinyViT
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from combinability.data import load_dataset
from combinability.data.text import CONTEXT, load_jargon_arrays
from combinability.errors import DatasetNotFoundError

#: model -> (constructor, data, epochs, learning rate, weight decay, batch size)
RECIPES: dict[str, dict[str, Any]] = {
    "vit": {"cls": TinyViT, "kwargs": {}, "data": "images", "epochs": 3, "lr": 2e-3, "wd": 0.05, "batch": 128},
    "vit_moe": {"cls": TinyViT, "kwargs": {"experts": 4, "mlp": 32, "top_k": 2}, "data": "images", "epochs": 3,
                "lr": 2e-3, "wd": 0.05, "batch": 128},
    "moe_mlp": {"cls": MoEMLPNet, "kwargs": {"hidden": 64, "experts": 4, "top_k": 1}, "data": "images",
                "epochs": 6, "lr": 1e-3, "wd": 0.01, "batch": 128},
    "moe_mlp_dense": {"cls": MoEMLPNet, "kwargs": {"hidden": 64, "experts": 4, "dense": True}, "data": "images",
                      "epochs": 6, "lr": 1e-3, "wd": 0.01, "batch": 128},
    "chargpt": {"cls": CharGPT, "kwargs": {"context": CONTEXT}, "data": "text", "epochs": 1, "lr": 1e-2,
                "wd": 0.01, "batch": 32},
}


def image_data(limit: int | None) -> tuple[str, dict[str, Any], tuple[np.ndarray, ...]]:
    """Fashion-MNIST when installed, else digits: (name, geometry kwargs, (x_train, y_train, x_test, y_test)).

    Training on the first ``limit`` training images; testing on the whole test split.
    """
    try:
        name, train = "fashion_mnist", load_dataset("fashion_mnist", "train", limit=limit)
    except DatasetNotFoundError:
        name, train = "digits", load_dataset("digits", "train", limit=limit)
    test = load_dataset(name, "test")
    side = train.x.shape[-1]
    geometry = {"image_size": side, "patch_size": 7 if side == 28 else 2, "in_features": side * side}
    return name, geometry, (train.x, train.y, test.x, test.y)


def build(name: str, geometry: dict[str, Any], vocab: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model of recipe ``name`` (seeded by the caller) and its constructor arguments."""
    recipe = RECIPES[name]
    kwargs = dict(recipe["kwargs"])
    if recipe["cls"] is TinyViT:
        kwargs.update(image_size=geometry["image_size"], patch_size=geometry["patch_size"])
    elif recipe["cls"] is MoEMLPNet:
        kwargs.update(in_features=geometry["in_features"])
    else:
        kwargs.update(vocab=vocab)
    return recipe["cls"](**kwargs), kwargs


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; CharGPT's flattened logits ``(b*T, V)`` take the flattened targets."""
    return F.cross_entropy(logits, y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> tuple[float, float]:
    """Mean test loss and accuracy over every target (every character for CharGPT)."""
    model.eval()
    total, correct, count = 0.0, 0.0, 0
    for s in range(0, len(x), batch):
        xb, yb = torch.tensor(x[s : s + batch]), torch.tensor(y[s : s + batch]).reshape(-1)
        logits = model(xb)
        total += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += float((logits.argmax(-1) == yb).sum())
        count += yb.numel()
    return total / count, correct / count


def train(model: nn.Module, data: tuple[np.ndarray, ...], recipe: dict[str, Any], seed: int,
          epochs: int) -> list[float]:
    """AdamW with a cosine learning-rate decay after a 100-step linear warm-up; returns the epoch mean losses."""
    x_train, y_train = data[0], data[1]
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x_train) / recipe["batch"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).numpy()
        losses = []
        for s in range(0, len(order), recipe["batch"]):
            idx = order[s : s + recipe["batch"]]
            loss = loss_fn(model(torch.from_numpy(x_train[idx])), torch.from_numpy(y_train[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for <model>_seed<k>.safetensors and summary.json")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--train-limit", type=int, default=20000,
                        help="train the image models on the first N training images (default 20000; 0: all)")
    parser.add_argument("--lr", type=float, default=None, help="override every recipe's learning rate")
    parser.add_argument("--batch", type=int, default=None, help="override every recipe's batch size")
    parser.add_argument("--retrain", action="store_true", help="train again models whose file exists")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = image_data(args.train_limit or None) if any(RECIPES[m]["data"] == "images" for m in args.models) else None
    text = None
    if "chargpt" in args.models:
        x_tr, y_tr, vocab = load_jargon_arrays("train")
        x_te, y_te, _ = load_jargon_arrays("test")
        text = ("jargon", len(vocab), (x_tr, y_tr, x_te, y_te))
    summary = []
    for name in args.models:
        recipe = {**RECIPES[name], **{k: v for k, v in (("lr", args.lr), ("batch", args.batch)) if v}}
        dataset, geometry, data = images if recipe["data"] == "images" else (text[0], {}, text[2])
        epochs = args.epochs or recipe["epochs"]
        for seed in args.seeds:
            path = args.out / f"{name}_seed{seed}.safetensors"
            if path.exists() and not args.retrain:  # a finished model is kept (re-running resumes)
                with safe_open(str(path), "pt") as f:
                    summary.append({k: json.loads(v) for k, v in f.metadata().items()})
                print(f"{name:14s} seed {seed}  kept {path}", flush=True)
                continue
            torch.manual_seed(seed)
            model, kwargs = build(name, geometry, text[1] if text else 0)
            start = time.perf_counter()
            history = train(model, data, recipe, seed, epochs)
            seconds = time.perf_counter() - start
            loss, acc = evaluate(model, data[2], data[3])
            row = {"model": name, "seed": seed, "dataset": dataset, "epochs": epochs, "lr": recipe["lr"],
                   "batch": recipe["batch"],
                   "train_seconds": round(seconds, 1),
                   "train_loss_last_epoch": round(history[-1], 4), "test_loss": round(loss, 4),
                   "test_accuracy": round(acc, 4), "parameters": sum(p.numel() for p in model.parameters()),
                   "class": type(model).__name__, "kwargs": kwargs}
            summary.append(row)
            meta = {k: json.dumps(v) for k, v in row.items()}
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
            print(f"{name:14s} seed {seed}  {dataset:13s} {epochs} ep {seconds:6.1f} s  "
                  f"test loss {loss:.4f}  acc {acc:.4f}  ({row['parameters']} parameters)", flush=True)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
