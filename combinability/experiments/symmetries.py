"""Which symmetries does alignment need? Naive, permutation-only and all-kinds alignment compared.

For transformers, Theus et al. ("Generalized linear mode connectivity for transformers")
report that permutations alone leave a barrier between independently trained models and
that adding the orthogonal symmetry of the residual stream (with heads moved whole)
brings them to linear connectivity; for mixtures of experts, Tran et al. report that
aligning experts jointly with the gate suffices. :func:`symmetry_comparison` measures this
on any pair the library accepts: the naive pair, the pair aligned with permutations only
(heads, FFN neurons and experts as blocks, the stream *permuted*), and the pair aligned
with every kind the spec admits (the stream *rotated*, its norms folded first), each swept
with the linear path and the paper's element-wise samplers. Three more alignments may be asked
for: ``"activation"``, activation matching of every kind on training data (heads assigned by
the correlation of their queries, keys and values, as Verma & Elbayad 2024 match them; the
stream rotated by orthogonal Procrustes on its activations at every block); ``"invertible"``,
weight matching with general invertible maps inside each head (Theus et
al.'s fourth class, ``symmetries="invertible"``), and ``"learned"``, the ``"maps"`` aligner: the
continuous maps (rotations of the stream, invertible maps in heads) trained on the loss of the
midpoint on training data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from combinability.errors import ConfigurationError
from combinability.experiments.compare import RUN_OPTIONS, reuse_or_run
from combinability.kinds import Orthogonal
from combinability.results import barriers, data_identity, provenance
from combinability.samplers import Bernoulli, Linear, Subcube, Uniform
from combinability.samplers.base import Sampler
from combinability.sets import ModelSet
from combinability.sweeps import SPLITS, resolve_data, sweep

__all__ = ["symmetry_comparison", "ALIGNMENTS", "ALL_ALIGNMENTS"]

#: The alignments compared by default: none, permutations only, every kind of the spec.
ALIGNMENTS = ("naive", "permutation", "all")
#: Every alignment :func:`symmetry_comparison` knows, in the order it reports them.
ALL_ALIGNMENTS = ("naive", "permutation", "all", "activation", "invertible", "learned")
THEUS_2025 = ("Theus, A., et al. (2025). Generalized linear mode connectivity for transformers. "
              "Tran, V.-H., et al. (2025). On linear mode connectivity of mixture-of-experts architectures.")


def _alignments(alignments: Sequence[str]) -> list[str]:
    """The alignments asked for, checked, in :data:`ALL_ALIGNMENTS`' order."""
    asked = [alignments] if isinstance(alignments, str) else list(alignments)
    unknown = [a for a in asked if a not in ALL_ALIGNMENTS]
    if unknown or not asked or len(set(asked)) != len(asked):
        raise ConfigurationError(f"alignments must be distinct names among {', '.join(ALL_ALIGNMENTS)}, got {asked!r}")
    return [a for a in ALL_ALIGNMENTS if a in asked]


def _admits_invertible(pair: ModelSet) -> bool:
    try:
        pair.invertible_spec()
    except ConfigurationError:
        return False
    return True


def _training(data: Any) -> Any:
    """The training data as an ArrayDataset (a registered dataset's name: its training split)."""
    from combinability.data.convert import as_dataset

    return as_dataset(data, "train", name="train_data")


def _samplers(samplers: Sequence[Sampler] | None) -> list[Sampler]:
    chosen = list(samplers) if samplers is not None else [Linear(), Uniform(), Subcube(), Bernoulli()]
    if not chosen or any(not isinstance(s, Sampler) for s in chosen):
        raise ConfigurationError(f"samplers must be one or more samplers (cb.Linear(), cb.Uniform(), ...), "
                                 f"got {samplers!r}")
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"each sampler may appear once, got {names}")
    return chosen


def symmetry_comparison(
    pair: ModelSet,
    data: Any,
    *,
    samplers: Sequence[Sampler] | None = None,
    values: Mapping[str, Sequence[float]] | None = None,
    samples: int = 2,
    seed: int = 0,
    restarts: int = 2,
    alignments: Sequence[str] = ALIGNMENTS,
    train_data: Any = None,
    learn_options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    **sweep_kwargs: Any,
) -> xr.Dataset:
    """Barriers of the naive, permutation-aligned and all-kinds-aligned pair, per sampler.

    Parameters
    ----------
    pair : ModelPair
        A naive pair (for a transformer: ``cb.ModelPair(a, b, example_input=x)``).
    data : str, (x, y) or mapping of split to (x, y)
        Evaluation data, as for :func:`combinability.sweep`.
    samplers : sequence of Sampler, optional
        Default: the linear path, uniform, subcube and Bernoulli.
    values : mapping of sampler name to sequence of float, optional
        Parameter values per sampler (``{"linear": [0, 0.5, 1], "uniform": [0.25]}``); a
        sampler not named sweeps its default grid.
    samples : int
        Draws per value for the random samplers.
    seed : int
        Seeds the draws and weight matching.
    restarts : int
        Extra weight-matching runs from random starts.
    alignments : sequence of str, default ("naive", "permutation", "all")
        Among :data:`ALL_ALIGNMENTS`: also ``"activation"`` (activation matching of every kind,
        on ``train_data``), ``"invertible"`` (weight matching with invertible maps inside heads)
        and ``"learned"`` (the ``"maps"`` aligner, which needs ``train_data``).
    train_data : str, (x, y) or ArrayDataset, optional
        Training data of the ``"activation"`` and ``"learned"`` alignments (a registered dataset's name:
        its training split).
    learn_options : mapping, optional
        Options of the ``"maps"`` aligner (``epochs``, ``lr``, ``batch_size``, ...).
    out : path, optional
        Write the result there; an existing result of the same settings is returned as is.
    overwrite : bool
    attrs : mapping, optional
    **sweep_kwargs
        Passed to :func:`combinability.sweep` (``batch_size``, ``limit``, ...).

    Returns
    -------
    xarray.Dataset
        ``loss`` and ``accuracy`` (dims ``alignment, sampler, split, value, sample``),
        ``loss_barrier`` and ``accuracy_barrier`` (``alignment, sampler, split``), the end
        models' scores, the weight-matching objective per alignment and whether the spec has
        an orthogonal map (``alignment="all"`` equals ``"permutation"`` when it has none).

    Raises
    ------
    ConfigurationError
        For a pair that is already aligned, bad samplers or alignments, ``"learned"`` without
        ``train_data``, or ``"invertible"`` for models whose heads admit no invertible map, before
        any work.
    """
    if pair.is_aligned:
        raise ConfigurationError("symmetry_comparison needs the naive pair (it aligns it twice); pass pair.naive")
    chosen = _samplers(samplers)
    alignments = _alignments(alignments)
    needing = [a for a in ("activation", "learned") if a in alignments]
    if needing and train_data is None:
        raise ConfigurationError(f"the {' and '.join(map(repr, needing))} alignment{'s' if len(needing) > 1 else ''} "
                                 "read training data: pass train_data= (a registered dataset's name, (x, y) or an "
                                 "ArrayDataset)")
    learned_symmetries = "all"
    if "invertible" in alignments:
        pair.invertible_spec()  # the heads admit invertible maps, or a clear error now
    if "learned" in alignments:
        learned_symmetries = "invertible" if _admits_invertible(pair) else "all"
    unknown = sorted(set(values or {}) - {s.name for s in chosen})
    if unknown:
        raise ConfigurationError(f"values names sampler(s) {unknown} not compared; compared: "
                                 f"{[s.name for s in chosen]}")
    grids = {s.name: None if s.name not in (values or {}) else [float(v) for v in values[s.name]] for s in chosen}
    for smp in chosen:  # a value outside a sampler's range is refused before any work
        for v in grids[smp.name] or ():
            smp.validate(v)
    # the data enter by content (as a sweep's key), run options (progress, a Dask client) not at all
    evaluated = resolve_data(data, sweep_kwargs.get("splits", SPLITS), sweep_kwargs.get("limit"),
                             pair.table.data_shape if pair.table is not None else None)
    key = {"experiment": "symmetry_comparison", "fingerprints": pair.fingerprints(),
           "data": {k: data_identity(v, split=False) for k, v in evaluated.items()},
           "samplers": [repr(s) for s in chosen], "values": grids, "samples": int(samples), "seed": int(seed),
           "restarts": int(restarts),
           "sweep": {k: repr(v) for k, v in sweep_kwargs.items() if k not in RUN_OPTIONS}}
    if tuple(alignments) != ALIGNMENTS:  # (the default's key is unchanged: earlier results are reused)
        key["alignments"] = list(alignments)
    if "activation" in alignments:
        key["activation"] = {"train_data": data_identity(_training(train_data), split=False)}
    if "learned" in alignments:
        key["learned"] = {"symmetries": learned_symmetries, "options": {k: repr(v) for k, v in
                                                                         sorted((learn_options or {}).items())},
                          "train_data": data_identity(_training(train_data), split=False)}

    def run(_: Path | None) -> xr.Dataset:
        align = {"naive": lambda: pair,
                 "permutation": lambda: pair.align("weight", seed=seed, restarts=restarts, symmetries="permutation"),
                 "all": lambda: pair.align("weight", seed=seed, restarts=restarts),
                 "activation": lambda: pair.align("activation", seed=seed, data=_training(train_data)),
                 "invertible": lambda: pair.align("weight", seed=seed, restarts=restarts, symmetries="invertible"),
                 "learned": lambda: pair.align("maps", seed=seed, symmetries=learned_symmetries,
                                               data=_training(train_data), **dict(learn_options or {}))}
        sets = {name: align[name]() for name in alignments}
        rows = []
        for name in alignments:
            per_sampler = []
            for smp in chosen:
                draws = 1 if isinstance(smp, Linear) else samples
                ds = sweep(sets[name], sampler=smp, data=data, values=grids[smp.name], samples=draws, seed=seed,
                           **sweep_kwargs)
                if isinstance(smp.parameter, str) and smp.parameter in ds.dims:
                    ds = ds.rename({smp.parameter: "value"})
                per_sampler.append(xr.merge([ds[["loss", "accuracy"]], barriers(ds)], combine_attrs="drop"))
            row = xr.concat(per_sampler, dim=xr.DataArray([s.name for s in chosen], dims="sampler"),
                            join="outer", combine_attrs="drop")
            ends = sweep(sets[name], sampler=Linear(), data=data, values=[0.0, 1.0], seed=seed, **sweep_kwargs)
            for k in ("loss_a", "loss_b", "accuracy_a", "accuracy_b"):
                row[k] = ends[k]
            objective = getattr((sets[name].transforms[1] or {}), "objective", None)
            row["objective"] = xr.DataArray(np.nan if objective is None else float(objective), attrs={
                "long_name": "the alignment's objective: weight matching's Σ⟨θ_A, T(θ_B)⟩ (less ½‖T(θ_B)‖² with "
                             "invertible maps); activation: the mean matched correlation; learned: the evaluation "
                             "loss"})
            rows.append(row)
        out = xr.concat(rows, dim=xr.DataArray(list(alignments), dims="alignment"), combine_attrs="drop")
        out["alignment"].attrs = {"long_name": "alignment (none, permutations only, every symmetry kind; every "
                                               "kind by activations; invertible maps in heads; learned maps)"}
        out["has_orthogonal"] = xr.DataArray(any(isinstance(k, Orthogonal) for k in pair.spec.kinds.values()),
                                             attrs={"long_name": "the spec has an orthogonal map"})
        out.attrs = provenance(combinability_format="symmetry_comparison", references_extra=THEUS_2025,
                               samplers=[s.name for s in chosen], seed=int(seed), **dict(attrs or {}))
        return out

    return reuse_or_run(out, key, run, overwrite=overwrite)
