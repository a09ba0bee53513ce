"""§4.4 (fig 7): how the barriers of each combination scheme depend on network width."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.experiments.compare import RUN_OPTIONS, check_client, compare_alignment, reuse_or_run
from combinability.models import train
from combinability.pair import ModelPair
from combinability.results import barriers, provenance
from combinability.samplers import Bernoulli, Hyperplane, Linear, Subcube, Uniform
from combinability.samplers.base import Sampler

__all__ = ["width_ablation", "WIDTH_SAMPLERS"]

#: The schemes of fig 7.
WIDTH_SAMPLERS = (Linear(), Uniform(), Subcube(), Hyperplane(), Bernoulli())


def width_ablation(
    architecture: str,
    data: str,
    *,
    widths: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    samplers: Sequence[Sampler] = WIDTH_SAMPLERS,
    backend: str = "torch",
    seeds: tuple[int, int] = (0, 1),
    epochs: int | None = None,
    method: str = "weight",
    out: str | Path | None = None,
    model_dir: str | Path | None = None,
    values_per_sampler: int | None = 9,
    progress: bool = False,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    calibrate: bool = False,
    **sweep_kwargs: Any,
) -> xr.Dataset:
    """Train a pair at each width, align it, and measure every scheme's empirical barriers.

    Parameters
    ----------
    architecture, data : str
        Registered names.
    widths : sequence of float
        Width multipliers.
    samplers : sequence of Sampler
        Schemes to compare (fig 7: linear, uniform, subcube, hyperplane, Bernoulli).
    seeds : (int, int)
        Training seeds of models A and B.
    epochs : int, optional
        Training epochs (default: the architecture's recipe).
    method : str
        Alignment method.
    out : path, optional
        Write the result there; an existing result of the same settings is returned as
        is, another file is refused unless ``overwrite=True``.
    model_dir : path, optional
        Where trained checkpoints are kept and reused.
    values_per_sampler : int, optional
        Use this many equidistant values of each sampler's grid (barriers need the
        worst point, not the full curve); None for the full 25.
    attrs : mapping, optional
        Extra attributes stored in the result.
    calibrate : bool
        Also fit a softmax temperature to every combined model of the linear path
        (:func:`combinability.analysis.calibrate`, on a held-out half of the test split) and add the
        loss barriers on the other half with and without it: ``loss_barrier_linear``,
        ``loss_barrier_calibrated`` (dims ``(width, alignment)``) and
        ``inverse_temperature`` (``(width, alignment, lam)``).
    **sweep_kwargs
        Passed to :func:`combinability.sweep` (``samples``, ``limit``, ``splits``, ``client``, ...).

    Returns
    -------
    xarray.Dataset
        ``loss_barrier`` and ``accuracy_barrier`` with dims
        ``(width, sampler, alignment, split)``, and the end models' accuracies.
    """

    check_client(sweep_kwargs.get("client"), backend)  # the workers, before any training
    key = {"experiment": "width_ablation", "architecture": architecture, "data": data,
           "widths": [float(w) for w in widths], "samplers": [smp.settings for smp in samplers], "backend": backend,
           "seeds": list(seeds), "epochs": epochs, "method": method, "values_per_sampler": values_per_sampler,
           "sweep": {k: v for k, v in sweep_kwargs.items() if k not in RUN_OPTIONS}}
    if calibrate:  # only then: results of earlier runs keep their key
        key["calibrate"] = True

    def run(o: Path | None) -> xr.Dataset:
        rows = []
        end_acc = []
        calibrated: list[xr.Dataset] = []
        for width in widths:
            models = []
            for seed in seeds:
                # the name holds every training setting: a checkpoint of other settings is never met
                trained = f"{architecture}_{data}_w{width:g}_s{seed}" + (f"_e{epochs}" if epochs is not None else "")
                ckpt = Path(model_dir) / f"{trained}_{backend}.ckpt" if model_dir else None
                models.append(train(architecture, data, backend=backend, seed=seed, epochs=epochs, width=width,
                                    checkpoint=ckpt, progress=progress))
            pair = ModelPair(models[0], models[1], architecture=architecture, backend=backend).align(method)
            per_sampler = []
            for sampler in samplers:
                values = None
                if values_per_sampler is not None:
                    grid = np.asarray(sampler.grid_for(pair.layout))
                    idx = np.unique(np.round(np.linspace(0, len(grid) - 1, values_per_sampler)).astype(int))
                    values = list(grid[idx])
                ds = compare_alignment(pair, sampler, data=data, values=values, **sweep_kwargs)
                per_sampler.append(barriers(ds))
                if sampler is samplers[0]:
                    end_acc.append(ds[["accuracy_a", "accuracy_b"]].isel(alignment=0, drop=True))
            rows.append(xr.concat(per_sampler, dim=xr.DataArray([s.name for s in samplers], dims="sampler")))
            if calibrate:
                calibrated.append(_calibrated(pair, data, values_per_sampler, sweep_kwargs))
        ds = xr.concat(rows, dim=xr.DataArray(np.asarray(widths, dtype=float), dims="width"))
        ends = xr.concat(end_acc, dim=xr.DataArray(np.asarray(widths, dtype=float), dims="width"))
        ds = ds.merge(ends)
        if calibrate:
            ds = ds.merge(xr.concat(calibrated, dim=xr.DataArray(np.asarray(widths, dtype=float), dims="width")))
        ds.attrs = provenance(combinability_format="width_ablation", architecture=architecture, dataset=data,
                              backend=backend, seeds=list(seeds), method=method, **dict(attrs or {}))
        return ds

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _calibrated(pair: ModelPair, data: str, values_per_sampler: int | None,
                sweep_kwargs: Mapping[str, Any]) -> xr.Dataset:
    """Linear-path loss barriers with and without a fitted temperature (on halves of the test split)."""
    from combinability.analysis import calibrate

    grid = np.asarray(Linear().grid)
    if values_per_sampler is not None:
        grid = grid[np.unique(np.round(np.linspace(0, len(grid) - 1, values_per_sampler)).astype(int))]
    cal = calibrate(pair, data, lambdas=grid, limit=sweep_kwargs.get("limit"),
                    batch_size=sweep_kwargs.get("batch_size", 1000))
    return cal[["loss_barrier", "loss_barrier_calibrated", "inverse_temperature"]].rename(
        loss_barrier="loss_barrier_linear")
