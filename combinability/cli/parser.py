"""The ``combinability`` command's argument parser: global options, and each subcommand's
options, help and command function (:mod:`combinability.cli.commands`).

Importing it imports nothing heavy, so that ``combinability --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from combinability.cli.commands import (
    _cmd_align,
    _cmd_aligners,
    _cmd_analyse,
    _cmd_asymmetry,
    _cmd_demo,
    _cmd_download,
    _cmd_experiment,
    _cmd_merge,
    _cmd_plugins,
    _cmd_report,
    _cmd_sweep,
    _cmd_symmetries,
    _cmd_train,
    _default_backend,
    _resolve_align,
    _resolve_aligners,
    _resolve_analyse,
    _resolve_experiment,
    _resolve_merge,
    _resolve_sweep,
    _resolve_symmetries,
)

__all__ = ["build_parser"]


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


#: ``--backend``'s default, said in the help: of the commands that read checkpoints, and of those that read none.
_BACKEND_FROM_CKPT = "the checkpoint's, else torch"
_BACKEND_TORCH = "torch"

#: ``--out`` of the commands that write a checkpoint: what the file is, and the names it may have.
_CKPT_OUT = "; a safetensors file: the name ends in .ckpt or .safetensors (a .pt name is refused)"


def _subparser(sub: Any, name: str, help: str, *, backend: bool = True,
               backend_default: str = _BACKEND_FROM_CKPT) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", formatter_class=_FMT)
    _global_options(p, top=False)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML or YAML file of this command's options (keys: long option names); "
                        "options on the command line win")
    if backend:
        p.add_argument("--backend", default=None,
                       help=f"framework backend, see 'combinability plugins' (default: {backend_default})")
        p.add_argument("--device", default=None,
                       help="where models run: cpu, cuda, cuda:1, ... (default: the backend's: a GPU if available)")
        p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="type of the forward passes (mixed precision; parameters and logits stay float32; "
                            "default float32)")
        p.add_argument("--compile", action="store_true",
                       help="evaluate through the framework's compiler (torch.compile: seconds to a minute per "
                            "model, then faster forward passes on a GPU; jax always compiles)")
    return p


def _model_options(p: argparse.ArgumentParser, *, data_help: str) -> None:
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--model", default=None, metavar="PKG.MODULE:CLASS",
                   help="your own model class (a torch.nn.Module, or a flax NNX module: backend jax), built with "
                        "no arguments: the checkpoints are state dicts (.pt, .bin, .safetensors) of it")


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
    p = _subparser(sub, "train", "train a reference model and write a checkpoint", backend_default=_BACKEND_TORCH)
    p.add_argument("architecture", help="registered architecture, e.g. mlp, tiny10, resnet20, vgg16")
    p.add_argument("data", help="registered dataset, e.g. digits, fashion_mnist, mnist, cifar10")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's recipe)")
    p.add_argument("--width", type=float, default=None, help="width multiplier, > 0 (default: the architecture's)")
    _output_options(p, {"required": True, "help": "checkpoint file to write (reused if it matches the settings)"
                                                  + _CKPT_OUT}, "a file")
    p.add_argument("--evaluate", action="store_true", help="print the test loss and accuracy afterwards")
    p.set_defaults(func=_cmd_train, resolve=_default_backend, _parser=p)


def _add_align(sub: Any) -> None:
    p = _subparser(sub, "align", "align model B to model A (Git Re-Basin)")
    p.add_argument("model_a", help="checkpoint of model A (the reference)")
    p.add_argument("model_b", help="checkpoint of model B (to be permuted)")
    p.add_argument("--method", choices=["weight", "activation", "ste", "sinkhorn", "maps"], default="weight",
                   help="alignment method (ste, sinkhorn, maps: learned on the data's midpoint loss; maps: a "
                        "transformer's rotations and invertible maps after weight matching)")
    p.add_argument("--symmetries", choices=["all", "permutation", "invertible"], default="all",
                   help="for transformers: every kind (heads, neurons, the stream rotated), permutations only, or "
                        "also invertible maps inside heads")
    p.add_argument("--epochs", type=int, default=3, help="epochs of a learned method (ste, sinkhorn, maps)")
    p.add_argument("--state", default=None, help="state file of a learned method: an interrupted run resumes from it")
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep order")
    p.add_argument("--restarts", type=int, default=0, help="extra random restarts of weight matching")
    _output_options(p, {"default": None, "help": "write the aligned model B to this checkpoint (it keeps B's "
                                                 "metadata: dataset, backend, training settings)" + _CKPT_OUT
                                                 + "; the same command run again (-q, -v, ./a.ckpt for a.ckpt "
                                                   "alike) replaces its own file"}, "a file")
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
    _output_options(p, {"required": True, "help": "checkpoint file of the merged model" + _CKPT_OUT}, "a file")
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
    reads_checkpoints = name not in ("width", "asymmetry")  # those two train their models
    p = _subparser(sub, name, help, backend_default=_BACKEND_FROM_CKPT if reads_checkpoints else _BACKEND_TORCH)
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
    e.add_argument("--steps", type=int, default=8, help="values of k per layer (>= 1), from 2 to the layer's units")
    e.add_argument("--lambdas", default="0.25,0.5,0.75",
                   help="comma-separated points of the linear path measured, in [0, 1]")
    e.add_argument("--split", default="test", help="split evaluated")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples")
    e.add_argument("--examples", type=int, default=2000,
                   help="training examples whose activations rank the pairs (>= 2)")
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
    e.set_defaults(func=_cmd_asymmetry, resolve=_default_backend)


def _add_aligners_experiment(names: Any) -> None:
    e = _experiment_parser(names, "aligners", "compare the aligners on the same models: barriers per aligner and "
                           "scheme, merged models of 2..8 models per many-model method", "aligners.nc", models=0)
    e.add_argument("models", nargs="+", help="2 to 8 checkpoints; the first two are the pair A, B")
    e.add_argument("--methods", nargs="*", default=None,
                   help="pair aligners (registered names, and ste_elementwise: STE trained on --ste-sampler); "
                        "default identity weight activation ste ste_elementwise sinkhorn, less those the models' "
                        "symmetries rule out (named in the result's 'skipped' attribute)")
    e.add_argument("--samplers", nargs="*", default=["linear", "uniform", "subcube", "bernoulli"],
                   help="schemes whose barriers are measured")
    e.add_argument("--many-methods", nargs="*", default=None,
                   help="align_many methods (the option without names: no many-model part); default mergemany "
                        "cycle hierarchical reference, less those the models' symmetries rule out")
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
    p.add_argument("--alignments", nargs="+", default=["naive", "permutation", "all"],
                   choices=["naive", "permutation", "all", "activation", "invertible", "learned"],
                   help="alignments compared: also 'activation' (activation matching of every kind, on the data's "
                        "training split), 'invertible' (weight matching with invertible maps inside heads) "
                        "and 'learned' (the maps trained on the midpoint loss, on the data's training split)")
    p.add_argument("--learn-epochs", type=int, default=3, help="epochs of the 'learned' alignment")
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
               "141 the output's reader stopped early (| head), 143 terminated (SIGTERM).",
        formatter_class=_FMT,
    )
    parser.add_argument("--version", action="version", version=_version())
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(sub, "plugins", "list installed backends, architectures, datasets, samplers, aligners, repairs "
                                   "and metrics", backend=False)
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
    p.add_argument("--out", default="report",
                   help="folder for the figures and summary.md; a report run again replaces the files it wrote, "
                        "never other files of the folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace summary.md and figures in --out even where a report did not write them (or they "
                        "were edited since)")
    p.set_defaults(func=_cmd_report, _parser=p)

    p = _subparser(sub, "download", "download a dataset's files (checked against their MD5 sums)", backend=False)
    p.add_argument("dataset", help="registered dataset, e.g. fashion_mnist, mnist, cifar10, cifar100")
    p.add_argument("--root", default=None,
                   help="folder to write to (default: $COMBINABILITY_DATA or ~/.cache/combinability)")
    p.set_defaults(func=_cmd_download, _parser=p)

    p = _subparser(sub, "demo", "the main job: train 3 models, align, run every experiment of the paper; then "
                                "2 ViTs and their symmetry comparison", backend_default=_BACKEND_TORCH)
    p.add_argument("--out", default="results/demo", help="folder for models, netCDF results, figures, summary")
    p.add_argument("--data", default=None,
                   help="dataset (default: fashion_mnist when its files are found, else digits)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the MLPs")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): for smoke tests")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every result in --out, replacing files of other settings (e.g. of a --quick run); "
                        "checkpoints of the same training settings are still reused")
    _cluster_arguments(p)
    p.set_defaults(func=_cmd_demo, resolve=_default_backend, _parser=p)
    return parser
