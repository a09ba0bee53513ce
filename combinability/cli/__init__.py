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
Exit status 0 on success, 2 for usage errors (a bad option or value, an unknown name, an
input path that does not exist), 1 for runtime errors (a damaged file, a failed run), 130
after Ctrl-C, 141 when the reader of the output stops early (``| head``) and 143 after SIGTERM
(a sweep's or experiment's finished results are kept: run the same command again to resume; train, align,
merge and report write their output at the end, and start again). Values are checked before
any model is loaded, aligned or trained. Errors of the library are one line on standard error
(``--debug`` adds the traceback). Messages go through :mod:`logging` (logger ``combinability``):
``-v`` shows more (also a line per weight-matching sweep where no progress bar is shown),
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
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from combinability.cli.checks import plain_message
from combinability.cli.commands import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_TERMINATED,
    EXIT_USAGE,
    log,
)
from combinability.cli.parser import build_parser

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "EXIT_BROKEN_PIPE"]


#: Library errors that mean "a bad command-line value": exit status 2, like argparse's own.
_USAGE_ERRORS = ("ConfigurationError", "UnknownNameError", "SamplerError")


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

        command = _command_parser(parser, argv)
        config = _joined_lists(command, load_config(path))
        argv = argv + config_arguments(command, config, argv, where=f"--config {path}")
    return parser.parse_args(argv)


#: Options that take one comma-separated list (``--values 0,0.5,1``): a config file may give a list instead.
_COMMA_LISTS = frozenset({"values", "lambdas", "widths"})


def _joined_lists(parser: argparse.ArgumentParser, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a list given to a comma-separated option joined: ``values = [0, 0.5, 1]`` is
    ``values = "0,0.5,1"`` (a triangle point ``[0.2, 0.3]`` in the list is ``0.2:0.3``)."""
    from combinability.config import option_names

    actions = option_names(parser)
    out = dict(config)
    for key, value in config.items():
        action = actions.get(str(key).lstrip("-").replace("_", "-"))
        if (action is None or action.dest not in _COMMA_LISTS or action.nargs is not None
                or isinstance(action, argparse._AppendAction) or not isinstance(value, list)):
            continue
        if all(_is_number(v) or (isinstance(v, list) and v and all(map(_is_number, v))) for v in value):
            out[key] = ",".join(":".join(map(str, v)) if isinstance(v, list) else str(v) for v in value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
    # a line per weight-matching sweep (where no progress bar is drawn) is -v's detail; its warnings stay
    matching = logging.getLogger("combinability.matching")
    previous, previous_matching = logger.level, matching.level
    logger.addHandler(handler)
    logger.setLevel(level)
    if not verbose:
        matching.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        matching.setLevel(previous_matching)


@contextmanager
def _device(args: argparse.Namespace) -> Iterator[None]:
    """``--device``, ``--compute-dtype``, ``--compile``: the backend so set for the block (checked first)."""
    device, name = getattr(args, "device", None), getattr(args, "backend", None)
    dtype, compiled = getattr(args, "compute_dtype", None), getattr(args, "compile", False)
    if (device is None and dtype is None and not compiled) or name is None:
        yield
        return
    from combinability import plugins

    previous = plugins.get_backend(name)
    moved = plugins.use_device(name, device)
    if dtype is not None:
        moved = moved.with_compute_dtype(dtype)
    if compiled:
        moved = moved.with_compile()
    plugins.set_backend(name, moved)
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
    message = plain_message(str(exc)) or type(exc).__name__
    print(f"combinability: error: {message}", file=sys.stderr)
    return EXIT_USAGE if _is_usage_error(exc) else EXIT_RUNTIME


def _drop_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a replaced stdout (pytest's) has no file to point
        pass


#: Commands whose work is lost when interrupted: they write their one output at the end (or none)
_STARTS_AGAIN = frozenset({"_cmd_train", "_cmd_align", "_cmd_merge", "_cmd_report", "_cmd_download", "_cmd_plugins"})


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
        command = getattr(getattr(args, "func", None), "__name__", "")
        if command in _STARTS_AGAIN:  # writes one file at the end, or nothing: no partial result to resume from
            print(f"combinability: {what}; nothing was written (the same command run again starts from the "
                  "beginning)", file=sys.stderr)
        else:
            print(f"combinability: {what}; finished results are kept (run the same command again to resume)",
                  file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (``| head``): stop quietly, as Unix tools do
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except (CombinabilityError, OSError) as exc:
        return _report_error(exc, args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``combinability`` command; returns the exit status.

    0 success; 2 usage error (argparse's, and the library's ``ConfigurationError``,
    ``UnknownNameError`` and ``SamplerError``: a bad value, an unknown name, an input path that
    does not exist); 1 any other error of the library or of the
    operating system; 130 Ctrl-C; 141 the reader of the output went away (``| head``); 143 SIGTERM.
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
