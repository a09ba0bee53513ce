"""The main job (``make demo``): every experiment of the paper on three small MLPs, and two ViTs.

It trains three MLPs with different seeds on the embedded default data
(Fashion-MNIST from Debian's ``dataset-fashion-mnist``; scikit-learn's digits when it
is absent), aligns them with weight matching, runs every experiment at a modest
sample size; then trains two tiny vision transformers (the registered ``tinyvit``,
briefly, on a few thousand training images) and compares their naive, permutation-aligned
and permutation+orthogonal-aligned barriers. It writes, under ``results/demo/``:

* ``models/``: the MLP and ViT checkpoints (reused on the next run);
* one netCDF file per experiment (finished ones are reused, unfinished ones resume);
  identity stitching in both directions the paper describes: ``stitching.nc`` (π(Θ_B)
  below the cut, Θ_A above: the §4.3 formula) and ``stitching_lower_a.nc`` (Θ_A below,
  π(Θ_B) above: the section's first sentence);
* ``aligners.nc``: the aligners compared on the three MLPs (a short run);
* ``symmetries.nc``: the ViTs' symmetry comparison (test split, a few values per sampler);
* ``figures/``: one PNG per experiment;
* ``summary.md``: the empirical barriers, naive vs aligned, the ViTs' linear-path loss
  barriers, and the other headline numbers.
"""

from __future__ import annotations

import inspect
import json
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from combinability.errors import CombinabilityError, ConfigurationError, DatasetNotFoundError

__all__ = ["run_demo", "DemoSettings", "default_dataset", "STITCH_FILES", "train_vits", "vit_symmetries"]

#: The identity-stitching result files of the demo, by the model below the cut (``Stitch(lower=...)``).
STITCH_FILES: dict[str, str] = {"b": "stitching.nc", "a": "stitching_lower_a.nc"}


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
    vit_train: int = 4000
    vit_epochs: int = 2
    vit_width: float = 0.5
    vit_limit: int = 500
    vit_path: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    vit_samplers: tuple[str, ...] = ("linear", "uniform", "subcube", "bernoulli")
    vit_alignments: tuple[str, ...] = ("naive", "permutation", "all", "activation", "invertible", "learned")
    vit_learn_epochs: int = 2

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(epochs=1, samples=1, limit=300, width_epochs=1, widths=(0.125, 0.25), width_values=3,
                   triangle_resolution=3, robustness_steps=2, vit_train=300, vit_epochs=1, vit_width=0.25,
                   vit_limit=100, vit_path=(0.0, 0.5, 1.0), vit_samplers=("linear", "uniform"),
                   vit_alignments=("naive", "permutation", "all"))

    def vit_values(self) -> dict[str, list[float]]:
        """Values per sampler of the ViTs' symmetry comparison: the path's points, 0.5 for the random samplers."""
        return {name: list(self.vit_path) if name == "linear" else [0.5] for name in self.vit_samplers}


def default_dataset() -> str:
    """``"fashion_mnist"`` when its files are found locally, else ``"digits"``."""
    from combinability.data import load_dataset

    try:
        load_dataset("fashion_mnist", "test")
        return "fashion_mnist"
    except DatasetNotFoundError:
        return "digits"


class _StepTimes(dict):
    """Seconds per step of the demo; ``quiet``: the steps are not announced (``-q``)."""

    def __init__(self, *, quiet: bool = False) -> None:
        super().__init__()
        self.quiet = quiet


def _say(log: dict, message: str) -> None:
    if not getattr(log, "quiet", False):
        print(f"[demo] {message}", flush=True)


def _step(log: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    _say(log, f"{name} ...")
    result = fn(*args, **kwargs)
    log[name] = round(time.perf_counter() - t0, 1)
    _say(log, f"{name} done in {log[name]:.1f} s")
    return result


def _check_attrs(attrs: Mapping[str, Any] | None, experiments: Iterable[Callable[..., Any]]) -> dict[str, Any]:
    """``attrs`` as a dict of netCDF-storable attributes that every experiment accepts, or an error.

    Raises
    ------
    ConfigurationError
        If ``attrs`` is not a mapping of str to str or number, or an experiment has no
        ``attrs`` keyword (checked before any training starts).
    """
    if attrs is None:
        return {}
    if not isinstance(attrs, Mapping):
        raise ConfigurationError(f"demo: attrs must be a mapping of str to str or number, got {type(attrs).__name__}")
    bad = [k for k, v in attrs.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, str | numbers.Real)]
    if bad:
        raise ConfigurationError(
            f"demo: attrs must map str to str or a number (netCDF attributes); invalid entries: {bad!r}"
        )
    refusing = [fn.__name__ for fn in experiments if not _accepts(fn, "attrs")]
    if refusing:
        raise ConfigurationError(f"demo: attrs= cannot be stored: {', '.join(refusing)} take no 'attrs' keyword")
    return dict(attrs)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (named or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_vit_data(data: str, settings: DemoSettings) -> None:
    """Refuse data whose examples the demo's ViTs cannot take (square images of a side divisible by 4).

    Raises
    ------
    ConfigurationError
        Naming the dataset and its input shape.
    """
    from combinability.data import load_dataset
    from combinability.transformer_zoo import tiny_vit_kwargs

    shape = load_dataset(data, "test", limit=1).input_shape
    try:
        tiny_vit_kwargs(width=settings.vit_width, num_classes=2, input_shape=shape)
    except ConfigurationError as exc:
        raise ConfigurationError(f"demo: the dataset {data!r} (inputs {shape}) does not fit its ViT step: "
                                 f"{exc}") from None


def train_vits(models_dir: Path, data: str, backend: str, settings: DemoSettings, *, progress: bool = False,
               overwrite: bool = False, times: dict[str, float] | None = None) -> list[Any]:
    """Two ``tinyvit`` models (seeds 0 and 1) trained on the first ``settings.vit_train`` training examples.

    Checkpoints ``tinyvit_seed{0,1}_n{examples}.ckpt`` under ``models_dir`` (the number of training
    examples in the name and in the metadata, ``train_examples``) are reused when trained with
    the same settings.
    """
    import combinability as cb
    from combinability.data import load_dataset

    train = load_dataset(data, "train", limit=settings.vit_train)
    n = len(train)
    log = _StepTimes(quiet=not progress) if times is None else times
    return [_step(log, f"train ViT seed {seed}", cb.train, "tinyvit", train, backend=backend, seed=seed,
                  epochs=settings.vit_epochs, width=settings.vit_width, metadata={"train_examples": n},
                  checkpoint=models_dir / f"tinyvit_seed{seed}_n{n}.ckpt", progress=progress, overwrite=overwrite)
            for seed in (0, 1)]


def vit_symmetries(out: Path, data: str, backend: str, settings: DemoSettings, *, progress: bool = False,
                   overwrite: bool = False, attrs: Mapping[str, Any] | None = None,
                   times: dict[str, float] | None = None, client: Any = None) -> Any:
    """The demo's transformer step: two ViTs, then ``out/symmetries.nc``; returns its Dataset.

    Trains (or reuses) the two ViTs of :func:`train_vits` under ``out/models/``, pairs them
    (their symmetries traced on 8 test images) and runs
    :func:`~combinability.experiments.symmetries.symmetry_comparison`: the linear path at
    ``settings.vit_path``, the other samplers of ``settings.vit_samplers`` at 0.5 (one draw), on
    the first ``settings.vit_limit`` test examples, weight matching with one restart; with
    ``settings.vit_alignments`` (by default also activation matching of every kind on the ViTs'
    training examples, invertible maps inside heads, and the maps
    learned on the midpoint loss of the ViTs' training examples for ``settings.vit_learn_epochs``
    epochs). A finished ``symmetries.nc`` of the same settings is reused; its sweeps run on
    ``client``'s Dask workers when one is given.
    """
    import combinability as cb
    from combinability.data import load_dataset
    from combinability.experiments.symmetries import symmetry_comparison
    from combinability.samplers import get_sampler

    log = _StepTimes(quiet=not progress) if times is None else times
    vit_a, vit_b = train_vits(Path(out) / "models", data, backend, settings, progress=progress, overwrite=overwrite,
                              times=log)
    example = load_dataset(data, "test", limit=8).x
    pair = cb.ModelPair(vit_a, vit_b, example_input=example)
    samplers = [get_sampler(name) for name in settings.vit_samplers]
    learned = bool({"activation", "learned"} & set(settings.vit_alignments))  # both read the training examples
    return _step(log, "ViT symmetries", symmetry_comparison, pair, data, samplers=samplers,
                 values=settings.vit_values(), samples=1, seed=0, restarts=1, alignments=settings.vit_alignments,
                 train_data=load_dataset(data, "train", limit=settings.vit_train) if learned else None,
                 learn_options={"epochs": settings.vit_learn_epochs}, splits=("test",),
                 limit=settings.vit_limit, out=Path(out) / "symmetries.nc", overwrite=overwrite, attrs=attrs,
                 progress=progress, **({"client": client} if client is not None else {}))


def run_demo(out: Path = Path("results/demo"), *, data: str | None = None, backend: str = "torch",
             quick: bool = False, progress: bool = True, epochs: int | None = None,
             attrs: Mapping[str, Any] | None = None, overwrite: bool = False, client: Any = None) -> int:
    """Run the demo; returns 0 on success. See the module docstring for what it writes.

    Parameters
    ----------
    out : path
        Folder for the models, the netCDF results, the figures and ``summary.md``.
    data : str, optional
        Dataset name; Fashion-MNIST when its files are found, else digits.
    backend : str
        ``"torch"`` or ``"jax"``.
    quick : bool
        Much smaller sizes (:meth:`DemoSettings.quick`), for tests.
    progress : bool
        Progress bars.
    epochs : int, optional
        Training epochs of the three models (default: :class:`DemoSettings`).
    attrs : mapping, optional
        Extra attributes (str to str or number) forwarded as ``attrs=`` to every
        experiment, hence stored in every result file it writes.
    overwrite : bool
        Recompute every result, replacing files in ``out`` written with other settings
        (which are otherwise refused with :class:`~combinability.errors.OutputExistsError`),
        and retrain checkpoints of other settings; checkpoints of the same settings are
        reused either way.
    client : dask.distributed.Client, optional
        Run every sweep on the workers of this Dask cluster (checked before any
        training; docs/clusters.md); the results are those of an in-process run.

    Raises
    ------
    ConfigurationError
        If ``attrs`` is malformed (before anything is trained).
    """
    import combinability as cb
    from combinability import experiments as ex
    from combinability.experiments.compare import check_client
    from combinability.experiments.symmetries import symmetry_comparison
    from combinability.files import atomic_path
    from combinability.report import report

    experiments = (ex.hypercube, ex.identity_stitching, ex.min_max, ex.linear_extrapolation, ex.centred_box,
                   ex.transitivity, ex.three_models, ex.functional_agreement, ex.edge_lengths,
                   ex.alignment_robustness, ex.width_ablation, ex.compare_aligners, symmetry_comparison)
    extra_attrs = _check_attrs(attrs, experiments)
    check_client(client, backend)  # the workers, before any training
    run = {"client": client} if client is not None else {}
    tag = {"attrs": extra_attrs} if extra_attrs else {}
    s = DemoSettings.quick() if quick else DemoSettings()
    if epochs is not None:
        s = DemoSettings(**{**s.__dict__, "epochs": epochs})
    data = data or default_dataset()
    _check_vit_data(data, s)  # the last step's images, before the first step's training
    out = Path(out)
    models_dir = out / "models"
    t_start = time.perf_counter()
    times = _StepTimes(quiet=not progress)
    _say(times, f"data: {data}; backend: {backend}; writing under {out}/")

    models = []
    for seed in (0, 1, 2):
        ckpt = models_dir / f"mlp_seed{seed}.ckpt"
        models.append(_step(times, f"train model seed {seed}", cb.train, "mlp", data, backend=backend, seed=seed,
                            epochs=s.epochs, checkpoint=ckpt, progress=progress, overwrite=overwrite))
    a, b, c = models
    pair = _step(times, "align B to A", lambda: cb.ModelPair(a, b, backend=backend).align("weight", seed=0))
    triple = _step(times, "align B and C to A",
                   lambda: cb.ModelPair(a, b, backend=backend, model_c=c).align("weight", seed=0))
    kw = dict(data=data, samples=s.samples, limit=s.limit, seed=0, progress=progress, overwrite=overwrite, **tag,
              **run)
    det = {k: v for k, v in kw.items() if k != "samples"}

    _step(times, "hypercube samplers (4.2)", ex.hypercube, pair, out_dir=out, **kw)
    for lower, name in STITCH_FILES.items():
        _step(times, f"identity stitching (4.3), {lower.upper()} below the cut",
              ex.identity_stitching, pair, lower=lower, out=out / name, **det)
    _step(times, "min/max models (4.5.1)", ex.min_max, pair, out=out / "minmax.nc", **det)
    _step(times, "linear extrapolation (5.1)", ex.linear_extrapolation, pair, out=out / "extrapolation.nc", **det)
    _step(times, "centred boxes (5.2)", ex.centred_box, pair, out=out / "box.nc", **kw)
    _step(times, "transitivity (5.3)", ex.transitivity, triple, out=out / "transitivity.nc", **det)
    tri = _step(times, "three models (5.4)", ex.three_models, triple, resolution=s.triangle_resolution,
                out=out / "triangle.nc", **det)
    _step(times, "functional agreement (6.1)", ex.functional_agreement, pair, out_dir=out, **kw)
    _step(times, "edge lengths (6.2)", ex.edge_lengths, pair, out=out / "edge_lengths.nc", overwrite=overwrite, **tag)
    _step(times, "alignment robustness (6.3)", ex.alignment_robustness, pair, data, steps=s.robustness_steps,
          limit=s.limit, out=out / "robustness.nc", overwrite=overwrite, **tag)
    # a short run (about 15 s): the learned aligners see 200 training examples, MergeMany and cycle are cut
    # short (2 rounds, 3 Frank-Wolfe steps): not the converged numbers of docs/experiments/aligners.md
    _step(times, "aligners compared", ex.compare_aligners, models, data, n_models=(3,), backend=backend,
          train_examples=200, learned_options={"eval_examples": 200}, many_options={"fw_iter": 3, "rounds": 2},
          values_per_sampler=3, samples=1, limit=min(s.limit, 1000), progress=progress, out=out / "aligners.nc",
          overwrite=overwrite, **tag, **run)
    _step(times, "width ablation (4.4)", ex.width_ablation, "mlp", data, widths=s.widths, backend=backend,
          epochs=s.width_epochs, samples=s.samples, limit=s.limit, values_per_sampler=s.width_values,
          model_dir=models_dir, out=out / "width_ablation.nc", progress=progress, overwrite=overwrite, **tag, **run)
    vit_symmetries(out, data, backend, s, progress=progress, overwrite=overwrite, times=times, client=client, **tag)

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
    # the demo's figures folder is its own, drawn afresh from its results at every run (as its summary.md is)
    written = _step(times, "figures and summary", report, [out], out / "figures",
                    title=f"combinability demo: three MLPs and two ViTs on {data}", extra_markdown=extra,
                    overwrite=True)
    summary = out / "summary.md"
    with atomic_path(summary) as tmp:
        tmp.write_text((out / "figures" / "summary.md").read_text().replace("](", "](figures/"))
    _say(times, f"finished in {time.perf_counter() - t_start:.0f} s: {len(written) - 1} figures, {summary}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        raise SystemExit(run_demo())
    except CombinabilityError as exc:
        raise SystemExit(f"demo failed: {exc}") from exc
