"""Softmax-temperature calibration of combined models, and LEWC (Ito et al., "Do we really need permutations?").

Without alignment, the features of a wide network's combination ``θ_λ = (1 − λ) θ_A + λ θ_B``
are close to an *exponentially weighted* sum of the end models' features (layer-wise
exponentially weighted connectivity, LEWC):

    f_ℓ(θ_λ)  ≈  (1 − λ)^ℓ f_ℓ(θ_A)  +  λ^ℓ f_ℓ(θ_B),        ℓ = 1, 2, … the depth of the layer,

because the cross terms ``W_A h_B`` of independent networks average out: the logits are a
*shrunken ensemble*, and much of the naive loss barrier is the loss of an under-confident
softmax. :func:`calibrate` fits one inverse temperature ``β`` per combined model on
held-out data (a 1-D minimisation of the mean cross-entropy of ``β · logits``) and reports
the loss barriers of the linear path with and without it, for the naive and the aligned
pair. :func:`lewc` fits ``f_ℓ(θ_λ) ≈ a f_ℓ(θ_A) + b f_ℓ(θ_B)`` by least squares at every
feature point and compares ``(a, b)`` and the fit's ``R²`` with the prediction.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.analysis.llfc import (
    check_out,
    data_identity,
    feature_points,
    per_example,
    point_layers,
    resolve_data,
)
from combinability.errors import CombinabilityWarning, ConfigurationError, SamplerError
from combinability.results import annotate, provenance

if TYPE_CHECKING:
    from combinability.data.base import ArrayDataset
    from combinability.sets import ModelSet

__all__ = ["CalibrationOverlapWarning", "calibrate", "fit_temperature", "lewc", "temperature_loss", "lewc_fit"]

#: Default search interval of the inverse temperature.
BOUNDS = (1e-2, 1e2)

LABELS: dict[str, dict[str, str]] = {
    "lam": {"long_name": "coefficient of model B (λ)", "units": "1"},
    "alignment": {"long_name": "alignment of model B"},
    "loss": {"long_name": "mean cross-entropy loss", "units": "nats"},
    "loss_calibrated": {"long_name": "mean cross-entropy loss at the fitted temperature", "units": "nats"},
    "accuracy": {"long_name": "top-1 accuracy (unchanged by the temperature)", "units": "1"},
    "inverse_temperature": {"long_name": "fitted inverse temperature β (logits × β)", "units": "1"},
    "loss_barrier": {"long_name": "loss barrier (worst loss − mean of the end models)", "units": "nats"},
    "loss_barrier_calibrated": {"long_name": "loss barrier, every model at its fitted temperature",
                                "units": "nats"},
    "accuracy_barrier": {"long_name": "accuracy barrier (mean of the end models − worst accuracy)", "units": "1"},
    "point": {"long_name": "feature point (node of the network)"},
    "depth": {"long_name": "depth ℓ of the point's layer (1 = first layer)"},
    "layer_name": {"long_name": "layer producing the feature point"},
    "a": {"long_name": "least-squares coefficient of f(θ_A)", "units": "1"},
    "b": {"long_name": "least-squares coefficient of f(θ_B)", "units": "1"},
    "r2": {"long_name": "R² of the least-squares fit a f(θ_A) + b f(θ_B)", "units": "1"},
    "a_predicted": {"long_name": "LEWC prediction of a: (1 − λ)^ℓ", "units": "1"},
    "b_predicted": {"long_name": "LEWC prediction of b: λ^ℓ", "units": "1"},
    "r2_predicted": {"long_name": "R² of the LEWC prediction (1 − λ)^ℓ f(θ_A) + λ^ℓ f(θ_B)", "units": "1"},
}


class CalibrationOverlapWarning(CombinabilityWarning):
    """The calibration examples overlap the evaluation examples: calibrated losses are optimistic."""


# -- the temperature ------------------------------------------------------------------------------
def temperature_loss(logits: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """Mean cross-entropy of ``beta · logits`` ``(n, C)`` against ``labels`` ``(n,)``, in float64."""
    z = beta * np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = BOUNDS) -> float:
    """The inverse temperature ``β`` minimising the mean cross-entropy of ``β · logits``.

    The loss is convex in ``β``; it is minimised over ``log β`` in ``log(bounds)`` by
    bounded Brent search (:func:`scipy.optimize.minimize_scalar`).

    Parameters
    ----------
    logits : array ``(n, C)``
    labels : int array ``(n,)``
    bounds : (float, float)
        Search interval of ``β``, both positive.

    Raises
    ------
    ConfigurationError
        If the bounds are not ``0 < low < high``, or the shapes do not fit.
    """
    from scipy.optimize import minimize_scalar

    low, high = (float(b) for b in bounds)
    if not (0 < low < high and np.isfinite(high)):
        raise ConfigurationError(f"temperature bounds must satisfy 0 < low < high, got {bounds!r}")
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ConfigurationError(f"expected logits (n, C) and labels (n,), got {logits.shape} and {labels.shape}")
    res = minimize_scalar(lambda t: temperature_loss(logits, labels, float(np.exp(t))), method="bounded",
                          bounds=(np.log(low), np.log(high)), options={"xatol": 1e-7})
    return float(np.exp(res.x))


def _row_hashes(x: np.ndarray) -> set[bytes]:
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return {hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in rows}


def _warn_overlap(calib: ArrayDataset, evaluation: ArrayDataset) -> None:
    shared = len(_row_hashes(calib.x) & _row_hashes(evaluation.x))
    if shared:
        warnings.warn(f"{shared} of the {len(calib)} calibration examples are also evaluation examples "
                      f"({calib.name or 'data'} {calib.split or ''} vs {evaluation.name or 'data'} "
                      f"{evaluation.split or ''}): the calibrated losses are optimistic; calibrate on held-out "
                      "data (the default: a held-out part of the evaluation split, or other calibration_data=)",
                      CalibrationOverlapWarning, stacklevel=3)


def _hold_out(data: ArrayDataset, fraction: float) -> tuple[ArrayDataset, ArrayDataset]:
    """A random ``fraction`` of ``data`` (seed 0) for calibration, and the rest for evaluation."""
    from combinability.data.base import ArrayDataset

    if isinstance(fraction, bool) or not 0 < float(fraction) < 1:
        raise ConfigurationError(f"calibration_fraction must lie in (0, 1), got {fraction!r}")
    n = len(data)
    k = int(round(float(fraction) * n))
    if not 0 < k < n:
        raise ConfigurationError(f"calibration_fraction={fraction} of {n} examples leaves no calibration or no "
                                 "evaluation examples; use more examples or pass calibration_data=")
    order = np.random.default_rng(0).permutation(n)
    parts = (np.sort(order[:k]), np.sort(order[k:]))
    return tuple(ArrayDataset(data.x[i], data.y[i], data.num_classes, data.name, data.split, data.classes)
                 for i in parts)  # type: ignore[return-value]


def _lambdas(lambdas: Sequence[float] | None, default: int = 11) -> np.ndarray:
    grid = np.linspace(0.0, 1.0, default) if lambdas is None else np.asarray(list(lambdas), dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise SamplerError(f"lambdas must be a non-empty sequence of numbers in [0, 1], got {lambdas!r}")
    bad = grid[~np.isfinite(grid) | (grid < 0) | (grid > 1)]
    if bad.size:
        raise SamplerError(f"lambdas {bad.tolist()} lie outside the linear path's range [0, 1]")
    return np.unique(grid)


def calibrate(
    pair: ModelSet,
    data: Any = "digits",
    *,
    lambdas: Sequence[float] | None = None,
    calibration_data: Any = None,
    calibration_fraction: float = 0.5,
    split: str = "test",
    limit: int | None = None,
    naive: bool = True,
    bounds: tuple[float, float] = BOUNDS,
    batch_size: int = 1000,
    out: str | Path | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Loss barriers of the linear path with and without a fitted softmax temperature.

    Parameters
    ----------
    pair : ModelPair
        Aligned (its naive twin is measured too, unless ``naive=False``) or naive.
    data : str, (x, y) or ArrayDataset
        Evaluation examples: a dataset name's ``split``, or the data.
    lambdas : sequence of float, optional
        Points of the linear path in ``[0, 1]`` (0 and 1 are always added: the end models
        are calibrated too); default 11 equidistant.
    calibration_data : str, (x, y) or ArrayDataset, optional
        Held-out examples each temperature is fitted on (a name: its ``split``). Default:
        a random ``calibration_fraction`` of the evaluation examples (seed 0), which are
        then left out of the evaluation. Never the training split: trained models fit it
        (nearly) perfectly, and their temperatures fitted there are far too sharp.
    calibration_fraction : float
        Share of the evaluation examples held out for calibration when
        ``calibration_data`` is not given, in ``(0, 1)``.
    split, limit : str, int
        Evaluation split of a named dataset, and the number of its first examples used.
    naive : bool
        Also measure the naive pair of an aligned one (an ``alignment`` dim).
    bounds : (float, float)
        Search interval of the inverse temperature.
    out : path, optional
        Write the result there (finished results of the same settings are reused).

    Returns
    -------
    xarray.Dataset
        Dims ``(alignment, lam)``: ``loss``, ``loss_calibrated``, ``accuracy``,
        ``inverse_temperature``; dim ``alignment``: ``loss_barrier``,
        ``loss_barrier_calibrated``, ``accuracy_barrier`` (Def. 3.3, as
        :func:`combinability.barriers`: the worst point of the path against the mean of
        its ends). ``combinability_format = "calibration"``.

    Raises
    ------
    SamplerError
        A ``λ`` outside ``[0, 1]``.
    ConfigurationError
        Bad bounds, or a ``calibration_fraction`` outside ``(0, 1)``.

    Warns
    -----
    CalibrationOverlapWarning
        When calibration examples are also evaluation examples.
    """
    from combinability.experiments.compare import reuse_or_run

    grid = np.unique(np.concatenate([_lambdas(lambdas), [0.0, 1.0]]))
    low, high = (float(b) for b in bounds)
    if not (0 < low < high and np.isfinite(high)):
        raise ConfigurationError(f"temperature bounds must satisfy 0 < low < high, got {bounds!r}")
    evaluation = resolve_data(pair, data, split, limit)
    if calibration_data is None:
        calib, evaluation = _hold_out(evaluation, calibration_fraction)
    else:
        calib = resolve_data(pair, calibration_data, split, None, name="calibration_data")
    _warn_overlap(calib, evaluation)
    pairs = {"naive": pair.naive or pair, "aligned": pair} if naive and pair.is_aligned else {pair.alignment: pair}
    key = {"analysis": "calibration", "models": {k: p.fingerprints() for k, p in pairs.items()},
           "lambdas": grid.tolist(), "data": data_identity(evaluation), "calibration": data_identity(calib),
           "bounds": [low, high], "batch_size": int(batch_size), "evaluation": repr(pair.backend_obj)}

    def run(o: Path | None) -> xr.Dataset:
        check_out(o)
        parts = [_calibrate_one(p, evaluation, calib, grid, (low, high), int(batch_size)) for p in pairs.values()]
        ds = xr.concat(parts, dim=xr.DataArray(list(pairs), dims="alignment"))
        ds.attrs = provenance(combinability_format="calibration", architecture=pair.architecture,
                              width=float(pair.width), backend=pair.backend, dataset=evaluation.name,
                              split=evaluation.split, examples=len(evaluation), calibration_examples=len(calib),
                              calibration=("held-out part of the evaluation split" if calibration_data is None
                                           else "calibration_data"), bounds=[low, high],
                              fingerprints=pair.fingerprints(), **dict(attrs or {}))
        return annotate(ds, LABELS)

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _logits(pair: ModelSet, evaluator: Any, theta: Any, x: Any, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 logits, one row per scored label (a sequence's or a segmentation's, example-major; labels
    ``IGNORE_INDEX`` left out), and those labels."""
    from combinability.data.base import IGNORE_INDEX

    shape = tuple(np.shape(labels)[1:])
    z = pair.backend_obj.to_numpy(evaluator.logits(theta, x, shape))[0].astype(np.float64)
    labels = np.ravel(labels)
    keep = labels != IGNORE_INDEX
    return (z, labels) if keep.all() else (z[keep], labels[keep])


def _calibrate_one(pair: ModelSet, evaluation: ArrayDataset, calib: ArrayDataset, grid: np.ndarray,
                   bounds: tuple[float, float], batch_size: int) -> xr.Dataset:
    from combinability.combination import combine
    from combinability.evaluation import Evaluator, device_data

    be = pair.backend_obj
    evaluator = Evaluator(be, pair.template, pair.layout, batch_size=batch_size)
    x_eval, _ = device_data(be)(evaluation)
    x_cal, _ = device_data(be)(calib)
    ta, tb = be.asarray(pair.theta(0)), be.asarray(pair.theta(1))
    rows = []
    for lam in grid:
        theta = ta if lam == 0 else tb if lam == 1 else combine(ta, tb, float(lam))
        beta = fit_temperature(*_logits(pair, evaluator, theta, x_cal, calib.y), bounds)
        z, labels = _logits(pair, evaluator, theta, x_eval, evaluation.y)
        rows.append((temperature_loss(z, labels, 1.0), temperature_loss(z, labels, beta),
                     float(np.mean(z.argmax(axis=1) == labels)), beta))
    loss, loss_cal, acc, beta = (np.array(c) for c in zip(*rows, strict=True))

    def barrier(values: np.ndarray) -> float:  # Def. 3.3, as combinability.barriers: the worst point of the path
        return float(values.max() - 0.5 * (values[0] + values[-1]))

    return xr.Dataset(
        {"loss": ("lam", loss), "loss_calibrated": ("lam", loss_cal), "accuracy": ("lam", acc),
         "inverse_temperature": ("lam", beta), "loss_barrier": ((), barrier(loss)),
         "loss_barrier_calibrated": ((), barrier(loss_cal)),
         "accuracy_barrier": ((), float(0.5 * (acc[0] + acc[-1]) - acc.min()))},
        coords={"lam": grid},
    )


# -- LEWC -----------------------------------------------------------------------------------------
def lewc_fit(f: np.ndarray, fa: np.ndarray, fb: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``(a, b)`` of ``f ≈ a fa + b fb`` (arrays ``(n, m)``) and the fit's ``R²``.

    ``R² = 1 − ‖f − a fa − b fb‖² / ‖f − f̄‖²`` with ``f̄`` the mean over examples of each
    feature (NaN when ``f`` is constant).
    """
    gram = np.array([[np.vdot(fa, fa), np.vdot(fa, fb)], [np.vdot(fa, fb), np.vdot(fb, fb)]])
    rhs = np.array([np.vdot(fa, f), np.vdot(fb, f)])
    (a, b), *_ = np.linalg.lstsq(gram, rhs, rcond=None)
    return float(a), float(b), r_squared(f, a * fa + b * fb)


def r_squared(f: np.ndarray, fit: np.ndarray) -> float:
    """``1 − ‖f − fit‖² / ‖f − f̄‖²`` (``f̄``: the mean over examples of each feature)."""
    total = float(np.sum((f - f.mean(axis=0)) ** 2))
    return 1.0 - float(np.sum((f - fit) ** 2)) / total if total > 0 else float("nan")


def lewc(
    pair: ModelSet,
    data: Any = "digits",
    *,
    lambdas: Sequence[float] | None = None,
    points: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 1000,
    out: str | Path | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Per feature point, the least-squares ``f(θ_λ) ≈ a f(θ_A) + b f(θ_B)`` against LEWC's ``((1−λ)^ℓ, λ^ℓ)``.

    Parameters
    ----------
    pair : ModelPair
        Naive (LEWC's subject) or aligned.
    data : str, (x, y) or ArrayDataset
        A dataset name (its ``split``) or the examples.
    lambdas : sequence of float, optional
        Points of the linear path in ``[0, 1]``; default 0.1, 0.2, …, 0.9.
    points : sequence of str, optional
        Feature points; default every one of the model.
    out : path, optional
        Write the result there (finished results of the same settings are reused).

    Returns
    -------
    xarray.Dataset
        Dims ``(point, lam)``: ``a``, ``b``, ``r2``, ``a_predicted``, ``b_predicted``,
        ``r2_predicted``; coordinates ``depth`` (ℓ, 1 for the first layer) and
        ``layer_name`` per point. ``combinability_format = "lewc"``.

    Raises
    ------
    UnknownNameError
        A feature point that does not exist (the valid ones are listed).
    SamplerError
        A ``λ`` outside ``[0, 1]``.
    """
    from combinability.experiments.compare import reuse_or_run

    grid = _lambdas(lambdas if lambdas is not None else np.round(np.linspace(0.1, 0.9, 9), 10))
    wanted = feature_points(pair, points)
    if pair.table is None:
        raise ConfigurationError("lewc predicts each point's weights from its depth in a chain of layers "
                                 "((1 - λ)^ℓ, λ^ℓ), which a model traced by its feature spaces (a transformer's "
                                 "residual stream) does not have; llfc measures its features' linearity")
    ds = resolve_data(pair, data, split, limit)
    key = {"analysis": "lewc", "models": pair.fingerprints(), "lambdas": grid.tolist(), "points": wanted,
           "data": data_identity(ds), "batch_size": int(batch_size), "evaluation": repr(pair.backend_obj)}

    def run(o: Path | None) -> xr.Dataset:
        check_out(o)
        return _lewc(pair, ds, grid, wanted, int(batch_size), attrs)

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _lewc(pair: ModelSet, ds: ArrayDataset, grid: np.ndarray, wanted: list[str], batch_size: int,
          attrs: Mapping[str, Any] | None) -> xr.Dataset:
    from combinability.combination import combine
    from combinability.evaluation import Evaluator

    be = pair.backend_obj
    evaluator = Evaluator(be, pair.template, pair.layout, batch_size=batch_size)
    n = len(ds)
    ta, tb = be.asarray(pair.theta(0)), be.asarray(pair.theta(1))
    fa = {p: per_example(f, n) for p, f in evaluator.features(ta, ds, wanted).items()}
    fb = {p: per_example(f, n) for p, f in evaluator.features(tb, ds, wanted).items()}
    depth = np.array([point_layers(pair)[p] + 1 for p in wanted])
    shape = (len(wanted), grid.size)
    fit = {k: np.full(shape, np.nan) for k in ("a", "b", "r2", "r2_predicted")}
    a_pred = (1 - grid[None, :]) ** depth[:, None]
    b_pred = grid[None, :] ** depth[:, None]
    for i, lam in enumerate(grid):
        feats = evaluator.features(combine(ta, tb, float(lam)), ds, wanted)
        for j, p in enumerate(wanted):
            f = per_example(feats[p], n)
            fit["a"][j, i], fit["b"][j, i], fit["r2"][j, i] = lewc_fit(f, fa[p], fb[p])
            fit["r2_predicted"][j, i] = r_squared(f, a_pred[j, i] * fa[p] + b_pred[j, i] * fb[p])
    dims = ("point", "lam")
    result = xr.Dataset(
        {**{k: (dims, v) for k, v in fit.items()}, "a_predicted": (dims, a_pred), "b_predicted": (dims, b_pred)},
        coords={"point": wanted, "lam": grid, "depth": ("point", depth),
                "layer_name": ("point", [pair.layer_names[d - 1] for d in depth])},
        attrs=provenance(combinability_format="lewc", architecture=pair.architecture, width=float(pair.width),
                         backend=be.name, dataset=ds.name, split=ds.split, examples=len(ds),
                         alignment=pair.alignment, fingerprints=pair.fingerprints(), **dict(attrs or {})),
    )
    return annotate(result, LABELS)
