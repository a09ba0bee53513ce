"""Issue 13, item 3: naive and aligned linear-path loss barriers across widths, with and without a
fitted softmax temperature (Ito et al.): ``width_ablation(calibrate=True)``.

Usage: ``python benchmarks/measurements/width_calibration.py [WIDTH ...]`` (default 0.25 0.5 1 2:
MLPs of 128 to 1,024 units per hidden layer, 3 epochs, seeds 0 and 1). Writes
``width_calibration.md`` beside this file and ``docs/analysis/width_calibrated.png``.
"""

from __future__ import annotations

import sys

import common as c


def main() -> None:
    from combinability.experiments import width_ablation
    from combinability.plots.calibration import plot_calibrated_width
    from combinability.samplers import Linear

    widths = [float(w) for w in sys.argv[1:]] or [0.25, 0.5, 1.0, 2.0]
    c.single_thread()
    for w in widths:  # the same checkpoints as every other script
        c.mlp(0, width=w), c.mlp(1, width=w)
    tag = "_".join(f"{w:g}" for w in widths)
    ds = width_ablation("mlp", c.DATA, widths=widths, samplers=[Linear()], epochs=c.MLP_EPOCHS, model_dir=c.MODELS,
                        values_per_sampler=11, calibrate=True, limit=c.LIMIT, splits=["test"],
                        out=c.WORK / f"width_calibration_{tag}.nc")
    rows = []
    for w in ds["width"].values:
        s = ds.sel(width=w)
        beta = s["inverse_temperature"].sel(lam=0.5, method="nearest")
        acc = s["accuracy_barrier"].sel(sampler="linear", split="test")
        rows.append([f"{w:g} ({int(round(512 * w))})",
                     f"{float(s['accuracy_a'].sel(split='test')):.3f}, {float(s['accuracy_b'].sel(split='test')):.3f}",
                     *[f"{float(s[v].sel(alignment=al)):.3f}" for al in ("naive", "aligned")
                       for v in ("loss_barrier_linear", "loss_barrier_calibrated")],
                     *[f"{float(acc.sel(alignment=al)):.3f}" for al in ("naive", "aligned")],
                     *[f"{float(beta.sel(alignment=al)):.2f}" for al in ("naive", "aligned")]])
    header = ["width (units)", "end accuracies", "naive", "naive, calibrated", "aligned", "aligned, calibrated",
              "accuracy barrier, naive", "accuracy barrier, aligned", "β at λ = 0.5, naive", "β at λ = 0.5, aligned"]
    c.write_table("width_calibration.md",
                  "Linear-path loss barriers (nats), calibrated on a random half of the first "
                  f"{c.LIMIT} test images and evaluated on the other half.\n\n" + c.markdown(header, rows))
    plot_calibrated_width(ds, c.ROOT / "docs" / "analysis" / "width_calibrated.png")


if __name__ == "__main__":
    main()
