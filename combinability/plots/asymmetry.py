"""Standard against asymmetric networks along the linear path, naive and aligned (Lim et al., 2024)."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from combinability.plots._base import DPI, new_figure, panel_letter, require, save_figure, select

__all__ = ["plot_asymmetry"]

_STYLES = {"aligned": "-", "naive": "--"}


def plot_asymmetry(ds: xr.Dataset, path: str | os.PathLike | None = None, *, split: str = "test",
                   dpi: float = DPI) -> Figure:
    """(a) Loss and (b) accuracy along the linear path, (c) the barriers, per architecture and alignment.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.asymmetry_comparison`: ``loss``, ``accuracy``
        (dims ``architecture, alignment, split, lam``) and ``loss_barrier``, ``accuracy_barrier``.
    path : path, optional
        Write the figure there (atomically).
    split : str
        Split drawn.

    Returns
    -------
    matplotlib.figure.Figure
        One colour per architecture; naive pairs dashed (hatched bars), aligned pairs solid.
    """
    require(ds, ("loss", "accuracy", "loss_barrier", "accuracy_barrier", "architecture", "alignment", "lam"),
            "an asymmetry-comparison result")
    ds = select(ds, "split", split)
    archs = [str(a) for a in ds["architecture"].values]
    aligns = [str(a) for a in ds["alignment"].values]
    lam = np.asarray(ds["lam"].values, dtype=float)
    fig, axes = new_figure(1, 3, panel=(4.4, 3.8), extra=(1.8, 0.4))
    for letter, ax, metric in zip("ab", axes[0, :2], ("loss", "accuracy"), strict=True):
        for k, arch in enumerate(archs):
            for align in aligns:
                y = ds[metric].sel(architecture=arch, alignment=align).transpose("lam").values
                ax.plot(lam, y, color=f"C{k % 10}", linestyle=_STYLES.get(align, ":"), marker="o", markersize=3,
                        gid=f"{arch}|{align}")
        ax.set_xlabel("λ (weight of model B)")
        ax.set_ylabel(f"{split} {metric}")
        ax.grid(True, alpha=0.3)
        panel_letter(ax, letter, f"{metric} along the linear path")
    _bars(axes[0, 2], ds, archs, aligns)
    handles = [Line2D([], [], color=f"C{k % 10}", label=a) for k, a in enumerate(archs)]
    handles += [Line2D([], [], color="black", linestyle=_STYLES.get(a, ":"), label=a) for a in aligns]
    fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(f"Standard vs asymmetric networks: linear interpolation, naive and aligned ({split})\n"
                 f"on {ds.attrs.get('dataset', '?')}", fontsize="medium")
    save_figure(fig, path, dpi)
    return fig


def _bars(ax, ds: xr.Dataset, archs: list[str], aligns: list[str]) -> None:
    """Accuracy barrier bars: one group per architecture, one bar per alignment."""
    width = 0.8 / max(1, len(aligns))
    x = np.arange(len(archs))
    for j, align in enumerate(aligns):
        values = [float(ds["accuracy_barrier"].sel(architecture=a, alignment=align)) for a in archs]
        ax.bar(x + (j - (len(aligns) - 1) / 2) * width, values, width, color=[f"C{k % 10}" for k in range(len(archs))],
               hatch="//" if align == "naive" else None, edgecolor="black", linewidth=0.6, label=align, gid=align)
    ax.set_xticks(x, archs, rotation=20)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_ylabel("accuracy barrier")
    ax.grid(True, axis="y", alpha=0.3)
    panel_letter(ax, "c", "accuracy barrier (hatched: naive)")
