"""Compare the aligners on the same models.

Two questions, one Dataset:

* **Pairs.** For each aligner (identity, weight and activation matching, STE at the
  midpoint, STE trained on an element-wise sampler, Sinkhorn re-basin, or any registered
  aligner), the empirical loss and accuracy barriers (Def. 3.3) of the linear path and of
  the paper's element-wise schemes (uniform, subcube, Bernoulli) between model A and the
  aligned model B, and the wall time the alignment took.
* **Many models.** For ``N = 2 … 8`` models and each many-model method of
  :func:`combinability.align_many` (MergeMany, cycle-consistent, hierarchical, reference),
  the loss and accuracy of the merged model (``ms.merge()``: the average of the aligned
  members) and the worst linear-path barrier over every pair of aligned members.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.errors import ConfigurationError, SamplerError
from combinability.experiments.compare import check_client, reuse_or_run
from combinability.results import barriers, data_identity, provenance
from combinability.samplers import Bernoulli, Linear, Subcube, Uniform
from combinability.samplers.base import Sampler
from combinability.sets import ModelSet

__all__ = ["ALIGNER_METHODS", "ALIGNER_SAMPLERS", "MANY_METHODS", "MAX_MODELS", "STE_SAMPLER", "compare_aligners"]

log = logging.getLogger(__name__)

#: The pair aligners compared by default; ``"ste_elementwise"`` is STE trained with ``sampler=ste_sampler``.
ALIGNER_METHODS = ("identity", "weight", "activation", "ste", "ste_elementwise", "sinkhorn")
#: The schemes whose barriers are measured by default: the linear path and the paper's element-wise samplers.
ALIGNER_SAMPLERS = (Linear(), Uniform(), Subcube(), Bernoulli())
#: The element-wise sampler ``"ste_elementwise"`` trains on by default (the whole hypercube).
STE_SAMPLER = Uniform()
#: The many-model methods of :func:`combinability.align_many`.
MANY_METHODS = ("mergemany", "cycle", "hierarchical", "reference")
#: The largest number of models of the many-model part.
MAX_MODELS = 8

_ELEMENTWISE = "ste_elementwise"


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of one run."""

    base: ModelSet
    methods: tuple[str, ...]
    samplers: tuple[Sampler, ...]
    many_methods: tuple[str, ...]
    n_models: tuple[int, ...]
    eval_data: dict[str, Any]
    train_data: Any
    learned: dict[str, Any]
    many_options: dict[str, Any]
    ste_sampler: Sampler
    values_per_sampler: int | None
    samples: int
    seed: int
    batch_size: int
    example_input: Any = None
    client: Any = None


# -- checks, before any work ---------------------------------------------------------------------
def _model_set(pair_or_models: Any, backend: str | None, example_input: Any) -> ModelSet:
    """The naive set of every model given (a ModelPair / ModelSet, or a sequence of native models)."""
    if isinstance(pair_or_models, ModelSet):
        models: Sequence[Any] = pair_or_models.naive or pair_or_models
    elif isinstance(pair_or_models, str | bytes) or not isinstance(pair_or_models, Sequence):
        raise ConfigurationError("compare_aligners: pass a cb.ModelPair / cb.ModelSet or a list of 2 to "
                                 f"{MAX_MODELS} models, got {type(pair_or_models).__name__}")
    else:
        models = list(pair_or_models)
    if not 2 <= len(models) <= MAX_MODELS:
        raise ConfigurationError(f"compare_aligners: needs 2 to {MAX_MODELS} models, got {len(models)}")
    if isinstance(models, ModelSet):
        return models
    return ModelSet(models, backend=backend, example_input=example_input)


def _refusals(base: ModelSet, methods: Sequence[str], many: Sequence[str]) -> dict[str, str]:
    """``{method: why}`` for the pair aligners and many-model methods that cannot align ``base``'s
    models (a symmetry kind they do not handle; :func:`combinability.align.check_aligner`)."""
    from combinability.align import AlignTask, check_aligner, check_kinds
    from combinability.align.many import METHOD_KINDS

    spec = base._alignment_spec("all")
    task = AlignTask(spec=spec, reference={}, other={}, feature_points=base._points_for(spec),
                     part_points=base.part_points)
    out = {}
    for method in methods:
        try:
            check_aligner("ste" if method == _ELEMENTWISE else method, task)
        except ConfigurationError as exc:
            out[method] = str(exc)
    for method in many:
        try:
            check_kinds(method, METHOD_KINDS[method], spec, what="align_many method")
        except ConfigurationError as exc:
            out[method] = str(exc)
    return out


def _names(values: Sequence[str], valid: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    unknown = [v for v in values if v not in valid]
    if unknown:
        raise ConfigurationError(f"compare_aligners: unknown {what} {unknown}; valid: {', '.join(valid)}")
    if len(set(values)) != len(values):
        raise ConfigurationError(f"compare_aligners: {what} must not repeat, got {list(values)}")
    return values


def _samplers(samplers: Sequence[Sampler | str]) -> tuple[Sampler, ...]:
    from combinability.samplers import get_sampler

    out = tuple(get_sampler(s) if isinstance(s, str) else s for s in samplers)
    for s in out:
        if not isinstance(s, Sampler) or s.models != 2:
            raise SamplerError(f"compare_aligners: samplers must be two-model samplers (cb.Linear(), cb.Uniform(), "
                               f"'subcube', ...), got {s!r}")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SamplerError(f"compare_aligners: each scheme may appear once, got {names}")
    return out


def _n_models(n_models: Sequence[int] | None, available: int, many: bool) -> tuple[int, ...]:
    if not many:
        return ()
    if n_models is None:
        return tuple(range(2, available + 1))
    ns = tuple(n_models)
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 2 <= n <= available]
    if bad or len(set(ns)) != len(ns):
        raise ConfigurationError(f"compare_aligners: n_models must be distinct integers from 2 to the {available} "
                                 f"models given, got {list(ns)}")
    return tuple(sorted(int(n) for n in ns))


def _needs(method: str) -> tuple[str, ...]:
    from combinability.plugins import get_registration

    name = "ste" if method == _ELEMENTWISE else method
    return tuple(get_registration("aligners", name).needs)


def _train_data(base: ModelSet, data: Any, train_data: Any, train_examples: int | None) -> Any:
    """The training data learned and data-driven aligners see, as an ArrayDataset (checked now)."""
    from combinability.data.convert import as_dataset, check_labels

    source = train_data if train_data is not None else data
    if isinstance(source, Mapping):
        if "train" not in source:
            raise ConfigurationError("compare_aligners: data is a mapping without a 'train' split; the data-driven "
                                     "aligners need one: pass train_data=(x, y)")
        source = source["train"]
    shape = base.table.data_shape if base.table is not None else None
    ds = as_dataset(source, "train", name="train_data", input_shape=shape)
    if base.table is not None and base.table.num_classes is not None:
        check_labels(ds, base.table.num_classes)
    return ds.subset(train_examples, seed=0) if train_examples is not None else ds


def _eval_data(base: ModelSet, data: Any, splits: Sequence[str], limit: int | None) -> dict[str, Any]:
    """The evaluation splits exactly as :func:`combinability.sweep` cuts them (first ``limit`` examples)."""
    from combinability.data.convert import as_datasets, check_labels

    shape = base.table.data_shape if base.table is not None else None
    found = as_datasets(data, list(splits), input_shape=shape, limit=limit)
    sets = {k: v.subset(limit) for k, v in found.items()}
    if base.table is not None and base.table.num_classes is not None:
        for ds in sets.values():
            check_labels(ds, base.table.num_classes)
    return sets


def _positive(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigurationError(f"compare_aligners: {name} must be an integer >= 1"
                                 f"{' or None' if optional else ''}, got {value!r}")


# -- the pair part -------------------------------------------------------------------------------
def _align(s: _Settings, method: str) -> tuple[ModelSet, float]:
    """``(aligned pair, wall time in s)`` of one aligner on models A and B."""
    pair = s.base.select(0, 1)
    needs = _needs(method)
    options: dict[str, Any] = {"seed": s.seed}
    if "data" in needs:
        options["data"] = s.train_data
    if "model" in needs:
        options.update(s.learned)
    if method == _ELEMENTWISE:
        options["sampler"] = s.ste_sampler
    t0 = time.perf_counter()
    aligned = pair.align("ste" if method == _ELEMENTWISE else method, **options)
    elapsed = time.perf_counter() - t0
    log.info("compare_aligners: %s alignment in %.2f s", method, elapsed)
    return aligned, elapsed


def _values(sampler: Sampler, layout: Any, per_sampler: int | None) -> list[Any] | None:
    """``per_sampler`` equidistant values of the sampler's grid (its ends included); None for the whole grid."""
    if per_sampler is None:
        return None
    grid = np.asarray(sampler.grid_for(layout))
    idx = np.unique(np.round(np.linspace(0, len(grid) - 1, per_sampler)).astype(int))
    return list(grid[idx])


def _sweep(s: _Settings, pairs: Mapping[str, ModelSet], sampler: Sampler, progress: bool) -> xr.Dataset:
    from combinability.sweeps import sweep_pairs

    layout = next(iter(pairs.values())).layout
    return sweep_pairs(dict(pairs), sampler, data=s.eval_data, splits=list(s.eval_data),
                       values=_values(sampler, layout, s.values_per_sampler),
                       samples=None if sampler.deterministic else s.samples, seed=s.seed,
                       batch_size=s.batch_size, progress=progress, client=s.client)


def _means(ds: xr.Dataset) -> xr.Dataset:
    """Mean loss and accuracy of every combination swept (all values and samples, the ends' values included)."""
    reduce = [d for d in ds["loss"].dims if d not in ("split", "alignment")]
    return xr.Dataset({"mean_loss": ds["loss"].mean(reduce), "mean_accuracy": ds["accuracy"].mean(reduce)})


def _pair_part(s: _Settings, progress: bool) -> xr.Dataset:
    aligned, times = {}, {}
    for method in s.methods:
        aligned[method], times[method] = _align(s, method)
    rows, ends = [], None
    for sampler in s.samplers:
        ds = _sweep(s, aligned, sampler, progress)
        rows.append(xr.merge([barriers(ds), _means(ds)], combine_attrs="drop").rename(alignment="aligner"))
        ends = ds[["loss_a", "accuracy_a", "loss_b", "accuracy_b"]]
        ends = ends.isel(alignment=0, drop=True) if "alignment" in ends.dims else ends
    out = xr.concat(rows, dim=xr.DataArray([smp.name for smp in s.samplers], dims="scheme", name="scheme"))
    out = out.merge(ends)
    out["align_time"] = xr.DataArray([times[m] for m in s.methods], dims="aligner")
    return out.assign_coords(aligner=list(s.methods))


# -- the many-model part -------------------------------------------------------------------------
def _flat(ms: ModelSet, native: Any) -> np.ndarray:
    """The flat vector of a native model of the set's kind (its layout's entries)."""
    state = ms.backend_obj.state(native)
    return ms.layout.flatten({name: np.asarray(state[name]) for name in ms.layout.names})


def _merge_row(s: _Settings, n: int, method: str, evaluator: Any, progress: bool) -> dict[str, Any]:
    from combinability.align.many import align_many

    # a user's own models carry no layer table: traced again on example_input, else given the set's spec, with
    # their norms folded as that spec's orthogonal maps need (folding keeps each member's function)
    own = s.base.backend_obj.table_of(s.base.models[0]) is None
    spec = s.base.spec if own and s.example_input is None else None
    members = list((s.base._folded_for(spec) if spec is not None else s.base).models[:n])
    t0 = time.perf_counter()
    ms = align_many(members, method=method, seed=s.seed, backend=s.base.backend, spec=spec,
                    example_input=s.example_input if own else None, **s.many_options)
    elapsed = time.perf_counter() - t0
    merged = _flat(ms, ms.merge())
    scores = {split: evaluator.evaluate([merged], ds)[0] for split, ds in s.eval_data.items()}
    pairs = {f"{i}-{j}": ms.select(i, j) for i, j in combinations(range(n), 2)}
    worst = barriers(_sweep(s, pairs, Linear(), progress)).max("alignment", skipna=False)  # NaN: a diverged pair
    log.info("compare_aligners: %s on %d models in %.2f s", method, n, elapsed)
    return {"time": elapsed, "scores": scores, "worst": worst}


def _many_part(s: _Settings, progress: bool) -> xr.Dataset:
    from combinability.evaluation import Evaluator

    be = s.base.backend_obj
    evaluator = Evaluator(be, s.base.template, s.base.layout, batch_size=s.batch_size)
    splits = list(s.eval_data)
    members = {split: evaluator.evaluate(list(s.base.thetas), ds) for split, ds in s.eval_data.items()}
    shape = (len(s.n_models), len(s.many_methods), len(splits))
    merged_loss, merged_acc = np.full(shape, np.nan), np.full(shape, np.nan)
    worst_loss, worst_acc = np.full(shape, np.nan), np.full(shape, np.nan)
    times = np.full(shape[:2], np.nan)
    for a, n in enumerate(s.n_models):
        for b, method in enumerate(s.many_methods):
            row = _merge_row(s, n, method, evaluator, progress)
            times[a, b] = row["time"]
            for c, split in enumerate(splits):
                merged_loss[a, b, c] = row["scores"][split].loss
                merged_acc[a, b, c] = row["scores"][split].accuracy
                worst_loss[a, b, c] = float(row["worst"]["loss_barrier"].sel(split=split))
                worst_acc[a, b, c] = float(row["worst"]["accuracy_barrier"].sel(split=split))
    dims = ("n_models", "merge_method", "split")
    member_dims = ("n_models", "split")
    return xr.Dataset(
        {
            "merged_loss": (dims, merged_loss), "merged_accuracy": (dims, merged_acc),
            "worst_pair_loss_barrier": (dims, worst_loss), "worst_pair_accuracy_barrier": (dims, worst_acc),
            "merge_time": (dims[:2], times),
            "members_loss": (member_dims, [[np.mean([e.loss for e in members[sp][:n]]) for sp in splits]
                                           for n in s.n_models]),
            "members_accuracy": (member_dims, [[np.mean([e.accuracy for e in members[sp][:n]]) for sp in splits]
                                               for n in s.n_models]),
        },
        coords={"n_models": list(s.n_models), "merge_method": list(s.many_methods), "split": splits},
    )


_LABELS = {
    "aligner": {"long_name": "pair aligner (ste_elementwise: STE trained on an element-wise sampler)"},
    "scheme": {"long_name": "combination scheme (sampler)"},
    "align_time": {"long_name": "wall time of the alignment", "units": "s"},
    "mean_loss": {"long_name": "mean loss of the combinations swept", "units": "nats"},
    "mean_accuracy": {"long_name": "mean accuracy of the combinations swept", "units": "1"},
    "n_models": {"long_name": "number of models aligned and merged"},
    "merge_method": {"long_name": "many-model alignment method (cb.align_many)"},
    "merged_loss": {"long_name": "mean cross-entropy of the merged model", "units": "nats"},
    "merged_accuracy": {"long_name": "top-1 accuracy of the merged model", "units": "1"},
    "worst_pair_loss_barrier": {"long_name": "worst linear-path loss barrier over pairs of aligned members",
                                "units": "nats"},
    "worst_pair_accuracy_barrier": {"long_name": "worst linear-path accuracy barrier over pairs of aligned members",
                                    "units": "1"},
    "merge_time": {"long_name": "wall time of align_many", "units": "s"},
    "members_loss": {"long_name": "mean loss of the members (as trained)", "units": "nats"},
    "members_accuracy": {"long_name": "mean accuracy of the members (as trained)", "units": "1"},
}


# -- the public entry point ----------------------------------------------------------------------
def compare_aligners(
    pair_or_models: Any,
    data: Any = "digits",
    *,
    methods: Sequence[str] | None = None,
    samplers: Sequence[Sampler | str] = ALIGNER_SAMPLERS,
    many_methods: Sequence[str] | None = None,
    n_models: Sequence[int] | None = None,
    train_data: Any = None,
    train_examples: int | None = None,
    epochs: int = 1,
    ste_sampler: Sampler | str = STE_SAMPLER,
    learned_options: Mapping[str, Any] | None = None,
    many_options: Mapping[str, Any] | None = None,
    values_per_sampler: int | None = 5,
    samples: int = 4,
    splits: Sequence[str] = ("test",),
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    backend: str | None = None,
    example_input: Any = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    attrs: Mapping[str, Any] | None = None,
    client: Any = None,
) -> xr.Dataset:
    """Barriers per aligner and scheme, and merged models per many-model method, on the same models.

    Parameters
    ----------
    pair_or_models : ModelPair, ModelSet or sequence of native models
        Two to eight models of one architecture (their naive versions are used; models A
        and B, the first two, are the pair). A user's own models need ``example_input``.
    data : str, (x, y), ArrayDataset or mapping of split to data, default "digits"
        Evaluation data, as for :func:`combinability.sweep` (a dataset name: its ``splits``).
    methods : sequence of str, optional
        Pair aligners: any registered aligner (``"identity"``, ``"weight"``, ``"activation"``,
        ``"ste"``, ``"sinkhorn"``, ...) and ``"ste_elementwise"`` (STE with ``sampler=ste_sampler``).
        Default :data:`ALIGNER_METHODS`, less those the models' symmetries rule out (a
        transformer's heads and rotating stream: activation matching, Sinkhorn), which the
        result's ``skipped`` attribute names with the reason. One given here that cannot align
        these models is refused before any work.
    samplers : sequence of Sampler or str
        Two-model schemes whose barriers are measured (default linear, uniform, subcube, Bernoulli).
    many_methods : sequence of str, optional
        Methods of :func:`combinability.align_many`; empty to skip the many-model part. Default
        :data:`MANY_METHODS`, less those the symmetries rule out, as for ``methods``.
    n_models : sequence of int, optional
        Numbers of models merged (each uses the first ``N`` models); default ``2 …`` all given.
    train_data : str, (x, y) or ArrayDataset, optional
        Data of the data-driven aligners (activation, STE, Sinkhorn): default ``data`` (a
        dataset name's training split).
    train_examples : int, optional
        Use only this many training examples (drawn with seed 0) for those aligners.
    epochs : int, default 1
        Epochs of the learned aligners (STE, Sinkhorn).
    ste_sampler : Sampler or str, default Uniform()
        The element-wise sampler ``"ste_elementwise"`` trains on.
    learned_options : mapping, optional
        More options of the learned aligners (``lr``, ``batch_size``, ``eval_examples``, ...).
    many_options : mapping, optional
        Options of :func:`combinability.align_many` (``max_iter``, ``rounds``, ``fw_iter``).
    values_per_sampler : int or None, default 5
        Equidistant values of each scheme's grid that are swept (None: the whole grid).
    samples : int, default 4
        Draws per value of the random schemes (the linear path is deterministic: one).
    splits : sequence of str, default ("test",)
        Splits of a named dataset evaluated.
    limit : int, optional
        Evaluate on the first ``limit`` examples of each split.
    seed : int
        Seeds every aligner and every draw.
    batch_size : int
        Evaluation batch size.
    backend, example_input
        For a sequence of native models: their backend (inferred when omitted) and a batch
        of inputs to trace a user's own models.
    out : path, optional
        Write the Dataset there; a finished result of the same settings is returned as is,
        another file is refused (:class:`~combinability.errors.OutputExistsError`, naming
        what differs) unless ``overwrite=True``.
    progress : bool
        Progress bars of the sweeps.
    attrs : mapping, optional
        Extra attributes stored with the result.
    client : dask.distributed.Client, optional
        Run the sweeps on the workers of this Dask cluster (checked before any
        alignment); see :func:`combinability.sweep`.

    Returns
    -------
    xarray.Dataset
        ``loss_barrier``, ``accuracy_barrier`` with dims ``(scheme, aligner, split)``,
        ``mean_loss``, ``mean_accuracy`` (the same dims: the mean over every combination
        swept, which tells aligners apart when the worst point is an end model),
        ``align_time`` (``aligner``, seconds) and the end models' ``loss_a``, ``accuracy_a``,
        ``loss_b``, ``accuracy_b``; with a many-model part, ``merged_loss``,
        ``merged_accuracy``, ``worst_pair_loss_barrier``, ``worst_pair_accuracy_barrier``
        with dims ``(n_models, merge_method, split)``, ``merge_time`` and the members' mean
        ``members_loss`` / ``members_accuracy``. ``combinability_format = "aligners"``.

    Raises
    ------
    ConfigurationError
        If fewer than two or more than eight models are given, a method or many-model
        method is unknown or repeated, ``n_models`` is out of range, or there is nothing to run.
    SamplerError
        If a scheme is not a two-model sampler, or repeats.
    UnknownNameError
        If a scheme is given by a name no sampler is registered under.
    DatasetError
        If the data does not fit the models.
    OutputExistsError, OutputNotWritableError
        If ``out`` holds another result, or cannot be written.

    All checks run before any alignment or evaluation.
    """
    from combinability.align.many import check_options
    from combinability.data.convert import check_seed
    from combinability.files import check_writable
    from combinability.plugins import list_aligners

    methods_given, many_given = methods is not None, many_methods is not None
    base = _model_set(pair_or_models, backend, example_input)
    methods = _names(ALIGNER_METHODS if methods is None else methods, [*list_aligners(), _ELEMENTWISE], "aligner(s)")
    many = _names(MANY_METHODS if many_methods is None else many_methods, MANY_METHODS, "many-model method(s)")
    skipped = _refusals(base, methods, many)
    given = [m for m in ((*methods,) if methods_given else ()) + ((*many,) if many_given else ()) if m in skipped]
    if given:  # asked for by name: refused before any work
        raise ConfigurationError(f"compare_aligners: {skipped[given[0]]}")
    methods = tuple(m for m in methods if m not in skipped)
    many = tuple(m for m in many if m not in skipped)
    smps = _samplers(samplers)
    if not (methods and smps) and not many:
        raise ConfigurationError("compare_aligners: nothing to run: give methods and samplers, or many_methods")
    ns = _n_models(n_models, len(base), bool(many))
    for name, value, optional in (("epochs", epochs, False), ("samples", samples, False),
                                  ("batch_size", batch_size, False), ("values_per_sampler", values_per_sampler, True),
                                  ("train_examples", train_examples, True), ("limit", limit, True)):
        _positive(name, value, optional=optional)
    for method in many:  # an option no method takes, or a count out of range, before the pairs' work
        check_options(method, **dict(many_options or {}))
    ste_smp = _samplers([ste_sampler])[0]
    seed = check_seed(seed)
    eval_data = _eval_data(base, data, splits, limit)
    needs_data = any("data" in _needs(m) for m in methods)
    train = _train_data(base, data, train_data, train_examples) if needs_data else None
    learned = {"epochs": epochs, **dict(learned_options or {})}
    s = _Settings(base, methods, smps, many, ns, eval_data, train, learned, dict(many_options or {}), ste_smp,
                  values_per_sampler, samples, seed, batch_size, example_input, client)
    check_client(client, base.backend_obj)  # the workers, before any alignment
    key = _key(s, limit)
    if out is not None:
        check_writable(out, what="results file")

    def run(_: Path | None) -> xr.Dataset:
        parts = [_pair_part(s, progress)] if methods and smps else []
        if many:
            parts.append(_many_part(s, progress))
        ds = xr.merge(parts, combine_attrs="drop")
        ds.attrs = provenance(combinability_format="aligners", architecture=base.architecture,
                              width=float(base.width) if base.width is not None else None, backend=base.backend,
                              dataset=data if isinstance(data, str) else None, seed=seed,
                              ste_sampler=_json_settings(ste_smp), epochs=epochs, skipped=skipped,
                              fingerprints=base.fingerprints(), **dict(attrs or {}))
        from combinability.results import annotate

        return annotate(ds, _LABELS)

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _json_settings(sampler: Sampler) -> str:
    """A sampler's settings as compact JSON text (an attribute value)."""
    import json

    return json.dumps(sampler.settings, sort_keys=True, default=str)


def _key(s: _Settings, limit: int | None) -> dict[str, Any]:
    """Every setting that changes a number of the result."""
    def identity(ds: Any) -> dict[str, Any]:
        return data_identity(ds, split=False)

    return {
        "experiment": "aligners", "models": s.base.fingerprints(), "methods": list(s.methods),
        "samplers": [smp.settings for smp in s.samplers], "many_methods": list(s.many_methods),
        "n_models": list(s.n_models), "data": {k: identity(v) for k, v in s.eval_data.items()}, "limit": limit,
        "train_data": identity(s.train_data) if s.train_data is not None else None,
        "learned": {k: (v.settings if isinstance(v, Sampler) else v) for k, v in s.learned.items()},
        "many_options": s.many_options, "ste_sampler": s.ste_sampler.settings,
        "values_per_sampler": s.values_per_sampler, "samples": s.samples,
        "seed": s.seed, "batch_size": s.batch_size, "evaluation": repr(s.base.backend_obj),
    }
