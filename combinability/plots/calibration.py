"""Temperature calibration along the linear path, across widths, and LEWC coefficients."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from combinability.plots._base import (
    DPI,
    alignment_colour,
    alignments,
    at_alignment,
    describe,
    new_figure,
    panel_letter,
    require,
    save_figure,
)

__all__ = ["plot_calibration", "plot_calibrated_width", "plot_lewc"]


def plot_calibration(ds: xr.Dataset, path: str | os.PathLike | None = None, *, dpi: float = DPI) -> Figure:
    """(a) Loss along the linear path without (solid) and with (dashed) calibration; (b) the fitted β.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.calibrate`; naive in red, aligned in blue.
    """
    require(ds, ("loss", "loss_calibrated", "inverse_temperature", "lam"), "a calibration result")
    lam = np.asarray(ds["lam"].values, dtype=float)
    fig, axes = new_figure(1, 2, panel=(5.0, 3.8), extra=(0.0, 0.5))
    for k, name in enumerate(alignments(ds)):
        row = at_alignment(ds, name)
        colour = alignment_colour(str(name), k)
        label = f"{name}: barrier {float(row['loss_barrier']):.3f} → {float(row['loss_barrier_calibrated']):.3f}"
        axes[0, 0].plot(lam, row["loss"].values, color=colour, marker="o", markersize=3, label=label)
        axes[0, 0].plot(lam, row["loss_calibrated"].values, color=colour, linestyle="--", marker="o", markersize=3)
        axes[0, 1].plot(lam, row["inverse_temperature"].values, color=colour, marker="o", markersize=3, label=name)
    axes[0, 0].set_ylabel("test loss (nats)")
    axes[0, 1].set_ylabel("fitted inverse temperature β")
    axes[0, 1].axhline(1.0, color="0.5", linewidth=0.8)
    handles, _ = axes[0, 0].get_legend_handles_labels()
    handles += [Line2D([], [], color="black", label="uncalibrated"),
                Line2D([], [], color="black", linestyle="--", label="calibrated (logits × β)")]
    axes[0, 0].legend(handles=handles, fontsize="small", frameon=False)
    for letter, ax, title in zip("ab", axes[0], ("loss along the linear path", "inverse temperature"), strict=True):
        ax.set_xlabel("coefficient of model B (λ)")
        ax.grid(True, alpha=0.3)
        panel_letter(ax, letter, title)
    subject = describe(ds)
    head = "Softmax-temperature calibration of the combined models"
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig


def plot_calibrated_width(ds: xr.Dataset, path: str | os.PathLike | None = None, *, dpi: float = DPI) -> Figure:
    """Linear-path loss barrier against width, without (solid) and with (dashed) calibration.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.experiments.width_ablation` with ``calibrate=True``.
    """
    require(ds, ("loss_barrier_linear", "loss_barrier_calibrated", "width"), "a calibrated width ablation")
    widths = np.asarray(ds["width"].values, dtype=float)
    fig, axes = new_figure(1, 1, panel=(5.6, 4.0), extra=(0.0, 0.4))
    ax = axes[0, 0]
    for k, name in enumerate(alignments(ds["loss_barrier_linear"])):
        colour = alignment_colour(str(name), k)
        ax.plot(widths, at_alignment(ds["loss_barrier_linear"], name).values, color=colour, marker="o",
                label=f"{name}")
        ax.plot(widths, at_alignment(ds["loss_barrier_calibrated"], name).values, color=colour, marker="s",
                linestyle="--", label=f"{name}, calibrated")
    if np.all(widths > 0) and widths.max() / widths.min() >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [f"{w:g}" for w in widths])
    ax.minorticks_off()
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("width multiplier")
    ax.set_ylabel("loss barrier of the linear path (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", frameon=False)
    subject = describe(ds)
    head = "Does temperature calibration close the barrier at large width?"
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig


def plot_lewc(ds: xr.Dataset, path: str | os.PathLike | None = None, *, dpi: float = DPI) -> Figure:
    """(a) Fitted ``a`` and ``b`` per feature point against LEWC's ``(1−λ)^ℓ``, ``λ^ℓ``; (b) R² of fit and prediction.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.lewc`; one colour per feature point, the
        prediction dotted.
    """
    require(ds, ("a", "b", "r2", "a_predicted", "b_predicted", "r2_predicted", "point", "lam"), "a LEWC result")
    lam = np.asarray(ds["lam"].values, dtype=float)
    fig, axes = new_figure(1, 2, panel=(5.0, 3.8), extra=(1.6, 0.5))
    for k, point in enumerate(str(p) for p in ds["point"].values):
        row, colour = ds.sel(point=point), f"C{k % 10}"
        axes[0, 0].plot(lam, row["a"].values, color=colour, marker="o", markersize=3, label=point)
        axes[0, 0].plot(lam, row["b"].values, color=colour, marker="^", markersize=3)
        axes[0, 0].plot(lam, row["a_predicted"].values, color=colour, linestyle=":")
        axes[0, 0].plot(lam, row["b_predicted"].values, color=colour, linestyle=":")
        axes[0, 1].plot(lam, row["r2"].values, color=colour, marker="o", markersize=3)
        axes[0, 1].plot(lam, row["r2_predicted"].values, color=colour, linestyle=":")
    axes[0, 0].set_ylabel("coefficient (o: a of f(θ_A), ^: b of f(θ_B))")
    axes[0, 1].set_ylabel("R²")
    axes[0, 1].set_ylim(max(-1.0, float(np.nanmin(ds["r2_predicted"].values)) - 0.05), 1.05)
    for letter, ax, title in zip("ab", axes[0], ("least-squares a, b (dotted: LEWC)", "R² (dotted: LEWC)"),
                                 strict=True):
        ax.set_xlabel("coefficient of model B (λ)")
        ax.grid(True, alpha=0.3)
        panel_letter(ax, letter, title)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False, title="feature point")
    subject = describe(ds)
    head = f"f(θ_λ) ≈ a f(θ_A) + b f(θ_B) per feature point ({ds.attrs.get('alignment', '')})"
    fig.suptitle(f"{head}\n{subject}" if subject else head, fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
