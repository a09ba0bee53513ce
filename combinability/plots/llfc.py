"""LLFC: cosine similarity and scale of the combined model's features, per feature point."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from combinability.plots._base import DPI, describe, new_figure, panel_letter, require, save_figure

__all__ = ["plot_llfc"]


def plot_llfc(ds: xr.Dataset, path: str | os.PathLike | None = None, *, dpi: float = DPI) -> Figure:
    """(a) Mean cosine and (b) fitted scale ``c`` against the sampler's parameter, one line per feature point.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.llfc`. Several samples are drawn as their mean
        with a band from the smallest to the largest; each point's ``baseline_cosine``
        (``f(θ_A)`` against ``f(θ_B)``) is a dotted line of its colour.
    path : path, optional
        Where to write the figure (PNG unless the suffix says otherwise).
    """
    require(ds, ("cosine", "scale", "baseline_cosine", "point", "value"), "an LLFC result")
    values = np.asarray(ds["value"].values, dtype=float)
    fig, axes = new_figure(1, 2, panel=(5.0, 3.8), extra=(1.6, 0.4))
    points = [str(p) for p in ds["point"].values]
    for letter, ax, var in zip("ab", axes[0], ("cosine", "scale"), strict=True):
        for k, point in enumerate(points):
            da = ds[var].sel(point=point)
            colour = f"C{k % 10}"
            ax.plot(values, da.mean("sample").values, marker="o", markersize=3, color=colour, label=point)
            if da.sizes.get("sample", 1) > 1:
                ax.fill_between(values, da.min("sample").values, da.max("sample").values, color=colour, alpha=0.2)
            if var == "cosine":
                ax.axhline(float(ds["baseline_cosine"].sel(point=point)), color=colour, linestyle=":", linewidth=1)
        ax.set_xlabel(ds["value"].attrs.get("long_name", "value"))
        ax.set_ylabel("mean cosine similarity" if var == "cosine" else "least-squares scale c")
        ax.grid(True, alpha=0.3)
        panel_letter(ax, letter, "cosine(f(θ), combined end features)" if var == "cosine"
                     else "f(θ) ≈ c · combined end features")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False, title="feature point")
    subject = describe(ds)
    sampler = ds.attrs.get("sampler", "")
    head = f"Layer-wise linear feature connectivity ({sampler}, {ds.attrs.get('alignment', '')})"
    fig.suptitle(f"{head}\n{subject}; dotted: cosine of f(θ_A) and f(θ_B)" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
