"""The aligners compared on the same models: barriers per aligner and scheme,
and the merged model of each many-model method against the number of models."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from combinability.errors import CorruptFileError
from combinability.plots._base import DPI, describe, new_figure, panel_letter, require, save_figure, select

__all__ = ["plot_aligners"]

_WHAT = "an aligner comparison (experiments.compare_aligners)"
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def _seconds(t: float) -> str:
    """A wall time for a legend: two significant digits below 10 s, whole seconds above."""
    return f"{t:.2g} s" if t < 10 else f"{t:.0f} s"


def _bars(ax: Axes, ds: xr.Dataset, metric: str) -> None:
    """Grouped bars: one group per scheme, one bar per aligner."""
    schemes = [str(s) for s in ds["scheme"].values]
    aligners = [str(a) for a in ds["aligner"].values]
    width = 0.8 / len(aligners)
    x = np.arange(len(schemes))
    for k, aligner in enumerate(aligners):
        values = ds[f"{metric}_barrier"].sel(aligner=aligner).transpose("scheme").values
        ax.bar(x + (k - (len(aligners) - 1) / 2) * width, values, width, color=f"C{k % 10}", label=aligner,
               gid=f"{metric}|{aligner}")
    ax.set_xticks(x, schemes)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    _clip_outlier(ax, ds[f"{metric}_barrier"], x, width)
    ax.set_ylabel(f"{metric} barrier")
    ax.grid(True, axis="y", alpha=0.3)


def _clip_outlier(ax: Axes, values: xr.DataArray, x: np.ndarray, width: float) -> None:
    """When one aligner's bars dwarf the others (the naive pair's, typically), cut the axis above the
    others and write the cut bars' values at the top, so the differences between the rest stay visible."""
    aligners = [str(a) for a in values["aligner"].values]
    highs = np.array([np.nanmax(values.sel(aligner=a).values) for a in aligners], dtype=float)
    if len(aligners) < 2 or not np.all(np.isfinite(highs)):
        return
    order = np.argsort(highs)
    top, second = highs[order[-1]], max(highs[order[-2]], 0.0)
    if top <= 2.5 * second or second <= 0:
        return
    limit = 1.3 * second
    low = min(0.0, float(np.nanmin(values.values)))
    ax.set_ylim(low - 0.03 * (limit - low), limit)
    k = int(order[-1])
    offset = (k - (len(aligners) - 1) / 2) * width
    for i, v in enumerate(values.sel(aligner=aligners[k]).transpose("scheme").values):
        if v > limit:
            ax.text(x[i] + offset, limit, f"{v:.2f}↑", ha="center", va="top", rotation=90,
                    fontsize="x-small", color="white", fontweight="bold")


def _against_n(ax: Axes, ds: xr.Dataset, variable: str, members: str | None) -> None:
    """One line per many-model method against the number of models (the members' mean dashed)."""
    ns = np.asarray(ds["n_models"].values, dtype=int)
    for k, method in enumerate(str(m) for m in ds["merge_method"].values):
        ax.plot(ns, ds[variable].sel(merge_method=method).transpose("n_models").values, marker=_MARKERS[k % 8],
                color=f"C{k % 10}", label=method, gid=f"{variable}|{method}")
    if members is not None:
        ax.plot(ns, ds[members].transpose("n_models").values, color="0.3", linestyle="--",
                label="members (mean)", gid=f"{members}|members")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("number of models N")
    ax.grid(True, alpha=0.3)


def plot_aligners(ds: xr.Dataset, path: str | os.PathLike | None = None, *, split: str = "test",
                  dpi: float = DPI) -> Figure:
    """(a, b) Loss and accuracy barriers per aligner and scheme; (c, d) merged models against N.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.compare_aligners`. Either part may be
        missing; the figure then has one row.
    path : path, optional
        Write the figure there (PNG unless the suffix says otherwise).
    split : str
        Split whose numbers are drawn.

    Returns
    -------
    matplotlib.figure.Figure
        Top row: grouped bars (schemes on the x axis, one bar per aligner; the legend
        gives each aligner's wall time). Bottom row: (c) the merged model's accuracy and
        (d) the worst pairwise linear-path loss barrier, against the number of models,
        one line per many-model method.

    Raises
    ------
    CorruptFileError
        If ``ds`` is not such a result.
    UnknownNameError
        If ``split`` is not in it (the message lists the valid ones).
    """
    if not isinstance(ds, xr.Dataset):
        require(ds, (), _WHAT)
    pair = "loss_barrier" in ds and "aligner" in ds.dims
    many = "merged_accuracy" in ds and "n_models" in ds.dims
    if not (pair or many):
        raise CorruptFileError(f"the Dataset is not {_WHAT}: it has neither loss_barrier by aligner nor "
                               f"merged_accuracy by n_models (it has {', '.join(map(str, ds.data_vars)) or 'none'})")
    if pair:
        require(ds, ("accuracy_barrier", "scheme"), _WHAT)
    if many:
        require(ds, ("worst_pair_loss_barrier", "merge_method"), _WHAT)
    ds = select(ds, "split", split)
    rows = int(pair) + int(many)
    fig, axes = new_figure(rows, 2, panel=(5.4, 3.7), extra=(1.9, 0.4))
    row = 0
    if pair:
        for letter, (ax, metric) in zip("ab", zip(axes[row], ("loss", "accuracy"), strict=True), strict=True):
            _bars(ax, ds, metric)
            panel_letter(ax, letter, f"{metric} barrier by scheme ({split})")
        handles, labels = axes[row, 0].get_legend_handles_labels()
        if "align_time" in ds:
            labels = [f"{a} ({_seconds(float(ds['align_time'].sel(aligner=a)))})" for a in labels]
        axes[row, 1].legend(handles, labels, title="aligner (time)", fontsize="small", frameon=False,
                            loc="upper left", bbox_to_anchor=(1.01, 1.0))
        row += 1
    if many:
        letters = "cd" if pair else "ab"
        _against_n(axes[row, 0], ds, "merged_accuracy", "members_accuracy" if "members_accuracy" in ds else None)
        axes[row, 0].set_ylabel("accuracy of the merged model")
        panel_letter(axes[row, 0], letters[0], f"merged model (average of the aligned), {split}")
        _against_n(axes[row, 1], ds, "worst_pair_loss_barrier", None)
        axes[row, 1].axhline(0.0, color="0.3", linewidth=0.8)
        axes[row, 1].set_ylabel("worst pairwise loss barrier")
        panel_letter(axes[row, 1], letters[1], "worst linear-path barrier over pairs")
        handles, labels = axes[row, 0].get_legend_handles_labels()
        axes[row, 1].legend(handles, labels, title="many-model method", fontsize="small", frameon=False,
                            loc="upper left", bbox_to_anchor=(1.01, 1.0))
    subject = describe(ds)
    head = "Aligners compared on the same models"
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
