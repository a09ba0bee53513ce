"""Readers of the checkpoint files that are not safetensors (see :mod:`combinability.checkpoint`).

* ``torch.save`` files: a plain ``state_dict`` (version 0; also the one beside optimizer state in
  a training script's dictionary, ``{"model": ..., "optimizer": ..., "epoch": 3}``), or a version-1 checkpoint of
  the torch backend. They need torch, imported only here, only when such a file is read, and
  are read with ``torch.load(weights_only=True)``.
* The version-1 ``.npz`` archives of the jax backend, with a JSON ``__header__``.
* A Hugging Face model folder (``save_pretrained``): its one weights file, or its shards listed by
  an index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``), read shard by
  shard (:func:`load_folder`, :func:`load_sharded`).
* Flax's own checkpoints: an Orbax checkpoint directory (``ocp.StandardCheckpointer().save(path,
  state)``, as the Flax NNX and linen guides write one) and ``flax.serialization.to_bytes`` files
  (msgpack). Their nested trees become ``"a/b/c"`` names (:func:`flat_tree`); they need orbax or
  flax, imported only when such a file is read.

:func:`combinability.checkpoint.load_checkpoint` tells the kinds apart by their content and
calls these.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from combinability.checkpoint import (
    _NPZ_HEADER,
    _READABLE,
    FORMAT,
    LEGACY_VERSION,
    Checkpoint,
    _corrupt,
    _json_plain,
)
from combinability.errors import (
    BackendUnavailableError,
    CorruptFileError,
    IncompatibleModelsError,
    IncompatibleVersionError,
)

__all__ = ["flat_tree", "load_folder", "load_msgpack", "load_npz", "load_orbax", "load_sharded", "load_torch"]

_log = logging.getLogger("combinability.checkpoint")
_TORCH_HINT = "pip install 'combinability[torch]'"
_JAX_HINT = "pip install 'combinability[jax]'"
#: Files in an Orbax checkpoint directory (any of them).
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
#: Entries of a training script's dictionary that hold the model's state dict, the most usual first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "network", "module",
                   "weights", "params")
_LEGACY_TORCH_KEYS = ("format", "version", "backend", "architecture", "config", "state", "metadata")


#: Index files of a model saved in shards (Hugging Face's ``save_pretrained``), the usual first.
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                 "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
#: The one weights file of a model folder saved whole, the usual first.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin")


def _first_sentence(text: str, limit: int = 300) -> str:
    """The first sentence of a library's message, without terminal escapes, whole or cut at a word."""
    text = " ".join(re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", text).split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def load_folder(path: Path) -> Checkpoint:
    """A Hugging Face model folder: its shards' index if it has one, else its one weights file.

    Raises
    ------
    CorruptFileError
        If the folder holds neither (naming the files looked for), or more than one index or weights file
        (which would be a guess).
    """
    indexes = [path / name for name in SHARD_INDEXES if (path / name).is_file()]
    whole = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if len(indexes) > 1 or (not indexes and len(whole) > 1):
        found = [p.name for p in (indexes or whole)]
        raise CorruptFileError(f"{str(path)!r} holds {' and '.join(found)}: give the one to read")
    if indexes:
        return load_sharded(indexes[0])
    if whole:
        from combinability.checkpoint import load_checkpoint

        return load_checkpoint(whole[0])
    raise CorruptFileError(f"{str(path)!r} is a folder but not a checkpoint: it has no Orbax checkpoint "
                           f"({', '.join(ORBAX_MARKERS)}), no shard index ({', '.join(SHARD_INDEXES)}) and no "
                           f"weights file ({', '.join(WEIGHT_FILES)}); give a checkpoint file or such a folder")


def load_sharded(index: Path) -> Checkpoint:
    """A model saved in shards: the JSON ``index`` maps each tensor to its shard file (``{"weight_map": {name:
    file}}``), read one shard at a time. The tensors come in the index's order, the index's ``metadata`` as
    the checkpoint's.

    Raises
    ------
    CorruptFileError
        If the index is not such a map, names a shard that is missing or outside its folder, or a shard lacks
        a tensor the index puts in it.
    """
    from combinability.checkpoint import load_checkpoint

    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{str(index)!r} is not a JSON shard index ({type(exc).__name__}: {exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptFileError(f"{str(index)!r} is not a shard index: it needs a 'weight_map' of tensor names to "
                               "shard files")
    state: dict[str, np.ndarray] = {}
    for shard in dict.fromkeys(weight_map.values()):
        file = index.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CorruptFileError(f"{str(index)!r} names the shard {shard!r} outside its folder")
        if not file.is_file():
            raise CorruptFileError(f"{str(index)!r} names the shard {shard!r}, which is missing from "
                                   f"{str(index.parent)!r}")
        held = load_checkpoint(file).state
        wanted = [name for name, where in weight_map.items() if where == shard]
        missing = [name for name in wanted if name not in held]
        if missing:
            raise CorruptFileError(f"the shard {str(file)!r} lacks {missing[:5]}"
                                   f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}, which "
                                   f"{index.name} puts in it")
        state.update((name, held[name]) for name in wanted)
        del held
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return Checkpoint(state={name: state[name] for name in weight_map}, config={},
                      metadata=_json_plain(metadata, f"{index}: metadata"), backend=None, version=0, path=index)


def load_npz(path: Path) -> Checkpoint:
    """A version-1 checkpoint of the jax backend: an ``.npz`` with a JSON ``__header__``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(npz[_NPZ_HEADER].tobytes().decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                found = header.get("format") if isinstance(header, dict) else type(header).__name__
                raise _corrupt(path, f"not a combinability checkpoint: expected format {FORMAT!r}, found {found!r}")
            _check_legacy_version(path, header.get("version"))
            names = header.get("names")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _corrupt(path, "the header's 'names' is not a list of tensor names")
            missing = [f"a{i}" for i in range(len(names)) if f"a{i}" not in npz.files]
            if missing:
                raise _corrupt(path, f"lacks the arrays {missing[:5]} named in its header")
            state = {name: np.array(npz[f"a{i}"]) for i, name in enumerate(names)}
    except (CorruptFileError, IncompatibleVersionError):
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"cannot be read as an .npz checkpoint: {type(exc).__name__}: {exc}") from exc
    config, metadata = header.get("config") or {}, header.get("metadata") or {}
    if not isinstance(config, dict) or not isinstance(metadata, dict):
        raise _corrupt(path, "the header's 'config' and 'metadata' must be JSON objects")
    if header.get("architecture"):
        config = {**config, "architecture": header["architecture"]}
    backend = header.get("backend")
    return Checkpoint(
        state=state,
        config=config,
        metadata=metadata,
        backend=backend if isinstance(backend, str) else None,
        version=LEGACY_VERSION,
        path=path,
    )


def _check_legacy_version(path: Path, version: Any) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise _corrupt(path, f"checkpoint version must be an int, found {version!r}")
    if version != LEGACY_VERSION:
        raise IncompatibleVersionError(
            f"{str(path)!r} is a version-{version} checkpoint in the legacy container; {_READABLE}"
        )


def load_torch(path: Path) -> Checkpoint:
    """A ``torch.save`` file: a plain state dict (version 0) or a version-1 checkpoint of the torch backend."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{str(path)!r} is a torch.save file; reading it needs PyTorch: {_TORCH_HINT}"
        ) from exc
    try:
        # A file object, not the path: torch.load treats any path ending in ".safetensors" as safetensors.
        with open(path, "rb") as fh:
            payload = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _corrupt(
            path,
            "cannot be read with torch.load(weights_only=True): it is truncated or damaged, or holds objects "
            f"other than tensors and plain values (save model.state_dict(), not the model) "
            f"({type(exc).__name__}: {_first_sentence(str(exc))})",
        ) from exc

    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        _check_legacy_version(path, payload.get("version"))
        missing = [k for k in _LEGACY_TORCH_KEYS if k not in payload]
        if missing:
            raise _corrupt(path, f"the checkpoint lacks the key(s) {missing}")
        raw, config, metadata = payload["state"], payload["config"], payload["metadata"]
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise _corrupt(path, "the checkpoint's 'state' must map names to tensors")
        if not isinstance(config, dict) or not isinstance(metadata, dict):
            raise _corrupt(path, "the checkpoint's 'config' and 'metadata' must be dicts")
        try:
            config = {**_json_plain(config, "config"), "architecture": str(payload["architecture"])}
            metadata = _json_plain(metadata, "metadata")
        except TypeError as exc:
            raise _corrupt(path, str(exc)) from exc
        backend = payload["backend"]
        return Checkpoint(
            state={str(k): _torch_to_numpy(path, str(k), v) for k, v in raw.items()},
            config=config,
            metadata=metadata,
            backend=backend if isinstance(backend, str) else None,
            version=LEGACY_VERSION,
            path=path,
        )

    state = _find_state_dict(path, payload, torch.Tensor)
    return Checkpoint(
        state={k: _torch_to_numpy(path, k, v) for k, v in state.items()},
        config={},
        metadata={},
        backend=None,
        version=0,
        path=path,
    )


def _find_state_dict(path: Path, payload: Any, tensor_type: type) -> dict[str, Any]:
    """The state dict in a ``torch.save`` payload: the payload itself, or the one state dict among its entries.

    A training script saves the model's state dict beside an optimizer's, epoch numbers and
    losses (``{"model": ..., "optimizer": ..., "epoch": 3}``). The entry taken is the only
    dict of tensors; among several (a model and its EMA), the one under a usual model key
    (:data:`STATE_DICT_KEYS`, first match), else none: the error names them.
    """
    expected = (
        "expected a state dict (a dict of tensors, as written by torch.save(model.state_dict(), path)) "
        "or a training script's dict holding one (under 'state_dict', 'model', ... beside optimizer state)"
    )
    if not isinstance(payload, dict):
        raise IncompatibleModelsError(f"{str(path)!r} holds a {type(payload).__name__}; {expected}")
    if payload and all(isinstance(v, tensor_type) for v in payload.values()):
        where, state = "state dict", payload
    else:
        found = [k for k, v in payload.items() if isinstance(v, dict) and v and
                 all(isinstance(t, tensor_type) for t in v.values())]
        usual = [k for k in STATE_DICT_KEYS if k in found]
        if len(found) > 1 and not usual:
            raise IncompatibleModelsError(
                f"{str(path)!r} holds several state dicts: {', '.join(map(repr, found))} (a model and its EMA?); "
                f"save the one to load alone: torch.save(checkpoint[{found[0]!r}], path)")
        if found:
            key = usual[0] if usual else found[0]
            if len(found) > 1:
                _log.info("%s: loading its %r entry; its other state dicts %s are left out", path, key,
                          [k for k in found if k != key])
            where, state = f"{key!r} entry", payload[key]
        else:  # say what the usual entry, or the file itself, holds instead
            key = next((k for k in STATE_DICT_KEYS if k in payload), None)
            where, state = (f"{key!r} entry", payload[key]) if key is not None else ("state dict", payload)
            if not isinstance(state, dict):
                raise IncompatibleModelsError(f"{str(path)!r}: its {where} holds a {type(state).__name__}; {expected}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise IncompatibleModelsError(f"{str(path)!r}: its {where} has the non-str key {key!r}; {expected}")
        if not isinstance(value, tensor_type):
            raise IncompatibleModelsError(
                f"{str(path)!r}: its {where} holds a {type(value).__name__} ({value!r:.60}) under {key!r}; {expected}"
            )
    return state


def _torch_to_numpy(path: Path, name: str, tensor: Any) -> np.ndarray:
    """A CPU copy of a torch tensor as numpy; bfloat16 and other float types numpy lacks become float32."""
    import torch

    try:
        t = tensor.detach().cpu()
        if t.is_quantized:
            t = t.dequantize()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg()
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.to(torch.float32)
        elif t.dtype == torch.complex32:
            t = t.to(torch.complex64)
        return np.array(t.numpy(), copy=True)
    except (TypeError, RuntimeError) as exc:
        raise IncompatibleModelsError(
            f"{str(path)!r}: tensor {name!r} (dtype {tensor.dtype}) cannot be converted to numpy: {exc}"
        ) from exc


def flat_tree(tree: Any, where: str = "") -> dict[str, np.ndarray]:
    """A flax checkpoint's nested tree as ``{"a/b/c": array}``.

    A node that is only ``{"value": array}`` (an NNX ``Variable``'s state) is the array; an rng
    stream (a node holding a typed PRNG ``key`` and its ``count``: NNX ``Rngs``, ``Dropout``) is
    left out, as are ``None`` leaves: they are no weights. Lists are numbered as NNX numbers them.
    """
    if isinstance(tree, list | tuple):
        tree = {str(i): v for i, v in enumerate(tree)}
    if not isinstance(tree, dict):
        if tree is None:
            return {}
        return {where: _host_array(tree, where)}
    if set(tree) == {"value"}:
        return flat_tree(tree["value"], where)
    if set(tree) <= {"key", "count", "tag"} and "key" in tree and _is_prng_key(tree["key"]):
        return {}
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if _is_prng_key(v):
            continue
        out.update(flat_tree(v, f"{where}/{k}" if where else str(k)))
    return out


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, dict) and set(x) == {"value"} and _is_prng_key(x["value"])
    try:
        import jax

        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except (ImportError, TypeError):
        return False


def _host_array(x: Any, where: str) -> np.ndarray:
    try:
        return np.array(x)
    except (TypeError, ValueError) as exc:
        raise IncompatibleModelsError(f"entry {where!r} of the checkpoint is not an array ({type(x).__name__})"
                                      ) from exc


def load_orbax(path: Path) -> Checkpoint:
    """An Orbax checkpoint directory (of a flax model's variables or an NNX model's state)."""
    return _tree_checkpoint(path, "an Orbax checkpoint", "orbax.checkpoint",
                            lambda ocp: ocp.StandardCheckpointer().restore(path.absolute()))


def load_msgpack(path: Path) -> Checkpoint:
    """A ``flax.serialization.to_bytes`` file (msgpack of a nested dict of arrays)."""
    return _tree_checkpoint(path, "a flax msgpack file", "flax.serialization",
                            lambda serialization: serialization.msgpack_restore(path.read_bytes()))


def _tree_checkpoint(path: Path, kind: str, package: str, read: Any) -> Checkpoint:
    """The tree ``read(package)`` gives for ``path`` (a file of ``kind``), as a version-0 checkpoint."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise BackendUnavailableError(f"{str(path)!r} is {kind}; reading it needs {package.split('.')[0]} "
                                      f"({_JAX_HINT})") from exc
    try:
        tree = read(module)
    except Exception as exc:  # noqa: BLE001 - these readers raise many kinds for a damaged file
        raise CorruptFileError(f"{str(path)!r} could not be read as {kind} "
                               f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None
    if not isinstance(tree, dict):
        raise CorruptFileError(f"{str(path)!r} holds a {type(tree).__name__}, not a tree of arrays")
    return Checkpoint(state=flat_tree(tree), config={}, metadata={}, backend=None, version=0, path=path)
