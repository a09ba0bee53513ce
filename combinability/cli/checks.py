"""Checks of the command line's values, run before any model is loaded, aligned or trained.

Each raises :class:`~combinability.errors.ConfigurationError` (exit status 2) with a message
that names the option, the value given and what is valid. Importing this module imports
nothing heavy.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_positive", "check_positive_list", "check_inputs_exist", "check_data", "check_splits",
           "check_checkpoint_out", "check_library_checkpoints", "check_sampler_models", "check_sampler_values",
           "plain_message", "CHECKPOINT_SUFFIXES"]

#: Suffixes of the checkpoints the command writes (safetensors files: the library's format).
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")


def _usage_error(message: str) -> Exception:
    from combinability.errors import ConfigurationError

    return ConfigurationError(message)


def check_positive(args: argparse.Namespace, options: Iterable[str], *, number: bool = False) -> None:
    """Refuse an option of ``options`` (``args`` attribute names) that is set and not > 0.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options; options it lacks, or that are None (unset), are skipped.
    options : iterable of str
        Attribute names, e.g. ``"batch_size"`` (the flag is ``--batch-size``).
    number : bool
        Word the message for a real number (``--width``) rather than an integer.

    Raises
    ------
    ConfigurationError
        Naming the first option that is zero or negative, and its value.
    """
    for option in options:
        value = getattr(args, option, None)
        if value is not None and not (value > 0 and math.isfinite(value)):
            flag = "--" + option.replace("_", "-")
            kind = "a finite number > 0" if number else "a positive integer (1, 2, ...)"
            raise _usage_error(f"{flag} must be {kind}, got {value:g}")


def check_positive_list(values: Sequence[float] | None, option: str) -> None:
    """Refuse a comma-separated list (``--widths``) that is empty or holds a value <= 0."""
    if values is None:
        return
    bad = [v for v in values if not v > 0]
    if bad or not values:
        raise _usage_error(f"{option} must be numbers > 0, separated by commas (e.g. 0.5,1,2), got "
                           f"{','.join(f'{v:g}' for v in values) or 'none'}")


def check_inputs_exist(paths: Sequence[str], what: str = "checkpoint") -> None:
    """Refuse a path given on the command line that does not exist.

    Raises
    ------
    ConfigurationError
        Naming the path (and the current folder when the path is relative).
    """
    for path in paths:
        if path is not None and not os.path.exists(path):
            where = "" if os.path.isabs(path) else f" (in {os.getcwd()})"
            raise _usage_error(f"no such {what}: {path}{where}; give the path of an existing file")


def check_data(data: str | None) -> None:
    """Refuse a ``--data`` that is neither a registered dataset nor an existing ``.npz`` file.

    Raises
    ------
    ConfigurationError, UnknownNameError
        For a missing ``.npz`` file, or an unknown dataset name (the message lists the valid ones).
    """
    if data is None:
        return
    if data.endswith(".npz"):
        if not os.path.isfile(data):
            raise _usage_error(f"--data {data}: no such file; give an existing .npz file or a registered dataset")
        return
    from combinability.plugins import get_dataset_spec

    get_dataset_spec(data)


def check_splits(splits: Sequence[str] | None) -> None:
    """Refuse an unknown split (UnknownNameError, exit status 2: the message lists the valid ones)."""
    from combinability.data.registry import check_split

    for split in splits or ():
        check_split(split)


def check_checkpoint_out(path: str | None) -> None:
    """Refuse a checkpoint name whose suffix is not that of the format written (safetensors).

    Raises
    ------
    ConfigurationError
        For ``b_al.pt``, ``x.nc`` or a name without a suffix: a ``.pt`` name would promise a
        ``torch.save`` file, which ``torch.load`` then fails to read.
    """
    if path is None or Path(path).suffix.lower() in CHECKPOINT_SUFFIXES:
        return
    raise _usage_error(
        f"--out {path}: checkpoints are written in the safetensors format; give a name ending in "
        f"{' or '.join(CHECKPOINT_SUFFIXES)} (in PyTorch, safetensors.torch.load_file(path) reads it as a "
        "state dict for model.load_state_dict)")


def check_library_checkpoints(paths: Sequence[str], model: str | None, *, data_given: bool = True) -> None:
    """Without ``--model``, refuse a checkpoint that holds a plain state dict (no architecture recorded).

    ``data_given=False`` (the data is needed and not given) adds ``--data`` to the advice: such a
    file does not record its dataset either.

    Raises
    ------
    ConfigurationError
        Pointing to ``--model PKG.MODULE:CLASS``.
    CorruptFileError
        If a file cannot be read at all (a runtime error, exit status 1).
    """
    if model is not None:
        return
    from combinability.checkpoint import read_metadata

    for path in paths:
        if path is None or os.path.isdir(path):
            continue
        if not (read_metadata(path).get("config") or {}).get("architecture"):
            raise _usage_error(
                f"{path} holds a plain state dict with no architecture (a model from elsewhere, not written by "
                "'combinability train'); give --model PKG.MODULE:CLASS, the module class it is the state of "
                "(importable from this folder, built with no arguments)"
                + ("" if data_given else ", and --data (a dataset name or an .npz file): such a file does not "
                   "record the dataset it was trained on either"))


def check_sampler_models(sampler: Any, model_c: str | None) -> None:
    """Refuse a three-model sampler without ``--model-c``, and ``--model-c`` with a two-model sampler.

    Raises
    ------
    ConfigurationError
        Saying which option to add or drop.
    """
    three = getattr(sampler, "models", 2) == 3
    name = sampler.name
    if three and model_c is None:
        raise _usage_error(f"--sampler {name} combines three models: give the third with --model-c CHECKPOINT")
    if not three and model_c is not None:
        raise _usage_error(f"--model-c is for a three-model sampler (--sampler triangle); --sampler {name} "
                           "combines two models: drop --model-c or use --sampler triangle")


def check_sampler_values(sampler: Any, values: Sequence[Any] | None) -> None:
    """Check ``--values`` against the sampler's range (SamplerError, exit status 2).

    The stitching sampler's range depends on the model's layers: it is checked when the model is known.
    """
    if not values or type(sampler).__name__ == "Stitch":
        return
    for value in values:
        sampler.validate(value)


#: ANSI escape sequences (colours, bold) some libraries put in their messages.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain_message(text: str) -> str:
    """``text`` on one line, without terminal escape sequences."""
    return " ".join(_ANSI.sub("", text).split())
