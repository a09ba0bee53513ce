"""Issue 13, items 1-3 on one trained pair: LLFC, layer-wise barriers with their curvature
prediction, temperature calibration and LEWC, for the naive and the weight-aligned pair.

Usage: ``python benchmarks/measurements/analyses.py mlp`` (seeds 0 and 1 of ``common.mlp``)
or ``... analyses.py tiny10`` (``common.tiny``). Writes ``analyses_<arch>.md`` beside this
file; with ``mlp`` also the figures of ``docs/analysis/``.
"""

from __future__ import annotations

import sys

import common as c
import numpy as np

LAMBDAS = list(np.linspace(0, 1, 11))
#: layer-wise barriers: Tiny-10 has 9 layers, each path needs 4 gradient passes: fewer examples and values
LAYERWISE = {"mlp": dict(lambdas=LAMBDAS, limit=c.LIMIT),
             "tiny10": dict(lambdas=[0.0, 0.25, 0.5, 0.75, 1.0], limit=1000)}


def _pairs(arch: str) -> dict[str, object]:
    import combinability as cb

    build = c.mlp if arch == "mlp" else c.tiny
    pair = cb.ModelPair(build(0), build(1)).align("weight", seed=0)
    return {"aligned": pair, "naive": pair.naive}


def _cached(path: str, compute):
    """``compute(out=path)`` (the library reuses a finished result of the same settings)."""
    return compute(c.WORK / path)


def llfc_table(arch: str, pairs: dict) -> tuple[str, dict]:
    import combinability as cb

    out, res = {}, {}
    for name, pair in pairs.items():
        res[name] = _cached(f"llfc_{arch}_{name}_9.nc", lambda p, pair=pair: cb.llfc(
            pair, c.DATA, values=LAMBDAS[1:-1], limit=c.LIMIT, out=p))
        res[name + "_uniform"] = _cached(f"llfc_{arch}_{name}_uniform.nc", lambda p, pair=pair: cb.llfc(
            pair, c.DATA, sampler=cb.Uniform(), values=[0.5], samples=2, limit=c.LIMIT, out=p))
    points = [str(p) for p in res["aligned"]["point"].values]
    rows = []
    for pt in points:
        row = [pt]
        for key in ("cosine", "baseline_cosine", "scale"):
            for name in ("aligned", "naive"):
                da = res[name][key].sel(point=pt)
                if "value" in da.dims:
                    da = da.sel(value=0.5, method="nearest").mean("sample")
                row.append(f"{float(da):.3f}")
        for name in ("aligned", "naive"):
            row.append(f"{float(res[name + '_uniform']['cosine'].sel(point=pt).mean(('value', 'sample'))):.3f}")
        rows.append(row)
    header = ["point", "cosine, aligned", "cosine, naive", "baseline, aligned", "baseline, naive", "scale, aligned",
              "scale, naive", "cosine, uniform s = 0.5, aligned", "… naive"]
    out["llfc"] = res
    return f"### {arch}: LLFC at λ = 0.5 (first {c.LIMIT} test images)\n\n" + c.markdown(header, rows), out


def layerwise_table(arch: str, pairs: dict) -> tuple[str, dict]:
    import combinability as cb

    res = {name: _cached(f"layerwise_{arch}_{name}.nc", lambda p, pair=pair: cb.layerwise_barriers(
        pair, c.DATA, out=p, **LAYERWISE[arch])) for name, pair in pairs.items()}
    layers = [str(v) for v in res["aligned"]["layer"].values]
    rows = []
    for name in ("aligned", "naive"):
        ds = res[name]
        for mode in ("single", "cumulative"):
            for label, var in (("measured", "loss_barrier"), ("predicted", "predicted_barrier")):
                rows.append([name, f"{mode}: {label}",
                             *[f"{float(ds[var].sel(mode=mode, layer=la)):.3f}" for la in layers]])
        rows.append([name, "single: accuracy barrier",
                     *[f"{float(ds['accuracy_barrier'].sel(mode='single', layer=la)):.3f}" for la in layers]])
    settings = LAYERWISE[arch]
    text = (f"### {arch}: layer-wise loss barriers and their curvature prediction (nats; first {settings['limit']} "
            f"test images, {len(settings['lambdas'])} values of λ)\n\n" + c.markdown(["pair", "mode", *layers], rows))
    return text, {"layerwise": res}


def calibration_table(arch: str, pairs: dict) -> tuple[str, dict]:
    import combinability as cb

    cal = _cached(f"calibration_{arch}.nc", lambda p: cb.calibrate(pairs["aligned"], c.DATA, lambdas=LAMBDAS,
                                                                 limit=c.LIMIT, out=p))
    rows = []
    for al in cal["alignment"].values:
        s = cal.sel(alignment=al)
        beta = s["inverse_temperature"].sel(lam=0.5, method="nearest")
        rows.append([str(al), f"{float(s['loss_barrier']):.3f}", f"{float(s['loss_barrier_calibrated']):.3f}",
                     f"{float(s['accuracy_barrier']):.3f}", f"{float(beta):.2f}",
                     f"{float(s['inverse_temperature'].sel(lam=0.0, method='nearest')):.2f}"])
    text = (f"### {arch}: linear path with a fitted temperature (calibrated on a random half of the first "
            f"{c.LIMIT} test images, evaluated on the other half)\n\n"
            + c.markdown(["pair", "loss barrier", "loss barrier, calibrated", "accuracy barrier", "β at λ = 0.5",
                          "β at λ = 0 (model A)"], rows))
    lewc = _cached(f"lewc_{arch}_naive_9.nc", lambda p: cb.lewc(pairs["naive"], c.DATA, lambdas=LAMBDAS[1:-1],
                                                               limit=c.LIMIT, out=p))
    rows = []
    for pt in lewc["point"].values:
        s = lewc.sel(point=pt).sel(lam=0.5, method="nearest") if "lam" in lewc.dims else lewc.sel(point=pt)
        depth = int(s["depth"]) if "depth" in s else ""
        rows.append([str(pt), depth, *[f"{float(s[v]):.3f}" for v in ("a", "b", "r2", "a_predicted", "r2_predicted")]])
    text += (f"\n### {arch}: LEWC at λ = 0.5, naive pair\n\n"
             + c.markdown(["point", "depth ℓ", "a", "b", "R²", "LEWC a = b = 0.5^ℓ", "R² of LEWC"], rows))
    return text, {"calibration": cal, "lewc": lewc}


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "mlp"
    c.single_thread()
    pairs = _pairs(arch)
    texts, results = [], {}
    for part in (llfc_table, calibration_table, layerwise_table):
        c.log(f"{arch}: {part.__name__}")
        text, res = part(arch, pairs)
        texts.append(text)
        results.update(res)
        c.write_table(f"analyses_{arch}.md", "\n".join(texts))
    if arch == "mlp":
        from combinability.plots.calibration import plot_calibration, plot_lewc
        from combinability.plots.layerwise import plot_layerwise_barriers
        from combinability.plots.llfc import plot_llfc

        docs = c.ROOT / "docs" / "analysis"
        plot_llfc(results["llfc"]["aligned"], docs / "llfc.png")
        plot_layerwise_barriers(results["layerwise"]["naive"], docs / "layerwise_naive.png")
        plot_calibration(results["calibration"], docs / "calibration.png")
        plot_lewc(results["lewc"], docs / "lewc.png")


if __name__ == "__main__":
    main()
