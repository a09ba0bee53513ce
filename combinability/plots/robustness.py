"""Robustness of the combination to corrupted unit pairings (paper §6.3, fig 14)."""

from __future__ import annotations

import math
import os

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from combinability.errors import UnknownNameError
from combinability.plots._base import DPI, describe, new_figure, require, save_figure

__all__ = ["plot_robustness", "robustness_curves"]

_METRICS = ("loss", "accuracy", "both")
_COLOURS = {"loss": "C0", "accuracy": "C1"}


def robustness_curves(ds: xr.Dataset, permutation: str, metric: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """The drawn curve of one permutation: ``(k, barrier)`` over the steps that were run (``k >= 0``)."""
    require(ds, (f"{metric}_barrier", "k"), "an alignment-robustness result (experiments.alignment_robustness)")
    valid = [str(p) for p in ds["permutation"].values]
    if permutation not in valid:
        raise UnknownNameError(f"unknown permutation {permutation!r}; valid: {', '.join(valid)}")
    row = ds.sel(permutation=permutation)
    k = np.asarray(row["k"].values)
    y = np.asarray(row[f"{metric}_barrier"].values, dtype=float)
    keep = (k >= 0) & np.isfinite(y)
    order = np.argsort(k[keep], kind="stable")
    return k[keep][order], y[keep][order]


def plot_robustness(ds: xr.Dataset, path: str | os.PathLike | None = None, *, metric: str = "loss",
                    dpi: float = DPI) -> Figure:
    """One panel per permutation (layer): the barrier after re-matching the ``k`` weakest pairs (fig 14).

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.alignment_robustness`.
    metric : {"loss", "accuracy", "both"}
        Barrier to draw; ``"both"`` puts the accuracy barrier on a right-hand axis.
        The unperturbed alignment's barrier is a dashed line.
    """
    if metric not in _METRICS:
        raise UnknownNameError(f"unknown metric {metric!r}; valid: {', '.join(_METRICS)}")
    metrics = ("loss", "accuracy") if metric == "both" else (metric,)
    for m in metrics:
        require(ds, (f"{m}_barrier", f"baseline_{m}_barrier", "k"),
                "an alignment-robustness result (experiments.alignment_robustness)")
    perms = [str(p) for p in ds["permutation"].values]
    n = len(perms)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, panel=(3.7, 2.9), extra=(0.0, 0.7))
    curves = {m: [robustness_curves(ds, p, m) for p in perms] for m in metrics}
    limits = {}
    for m in metrics:
        ys = np.concatenate([c[1] for c in curves[m]] + [[float(ds[f"baseline_{m}_barrier"]), 0.0]])
        lo, hi = float(np.min(ys)), float(np.max(ys))
        pad = 0.06 * (hi - lo or 1.0)
        limits[m] = (lo - pad, hi + pad)
    units = ds["units"].values if "units" in ds.coords or "units" in ds else [None] * n
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_visible(False)
            continue
        for j, m in enumerate(metrics):
            target = ax if j == 0 else ax.twinx()
            k, y = curves[m][idx]
            target.plot(k, y, color=_COLOURS[m], marker="o", markersize=3.5)
            target.axhline(float(ds[f"baseline_{m}_barrier"]), color=_COLOURS[m], linestyle="--", linewidth=1.0)
            target.set_ylim(*limits[m])
            if len(metrics) > 1:
                target.tick_params(axis="y", colors=_COLOURS[m], labelsize="small")
            else:
                target.tick_params(axis="y", labelsize="small")
            if j == 0 and idx % ncols == 0:
                target.set_ylabel(f"{m} barrier", color=_COLOURS[m] if len(metrics) > 1 else "black")
            if j == 1 and (idx % ncols == ncols - 1 or idx == n - 1):
                target.set_ylabel(f"{m} barrier", color=_COLOURS[m])
        count = units[idx] if units[idx] is not None else None
        ax.set_title(f"{perms[idx]}" + (f" (N = {int(count)})" if count is not None else ""), fontsize="small")
        if count is not None:
            ax.set_xlim(0, int(count) * 1.04 + 0.5)
        ax.tick_params(axis="x", labelsize="small")
        ax.grid(True, alpha=0.3)
        if idx // ncols == nrows - 1 or idx + ncols >= n:
            ax.set_xlabel("k (re-matched pairs)", fontsize="small")
    handles = [Line2D([], [], color=_COLOURS[m], marker="o", markersize=3.5, label=f"{m} barrier") for m in metrics]
    base = ", ".join(f"{float(ds[f'baseline_{m}_barrier']):.3f}" for m in metrics)
    handles += [Line2D([], [], color="0.3", linestyle="--", label=f"unperturbed alignment ({base})")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    subject = describe(ds)
    split = ds.attrs.get("split")
    head = "Re-matching the k least correlated unit pairs" + (f" ({split})" if split else "")
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
