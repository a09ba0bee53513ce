"""Reference models: build, train, save and load them through any backend.

:func:`train` is the one call that turns an architecture name and a dataset name into a
trained native model; with ``checkpoint=`` it reuses a finished checkpoint whose settings
match instead of training again, and refuses (before training) to replace a file it did not
write. Checkpoints are one format for every backend (:mod:`combinability.checkpoint`): a model
built from a layer table has the same names and axes in every backend, so a checkpoint written
by one backend loads into another. :func:`load_model` checks a checkpoint's tensor shapes and
dtypes, read from its header, against the model its configuration describes before building
anything. An architecture without a layer table (built by a module factory, see
:mod:`combinability.architecture`) trains and saves the same way; its checkpoints hold the
backend's own parameter names and load into that backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability import training
from combinability.checkpoint import (
    VERSION,
    check_overwrite,
    load_checkpoint,
    metadata_differences,
    non_float_parameters,
    plain,
    read_metadata,
    save_checkpoint,
)
from combinability.errors import (
    BackendUnavailableError,
    ConfigurationError,
    CorruptFileError,
    IncompatibleModelsError,
    IncompatibleVersionError,
    LayoutError,
    OutputExistsError,
)
from combinability.files import check_writable
from combinability.plugins import get_architecture, get_backend
from combinability.training import RECIPES, TrainRecipe

if TYPE_CHECKING:
    from combinability.data.base import ArrayDataset

__all__ = ["train", "build_model", "load_model", "save_model", "load_into"]


def _dataset(data: str | ArrayDataset, split: str) -> ArrayDataset:
    if isinstance(data, str):
        from combinability.data import load_dataset

        return load_dataset(data, split)
    return data


def check_width(width: Any) -> None:
    """Refuse a width multiplier that is not a finite number > 0 (None, the architecture's default, passes).

    Raises
    ------
    ConfigurationError
        For ``0``, a negative width, ``inf``, ``nan`` or a non-number.
    """
    if width is None:
        return
    if isinstance(width, bool) or not isinstance(width, int | float | np.integer | np.floating) or \
            not (math.isfinite(float(width)) and float(width) > 0):
        raise ConfigurationError(f"width must be a finite number > 0 (a multiplier of the architecture's units, "
                                 f"e.g. 0.5, 1, 4), got {width!r}")


def build_model(architecture: str, *, backend: str = "torch", width: float | None = None, num_classes: int = 10,
                input_shape: tuple[int, ...] = (1, 28, 28), seed: int = 0) -> Any:
    """A freshly initialised native model of a registered architecture (seeded)."""
    be = get_backend(backend)
    arch = get_architecture(architecture)
    check_width(width)
    if not arch.has_table:
        width = arch.default_width if width is None else width
        return arch.factory(be.name)(width=width, num_classes=int(num_classes),
                                     input_shape=tuple(int(s) for s in input_shape), seed=int(seed))
    table = arch.layer_table(width=width, num_classes=num_classes, input_shape=input_shape)
    builder = arch.builder(be.name)
    return builder(table, seed=seed) if builder is not None else be.build(table, seed=seed)


def train(
    architecture: str,
    data: str | ArrayDataset,
    *,
    backend: str = "torch",
    seed: int = 0,
    epochs: int | None = None,
    width: float | None = None,
    recipe: TrainRecipe | None = None,
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Any:
    """Train a reference model and return the backend's native model.

    Parameters
    ----------
    architecture : str
        Registered architecture (``"mlp"``, ``"tiny10"``, ``"resnet20"``, ``"vgg16"``, or a plugin's).
    data : str or ArrayDataset
        Registered dataset name (its ``"train"`` split is used) or a training split.
    backend : str, default "torch"
    seed : int, default 0
        Seeds the initialisation and the batch order; different seeds give the
        different models of the paper ("different initializations and batch orders").
    epochs : int, optional
        Overrides the recipe's number of epochs.
    width : float, optional
        Width multiplier (default: the architecture's).
    recipe : TrainRecipe, optional
        Default: the paper's recipe for the architecture (appendix A), or Adam for MLPs.
    checkpoint : path, optional
        Save the trained model there (atomically). If the file is a checkpoint trained with
        the same settings (architecture, dataset, seed, width, recipe, backend), it is loaded
        instead of training again. Its location is checked writable before training starts.
    overwrite : bool, default False
        Replace ``checkpoint`` when it holds a file that is not this library's checkpoint, or a
        checkpoint trained with other settings; without it such a file is refused before training.
        A checkpoint trained with the same settings is reused either way.
    metadata : mapping, optional
        Plain values (see :func:`combinability.checkpoint.plain`) merged into the checkpoint's
        metadata, next to the training settings (which take precedence over equal keys).
    progress : bool
        Show a progress bar.

    Raises
    ------
    OutputExistsError
        If ``checkpoint`` holds a file that is not this library's checkpoint, or one trained with
        other settings (named in the message), and ``overwrite`` is false; raised before training.
    OutputNotWritableError
        If ``checkpoint`` cannot be written; raised before training.
    TypeError
        If ``metadata`` holds a value that is not plain; raised before training.
    """
    from combinability.data.convert import check_seed

    seed = check_seed(seed)
    be = get_backend(backend)
    arch = get_architecture(architecture)
    if not arch.has_table:
        arch.factory(be.name)  # no model for this backend: said before any work
    recipe = recipe or RECIPES.get(arch.name) or arch.recipe or TrainRecipe()
    if epochs is not None:
        recipe = recipe.with_(epochs=epochs)
    width = arch.default_width if width is None else width
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got a {type(metadata).__name__}")
    extra = plain(dict(metadata or {}), "metadata")
    ds = _dataset(data, "train")
    settings = {
        "architecture": arch.name,
        "dataset": ds.name,
        "seed": int(seed),
        "width": width,
        "recipe": repr(recipe),
        "backend": be.name,
    }
    replace = overwrite
    if checkpoint is not None:
        reused, replace = _reuse_checkpoint(Path(checkpoint), be.name, settings, overwrite)
        if reused is not None:
            return reused
        check_writable(checkpoint, what="checkpoint")
    model = build_model(arch.name, backend=be.name, width=width, num_classes=ds.num_classes,
                        input_shape=ds.input_shape, seed=seed)
    model = training.fit(be, model, ds, recipe, seed=seed, progress=progress, desc=f"train {arch.name}")
    if checkpoint is not None:
        config = None if arch.has_table else {"architecture": arch.name, "width": width,
                                              "num_classes": ds.num_classes, "input_shape": list(ds.input_shape)}
        save_model(model, checkpoint, backend=be.name, metadata={**extra, **settings}, overwrite=replace,
                   config=config)
    return model


def _reuse_checkpoint(path: Path, backend: str, settings: Mapping[str, Any], overwrite: bool) -> tuple[Any, bool]:
    """The model of ``path`` if it was trained with ``settings``, and whether ``path`` may be replaced.

    Returns ``(model, _)`` to reuse, or ``(None, replace)`` to train; ``replace`` is passed to
    :func:`save_model` as ``overwrite``.

    Raises
    ------
    OutputExistsError
        If ``path`` holds another file (not this library's checkpoint, or other settings) and
        ``overwrite`` is false.
    """
    if not path.exists() or path.is_dir():  # a folder: check_writable says so
        return None, overwrite
    advice = "pass overwrite=True (--overwrite) to train again and replace it, or choose another path"
    try:
        info = read_metadata(path)
    except (CorruptFileError, IncompatibleVersionError, IncompatibleModelsError, BackendUnavailableError) as exc:
        if overwrite:
            return None, True
        raise OutputExistsError(f"the checkpoint path {path} holds a file that is not a readable checkpoint of "
                                f"this library ({exc}); refusing to replace it: {advice}") from None
    stored = {k: info["metadata"][k] for k in settings if k in info["metadata"]}
    differ = metadata_differences(stored, settings)
    if info["version"] == 0 and not overwrite:
        raise OutputExistsError(f"the checkpoint path {path} holds a model file from elsewhere (not written by "
                                f"combinability); refusing to replace it: {advice}")
    if differ and not overwrite:
        raise OutputExistsError(f"the checkpoint path {path} holds a model trained with other settings "
                                f"({'; '.join(differ)}); refusing to replace it: {advice}")
    if info["version"] == 0 or differ:
        return None, True
    try:
        return _load(path, backend)[0], overwrite
    except (CorruptFileError, IncompatibleModelsError, IncompatibleVersionError):
        return None, True  # this run's own file, damaged: trained again and replaced


def save_model(model: Any, path: str | Path, *, backend: str | None = None, metadata: Mapping | None = None,
               overwrite: bool = False, config: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` to a checkpoint (safetensors with its configuration; temporary file, then rename).

    Parameters
    ----------
    model : native model
    path : str or Path
    backend : str, optional
        Default: inferred from ``model``.
    metadata : mapping, optional
        Plain values stored with the model.
    overwrite : bool, default False
        Replace ``path`` even when it holds a file that is not this library's checkpoint, or a
        checkpoint whose metadata differ from ``metadata`` (another run's result).
    config : mapping, optional
        The configuration (``architecture``, ``width``, ``num_classes``, ``input_shape``) of a model
        built by an architecture's module factory, so that :func:`load_model` can build it again;
        default: the model's layer table's (none for a user's module).

    Raises
    ------
    OutputExistsError
        If ``path`` holds such a file and ``overwrite`` is false; nothing is written then.
    """
    from combinability.sets import infer_backend

    be = get_backend(backend or infer_backend(model))
    check_overwrite(path, metadata, overwrite=overwrite, what="checkpoint")
    table = be.table_of(model)
    config = dict(config) if config is not None else dict(table.config) if table is not None else {}
    if "input_shape" in config:
        config["input_shape"] = list(config["input_shape"])
    save_checkpoint(path, be.native_state(model), config=config, metadata=dict(metadata or {}), backend=be.name)


def _load(path: str | Path, backend: str, architecture: str | None = None) -> tuple[Any, dict]:
    path = Path(path)
    info = read_metadata(path)  # a safetensors file: its header only, no array read yet
    config = info["config"]
    stored = config.get("architecture")
    if stored is None:
        raise IncompatibleModelsError(
            f"{path} holds a plain state dict with no architecture (a model from elsewhere); load it into your "
            "own module and pass the module to cb.ModelPair")
    if architecture is not None and get_architecture(architecture).name != stored:
        raise IncompatibleModelsError(f"{path} holds a {stored!r} model, not {architecture!r}")
    if not get_architecture(stored).has_table:
        return _load_factory_model(path, info, backend)
    table = _table_of(path, stored, config)
    if info["version"] == VERSION:  # the table's own names: check the header before reading or building
        _check_tensors(path, table, {k: (t["shape"], t["dtype"]) for k, t in info["tensors"].items()})
    ckpt = load_checkpoint(path)
    state = _from_legacy_jax(ckpt.state, table) if ckpt.version == 1 and ckpt.backend == "jax" else ckpt.state
    try:
        table.check_state(state, what=f"the checkpoint {path}")
    except LayoutError as exc:
        hint = (" (a checkpoint of combinability 0.1: re-train it, or load its arrays with "
                "cb.checkpoint.read_state_dict and map the names)" if ckpt.version == 1 else "")
        raise CorruptFileError(f"{exc}{hint}") from None
    _check_tensors(path, table, {k: (v.shape, v.dtype) for k, v in state.items()})
    model = build_model(stored, backend=backend, width=config.get("width"), num_classes=config["num_classes"],
                        input_shape=tuple(config["input_shape"]), seed=0)
    be = get_backend(backend)
    return be.with_state(model, {**be.state(model), **state}), dict(ckpt.metadata)


def _load_factory_model(path: Path, info: Mapping[str, Any], backend: str) -> tuple[Any, dict]:
    """A checkpoint of an architecture built by a module factory: built again, its arrays checked, then loaded.

    Raises
    ------
    IncompatibleModelsError
        If the file was written by another backend (the parameter names are the backend's own).
    CorruptFileError
        If its config is incomplete or invalid, or its arrays do not fit the model it describes.
    """
    config = info["config"]
    stored, written = config["architecture"], info.get("backend")
    be = get_backend(backend)
    if written is not None and written != be.name:
        raise IncompatibleModelsError(f"{path} holds a {stored!r} model written by the {written!r} backend; models "
                                      f"of {stored!r} are the frameworks' own, so it loads into backend={written!r} "
                                      f"only, not {be.name!r}")
    missing = [k for k in ("num_classes", "input_shape") if k not in config]
    if missing:
        raise CorruptFileError(f"{path}: its config {dict(config)} lacks {missing}: the file is corrupt")
    try:
        model = build_model(stored, backend=be.name, width=config.get("width"), num_classes=config["num_classes"],
                            input_shape=tuple(config["input_shape"]), seed=0)
    except (ConfigurationError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptFileError(f"{path}: its config {dict(config)} does not describe a valid {stored!r} model "
                               f"({exc}): the file is corrupt or crafted") from None
    current = be.state(model)
    described = f"the {stored!r} model its config describes ({dict(config)})"
    _check_arrays(path, {k: (v.shape, v.dtype) for k, v in current.items()},
                  {k: (t["shape"], t["dtype"]) for k, t in info["tensors"].items()}, described)
    ckpt = load_checkpoint(path)
    return be.with_state(model, {**current, **ckpt.state}), dict(ckpt.metadata)


def _table_of(path: Path, architecture: str, config: Mapping[str, Any]) -> Any:
    """The layer table a checkpoint's ``config`` describes (no model is built, nothing is allocated)."""
    missing = [k for k in ("num_classes", "input_shape") if k not in config]
    if missing:
        raise CorruptFileError(f"{path}: its config {dict(config)} lacks {missing}: the file is corrupt")
    try:
        return get_architecture(architecture).layer_table(
            width=config.get("width"), num_classes=config["num_classes"], input_shape=tuple(config["input_shape"]))
    except (ConfigurationError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptFileError(f"{path}: its config {dict(config)} does not describe a valid {architecture!r} "
                               f"model ({exc}): the file is corrupt or crafted") from None


def _check_tensors(path: Path, table: Any, tensors: Mapping[str, tuple[Any, Any]]) -> None:
    """Refuse tensors (``{name: (shape, dtype)}``) that do not fit ``table``: names, shapes, float dtypes.

    Raises
    ------
    CorruptFileError
        Naming the first parameter that is missing or whose shape differs (with both shapes), the
        names the model does not have, or the floating parameters stored as integers.
    """
    described = (f"the {table.name!r} model its config describes (width {table.config.get('width')}, "
                 f"{table.num_classes} classes, input {tuple(table.input_shape)})")
    _check_arrays(path, table.parameters(), tensors, described)


def _check_arrays(path: Path, expected: Mapping[str, tuple[Any, Any]], tensors: Mapping[str, tuple[Any, Any]],
                  described: str) -> None:
    """Refuse ``tensors`` not matching ``expected`` (both ``{name: (shape, dtype)}``); see :func:`_check_tensors`."""
    for name, (shape, _) in expected.items():
        if name not in tensors:
            raise CorruptFileError(f"{path}: parameter {name!r} of {described} is missing from the file")
        got = tuple(int(n) for n in tensors[name][0])
        if got != tuple(shape):
            raise CorruptFileError(f"{path}: parameter {name!r}: its config implies shape {tuple(shape)}, the file "
                                   f"holds {got}; the file does not fit {described} (corrupt or crafted)")
    unknown = [name for name in tensors if name not in expected]
    if unknown:
        raise CorruptFileError(f"{path}: holds tensors {described} does not have: {unknown[:8]}")
    bad = non_float_parameters({k: dtype for k, (_, dtype) in expected.items()},
                               {k: dtype for k, (_, dtype) in tensors.items()})
    if bad:
        raise CorruptFileError(f"{path}: floating-point parameters stored as integers: {', '.join(bad[:8])}"
                               f"{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}; loading them would "
                               "silently truncate the weights (save float32 weights)")


def _from_legacy_jax(state: Mapping[str, Any], table: Any) -> dict[str, Any]:
    """Arrays of a combinability 0.1 jax checkpoint (flax ``module/sub/leaf`` names) in the table's names."""
    flax = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition("/")
        collection = "batch_stats" if leaf in ("mean", "var") else "params"
        flax[f"{collection}/{module.replace('/', '_')}/{leaf}"] = value
    try:
        return table.from_flax(flax)
    except LayoutError:
        return dict(state)  # not convertible: check_state names what does not fit


def load_model(path: str | Path, *, backend: str = "torch", architecture: str | None = None) -> Any:
    """Read a checkpoint written by :func:`save_model` or :func:`train` into a model of ``backend``.

    Checkpoints of library-built models load into any backend (same names and axes).

    Raises
    ------
    CorruptFileError
        If the file is damaged, or its arrays do not fit the architecture its config describes (checked
        from the file's header before anything is built: the first parameter whose shape differs is
        named with both shapes), or floating-point parameters are stored as integers.
    IncompatibleVersionError
        If it was written by an incompatible version of the library.
    IncompatibleModelsError
        If it holds another architecture than ``architecture``, or no architecture at all.
    """
    return _load(path, backend, architecture)[0]


def _with_collections(current: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """``state`` under the model's flax names when its names lack their collection: an NNX model's
    state saved as a tree (``fc1/kernel``) is ``params/fc1/kernel`` here, its BatchNorm's
    ``batch_stats/bn/mean``. Unchanged unless every name then fits one of the model's."""
    if not state or any(k in current for k in state):
        return state
    bare: dict[str, str] = {}
    for name in current:
        head, sep, rest = name.partition("/")
        if sep and rest not in bare:
            bare[rest] = name
        elif sep:  # one path in two collections: ambiguous
            return state
    if not all(k in bare for k in state):
        return state
    return {bare[k]: v for k, v in state.items()}


#: Roots of a saved training state that are not the model (optimizer state, counters, random keys).
_TRAINING_ROOTS = frozenset({"opt_state", "optimizer", "optimizer_state", "optimizer_states", "opt", "step", "steps",
                             "epoch", "global_step", "lr_scheduler", "scheduler", "rng", "rngs", "dropout_rng", "key",
                             "scaler", "loss", "metrics"})
#: Roots that hold a model's variables in a saved training state, the most usual first.
_MODEL_ROOTS = ("params", "model", "state_dict", "model_state_dict", "variables", "state", "net", "network")


def _root(name: str) -> str:
    return re.split(r"[/.]", name, maxsplit=1)[0]


def _model_part(current: Mapping[str, Any], state: dict[str, Any], path: Any) -> dict[str, Any]:
    """The model's entries of a whole training state saved as one tree (flax's ``TrainState``: ``params/...``
    beside ``opt_state/...`` and ``step``; an NNX script's ``{"model": ..., "optimizer": ...}``).

    Unchanged when every name is the model's. Otherwise the entries under roots of
    :data:`_TRAINING_ROOTS` are left out when the rest are all the model's; else the one root
    whose subtree is all the model's names is taken (a usual one of :data:`_MODEL_ROOTS` first).
    """
    if all(k in current for k in state):
        return state
    kept = {k: v for k, v in state.items() if _root(k) not in _TRAINING_ROOTS}
    if kept and all(k in current for k in kept):
        return kept
    fits = {}
    for root in dict.fromkeys(map(_root, kept)):
        sub = {k[len(root) + 1:]: v for k, v in kept.items() if _root(k) == root and len(k) > len(root)}
        sub = _with_collections(current, sub)
        if sub and all(k in current for k in sub):
            fits[root] = sub
    if not fits:  # a root holding every name of the model and more: name the extra entries
        for root in dict.fromkeys(map(_root, kept)):
            sub = {k[len(root) + 1:] for k in kept if _root(k) == root and len(k) > len(root)}
            if set(current) <= sub | {k for k in current if k.endswith("num_batches_tracked")}:
                extra = sorted(sub - set(current))
                raise IncompatibleModelsError(
                    f"{path} holds every entry of the model under {root + '.'!r}, and also {extra[:8]}"
                    f"{f' and {len(extra) - 8} more' if len(extra) > 8 else ''}, which the model does not have: "
                    "is it another version of the model's class?")
    usual = [r for r in _MODEL_ROOTS if r in fits]
    if len(fits) > 1 and not usual:
        raise IncompatibleModelsError(f"{path} holds the model's variables under several roots: {sorted(fits)}; "
                                      "save the one to load alone")
    return fits[usual[0] if usual else next(iter(fits))] if fits else state


def load_into(model: Any, path: str | Path, *, backend: str | None = None) -> Any:
    """A copy of a user's ``model`` holding the arrays of ``path``.

    ``path`` may be a checkpoint of this library, a ``.safetensors`` file, a plain torch
    ``state_dict`` (``.pt``/``.bin``, also a training script's ``{"model": ..., "optimizer": ...,
    "epoch": ...}``), or flax's own: an Orbax checkpoint folder or a ``flax.serialization.to_bytes``
    file, of a linen model's variables, an NNX model's state (``nnx.state(model)``, its rng streams
    left out), or a whole training state holding one (a ``TrainState``'s ``params`` beside its
    ``opt_state`` and ``step``).

    Raises
    ------
    IncompatibleModelsError
        If the file's arrays do not fit the model (names missing, unknown, or shapes differ), or
        floating-point parameters are stored as integers (naming them and their dtype).
    """
    from combinability.checkpoint import read_state_dict
    from combinability.sets import infer_backend

    be = get_backend(backend or infer_backend(model))
    state = read_state_dict(path)
    current = be.state(model)
    for prefix in ("module.", "_orig_mod.", "model."):  # saved from a DataParallel / compiled / Lightning wrapper
        if any(k in current for k in state):
            break  # (a model whose own names start with ``model.``, saved by DDP: ``module.`` only is removed)
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = _model_part(current, _with_collections(current, state), path)
    counters = [k for k in current if k.endswith("num_batches_tracked") and k not in state]
    if counters and all(k in current for k in state):  # an older torch's BatchNorm state: no counter saved
        state = {**state, **{k: current[k] for k in counters}}
    bad = non_float_parameters(current, state)
    if bad:
        raise IncompatibleModelsError(
            f"{path}: floating-point parameters of {type(model).__name__} stored as integers: {', '.join(bad[:8])}"
            f"{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}; loading them would silently truncate the "
            "weights (save the model's float weights, e.g. torch.save(model.state_dict(), path))")
    try:
        return be.with_state(model, state)
    except LayoutError as exc:
        raise IncompatibleModelsError(f"{path} does not fit {type(model).__name__}: {exc}") from None
