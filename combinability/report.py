"""Figures and a markdown summary of barriers from results files.

:func:`report` reads netCDF files written by the sweep and the experiments, draws
the matching figure of the paper for each (PNG), and writes ``summary.md`` with the
empirical barriers (Def. 3.3) of every sweep, naive against aligned.

A report never replaces a file it did not write: the last line of ``summary.md`` is a marker
(an HTML comment, invisible when rendered) holding the SHA-256 of the summary above it and of
every figure written with it. Running the same report again replaces exactly those files, as
long as their bytes are unchanged; anything else in the output folder (the user's notes, a
figure of their own, a summary they edited) is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from combinability.errors import ConfigurationError, OutputExistsError, OutputNotWritableError
from combinability.files import atomic_path, check_writable
from combinability.results import barriers, is_complete, progress_of, read_results

__all__ = ["report", "figure_for", "barrier_table", "symmetry_table"]


def figure_paths(ds: xr.Dataset, path: Path) -> list[Path]:
    """The files :func:`figure_for` writes for ``ds`` at ``path`` (none for a result it does not draw)."""
    kind = ds.attrs.get("combinability_format")
    if kind not in ("sweep", "edge_lengths", "robustness", "width_ablation", *_ANALYSIS_FIGURES):
        return []
    if kind == "width_ablation" and "loss_barrier_calibrated" in ds:
        return [path, path.with_name(f"{path.stem}_calibrated{path.suffix}")]
    return [path]


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
        if ds.attrs.get("combinability_format") != "sweep":
            continue
        b = barriers(ds)
        # the aligned column: one row per alignment that is not naive (transitivity: the direct and the
        # transitive alignment), labelled by it where there are several
        aligned = [a for a in (b["alignment"].values.tolist() if "alignment" in b.dims else []) if a != "naive"]
        for split in splits:
            if split not in b["split"].values:
                continue
            row = b.sel(split=split)
            for key in aligned or [None]:
                label = f"{name} ({key})" if len(aligned) > 1 else name

                def get(var: str, alignment: str, row: xr.Dataset = row, ds: xr.Dataset = ds,
                        key: str | None = key) -> float:
                    if "alignment" not in row.dims:  # one pair: its column by how it was aligned
                        naive = ds.attrs.get("alignment") == "naive"
                        return float(row[var]) if naive == (alignment == "naive") else float("nan")
                    if alignment == "naive":
                        names = row["alignment"].values.tolist()
                        return float(row[var].sel(alignment="naive")) if "naive" in names else float("nan")
                    return float(row[var].sel(alignment=key)) if key else float("nan")

                lines.append(
                    f"| {label} | {ds.attrs.get('sampler', '')} | {split} | {_fmt(get('loss_barrier', 'naive'))} "
                    f"| {_fmt(get('loss_barrier', 'aligned'))} | {_fmt(get('accuracy_barrier', 'naive'))} "
                    f"| {_fmt(get('accuracy_barrier', 'aligned'))} |"
                )
    return "\n".join(lines) + "\n"


#: Column titles of :func:`symmetry_table`, by alignment.
_SYMMETRY_COLUMNS = {"naive": "naive", "permutation": "permutations", "all": "permutations + orthogonal",
                     "activation": "by activations", "invertible": "+ invertible in heads",
                     "learned": "learned maps"}


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


#: The first words of ``summary.md``'s last line: the marker of a report's own files.
_MARKER = "<!-- combinability report, its own files (sha256): "


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _own_files(out_dir: Path) -> dict[str, str]:
    """The files of ``out_dir`` a report wrote, by name, with their SHA-256 then (from ``summary.md``'s marker).

    Empty when ``summary.md`` is absent or has no marker. When ``summary.md`` was edited since (its hash
    differs), it is left out: the figures the marker names still count as the report's where their hashes match.
    """
    summary = out_dir / "summary.md"
    try:
        text = summary.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    at = text.rfind("\n" + _MARKER)  # the marker line, wherever a user's edit left it (lines added after it)
    if at < 0:
        return {}
    body, (last, _, after) = text[:at], text[at + 1:].partition("\n")
    if not last.endswith(" -->"):
        return {}
    try:
        own = json.loads(last[len(_MARKER):-len(" -->")])
    except json.JSONDecodeError:
        return {}
    if not isinstance(own, dict):
        return {}
    files = {str(k): str(v) for k, v in own.items()}
    if after.strip() or files.get("summary.md") != hashlib.sha256((body + "\n").encode()).hexdigest():
        files.pop("summary.md", None)  # edited since: not the report's any more (its figures may still be)
    return files


def _check_replaceable(out_dir: Path, targets: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before any figure is drawn, to replace a file of ``targets`` that a report did not write.

    Raises
    ------
    OutputNotWritableError
        If a target is a folder.
    OutputExistsError
        Naming every existing target that is not a report's own, unchanged file (unless ``overwrite``).
    """
    folders = [t for t in targets if t.is_dir()]
    if folders:
        raise OutputNotWritableError(f"cannot write the report: {', '.join(map(str, folders))} is a folder; "
                                     "choose another --out folder")
    if overwrite:
        return
    own = _own_files(out_dir)
    foreign = [t for t in targets if t.exists() and (t.name not in own or (t.name != "summary.md"
                                                                         and _sha256(t) != own[t.name]))]
    if foreign:
        raise OutputExistsError(f"the report folder {out_dir} holds {', '.join(t.name for t in foreign)}, which a "
                                "report did not write (or which were changed since); refusing to replace "
                                f"{'it' if len(foreign) == 1 else 'them'}: pass --overwrite (overwrite=True) to "
                                "replace, or choose another folder")


def _results_files(paths: Sequence[Path]) -> list[Path]:
    """The netCDF files of ``paths``: files as given, folders' ``*.nc`` (hidden ones left out).

    Raises
    ------
    ConfigurationError
        If there are none.
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(f for f in p.glob("*.nc") if not f.name.startswith(".")) if p.is_dir() else [p])
    if not files:
        raise ConfigurationError(f"no results files to report: {', '.join(map(str, paths)) or 'no paths'} holds no "
                                 "*.nc file (give result files, or folders holding them)")
    return files


def report(paths: Sequence[Path], out_dir: Path, *, title: str = "combinability report",
           extra_markdown: str = "", overwrite: bool = False) -> list[Path]:
    """Draw a figure per results file and write ``summary.md``; returns the paths written.

    Parameters
    ----------
    paths : sequence of Path
        NetCDF files or folders (every ``*.nc`` inside is used).
    out_dir : Path
        Folder of the figures and ``summary.md`` (created when missing, after the results are read).
    title, extra_markdown : str
        The summary's title, and markdown added to it.
    overwrite : bool, default False
        Replace files of ``out_dir`` that a report did not write, or that were changed since.

    Raises
    ------
    ConfigurationError
        If ``paths`` hold no results file.
    CorruptFileError, FileNotFoundError
        If a results file cannot be read; nothing is written then, no folder created.
    OutputNotWritableError
        If ``out_dir`` cannot be created or written (a file stands in its place, no permission).
    OutputExistsError
        If a figure or ``summary.md`` would replace a file a report did not write (see the module's
        description); checked before any figure is drawn.
    """
    found = [(f.stem, read_results(f)) for f in _results_files(paths)]  # read them all before writing
    loaded = [(name, ds) for name, ds in found if is_complete(ds)]
    unfinished = [(name, ds) for name, ds in found if not is_complete(ds)]  # a running or interrupted sweep
    out_dir = Path(out_dir)
    summary = out_dir / "summary.md"
    planned = [p for name, ds in loaded for p in figure_paths(ds, out_dir / f"{name}.png")]
    check_writable(summary, what="report summary")
    _check_replaceable(out_dir, [*planned, summary], overwrite)
    written: list[Path] = []
    for name, ds in loaded:
        written += figure_for(ds, out_dir / f"{name}.png")
    text = f"# {title}\n\n## Empirical barriers (Def. 3.3), naive vs aligned\n\n" + barrier_table(loaded)
    text += "\nLoss barrier: worst loss of the sample minus the mean loss of the end models; accuracy barrier: mean "
    text += "accuracy of the end models minus the worst accuracy.\n"
    symmetries = symmetry_table(loaded)
    if symmetries:
        text += ("\n## Which symmetries alignment needs (transformers)\n\nLoss barriers of the naive pair, the pair "
                 "aligned with permutations only (heads, neurons, the residual stream permuted) and with every "
                 "symmetry kind (the residual stream rotated); where asked for, also every kind matched by the "
                 "models' activations (aligner 'activation'), with invertible maps inside heads (weight matching) "
                 "and with the maps learned on the midpoint loss (aligner 'maps'):\n\n"
                 + symmetries)
    if unfinished:
        text += ("\n## Unfinished results (not drawn)\n\n" + "".join(
            f"- {name}: {progress_of(ds)}; the same command run again finishes it\n" for name, ds in unfinished))
    if extra_markdown:
        text += "\n" + extra_markdown
    text += "\n## Figures\n\n" + "".join(f"- [{w.name}]({os.path.relpath(w, out_dir)})\n" for w in written)
    own = {"summary.md": hashlib.sha256(text.encode()).hexdigest(), **{w.name: _sha256(w) for w in written}}
    text += _MARKER + json.dumps(own, sort_keys=True) + " -->\n"
    with atomic_path(summary) as tmp:
        tmp.write_text(text)
    return [*written, summary]
