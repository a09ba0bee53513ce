"""Accuracy over the triangle of three-model combinations (paper §5.4, fig 11b)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.tri import Triangulation

from combinability.errors import CorruptFileError
from combinability.plots._base import DPI, describe, new_figure, require, save_figure, select

__all__ = ["plot_triangle", "triangle_coordinates", "triangle_values"]

_HEIGHT = math.sqrt(3.0) / 2.0


def triangle_coordinates(lam_b: Any, lam_c: Any) -> tuple[np.ndarray, np.ndarray]:
    """Map ``(λ_B, λ_C)`` of the simplex to the plane so that the corners form an equilateral triangle.

    Model A (``λ = (0, 0)``) goes to ``(0, 0)``, model B (``(1, 0)``) to ``(1, 0)`` and
    model C (``(0, 1)``) to ``(1/2, √3/2)``; the map is affine (barycentric coordinates).
    """
    b = np.asarray(lam_b, dtype=np.float64)
    c = np.asarray(lam_c, dtype=np.float64)
    return b + 0.5 * c, _HEIGHT * c


def triangle_values(ds: xr.Dataset, *, split: str = "test", alignment: str = "aligned",
                    metric: str = "accuracy") -> xr.Dataset:
    """The drawn data: ``lam_b``, ``lam_c``, ``x``, ``y`` and the sample-mean ``value`` per point."""
    require(ds, (metric, "lam_b", "lam_c"), "a three-model (Triangle) sweep result")
    if "point" not in ds[metric].dims:
        raise CorruptFileError(f"{metric} has no 'point' dim (dims {ds[metric].dims}): not a Triangle result")
    sub = select(ds[[metric, "lam_b", "lam_c"]], "split", split)
    if "alignment" in sub.dims:
        sub = select(sub, "alignment", alignment)
    value = sub[metric].mean("sample") if "sample" in sub[metric].dims else sub[metric]
    x, y = triangle_coordinates(sub["lam_b"].values, sub["lam_c"].values)
    return xr.Dataset({"lam_b": ("point", np.asarray(sub["lam_b"].values, dtype=float)),
                       "lam_c": ("point", np.asarray(sub["lam_c"].values, dtype=float)),
                       "x": ("point", x), "y": ("point", y), "value": ("point", value.values.astype(float))})


def plot_triangle(ds: xr.Dataset, path: str | os.PathLike | None = None, *, split: str = "test",
                  alignment: str = "aligned", dpi: float = DPI) -> Figure:
    """Heat map of the accuracy over the triangle of combinations of three models (fig 11b).

    ``θ = (1 − λ_B − λ_C) θ_A + λ_B π_B(θ_B) + λ_C π_C(θ_C)`` is drawn on an
    equilateral triangle (see :func:`triangle_coordinates`), corners labelled with the
    models, the best point marked ``Θ*``. The Dataset comes from
    :func:`combinability.experiments.three_models` (or a Triangle sweep).
    """
    pts = triangle_values(ds, split=split, alignment=alignment)
    x, y, z = pts["x"].values, pts["y"].values, pts["value"].values
    if np.sum(np.isfinite(z)) == 0:
        raise CorruptFileError("the triangle holds no finished evaluation (all accuracies are NaN)")
    fig, axes = new_figure(1, 1, panel=(6.2, 5.0))
    ax = axes[0, 0]
    tri = Triangulation(x, y)
    bad = ~np.isfinite(z)
    if bad.any():
        tri.set_mask(np.any(bad[tri.triangles], axis=1))
    # filled contours of the values interpolated linearly in each triangle: every colour is the colour map's
    # (Gouraud shading blends the corners' colours, which leaves the map between distant values)
    low, high = float(np.nanmin(z)), float(np.nanmax(z))
    levels = np.linspace(low, high, 65) if high > low else np.array([low - 1e-9, low + 1e-9])
    image = ax.tricontourf(tri, np.where(bad, np.nanmean(z), z), levels=levels, cmap="viridis")
    ax.plot([0, 1, 0.5, 0], [0, 0, _HEIGHT, 0], color="black", linewidth=1.0)
    ax.scatter(x[~bad], y[~bad], s=4, color="white", alpha=0.5, linewidths=0)
    where = alignment if "alignment" in ds.dims else str(ds.attrs.get("alignment", ""))
    names = ([r"$\Theta_A$", r"$\Theta_B$", r"$\Theta_C$"] if where == "naive"
             else [r"$\Theta_A$", r"$\pi_B(\Theta_B)$", r"$\pi_C(\Theta_C)$"])
    for (cx, cy), name, ha, va in zip([(0, 0), (1, 0), (0.5, _HEIGHT)], names,
                                      ["right", "left", "center"], ["top", "top", "bottom"], strict=True):
        ax.annotate(name, (cx, cy), xytext=(-4 if ha == "right" else 4 if ha == "left" else 0, 6 if va == "bottom"
                                            else -4), textcoords="offset points", ha=ha, va=va, fontsize="large")
    best = int(np.nanargmax(z))
    ax.plot([x[best]], [y[best]], marker="*", markersize=16, color="white", markeredgecolor="black", zorder=5)
    ax.annotate(r"$\Theta^*$", (x[best], y[best]), xytext=(9, 6), textcoords="offset points", fontsize="large",
                color="white", fontweight="bold", zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.55, "linewidth": 0})
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.1, _HEIGHT + 0.1)
    ax.set_aspect("equal")
    ax.set_axis_off()
    fig.colorbar(image, ax=ax, shrink=0.75, label=f"{split} accuracy", ticks=MaxNLocator(6))
    title = "Three-model combinations" + (f" ({where})" if where else "")
    subject = describe(ds)
    lam_b, lam_c = float(pts["lam_b"][best]), float(pts["lam_c"][best])
    best_line = (f"Θ*: λ_B = {lam_b:.2f}, λ_C = {lam_c:.2f}, {split} accuracy {z[best]:.4f} "
                 f"(worst {np.nanmin(z):.4f})")
    fig.suptitle("\n".join(s for s in (f"{title} — {subject}" if subject else title, best_line) if s),
                 fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
