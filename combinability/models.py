"""Reference models: train, save and load them through any backend.

:func:`train` is the one call that turns an architecture name and a dataset name
into a trained native model; with ``checkpoint=`` it reuses a finished checkpoint
whose settings match instead of training again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from combinability.errors import CorruptFileError, IncompatibleVersionError
from combinability.plugins import get_architecture, get_backend
from combinability.training import RECIPES, TrainRecipe

if TYPE_CHECKING:
    from combinability.data.base import ArrayDataset

__all__ = ["train", "load_model", "save_model"]


def _dataset(data: str | ArrayDataset, split: str) -> ArrayDataset:
    if isinstance(data, str):
        from combinability.data import load_dataset

        return load_dataset(data, split)
    return data


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
            model, meta = be.load(checkpoint, arch)
        except (CorruptFileError, IncompatibleVersionError):
            model, meta = None, {}
        if model is not None and all(meta.get(k) == v for k, v in settings.items()):
            return model
    model = be.build(arch, width=width, num_classes=ds.num_classes, input_shape=ds.input_shape, seed=seed)
    model = be.train(model, ds, recipe, seed=seed, progress=progress)
    if checkpoint is not None:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        be.save(model, checkpoint, settings)
    return model


def save_model(model: Any, path: str | Path, *, backend: str = "torch", metadata: dict | None = None) -> None:
    """Write ``model`` to a checkpoint (temporary file, then rename)."""
    get_backend(backend).save(model, path, metadata or {})


def load_model(path: str | Path, *, backend: str = "torch", architecture: str | None = None) -> Any:
    """Read a checkpoint written by :func:`save_model` or :func:`train`."""
    arch = get_architecture(architecture) if architecture else None
    model, _ = get_backend(backend).load(path, arch)
    return model
