"""Figures and a markdown summary of barriers from results files.

:func:`report` reads netCDF files written by the sweep and the experiments, draws
the matching figure of the paper for each (PNG), and writes ``summary.md`` with the
empirical barriers (Def. 3.3) of every sweep, naive against aligned.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from combinability.errors import ConfigurationError
from combinability.files import atomic_path
from combinability.results import barriers, open_results

__all__ = ["report", "figure_for", "barrier_table", "symmetry_table"]


def figure_for(ds: xr.Dataset, path: Path) -> list[Path]:
    """Draw the figure(s) that fit ``ds`` to ``path`` (suffixes added for extra figures)."""
    from combinability import plots

    kind = ds.attrs.get("combinability_format")
    written = []
    if kind == "sweep":
        if "point" in ds.dims:
            plots.plot_triangle(ds, path)
        elif "agreement" in ds:
            plots.plot_agreement(ds, path)
        else:
            plots.plot_sweep(ds, path)
        written.append(path)
    elif kind == "edge_lengths":
        plots.plot_edge_lengths(ds, path)
        written.append(path)
    elif kind == "robustness":
        plots.plot_robustness(ds, path)
        written.append(path)
    elif kind == "width_ablation":
        plots.plot_width_ablation(ds, path)
        written.append(path)
        if "loss_barrier_calibrated" in ds:
            from combinability.plots.calibration import plot_calibrated_width

            written.append(path.with_name(f"{path.stem}_calibrated{path.suffix}"))
            plot_calibrated_width(ds, written[-1])
    elif kind in _ANALYSIS_FIGURES:
        import importlib

        module, name = _ANALYSIS_FIGURES[kind].split(":")
        getattr(importlib.import_module(module), name)(ds, path)
        written.append(path)
    return written


#: Figures of the analyses (:mod:`combinability.analysis`), by ``combinability_format``.
_ANALYSIS_FIGURES = {
    "llfc": "combinability.plots.llfc:plot_llfc",
    "layerwise_barriers": "combinability.plots.layerwise:plot_layerwise_barriers",
    "calibration": "combinability.plots.calibration:plot_calibration",
    "lewc": "combinability.plots.calibration:plot_lewc",
    "asymmetry_comparison": "combinability.plots.asymmetry:plot_asymmetry",
    "aligners": "combinability.plots.aligners:plot_aligners",
    "symmetry_comparison": "combinability.plots.symmetries:plot_symmetries",
}


def _fmt(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def barrier_table(results: Iterable[tuple[str, xr.Dataset]], splits: Sequence[str] = ("test", "train")) -> str:
    """A markdown table of empirical loss and accuracy barriers, one row per sweep and split."""
    lines = [
        "| experiment | sampler | split | loss barrier (naive) | loss barrier (aligned) "
        "| accuracy barrier (naive) | accuracy barrier (aligned) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, ds in results:
        if ds.attrs.get("combinability_format") != "sweep" or "agreement" in ds:
            continue
        b = barriers(ds)
        for split in splits:
            if split not in b["split"].values:
                continue
            row = b.sel(split=split)

            def get(var: str, alignment: str, row: xr.Dataset = row, ds: xr.Dataset = ds) -> float:
                if "alignment" not in row.dims:  # one pair: its column by how it was aligned
                    naive = ds.attrs.get("alignment") == "naive"
                    return float(row[var]) if naive == (alignment == "naive") else float("nan")
                names = list(row["alignment"].values)
                key = alignment if alignment in names else ("transitive" if alignment == "aligned"
                                                            and "transitive" in names else None)
                return float(row[var].sel(alignment=key)) if key else float("nan")

            lines.append(
                f"| {name} | {ds.attrs.get('sampler', '')} | {split} | {_fmt(get('loss_barrier', 'naive'))} "
                f"| {_fmt(get('loss_barrier', 'aligned'))} | {_fmt(get('accuracy_barrier', 'naive'))} "
                f"| {_fmt(get('accuracy_barrier', 'aligned'))} |"
            )
    return "\n".join(lines) + "\n"


#: Column titles of :func:`symmetry_table`, by alignment.
_SYMMETRY_COLUMNS = {"naive": "naive", "permutation": "permutations", "all": "permutations + orthogonal",
                     "invertible": "+ invertible in heads", "learned": "learned maps"}


def symmetry_table(results: Iterable[tuple[str, xr.Dataset]], split: str = "test") -> str:
    """A markdown table of the loss barriers of symmetry comparisons, one row per result and sampler.

    Columns: the naive pair, the pair aligned with permutations only, and with every symmetry
    kind (:func:`combinability.experiments.symmetries.symmetry_comparison`), and the invertible
    and learned alignments where a result has them; empty when no result is such a comparison.
    """
    chosen = [(name, ds) for name, ds in results
              if ds.attrs.get("combinability_format") == "symmetry_comparison" and split in ds["split"].values]
    present = {str(a) for _, ds in chosen for a in ds["alignment"].values}
    columns = [a for a in _SYMMETRY_COLUMNS if a in ("naive", "permutation", "all") or a in present]
    lines = []
    for name, ds in chosen:
        b = ds["loss_barrier"].sel(split=split)
        alignments = [str(a) for a in ds["alignment"].values]
        for sampler in (str(v) for v in ds["sampler"].values):
            cells = [_fmt(float(b.sel(alignment=a, sampler=sampler))) if a in alignments else "–" for a in columns]
            lines.append(f"| {name} | {sampler} | {split} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ("| result | sampler | split | " + " | ".join(f"loss barrier ({_SYMMETRY_COLUMNS[c]})" for c in columns)
            + " |\n|---|---|---|" + "---:|" * len(columns) + "\n")
    return head + "\n".join(lines) + "\n"


def report(paths: Sequence[Path], out_dir: Path, *, title: str = "combinability report",
           extra_markdown: str = "") -> list[Path]:
    """Draw a figure per results file and write ``summary.md``; returns the paths written.

    ``paths`` may hold netCDF files or folders (every ``*.nc`` inside is used).
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(f for f in p.glob("*.nc") if not f.name.startswith(".")) if p.is_dir() else [p])
    if not files:
        raise ConfigurationError(f"no results files to report: {', '.join(map(str, paths)) or 'no paths'} holds no "
                                 "*.nc file (give result files, or folders holding them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    loaded = []
    for f in files:
        ds = open_results(f)
        loaded.append((f.stem, ds))
        written += figure_for(ds, out_dir / f"{f.stem}.png")
    summary = out_dir / "summary.md"
    text = f"# {title}\n\n## Empirical barriers (Def. 3.3), naive vs aligned\n\n" + barrier_table(loaded)
    text += "\nLoss barrier: worst loss of the sample minus the mean loss of the end models; accuracy barrier: mean "
    text += "accuracy of the end models minus the worst accuracy.\n"
    symmetries = symmetry_table(loaded)
    if symmetries:
        text += ("\n## Which symmetries alignment needs (transformers)\n\nLoss barriers of the naive pair, the pair "
                 "aligned with permutations only (heads, neurons, the residual stream permuted) and with every "
                 "symmetry kind (the residual stream rotated); where asked for, also with invertible maps inside "
                 "heads (weight matching) and with the maps learned on the midpoint loss (aligner 'maps'):\n\n"
                 + symmetries)
    if extra_markdown:
        text += "\n" + extra_markdown
    text += "\n## Figures\n\n" + "".join(f"- [{w.name}]({os.path.relpath(w, out_dir)})\n" for w in written)
    with atomic_path(summary) as tmp:
        tmp.write_text(text)
    return [*written, summary]
