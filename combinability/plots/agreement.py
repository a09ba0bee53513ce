"""Functional agreement of the combinations with the end models (paper §6.1, fig 12)."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from combinability.plots._base import (
    DPI,
    SAMPLER_TITLES,
    alignments,
    describe,
    new_figure,
    parameter_dim,
    require,
    save_figure,
    select,
)
from combinability.plots.curves import PARAMETER_LABELS

__all__ = ["plot_agreement", "agreement_fractions", "CATEGORY_LABELS", "category_colour"]

#: Legend labels of the eight categories of :data:`combinability.metrics.AGREEMENT_CATEGORIES`.
CATEGORY_LABELS = {
    "both_correct": "same as A and B, correct",
    "both_wrong": "same as A and B, wrong",
    "a_only_correct": "same as A only, correct",
    "a_only_wrong": "same as A only, wrong",
    "b_only_correct": "same as B only, correct",
    "b_only_wrong": "same as B only, wrong",
    "neither_correct": "same as neither, correct",
    "neither_wrong": "same as neither, wrong",
}
_GROUP_COLOURS = {"both": "#4c72b0", "a_only": "#dd8452", "b_only": "#55a868", "neither": "#8c8c8c"}


def category_colour(category: str) -> tuple[float, float, float]:
    """Colour of a category: one hue per group (both, A only, B only, neither), lighter when correct."""
    group, _, verdict = category.rpartition("_")
    base = np.array(to_rgb(_GROUP_COLOURS.get(group, "#937860")))
    if verdict == "correct":
        return tuple(base + (1.0 - base) * 0.45)
    return tuple(base * 0.8)


def _ordered_categories(ds: xr.Dataset) -> list[str]:
    from combinability.metrics import AGREEMENT_CATEGORIES

    have = [str(c) for c in ds["category"].values]
    known = [c for c in AGREEMENT_CATEGORIES if c in have]
    return known + [c for c in have if c not in known]


def agreement_fractions(ds: xr.Dataset, *, split: str = "test") -> xr.DataArray:
    """Fraction of the split's examples in each agreement category, per parameter value.

    Counts are summed over the samples of each value and divided by the total count
    (so every parameter value's fractions sum to 1; unfinished samples hold no counts
    and drop out; a value with no finished sample is NaN).

    Returns
    -------
    xarray.DataArray
        Dims ``(<parameter>, category)`` (plus ``alignment`` first when present),
        categories in :data:`combinability.metrics.AGREEMENT_CATEGORIES` order.
    """
    require(ds, ("agreement",), "a sweep result with agreement counts (sweep(..., agreement=True))")
    param = parameter_dim(ds)
    counts = select(ds["agreement"], "split", split).astype(np.float64)
    if "sample" in counts.dims:
        counts = counts.sum("sample")
    total = counts.sum("category")
    frac = (counts / total.where(total > 0)).sel(category=_ordered_categories(ds))
    lead = ["alignment"] if "alignment" in frac.dims else []
    return frac.transpose(*lead, param, "category")


def plot_agreement(ds: xr.Dataset, path: str | os.PathLike | None = None, *, split: str = "test",
                   dpi: float = DPI) -> Figure:
    """Stacked areas of the eight agreement categories along the parameter (fig 12).

    For every parameter value, the examples of ``split`` are divided by whether the
    combination predicts what A and B predict (both), what A only, B only or neither
    predicts, each in a lighter (correct) and a darker (wrong) shade. One panel per
    alignment when the Dataset has an ``alignment`` dim. See :func:`agreement_fractions`
    for the drawn data.
    """
    frac = agreement_fractions(ds, split=split)
    param = parameter_dim(ds)
    sampler = str(ds.attrs.get("sampler", ""))
    names = alignments(frac)
    x = np.asarray(frac[param].values, dtype=float)
    fig, axes = new_figure(1, len(names), panel=(5.2, 4.0), extra=(2.4, 0.4), sharey=True)
    for ax, align in zip(axes[0], names, strict=True):
        part = frac if align is None else frac.sel(alignment=align)
        cats = [str(c) for c in part["category"].values]
        ax.stackplot(x, part.transpose("category", param).values, colors=[category_colour(c) for c in cats],
                     labels=[CATEGORY_LABELS.get(c, c) for c in cats], edgecolor="white", linewidth=0.3)
        ax.set_xlim(float(x.min()), float(x.max()))
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel(PARAMETER_LABELS.get(sampler, param))
        if align is not None:
            ax.set_title(align, fontsize="medium")
    n = int(select(ds["agreement"], "split", split).sum("category").max())
    axes[0, 0].set_ylabel(f"fraction of the {n:,} {split} examples")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right center", fontsize="small", frameon=False,
               title="combination predicts", title_fontsize="small")
    title = f"Agreement with the end models — {SAMPLER_TITLES.get(sampler, sampler or 'combinations')}"
    subject = describe(ds)
    fig.suptitle(f"{title}\n{subject}" if subject else title, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
