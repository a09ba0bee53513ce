"""Edge lengths of the hyperrectangle spanned by two models (paper §6.2, fig 13)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from combinability.errors import UnknownNameError
from combinability.plots._base import DPI, alignment_colour, alignments, describe, new_figure, require, save_figure

__all__ = ["plot_edge_lengths", "edge_histograms"]


def _layer_index(ds: xr.Dataset, layer: int | str) -> int:
    names = [str(n) for n in ds["layer_name"].values] if "layer_name" in ds.coords else []
    n = ds.sizes["layer"]
    if isinstance(layer, str):
        if layer in names:
            return names.index(layer)
        raise UnknownNameError(f"unknown layer {layer!r}; valid: {', '.join(names) or f'indices 0..{n - 1}'}")
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or not -n <= int(layer) < n:
        raise UnknownNameError(f"unknown layer {layer!r}; valid: indices 0..{n - 1} or names {', '.join(names)}")
    return int(layer) % n


def edge_histograms(ds: xr.Dataset, layers: Sequence[int | str] | str | None = None) -> xr.Dataset:
    """The drawn histograms: ``count`` and ``overflow`` with dims ``(panel, alignment[, bin])``.

    ``layers=None`` gives one panel summed over every layer; ``"all"`` one panel per
    layer; a sequence of layer indices or names one panel each. The ``panel`` coordinate
    holds the panel titles.
    """
    require(ds, ("count", "bin_edges"), "an edge-length result (experiments.edge_lengths)")
    count = ds["count"]
    overflow = ds["overflow"] if "overflow" in ds else xr.zeros_like(count.isel(bin=0, drop=True))
    names = [str(n) for n in ds["layer_name"].values] if "layer_name" in ds.coords else None
    if layers is None:
        picks, titles = [list(range(ds.sizes["layer"]))], ["all layers"]
    else:
        if isinstance(layers, str):
            if layers != "all":
                raise UnknownNameError(f"layers must be None, 'all' or a sequence of layers, got {layers!r}")
            layers = list(range(ds.sizes["layer"]))
        idx = [_layer_index(ds, layer) for layer in layers]
        picks = [[i] for i in idx]
        titles = [names[i] if names else f"layer {i}" for i in idx]
    parts = [xr.Dataset({"count": count.isel(layer=p).sum("layer"), "overflow": overflow.isel(layer=p).sum("layer")})
             for p in picks]
    out = xr.concat(parts, dim="panel").drop_vars(["layer_name"], errors="ignore")
    return out.assign_coords(panel=titles)


def plot_edge_lengths(ds: xr.Dataset, path: str | os.PathLike | None = None, *,
                      layers: Sequence[int | str] | str | None = None, log: bool = False,
                      dpi: float = DPI) -> Figure:
    """Histograms of the edge lengths ``|θ_A − θ_B|``, naive against aligned (fig 13).

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.edge_lengths`.
    layers : None, "all" or sequence of int or str
        ``None``: one histogram over the whole network; ``"all"``: one per layer; or the
        layers (indices or names) to show, one panel each.
    log : bool
        Logarithmic count axis.
    """
    hist = edge_histograms(ds, layers)
    edges = np.asarray(ds["bin_edges"].values, dtype=float)
    n = hist.sizes["panel"]
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, panel=(4.6, 3.3) if n > 1 else (7.0, 4.4), extra=(0.0, 0.5))
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.set_visible(False)
            continue
        panel = hist.isel(panel=k)
        for i, align in enumerate(alignments(panel)):
            part = panel if align is None else panel.sel(alignment=align)
            counts = part["count"].values.astype(float)
            total = counts.sum()
            over = int(part["overflow"])
            label = str(align or ds.attrs.get("alignment", "pair"))
            if over and total:
                label += f" ({100 * over / total:.1f}% beyond {edges[-1]:.3g}, in the last bin)"
                label = label if n == 1 else label.replace(", in the last bin", ": last bin")
            ax.stairs(counts, edges, fill=True, alpha=0.35, color=alignment_colour(label.split()[0], i))
            ax.stairs(counts, edges, color=alignment_colour(label.split()[0], i), linewidth=1.2, label=label)
        ax.set_title(str(panel["panel"].values), fontsize="medium")
        ax.set_xlim(edges[0], edges[-1])
        if n > 1:
            ax.xaxis.set_major_locator(MaxNLocator(5))
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if k % ncols == 0:
            ax.set_ylabel("number of weights")
        if k // ncols == nrows - 1 or k + ncols >= n:
            ax.set_xlabel("edge length |θ_A − θ_B|")
        ax.legend(fontsize="x-small" if n > 1 else "small", frameon=False)
    subject = describe(ds)
    title = "Edge lengths of the hyperrectangle spanned by the two models"
    fig.suptitle(f"{title}\n{subject}" if subject else title, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
