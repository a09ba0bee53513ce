"""Networks with fewer symmetries (Lim et al., 2024): are asymmetric networks linearly connected?

Lim et al. ("The empirical impact of neural parameter symmetries") remove the permutation
symmetries of a network — W-Asymmetric (frozen random entries in each unit's fan-in) or
σ-Asymmetric (a frozen random gating of the nonlinearity) — and report that two such
networks trained from different seeds are linearly mode connected *without* any alignment.
:func:`asymmetry_comparison` trains a standard network and its asymmetric variants of the
same size (:mod:`combinability.zoo`), two seeds each, and measures the naive and the aligned
linear-path barriers of each. For the asymmetric networks the layer table's spec holds no
permutation, so "aligned" is the identity: the comparison is the standard network's aligned
barrier against the asymmetric networks' naive one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.errors import ConfigurationError
from combinability.experiments.compare import RUN_OPTIONS, check_client, compare_alignment, reuse_or_run
from combinability.models import train
from combinability.pair import ModelPair
from combinability.results import barriers, provenance
from combinability.samplers import Linear
from combinability.training import RECIPES, TrainRecipe

__all__ = ["asymmetry_comparison", "ASYMMETRY_ARCHITECTURES"]

#: The architectures compared by default: the MLP and its W- and σ-Asymmetric variants.
ASYMMETRY_ARCHITECTURES = ("mlp", "mlp_wasym", "mlp_sigmaasym")
_SUFFIXES = ("_wasym", "_sigmaasym")
LIM_2024 = ("Lim, D., Putterman, T., Walters, R., Jegelka, S., Maron, H. (2024). The empirical impact of neural "
            "parameter symmetries, or lack thereof. NeurIPS 2024.")


def _base(architecture: str) -> str:
    """The standard architecture an asymmetric one is a variant of (``mlp_wasym`` -> ``mlp``)."""
    for suffix in _SUFFIXES:
        if architecture.endswith(suffix):
            return architecture.removesuffix(suffix)
    return architecture


def _recipe(architecture: str, epochs: int | None) -> TrainRecipe:
    """The architecture's recipe, else its standard variant's (same size, same training), with ``epochs``."""
    recipe = RECIPES.get(architecture) or RECIPES.get(_base(architecture)) or TrainRecipe()
    return recipe if epochs is None else recipe.with_(epochs=epochs)


def _check(architectures: Sequence[str], seeds: Sequence[int], values: Sequence[float] | None) -> None:
    from combinability.plugins import get_architecture

    if len(architectures) == 0 or len(set(architectures)) != len(architectures):
        raise ConfigurationError(f"architectures must be one or more distinct names, got {list(architectures)}")
    for name in architectures:
        get_architecture(name)  # an unknown name lists the registered ones
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ConfigurationError(f"seeds must be two different training seeds (models A and B), got {list(seeds)}")
    if values is not None:
        v = np.asarray(values, dtype=float)
        if v.ndim != 1 or v.size < 2 or np.any((v < 0) | (v > 1)) or not np.all(np.isfinite(v)):
            raise ConfigurationError("values must be two or more interpolation weights in [0, 1], "
                                     f"got {list(np.ravel(v))}")


def _moved(pair: ModelPair) -> tuple[int, int]:
    """Units the aligner may permute (the spec's) and units it moved."""
    perm = pair.permutation or {}
    units = sum(len(p) for p in perm.values())
    moved = sum(int(np.sum(np.asarray(p) != np.arange(len(p)))) for p in perm.values())
    return units, moved


def asymmetry_comparison(
    data: str = "digits",
    *,
    architectures: Sequence[str] = ASYMMETRY_ARCHITECTURES,
    seeds: tuple[int, int] = (0, 1),
    width: float | None = None,
    epochs: int | None = None,
    backend: str = "torch",
    method: str = "weight",
    values: Sequence[float] | None = tuple(np.linspace(0, 1, 11)),
    out: str | Path | None = None,
    model_dir: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    **sweep_kwargs: Any,
) -> xr.Dataset:
    """Train each architecture twice, and measure naive and aligned linear-path barriers.

    Parameters
    ----------
    data : str
        Registered dataset (``"digits"``, ``"fashion_mnist"``, ...).
    architectures : sequence of str
        Registered architectures of one size; default the MLP, ``mlp_wasym`` and ``mlp_sigmaasym``.
    seeds : (int, int)
        Training seeds of models A and B (initialisation and batch order; the asymmetric
        networks' frozen arrays are the architecture's, shared by both).
    width : float, optional
        Width multiplier (default: each architecture's).
    epochs : int, optional
        Training epochs (default: the recipe of the architecture, or of its standard variant).
    backend : str
    method : str
        Alignment method (``"weight"``, ``"activation"``, ...); on a network without
        permutations every method is the identity.
    values : sequence of float, optional
        Points of the linear path (B's weight); None for :class:`~combinability.samplers.Linear`'s grid.
    out : path, optional
        Write the result there; an existing result of the same settings is returned as
        is, another file is refused unless ``overwrite=True``.
    model_dir : path, optional
        Where trained checkpoints are kept and reused.
    progress : bool
        Show progress bars while training.
    overwrite : bool
    attrs : mapping, optional
        Extra attributes stored in the result.
    **sweep_kwargs
        Passed to :func:`combinability.sweep` (``limit``, ``splits``, ``batch_size``, ``client``, ...).

    Returns
    -------
    xarray.Dataset
        ``loss`` and ``accuracy`` along the path (dims ``architecture, alignment, split, lam``),
        ``loss_barrier`` and ``accuracy_barrier`` (``architecture, alignment, split``), the end
        models' ``accuracy_a``/``accuracy_b`` and ``loss_a``/``loss_b``, and per architecture
        ``permutable_units`` (units the spec lets an aligner permute) and ``moved_units``
        (units the alignment moved).

    Raises
    ------
    ConfigurationError
        If the architectures are not distinct, the seeds not two different ones, or a value
        lies outside [0, 1]; :class:`~combinability.errors.UnknownNameError` for an unknown
        architecture. Both before any training.

    Examples
    --------
    >>> ds = asymmetry_comparison("digits", epochs=1, width=0.125, values=[0, 0.5, 1])  # doctest: +SKIP
    >>> ds["loss_barrier"].sel(split="test").to_pandas()  # doctest: +SKIP
    """
    _check(architectures, seeds, values)
    check_client(sweep_kwargs.get("client"), backend)  # the workers, before any training
    key = {"experiment": "asymmetry_comparison", "data": data, "architectures": list(architectures),
           "seeds": [int(s) for s in seeds], "width": width, "epochs": epochs, "backend": backend, "method": method,
           "values": None if values is None else [float(v) for v in values],
           "sweep": {k: v for k, v in sweep_kwargs.items() if k not in RUN_OPTIONS}}

    def run(o: Path | None) -> xr.Dataset:
        rows = [_one(name, data, seeds=seeds, width=width, epochs=epochs, backend=backend, method=method,
                     values=values, model_dir=model_dir, progress=progress, sweep_kwargs=sweep_kwargs)
                for name in architectures]
        ds = xr.concat(rows, dim=xr.DataArray(list(architectures), dims="architecture"))
        ds["architecture"].attrs = {"long_name": "architecture (standard or asymmetric)"}
        ds.attrs = provenance(combinability_format="asymmetry_comparison", dataset=data, backend=backend,
                              seeds=[int(s) for s in seeds], method=method, width="default" if width is None else width,
                              asymmetry_reference=LIM_2024,
                              **dict(attrs or {}))
        return ds

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _one(name: str, data: str, *, seeds: Sequence[int], width: float | None, epochs: int | None, backend: str,
         method: str, values: Sequence[float] | None, model_dir: str | Path | None, progress: bool,
         sweep_kwargs: Mapping[str, Any]) -> xr.Dataset:
    """One architecture: train A and B, align, sweep the linear path naive and aligned."""
    recipe = _recipe(name, epochs)
    models = []
    for seed in seeds:
        # the name holds every training setting: a checkpoint of other settings is never met
        stem = f"{name}_{data}_w{'default' if width is None else f'{width:g}'}_s{seed}_e{recipe.epochs}"
        ckpt = Path(model_dir) / f"{stem}_{backend}.ckpt" if model_dir else None
        models.append(train(name, data, backend=backend, seed=seed, width=width, recipe=recipe, checkpoint=ckpt,
                            progress=progress))
    pair = ModelPair(models[0], models[1], architecture=name, backend=backend).align(method)
    sweep = compare_alignment(pair, Linear(), data=data, values=None if values is None else list(values),
                              **sweep_kwargs)
    curves = sweep[["loss", "accuracy"]].mean("sample")
    ends = sweep[["loss_a", "loss_b", "accuracy_a", "accuracy_b"]]
    units, moved = _moved(pair)
    out = xr.merge([curves, ends, barriers(sweep)], compat="override", combine_attrs="drop")
    out["permutable_units"] = xr.DataArray(units, attrs={"long_name": "units an aligner may permute"})
    out["moved_units"] = xr.DataArray(moved, attrs={"long_name": "units moved by the alignment"})
    return out
