"""Barriers of each combination scheme against the network width (paper §4.4, fig 7)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from combinability.plots._base import (
    DPI,
    describe,
    new_figure,
    panel_letter,
    require,
    save_figure,
    select,
)

__all__ = ["plot_width_ablation"]

_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def plot_width_ablation(ds: xr.Dataset, path: str | os.PathLike | None = None, *, split: str = "test",
                        alignments: Sequence[str] | None = ("aligned",), dpi: float = DPI) -> Figure:
    """(a) Loss barrier and (b) accuracy barrier of every sampler against the width multiplier.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.width_ablation`: ``loss_barrier`` and
        ``accuracy_barrier`` with dims ``(width, sampler, alignment, split)``.
    split : str
        Split whose barriers are drawn.
    alignments : sequence of str, optional
        Alignments to draw (default the aligned pairs, as in the paper; None for all),
        one line style each.
    """
    require(ds, ("loss_barrier", "accuracy_barrier", "width", "sampler"), "a width-ablation result")
    ds = select(ds, "split", split) if "split" in ds.dims else ds
    if "alignment" in ds.dims:
        names = [str(a) for a in ds["alignment"].values] if alignments is None else list(alignments)
        for a in names:
            select(ds, "alignment", a)
    else:
        names = [None]
    widths = np.asarray(ds["width"].values, dtype=float)
    samplers = [str(s) for s in ds["sampler"].values]
    fig, axes = new_figure(1, 2, panel=(5.2, 4.0), extra=(1.6, 0.3))
    styles = ["-", "--", ":", "-."]
    for letter, (ax, metric) in zip("ab", zip(axes[0], ("loss", "accuracy"), strict=True), strict=True):
        for k, sampler in enumerate(samplers):
            for j, align in enumerate(names):
                values = ds[f"{metric}_barrier"].sel(sampler=sampler)
                if align is not None:
                    values = values.sel(alignment=align)
                ax.plot(widths, values.transpose("width").values, color=f"C{k % 10}", marker=_MARKERS[k % 8],
                        linestyle=styles[j % 4], label=sampler if j == 0 else None, gid=f"{sampler}|{align}")
        if np.all(widths > 0) and widths.max() / widths.min() >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"{w:g}" for w in widths], minor=False)
        ax.minorticks_off()
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_xlabel("width multiplier")
        ax.set_ylabel(f"{metric} barrier")
        ax.grid(True, alpha=0.3)
        panel_letter(ax, letter, f"{metric} barrier")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if len(names) > 1:
        handles += [Line2D([], [], color="black", linestyle=styles[j % 4], label=str(a)) for j, a in enumerate(names)]
        labels += [str(a) for a in names]
    fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False, title="sampler")
    subject = describe(ds)
    which = ", ".join(str(a) for a in names if a is not None)
    head = "Empirical barriers against network width" + (f" ({which}, {split})" if which else f" ({split})")
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
