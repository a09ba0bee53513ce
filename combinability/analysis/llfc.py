"""Layer-wise linear feature connectivity (LLFC; Zhou et al., NeurIPS 2023), on any sampler.

LLFC asks, at every feature point ``ℓ`` of a network and every point of the path between
two models, whether the combined model's features are (a positive multiple of) the same
combination of the end models' features:

    f_ℓ(θ_v)  ≈  c · [(1 − ᾱ_ℓ) f_ℓ(θ_A) + ᾱ_ℓ f_ℓ(θ_B)],      c > 0,

where ``ᾱ_ℓ`` is the mean coefficient of model B over the weights of the layer that
produces point ``ℓ`` (``λ`` itself on the linear path). The paper's path is
:class:`~combinability.samplers.Linear`; here any two-model sampler may be asked (the
hypercube samplers of the Mode Combinability paper), one draw per ``(value, sample)``
seeded exactly as :func:`combinability.sweep` seeds it.

Reported per ``(point, value, sample)``: ``cosine``, the mean over examples of the cosine
similarity between ``f_ℓ(θ_v)`` and the combination (each example's whole feature map,
flattened); ``scale``, the least-squares ``c`` over every example; ``coefficient``,
``ᾱ_ℓ``. Per point: ``baseline_cosine``, the mean cosine between ``f_ℓ(θ_A)`` and
``f_ℓ(θ_B)`` (what LLFC must beat to mean anything).

The helpers here (data, points, features) are shared by the other analyses of
:mod:`combinability.analysis`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.errors import ConfigurationError, SamplerError, UnknownNameError
from combinability.results import annotate, data_identity, provenance

if TYPE_CHECKING:
    from combinability.data.base import ArrayDataset
    from combinability.evaluation import Evaluator
    from combinability.samplers.base import Sampler
    from combinability.sets import ModelSet

__all__ = ["llfc", "cosine_and_scale", "feature_points", "point_layers", "resolve_data"]

#: ``long_name`` of the coordinates and variables the analyses write.
LABELS: dict[str, dict[str, str]] = {
    "point": {"long_name": "feature point (node of the network)"},
    "value": {"long_name": "value of the sampler's parameter"},
    "sample": {"long_name": "draw of the coefficients (sample index)"},
    "layer_name": {"long_name": "layer producing the feature point"},
    "units": {"long_name": "features per example at the point"},
    "cosine": {"long_name": "mean cosine similarity of f(θ_v) and the combined end features", "units": "1"},
    "scale": {"long_name": "least-squares scale c in f(θ_v) ≈ c · combined end features", "units": "1"},
    "coefficient": {"long_name": "mean coefficient of model B over the point's layer", "units": "1"},
    "baseline_cosine": {"long_name": "mean cosine similarity of f(θ_A) and f(θ_B)", "units": "1"},
}


# -- shared helpers ------------------------------------------------------------------------------
def resolve_data(pair: ModelSet, data: Any, split: str = "test", limit: int | None = None,
                 name: str = "data") -> ArrayDataset:
    """The examples an analysis evaluates: a dataset name's ``split``, or the data itself.

    Raises
    ------
    DatasetError
        If the examples do not fit the models (shape, labels) or the data is empty.
    ConfigurationError
        If ``limit`` is not a positive integer.
    """
    from combinability.data.convert import as_dataset, check_labels

    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ConfigurationError(f"limit must be a positive number of examples or None, got {limit!r}")
    shape = pair.table.data_shape if pair.table is not None else None
    ds = as_dataset(data, split, name=name, input_shape=shape, limit=limit).subset(limit)
    if pair.table is not None:
        check_labels(ds, pair.table.num_classes)
    return ds


def feature_points(pair: ModelSet, points: Sequence[str] | None = None) -> list[str]:
    """``points`` checked against the model's feature points (default: all of them).

    Raises
    ------
    UnknownNameError
        If a point does not exist; the message lists the valid ones.
    ConfigurationError
        If the model has no layer table (pass ``example_input=`` when building the pair).
    """
    if pair.table is None and not pair.points:
        raise ConfigurationError("the pair's models have no layer table, so their feature points are unknown: build "
                                 "the pair with example_input= (a batch of inputs) to trace them")
    valid = list(pair.table.feature_points()) if pair.table is not None else _module_points(pair)
    if points is None:
        return valid if pair.table is not None else list(dict.fromkeys(pair.feature_points.values()))
    if isinstance(points, str):
        points = [points]
    unknown = [p for p in points if p not in valid]
    if unknown:
        raise UnknownNameError(f"unknown feature point(s) {unknown}; valid: {', '.join(valid)}")
    if not points:
        raise ConfigurationError(f"no feature points given; valid: {', '.join(valid)}")
    return list(dict.fromkeys(points))


def _module_points(pair: ModelSet) -> list[str]:
    """The feature points of a model traced by its feature spaces (no layer table): the layers that
    open its neuron spaces, then every module holding parameters, by path (a transformer block's
    output, ``encoder.layers.0``, is its residual stream there)."""
    modules = [m for entry in pair.layout.entries for m in _enclosing_modules(pair, entry.name)]
    return list(dict.fromkeys([*pair.feature_points.values(), *modules]))


def _enclosing_modules(pair: ModelSet, name: str) -> list[str]:
    """The modules holding state entry ``name``, outermost first (``encoder``, ``encoder.layers``, ...,
    the entry's own module: :meth:`~combinability.backend.Backend.module_path`); none for a
    parameter of the model itself."""
    own = pair.backend_obj.module_path(name)
    if own == name:  # a parameter of the model itself: in no module
        return []
    sep = "/" if "/" in own else "."
    parts = own.split(sep)
    return [sep.join(parts[: k + 1]) for k in range(len(parts))]


def point_coefficients(pair: ModelSet, points: Sequence[str]) -> Callable[[Any], np.ndarray]:
    """``v -> α`` per point: the mean coefficient of the layer producing each point (a number ``v``
    everywhere: ``v`` itself). With a layer table, the table's layer; without one (a model traced
    by its feature spaces), the parameters under the point's module path."""
    layout = pair.layout
    if pair.table is not None:
        layer_of, index, layers = point_layers(pair), layout.layer_index(), len(pair.layer_names)
        rows = np.array([layer_of[p] for p in points], dtype=np.int64)
        return lambda v: layer_means(np.broadcast_to(v, (layout.size,)), index, layers)[rows]
    slices = {p: [(e.offset, e.stop) for e in layout.entries if p in _enclosing_modules(pair, e.name)]
              for p in points}
    empty = [p for p, parts in slices.items() if not parts]
    if empty:
        raise ConfigurationError(f"feature point(s) {empty} hold no parameters, so no coefficient of theirs is "
                                 "known; name the modules that produce them")

    def alphas(v: Any) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 0:
            return np.full(len(points), float(v))
        return np.array([sum(float(v[a:b].sum()) for a, b in slices[p]) / sum(b - a for a, b in slices[p])
                         for p in points])

    return alphas


def point_layers(pair: ModelSet) -> dict[str, int]:
    """The layer index (``pair.layer_names``) of the node producing every feature point."""
    names = pair.layer_names
    node_layer = pair.table._node_layers()  # node -> its layer's name (activations: the previous layer's)
    return {node: names.index(layer) for node, layer in node_layer.items() if layer in names}


def _layer_names(pair: ModelSet, points: Sequence[str]) -> list[str]:
    """The layer producing each point: the table's layer name, or (no table) the point's module itself."""
    if pair.table is None:
        return list(points)
    layer_of = point_layers(pair)
    return [pair.layer_names[layer_of[p]] for p in points]


def layer_means(v: np.ndarray, layer_index: np.ndarray, layers: int) -> np.ndarray:
    """The mean of ``v`` over the elements of each layer, shape ``(layers,)``."""
    counts = np.bincount(layer_index, minlength=layers).astype(np.float64)
    sums = np.bincount(layer_index, weights=np.asarray(v, dtype=np.float64), minlength=layers)
    return sums / np.maximum(counts, 1)


def per_example(features: np.ndarray, n: int) -> np.ndarray:
    """Features ``(n · positions, units)`` (as :meth:`Evaluator.features` gives them) as ``(n, positions · units)``."""
    return np.asarray(features, dtype=np.float64).reshape(n, -1)


def cosine_and_scale(f: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """Mean per-example cosine of ``f`` and ``g`` ``(n, m)``, and the least-squares ``c`` of ``f ≈ c g``.

    An example where both vectors are zero counts as cosine 1 (they agree); one where only
    one is zero counts as 0. ``c = Σ⟨f_i, g_i⟩ / Σ‖g_i‖²`` (NaN when ``g`` is all zero).
    """
    dot = np.einsum("ij,ij->i", f, g)
    nf, ng = np.linalg.norm(f, axis=1), np.linalg.norm(g, axis=1)
    both_zero = (nf == 0) & (ng == 0)
    denom = np.where(nf * ng > 0, nf * ng, 1.0)
    cos = np.where(both_zero, 1.0, np.where(nf * ng > 0, dot / denom, 0.0))
    gg = float(np.sum(ng**2))
    return float(np.mean(cos)), (float(np.sum(dot)) / gg if gg > 0 else float("nan"))


def two_model_sampler(sampler: Sampler | str | None, pair: ModelSet, values: Sequence[Any] | None,
                      default: Any = None) -> tuple[Sampler, list[float]]:
    """The sampler (default ``default``, else :class:`Linear`) and its values, checked before any work.

    Raises
    ------
    SamplerError
        If the sampler combines three models, or a value is outside its range.
    """
    from combinability.samplers import Linear, get_sampler

    if sampler is None:
        smp = default if default is not None else Linear()
    elif isinstance(sampler, str):
        smp = get_sampler(sampler)
    elif callable(getattr(sampler, "draw", None)):
        smp = sampler
    else:
        raise SamplerError(f"expected a sampler (e.g. cb.Linear()), got {type(sampler).__name__}")
    if getattr(smp, "models", 2) != 2:
        raise SamplerError(f"{type(smp).__name__} combines {smp.models} models; this analysis combines two "
                           "(use Linear, Uniform, Subcube, Hyperplane, Bernoulli, Stitch, MinMax or Box)")
    grid = list(values) if values is not None else list(smp.grid_for(pair.layout))
    if not grid:
        raise SamplerError(f"{type(smp).__name__}: no parameter values given")
    return smp, [float(smp.validate(v, pair.layout)) for v in grid]


def check_out(out: str | Path | None) -> None:
    """Fail before the work when ``out`` cannot be written."""
    if out is not None:
        from combinability.files import check_writable

        check_writable(out, what="results file")


# -- LLFC ----------------------------------------------------------------------------------------
def llfc(
    pair: ModelSet,
    data: Any = "digits",
    *,
    values: Sequence[float] | None = None,
    sampler: Sampler | str | None = None,
    samples: int | None = None,
    points: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    out: str | Path | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Layer-wise linear feature connectivity of a pair's combinations.

    Parameters
    ----------
    pair : ModelPair
        Naive or aligned; models with a layer table (library-built, or traced with ``example_input=``).
    data : str, (x, y) or ArrayDataset
        A dataset name (its ``split`` is used) or the examples themselves.
    values : sequence of float, optional
        Values of the sampler's parameter (``λ`` for :class:`Linear`); default its grid.
        Each is checked against the sampler's range.
    sampler : Sampler or str, optional
        Two-model coefficient distribution; default ``Linear()`` (the paper's LLFC).
    samples : int, optional
        Draws per value: 1 for deterministic samplers, default 4 otherwise.
    points : sequence of str, optional
        Feature points; default every one of the model (pre- and post-activation).
    split, limit : str, int
        Split of a named dataset, and the number of its first examples used.
    seed : int
        Seeds the draws (as :func:`combinability.sweep` does: same seed, same coefficients).
    batch_size : int
        Examples per forward pass.
    out : path, optional
        Write the result there; a finished result of the same settings is returned as is,
        another file is refused unless ``overwrite=True``.
    attrs : mapping, optional
        Extra attributes stored with the result.

    Returns
    -------
    xarray.Dataset
        ``cosine``, ``scale`` and ``coefficient`` with dims ``(point, value, sample)``,
        ``baseline_cosine`` with dim ``point``; coordinates ``layer_name`` and ``units``
        per point. ``combinability_format = "llfc"``.

    Raises
    ------
    UnknownNameError
        A feature point that does not exist (the valid ones are listed).
    SamplerError
        A value outside the sampler's range, or a three-model sampler.
    """
    from combinability.data.convert import check_seed
    from combinability.experiments.compare import reuse_or_run

    smp, grid = two_model_sampler(sampler, pair, values)
    wanted = feature_points(pair, points)
    point_coefficients(pair, wanted)  # every point's layer known, before any work
    n_samples = 1 if smp.deterministic else (4 if samples is None else int(samples))
    if n_samples < 1:
        raise ConfigurationError(f"samples must be >= 1, got {samples}")
    seed = check_seed(seed)
    ds = resolve_data(pair, data, split, limit)
    if int(batch_size) < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    key = {"analysis": "llfc", "models": pair.fingerprints(), "sampler": smp.settings, "values": grid,
           "samples": n_samples, "points": wanted, "seed": seed, "data": data_identity(ds),
           "batch_size": int(batch_size), "evaluation": repr(pair.backend_obj)}

    def run(o: Path | None) -> xr.Dataset:
        check_out(o)
        return _llfc(pair, ds, smp, grid, n_samples, wanted, seed, int(batch_size), attrs)

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _evaluator(pair: ModelSet, batch_size: int) -> Evaluator:
    from combinability.evaluation import Evaluator

    return Evaluator(pair.backend_obj, pair.template, pair.layout, batch_size=batch_size)


def _llfc(pair: ModelSet, ds: ArrayDataset, smp: Sampler, grid: list[float], n_samples: int, wanted: list[str],
          seed: int, batch_size: int, attrs: Mapping[str, Any] | None) -> xr.Dataset:
    from combinability.combination import combine
    from combinability.samplers.base import DrawContext
    from combinability.sweeps import sample_seed

    be = pair.backend_obj
    evaluator = _evaluator(pair, batch_size)
    n = len(ds)
    ta, tb = be.asarray(pair.theta(0)), be.asarray(pair.theta(1))
    fa = {p: per_example(f, n) for p, f in evaluator.features(ta, ds, wanted).items()}
    fb = {p: per_example(f, n) for p, f in evaluator.features(tb, ds, wanted).items()}
    coefficients = point_coefficients(pair, wanted)
    shape = (len(wanted), len(grid), n_samples)
    cosine, scale, coefficient = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for i, value in enumerate(grid):
        for s in range(n_samples):
            ctx = DrawContext(pair.layout, be.random(sample_seed(seed, i, s, smp.name)), theta_a=ta, theta_b=tb)
            v = smp.draw(value, ctx)
            theta = combine(ta, tb, v)
            alphas = coefficients(be.to_numpy(v))
            feats = evaluator.features(theta, ds, wanted)
            for j, p in enumerate(wanted):
                alpha = alphas[j]
                g = (1 - alpha) * fa[p] + alpha * fb[p]
                cosine[j, i, s], scale[j, i, s] = cosine_and_scale(per_example(feats[p], n), g)
                coefficient[j, i, s] = alpha
    baseline = [cosine_and_scale(fa[p], fb[p])[0] for p in wanted]
    dims = ("point", "value", "sample")
    result = xr.Dataset(
        {"cosine": (dims, cosine), "scale": (dims, scale), "coefficient": (dims, coefficient),
         "baseline_cosine": (("point",), np.asarray(baseline))},
        coords={"point": wanted, "value": np.asarray(grid, dtype=np.float64), "sample": np.arange(n_samples),
                "layer_name": ("point", _layer_names(pair, wanted)),
                "units": ("point", [int(fa[p].shape[1]) for p in wanted])},
        attrs=provenance(combinability_format="llfc", sampler=smp.name, sampler_settings=smp.settings,
                         parameter=str(smp.parameter), architecture=pair.architecture, width=float(pair.width),
                         backend=be.name, dataset=ds.name, split=ds.split, examples=len(ds), seed=seed,
                         alignment=pair.alignment, fingerprints=pair.fingerprints(), **dict(attrs or {})),
    )
    labels = {**LABELS, "value": {"long_name": getattr(smp, "parameter_long_name", "") or str(smp.parameter)}}
    return annotate(result, labels)
