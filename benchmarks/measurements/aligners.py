"""Issue 12, item 4: the aligners compared on Fashion-MNIST (pairs and many models).

Usage: ``python benchmarks/measurements/aligners.py mlp`` (3 independent pairs: seeds 0-1, 2-3,
4-5, then N = 2 ... 6 models merged) or ``... aligners.py tiny10`` (one pair, seeds 0-1).
Writes ``aligners_<arch>.md`` beside this file and the Datasets to ``results/measurements/``.
"""

from __future__ import annotations

import sys

import common as c
import numpy as np
import xarray as xr

LEARNED = {"mlp": dict(train_examples=10000, epochs=2), "tiny10": dict(train_examples=10000, epochs=2)}
NAMES = {"identity": "identity", "weight": "weight", "activation": "activation", "ste": "STE",
         "ste_elementwise": "STE (uniform)", "sinkhorn": "Sinkhorn"}


def run_pairs(arch: str) -> list[xr.Dataset]:
    from combinability import experiments as ex

    build = c.mlp if arch == "mlp" else c.tiny
    pairs = [(0, 1), (2, 3), (4, 5)] if arch == "mlp" else [(0, 1)]
    out = []
    for a, b in pairs:
        models = [build(a), build(b)]
        c.log(f"{arch}: aligners on pair {a}-{b}")
        out.append(ex.compare_aligners(models, c.DATA, many_methods=(), limit=c.LIMIT, values_per_sampler=5,
                                       samples=2, seed=0, **LEARNED[arch],
                                       out=c.WORK / f"aligners_{arch}_{a}{b}.nc"))
    return out


def run_many(arch: str, n: int) -> xr.Dataset:
    from combinability import experiments as ex

    build = c.mlp if arch == "mlp" else c.tiny
    models = [build(s) for s in range(n)]
    c.log(f"{arch}: many-model methods on N = 2 ... {n}")
    return ex.compare_aligners(models, c.DATA, methods=(), limit=c.LIMIT, seed=0,
                               out=c.WORK / f"aligners_{arch}_many{n}.nc")


def fmt(values: np.ndarray, digits: int = 3) -> str:
    """Mean ± sample standard deviation (one value: the value)."""
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def pair_tables(arch: str, runs: list[xr.Dataset]) -> str:
    stacked = xr.concat(runs, dim="pair").sel(split="test")
    aligners = list(stacked["aligner"].values)
    header = ["scheme", *[NAMES.get(a, a) for a in aligners]]
    text = [f"### {arch}: test barriers, loss (nats) / accuracy, over {len(runs)} pair(s)\n"]
    rows = []
    for scheme in stacked["scheme"].values:
        cells = []
        for al in aligners:
            sel = stacked.sel(scheme=scheme, aligner=al)
            cells.append(f"{fmt(sel['loss_barrier'].values)} / {fmt(sel['accuracy_barrier'].values)}")
        rows.append([str(scheme), *cells])
    text.append(c.markdown(header, rows))
    text.append(f"\n### {arch}: mean loss / accuracy of the combinations swept (test)\n")
    rows = []
    for scheme in stacked["scheme"].values:
        cells = []
        for al in aligners:
            sel = stacked.sel(scheme=scheme, aligner=al)
            cells.append(f"{fmt(sel['mean_loss'].values)} / {fmt(sel['mean_accuracy'].values)}")
        rows.append([str(scheme), *cells])
    text.append(c.markdown(header, rows))
    text.append(f"\n### {arch}: wall time of the alignment (s)\n")
    text.append(c.markdown(header[1:], [[fmt(stacked["align_time"].sel(aligner=al).values, 2) for al in aligners]]))
    ends = [f"{float(r['loss_a'].sel(split='test')):.3f} / {float(r['accuracy_a'].sel(split='test')):.3f} and "
            f"{float(r['loss_b'].sel(split='test')):.3f} / {float(r['accuracy_b'].sel(split='test')):.3f}"
            for r in runs]
    text.append("\nEnd models (test loss / accuracy), per pair: " + "; ".join(ends) + "\n")
    return "\n".join(text)


def many_table(arch: str, ds: xr.Dataset) -> str:
    ds = ds.sel(split="test")
    methods = list(ds["merge_method"].values)
    header = ["N", "members (mean)", *methods]
    rows = []
    for n in ds["n_models"].values:
        row = [int(n), f"{float(ds['members_loss'].sel(n_models=n)):.3f} / "
                       f"{float(ds['members_accuracy'].sel(n_models=n)):.3f}"]
        for m in methods:
            s = ds.sel(n_models=n, merge_method=m)
            row.append(f"{float(s['merged_loss']):.3f} / {float(s['merged_accuracy']):.3f}, "
                       f"{float(s['worst_pair_loss_barrier']):.3f} / {float(s['worst_pair_accuracy_barrier']):.3f}, "
                       f"{float(s['merge_time']):.1f} s")
        rows.append(row)
    return (f"### {arch}: many models (test): merged loss / accuracy, worst pairwise loss / accuracy "
            f"barrier, time\n\n" + c.markdown(header, rows))


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "mlp"
    n_many = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    c.single_thread()
    from combinability.plots import plot_aligners

    runs = run_pairs(arch)
    text = pair_tables(arch, runs)
    figure = runs[0]
    if arch == "mlp":
        many = run_many(arch, n_many)
        text += "\n" + many_table(arch, many)
        figure = xr.merge([runs[0], many], combine_attrs="override")
    c.write_table(f"aligners_{arch}.md", text)
    plot_aligners(figure, c.ROOT / "docs" / "figures" / ("aligners.png" if arch == "mlp" else f"aligners_{arch}.png"))


if __name__ == "__main__":
    main()
