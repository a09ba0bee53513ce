"""Which symmetries alignment needs: the linear path per alignment, and barriers per sampler."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from combinability.plots._base import DPI, new_figure, panel_letter, require, save_figure, select

__all__ = ["plot_symmetries"]

_WHAT = "a symmetry comparison (experiments.symmetries.symmetry_comparison)"
_LABELS = {"naive": "naive", "permutation": "permutations only", "all": "permutations + orthogonal",
           "activation": "activation matching", "invertible": "+ invertible maps in heads", "learned": "learned maps"}


def plot_symmetries(ds: xr.Dataset, path: str | os.PathLike | None = None, *, split: str = "test",
                    dpi: float = DPI) -> Figure:
    """(a) Test loss along the linear path per alignment; (b) loss barriers per sampler and alignment.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.symmetries.symmetry_comparison`.
    path : path, optional
        Write the figure there (PNG unless the suffix says otherwise).
    split : str
        Split whose numbers are drawn.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    CorruptFileError
        If ``ds`` is not such a result.
    UnknownNameError
        If ``split`` is not in it (the message lists the valid ones).
    """
    require(ds, ("loss", "loss_barrier", "alignment", "sampler"), _WHAT)
    ds = select(ds, "split", split)
    alignments = [str(a) for a in ds["alignment"].values]
    samplers = [str(s) for s in ds["sampler"].values]
    fig, axes = new_figure(1, 2, panel=(5.0, 3.7), extra=(0.4, 0.4 + 0.2 * -(-len(alignments) // 3)))
    ax = axes[0, 0]
    if "linear" in samplers:
        for k, name in enumerate(alignments):
            curve = ds["loss"].sel(alignment=name, sampler="linear").mean("sample").dropna("value")
            ax.plot(curve["value"].values, curve.values, marker="o", color=f"C{k}", label=_LABELS.get(name, name),
                    gid=f"path|{name}")
        ax.set_xlabel("λ (weight of B)")
        ax.set_ylabel(f"{split} loss")
        ax.grid(True, alpha=0.3)
    panel_letter(ax, "a", f"linear path ({split})")
    ax = axes[0, 1]
    width = 0.8 / len(alignments)
    x = np.arange(len(samplers))
    for k, name in enumerate(alignments):
        values = ds["loss_barrier"].sel(alignment=name).transpose("sampler").values
        ax.bar(x + (k - (len(alignments) - 1) / 2) * width, values, width, color=f"C{k}",
               label=_LABELS.get(name, name), gid=f"barrier|{name}")
    ax.set_xticks(x, samplers)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_ylabel("loss barrier")
    ax.grid(True, axis="y", alpha=0.3)
    panel_letter(ax, "b", f"loss barrier by sampler ({split})")
    # one legend for both panels (the colours are the alignments'), below them: inside a panel it hid the paths
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(alignments), 3),
               fontsize="small", frameon=False)
    save_figure(fig, path, dpi)
    return fig
