"""Loss and accuracy along a sampler's parameter (paper figs 2–6, 8–10, 11a)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from combinability.errors import CorruptFileError
from combinability.plots._base import (
    DPI,
    SAMPLER_TITLES,
    alignment_colour,
    alignments,
    at_alignment,
    describe,
    new_figure,
    panel_letter,
    parameter_dim,
    require,
    save_figure,
    select,
    split_style,
    splits_present,
)
from combinability.results import barriers
from combinability.samplers.stitch import stitch_direction

__all__ = ["plot_sweep", "barrier_caption", "parameter_label", "stitch_lower", "PARAMETER_LABELS"]

#: Horizontal-axis labels per sampler (fallback: the parameter's name).
PARAMETER_LABELS = {
    "uniform": "s   (v ~ U[0.5 − s, 0.5 + s])",
    "subcube": "λ   (centre of the subcube)",
    "hyperplane": "α   (mean coefficient)",
    "bernoulli": "p   (Bernoulli parameter)",
    "stitch": "layer l   (layers below l from model B, above from A)",
    "minmax": "λ   (0: 'Max' model, 1: 'Min' model)",
    "linear": "λ   (interpolation coefficient)",
    "box": "s   (v ~ U[−s, s], centred at model A)",
}
_SYMBOLS = {"lam": "λ", "alpha": "α"}

# Where the end models sit on the parameter axis, per sampler ("last": the largest value).
_END_POSITIONS: dict[str, dict[str, float | str]] = {
    "linear": {"a": 0.0, "b": 1.0},
    "subcube": {"a": 0.0, "b": 1.0},
    "hyperplane": {"a": 0.0, "b": 1.0},
    "bernoulli": {"a": 0.0, "b": 1.0},
    "box": {"a": 0.0},
    "stitch": {"a": 0.0, "b": "last"},
}
_END_MARKERS = {"a": "s", "b": "D", "c": "^"}


def barrier_caption(ds: xr.Dataset, *, split: str = "test", alignment: str | None = None) -> str:
    """The paper's caption line for one alignment and split of a sweep result.

    Returns e.g. ``"Empirical loss barrier: 0.044, empirical accuracy barrier: 0.012"``
    (Def. 3.3, via :func:`combinability.results.barriers`). ``alignment`` defaults to
    ``"aligned"`` when the Dataset has that alignment, else ``"transitive"``, else its last one.
    """
    require(ds, ("loss", "accuracy", "loss_a", "accuracy_a"), "a sweep result")
    b = barriers(ds)
    names = alignments(b)
    if names != [None]:
        b = select(b, "alignment", _headline_alignment(names) if alignment is None else alignment)
    b = select(b, "split", split)
    return (f"Empirical loss barrier: {float(b['loss_barrier']):.3f}, "
            f"empirical accuracy barrier: {float(b['accuracy_barrier']):.3f}")


def _headline_alignment(names: list[str | None]) -> str | None:
    """The alignment the caption reports: aligned, else transitive (fig 11a), else the last one."""
    for name in ("aligned", "transitive"):
        if name in names:
            return name
    return names[-1]


def _end_names(ds: xr.Dataset, ends: list[str]) -> dict[str, str]:
    """Display names of the end models: A, B, C, or what a ``models`` attribute says ("lam=0: model B, ...")."""
    names = {m: m.upper() for m in ends}
    found = re.findall(r"lam=([01]): model (\w+)", str(ds.attrs.get("models", "")))
    for value, name in found:
        names["a" if value == "0" else "b"] = name
    return names


def stitch_lower(ds: xr.Dataset) -> str:
    """The model below the cut in a stitching result: ``"b"`` or ``"a"``.

    Read from the ``stitch_lower`` attribute (written by
    :func:`combinability.experiments.identity_stitching`), else from ``lower`` in the
    ``sampler_settings`` attribute (written by every sweep); ``"b"``, the only direction
    before ``Stitch(lower=...)`` existed, when neither says.

    Raises
    ------
    CorruptFileError
        If the attributes name a value other than ``"a"`` or ``"b"``.
    """
    lower = ds.attrs.get("stitch_lower")
    settings = ds.attrs.get("sampler_settings")
    if lower is None and isinstance(settings, str):
        try:
            lower = json.loads(settings).get("lower")
        except (ValueError, AttributeError):
            lower = None
    lower = "b" if lower is None else str(lower).strip().lower()
    if lower not in ("a", "b"):
        raise CorruptFileError(f"stitching result: the model below the cut is {lower!r}; valid values: 'a', 'b'")
    return lower


def parameter_label(ds: xr.Dataset) -> str:
    """The horizontal-axis label of a sweep result (for stitching: which model is below the cut)."""
    sampler = str(ds.attrs.get("sampler", ""))
    if sampler == "stitch":
        low = stitch_lower(ds)
        return f"layer l   (layers below l from model {low.upper()}, above from {'A' if low == 'b' else 'B'})"
    param = parameter_dim(ds)
    return PARAMETER_LABELS.get(sampler, _SYMBOLS.get(param, param))


def _end_positions(ds: xr.Dataset, sampler: str) -> dict[str, float | str]:
    """Where the end models sit on the parameter axis; for stitching, the ``lower`` model is at layer L."""
    if sampler == "stitch" and stitch_lower(ds) == "a":
        return {"a": "last", "b": 0.0}
    return _END_POSITIONS.get(sampler, {})


def _end_x(positions: dict[str, float | str], x: np.ndarray, end: str, layers: int | None = None) -> float | None:
    pos = positions.get(end)
    if pos == "last":  # stitching: the lower model is layer L (the number of layers), when the sweep reached it
        pos = float(np.max(x)) if layers is None else float(layers)
    if pos is None or not (np.min(x) - 1e-9 <= float(pos) <= np.max(x) + 1e-9):
        return None
    return float(pos)


def plot_sweep(ds: xr.Dataset, path: str | os.PathLike | None = None, *,
               splits: Sequence[str] = ("train", "test"), dpi: float = DPI) -> Figure:
    """Loss (a) and accuracy (b) of the combinations along the sampler's parameter.

    One colour per alignment (aligned blue, naive red, ...), one line style per split
    (test solid, train dashed); every sample a faint dot, their mean a line; the end
    models as markers (square A, diamond B) where the parameter places them, else in a
    shaded "ends" strip at the right. Each panel's legend gives the empirical barrier
    (Def. 3.3) of every alignment and split; the title repeats the paper's caption line.

    Parameters
    ----------
    ds : xarray.Dataset
        Result of :func:`combinability.sweep` or :func:`combinability.sweeps.sweep_pairs`.
    path : path, optional
        Write the figure there (atomically); the suffix picks the format (PNG by default).
    splits : sequence of str
        Splits to draw; those the Dataset lacks are skipped.
    dpi : float
        Resolution of the saved file.

    Returns
    -------
    matplotlib.figure.Figure
    """
    require(ds, ("loss", "accuracy", "loss_a", "loss_b", "accuracy_a", "accuracy_b"), "a sweep result")
    if "point" in ds["loss"].dims:
        raise CorruptFileError("this is a three-model (Triangle) result: draw it with plot_triangle")
    param = parameter_dim(ds)
    sampler = str(ds.attrs.get("sampler", ""))
    split_names = splits_present(ds, splits)
    align_names = alignments(ds)
    bar = barriers(ds)
    x = np.asarray(ds[param].values, dtype=float)
    span = float(np.ptp(x)) or 1.0
    ends = [m for m in ("a", "b", "c") if f"loss_{m}" in ds]
    names = ds.attrs.get("layer_names")
    layers = len(str(names).split(", ")) if names else None
    positions = _end_positions(ds, sampler)
    free_ends = [m for m in ends if _end_x(positions, x, m, layers) is None]
    n_samples = ds.sizes.get("sample", 1)

    fig, axes = new_figure(1, 2, panel=(5.6, 4.2), extra=(0.0, 0.9))
    for letter, (ax, metric) in zip("ab", zip(axes[0], ("loss", "accuracy"), strict=True), strict=True):
        handles = []
        for i, align in enumerate(align_names):
            colour = alignment_colour(align or "aligned", i)
            sub = at_alignment(ds, align)
            for j, split in enumerate(split_names):
                style = split_style(split, j)
                vals = sub[metric].sel(split=split).transpose(param, ...).values.reshape(len(x), -1)
                if n_samples > 1:
                    ax.scatter(np.repeat(x, vals.shape[1]), vals.ravel(), s=9, color=colour, alpha=0.35,
                               linewidths=0, zorder=2)
                with np.errstate(all="ignore"):
                    counts = np.sum(np.isfinite(vals), axis=1)
                    mean = np.where(counts > 0, np.nansum(vals, axis=1) / np.maximum(counts, 1), np.nan)
                ax.plot(x, mean, color=colour, linestyle=style, linewidth=1.6, zorder=3)
                for k, m in enumerate(ends):
                    xe = _end_x(positions, x, m, layers)
                    if xe is None:
                        xe = float(np.max(x)) + span * (0.07 + 0.05 * free_ends.index(m))
                    ax.plot([xe], [float(sub[f"{metric}_{m}"].sel(split=split))], linestyle="none",
                            marker=_END_MARKERS.get(m, "o"), markersize=6.5, color=colour,
                            markerfacecolor=colour if style == "-" else "white", markeredgewidth=1.3, zorder=4 + k)
            values = at_alignment(bar[f"{metric}_barrier"], align)
            text = ", ".join(f"{s} {float(values.sel(split=s)):.3f}" for s in split_names)
            handles.append(Line2D([], [], color=colour, linewidth=2.5,
                                  label=f"{align or ds.attrs.get('alignment', 'pair')}: {text}"))
        if param == "layer":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if free_ends:
            ticks = [t for t in ax.get_xticks() if np.min(x) - 1e-9 * span <= t <= np.max(x) + 1e-9 * span]
            ax.set_xticks(ticks)
            ax.axvspan(float(np.max(x)) + span * 0.04, float(np.max(x)) + span * (0.04 + 0.05 * (len(free_ends) + 1)),
                       color="0.92", zorder=0)
            ax.text(float(np.max(x)) + span * (0.04 + 0.025 * (len(free_ends) + 1)), 1.0, "ends",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize="small", color="0.35")
        ax.set_xlabel(parameter_label(ds))
        ax.set_ylabel("loss" if metric == "loss" else "accuracy")
        ax.grid(True, alpha=0.3)
        panel_letter(ax, letter, metric)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="small",
                  title=f"empirical {metric} barrier", title_fontsize="small", frameon=False)

    style_handles = [
        Line2D([], [], color="black", linestyle=split_style(s, j), marker="o", markersize=5,
               markerfacecolor="black" if split_style(s, j) == "-" else "white", label=s)
        for j, s in enumerate(split_names)
    ]
    end_names = _end_names(ds, ends)
    style_handles += [Line2D([], [], color="0.3", linestyle="none", marker=_END_MARKERS.get(m, "o"), markersize=6,
                             label=f"model {end_names[m]}") for m in ends]
    if n_samples > 1:
        style_handles.append(Line2D([], [], color="0.3", alpha=0.4, linestyle="none", marker="o", markersize=4,
                                    label=f"samples ({n_samples} per value); line: mean"))
    fig.legend(handles=style_handles, loc="outside lower center", ncols=len(style_handles), fontsize="small",
               frameon=False)
    title = SAMPLER_TITLES.get(sampler, sampler or "Combinations")
    subject = describe(ds)
    head = f"{title} — {subject}" if subject else title
    if ds.attrs.get("models"):
        head += f"\n{ds.attrs['models']}"
    if sampler == "stitch":
        head += f"\n{stitch_direction(stitch_lower(ds))}"
    caption_split = "test" if "test" in split_names else split_names[-1]
    caption_align = _headline_alignment(align_names)
    caption = barrier_caption(ds, split=caption_split, alignment=caption_align)
    where = ", ".join(s for s in (caption_align or ds.attrs.get("alignment"), caption_split) if s)
    fig.suptitle(f"{head}\n{caption} ({where})", fontsize="medium")
    save_figure(fig, path, dpi)
    return fig
