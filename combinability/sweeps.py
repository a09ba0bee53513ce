"""The sweep: draw coefficients, combine, evaluate, stream the results.

:func:`sweep` is orchestration only. For each value of a sampler's parameter and each
sample it draws a coefficient vector on the evaluation device, forms
``θ_v = (1 − v) ⊙ θ_A + v ⊙ θ_B`` there, evaluates it on every split and records the
loss, accuracy and (optionally) the §6.1 agreement counts. Memory stays ``O(d)``: one
coefficient vector and one combined vector exist at a time.

Every (value, sample) draws from its own random stream, seeded from
``(seed, value index, sample)`` by :class:`numpy.random.SeedSequence`, so results do
not depend on the order of evaluation, and an interrupted sweep resumed from its
file (``out=``) finishes with results identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.errors import (
    CombinabilityError,
    ConfigurationError,
    IncompatibleModelsError,
    SamplerError,
    UnknownNameError,
)
from combinability.files import output_lock
from combinability.results import json_attr, open_results, provenance, write_results

if TYPE_CHECKING:
    from combinability.backend import Backend, Evaluation
    from combinability.data.base import ArrayDataset
    from combinability.pair import ModelPair
    from combinability.samplers.base import Sampler

__all__ = ["sweep", "SPLITS", "sample_seed", "ResumeMismatchError"]

SPLITS = ("train", "test")


class ResumeMismatchError(CombinabilityError, ValueError):
    """An existing results file belongs to a different sweep than the one requested."""


def sample_seed(seed: int, value_index: int, sample: int, sampler: str = "") -> int:
    """The seed of one (value, sample) stream of a sampler.

    It depends only on its arguments (the sampler's name enters through a CRC-32, not
    Python's salted ``hash``), so draws do not depend on evaluation order, process or
    ``PYTHONHASHSEED``, and two samplers never share a stream.
    """
    salt = zlib.crc32(sampler.encode("utf-8"))
    entropy = [int(seed), salt, int(value_index), int(sample)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


@dataclass
class _Split:
    name: str
    data: ArrayDataset
    ends: dict[str, Evaluation]


def _resolve_data(data: Any, splits: Sequence[str], limit: int | None,
                  input_shape: tuple[int, ...] | None = None) -> dict[str, ArrayDataset]:
    from combinability.data.convert import as_datasets

    if isinstance(data, str):
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise UnknownNameError(f"unknown split(s) {bad}; valid splits: {', '.join(SPLITS)}")
    return {k: v.subset(limit) for k, v in as_datasets(data, list(splits), input_shape=input_shape).items()}


def _sampler(sampler: Sampler | str | None) -> Sampler:
    from combinability.samplers import Subcube, get_sampler

    if sampler is None:
        return Subcube()
    if isinstance(sampler, str):
        return get_sampler(sampler)
    if not callable(getattr(sampler, "draw", None)):
        raise SamplerError(f"expected a sampler (e.g. cb.Subcube()), got {type(sampler).__name__}")
    return sampler


def sweep(
    pair: ModelPair,
    sampler: Sampler | str | None = None,
    *,
    backend: str | Backend | None = None,
    data: str | ArrayDataset | Mapping[str, ArrayDataset] = "digits",
    splits: Sequence[str] = SPLITS,
    values: Sequence[Any] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    agreement: bool = False,
    limit: int | None = None,
    metrics: Sequence[str] = (),
    repair: str | Callable | None = None,
    repair_data: str | ArrayDataset | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> xr.Dataset:
    """Evaluate combinations of a pair's models over a sampler's parameter grid.

    Parameters
    ----------
    pair : ModelPair or ModelSet
        Two (or, for three-model samplers, three) models, naive or aligned
        (``pair.align(...)``); both are swept the same way. Select members of a larger
        set with ``models.select(0, 2)``.
    sampler : Sampler or str, default Subcube()
        Coefficient distribution (``cb.Uniform()``, ``cb.Linear(start=-1, stop=2)``, ...).
    backend : str or Backend, optional
        Evaluation backend; defaults to the pair's.
    data : str, (x, y), DataLoader, ArrayDataset or mapping of split to any of them, default "digits"
        Registered dataset name, or the data itself: ``(x_test, y_test)`` arrays (numpy or
        framework tensors), ``{"test": (x, y), "train": (x, y)}``, or a DataLoader.
    splits : sequence of {"train", "test"}
        Splits of a named dataset to evaluate on.
    values : sequence, optional
        Parameter values; default: the sampler's grid (25 equidistant values).
    samples : int, optional
        Draws per value; default 1 for deterministic samplers, 4 otherwise.
    seed : int
        Seeds every draw (see :func:`sample_seed`).
    batch_size : int
        Evaluation batch size.
    agreement : bool
        Also count the §6.1 agreement categories with A's and B's predictions.
    limit : int, optional
        Evaluate on the first ``limit`` examples of each split only.
    metrics : sequence of str
        Extra logit metrics (built-in ``"brier"``, or registered by plugins), each a
        variable with the dims of ``loss``.
    repair : str or callable, optional
        A registered repair (``combinability plugins`` lists them) or a callable
        ``repair(theta, context) -> theta`` applied to every combined vector before it is
        evaluated (see :class:`combinability.repairs.RepairContext`).
    repair_data : str or ArrayDataset, optional
        Data the repair may use (a dataset name's training split, or the data).
    out : path, optional
        Stream results to this netCDF file (atomically rewritten after every
        evaluation), under an exclusive lock for the whole sweep (``<out>.lock``): a second
        process sweeping into the same file is refused with the holder's pid. If it exists
        and holds a compatible, unfinished sweep, the sweep resumes from it; if it holds a
        different sweep, :class:`ResumeMismatchError` unless ``overwrite=True``.
    overwrite : bool
        Start afresh even when ``out`` exists.
    progress : bool
        Show a progress bar.

    Returns
    -------
    xarray.Dataset
        ``loss`` and ``accuracy`` with dims ``(split, <parameter>, sample)``
        (``(split, point, sample)`` for three-model samplers), the end models' scores
        ``loss_a``, ``accuracy_a``, ``loss_b``, ... per split, optional ``agreement``
        counts with a ``category`` dim, and provenance attributes.
    """
    from combinability.combination import combine, combine3
    from combinability.evaluation import Evaluator, get_logit_metric
    from combinability.plugins import get_backend
    from combinability.samplers.base import DrawContext

    smp = _sampler(sampler)
    if len(pair) > 3:
        raise ConfigurationError(f"the set holds {len(pair)} models; sweep two or three of them: "
                                 "models.select(0, 1) or models.select(0, 1, 2)")
    extra = [get_logit_metric(m) for m in metrics]
    repair_fn = None
    if repair is not None:
        from combinability.repairs import get_repair

        repair_fn = get_repair(repair)
        if repair_data is not None:
            from combinability.data.convert import as_dataset

            repair_data = as_dataset(repair_data, "train", name="repair_data")
    reserved = {"loss", "accuracy", "done", "agreement"}
    clash = [m.name for m in extra if m.name in reserved]
    if clash:
        raise ConfigurationError(f"metric names {clash} clash with the sweep's own variables {sorted(reserved)}")
    be = get_backend(backend or pair.backend)
    if be.name != pair.backend:
        raise IncompatibleModelsError(
            f"the pair's models belong to backend {pair.backend!r}; evaluate with that backend (got {be.name!r})"
        )
    three = getattr(smp, "models", 2) == 3
    if three and len(pair) < 3:
        raise IncompatibleModelsError(f"{type(smp).__name__} combines three models: build the pair with model_c=")
    grid = list(values) if values is not None else list(smp.grid_for(pair.layout))
    if not grid:
        raise SamplerError(f"{type(smp).__name__}: no parameter values to sweep")
    grid = [smp.validate(v, pair.layout) for v in grid]
    n_samples = 1 if smp.deterministic else (4 if samples is None else int(samples))
    if n_samples < 1:
        raise ConfigurationError(f"samples must be >= 1, got {samples}")
    from combinability.data.convert import check_labels, check_seed

    seed = check_seed(seed)
    input_shape = pair.table.data_shape if pair.table is not None else None
    datasets = _resolve_data(data, splits, limit, input_shape)
    if pair.table is not None:
        for ds in datasets.values():
            check_labels(ds, pair.table.num_classes)
    split_names = list(datasets)

    # -- the result arrays and their identity (what a resumed run must match) ----------
    if three:
        param_dim = "point"
        params = list(smp.parameters)
        coords: dict[str, Any] = {param_dim: np.arange(len(grid))}
        for j, name in enumerate(params):
            coords[name] = (param_dim, np.array([g[j] for g in grid], dtype=np.float64))
    else:
        param_dim = smp.parameter
        coords = {param_dim: np.asarray(grid)}
    coords.update({"split": split_names, "sample": np.arange(n_samples)})
    shape = (len(split_names), len(grid), n_samples)
    from combinability.metrics import AGREEMENT_CATEGORIES, agreement_counts

    data_name = next(iter(datasets.values())).name
    key = json_attr({
        "sampler": smp.settings, "values": [np.asarray(g).tolist() for g in grid], "samples": n_samples,
        "seed": seed, "splits": split_names, "data": data_name, "limit": limit, "agreement": agreement,
        "fingerprints": pair.fingerprints(), "sizes": {k: len(v) for k, v in datasets.items()},
        **({"metrics": [m.name for m in extra]} if extra else {}),
        **({"repair": repair if isinstance(repair, str) else getattr(repair, "__qualname__", repr(repair)),
            "repair_data": [getattr(repair_data, "name", ""), len(repair_data) if repair_data is not None else 0]}
           if repair is not None else {}),
    })
    loss = np.full(shape, np.nan)
    accuracy = np.full(shape, np.nan)
    counts = np.zeros((*shape, len(AGREEMENT_CATEGORIES)), dtype=np.int64)
    values = {m.name: np.full(shape, np.nan) for m in extra}
    done = np.zeros((len(grid), n_samples), dtype=bool)
    out_path = Path(out) if out is not None else None
    with output_lock(out_path):
        if out_path is not None and out_path.exists() and not overwrite:
            previous = open_results(out_path)
            if previous.attrs.get("sweep_key") != key:
                raise ResumeMismatchError(
                    f"{out_path} holds a different sweep (other sampler, values, seed, data or models); "
                    "pass overwrite=True to replace it, or choose another path"
                )
            loss[...] = previous["loss"].transpose("split", param_dim, "sample").values
            accuracy[...] = previous["accuracy"].transpose("split", param_dim, "sample").values
            done[...] = previous["done"].transpose(param_dim, "sample").values.astype(bool)
            for m in extra:
                values[m.name][...] = previous[m.name].transpose("split", param_dim, "sample").values
            if agreement:
                counts[...] = previous["agreement"].transpose("split", param_dim, "sample", "category").values

        # -- end models -----------------------------------------------------------------------
        template = pair.template
        layout = pair.layout
        ends = dict(zip("abc", pair.thetas, strict=False))
        dev = {m: be.asarray(t) for m, t in ends.items()}
        evaluator = Evaluator(be, template, layout, batch_size=batch_size, metrics=extra)
        split_info = []
        for name, ds in datasets.items():
            # one vector per call, as the combinations below: the same kernels give the same bits at v = 0 and 1
            evs = [evaluator.evaluate([dev[m]], ds)[0] for m in ends]
            split_info.append(_Split(name, ds, dict(zip(ends, evs, strict=True))))

        attrs = provenance(
            combinability_format="sweep",
            sweep_key=key,
            sampler=smp.name,
            sampler_settings=smp.settings,
            parameter=param_dim if not three else json_attr(list(smp.parameters)),
            architecture=pair.architecture,
            width=float(pair.width),
            backend=be.name,
            device=be.device(),
            framework_versions=be.versions(),
            dataset=data_name,
            splits=json_attr(split_names),
            examples=json_attr({s.name: len(s.data) for s in split_info}),
            seed=seed,
            samples=n_samples,
            alignment=pair.alignment,
            alignment_objective=(pair.transforms[1].objective if pair.transforms[1] is not None
                                 and getattr(pair.transforms[1], "objective", None) is not None else None),
            parameters=int(layout.size),
            fingerprints=pair.fingerprints(),
        )

        def build() -> xr.Dataset:
            dims = ("split", param_dim, "sample")
            variables: dict[str, Any] = {
                "loss": (dims, loss.copy(), {"long_name": "mean cross-entropy loss"}),
                "accuracy": (dims, accuracy.copy(), {"long_name": "top-1 accuracy"}),
                "done": ((param_dim, "sample"), done.copy(), {"long_name": "evaluation finished"}),
            }
            for m in extra:
                variables[m.name] = (dims, values[m.name].copy(), {"long_name": m.long_name or m.name})
            for m in ends:
                variables[f"loss_{m}"] = (("split",), np.array([s.ends[m].loss for s in split_info]),
                                          {"long_name": f"loss of model {m.upper()}"})
                variables[f"accuracy_{m}"] = (("split",), np.array([s.ends[m].accuracy for s in split_info]),
                                              {"long_name": f"accuracy of model {m.upper()}"})
            ds_coords = dict(coords)
            if agreement:
                variables["agreement"] = ((*dims, "category"), counts.copy(),
                                          {"long_name": "examples per agreement category (paper §6.1)"})
                ds_coords["category"] = list(AGREEMENT_CATEGORIES)
            return xr.Dataset(variables, coords=ds_coords, attrs=dict(attrs))

        # -- the loop --------------------------------------------------------------------------
        todo = [(i, s) for i in range(len(grid)) for s in range(n_samples) if not done[i, s]]
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{smp.name} ({pair.alignment})", unit="eval")
        xp = be.xp()
        repair_cache: dict = {}
        if repair_fn is not None and callable(getattr(repair_fn, "validate", None)):
            from combinability.repairs import RepairContext

            # a repair checks its inputs (e.g. BatchNorm present, repair_data shape) before the long loop
            repair_fn.validate(RepairContext(be, template, layout, list(dev.values()), None, repair_data, pair.table,
                                             repair_cache))
        for i, s in todo:
            ctx = DrawContext(layout, be.random(sample_seed(seed, i, s, smp.name)), theta_a=dev["a"], theta_b=dev["b"])
            if three:
                v_b, v_c = smp.draw(grid[i], ctx)
                theta = combine3(dev["a"], dev["b"], dev["c"], v_b, v_c)
                v = (v_b, v_c)
            else:
                v = smp.draw(grid[i], ctx)
                theta = combine(dev["a"], dev["b"], v)
            del ctx
            if repair_fn is not None:
                from combinability.repairs import RepairContext

                theta = repair_fn(theta, RepairContext(be, template, layout, list(dev.values()), v, repair_data,
                                                       pair.table, repair_cache))
            del v
            for k, split in enumerate(split_info):
                (ev,) = evaluator.evaluate([theta], split.data)
                loss[k, i, s] = ev.loss
                accuracy[k, i, s] = ev.accuracy
                for m in extra:
                    values[m.name][k, i, s] = ev.values[m.name]
                if agreement:
                    counts[k, i, s] = agreement_counts(ev.predictions, split.ends["a"].predictions,
                                                       split.ends["b"].predictions, split.data.y)
            del theta
            done[i, s] = True
            if out_path is not None:
                write_results(build(), out_path)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        del xp
        result = build()
        if out_path is not None and not todo and not out_path.exists():
            write_results(result, out_path)
        return result


def sweep_pairs(pairs: Mapping[str, ModelPair], sampler: Sampler | str | None = None, *,
                out: str | Path | None = None, attrs: Mapping[str, Any] | None = None,
                **kwargs: Any) -> xr.Dataset:
    """:func:`sweep` several pairs (e.g. ``{"naive": p.naive, "aligned": p}``) along an ``alignment`` dim.

    With ``out``, each pair streams to ``.<out stem>.<key>.partial.nc`` beside ``out``
    and the combined Dataset (with ``attrs`` added) is written to ``out`` at the end.
    """
    parts = []
    for name, pair in pairs.items():
        part_out = None
        if out is not None:
            out = Path(out)
            part_out = out.with_name(f".{out.stem}.{name}.partial.nc")
        parts.append(sweep(pair, sampler, out=part_out, **kwargs))
    ds = xr.concat(parts, dim=xr.DataArray(list(pairs), dims="alignment", name="alignment"),
                   combine_attrs="drop_conflicts")
    ds.attrs["alignments"] = json.dumps(list(pairs))
    for name, part in zip(pairs, parts, strict=True):
        ds.attrs[f"{name}_alignment_objective"] = part.attrs.get("alignment_objective", np.nan)
    ds.attrs.pop("sweep_key", None)
    ds.attrs.update(attrs or {})
    if out is not None:
        write_results(ds, out)
        for name in pairs:
            Path(out).with_name(f".{Path(out).stem}.{name}.partial.nc").unlink(missing_ok=True)
    return ds
