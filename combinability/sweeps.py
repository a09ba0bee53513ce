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

import contextlib
import json
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.errors import (
    ConfigurationError,
    IncompatibleModelsError,
    OutputExistsError,
    SamplerError,
    UnknownNameError,
)
from combinability.files import check_writable, output_lock, stop_on_sigterm
from combinability.progress import progress_bar
from combinability.result_stream import ResultStream
from combinability.results import (
    annotate,
    data_identity,
    existing_result,
    is_complete,
    json_attr,
    provenance,
    reused_as_it_is,
    write_results,
)

if TYPE_CHECKING:
    from combinability.backend import Backend, Evaluation
    from combinability.data.base import ArrayDataset
    from combinability.executors.cells import CellResult
    from combinability.pair import ModelPair
    from combinability.samplers.base import Sampler

__all__ = ["sweep", "sweep_pairs", "sweep_key", "SPLITS", "sample_seed", "ResumeMismatchError"]

SPLITS = ("train", "test")


class ResumeMismatchError(OutputExistsError, ValueError):
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


def resolve_data(data: Any, splits: Sequence[str], limit: int | None,
                 input_shape: tuple[int, ...] | None = None) -> dict[str, ArrayDataset]:
    """The evaluated splits of ``data`` (a dataset name, ``(x, y)`` or a mapping), each cut to ``limit``."""
    from combinability.data.convert import as_datasets

    if isinstance(data, str):
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise UnknownNameError(f"unknown split(s) {bad}; valid splits: {', '.join(SPLITS)}")
    found = as_datasets(data, list(splits), input_shape=input_shape, limit=limit)
    return {k: v.subset(limit) for k, v in found.items()}


def _sampler(sampler: Sampler | str | None) -> Sampler:
    from combinability.samplers import Subcube, get_sampler

    if sampler is None:
        return Subcube()
    if isinstance(sampler, str):
        return get_sampler(sampler)
    if isinstance(sampler, type) and callable(getattr(sampler, "draw", None)):
        raise SamplerError(f"sampler={sampler.__name__} is the sampler's class; pass an instance, e.g. "
                           f"{sampler.__name__}()")
    if not callable(getattr(sampler, "draw", None)):
        raise SamplerError(f"expected a sampler (e.g. cb.Subcube()), got {type(sampler).__name__}")
    return sampler


def _sweep_arguments(pair: Any, splits: Any, values: Any, samples: Any) -> tuple[list[str], list[Any] | None]:
    """Check the types of :func:`sweep`'s arguments; a single split name stands for a list of it.

    Raises
    ------
    ConfigurationError
        For a pair that is not a ModelSet, ``values`` that is not a sequence or repeats a value, or
        ``samples`` that is not an int.
    """
    from combinability.sets import ModelSet

    if not isinstance(pair, ModelSet):
        raise ConfigurationError(f"sweep takes a ModelPair (or ModelSet) of the models to combine, got "
                                 f"{type(pair).__name__}: cb.ModelPair(model_a, model_b) (example_input= for your own "
                                 "models)")
    splits = [splits] if isinstance(splits, str) else list(splits)
    if values is not None:
        if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
            raise ConfigurationError(f"values must be a sequence of the sampler's parameter values, e.g. "
                                     f"values=[{values!r}], got {values!r}")
        values = list(values)
        seen: list[Any] = []
        for v in values:
            if any(np.array_equal(np.asarray(v), np.asarray(w)) for w in seen):
                raise ConfigurationError(f"values repeats {v!r}: each parameter value is one coordinate of the "
                                         "result; give it once (samples= draws several combinations per value)")
            seen.append(v)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int | np.integer)):
        raise ConfigurationError(f"samples must be an int >= 1 (combinations drawn per value), got {samples!r}")
    return splits, values


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
    attrs: Mapping[str, Any] | None = None,
    client: Any = None,
    cells_per_task: int | None = None,
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
        Stream results to this netCDF file: it is created at the start (every cell NaN,
        a ``done`` mask), each finished evaluation is written into it in place (no
        rewrite; a killed run keeps every finished evaluation), and it is replaced by the
        final Dataset (without ``done``) at the end. The sweep holds an exclusive lock on
        it (a hidden ``.<name>.lock`` beside it): a second process sweeping into the same file is refused with
        the holder's pid. If the file holds this same sweep (same :func:`sweep_key`:
        sampler, values, seed, data content, models, batch size, backend and device), an
        unfinished one resumes and a finished one is returned as is; any other file is
        refused (:class:`ResumeMismatchError`, naming the settings that differ) unless
        ``overwrite=True``.
    overwrite : bool
        Start afresh even when ``out`` holds another sweep or another file.
    progress : bool
        Show a progress bar (on a terminal only).
    attrs : mapping, optional
        Extra attributes stored in the result (e.g. the command line's settings).
    client : dask.distributed.Client, optional
        Spread the evaluations over the workers of this Dask cluster (``pip install
        'combinability[dask]'``; docs/clusters.md): the models and data are scattered to
        every worker once, each task evaluates a batch of (value, sample) cells drawn from
        the same seeds as here, and results stream into ``out`` as tasks finish, so the
        Dataset is the in-process one (bit for bit on the CPU). The workers are checked
        first: another combinability version, a missing framework or device, or (on CUDA)
        no worker with a ``GPU`` resource is refused before any work. Default: in-process.
    cells_per_task : int, optional
        With ``client``: (value, sample) cells per task (default: the remaining cells cut
        into about 4 tasks per worker).

    Returns
    -------
    xarray.Dataset
        ``loss`` and ``accuracy`` with dims ``(split, <parameter>, sample)``
        (``(split, point, sample)`` for three-model samplers), the end models' scores
        ``loss_a``, ``accuracy_a``, ``loss_b``, ... per split, optional ``agreement``
        counts with a ``category`` dim, and provenance attributes. Every coordinate
        and variable has a ``long_name`` (and ``units`` where one applies).
    """
    _check_attrs(attrs)
    plan = _plan(pair, sampler, backend=backend, data=data, splits=splits, values=values, samples=samples,
                 seed=seed, batch_size=batch_size, agreement=agreement, limit=limit, metrics=metrics,
                 repair=repair, repair_data=repair_data)
    cluster = _cluster(client, cells_per_task, [plan])
    with stop_on_sigterm():
        return _run(plan, out=out, overwrite=overwrite, progress=progress, attrs=attrs, cluster=cluster)


#: Attributes that identify a result file (its kind, the settings a resumed run must match): not the caller's.
_RESERVED_ATTRS = ("combinability_format", "sweep_key", "run_key")


def _check_attrs(attrs: Mapping[str, Any] | None) -> None:
    """Refuse ``attrs`` that would replace what identifies a result, before any work."""
    taken = sorted(set(attrs or {}) & set(_RESERVED_ATTRS))
    if taken:
        raise ConfigurationError(f"attrs may not set {', '.join(taken)}: the library writes these to identify the "
                                 f"result and resume it; reserved: {', '.join(_RESERVED_ATTRS)}")


@dataclass(frozen=True)
class _Cluster:
    """A checked Dask client and how to cut the sweep into tasks."""

    client: Any
    workers: list[str]
    cells_per_task: int | None


def _cluster(client: Any, cells_per_task: int | None, plans: Sequence[_Plan]) -> _Cluster | None:
    """Check ``client``'s workers against every plan's backend (before any work); None without a client."""
    if cells_per_task is not None and (isinstance(cells_per_task, bool) or not isinstance(cells_per_task, int)
                                       or cells_per_task < 1):
        raise ConfigurationError(f"cells_per_task must be an integer >= 1, got {cells_per_task!r}")
    if client is None:
        if cells_per_task is not None:
            raise ConfigurationError("cells_per_task applies to a distributed sweep only: give client= too")
        return None
    from combinability.executors.cells import portable_backend
    from combinability.executors.dask_cluster import check_payload, check_workers

    workers: list[str] = []
    for be in {repr(p.be): p.be for p in plans}.values():
        workers = check_workers(client, be)
    # what _run scatters (CellWork), less the flat vectors: the workers must import every class it refers to
    check_payload(client, [(portable_backend(p.be), p.pair.template, p.pair.table, p.smp, tuple(p.extra), p.repair_fn,
                            p.repair_data, p.datasets) for p in plans])
    return _Cluster(client, workers, cells_per_task)


@dataclass
class _Plan:
    """A validated sweep, before any evaluation: what to evaluate, and its identity (``key``)."""

    pair: ModelPair
    smp: Sampler
    be: Backend
    three: bool
    grid: list[Any]
    n_samples: int
    seed: int
    datasets: dict[str, ArrayDataset]
    extra: list[Any]
    repair: Any
    repair_fn: Any
    repair_data: Any
    batch_size: int
    agreement: bool
    key: dict[str, Any]


def _plan(pair: ModelPair, sampler: Sampler | str | None, *, backend: str | Backend | None = None,
          data: Any = "digits", splits: Sequence[str] = SPLITS, values: Sequence[Any] | None = None,
          samples: int | None = None, seed: int = 0, batch_size: int = 1000, agreement: bool = False,
          limit: int | None = None, metrics: Sequence[str] = (), repair: Any = None, repair_data: Any = None) -> _Plan:
    """Check every argument of :func:`sweep` and resolve its data; nothing is evaluated."""
    from combinability.evaluation import get_logit_metric
    from combinability.plugins import get_backend

    smp = _sampler(sampler)
    splits, values = _sweep_arguments(pair, splits, values, samples)
    if len(pair) > 3:
        raise ConfigurationError(f"the set holds {len(pair)} models; sweep two or three of them: "
                                 "models.select(0, 1) or models.select(0, 1, 2)")
    extra = [get_logit_metric(m) for m in metrics]
    repair_fn = None
    if repair is None and repair_data is not None:
        raise ConfigurationError("repair_data= is given but repair= is not, so nothing would use it; pass "
                                 "repair='reset' (BatchNorm statistics) or repair='repair' (REPAIR), or drop "
                                 "repair_data=")
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
    be = get_backend(backend) if backend is not None else pair.backend_obj
    if be.name != pair.backend:
        raise IncompatibleModelsError(
            f"the pair's models belong to backend {pair.backend!r}; evaluate with that backend (got {be.name!r})"
        )
    three = getattr(smp, "models", 2) == 3
    if three and len(pair) < 3:
        raise IncompatibleModelsError(f"{type(smp).__name__} combines three models: build the pair with model_c=")
    from combinability.pair import ModelPair

    if not three and len(pair) == 3 and not isinstance(pair, ModelPair):  # (a pair's model_c waits for a Triangle)
        raise ConfigurationError(f"the set holds 3 models and {type(smp).__name__} combines two: sweep two of them, "
                                 f"models.select(0, 1) (or any other two), or all three with cb.Triangle()")
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
    datasets = resolve_data(data, splits, limit, input_shape)
    if pair.table is not None:
        for ds in datasets.values():
            check_labels(ds, pair.table.num_classes)
    if batch_size is None or int(batch_size) < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    key = sweep_key(smp, grid, n_samples, seed, datasets, pair, be, batch_size=batch_size, agreement=agreement,
                    limit=limit, metrics=[m.name for m in extra], repair=repair, repair_data=repair_data)
    return _Plan(pair, smp, be, three, grid, n_samples, seed, datasets, extra, repair, repair_fn, repair_data,
                 int(batch_size), bool(agreement), key)


def _run(plan: _Plan, *, out: str | Path | None, overwrite: bool, progress: bool,
         attrs: Mapping[str, Any] | None, cluster: _Cluster | None = None) -> xr.Dataset:
    """Evaluate a planned sweep, streaming to ``out``; see :func:`sweep`."""
    from combinability.evaluation import Evaluator
    from combinability.executors.cells import CellRunner, CellWork

    pair, smp, be, three, grid, n_samples, seed = (plan.pair, plan.smp, plan.be, plan.three, plan.grid,
                                                   plan.n_samples, plan.seed)
    datasets, extra, repair_fn, repair_data = plan.datasets, plan.extra, plan.repair_fn, plan.repair_data
    batch_size, agreement, key = plan.batch_size, plan.agreement, plan.key
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
    from combinability.metrics import AGREEMENT_CATEGORIES

    data_name = next(iter(datasets.values())).name
    loss = np.full(shape, np.nan)
    accuracy = np.full(shape, np.nan)
    counts = np.zeros((*shape, len(AGREEMENT_CATEGORIES)), dtype=np.int64)
    values = {m.name: np.full(shape, np.nan) for m in extra}
    done = np.zeros((len(grid), n_samples), dtype=bool)
    out_path = Path(out) if out is not None else None
    with output_lock(out_path):
        try:
            previous = existing_result(out_path, key, overwrite=overwrite, attr="sweep_key")
        except OutputExistsError as exc:
            raise ResumeMismatchError(str(exc)) from None
        if previous is not None and is_complete(previous):
            if "done" in previous:  # every cell was streamed, and the run stopped before it finished the file
                previous = previous.drop_vars("done")
                write_results(previous, out_path)
            return reused_as_it_is(previous, attrs, out_path)
        if previous is not None:
            loss[...] = previous["loss"].transpose("split", param_dim, "sample").values
            accuracy[...] = previous["accuracy"].transpose("split", param_dim, "sample").values
            done[...] = previous["done"].transpose(param_dim, "sample").values.astype(bool)
            for m in extra:
                values[m.name][...] = previous[m.name].transpose("split", param_dim, "sample").values
            if agreement:
                counts[...] = previous["agreement"].transpose("split", param_dim, "sample", "category").values
        if out_path is not None:
            check_writable(out_path, what="results file")

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

        run_attrs = provenance(**{**dict(
            combinability_format="sweep",
            sweep_key=json_attr(key),
            sampler=smp.name,
            sampler_settings=smp.settings,
            parameter=param_dim if not three else json_attr(list(smp.parameters)),
            architecture=pair.architecture,
            width=float(pair.width),
            backend=be.name,
            device=be.device(),
            compute_dtype=be.compute_dtype,
            framework_versions=be.versions(),
            dataset=data_name,
            splits=json_attr(split_names),
            examples=json_attr({s.name: len(s.data) for s in split_info}),
            seed=seed,
            samples=n_samples,
            batch_size=batch_size,
            alignment=pair.alignment,
            alignment_settings=json_attr(getattr(pair, "alignment_settings", None)),
            alignment_objective=(pair.transforms[1].objective if pair.transforms[1] is not None
                                 and getattr(pair.transforms[1], "objective", None) is not None else None),
            parameters=int(layout.size),
            fingerprints=key["models"],  # hashed once, for the run key
            **_member_alignments(pair),
        ), **dict(attrs or {})})  # the caller's attributes win (as in sweep_pairs), but not the run's identity
        labels = {param_dim: {"long_name": getattr(smp, "parameter_long_name", "") or str(param_dim)}}

        def build() -> xr.Dataset:
            dims = ("split", param_dim, "sample")
            variables: dict[str, Any] = {
                "loss": (dims, loss.copy(), {"long_name": "mean cross-entropy loss", "units": "nats"}),
                "accuracy": (dims, accuracy.copy(), {"long_name": "top-1 accuracy", "units": "1"}),
                "done": ((param_dim, "sample"), done.copy(), {"long_name": "evaluation finished"}),
            }
            for m in extra:
                variables[m.name] = (dims, values[m.name].copy(), {"long_name": m.long_name or m.name})
            for m in ends:
                variables[f"loss_{m}"] = (("split",), np.array([s.ends[m].loss for s in split_info]),
                                          {"long_name": f"loss of model {m.upper()}", "units": "nats"})
                variables[f"accuracy_{m}"] = (("split",), np.array([s.ends[m].accuracy for s in split_info]),
                                              {"long_name": f"accuracy of model {m.upper()}", "units": "1"})
            ds_coords = dict(coords)
            if agreement:
                variables["agreement"] = ((*dims, "category"), counts.copy(),
                                          {"long_name": "examples per agreement category (paper §6.1)"})
                ds_coords["category"] = list(AGREEMENT_CATEGORIES)
            return annotate(xr.Dataset(variables, coords=ds_coords, attrs=dict(run_attrs)), labels)

        # -- the loop: one cell at a time here, or batches of cells on a Dask cluster ----------
        todo = [(i, s) for i in range(len(grid)) for s in range(n_samples) if not done[i, s]]
        work = CellWork(uuid.uuid4().hex, be, template, layout, tuple(pair.thetas), smp, tuple(grid), seed, three,
                        dict(datasets), batch_size, tuple(extra), agreement,
                        {s.name: (s.ends["a"].predictions, s.ends["b"].predictions) for s in split_info}
                        if agreement else {}, repair_fn, repair_data, pair.table)
        runner = CellRunner(work, be, evaluator, dev)
        runner.validate_repair()  # a repair checks its inputs (e.g. BatchNorm present) before the long loop
        if cluster is None:
            results: Iterator[CellResult] = (runner(i, s) for i, s in todo)
        else:
            from combinability.executors.cells import portable_backend
            from combinability.executors.dask_cluster import run_cells

            run_attrs["executor"] = f"dask ({len(cluster.workers)} workers)"
            results = run_cells(cluster.client, replace(work, backend=portable_backend(be)), todo,
                                device=be.device(), workers=len(cluster.workers),
                                cells_per_task=cluster.cells_per_task)
        bar = progress_bar(total=len(todo), desc=f"{smp.name} ({pair.alignment})", unit="eval",
                           enabled=bool(progress and todo))
        stream = ResultStream.create(out_path, build()) if out_path is not None else None
        try:
            with contextlib.closing(results):
                for cell in results:
                    i, s = cell.value, cell.sample
                    loss[:, i, s] = cell.loss
                    accuracy[:, i, s] = cell.accuracy
                    for m in extra:
                        values[m.name][:, i, s] = cell.values[m.name]
                    if agreement:
                        counts[:, i, s] = cell.counts
                    done[i, s] = True
                    if stream is not None:
                        cells = {"loss": loss[:, i, s], "accuracy": accuracy[:, i, s],
                                 **{m.name: values[m.name][:, i, s] for m in extra}}
                        if agreement:
                            cells["agreement"] = counts[:, i, s]
                        stream.append({param_dim: i, "sample": s}, cells)
                    bar.update(1)
        finally:
            bar.close()
            if stream is not None:
                stream.close()
        result = build().drop_vars("done")
        if stream is not None:
            stream.finish(result)
        _warn_non_finite(result, layout.names, repair_fn is not None)
        return result


def _member_alignments(pair: Any) -> dict[str, Any]:
    """Attributes of a set's alignments beyond B's: every member's objective (a three-model sweep), and where the
    first member was itself transformed (a selection ``models.select(1, 2)`` of a set aligned to its model 0),
    that every member was aligned to a model outside the selection."""
    transforms = list(getattr(pair, "transforms", ()) or ())
    out: dict[str, Any] = {}
    if len(transforms) > 2:
        out["alignment_objectives"] = json_attr([getattr(t, "objective", None) if t is not None else None
                                                 for t in transforms])
    if transforms and transforms[0] is not None:
        out["aligned_through"] = ("each member was aligned to the reference of the set it was selected from, not "
                                  "to this selection's first member; the objectives are of those alignments")
    return out


def _warn_non_finite(result: xr.Dataset, names: Sequence[str], repaired: bool) -> None:
    """Warn (:class:`~combinability.errors.NonFiniteLossWarning`) when combined models gave a NaN loss, saying
    why where it can: coefficients outside ``[0, 1]`` make a BatchNorm's combined running variance negative."""
    bad = ~np.isfinite(np.asarray(result["loss"].values))
    if not bad.any():
        return
    from combinability.errors import NonFiniteLossWarning

    statistics = [n for n in names if n.endswith(("running_var", "/var"))]
    why = (f" The models hold BatchNorm running variances ({statistics[0]}, ...), which coefficients outside "
           f"[0, 1] can combine into negative values; repair='reset' recomputes them on data."
           if statistics and not repaired else "")
    warnings.warn(f"{int(bad.sum())} of {bad.size} evaluations of combined models gave a loss that is not finite "
                  f"(NaN in the result; barriers over them are NaN).{why}", NonFiniteLossWarning, stacklevel=4)


def sweep_key(smp: Sampler, grid: Sequence[Any], samples: int, seed: int, datasets: Mapping[str, ArrayDataset],
              pair: ModelPair, be: Backend, *, batch_size: int, agreement: bool, limit: int | None,
              metrics: Sequence[str], repair: Any, repair_data: Any) -> dict[str, Any]:
    """Every setting that changes a number of a sweep: what a resumed run must match.

    The data enter by content (SHA-256 of the examples and labels actually evaluated),
    the models by their fingerprints, the evaluation by the backend's device and mode
    (``repr``) and the batch size.
    """
    key: dict[str, Any] = {
        "sampler": smp.settings, "values": [np.asarray(g).tolist() for g in grid], "samples": samples,
        "seed": seed, "splits": list(datasets), "data": {k: data_identity(v, split=False) for k, v in datasets.items()},
        "limit": limit, "agreement": agreement, "models": pair.fingerprints(), "batch_size": int(batch_size),
        "evaluation": repr(be), "metrics": list(metrics),
    }
    if repair is not None:
        key["repair"] = repair if isinstance(repair, str) else getattr(repair, "__qualname__", repr(repair))
        key["repair_data"] = data_identity(repair_data, split=False) if repair_data is not None else None
    return key


def sweep_pairs(pairs: Mapping[str, ModelPair], sampler: Sampler | str | None = None, *,
                out: str | Path | None = None, attrs: Mapping[str, Any] | None = None,
                overwrite: bool = False, progress: bool = False, client: Any = None,
                cells_per_task: int | None = None, **kwargs: Any) -> xr.Dataset:
    """:func:`sweep` several pairs (e.g. ``{"naive": p.naive, "aligned": p}``) along an ``alignment`` dim.

    Every pair is planned (and its arguments checked) before any is evaluated. With
    ``out``, each pair streams to ``.<out stem>.<name>.partial.nc`` beside ``out`` (and
    resumes from it) and the combined Dataset (with ``attrs`` added) is written to
    ``out`` at the end. A finished ``out`` of the same sweeps is returned as is; a file
    of other sweeps, or not this library's, is refused
    (:class:`~combinability.errors.OutputExistsError`, naming what differs) unless
    ``overwrite=True``. Each part's provenance (creation time, model fingerprints, run
    key) is kept in the ``parts`` attribute. With ``client`` (a ``dask.distributed.Client``)
    every pair's cells run on the cluster's workers, as in :func:`sweep`.
    """
    _check_attrs(attrs)
    plans = {name: _plan(pair, sampler, **kwargs) for name, pair in pairs.items()}
    cluster = _cluster(client, cells_per_task, list(plans.values()))
    keys = {name: plan.key for name, plan in plans.items()}
    out = Path(out) if out is not None else None
    with stop_on_sigterm(), output_lock(out):
        previous = existing_result(out, keys, overwrite=overwrite)
        if previous is not None:
            return previous
        if out is not None:
            check_writable(out, what="results file")
        parts = []
        for name, plan in plans.items():
            part_out = out.with_name(f".{out.stem}.{name}.partial.nc") if out is not None else None
            parts.append(_run(plan, out=part_out, overwrite=overwrite, progress=progress, attrs=None,
                              cluster=cluster))
        ds = xr.concat(parts, dim=xr.DataArray(list(pairs), dims="alignment", name="alignment"),
                       combine_attrs="drop_conflicts")
        own = ("created", "sweep_key", "fingerprints", "alignment", "alignment_settings", "alignment_objective",
               "framework_versions")
        ds.attrs["alignments"] = json.dumps(list(pairs))
        ds.attrs["parts"] = json_attr({name: {k: part.attrs.get(k) for k in own if k in part.attrs}
                                       for name, part in zip(pairs, parts, strict=True)})
        for name, part in zip(pairs, parts, strict=True):
            ds.attrs[f"{name}_alignment_objective"] = part.attrs.get("alignment_objective", np.nan)
        fresh = provenance()
        for k in ("created", "history"):
            ds.attrs[k] = fresh[k]
        ds.attrs.pop("sweep_key", None)
        ds.attrs["run_key"] = json_attr(keys)
        ds.attrs.update(attrs or {})
        annotate(ds)
        if out is not None:
            write_results(ds, out)
            for name in pairs:
                out.with_name(f".{out.stem}.{name}.partial.nc").unlink(missing_ok=True)
    return ds
