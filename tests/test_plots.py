"""The paper's figures: every function draws a readable PNG from a synthetic result, and draws the right numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from combinability.errors import CorruptFileError, UnknownNameError  # noqa: E402
from combinability.plots import (  # noqa: E402
    agreement_fractions,
    barrier_caption,
    barrier_table,
    edge_histograms,
    plot_agreement,
    plot_barrier_summary,
    plot_edge_lengths,
    plot_robustness,
    plot_sweep,
    plot_triangle,
    plot_width_ablation,
    robustness_curves,
    triangle_coordinates,
    triangle_values,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 50
CATEGORIES = ("both_correct", "both_wrong", "a_only_correct", "a_only_wrong",
              "b_only_correct", "b_only_wrong", "neither_correct", "neither_wrong")


# -- synthetic results, shaped like the library's -----------------------------------------------------------------
def sweep_result(sampler: str = "subcube", parameter: str = "lam", values=None, samples: int = 4,
                 alignments=("naive", "aligned"), agreement: bool = False, seed: int = 0) -> xr.Dataset:
    """A sweep_pairs-like Dataset: a bump of loss (and dip of accuracy) in the middle, larger when naive."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, 25) if values is None else np.asarray(values)
    t = (x - x.min()) / (np.ptp(x) or 1.0)
    splits = ["train", "test"]
    height = {"naive": 1.8, "aligned": 0.06, "transitive": 0.1, "direct": 0.05}
    shape = (len(alignments), len(splits), len(x), samples)
    bump = np.array([height.get(a, 0.2) for a in alignments])[:, None, None, None] * np.sin(np.pi * t)[:, None]
    base_loss = np.array([0.05, 0.3])[None, :, None, None]
    loss = base_loss + bump + 0.01 * rng.standard_normal(shape)
    acc = np.clip(np.array([0.99, 0.92])[None, :, None, None] - 0.4 * bump / 1.8 - 0.005 * rng.random(shape), 0, 1)
    ds = xr.Dataset(
        {
            "loss": (("alignment", "split", parameter, "sample"), loss),
            "accuracy": (("alignment", "split", parameter, "sample"), acc),
            "loss_a": (("alignment", "split"), np.tile([0.05, 0.30], (len(alignments), 1))),
            "loss_b": (("alignment", "split"), np.tile([0.06, 0.31], (len(alignments), 1))),
            "accuracy_a": (("alignment", "split"), np.tile([0.99, 0.92], (len(alignments), 1))),
            "accuracy_b": (("alignment", "split"), np.tile([0.99, 0.915], (len(alignments), 1))),
        },
        coords={"alignment": list(alignments), "split": splits, parameter: x, "sample": np.arange(samples)},
        attrs={"sampler": sampler, "parameter": parameter, "architecture": "resnet20", "dataset": "cifar10",
               "width": 1.0, "combinability_format": "sweep"},
    )
    if agreement:
        n = 1000
        counts = np.zeros((*shape, 8), dtype=np.int64)
        for idx in np.ndindex(shape):
            w = t[idx[2]]
            p = np.array([0.6, 0.05, 0.1 * (1 - w), 0.02, 0.1 * w, 0.02, 0.04, 0.07])
            counts[idx] = rng.multinomial(n, p / p.sum())
        ds["agreement"] = (("alignment", "split", parameter, "sample", "category"), counts)
        ds = ds.assign_coords(category=list(CATEGORIES))
    return ds


def triangle_result(resolution: int = 10) -> xr.Dataset:
    r = resolution
    pts = [(i / r, j / r) for i in range(r + 1) for j in range(r + 1 - i)]
    lam_b = np.array([p[0] for p in pts])
    lam_c = np.array([p[1] for p in pts])
    acc = 0.91 + 0.02 * (1 - ((lam_b - 0.3) ** 2 + (lam_c - 0.38) ** 2) * 4)  # best grid point (0.3, 0.4)
    accuracy = np.stack([np.stack([acc - 0.3 * np.sin(np.pi * (lam_b + lam_c)) * (1 - a) for _ in range(2)])
                         for a in (0, 1)])[..., None]
    ds = xr.Dataset(
        {
            "loss": (("alignment", "split", "point", "sample"), 1 - accuracy),
            "accuracy": (("alignment", "split", "point", "sample"), accuracy),
            **{f"{m}_{e}": (("alignment", "split"), np.full((2, 2), v))
               for m, v in (("loss", 0.3), ("accuracy", 0.91)) for e in "abc"},
        },
        coords={"alignment": ["naive", "aligned"], "split": ["train", "test"], "point": np.arange(len(pts)),
                "lam_b": ("point", lam_b), "lam_c": ("point", lam_c), "sample": [0]},
        attrs={"sampler": "triangle", "parameter": '["lam_b", "lam_c"]', "architecture": "resnet20",
               "dataset": "cifar10", "width": 4.0},
    )
    return ds


def edges_result(layers: int = 6, bins: int = 40) -> xr.Dataset:
    rng = np.random.default_rng(1)
    top = 0.2
    edges = np.linspace(0, top, bins + 1)
    count = np.zeros((2, layers, bins), dtype=np.int64)
    overflow = np.zeros((2, layers), dtype=np.int64)
    for layer in range(layers):
        for a, scale in enumerate((0.12, 0.03)):
            lengths = np.abs(rng.normal(0, scale * (1 + 0.1 * layer), 3000))
            count[a, layer] = np.histogram(np.minimum(lengths, top), bins=edges)[0]
            overflow[a, layer] = int(np.sum(lengths > top))
    return xr.Dataset(
        {"count": (("alignment", "layer", "bin"), count), "overflow": (("alignment", "layer"), overflow),
         "bin_edges": (("bin_edge",), edges)},
        coords={"alignment": ["naive", "aligned"], "layer": np.arange(layers),
                "layer_name": ("layer", [f"conv{i + 1}" for i in range(layers)])},
        attrs={"combinability_format": "edge_lengths", "architecture": "tiny10", "width": 16.0},
    )


def width_result() -> xr.Dataset:
    widths = np.array([0.25, 0.5, 1.0, 2.0])
    samplers = ["linear", "uniform", "subcube", "hyperplane", "bernoulli"]
    # value = 1000·w_index + 100·sampler_index + 10·alignment_index + split_index: every cell distinct
    grid = (1000 * np.arange(4)[:, None, None, None] + 100 * np.arange(5)[None, :, None, None]
            + 10 * np.arange(2)[None, None, :, None] + np.arange(2)[None, None, None, :]).astype(float)
    dims = ("width", "sampler", "alignment", "split")
    return xr.Dataset(
        {"loss_barrier": (dims, grid / 1e4), "accuracy_barrier": (dims, grid / 2e4)},
        coords={"width": widths, "sampler": samplers, "alignment": ["naive", "aligned"], "split": ["train", "test"]},
        attrs={"architecture": "resnet20", "dataset": "cifar10"},
    )


def robustness_result() -> xr.Dataset:
    names = ["P0", "P1", "P2", "P3", "P4"]
    units = [16, 32, 32, 64, 8]
    steps = 6
    k = np.full((len(names), steps), -1, dtype=np.int64)
    loss = np.full((len(names), steps), np.nan)
    acc = np.full((len(names), steps), np.nan)
    for r, n in enumerate(units):
        ks = np.unique(np.round(np.linspace(2, n, steps)).astype(int))
        k[r, : len(ks)] = ks
        loss[r, : len(ks)] = 0.05 + 0.5 * (ks / n) ** 3 * (r + 1) / 5
        acc[r, : len(ks)] = 0.0125 + 0.2 * (ks / n) ** 1.5 * (5 - r) / 5
    return xr.Dataset(
        {"loss_barrier": (("permutation", "step"), loss), "accuracy_barrier": (("permutation", "step"), acc),
         "baseline_loss_barrier": ((), 0.05), "baseline_accuracy_barrier": ((), 0.0125)},
        coords={"permutation": names, "step": np.arange(steps), "k": (("permutation", "step"), k),
                "units": ("permutation", units)},
        attrs={"architecture": "vgg", "split": "test"},
    )


def check_png(path: Path, fig: Figure, dpi: float = DPI) -> np.ndarray:
    """The file is a PNG of the figure's size at ``dpi``, not blank; no temporary file is left beside it."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    w, h = fig.get_size_inches() * dpi
    assert image.shape[:2] == (round(h), round(w))
    assert image[..., :3].std() > 0.05  # something is drawn
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    return image


# -- every figure renders --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sampler", "parameter", "values"), [
    ("subcube", "lam", None), ("uniform", "s", np.linspace(0, 0.5, 25)), ("stitch", "layer", np.arange(9)),
])
def test_plot_sweep_writes_png(tmp_path, sampler, parameter, values):
    ds = sweep_result(sampler, parameter, values, samples=1 if sampler == "stitch" else 4)
    path = tmp_path / "sweep.png"
    fig = plot_sweep(ds, path, dpi=DPI)
    check_png(path, fig)
    assert [ax.get_xlabel() != "" for ax in fig.axes] == [True, True]


def test_plot_agreement_writes_png(tmp_path):
    ds = sweep_result(agreement=True, alignments=("aligned",)).isel(alignment=0, drop=True)
    path = tmp_path / "agreement.png"
    check_png(path, plot_agreement(ds, path, dpi=DPI))


def test_plot_triangle_writes_png(tmp_path):
    path = tmp_path / "triangle.png"
    check_png(path, plot_triangle(triangle_result(), path, dpi=DPI))


@pytest.mark.parametrize("layers", [None, "all", ["conv2", 4]])
def test_plot_edge_lengths_writes_png(tmp_path, layers):
    path = tmp_path / "edges.png"
    fig = plot_edge_lengths(edges_result(), path, layers=layers, dpi=DPI)
    check_png(path, fig)
    assert sum(ax.get_visible() for ax in fig.axes) == {None: 1, "all": 6}.get(layers if layers is None or
                                                                                 isinstance(layers, str) else 0, 2)


def test_plot_width_ablation_writes_png(tmp_path):
    path = tmp_path / "width.png"
    check_png(path, plot_width_ablation(width_result(), path, dpi=DPI))


@pytest.mark.parametrize("metric", ["loss", "both"])
def test_plot_robustness_writes_png(tmp_path, metric):
    path = tmp_path / "robustness.png"
    check_png(path, plot_robustness(robustness_result(), path, metric=metric, dpi=DPI))


def test_plot_barrier_summary_writes_png(tmp_path):
    results = {"uniform": sweep_result("uniform", "s"), "bernoulli": sweep_result("bernoulli", "p", seed=3)}
    path = tmp_path / "summary.png"
    check_png(path, plot_barrier_summary(results, path, dpi=DPI))


def test_other_formats_follow_the_suffix(tmp_path):
    path = tmp_path / "sweep.pdf"
    plot_sweep(sweep_result(samples=1), path, dpi=DPI)
    assert path.read_bytes()[:5] == b"%PDF-"


# -- the drawn numbers -------------------------------------------------------------------------------------------------
def small_sweep() -> xr.Dataset:
    """One alignment, one split, three values of lam, two samples; barriers computed by hand below."""
    loss = [[0.30, 0.31], [0.45, 0.40], [0.32, 0.33]]
    acc = [[0.90, 0.91], [0.85, 0.80], [0.90, 0.90]]
    return xr.Dataset(
        {"loss": (("split", "lam", "sample"), [loss]), "accuracy": (("split", "lam", "sample"), [acc]),
         "loss_a": (("split",), [0.30]), "loss_b": (("split",), [0.34]),
         "accuracy_a": (("split",), [0.92]), "accuracy_b": (("split",), [0.90])},
        coords={"split": ["test"], "lam": [0.0, 0.5, 1.0], "sample": [0, 1]},
        attrs={"sampler": "linear", "parameter": "lam", "alignment": "aligned"},
    )


def test_caption_holds_the_empirical_barriers():
    # Def. 3.3 by hand: loss 0.45 − (0.30 + 0.34)/2 = 0.13; accuracy (0.92 + 0.90)/2 − 0.80 = 0.11
    ds = small_sweep()
    expected = "Empirical loss barrier: 0.130, empirical accuracy barrier: 0.110"
    assert barrier_caption(ds) == expected
    fig = plot_sweep(ds)
    assert expected in fig.get_suptitle()
    legends = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert legends == ["aligned: test 0.130", "aligned: test 0.110"]


def test_caption_per_alignment_and_split():
    ds = sweep_result(samples=3)
    loss = ds["loss"].sel(alignment="naive", split="train").values
    ref = 0.5 * (0.05 + 0.06)
    assert barrier_caption(ds, split="train", alignment="naive").startswith(
        f"Empirical loss barrier: {loss.max() - ref:.3f},")
    acc = ds["accuracy"].sel(alignment="aligned", split="test").values
    assert barrier_caption(ds).endswith(f"empirical accuracy barrier: {0.5 * (0.92 + 0.915) - acc.min():.3f}")


def test_sweep_draws_sample_means_and_end_markers():
    ds = small_sweep()
    fig = plot_sweep(ds)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3]
    assert len(lines) == 1
    np.testing.assert_allclose(lines[0].get_ydata(), [0.305, 0.425, 0.325])
    markers = {(float(ln.get_xdata()[0]), float(ln.get_ydata()[0]))
               for ln in ax.get_lines() if len(ln.get_xdata()) == 1}
    assert markers == {(0.0, 0.30), (1.0, 0.34)}  # linear: A at λ = 0, B at λ = 1


def test_stitching_places_model_b_at_layer_l():
    for last, expected_in_strip in ((2, True), (4, False)):
        ds = sweep_result("stitch", "layer", np.arange(last + 1), samples=1, alignments=("aligned",))
        ds.attrs["layer_names"] = "fc1, fc2, fc3, fc4"  # L = 4: model B is layer 4
        fig = plot_sweep(ds)
        b_x = {float(ln.get_xdata()[0]) for ln in fig.axes[0].get_lines() if ln.get_marker() == "D"}
        a_x = {float(ln.get_xdata()[0]) for ln in fig.axes[0].get_lines() if ln.get_marker() == "s"}
        assert a_x == {0.0}
        assert (min(b_x) > last) if expected_in_strip else (b_x == {4.0})


def test_agreement_fractions_by_hand():
    counts = np.zeros((1, 2, 2, 8), dtype=np.int64)  # split, p, sample, category
    counts[0, 0, 0] = [5, 1, 2, 0, 0, 1, 0, 1]  # 10 examples
    counts[0, 0, 1] = [6, 0, 1, 1, 1, 0, 0, 1]
    counts[0, 1, 0] = [0, 0, 0, 0, 10, 0, 0, 0]
    # sample 1 of the second value unfinished: no counts
    ds = xr.Dataset({"agreement": (("split", "p", "sample", "category"), counts)},
                    coords={"split": ["test"], "p": [0.0, 1.0], "sample": [0, 1], "category": list(CATEGORIES)},
                    attrs={"parameter": "p"})
    ds["loss"] = (("split", "p", "sample"), np.zeros((1, 2, 2)))
    frac = agreement_fractions(ds)
    np.testing.assert_allclose(frac.sel(p=0.0).values, [11 / 20, 1 / 20, 3 / 20, 1 / 20, 1 / 20, 1 / 20, 0, 2 / 20])
    np.testing.assert_allclose(frac.sel(p=1.0).values, [0, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(frac.sum("category").values, [1.0, 1.0])


def test_agreement_fractions_reorder_categories_and_stack_to_one():
    ds = sweep_result(agreement=True, alignments=("aligned",), samples=2).isel(alignment=0, drop=True)
    shuffled = ds.isel(category=[7, 3, 0, 5, 1, 6, 2, 4])
    frac = agreement_fractions(shuffled)
    assert list(frac["category"].values) == list(CATEGORIES)
    raw = ds["agreement"].sel(split="test").sum("sample").values
    np.testing.assert_allclose(frac.values, raw / raw.sum(-1, keepdims=True))
    fig = plot_agreement(shuffled)
    polys = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(polys) == 8
    top = polys[-1].get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose(top.max(), 1.0)  # the stack reaches exactly 1


def test_triangle_corners_form_an_equilateral_triangle():
    x, y = triangle_coordinates([0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    corners = np.stack([x, y], axis=1)
    sides = [np.linalg.norm(corners[i] - corners[j]) for i, j in ((0, 1), (1, 2), (2, 0))]
    np.testing.assert_allclose(sides, [1.0, 1.0, 1.0])
    cx, cy = triangle_coordinates(1 / 3, 1 / 3)  # barycentre goes to the centroid
    np.testing.assert_allclose([cx, cy], [0.5, math.sqrt(3) / 6])


def test_triangle_marks_the_best_point():
    ds = triangle_result(resolution=10)
    best = int(np.flatnonzero(np.isclose(ds["lam_b"].values, 0.3) & np.isclose(ds["lam_c"].values, 0.4))[0])
    pts = triangle_values(ds)  # the aligned test accuracies (one sample), not the naive ones
    np.testing.assert_allclose(pts["value"], ds["accuracy"].values[1, 1, :, 0])
    assert int(np.argmax(pts["value"].values)) == best
    fig = plot_triangle(ds)
    stars = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 1
    bx, by = triangle_coordinates(ds["lam_b"].values[best], ds["lam_c"].values[best])
    np.testing.assert_allclose([stars[0].get_xdata()[0], stars[0].get_ydata()[0]], [bx, by])
    assert f"λ_B = {ds['lam_b'].values[best]:.2f}" in fig.get_suptitle()


def test_edge_histograms_sum_layers():
    ds = edges_result(layers=3, bins=5)
    total = edge_histograms(ds)
    np.testing.assert_array_equal(total["count"].sel(panel="all layers", alignment="naive").values,
                                  ds["count"].values[0].sum(axis=0))
    two = edge_histograms(ds, ["conv3", 0])
    assert list(two["panel"].values) == ["conv3", "conv1"]
    np.testing.assert_array_equal(two["count"].sel(panel="conv3").values, ds["count"].values[:, 2])
    fig = plot_edge_lengths(ds, layers=["conv3"])
    drawn = [p.get_data().values for p in fig.axes[0].patches if p.get_label() and not p.get_label().startswith("_")]
    np.testing.assert_array_equal(drawn[1], ds["count"].values[1, 2])


def test_width_ablation_draws_the_selected_slice():
    ds = width_result()
    fig = plot_width_ablation(ds)
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "hyperplane|aligned")
    # hyperplane is sampler 3, aligned alignment 1, test split 1: 1000·w + 311, over 1e4
    np.testing.assert_allclose(line.get_ydata(), (1000 * np.arange(4) + 311) / 1e4)
    np.testing.assert_allclose(line.get_xdata(), [0.25, 0.5, 1.0, 2.0])
    both = plot_width_ablation(ds, alignments=None, split="train")
    naive = next(ln for ln in both.axes[1].get_lines() if ln.get_gid() == "linear|naive")
    np.testing.assert_allclose(naive.get_ydata(), (1000 * np.arange(4)) / 2e4)


def test_robustness_skips_unused_steps_and_draws_the_baseline():
    ds = robustness_result()
    k, y = robustness_curves(ds, "P4")  # N = 8: k = 2, 3, 4, 6, 7, 8 (6 distinct)
    np.testing.assert_array_equal(k, [2, 3, 4, 6, 7, 8])
    np.testing.assert_allclose(y, 0.05 + 0.5 * (k / 8) ** 3)
    fig = plot_robustness(ds)
    ax = fig.axes[4]
    lines = ax.get_lines()
    np.testing.assert_array_equal(lines[0].get_xdata(), k)
    np.testing.assert_allclose(lines[1].get_ydata(), [0.05, 0.05])  # baseline
    assert lines[1].get_linestyle() == "--"


def test_barrier_table_by_hand():
    table = barrier_table({"linear": small_sweep()})
    np.testing.assert_allclose(table["loss_barrier"].sel(experiment="linear", alignment="aligned"), 0.13)
    np.testing.assert_allclose(table["accuracy_barrier"].sel(experiment="linear", alignment="aligned"), 0.11)


def test_summary_table_puts_one_pair_in_the_column_of_its_alignment():
    from combinability.report import barrier_table as summary_table

    def one(alignment: str) -> xr.Dataset:
        ds = small_sweep()
        ds.attrs.update(combinability_format="sweep", alignment=alignment)
        return ds

    rows = summary_table([("weight", one("weight")), ("raw", one("naive"))]).splitlines()[2:]
    cells = [[c.strip() for c in row.split("|")[4:8]] for row in rows]  # loss naive, aligned; accuracy naive, aligned
    assert cells == [["–", "0.130", "–", "0.110"], ["0.130", "–", "0.110", "–"]]


def test_summary_table_gives_every_alignment_of_a_transitivity_sweep_and_agreement_sweeps_a_row():
    """A row per non-naive alignment where there are several (the direct curve had none), and sweeps that also
    count agreement (left out before) get their barriers."""
    from combinability.report import barrier_table as summary_table

    base = small_sweep()
    three = xr.concat([base, base.assign(loss=base["loss"] + 0.1), base.assign(loss=base["loss"] + 0.2)],
                      dim=xr.DataArray(["naive", "direct", "transitive"], dims="alignment"))
    three.attrs.update(combinability_format="sweep")
    agreement = base.assign(agreement=(("split", "category"), [[3, 4]])).assign_coords(category=["a", "b"])
    agreement.attrs.update(combinability_format="sweep", alignment="aligned")
    rows = summary_table([("transitivity", three), ("bernoulli", agreement)]).splitlines()[2:]
    cells = [[c.strip() for c in row.split("|")[1:6]] for row in rows]
    # loss barriers by hand: worst 0.45 (+0.1, +0.2) minus the mean of the ends, 0.32
    assert cells == [["transitivity (direct)", "linear", "test", "0.130", "0.230"],
                     ["transitivity (transitive)", "linear", "test", "0.130", "0.330"],
                     ["bernoulli", "linear", "test", "–", "0.130"]]


# -- errors and file handling ---------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    ds = sweep_result()
    with pytest.raises(CorruptFileError, match="lacks loss"):
        plot_sweep(ds.drop_vars("loss"))
    with pytest.raises(CorruptFileError, match="xarray.Dataset"):
        plot_sweep({"loss": 1})
    with pytest.raises(UnknownNameError, match="valid: train, test"):
        plot_sweep(ds, splits=("validation",))
    with pytest.raises(UnknownNameError, match="valid: naive, aligned"):
        barrier_caption(ds, alignment="direct")
    with pytest.raises(CorruptFileError, match="agreement"):
        plot_agreement(ds)
    with pytest.raises(CorruptFileError, match="plot_triangle"):
        plot_sweep(triangle_result(2))
    with pytest.raises(UnknownNameError, match="valid: naive, aligned"):
        plot_triangle(triangle_result(2), alignment="direct")
    with pytest.raises(UnknownNameError, match="conv1"):
        plot_edge_lengths(edges_result(), layers=["fc9"])
    with pytest.raises(UnknownNameError, match="valid: loss, accuracy, both"):
        plot_robustness(robustness_result(), metric="barrier")
    with pytest.raises(UnknownNameError, match="valid suffixes"):
        plot_sweep(ds, "figure.nosuchformat")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot_sweep(small_sweep(), path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["fig.png"]


def test_no_pyplot_and_core_does_not_import_matplotlib(tmp_path):
    code = (
        "import sys, combinability, combinability.results\ncombinability.sweep, combinability.sweep_pairs\n"
        "before = 'matplotlib' in sys.modules\n"
        "import combinability.plots as p\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_plots import small_sweep\n"
        f"p.plot_sweep(small_sweep(), {str(tmp_path / 'x.png')!r})\n"
        "print(before, 'matplotlib.pyplot' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'backends'}", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root, env=env)
    assert out.stdout.split() == ["False", "False"]


# -- the real results of the library, through netCDF -----------------------------------------------------------------
@pytest.mark.slow
def test_figures_of_real_results(tmp_path, digits_pair, digits_triple):
    pytest.importorskip("torch")
    import combinability as cb
    from combinability.experiments import compare_alignment, edge_lengths, three_models
    from combinability.results import open_results, write_results

    def roundtrip(ds, name):
        return open_results(write_results(ds, tmp_path / f"{name}.nc"))

    kw = {"data": "digits", "splits": ["test"], "limit": 120}
    swept = roundtrip(compare_alignment(digits_pair, cb.Bernoulli(), values=[0.0, 0.5, 1.0], samples=2, **kw), "b")
    check_png(tmp_path / "sweep.png", plot_sweep(swept, tmp_path / "sweep.png", dpi=DPI))
    agree = roundtrip(cb.sweep(digits_pair, cb.Linear(), values=[0.0, 0.5, 1.0], agreement=True, **kw), "agree")
    frac = agreement_fractions(agree)
    np.testing.assert_allclose(frac.sum("category").values, 1.0)
    # at λ = 0 the combination is A itself: it always predicts what A predicts
    assert float(frac.isel(lam=0).sel(category=["b_only_correct", "b_only_wrong", "neither_correct",
                                                "neither_wrong"]).sum()) == 0.0
    check_png(tmp_path / "agree.png", plot_agreement(agree, tmp_path / "agree.png", dpi=DPI))
    tri = roundtrip(three_models(digits_triple, resolution=3, **kw), "tri")
    check_png(tmp_path / "tri.png", plot_triangle(tri, tmp_path / "tri.png", dpi=DPI))
    edges = roundtrip(edge_lengths(digits_pair, bins=20), "edges")
    check_png(tmp_path / "edges.png", plot_edge_lengths(edges, tmp_path / "edges.png", layers="all", dpi=DPI))
