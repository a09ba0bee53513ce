"""Checkpoint files of the torch backend.

A checkpoint is a :func:`torch.save` of one dictionary::

    {"format": "combinability-checkpoint", "version": 1, "backend": "torch",
     "architecture": "mlp", "config": {"width": 1, "num_classes": 10, "input_shape": (1, 28, 28)},
     "state": {name: CPU tensor, ...}, "metadata": {...}}

holding only tensors and plain Python values, so that it is read back with
``torch.load(..., weights_only=True)`` (no arbitrary code runs on load). Files are
written to a temporary file in the target directory, then renamed over the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from combinability.checkpoint import FORMAT, VERSION, plain
from combinability.errors import CorruptFileError, IncompatibleVersionError
from combinability.files import atomic_path

__all__ = ["FORMAT", "VERSION", "write_checkpoint", "read_checkpoint", "plain"]

_KEYS = ("format", "version", "backend", "architecture", "config", "state", "metadata")




def write_checkpoint(
    path: str | Path,
    *,
    architecture: str,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    backend: str = "torch",
) -> Path:
    """Write a checkpoint atomically and return its path."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "backend": backend,
        "architecture": str(architecture),
        "config": plain(dict(config), "config"),
        "state": {k: v.detach().to("cpu").clone() for k, v in state.items()},
        "metadata": plain(dict(metadata or {})),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`write_checkpoint`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        If the file is not a readable combinability checkpoint (truncated, another
        format, missing keys).
    IncompatibleVersionError
        If it was written in a checkpoint version this library does not read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptFileError(
            f"{path} is not a readable combinability checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CorruptFileError(f"{path} is not a combinability checkpoint: expected format {FORMAT!r}, found {found!r}")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptFileError(f"{path}: checkpoint version must be an int, found {version!r}")
    if version != VERSION:
        raise IncompatibleVersionError(
            f"{path} is a version-{version} checkpoint; this version of combinability reads version {VERSION}"
            + (" (upgrade combinability to read it)" if version > VERSION else "")
        )
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CorruptFileError(f"{path}: checkpoint lacks the key(s) {missing}")
    state = payload["state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"{path}: the checkpoint's 'state' must map names to tensors")
    config = payload["config"]
    if not isinstance(config, dict) or not {"width", "num_classes", "input_shape"} <= set(config):
        raise CorruptFileError(
            f"{path}: the checkpoint's 'config' must hold width, num_classes and input_shape, found {config!r}"
        )
    return payload
