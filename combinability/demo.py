"""The main job (``make demo``): every experiment of the paper on three small MLPs.

It trains three MLPs with different seeds on the embedded default data
(Fashion-MNIST from Debian's ``dataset-fashion-mnist``; scikit-learn's digits when it
is absent), aligns them with weight matching, runs every experiment at a modest
sample size and writes, under ``results/demo/``:

* ``models/``: the three checkpoints (reused on the next run);
* one netCDF file per experiment (finished ones are reused, unfinished ones resume);
* ``figures/``: one PNG per experiment;
* ``summary.md``: the empirical barriers, naive vs aligned, and the other headline numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from combinability.errors import CombinabilityError, DatasetNotFoundError

__all__ = ["run_demo", "DemoSettings", "default_dataset"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo's work."""

    epochs: int = 5
    samples: int = 2
    limit: int = 5000
    width_epochs: int = 3
    widths: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    width_values: int = 7
    triangle_resolution: int = 8
    robustness_steps: int = 6
    stitch_values: int | None = None

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(epochs=1, samples=1, limit=300, width_epochs=1, widths=(0.125, 0.25), width_values=3,
                   triangle_resolution=3, robustness_steps=2)


def default_dataset() -> str:
    """``"fashion_mnist"`` when its files are found locally, else ``"digits"``."""
    from combinability.data import load_dataset

    try:
        load_dataset("fashion_mnist", "test")
        return "fashion_mnist"
    except DatasetNotFoundError:
        return "digits"


def _step(log: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    print(f"[demo] {name} ...", flush=True)
    result = fn(*args, **kwargs)
    log[name] = round(time.perf_counter() - t0, 1)
    print(f"[demo] {name} done in {log[name]:.1f} s", flush=True)
    return result


def run_demo(out: Path = Path("results/demo"), *, data: str | None = None, backend: str = "torch",
             quick: bool = False, progress: bool = True, epochs: int | None = None) -> int:
    """Run the demo; returns 0 on success. See the module docstring for what it writes."""
    import combinability as cb
    from combinability import experiments as ex
    from combinability.files import atomic_path
    from combinability.report import report

    s = DemoSettings.quick() if quick else DemoSettings()
    if epochs is not None:
        s = DemoSettings(**{**s.__dict__, "epochs": epochs})
    data = data or default_dataset()
    out = Path(out)
    models_dir = out / "models"
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    print(f"[demo] data: {data}; backend: {backend}; writing under {out}/", flush=True)

    models = []
    for seed in (0, 1, 2):
        ckpt = models_dir / f"mlp_seed{seed}.ckpt"
        models.append(_step(times, f"train model seed {seed}", cb.train, "mlp", data, backend=backend, seed=seed,
                            epochs=s.epochs, checkpoint=ckpt, progress=progress))
    a, b, c = models
    pair = _step(times, "align B to A", lambda: cb.ModelPair(a, b, backend=backend).align("weight", seed=0))
    triple = _step(times, "align B and C to A",
                   lambda: cb.ModelPair(a, b, backend=backend, model_c=c).align("weight", seed=0))
    kw = dict(data=data, samples=s.samples, limit=s.limit, seed=0, progress=progress)
    det = {k: v for k, v in kw.items() if k != "samples"}

    _step(times, "hypercube samplers (4.2)", ex.hypercube, pair, out_dir=out, **kw)
    _step(times, "identity stitching (4.3)", ex.identity_stitching, pair, out=out / "stitching.nc", **det)
    _step(times, "min/max models (4.5.1)", ex.min_max, pair, out=out / "minmax.nc", **det)
    _step(times, "linear extrapolation (5.1)", ex.linear_extrapolation, pair, out=out / "extrapolation.nc", **det)
    _step(times, "centred boxes (5.2)", ex.centred_box, pair, out=out / "box.nc", **kw)
    _step(times, "transitivity (5.3)", ex.transitivity, triple, out=out / "transitivity.nc", **det)
    tri = _step(times, "three models (5.4)", ex.three_models, triple, resolution=s.triangle_resolution,
                out=out / "triangle.nc", **det)
    _step(times, "functional agreement (6.1)", ex.functional_agreement, pair, out_dir=out, **kw)
    _step(times, "edge lengths (6.2)", lambda: ex.edge_lengths(pair, out=out / "edge_lengths.nc")
          if not (out / "edge_lengths.nc").exists() else None)
    _step(times, "alignment robustness (6.3)", ex.alignment_robustness, pair, data, steps=s.robustness_steps,
          limit=s.limit, out=out / "robustness.nc")
    _step(times, "width ablation (4.4)", ex.width_ablation, "mlp", data, widths=s.widths, backend=backend,
          epochs=s.width_epochs, samples=s.samples, limit=s.limit, values_per_sampler=s.width_values,
          model_dir=models_dir, out=out / "width_ablation.nc", progress=progress)

    best = ex.best_point(tri)
    extra = "## Three models (5.4)\n\n" + "".join(f"- {k}: {v:.4f}\n" if isinstance(v, float) else f"- {k}: {v}\n"
                                                  for k, v in best.items())
    total = time.perf_counter() - t_start
    timings = out / "timings.json"  # the run that computed the results, kept across reuse runs
    if timings.exists():
        first = json.loads(timings.read_text())
    else:
        first = {"wall_time_s": round(total, 1), "steps_s": times}
        with atomic_path(timings) as tmp:
            tmp.write_text(json.dumps(first, indent=1))
    extra += f"\n## Run\n\n- data: {data}\n- backend: {backend}\n"
    extra += f"- wall time of the run that computed these results: {first['wall_time_s']:.0f} s\n"
    extra += "- its step times (s): " + json.dumps(first["steps_s"]) + "\n"
    if timings.exists() and first.get("wall_time_s") != round(total, 1):
        extra += f"- this run (reusing finished work): {total:.0f} s\n"
    written = _step(times, "figures and summary", report, [out], out / "figures",
                    title=f"combinability demo: three MLPs on {data}", extra_markdown=extra)
    summary = out / "summary.md"
    with atomic_path(summary) as tmp:
        tmp.write_text((out / "figures" / "summary.md").read_text().replace("](", "](figures/"))
    print(f"[demo] finished in {time.perf_counter() - t_start:.0f} s: {len(written) - 1} figures, {summary}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        raise SystemExit(run_demo())
    except CombinabilityError as exc:
        raise SystemExit(f"demo failed: {exc}") from exc
