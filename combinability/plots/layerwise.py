"""Layer-wise barriers beside their second-order (curvature) prediction."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from combinability.plots._base import DPI, describe, new_figure, panel_letter, require, save_figure

__all__ = ["plot_layerwise_barriers"]

_TITLES = {"single": "one layer combined (others at A)", "cumulative": "layers up to this one combined"}


def plot_layerwise_barriers(ds: xr.Dataset, path: str | os.PathLike | None = None, *,
                            dpi: float = DPI) -> Figure:
    """One panel per mode: measured loss barrier and its second-order prediction per layer (bars).

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.layerwise_barriers`. The prediction's bars are left
        out when it was not computed (``curvature=False``); the curvature term alone is
        drawn as a black tick.
    path : path, optional
        Where to write the figure.
    """
    require(ds, ("loss_barrier", "predicted_barrier", "mode", "layer"), "a layer-wise barrier result")
    modes = [str(m) for m in ds["mode"].values]
    layers = [str(name) for name in ds["layer"].values]
    x = np.arange(len(layers))
    # few layers: the modes side by side; many (a transformer's modules): one above the other, the names slanted
    stacked = len(layers) > 8
    per_layer = 0.55 if stacked else 0.9
    fig, axes = new_figure(len(modes) if stacked else 1, 1 if stacked else len(modes),
                           panel=(min(max(4.0, per_layer * len(layers) + 1.5), 14.0),
                                  3.8 + (0.06 * max(len(n) for n in layers) if stacked else 0.0)), extra=(0.0, 0.5))
    axes = axes.reshape(1, -1)
    has_prediction = bool(np.isfinite(ds["predicted_barrier"].values).any())
    width = 0.38 if has_prediction else 0.6
    for k, (ax, mode) in enumerate(zip(axes[0], modes, strict=True)):
        row = ds.sel(mode=mode)
        ax.bar(x - (width / 2 if has_prediction else 0), row["loss_barrier"].values, width, color="C0",
               label="measured barrier")
        if has_prediction:
            ax.bar(x + width / 2, row["predicted_barrier"].values, width, color="C1",
                   label="second-order prediction")
            curv = row["curvature_gap"].max("lam").values
            ax.scatter(x + width / 2, curv, marker="_", s=200, color="black", zorder=3,
                       label="curvature term ½λ(1−λ)ΔᵀHΔ")
        ax.set_xticks(x, layers, rotation=45 if stacked else 30, ha="right", fontsize="small")
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_ylabel("loss barrier (nats)")
        ax.grid(True, axis="y", alpha=0.3)
        panel_letter(ax, "abcdefgh"[k], _TITLES.get(mode, mode))
    axes[0, 0].legend(fontsize="small", frameon=False)
    subject = describe(ds)
    head = f"Layer-wise loss barriers ({ds.attrs.get('alignment', '')}, {ds.attrs.get('split', '')})"
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
