"""Issue 13, item 4: standard vs asymmetric networks (Lim et al.), naive and aligned barriers.

Usage: ``python benchmarks/measurements/asymmetry.py``. MLP (width 0.5, 3 epochs, all training
images): :func:`combinability.experiments.asymmetry_comparison` for the seed pairs 0-1 and 2-3.
Tiny-10 at CPU size (width 0.5, 2 epochs on 20,000 images; ``common.tiny``): the same
measurement on the pair of seeds 0-1. Writes ``asymmetry.md`` beside this file, the figures
``docs/experiments/asymmetry.png`` (MLP, seeds 0-1) and ``asymmetry_tiny10.png``.
"""

from __future__ import annotations

import common as c
import numpy as np
import xarray as xr

VALUES = tuple(np.linspace(0, 1, 11))
MLP_ARCHS = ("mlp", "mlp_wasym", "mlp_sigmaasym")
TINY_ARCHS = ("tiny10", "tiny10_wasym", "tiny10_sigmaasym")


def mlp_runs() -> list[xr.Dataset]:
    from combinability.experiments import asymmetry_comparison

    out = []
    for seeds in ((0, 1), (2, 3)):
        for arch in MLP_ARCHS:  # trained through common.mlp: the same checkpoints as every other script
            c.mlp(seeds[0], arch), c.mlp(seeds[1], arch)
        c.log(f"asymmetry: MLPs, seeds {seeds}")
        out.append(asymmetry_comparison(c.DATA, architectures=MLP_ARCHS, seeds=seeds, width=c.MLP_WIDTH,
                                        epochs=c.MLP_EPOCHS, model_dir=c.MODELS, values=VALUES, limit=c.LIMIT,
                                        splits=["test"], out=c.WORK / f"asymmetry_mlp_{seeds[0]}{seeds[1]}.nc"))
    return out


def _tiny_one(arch: str) -> xr.Dataset:
    """As ``asymmetry_comparison``'s per-architecture step, on the CPU-sized Tiny-10 of ``common.tiny``."""
    from combinability.experiments.compare import compare_alignment
    from combinability.pair import ModelPair
    from combinability.results import barriers
    from combinability.samplers import Linear

    a, b = c.tiny(0, arch), c.tiny(1, arch)
    pair = ModelPair(a, b, architecture=arch, backend="torch").align("weight")
    sweep = compare_alignment(pair, Linear(), data=c.DATA, values=list(VALUES), limit=c.LIMIT, splits=["test"])
    out = xr.merge([sweep[["loss", "accuracy"]].mean("sample"),
                    sweep[["loss_a", "loss_b", "accuracy_a", "accuracy_b"]], barriers(sweep)],
                   compat="override", combine_attrs="drop")
    perm = pair.permutation or {}
    out["permutable_units"] = xr.DataArray(sum(len(p) for p in perm.values()))
    out["moved_units"] = xr.DataArray(sum(int(np.sum(np.asarray(p) != np.arange(len(p)))) for p in perm.values()))
    return out


def tiny_run() -> xr.Dataset:
    path = c.WORK / "asymmetry_tiny10_01.nc"
    if path.exists():
        return xr.load_dataset(path)
    c.log("asymmetry: Tiny-10, seeds (0, 1)")
    ds = xr.concat([_tiny_one(a) for a in TINY_ARCHS], dim=xr.DataArray(list(TINY_ARCHS), dims="architecture"))
    ds.to_netcdf(path)
    return ds


def rows(ds: xr.Dataset, label: str) -> list[list[str]]:
    out = []
    ds = ds.sel(split="test")
    for arch in ds["architecture"].values:
        s = ds.sel(architecture=arch)
        naive, aligned = s.sel(alignment="naive"), s.sel(alignment="aligned")
        same = int(s["permutable_units"]) == 0
        tag = " (identity)" if same else ""
        out.append([label, f"`{arch}`",
                    f"{float(naive['accuracy_a']):.3f}, {float(naive['accuracy_b']):.3f}",
                    f"{float(naive['loss_barrier']):.3f}", f"{float(aligned['loss_barrier']):.3f}{tag}",
                    f"{float(naive['accuracy_barrier']):.3f}", f"{float(aligned['accuracy_barrier']):.3f}{tag}",
                    f"{int(s['moved_units'])} / {int(s['permutable_units'])}"])
    return out


def main() -> None:
    from combinability.plots import plot_asymmetry

    c.single_thread()
    mlps = mlp_runs()
    tiny = tiny_run()
    table = []
    for seeds, ds in zip(("0-1", "2-3"), mlps, strict=True):
        table += rows(ds, f"MLP, seeds {seeds}")
    table += rows(tiny, "Tiny-10, seeds 0-1")
    header = ["pair", "architecture", "end accuracies (test)", "loss barrier, naive", "loss barrier, aligned",
              "accuracy barrier, naive", "accuracy barrier, aligned", "units moved / permutable"]
    c.write_table("asymmetry.md", c.markdown(header, table))
    plot_asymmetry(mlps[0], c.ROOT / "docs" / "experiments" / "asymmetry.png")
    tiny.attrs.update(dataset=c.DATA, architecture="tiny10 (width 0.5, 2 epochs on 20,000 images)")
    plot_asymmetry(tiny, c.ROOT / "docs" / "experiments" / "asymmetry_tiny10.png")


if __name__ == "__main__":
    main()
