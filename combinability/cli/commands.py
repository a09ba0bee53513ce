"""The subcommands of the ``combinability`` command: what each one runs, given its parsed options.

Each ``_cmd_<name>(args)`` returns an exit status; ``_resolve_<name>(args)`` fills in the options
left unset before the settings are recorded: defaults, or what the checkpoints say (the dataset
and backend a model was trained with).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from combinability.cli import checks

#: Exit statuses of the ``combinability`` command.
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
#: The reader of the output went away (``combinability plugins | head``): 128 + SIGPIPE, as a Unix tool's.
EXIT_BROKEN_PIPE = 141


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


def _architecture_config(path: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The configuration a library checkpoint was built from (a registered architecture's, such as
    ``tinyvit``), so that a model written from it loads the same way; None for a user's module."""
    from combinability.checkpoint import read_metadata

    if args.model is not None:
        return None
    config = dict(read_metadata(path).get("config") or {})
    return config if config.get("architecture") else None


def _from_checkpoints(args: argparse.Namespace, paths: Sequence[str], *, need_data: bool) -> None:
    """Fill ``args.data`` and ``args.backend`` from the first checkpoint's metadata when not given.

    Raises
    ------
    ConfigurationError
        If the data is needed but neither given nor recorded (a user's own state dict,
        ``--model``, never records it).
    """
    from combinability.errors import ConfigurationError

    checks.check_data(args.data)
    need_data = need_data and args.data is None
    if args.model is not None:
        if need_data:
            raise ConfigurationError("--model needs --data (a dataset name or an .npz file): the model's own "
                                     "state-dict files do not record the data they were trained on")
        args.backend = args.backend or _class_backend(_user_class(args.model))
        return
    if args.data is not None and args.backend is not None:
        return  # the files are checked as they are loaded, after the options
    checks.check_inputs_exist(paths)
    checks.check_library_checkpoints(paths, args.model, data_given=args.data is not None or not need_data)
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

    checks.check_inputs_exist([path])
    checks.check_library_checkpoints([path], model)
    if model is None:
        return load_model(path, backend=backend)
    return load_into(_user_class(model)(), path, backend=backend)


def _user_class(model: str) -> type:
    """The class ``--model`` names (``"pkg.mod:Class"``).

    Raises
    ------
    ConfigurationError
        If it cannot be imported.
    """
    from combinability.architecture import load_object
    from combinability.errors import ConfigurationError, PluginError

    here = os.getcwd()  # the folder the command runs in, as `python -m` and `python script.py` see it
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        return load_object(model)
    except (ImportError, PluginError) as exc:
        raise ConfigurationError(f"--model {model!r}: {exc}; give 'package.module:Class' importable from this "
                                 f"folder ({here}) or the installed packages (a class whose constructor takes no "
                                 "arguments)") from None


def _class_backend(cls: type) -> str:
    """The backend of a ``--model`` class: ``"jax"`` for a flax NNX module, else ``"torch"``."""
    nnx = sys.modules.get("flax.nnx")
    return "jax" if nnx is not None and isinstance(cls, type) and issubclass(cls, nnx.Module) else "torch"


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


#: Options that change no result (messages, tracebacks, where the options came from, the output itself) and
#: the input paths (their contents are compared instead): a rerun that differs only in them is the same run.
_NOT_RESULT = frozenset({"verbose", "quiet", "debug", "config", "overwrite", "out", "model_a", "model_b", "model_c",
                         "models"})


def _input_digests(paths: Sequence[str]) -> list[str]:
    """The SHA-256 of each input file's bytes: the inputs of a run, whatever path names them."""
    digests = []
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests.append(h.hexdigest())
    return digests


def _run_identity(metadata: dict[str, Any]) -> dict[str, Any]:
    """What makes a checkpoint's run the run it is: its options that change the result, and its inputs."""
    settings = json.loads(metadata.get("cli_settings") or "{}")
    identity = {k: v for k, v in settings.items() if k not in _NOT_RESULT}
    data = identity.get("data")
    if isinstance(data, str) and data.endswith(".npz"):
        identity["data"] = os.path.abspath(data)
    identity["inputs_sha256"] = metadata.get("inputs_sha256")
    return identity


def _difference(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """One entry of :func:`_may_replace`'s message: the option, its value in the file and now."""
    if key == "inputs_sha256":
        return "the input files' contents" if old.get(key) else "the input files (not recorded in the file)"
    return f"{key}: {old.get(key, '(absent)')!r} in the file, {new.get(key, '(absent)')!r} now"


def _may_replace(path: str, args: argparse.Namespace, inputs: list[str], what: str) -> bool:
    """Whether the checkpoint ``path`` may be replaced, decided before any work.

    True with ``--overwrite``, and when ``path`` holds this very run's checkpoint: the same inputs
    and the same options, apart from those that change no result (``-q``, ``-v``, ``--debug``,
    ``--config``) and the paths naming the inputs (``./a.ckpt`` is ``a.ckpt``).

    Raises
    ------
    OutputExistsError
        If ``path`` holds another file or another run's checkpoint; the message names every option
        that differs, whole.
    """
    from combinability.checkpoint import check_overwrite, read_metadata
    from combinability.errors import CombinabilityError, OutputExistsError

    if args.overwrite or not os.path.isfile(path):
        return args.overwrite
    try:
        info = read_metadata(path)
    except CombinabilityError:
        info = {"version": 0}
    if info["version"] == 0:
        check_overwrite(path, overwrite=False, what=what)  # refuses, saying what the file is
        return False
    old, new = _run_identity(info["metadata"]), _run_identity({**args.cli_attrs, "inputs_sha256": inputs})
    differ = [_difference(k, old, new) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if differ:
        raise OutputExistsError(f"the {what} path {path} holds another run's checkpoint (it differs in "
                                f"{'; '.join(differ)}); refusing to replace it: pass --overwrite to replace it, or "
                                "choose another path")
    return True


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


def _default_backend(args: argparse.Namespace) -> None:
    """The resolver of the commands that read no checkpoint (train, demo, asymmetry): torch unless told."""
    args.backend = args.backend or "torch"


def _file_state(path: str | None) -> tuple[int, int, int] | None:
    """``(inode, size, mtime in ns)`` of the file ``path``; None where there is none."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else None


def _cmd_train(args: argparse.Namespace) -> int:
    from combinability.models import train

    checks.check_positive(args, ["width"], number=True)
    checks.check_positive(args, ["epochs"])
    checks.check_checkpoint_out(args.out)
    _check_out(args.out, "checkpoint")
    t0 = time.perf_counter()
    before = _file_state(args.out)
    model = train(args.architecture, args.data, backend=args.backend, seed=args.seed, epochs=args.epochs,
                  width=args.width, checkpoint=args.out, progress=not args.quiet, overwrite=args.overwrite,
                  metadata=args.cli_attrs)
    if before is not None and before == _file_state(args.out):  # the same settings' model, loaded
        print(f"{args.out} already holds {args.architecture} trained on {args.data} (seed {args.seed}) with these "
              f"settings: loaded, not trained again (--overwrite trains anew)")
    else:
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
    _from_checkpoints(args, [args.model_a, args.model_b],
                      need_data=args.method in ("activation", "ste", "sinkhorn", "maps"))


def _cmd_align(args: argparse.Namespace) -> int:
    from combinability.errors import ConfigurationError

    checks.check_positive(args, ["epochs"])
    if args.restarts < 0:
        raise ConfigurationError(f"--restarts must be >= 0, got {args.restarts}")
    checks.check_checkpoint_out(args.out)
    _check_out(args.out, "aligned checkpoint")
    inputs = _input_digests([args.model_a, args.model_b])
    replace = _may_replace(args.out, args, inputs, "aligned checkpoint") if args.out else False  # no --out: report
    pair = _pair(args)
    t0 = time.perf_counter()
    learned = {"epochs": args.epochs, "state": args.state} if args.method in ("ste", "sinkhorn", "maps") else {}
    aligned = pair.align(args.method, seed=args.seed, restarts=args.restarts, data=args.data,
                         progress=not args.quiet, symmetries=args.symmetries, **learned)
    perm = aligned.permutation
    print(f"{args.method} matching in {time.perf_counter() - t0:.2f} s, {perm.iterations} sweeps, "
          f"objective {perm.objective:.6g}")
    import numpy as np

    for name, idx in perm.items():
        value = np.asarray(idx)
        if value.ndim == 2:  # a rotation or an invertible map
            away = float(np.abs(value - np.eye(len(value))).max())
            print(f"  {name}: {len(value)}x{len(value)} map, max |M - I| = {away:.3g}")
        else:
            print(f"  {name}: {len(value)} units, {int((value != np.arange(len(value))).sum())} moved")
    if args.out:
        from combinability.models import save_model

        # B's own metadata (dataset, backend, training settings) stays: the aligned model is B, permuted
        source = _metadata(args.model_b) if args.model is None else {}
        metadata = {**source, "aligned_to": str(args.model_a), "source": str(args.model_b), "method": args.method,
                    "aligned_to_fingerprint": pair.fingerprints()["theta_a"], "inputs_sha256": inputs,
                    **args.cli_attrs}
        config = _architecture_config(args.model_b, args) if aligned.table is None else None  # a tinyvit's
        save_model(aligned.model("b"), args.out, backend=args.backend, metadata=metadata, config=config,
                   overwrite=replace)
        print(f"aligned model B written to {args.out}")
    return EXIT_OK


def _resolve_merge(args: argparse.Namespace) -> None:
    _from_checkpoints(args, list(args.models), need_data=args.repair is not None)


def _cmd_merge(args: argparse.Namespace) -> int:
    from combinability.align.many import align_many
    from combinability.models import save_model

    checks.check_checkpoint_out(args.out)
    _check_out(args.out, "merged checkpoint")
    inputs = _input_digests(args.models)
    replace = _may_replace(args.out, args, inputs, "merged checkpoint")
    models = [_load(p, args.backend, args.model) for p in args.models]
    example = _example(args, models)
    t0 = time.perf_counter()
    ms = align_many(models, method=args.method, seed=args.seed, backend=args.backend, example_input=example)
    merged = ms.merge(repair=args.repair, repair_data=args.data if args.repair else None)
    print(f"{args.method}: {len(models)} models aligned and averaged in {time.perf_counter() - t0:.2f} s")
    metadata = {**(_metadata(args.models[0]) if args.model is None else {}), "merged": [str(p) for p in args.models],
                "method": args.method, "inputs_sha256": inputs, **args.cli_attrs}
    save_model(merged, args.out, backend=args.backend, metadata=metadata, overwrite=replace,
               config=_architecture_config(args.models[0], args) if ms.table is None else None)
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
    checks.check_sampler_models(sampler, args.model_c)
    checks.check_sampler_values(sampler, values)
    _check_evaluation_options(args)
    _check_out(args.out, "results file")
    with _client(args) as client:  # an unreachable scheduler fails here, before any work
        pair = _pair(args, args.model_c)
        attrs = dict(args.cli_attrs)
        if args.align != "none":
            pair = pair.align(args.align, seed=args.seed, data=args.data, progress=not args.quiet)
        else:
            attrs.update(_aligned_before(args, pair))
        kwargs = dict(data=args.data, splits=args.splits, values=values, samples=args.samples, seed=args.seed,
                      limit=args.limit, agreement=args.agreement, progress=not args.quiet,
                      batch_size=args.batch_size, out=args.out, overwrite=args.overwrite, attrs=attrs,
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


def _check_evaluation_options(args: argparse.Namespace) -> None:
    """The options of the evaluations (numbers, splits), checked before any model is loaded."""
    checks.check_positive(args, ["samples", "limit", "batch_size", "workers", "epochs", "values_per_sampler",
                                 "steps", "examples", "bins"])
    checks.check_splits(getattr(args, "splits", None) or [getattr(args, "split", None) or "test"])


def _aligned_before(args: argparse.Namespace, pair: Any) -> dict[str, str]:
    """The ``alignment`` of a pair swept as given whose B was written by ``combinability align`` against
    this very A (its checkpoint names A's fingerprint): that method, not ``naive``; else nothing (a user's
    model as well as the library's)."""
    meta = _metadata(args.model_b)
    if meta.get("aligned_to_fingerprint") != pair.fingerprints()["theta_a"] or "method" not in meta:
        return {}
    return {"alignment": str(meta["method"]), "aligned_by": f"combinability align (B's checkpoint {args.model_b})"}


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

    _check_evaluation_options(args)
    if args.experiment == "width":
        checks.check_positive_list(_floats(args.widths, "--widths"), "--widths")
    if args.experiment == "robustness":
        from combinability.experiments.robustness import check_settings

        check_settings(steps=args.steps, lambdas=_floats(args.lambdas, "--lambdas"), examples=args.examples,
                       limit=args.limit, prefix="--")
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

    _check_evaluation_options(args)
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
    for option in ("samples", "limit", "restarts", "batch_size", "learn_epochs"):
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
                                 seed=args.seed, restarts=args.restarts, alignments=args.alignments,
                                 train_data=args.data if {"activation", "learned"} & set(args.alignments) else None,
                                 learn_options={"epochs": args.learn_epochs}, splits=args.splits, limit=args.limit,
                                 batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
                                 attrs=args.cli_attrs, progress=not args.quiet, client=client)
    print(f"symmetries finished in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(ds["loss_barrier"].to_dataframe().unstack("alignment")["loss_barrier"]
          [[str(a) for a in ds["alignment"].values]].round(4).to_string())
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from combinability.report import report

    checks.check_inputs_exist(args.results, "results file or folder")
    written = report([Path(p) for p in args.results], Path(args.out), overwrite=args.overwrite)
    for path in written:
        print(path)
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    from combinability.data import download

    folder = download(args.dataset, args.root)
    print(f"{args.dataset}: files in {folder}")
    return EXIT_OK


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

    _check_evaluation_options(args)
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


def _cmd_asymmetry(args: argparse.Namespace) -> int:
    from combinability.experiments.asymmetry import asymmetry_comparison

    checks.check_positive(args, ["width"], number=True)
    _check_evaluation_options(args)
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
