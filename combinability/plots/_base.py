"""What every figure shares: figures without pyplot, atomic saving, checks, labels and colours.

Figures are built as :class:`matplotlib.figure.Figure` objects directly, never through
``pyplot``: no global state, no interactive backend, safe in threads and on machines
without a display. Saving picks the renderer from the file's suffix (Agg for PNG).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from combinability.errors import CorruptFileError, UnknownNameError
from combinability.files import atomic_path

__all__ = [
    "DPI",
    "SAMPLER_TITLES",
    "alignment_colour",
    "alignments",
    "at_alignment",
    "describe",
    "new_figure",
    "panel_letter",
    "parameter_dim",
    "require",
    "save_figure",
    "select",
    "split_style",
    "splits_present",
]

#: Default resolution of saved figures, dots per inch.
DPI = 150

#: Display names of the built-in samplers (paper section names in brackets).
SAMPLER_TITLES = {
    "uniform": "Uniform combinations",
    "subcube": "Subcube (cube intersect) combinations",
    "hyperplane": "Hyperplane (plane intersect) combinations",
    "bernoulli": "Bernoulli combinations",
    "stitch": "Identity stitching",
    "minmax": "Max → Min interpolation",
    "linear": "Linear interpolation",
    "box": "Θ_A-centred boxes",
    "triangle": "Three-model combinations",
}

_ALIGNMENT_COLOURS = {"aligned": "C0", "naive": "C3", "transitive": "C2", "direct": "C1"}
_SPARE_COLOURS = ("C4", "C5", "C6", "C8", "C9", "C7")
_SPLIT_STYLES = {"test": "-", "train": "--"}
_SPARE_STYLES = (":", "-.", (0, (5, 1, 1, 1)))


def new_figure(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = (5.0, 3.8),
               extra: tuple[float, float] = (0.0, 0.0), **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure of ``nrows × ncols`` panels of ``panel`` inches each (plus ``extra``).

    Returns the figure and a 2-D array of axes.
    """
    size = (panel[0] * ncols + extra[0], panel[1] * nrows + extra[1])
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike | None, dpi: float = DPI) -> None:
    """Write ``fig`` to ``path`` atomically (temporary file beside it, then rename); nothing if ``path`` is None.

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...); no suffix means PNG.
    """
    if path is None:
        return
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise UnknownNameError(f"cannot save a figure as {fmt!r} ({target}); valid suffixes: {', '.join(supported)}")
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
        os.chmod(tmp, mode)  # the temporary file is private (0600); give the figure ordinary permissions


def require(ds: Any, variables: Iterable[str], what: str) -> xr.Dataset:
    """Check that ``ds`` is a Dataset holding ``variables``; ``what`` names the expected kind of result."""
    if not isinstance(ds, xr.Dataset):
        raise CorruptFileError(f"expected an xarray.Dataset ({what}), got {type(ds).__name__}")
    missing = [v for v in variables if v not in ds.variables]
    if missing:
        have = ", ".join(map(str, ds.data_vars)) or "none"
        raise CorruptFileError(f"the Dataset is not {what}: it lacks {', '.join(missing)} (it has {have})")
    return ds


def select(obj: Any, dim: str, value: Any, what: str | None = None) -> Any:
    """``obj.sel({dim: value})`` with an :class:`UnknownNameError` listing the valid values."""
    valid = [v.item() if hasattr(v, "item") else v for v in obj[dim].values]
    if value not in valid:
        raise UnknownNameError(f"unknown {what or dim} {value!r}; valid: {', '.join(map(str, valid))}")
    return obj.sel({dim: value})


def parameter_dim(ds: xr.Dataset) -> str:
    """The swept parameter's dimension of a sweep result (``attrs["parameter"]``, else inferred)."""
    dims = [d for d in ds["loss"].dims if d not in ("split", "sample", "alignment")]
    name = ds.attrs.get("parameter")
    if isinstance(name, str) and name in dims:
        return name
    if len(dims) != 1:
        raise CorruptFileError(f"cannot tell the swept parameter of this Dataset: loss has dims {ds['loss'].dims}")
    return dims[0]


def alignment_colour(name: str, index: int) -> str:
    """Colour of an alignment (aligned blue, naive red, ...; others from a spare cycle)."""
    return _ALIGNMENT_COLOURS.get(str(name), _SPARE_COLOURS[index % len(_SPARE_COLOURS)])


def split_style(name: str, index: int) -> Any:
    """Line style of a split (test solid, train dashed, others from a spare cycle)."""
    return _SPLIT_STYLES.get(str(name), _SPARE_STYLES[index % len(_SPARE_STYLES)])


def alignments(obj: Any) -> list[str | None]:
    """Values of the ``alignment`` dim, or ``[None]`` when there is none."""
    return [str(a) for a in obj["alignment"].values] if "alignment" in obj.dims else [None]


def at_alignment(obj: Any, alignment: str | None) -> Any:
    """``obj`` at one alignment (unchanged when ``alignment`` is None)."""
    return obj if alignment is None else obj.sel(alignment=alignment)


def describe(ds: xr.Dataset) -> str:
    """``architecture (width ×w) on dataset`` from a result's attributes ('' when they are missing)."""
    attrs = ds.attrs
    parts = []
    arch = attrs.get("architecture")
    if arch:
        width = attrs.get("width")
        w = f" (width ×{float(width):g})" if width is not None and np.isfinite(width) and float(width) != 1 else ""
        parts.append(f"{arch}{w}")
    if attrs.get("dataset"):
        parts.append(f"on {attrs['dataset']}")
    return " ".join(parts)


def splits_present(obj: Any, splits: Sequence[str]) -> list[str]:
    """The requested splits that ``obj`` holds, in the requested order; error if none."""
    if isinstance(splits, str):
        splits = (splits,)
    have = [str(s) for s in obj["split"].values]
    out = [s for s in splits if s in have]
    if not out:
        raise UnknownNameError(f"none of the splits {list(splits)} is in the Dataset; valid: {', '.join(have)}")
    return out


def panel_letter(ax: Axes, letter: str, title: str) -> None:
    """Title a panel like the paper: ``(a) loss``."""
    ax.set_title(f"({letter}) {title}", loc="left", fontsize="medium")
