"""Naive against aligned barriers of several experiments, side by side."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from combinability.errors import CorruptFileError
from combinability.plots._base import (
    DPI,
    alignment_colour,
    alignments,
    new_figure,
    panel_letter,
    save_figure,
    select,
)
from combinability.results import barriers

__all__ = ["plot_barrier_summary", "barrier_table"]


def barrier_table(results: Mapping[str, xr.Dataset], *, split: str = "test") -> xr.Dataset:
    """``loss_barrier`` and ``accuracy_barrier`` with dims ``(experiment, alignment)`` for ``split``.

    Each value of ``results`` is a sweep result (its barriers are computed with
    :func:`combinability.results.barriers`) or already a barriers Dataset. Alignments
    an experiment lacks are NaN.
    """
    if not results:
        raise CorruptFileError("no results to summarise: pass a mapping of experiment name to Dataset")
    rows = []
    for name, ds in results.items():
        if not isinstance(ds, xr.Dataset):
            raise CorruptFileError(f"results[{name!r}] is a {type(ds).__name__}, not an xarray.Dataset")
        b = ds
        if "loss_barrier" not in ds:
            if "loss" not in ds:
                raise CorruptFileError(f"results[{name!r}] is neither a sweep result nor barriers (no loss variables)")
            b = barriers(ds)
        b = b[["loss_barrier", "accuracy_barrier"]]
        b = select(b, "split", split) if "split" in b.dims else b
        if "alignment" not in b.dims:
            b = b.expand_dims(alignment=[str(ds.attrs.get("alignment", "pair"))])
        rows.append(b.drop_vars([c for c in b.coords if c != "alignment"]))
    order = list(dict.fromkeys(str(a) for r in rows for a in r["alignment"].values))
    table = xr.concat(rows, dim=xr.DataArray(list(results), dims="experiment"), join="outer")
    return table.sel(alignment=order)


def plot_barrier_summary(results: Mapping[str, xr.Dataset], path: str | os.PathLike | None = None, *,
                         split: str = "test", dpi: float = DPI) -> Figure:
    """Grouped bars of the (a) loss and (b) accuracy barriers, one group per experiment, one bar per alignment.

    ``results`` maps an experiment's label (e.g. ``"uniform"``) to its sweep result or
    its barriers; see :func:`barrier_table` for the drawn numbers.
    """
    table = barrier_table(results, split=split)
    names = alignments(table)
    exps = [str(e) for e in table["experiment"].values]
    x = np.arange(len(exps), dtype=float)
    width = 0.8 / len(names)
    fig, axes = new_figure(1, 2, panel=(max(4.5, 0.9 * len(exps) + 1.5), 4.0))
    for letter, (ax, metric) in zip("ab", zip(axes[0], ("loss", "accuracy"), strict=True), strict=True):
        for i, align in enumerate(names):
            vals = table[f"{metric}_barrier"].sel(alignment=align).values
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=align,
                          color=alignment_colour(align, i))
            ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=1.5)
        ax.set_xticks(x, exps, rotation=30 if len(exps) > 4 else 0, ha="right" if len(exps) > 4 else "center")
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        ax.margins(y=0.12)
        ax.set_ylabel(f"{metric} barrier")
        ax.grid(True, axis="y", alpha=0.3)
        panel_letter(ax, letter, f"{metric} barrier ({split})")
    axes[0, 0].legend(fontsize="small", frameon=False)
    fig.suptitle("Empirical barriers (Def. 3.3) per experiment", fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
