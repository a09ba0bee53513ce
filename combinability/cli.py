"""The ``combinability`` command: train, align, sweep, experiment, symmetries, report, plugins, download, demo.

Examples
--------
::

    combinability plugins
    combinability train mlp digits --seed 0 --epochs 5 --out a.ckpt
    combinability train mlp digits --seed 1 --epochs 5 --out b.ckpt
    combinability align a.ckpt b.ckpt --method weight --out b_aligned.ckpt
    combinability sweep a.ckpt b_aligned.ckpt --align none --sampler subcube --samples 2 --out subcube.nc
    combinability experiment robustness a.ckpt b.ckpt --out robustness.nc
    combinability train tinyvit fashion_mnist --seed 0 --epochs 2 --out vit_a.ckpt
    combinability train tinyvit fashion_mnist --seed 1 --epochs 2 --out vit_b.ckpt
    combinability symmetries vit_a.ckpt vit_b.ckpt --values linear=0,0.5,1 --limit 1000 --out symmetries.nc
    combinability report subcube.nc robustness.nc --out figures/
    combinability demo --out results/demo

Conventions
-----------
Exit status 0 on success, 2 for usage errors (a bad option or value, an unknown name),
1 for runtime errors (a missing or damaged file, a failed run), 130 after Ctrl-C and 143
after SIGTERM (finished results are kept: run the same command again to resume). Errors
of the library are one line on standard error (``--debug`` adds the traceback).
Messages go through :mod:`logging` (logger ``combinability``): ``-v`` shows more,
``-q`` shows warnings and errors only and hides the progress bars, which are shown on a
terminal only. ``--config FILE`` (TOML or YAML) gives a subcommand's options; options on
the command line win. Every file written stores the resolved options (``cli_settings``,
JSON) and the command line (``cli_command``).

Importing this module imports nothing heavy: ``combinability --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

#: Exit statuses of the ``combinability`` command.
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

#: Library errors that mean "a bad command-line value": exit status 2, like argparse's own.
_USAGE_ERRORS = ("ConfigurationError", "UnknownNameError", "SamplerError")

log = logging.getLogger("combinability")


# -- values --------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    from combinability.errors import ConfigurationError

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--sampler-arg: expected KEY=VALUE (e.g. start=-1), got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _parse_values(text: str | None, option: str = "--values") -> list[Any] | None:
    from combinability.errors import ConfigurationError

    if text is None:
        return None
    values: list[Any] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:  # a triangle point "lam_b:lam_c"
                values.append(tuple(float(x) for x in part.split(":")))
            elif part:
                values.append(float(part))
    except ValueError:
        raise ConfigurationError(f"{option}: expected comma-separated numbers (or lam_b:lam_c points), "
                                 f"got {text!r}") from None
    return values


def _floats(text: str | None, option: str) -> list[float] | None:
    values = _parse_values(text, option)
    if values is not None and any(isinstance(v, tuple) for v in values):
        from combinability.errors import ConfigurationError

        raise ConfigurationError(f"{option}: expected comma-separated numbers, got {text!r}")
    return values


# -- models and their metadata ---------------------------------------------------------------
def _metadata(path: str) -> dict[str, Any]:
    """A checkpoint's user metadata (read from its header alone where the format allows)."""
    from combinability.checkpoint import read_metadata

    return dict(read_metadata(path).get("metadata") or {})


def _from_checkpoints(args: argparse.Namespace, paths: Sequence[str], *, need_data: bool) -> None:
    """Fill ``args.data`` and ``args.backend`` from the first checkpoint's metadata when not given.

    Raises
    ------
    ConfigurationError
        If the data is needed but neither given nor recorded (a user's own state dict,
        ``--model``, never records it).
    """
    from combinability.errors import ConfigurationError

    need_data = need_data and args.data is None
    if args.model is not None:
        if need_data:
            raise ConfigurationError("--model needs --data (a dataset name or an .npz file): the model's own "
                                     "state-dict files do not record the data they were trained on")
        args.backend = args.backend or "torch"
        return
    if args.data is not None and args.backend is not None:
        return
    meta = _metadata(paths[0])
    taken = []
    if need_data:
        if not meta.get("dataset"):
            from combinability.plugins import list_datasets

            raise ConfigurationError(f"{paths[0]} does not record the dataset it was trained on (it was not written "
                                     f"by 'combinability train'); give --data: one of {', '.join(list_datasets())}, "
                                     "or an .npz file")
        args.data = str(meta["dataset"])
        taken.append(f"dataset {args.data!r}")
    if args.backend is None:
        args.backend = str(meta.get("backend") or "torch")
        if meta.get("backend"):
            taken.append(f"backend {args.backend!r}")
    if taken:
        log.info("%s taken from %s", " and ".join(taken), paths[0])


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


def _example(args: argparse.Namespace, models: Sequence[Any]) -> Any:
    """A few test inputs to trace models without a layer table (``--model`` classes, transformers), else None.

    Raises
    ------
    ConfigurationError
        If the models need tracing and no data is known (``--data`` not given, none recorded).
    """
    from combinability.plugins import get_backend

    be = get_backend(args.backend)
    if all(be.table_of(m) is not None for m in models):
        return None
    data = getattr(args, "data", None)
    if data is None:
        from combinability.errors import ConfigurationError

        raise ConfigurationError(f"the models ({type(models[0]).__name__}) have no layer table: their symmetries are "
                                 "traced on a few test inputs; give --data (a dataset name or an .npz file)")
    from combinability.data.convert import as_dataset

    return as_dataset(data, "test").x[:16]


def _pair(args: argparse.Namespace, model_c: str | None = None) -> Any:
    from combinability.pair import ModelPair

    a, b = (_load(p, args.backend, args.model) for p in (args.model_a, args.model_b))
    c = _load(model_c, args.backend, args.model) if model_c else None
    example = _example(args, [a, b])
    return ModelPair(a, b, backend=args.backend, model_c=c, example_input=example)


def _check_out(path: str | None, what: str) -> None:
    """Fail before any long work when ``path`` cannot be written."""
    if path is not None:
        from combinability.files import check_writable

        check_writable(path, what=what)


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
    return EXIT_OK


def _resolve_train(args: argparse.Namespace) -> None:
    args.backend = args.backend or "torch"


def _cmd_train(args: argparse.Namespace) -> int:
    from combinability.models import train

    _check_out(args.out, "checkpoint")
    t0 = time.perf_counter()
    model = train(args.architecture, args.data, backend=args.backend, seed=args.seed, epochs=args.epochs,
                  width=args.width, checkpoint=args.out, progress=not args.quiet, overwrite=args.overwrite,
                  metadata=args.cli_attrs)
    print(f"trained {args.architecture} on {args.data} (seed {args.seed}) in {time.perf_counter() - t0:.1f} s "
          f"-> {args.out}")
    if args.evaluate:
        _print_eval(model, args)
    return EXIT_OK


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


def _resolve_align(args: argparse.Namespace) -> None:
    _from_checkpoints(args, [args.model_a, args.model_b], need_data=args.method in ("activation", "ste", "sinkhorn"))


def _cmd_align(args: argparse.Namespace) -> int:
    _check_out(args.out, "aligned checkpoint")
    pair = _pair(args)
    t0 = time.perf_counter()
    learned = {"epochs": args.epochs, "state": args.state} if args.method in ("ste", "sinkhorn") else {}
    aligned = pair.align(args.method, seed=args.seed, restarts=args.restarts, data=args.data,
                         progress=not args.quiet, **learned)
    perm = aligned.permutation
    print(f"{args.method} matching in {time.perf_counter() - t0:.2f} s, {perm.iterations} sweeps, "
          f"objective {perm.objective:.6g}")
    for name, idx in perm.items():
        moved = int((idx != range(len(idx))).sum())
        print(f"  {name}: {len(idx)} units, {moved} moved")
    if args.out:
        from combinability.models import save_model

        # B's own metadata (dataset, backend, training settings) stays: the aligned model is B, permuted
        source = _metadata(args.model_b) if args.model is None else {}
        metadata = {**source, "aligned_to": str(args.model_a), "source": str(args.model_b), "method": args.method,
                    **args.cli_attrs}
        save_model(aligned.model("b"), args.out, backend=args.backend, metadata=metadata,
              overwrite=args.overwrite)
        print(f"aligned model B written to {args.out}")
    return EXIT_OK


def _resolve_merge(args: argparse.Namespace) -> None:
    _from_checkpoints(args, list(args.models), need_data=args.repair is not None)


def _cmd_merge(args: argparse.Namespace) -> int:
    from combinability.align.many import align_many
    from combinability.models import save_model

    _check_out(args.out, "merged checkpoint")
    models = [_load(p, args.backend, args.model) for p in args.models]
    example = _example(args, models)
    t0 = time.perf_counter()
    ms = align_many(models, method=args.method, seed=args.seed, backend=args.backend, example_input=example)
    merged = ms.merge(repair=args.repair, repair_data=args.data if args.repair else None)
    print(f"{args.method}: {len(models)} models aligned and averaged in {time.perf_counter() - t0:.2f} s")
    metadata = {**(_metadata(args.models[0]) if args.model is None else {}), "merged": [str(p) for p in args.models],
                "method": args.method, **args.cli_attrs}
    save_model(merged, args.out, backend=args.backend, metadata=metadata, overwrite=args.overwrite)
    print(f"merged model written to {args.out}")
    return EXIT_OK


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """``--scheduler ADDRESS`` / ``--workers N``: a Dask client for the block (None without them)."""
    scheduler, workers = getattr(args, "scheduler", None), getattr(args, "workers", None)
    if scheduler is None and workers is None:
        yield None
        return
    from combinability.executors.dask_cluster import cluster_client

    with cluster_client(scheduler, workers) as client:
        log.info("evaluations on Dask: %s", client.scheduler.address)
        yield client


def _resolve_sweep(args: argparse.Namespace) -> None:
    _from_checkpoints(args, [args.model_a, args.model_b], need_data=True)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from combinability.samplers import get_sampler
    from combinability.sweeps import sweep, sweep_pairs

    sampler = get_sampler(args.sampler, **_parse_kv(args.sampler_arg))
    values = _parse_values(args.values)
    _check_out(args.out, "results file")
    with _client(args) as client:  # an unreachable scheduler fails here, before any work
        pair = _pair(args, args.model_c)
        if args.align != "none":
            pair = pair.align(args.align, seed=args.seed, data=args.data, progress=not args.quiet)
        kwargs = dict(data=args.data, splits=args.splits, values=values, samples=args.samples, seed=args.seed,
                      limit=args.limit, agreement=args.agreement, progress=not args.quiet,
                      batch_size=args.batch_size, out=args.out, overwrite=args.overwrite, attrs=args.cli_attrs,
                      client=client)
        t0 = time.perf_counter()
        if args.naive and pair.is_aligned:
            ds = sweep_pairs({"naive": pair.naive, "aligned": pair}, sampler, **kwargs)
        else:
            if args.naive:
                log.warning("--naive with --align none: the pair is swept as given (B is not re-aligned)")
            ds = sweep(pair, sampler, **kwargs)
    from combinability.results import barriers

    print(f"sweep finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(barriers(ds).to_dataframe().to_string())
    return EXIT_OK


def _resolve_experiment(args: argparse.Namespace) -> None:
    if args.experiment == "width":
        args.backend = args.backend or "torch"
        return
    paths = [args.model_a, args.model_b] + ([args.model_c] if getattr(args, "model_c", None) else [])
    _from_checkpoints(args, paths, need_data=args.experiment != "edge-lengths")


def _sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(data=args.data, splits=args.splits, samples=args.samples, limit=args.limit,
                batch_size=args.batch_size, progress=not args.quiet)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from combinability import experiments as ex

    _check_out(args.out, "results file")
    with _client(args) as client:
        return _experiment(args, ex, client)


def _experiment(args: argparse.Namespace, ex: Any, client: Any) -> int:
    common = dict(out=args.out, overwrite=args.overwrite, attrs=args.cli_attrs)
    t0 = time.perf_counter()
    if args.experiment == "width":
        widths = _floats(args.widths, "--widths")
        ds = ex.width_ablation(args.architecture, args.data, widths=widths, backend=args.backend,
                   seeds=tuple(args.seeds), epochs=args.epochs, method=args.method, model_dir=args.model_dir,
                   values_per_sampler=args.values_per_sampler, progress=not args.quiet, splits=args.splits,
                   samples=args.samples, limit=args.limit, batch_size=args.batch_size,
                   calibrate=args.calibrate, client=client, **common)
    else:
        pair = _pair(args, getattr(args, "model_c", None))
        pair = pair.align(args.method, seed=args.seed, data=args.data, progress=not args.quiet)
        if args.experiment == "robustness":
            ds = ex.alignment_robustness(pair, args.data, permutations=args.permutations, steps=args.steps,
                       lambdas=_floats(args.lambdas, "--lambdas"), split=args.split, limit=args.limit,
                       examples=args.examples, seed=args.seed, batch_size=args.batch_size, **common)
        elif args.experiment == "edge-lengths":
            ds = ex.edge_lengths(pair, bins=args.bins, quantile=args.quantile, **common)
        else:  # transitivity
            ds = ex.transitivity(pair, seed=args.seed, values=_floats(args.values, "--values"),
                       client=client, **_sweep_options(args), **common)
    print(f"{args.experiment} finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    if "loss_barrier" in ds:
        print(ds[["loss_barrier", "accuracy_barrier"]].to_dataframe().dropna().to_string())
    return EXIT_OK


def _resolve_aligners(args: argparse.Namespace) -> None:
    _from_checkpoints(args, list(args.models), need_data=True)


def _cmd_aligners(args: argparse.Namespace) -> int:
    from combinability.experiments.aligners import compare_aligners

    _check_out(args.out, "results file")
    models = [_load(p, args.backend, args.model) for p in args.models]
    example = _example(args, models)
    t0 = time.perf_counter()
    with _client(args) as client:
        ds = compare_aligners(models, args.data, methods=args.methods, samplers=args.samplers,
                              many_methods=args.many_methods, n_models=args.n_models, epochs=args.epochs,
                              train_examples=args.train_examples, ste_sampler=args.ste_sampler,
                              values_per_sampler=args.values_per_sampler, samples=args.samples or 4,
                              splits=args.splits, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                              backend=args.backend, example_input=example, out=args.out, overwrite=args.overwrite,
                              progress=not args.quiet, attrs=args.cli_attrs, client=client)
    print(f"aligners finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    for var in ("loss_barrier", "accuracy_barrier", "merged_accuracy", "worst_pair_loss_barrier"):
        if var in ds:
            print(f"{var}:\n{ds[var].to_dataframe().dropna().unstack(0).to_string()}")
    return EXIT_OK


def _resolve_symmetries(args: argparse.Namespace) -> None:
    _from_checkpoints(args, [args.model_a, args.model_b], need_data=True)


def _symmetry_samplers(names: Sequence[str], items: Sequence[str]) -> tuple[list[Any], dict[str, list[float]]]:
    """``--samplers`` and ``--values`` as samplers and values per sampler, each value checked against its range.

    ``items`` are ``"V1,V2,..."`` (every sampler not named otherwise) or ``"NAME=V1,V2,..."``.

    Raises
    ------
    ConfigurationError, UnknownNameError, SamplerError
        For an unknown or repeated sampler, one of three models, a malformed list, a sampler named in
        ``--values`` but not compared, or a value outside a sampler's range.
    """
    from combinability.errors import ConfigurationError
    from combinability.samplers import get_sampler

    if len(set(names)) != len(names):
        raise ConfigurationError(f"--samplers: each sampler may appear once, got {' '.join(names)}")
    samplers = [get_sampler(name) for name in names]
    for name, smp in zip(names, samplers, strict=True):
        if not isinstance(smp.parameter, str):
            raise ConfigurationError(f"--samplers: {name!r} combines three models; symmetries compares two: use "
                                     "linear, uniform, subcube, bernoulli, hyperplane, stitch, minmax or box")
    compared = [smp.name for smp in samplers]
    common: list[float] | None = None
    named: dict[str, list[float]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        values = _floats(text if sep else item, f"--values {item!r}")
        if not values:
            raise ConfigurationError(f"--values {item!r}: no values; expected [SAMPLER=]V1,V2,... "
                                     "(e.g. linear=0,0.5,1 or 0.25,0.5)")
        if not sep:
            common = values
            continue
        key = name.strip().lower()
        if key not in compared:
            raise ConfigurationError(f"--values {item!r}: sampler {name.strip()!r} is not compared; compared "
                                     f"(--samplers): {', '.join(compared)}")
        named[key] = values
    grids = {smp.name: named.get(smp.name, common) for smp in samplers}
    for smp in samplers:
        for v in grids[smp.name] or ():
            smp.validate(v)
    return samplers, {k: v for k, v in grids.items() if v is not None}


def _cmd_symmetries(args: argparse.Namespace) -> int:
    from combinability.experiments.symmetries import symmetry_comparison

    samplers, values = _symmetry_samplers(args.samplers, args.values)
    for option in ("samples", "limit", "restarts", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < (0 if option == "restarts" else 1):
            from combinability.errors import ConfigurationError

            flag = "--" + option.replace("_", "-")
            raise ConfigurationError(f"{flag} must be {'>= 0' if option == 'restarts' else 'a positive integer'}, "
                                     f"got {value}")
    _check_out(args.out, "results file")
    with _client(args) as client:  # an unreachable scheduler fails here, before any work
        pair = _pair(args)
        t0 = time.perf_counter()
        ds = symmetry_comparison(pair, args.data, samplers=samplers, values=values, samples=args.samples,
                                 seed=args.seed, restarts=args.restarts, splits=args.splits, limit=args.limit,
                                 batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
                                 attrs=args.cli_attrs, progress=not args.quiet, client=client)
    print(f"symmetries finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(ds["loss_barrier"].to_dataframe().unstack("alignment")["loss_barrier"]
          [[a for a in ("naive", "permutation", "all") if a in ds["alignment"].values]].round(4).to_string())
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from combinability.report import report

    written = report([Path(p) for p in args.results], Path(args.out))
    for path in written:
        print(path)
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    from combinability.data import download

    folder = download(args.dataset, args.root)
    print(f"{args.dataset}: files in {folder}")
    return EXIT_OK


def _resolve_demo(args: argparse.Namespace) -> None:
    args.backend = args.backend or "torch"


def _cmd_demo(args: argparse.Namespace) -> int:
    from combinability.demo import run_demo

    with _client(args) as client:
        return run_demo(out=Path(args.out), data=args.data, backend=args.backend, quick=args.quick,
                        progress=not args.quiet, epochs=args.epochs, attrs=args.cli_attrs, overwrite=args.overwrite,
                        client=client)


def _resolve_analyse(args: argparse.Namespace) -> None:
    _from_checkpoints(args, [args.model_a, args.model_b], need_data=True)


def _cmd_analyse(args: argparse.Namespace) -> int:
    from combinability import analysis

    _check_out(args.out, "results file")
    pair = _pair(args)
    if args.align != "none":
        pair = pair.align(args.align, seed=args.seed, data=args.data, progress=not args.quiet)
    common = dict(limit=args.limit, batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
                  attrs=args.cli_attrs)
    values = _floats(args.values, "--values")
    t0 = time.perf_counter()
    if args.analysis == "llfc":
        import xarray as xr

        from combinability.samplers import get_sampler

        ds = analysis.llfc(pair, args.data, values=values, sampler=get_sampler(args.sampler), samples=args.samples,
                           points=args.points, split=args.split, seed=args.seed, **common)
        # one line per feature point: the worst over the path (the whole curve is in the file)
        worst = ds[["cosine", "scale"]].mean("sample")
        table = xr.Dataset({"min_cosine": worst["cosine"].min("value"), "min_scale": worst["scale"].min("value"),
                            "baseline_cosine": ds["baseline_cosine"]}).to_dataframe()
    elif args.analysis == "layerwise":
        ds = analysis.layerwise_barriers(pair, args.data, lambdas=values, layers=args.layers,
                                         curvature=not args.no_curvature, split=args.split, **common)
        table = ds[["loss_barrier", "predicted_barrier"]].to_dataframe()[["loss_barrier", "predicted_barrier"]]
    elif args.analysis == "calibration":
        ds = analysis.calibrate(pair, args.data, lambdas=values, split=args.split, **common)
        table = ds[["loss_barrier", "loss_barrier_calibrated"]].to_dataframe()
    else:  # lewc
        ds = analysis.lewc(pair, args.data, lambdas=values, points=args.points, split=args.split, **common)
        table = ds[["a", "b", "r2", "a_predicted", "b_predicted", "r2_predicted"]].to_dataframe()
    print(f"{args.analysis} finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(table.round(4).to_string())
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it is None/False or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if hidden or "default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


_FMT = _HelpFormatter


def _version() -> str:
    from combinability import __version__

    return f"combinability {__version__}"


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v``, ``-q``, ``--debug``: before the subcommand or after it (then ``default=SUPPRESS``)."""
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=default(0),
                   help="more messages (-vv: debugging details)")
    p.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="warnings and errors only; no progress bars")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="show the traceback of an error")


def _subparser(sub: Any, name: str, help: str, *, backend: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", formatter_class=_FMT)
    _global_options(p, top=False)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML or YAML file of this command's options (keys: long option names); "
                        "options on the command line win")
    if backend:
        p.add_argument("--backend", default=None,
                       help="framework backend, see 'combinability plugins' (default: the checkpoint's, else torch)")
        p.add_argument("--device", default=None,
                       help="where models run: cpu, cuda, cuda:1, ... (default: the backend's: a GPU if available)")
        p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="type of the forward passes (mixed precision; parameters and logits stay float32; "
                            "default float32)")
    return p


def _model_options(p: argparse.ArgumentParser, *, data_help: str) -> None:
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--model", default=None, metavar="PKG.MODULE:CLASS",
                   help="your own model class: the checkpoints are state dicts (.pt, .bin, .safetensors) of it")


def _output_options(p: argparse.ArgumentParser, out: dict[str, Any], what: str) -> None:
    p.add_argument("--out", **out)
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out even if it holds {what} this run did not write")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--splits", nargs="+", default=["train", "test"], help="splits to evaluate")
    p.add_argument("--samples", type=int, default=None, help="draws per value (default 4; 1 if deterministic)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each split")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    _cluster_arguments(p)


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the evaluations on the Dask cluster of this scheduler (tcp://host:8786; needs "
                        "combinability[dask], see docs/clusters.md)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run the evaluations on a local Dask cluster of N worker processes")


_DATA_FROM_CKPT = "registered dataset or .npz file (default: the one recorded in model A's checkpoint)"


def _add_train(sub: Any) -> None:
    p = _subparser(sub, "train", "train a reference model and write a checkpoint")
    p.add_argument("architecture", help="registered architecture, e.g. mlp, tiny10, resnet20, vgg16")
    p.add_argument("data", help="registered dataset, e.g. digits, fashion_mnist, mnist, cifar10")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's recipe)")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: the architecture's)")
    _output_options(p, {"required": True, "help": "checkpoint file to write (reused if it matches the settings)"},
                    "a file")
    p.add_argument("--evaluate", action="store_true", help="print the test loss and accuracy afterwards")
    p.set_defaults(func=_cmd_train, resolve=_resolve_train, _parser=p)


def _add_align(sub: Any) -> None:
    p = _subparser(sub, "align", "align model B to model A (Git Re-Basin)")
    p.add_argument("model_a", help="checkpoint of model A (the reference)")
    p.add_argument("model_b", help="checkpoint of model B (to be permuted)")
    p.add_argument("--method", choices=["weight", "activation", "ste", "sinkhorn"], default="weight",
                   help="alignment method (ste, sinkhorn: learned on the data's midpoint loss)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of a learned method (ste, sinkhorn)")
    p.add_argument("--state", default=None, help="state file of a learned method: an interrupted run resumes from it")
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep order")
    p.add_argument("--restarts", type=int, default=0, help="extra random restarts of weight matching")
    _output_options(p, {"default": None, "help": "write the aligned model B to this checkpoint (it keeps B's "
                                                 "metadata: dataset, backend, training settings)"}, "a file")
    _model_options(p, data_help="dataset for activation matching (default: the one recorded in model A's "
                                "checkpoint)")
    p.set_defaults(func=_cmd_align, resolve=_resolve_align, _parser=p)


def _add_merge(sub: Any) -> None:
    p = _subparser(sub, "merge", "align two or more models into one basin and average them")
    p.add_argument("models", nargs="+", help="checkpoints (the first is the reference)")
    p.add_argument("--method", choices=["mergemany", "cycle", "hierarchical", "reference"], default="mergemany",
                   help="many-model alignment method")
    p.add_argument("--seed", type=int, default=0, help="seed of the matching")
    p.add_argument("--repair", choices=["reset", "repair"], default=None,
                   help="recompute BatchNorm statistics (reset) or REPAIR the average on --data")
    _output_options(p, {"required": True, "help": "checkpoint file of the merged model"}, "a file")
    _model_options(p, data_help="dataset for --repair (default: the one recorded in the first checkpoint)")
    p.set_defaults(func=_cmd_merge, resolve=_resolve_merge, _parser=p)


def _add_sweep(sub: Any) -> None:
    p = _subparser(sub, "sweep", "evaluate combinations of two (or three) models over a sampler's grid")
    p.add_argument("model_a", help="checkpoint of model A")
    p.add_argument("model_b", help="checkpoint of model B")
    p.add_argument("--model-c", default=None, help="checkpoint of model C (for --sampler triangle)")
    p.add_argument("--sampler", default="subcube",
                   help="uniform, subcube, hyperplane, bernoulli, linear, stitch, minmax, box, triangle")
    p.add_argument("--sampler-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler setting, e.g. start=-1 (repeatable)")
    p.add_argument("--values", default=None, help="comma-separated parameter values (default: the 25-value grid)")
    _sweep_arguments(p)
    p.add_argument("--align", choices=["weight", "activation", "none"], default="weight",
                   help="align B to A before sweeping ('none' for a B already aligned by 'combinability align')")
    p.add_argument("--naive", action="store_true", help="also sweep the unaligned pair (adds an alignment dim)")
    p.add_argument("--agreement", action="store_true", help="count the agreement categories of paper §6.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the coefficient draws and alignment")
    _output_options(p, {"default": "sweep.nc", "help": "netCDF file; an unfinished one with the same settings "
                                                       "resumes"}, "another sweep")
    _model_options(p, data_help=_DATA_FROM_CKPT)
    p.set_defaults(func=_cmd_sweep, resolve=_resolve_sweep, _parser=p)


def _experiment_parser(sub: Any, name: str, help: str, out: str, *, models: int) -> argparse.ArgumentParser:
    p = _subparser(sub, name, help)
    if models:
        p.add_argument("model_a", help="checkpoint of model A (the reference)")
        p.add_argument("model_b", help="checkpoint of model B")
        if models == 3:
            p.add_argument("model_c", help="checkpoint of model C")
        p.add_argument("--method", choices=["weight", "activation"], default="weight",
                       help="how B (and C) are aligned to A")
        p.add_argument("--seed", type=int, default=0, help="seed of the alignment and of the random draws")
        _model_options(p, data_help=_DATA_FROM_CKPT)
    _output_options(p, {"default": out, "help": "netCDF file ('combinability report' draws it)"}, "another result")
    p.set_defaults(func=_cmd_experiment, resolve=_resolve_experiment, experiment=name, _parser=p)
    return p


def _add_experiment(sub: Any) -> None:
    p = sub.add_parser("experiment", help="the paper's experiments that are not a single sweep (§4.4, §5.3, §6.2, "
                                          "§6.3)",
                       description="The paper's experiments that are not one sweep: width ablation (§4.4), "
                                   "transitivity (§5.3), edge lengths (§6.2), alignment robustness (§6.3). The "
                                   "others are sweeps: 'combinability sweep --naive' with the sampler of the "
                                   "experiment (uniform, subcube, hyperplane, bernoulli: §4.2; stitch: §4.3; "
                                   "minmax: §4.5.1; linear with start=-1 stop=2: §5.1; box: §5.2; triangle with "
                                   "--model-c: §5.4; --agreement: §6.1).", formatter_class=_FMT)
    _global_options(p, top=False)
    names = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    e = _experiment_parser(names, "width", "§4.4 width ablation: train pairs at several widths, sweep each scheme",
                           "width_ablation.nc", models=0)
    e.add_argument("architecture", help="registered architecture, e.g. mlp")
    e.add_argument("data", help="registered dataset, e.g. digits, fashion_mnist")
    e.add_argument("--widths", default="0.25,0.5,1,2", help="comma-separated width multipliers")
    e.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("SEED_A", "SEED_B"),
                   help="training seeds of models A and B")
    e.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's recipe)")
    e.add_argument("--method", choices=["weight", "activation"], default="weight", help="alignment method")
    e.add_argument("--model-dir", default=None, help="folder where the trained models are kept and reused")
    e.add_argument("--values-per-sampler", type=int, default=9, help="values of each scheme's grid swept")
    e.add_argument("--calibrate", action="store_true",
                   help="also the linear path's loss barriers with a fitted softmax temperature")
    _sweep_arguments(e)

    e = _experiment_parser(names, "transitivity", "§5.3 transitivity: B and C both aligned to A, then "
                           "interpolated", "transitivity.nc", models=3)
    e.add_argument("--values", default=None, help="comma-separated values of lam (default: the 25-value grid)")
    _sweep_arguments(e)

    e = _experiment_parser(names, "edge-lengths", "§6.2 edge lengths |θ_A − π(θ_B)|, naive and aligned",
                           "edge_lengths.nc", models=2)
    e.add_argument("--bins", type=int, default=80, help="histogram bins")
    e.add_argument("--quantile", type=float, default=0.999, help="quantile of the aligned lengths at the last bin")

    e = _experiment_parser(names, "robustness", "§6.3 alignment robustness: re-match the k weakest unit pairs",
                           "robustness.nc", models=2)
    e.add_argument("--permutations", nargs="+", default=None, help="permutations (layers) to perturb (default: all)")
    e.add_argument("--steps", type=int, default=8, help="values of k per layer, from 2 to the layer's units")
    e.add_argument("--lambdas", default="0.25,0.5,0.75", help="comma-separated points of the linear path measured")
    e.add_argument("--split", default="test", help="split evaluated")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples")
    e.add_argument("--examples", type=int, default=2000, help="training examples whose activations rank the pairs")
    e.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    _add_aligners_experiment(names)
    _add_asymmetry_experiment(names)


def _add_asymmetry_experiment(names: Any) -> None:
    e = _experiment_parser(names, "asymmetry", "standard vs asymmetric networks (Lim et al. 2024): train two of "
                           "each, naive and aligned linear-path barriers", "asymmetry.nc", models=0)
    e.add_argument("data", help="registered dataset, e.g. digits, fashion_mnist")
    e.add_argument("--architectures", nargs="+", default=["mlp", "mlp_wasym", "mlp_sigmaasym"],
                   help="architectures of one size: a standard one and its asymmetric variants")
    e.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("SEED_A", "SEED_B"),
                   help="training seeds of models A and B")
    e.add_argument("--width", type=float, default=None, help="width multiplier (default: the architectures')")
    e.add_argument("--epochs", type=int, default=None, help="training epochs (default: the standard recipe)")
    e.add_argument("--method", choices=["weight", "activation"], default="weight", help="alignment method")
    e.add_argument("--model-dir", default=None, help="folder where the trained models are kept and reused")
    e.add_argument("--values", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="comma-separated points of the linear path (B's weight)")
    _sweep_arguments(e)
    e.set_defaults(func=_cmd_asymmetry, resolve=_resolve_asymmetry)


def _resolve_asymmetry(args: argparse.Namespace) -> None:
    args.backend = args.backend or "torch"


def _cmd_asymmetry(args: argparse.Namespace) -> int:
    from combinability.experiments.asymmetry import asymmetry_comparison

    _check_out(args.out, "results file")
    t0 = time.perf_counter()
    with _client(args) as client:
        ds = asymmetry_comparison(args.data, architectures=args.architectures, seeds=tuple(args.seeds),
                                  width=args.width, epochs=args.epochs, backend=args.backend, method=args.method,
                                  model_dir=args.model_dir, values=_floats(args.values, "--values"),
                                  splits=args.splits, samples=args.samples, limit=args.limit,
                                  batch_size=args.batch_size, progress=not args.quiet, out=args.out,
                                  overwrite=args.overwrite, attrs=args.cli_attrs, client=client)
    print(f"asymmetry finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(ds[["loss_barrier", "accuracy_barrier"]].to_dataframe().dropna().unstack("alignment").to_string())
    return EXIT_OK


def _add_aligners_experiment(names: Any) -> None:
    e = _experiment_parser(names, "aligners", "compare the aligners on the same models: barriers per aligner and "
                           "scheme, merged models of 2..8 models per many-model method", "aligners.nc", models=0)
    e.add_argument("models", nargs="+", help="2 to 8 checkpoints; the first two are the pair A, B")
    e.add_argument("--methods", nargs="*",
                   default=["identity", "weight", "activation", "ste", "ste_elementwise", "sinkhorn"],
                   help="pair aligners (registered names, and ste_elementwise: STE trained on --ste-sampler)")
    e.add_argument("--samplers", nargs="*", default=["linear", "uniform", "subcube", "bernoulli"],
                   help="schemes whose barriers are measured")
    e.add_argument("--many-methods", nargs="*", default=["mergemany", "cycle", "hierarchical", "reference"],
                   help="align_many methods (none given: no many-model part)")
    e.add_argument("--n-models", type=int, nargs="+", default=None,
                   help="numbers of models merged, each the first N (default: 2 .. all given)")
    e.add_argument("--epochs", type=int, default=1, help="epochs of the learned aligners (ste, sinkhorn)")
    e.add_argument("--train-examples", type=int, default=None,
                   help="training examples the data-driven aligners see (default: the whole training split)")
    e.add_argument("--ste-sampler", default="uniform", help="the element-wise sampler ste_elementwise trains on")
    e.add_argument("--values-per-sampler", type=int, default=5, help="values of each scheme's grid swept")
    e.add_argument("--seed", type=int, default=0, help="seed of the aligners and of the random draws")
    _model_options(e, data_help=_DATA_FROM_CKPT)
    _sweep_arguments(e)
    e.set_defaults(func=_cmd_aligners, resolve=_resolve_aligners, splits=["test"])


def _add_analyse(sub: Any) -> None:
    p = _subparser(sub, "analyse", "inside the barrier: LLFC, layer-wise barriers, temperature calibration, LEWC")
    p.add_argument("analysis", choices=["llfc", "layerwise", "calibration", "lewc"],
                   help="llfc: layer-wise linear feature connectivity; layerwise: single-layer and cumulative "
                        "barriers with their curvature prediction; calibration: barriers with a fitted softmax "
                        "temperature (naive and aligned); lewc: per-layer least-squares f = a f_A + b f_B")
    p.add_argument("model_a", help="checkpoint of model A")
    p.add_argument("model_b", help="checkpoint of model B")
    p.add_argument("--align", choices=["weight", "activation", "none"], default="weight",
                   help="align B to A first ('none' for a B already aligned, or to analyse the naive pair)")
    p.add_argument("--values", default=None, help="comma-separated values of λ (llfc: of the sampler's parameter)")
    p.add_argument("--sampler", default="linear", help="llfc: the coefficient distribution (any two-model sampler)")
    p.add_argument("--samples", type=int, default=None, help="llfc: draws per value (default 4; 1 if deterministic)")
    p.add_argument("--points", nargs="+", default=None, help="llfc, lewc: feature points (default: all)")
    p.add_argument("--layers", nargs="+", default=None, help="layerwise: layers (default: all)")
    p.add_argument("--no-curvature", action="store_true", help="layerwise: skip the second-order prediction")
    p.add_argument("--split", default="test", help="split evaluated")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the alignment and of the coefficient draws")
    _output_options(p, {"default": "analysis.nc", "help": "netCDF file ('combinability report' draws it)"},
                    "another result")
    _model_options(p, data_help=_DATA_FROM_CKPT)
    p.set_defaults(func=_cmd_analyse, resolve=_resolve_analyse, _parser=p)


def _add_symmetries(sub: Any) -> None:
    p = _subparser(sub, "symmetries", "which symmetries alignment needs: barriers of two models naive, aligned with "
                                      "permutations only, and with every symmetry kind (transformers: the residual "
                                      "stream rotated)")
    p.add_argument("model_a", help="checkpoint of model A (the reference), e.g. of 'combinability train tinyvit'")
    p.add_argument("model_b", help="checkpoint of model B")
    p.add_argument("--samplers", nargs="+", default=["linear", "uniform", "subcube", "bernoulli"],
                   help="two-model samplers whose barriers are compared")
    p.add_argument("--values", action="append", default=[], metavar="[SAMPLER=]V1,V2,...",
                   help="parameter values: 'linear=0,0.25,0.5,0.75,1' for one sampler, '0.25,0.5' for every sampler "
                        "not named (repeatable; default: each sampler's grid)")
    p.add_argument("--splits", nargs="+", default=["test"], help="splits to evaluate")
    p.add_argument("--samples", type=int, default=2, help="draws per value of the random samplers (linear: 1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each split")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--restarts", type=int, default=2, help="extra random restarts of weight matching")
    p.add_argument("--seed", type=int, default=0, help="seed of the matching and of the random draws")
    _cluster_arguments(p)
    _output_options(p, {"default": "symmetries.nc", "help": "netCDF file ('combinability report' draws it); a "
                                                            "finished one of the same settings is reused"},
                    "another result")
    _model_options(p, data_help=_DATA_FROM_CKPT + "; its first test inputs trace the models")
    p.set_defaults(func=_cmd_symmetries, resolve=_resolve_symmetries, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``combinability`` command."""
    parser = argparse.ArgumentParser(
        prog="combinability",
        description="Mode combinability: align trained networks modulo permutations and measure element-wise "
                    "combinations of their weights.",
        epilog="Exit status: 0 success, 1 runtime error, 2 usage error, 130 interrupted (Ctrl-C), "
               "143 terminated (SIGTERM).",
        formatter_class=_FMT,
    )
    parser.add_argument("--version", action="version", version=_version())
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(sub, "plugins", "list installed backends, architectures, datasets and samplers", backend=False)
    p.set_defaults(func=_cmd_plugins, _parser=p)
    _add_train(sub)
    _add_align(sub)
    _add_merge(sub)
    _add_sweep(sub)
    _add_experiment(sub)
    _add_analyse(sub)
    _add_symmetries(sub)

    p = _subparser(sub, "report", "figures (PNG) and a barrier table (markdown) from results files", backend=False)
    p.add_argument("results", nargs="+", help="netCDF files written by sweep, experiment or demo")
    p.add_argument("--out", default="report", help="folder for the figures and summary.md")
    p.set_defaults(func=_cmd_report, _parser=p)

    p = _subparser(sub, "download", "download a dataset's files (checked against their MD5 sums)", backend=False)
    p.add_argument("dataset", help="registered dataset, e.g. fashion_mnist, mnist, cifar10, cifar100")
    p.add_argument("--root", default=None,
                   help="folder to write to (default: $COMBINABILITY_DATA or ~/.cache/combinability)")
    p.set_defaults(func=_cmd_download, _parser=p)

    p = _subparser(sub, "demo", "the main job: train 3 models, align, run every experiment of the paper; then "
                                "2 ViTs and their symmetry comparison")
    p.add_argument("--out", default="results/demo", help="folder for models, netCDF results, figures, summary")
    p.add_argument("--data", default=None,
                   help="dataset (default: fashion_mnist when its files are found, else digits)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the MLPs")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): for smoke tests")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every result in --out, replacing files of other settings (e.g. of a --quick run); "
                        "checkpoints of the same training settings are still reused")
    _cluster_arguments(p)
    p.set_defaults(func=_cmd_demo, resolve=_resolve_demo, _parser=p)
    return parser


# -- running ---------------------------------------------------------------------------------
def _config_path(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (the last one), or None."""
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    return path


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub-)subcommand's parser that ``argv`` selects; ``parser`` itself if none is named."""
    tokens = iter(argv)
    current = parser
    while True:
        choices = next((a.choices for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices:
            return current
        # before a subcommand's name come only flags that take no value (-v, -q, --debug)
        name = next((t for t in tokens if not t.startswith("-")), None)
        if name not in choices:
            return current
        current = choices[name]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, with the options of a ``--config FILE`` added (options typed in ``argv`` win)."""
    path = _config_path(argv)
    if path is not None:
        from combinability.config import config_arguments, load_config

        config = load_config(path)
        argv = argv + config_arguments(_command_parser(parser, argv), config, argv, where=f"--config {path}")
    return parser.parse_args(argv)


#: Namespace entries that are machinery, not settings.
_NOT_SETTINGS = ("func", "resolve", "_parser", "cli_attrs")


def _settings(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, str]:
    """The attributes every written file gets: the resolved options (JSON) and the command line."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
    return {"cli_settings": json.dumps(settings, sort_keys=True, default=str),
            "cli_command": shlex.join(["combinability", *argv])}


@contextmanager
def _logging(verbose: int, quiet: bool) -> Iterator[None]:
    """Messages of the ``combinability`` logger on standard error for the block."""
    logger = logging.getLogger("combinability")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("combinability: %(message)s"))
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@contextmanager
def _device(args: argparse.Namespace) -> Iterator[None]:
    """``--device`` / ``--compute-dtype``: the backend so set for the block (checked before any work)."""
    device, name = getattr(args, "device", None), getattr(args, "backend", None)
    dtype = getattr(args, "compute_dtype", None)
    if (device is None and dtype is None) or name is None:
        yield
        return
    from combinability import plugins

    previous = plugins.get_backend(name)
    moved = plugins.use_device(name, device)
    if dtype is not None:
        plugins.set_backend(name, moved.with_compute_dtype(dtype))
    try:
        yield
    finally:
        plugins.set_backend(name, previous)


def _is_usage_error(exc: BaseException) -> bool:
    from combinability import errors

    return isinstance(exc, tuple(getattr(errors, name) for name in _USAGE_ERRORS))


def _report_error(exc: BaseException, debug: bool) -> int:
    import traceback

    if debug:
        traceback.print_exception(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"combinability: error: {message}", file=sys.stderr)
    return EXIT_USAGE if _is_usage_error(exc) else EXIT_RUNTIME


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from combinability.errors import CombinabilityError
    from combinability.files import Terminated, stop_on_sigterm

    try:
        with stop_on_sigterm():
            if getattr(args, "resolve", None) is not None:
                args.resolve(args)
            args.cli_attrs = _settings(args, argv)
            log.debug("settings: %s", args.cli_attrs["cli_settings"])
            with _device(args):
                return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"combinability: {what}; finished results are kept (run the same command again to resume)",
              file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except (CombinabilityError, OSError) as exc:
        return _report_error(exc, args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``combinability`` command; returns the exit status.

    0 success; 2 usage error (argparse's, and the library's ``ConfigurationError``,
    ``UnknownNameError`` and ``SamplerError``); 1 any other error of the library or of the
    operating system; 130 Ctrl-C; 143 SIGTERM.
    """
    from combinability.errors import CombinabilityError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as exc:  # --help, --version (0) and argparse's usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except CombinabilityError as exc:  # a --config file that does not fit
        return _report_error(exc, "--debug" in argv)
    with _logging(args.verbose, args.quiet):
        return _run(args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
