"""The ``combinability`` command: train, align, sweep, report, plugins, demo.

Examples
--------
::

    combinability plugins
    combinability train mlp digits --seed 0 --epochs 5 --out a.ckpt
    combinability train mlp digits --seed 1 --epochs 5 --out b.ckpt
    combinability align a.ckpt b.ckpt --method weight --out b_aligned.ckpt
    combinability sweep a.ckpt b.ckpt --sampler subcube --data digits --samples 2 --out subcube.nc
    combinability report subcube.nc --out figures/
    combinability demo --out results/demo
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _parse_values(text: str | None) -> list[Any] | None:
    if text is None:
        return None
    values: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:  # a triangle point "lam_b:lam_c"
            values.append(tuple(float(x) for x in part.split(":")))
        elif part:
            values.append(float(part))
    return values


def _load(path: str, backend: str, model: str | None = None) -> Any:
    """A model from a checkpoint; with ``model="pkg.mod:Class"``, the user's class holding the file's arrays."""
    from combinability.models import load_into, load_model

    if model is None:
        return load_model(path, backend=backend)
    from combinability.architecture import load_object
    from combinability.errors import ConfigurationError, PluginError

    try:
        cls = load_object(model)
    except (ImportError, PluginError) as exc:
        raise ConfigurationError(f"--model {model!r}: {exc}; give 'package.module:Class' importable from here "
                                 "(a class whose constructor takes no arguments)") from None
    return load_into(cls(), path, backend=backend)


def _pair(args: argparse.Namespace, model_c: Any = None) -> Any:
    from combinability.pair import ModelPair

    a, b = (_load(p, args.backend, args.model) for p in (args.model_a, args.model_b))
    example = None
    if args.model is not None and not args.data:
        from combinability.errors import ConfigurationError

        raise ConfigurationError("--model needs --data (a dataset name or an .npz file): the model is traced on "
                                 "a batch of it")
    if args.model is not None:
        from combinability.data.convert import as_dataset

        example = as_dataset(args.data or "digits", "test").x[:16]
    return ModelPair(a, b, backend=args.backend, model_c=model_c, example_input=example)


# -- subcommands ---------------------------------------------------------------------------
def _cmd_plugins(args: argparse.Namespace) -> int:
    from combinability import plugins

    for label in ("backends", "architectures", "datasets", "samplers"):
        names = plugins.list_plugins(label)
        print(f"{label + ':':15}{', '.join(names) if names else '(none)'}")
    for label in ("aligners", "repairs", "metrics"):
        names = plugins.list_plugins(label)
        print(f"{label}:" if names else f"{label + ':':15}(none)")
        for name in names:
            reg = plugins.get_registration(label, name)
            needs = f" (needs: {', '.join(reg.needs)})" if reg.needs else ""
            print(f"  {name:13}{reg.description}{needs}".rstrip())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from combinability.models import train

    t0 = time.perf_counter()
    model = train(args.architecture, args.data, backend=args.backend, seed=args.seed, epochs=args.epochs,
                  width=args.width, checkpoint=args.out, progress=not args.quiet)
    print(f"trained {args.architecture} on {args.data} (seed {args.seed}) in {time.perf_counter() - t0:.1f} s "
          f"-> {args.out}")
    if args.evaluate:
        _print_eval(model, args)
    return 0


def _print_eval(model: Any, args: argparse.Namespace) -> None:
    from combinability.data import load_dataset
    from combinability.evaluation import Evaluator
    from combinability.layout import FlatLayout
    from combinability.plugins import get_backend

    be = get_backend(args.backend)
    state = {k: v for k, v in be.state(model).items() if v.dtype.kind == "f"}
    layout = FlatLayout.from_arrays(state)
    ds = load_dataset(args.data, "test")
    (ev,) = Evaluator(be, model, layout).evaluate(layout.flatten(state), ds)
    print(f"test loss {ev.loss:.4f}, test accuracy {ev.accuracy:.4f}")


def _cmd_align(args: argparse.Namespace) -> int:

    pair = _pair(args)
    t0 = time.perf_counter()
    aligned = pair.align(args.method, seed=args.seed, restarts=args.restarts, data=args.data)
    perm = aligned.permutation
    print(f"{args.method} matching in {time.perf_counter() - t0:.2f} s, {perm.iterations} sweeps, "
          f"objective {perm.objective:.6g}")
    for name, idx in perm.items():
        moved = int((idx != range(len(idx))).sum())
        print(f"  {name}: {len(idx)} units, {moved} moved")
    if args.out:
        from combinability.models import save_model

        save_model(aligned.model("b"), args.out, backend=args.backend,
                   metadata={"aligned_to": str(args.model_a), "source": str(args.model_b), "method": args.method})
        print(f"aligned model B written to {args.out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from combinability.samplers import get_sampler
    from combinability.sweeps import sweep, sweep_pairs

    sampler = get_sampler(args.sampler, **_parse_kv(args.sampler_arg))
    model_c = _load(args.model_c, args.backend, args.model) if args.model_c else None
    pair = _pair(args, model_c)
    if args.align != "none":
        pair = pair.align(args.align, seed=args.seed, data=args.data)
    kwargs = dict(data=args.data, splits=args.splits, values=_parse_values(args.values), samples=args.samples,
                  seed=args.seed, limit=args.limit, agreement=args.agreement, progress=not args.quiet,
                  batch_size=args.batch_size)
    t0 = time.perf_counter()
    if args.naive and pair.is_aligned:
        ds = sweep_pairs({"naive": pair.naive, "aligned": pair}, sampler, out=args.out, **kwargs)
    else:
        ds = sweep(pair, sampler, out=args.out, overwrite=args.overwrite, **kwargs)
    from combinability.results import barriers

    print(f"sweep finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(barriers(ds).to_dataframe().to_string())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from combinability.report import report

    written = report([Path(p) for p in args.results], Path(args.out))
    for path in written:
        print(path)
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from combinability.data import download

    folder = download(args.dataset, args.root)
    print(f"{args.dataset}: files in {folder}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from combinability.demo import run_demo

    return run_demo(out=Path(args.out), data=args.data, backend=args.backend, quick=args.quick,
                    progress=not args.quiet, epochs=args.epochs)


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``combinability`` command."""
    parser = argparse.ArgumentParser(
        prog="combinability",
        description="Mode combinability: align trained networks modulo permutations and measure element-wise "
                    "combinations of their weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", default="torch", help="framework backend (see 'combinability plugins')")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("plugins", help="list installed backends, architectures, datasets and samplers",
                       formatter_class=fmt)
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("train", help="train a reference model and write a checkpoint", formatter_class=fmt)
    p.add_argument("architecture", help="registered architecture, e.g. mlp, tiny10, resnet20, vgg16")
    p.add_argument("data", help="registered dataset, e.g. digits, fashion_mnist, mnist, cifar10")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's recipe)")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: the architecture's)")
    p.add_argument("--out", required=True, help="checkpoint file to write (reused if it matches the settings)")
    p.add_argument("--evaluate", action="store_true", help="print the test loss and accuracy afterwards")
    common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("align", help="align model B to model A (Git Re-Basin)", formatter_class=fmt)
    p.add_argument("model_a", help="checkpoint of model A (the reference)")
    p.add_argument("model_b", help="checkpoint of model B (to be permuted)")
    p.add_argument("--method", choices=["weight", "activation"], default="weight", help="alignment method")
    p.add_argument("--data", default=None, help="dataset for activation matching")
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep order")
    p.add_argument("--restarts", type=int, default=0, help="extra random restarts of weight matching")
    p.add_argument("--out", default=None, help="write the aligned model B to this checkpoint")
    p.add_argument("--model", default=None, metavar="PKG.MODULE:CLASS",
                   help="your own model class: the checkpoints are state dicts (.pt, .bin, .safetensors) of it")
    common(p)
    p.set_defaults(func=_cmd_align)

    p = sub.add_parser("sweep", help="evaluate combinations of two (or three) models over a sampler's grid",
                       formatter_class=fmt)
    p.add_argument("model_a", help="checkpoint of model A")
    p.add_argument("model_b", help="checkpoint of model B")
    p.add_argument("--model-c", default=None, help="checkpoint of model C (for --sampler triangle)")
    p.add_argument("--sampler", default="subcube",
                   help="uniform, subcube, hyperplane, bernoulli, linear, stitch, minmax, box, triangle")
    p.add_argument("--sampler-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler setting, e.g. start=-1 (repeatable)")
    p.add_argument("--values", default=None, help="comma-separated parameter values (default: the 25-value grid)")
    p.add_argument("--data", default="digits", help="registered dataset")
    p.add_argument("--splits", nargs="+", default=["train", "test"], help="splits to evaluate")
    p.add_argument("--samples", type=int, default=None, help="draws per value (default 4; 1 if deterministic)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each split")
    p.add_argument("--align", choices=["weight", "activation", "none"], default="weight",
                   help="align B to A before sweeping")
    p.add_argument("--naive", action="store_true", help="also sweep the unaligned pair (adds an alignment dim)")
    p.add_argument("--agreement", action="store_true", help="count the agreement categories of paper §6.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the coefficient draws and alignment")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--out", default="sweep.nc", help="netCDF file; an unfinished one with the same settings resumes")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds another sweep")
    p.add_argument("--model", default=None, metavar="PKG.MODULE:CLASS",
                   help="your own model class: the checkpoints are state dicts (.pt, .bin, .safetensors) of it")
    common(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="figures (PNG) and a barrier table (markdown) from results files",
                       formatter_class=fmt)
    p.add_argument("results", nargs="+", help="netCDF files written by sweep or the experiments")
    p.add_argument("--out", default="report", help="folder for the figures and summary.md")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("download", help="download a dataset's files (checked against their MD5 sums)",
                       formatter_class=fmt)
    p.add_argument("dataset", help="registered dataset, e.g. fashion_mnist, mnist, cifar10, cifar100")
    p.add_argument("--root", default=None,
                   help="folder to write to (default: $COMBINABILITY_DATA or ~/.cache/combinability)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("demo", help="the main job: train 3 models, align, run every experiment of the paper",
                       formatter_class=fmt)
    p.add_argument("--out", default="results/demo", help="folder for models, netCDF results, figures, summary")
    p.add_argument("--data", default=None,
                   help="dataset (default: fashion_mnist when its files are found, else digits)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the MLPs")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): for smoke tests")
    common(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``combinability`` command; returns the exit status."""
    from combinability.errors import CombinabilityError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CombinabilityError, FileNotFoundError, OSError) as exc:
        print(f"combinability: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are kept (run the same command again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
