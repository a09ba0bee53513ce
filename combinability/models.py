"""Reference models: build, train, save and load them through any backend.

:func:`train` is the one call that turns an architecture name and a dataset name into a
trained native model; with ``checkpoint=`` it reuses a finished checkpoint whose settings
match instead of training again. Checkpoints are one format for every backend
(:mod:`combinability.checkpoint`): a model built from a layer table has the same names and
axes in every backend, so a checkpoint written by one backend loads into another.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from combinability.checkpoint import load_checkpoint, save_checkpoint
from combinability.errors import CorruptFileError, IncompatibleModelsError, IncompatibleVersionError, LayoutError
from combinability.plugins import get_architecture, get_backend
from combinability.training import RECIPES, TrainRecipe, fit

if TYPE_CHECKING:
    from combinability.data.base import ArrayDataset

__all__ = ["train", "build_model", "load_model", "save_model", "load_into"]


def _dataset(data: str | ArrayDataset, split: str) -> ArrayDataset:
    if isinstance(data, str):
        from combinability.data import load_dataset

        return load_dataset(data, split)
    return data


def build_model(architecture: str, *, backend: str = "torch", width: float | None = None, num_classes: int = 10,
                input_shape: tuple[int, ...] = (1, 28, 28), seed: int = 0) -> Any:
    """A freshly initialised native model of a registered architecture (seeded)."""
    be = get_backend(backend)
    arch = get_architecture(architecture)
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
        Save the trained model there (atomically). If the file exists and was trained
        with the same settings, it is loaded instead of training again.
    progress : bool
        Show a progress bar.
    """
    from combinability.data.convert import check_seed

    seed = check_seed(seed)
    be = get_backend(backend)
    arch = get_architecture(architecture)
    recipe = recipe or RECIPES.get(arch.name, TrainRecipe())
    if epochs is not None:
        recipe = recipe.with_(epochs=epochs)
    width = arch.default_width if width is None else width
    ds = _dataset(data, "train")
    settings = {
        "architecture": arch.name,
        "dataset": ds.name,
        "seed": int(seed),
        "width": width,
        "recipe": repr(recipe),
        "backend": be.name,
    }
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            model, meta = _load(checkpoint, be.name)
        except (CorruptFileError, IncompatibleVersionError, IncompatibleModelsError):
            model, meta = None, {}
        if model is not None and all(meta.get(k) == v for k, v in settings.items()):
            return model
    model = build_model(arch.name, backend=be.name, width=width, num_classes=ds.num_classes,
                        input_shape=ds.input_shape, seed=seed)
    model = fit(be, model, ds, recipe, seed=seed, progress=progress, desc=f"train {arch.name}")
    if checkpoint is not None:
        save_model(model, checkpoint, backend=be.name, metadata=settings)
    return model


def save_model(model: Any, path: str | Path, *, backend: str | None = None, metadata: Mapping | None = None) -> None:
    """Write ``model`` to a checkpoint (safetensors with its configuration; temporary file, then rename)."""
    from combinability.sets import infer_backend

    be = get_backend(backend or infer_backend(model))
    table = be.table_of(model)
    config = dict(table.config) if table is not None else {}
    if "input_shape" in config:
        config["input_shape"] = list(config["input_shape"])
    save_checkpoint(path, be.state(model), config=config, metadata=dict(metadata or {}), backend=be.name)


def _load(path: str | Path, backend: str, architecture: str | None = None) -> tuple[Any, dict]:
    ckpt = load_checkpoint(path)
    config = ckpt.config
    stored = config.get("architecture")
    if stored is None:
        raise IncompatibleModelsError(
            f"{path} holds a plain state dict with no architecture (a model from elsewhere); load it into your "
            "own module and pass the module to cb.ModelPair")
    if architecture is not None and get_architecture(architecture).name != stored:
        raise IncompatibleModelsError(f"{path} holds a {stored!r} model, not {architecture!r}")
    model = build_model(stored, backend=backend, width=config.get("width"), num_classes=config["num_classes"],
                        input_shape=tuple(config["input_shape"]), seed=0)
    be = get_backend(backend)
    table = be.table_of(model)
    state = _from_legacy_jax(ckpt.state, table) if ckpt.version == 1 and ckpt.backend == "jax" else ckpt.state
    try:
        table.check_state(state, what=f"the checkpoint {path}")
    except LayoutError as exc:
        hint = (" (a checkpoint of combinability 0.1: re-train it, or load its arrays with "
                "cb.checkpoint.read_state_dict and map the names)" if ckpt.version == 1 else "")
        raise CorruptFileError(f"{exc}{hint}") from None
    return be.with_state(model, {**be.state(model), **state}), dict(ckpt.metadata)


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
        If the file is damaged, or its arrays do not fit the architecture it names.
    IncompatibleVersionError
        If it was written by an incompatible version of the library.
    IncompatibleModelsError
        If it holds another architecture than ``architecture``, or no architecture at all.
    """
    return _load(path, backend, architecture)[0]


def load_into(model: Any, path: str | Path, *, backend: str | None = None) -> Any:
    """A copy of a user's ``model`` holding the arrays of ``path``.

    ``path`` may be a checkpoint of this library, a ``.safetensors`` file or a plain torch
    ``state_dict`` (``.pt``/``.bin``, also ``{"model_state_dict": ...}``).

    Raises
    ------
    IncompatibleModelsError
        If the file's arrays do not fit the model (names missing, unknown, or shapes differ).
    """
    from combinability.checkpoint import read_state_dict
    from combinability.sets import infer_backend

    be = get_backend(backend or infer_backend(model))
    state = read_state_dict(path)
    current = be.state(model)
    if not any(k in current for k in state):  # e.g. saved from a DataParallel / compiled wrapper
        for prefix in ("module.", "_orig_mod.", "model."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        return be.with_state(model, state)
    except LayoutError as exc:
        raise IncompatibleModelsError(f"{path} does not fit {type(model).__name__}: {exc}") from None
