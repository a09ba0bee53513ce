"""Layer-wise barriers and their second-order prediction from the curvature along the path.

For a set ``S`` of layers let ``Δ_S`` be ``θ_B − θ_A`` on the weights of those layers and
zero elsewhere, and walk the path ``θ(λ) = θ_A + λ Δ_S``: only the layers of ``S`` move from
A to B, the others stay at A (Adilova et al. 2023, "Layer-wise linear mode connectivity").
Two families of ``S``: each layer alone (``mode="single"``) and the layers up to and
including it (``mode="cumulative"``; its last entry is the whole linear path A → B).

The measured barrier of a path is the largest gap between its loss and the chord of its
ends, ``max_λ L(θ(λ)) − [(1 − λ) L(θ(0)) + λ L(θ(1))]``. Its second-order prediction
expands the loss around both ends of the path (Singh et al. 2024, "Landscaping linear mode
connectivity") and weighs the two expansions by ``1 − λ`` and ``λ``:

    gap(λ) ≈ λ(1 − λ) (g_0 − g_1)ᵀΔ + ½ λ(1 − λ) [λ ΔᵀH_0Δ + (1 − λ) ΔᵀH_1Δ],

with ``g`` and ``H`` the gradient and Hessian of the loss at the path's start (0) and end
(1). The second term is the curvature term ``½ λ(1 − λ) ΔᵀHΔ``; the first vanishes when
both ends are minima. The formula is exact for a quadratic loss. Because ``Δ`` is zero
outside ``S``, ``ΔᵀHΔ`` involves only the Hessian block of those layers ("restricted to
the layer").

Hessian-vector products never form a Hessian: ``ΔᵀHΔ`` is the central difference of the
backend's autodiff gradient along ``Δ``, ``Δᵀ[∇L(θ + εΔ) − ∇L(θ − εΔ)] / 2ε`` (error
``O(ε²)`` for a smooth loss; default ``ε = 0.01`` in units of ``λ``), and ``g`` their mean.
For ReLU networks the loss along ``Δ`` has kinks (units switching on or off); the central
difference then measures the curvature averaged over ``[−ε, ε]``, kinks included, which a
double-backward Hessian-vector product would miss. The gradients come from the backend's
``Prepared.value_and_grad(..., train=False)``: the inference-mode loss the barrier is measured
with (BatchNorm by its running statistics, dropout off), so that they are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.analysis.llfc import check_out, data_identity, resolve_data
from combinability.data.base import labelled_targets
from combinability.errors import ConfigurationError, SamplerError, UnknownNameError
from combinability.evaluation import summed_cross_entropy
from combinability.results import annotate, provenance

if TYPE_CHECKING:
    from combinability.backend import Backend, Prepared
    from combinability.data.base import ArrayDataset
    from combinability.sets import ModelSet

__all__ = ["layerwise_barriers", "curvature_along", "curvature_and_slope", "second_order_gap", "MODES"]

#: The two families of layer sets: each layer alone, and every layer up to it.
MODES = ("single", "cumulative")

LABELS: dict[str, dict[str, str]] = {
    "mode": {"long_name": "layers combined (single: that layer alone; cumulative: every layer up to it)"},
    "layer": {"long_name": "layer (from the input)"},
    "lam": {"long_name": "position on the path θ_A + λ Δ (λ)", "units": "1"},
    "parameters": {"long_name": "weights in the layer"},
    "loss": {"long_name": "mean cross-entropy loss on the path", "units": "nats"},
    "accuracy": {"long_name": "top-1 accuracy on the path", "units": "1"},
    "loss_gap": {"long_name": "loss minus the chord of the path's ends", "units": "nats"},
    "predicted_gap": {"long_name": "second-order prediction of the loss gap", "units": "nats"},
    "curvature_gap": {"long_name": "curvature term ½λ(1−λ)[λΔᵀH₀Δ + (1−λ)ΔᵀH₁Δ]", "units": "nats"},
    "loss_barrier": {"long_name": "loss barrier (largest loss gap on the path)", "units": "nats"},
    "predicted_barrier": {"long_name": "second-order prediction of the loss barrier", "units": "nats"},
    "accuracy_barrier": {"long_name": "accuracy barrier (largest accuracy drop below the chord)", "units": "1"},
    "curvature_start": {"long_name": "ΔᵀHΔ at the path's start θ_A", "units": "nats"},
    "curvature_end": {"long_name": "ΔᵀHΔ at the path's end θ_A + Δ", "units": "nats"},
    "slope_difference": {"long_name": "(∇L(start) − ∇L(end))ᵀΔ", "units": "nats"},
    "distance": {"long_name": "‖Δ‖ (Euclidean length of the path)"},
}


# -- gradients and curvature ----------------------------------------------------------------------
def _summed_loss(logits: Any, y: Any, classes_second: bool | None = None) -> Any:
    """The summed cross-entropy over every scored target (the caller divides by their number); array API. A
    sequence model's ``(n, T, vocab)`` logits (or a dense prediction's) are read one row per target, as evaluations
    read them (:func:`~combinability.evaluation.logit_rows`, ``classes_second`` as there); targets labelled
    ``IGNORE_INDEX`` add nothing."""
    from array_api_compat import array_namespace

    return summed_cross_entropy(array_namespace(logits), logits, y, classes_second)[0]


def loss_of(prepared: Prepared) -> Callable[[Any, Any], Any]:
    """:func:`_summed_loss` reading the logits where ``prepared`` says its model puts the classes.

    A dense prediction's ``(n, classes, H, W)`` with as many classes as rows and columns fits both
    layouts; the evaluations settle it by the model's last layer (``prepared.classes_second``), and so
    must the gradients, or they differentiate another loss than the one measured.
    """
    classes_second = getattr(prepared, "classes_second", None)
    return lambda logits, y: _summed_loss(logits, y, classes_second)


def full_gradient(prepared: Prepared, backend: Backend, flat: Any, x: Any, y: Any, batch_size: int) -> np.ndarray:
    """The gradient of the mean cross-entropy over every target (every example; every position of a sequence) in
    inference mode, float64 ``(d,)``, batched. Zero on the entries the backend does not train (buffers)."""
    n = int(x.shape[0])
    total = None
    loss = loss_of(prepared)
    for s in range(0, n, batch_size):
        _, grad, _ = prepared.value_and_grad(flat, x[s : s + batch_size, ...], y[s : s + batch_size], loss,
                                             train=False)
        g = backend.to_numpy(grad).astype(np.float64)
        total = g if total is None else total + g
    return total / labelled_targets(backend.to_numpy(y))


def curvature_along(prepared: Prepared, backend: Backend, theta: np.ndarray, direction: np.ndarray, x: Any,
                    y: Any, *, step: float = 1e-2, batch_size: int = 1000) -> tuple[float, np.ndarray]:
    """``ΔᵀH(θ)Δ`` and ``∇L(θ)`` by a central difference of autodiff gradients along ``Δ``.

    Parameters
    ----------
    prepared, backend
        The model's :class:`~combinability.backend.Prepared` form and its backend.
    theta, direction : numpy arrays ``(d,)``
        The point ``θ`` and the direction ``Δ`` (not normalised: the result is the second
        derivative of ``t ↦ L(θ + tΔ)`` at ``t = 0``).
    x, y : device arrays
        The examples and labels the mean loss is taken over.
    step : float
        ``ε`` of ``Δᵀ[∇L(θ + εΔ) − ∇L(θ − εΔ)] / 2ε``, in units of ``t``.

    Returns
    -------
    (float, numpy.ndarray)
        The curvature ``ΔᵀHΔ`` and the gradient ``(∇L(θ + εΔ) + ∇L(θ − εΔ)) / 2`` (``∇L(θ)`` up to ``O(ε²)``).

    Notes
    -----
    The backends differentiate the trained entries only: the gradient is zero on buffers (a
    BatchNorm's running statistics), which an inference-mode loss depends on. For a direction
    that moves buffers this is not ``ΔᵀHΔ``; :func:`curvature_and_slope` is.
    """
    dtype = np.dtype(theta.dtype)
    plus = backend.asarray((theta + step * direction).astype(dtype))
    minus = backend.asarray((theta - step * direction).astype(dtype))
    g_plus = full_gradient(prepared, backend, plus, x, y, batch_size)
    g_minus = full_gradient(prepared, backend, minus, x, y, batch_size)
    d = direction.astype(np.float64)
    return float(d @ (g_plus - g_minus)) / (2 * step), (g_plus + g_minus) / 2


def curvature_and_slope(prepared: Prepared, backend: Backend, theta: np.ndarray, direction: np.ndarray, x: Any,
                        y: Any, *, untrained: np.ndarray | None = None,
                        mean_loss: Callable[[np.ndarray], np.ndarray] | None = None, step: float = 1e-2,
                        batch_size: int = 1000) -> tuple[float, float]:
    """``ΔᵀH(θ)Δ`` and ``∇L(θ)ᵀΔ`` along a direction that may move buffers as well as parameters.

    With ``φ(t) = L(θ + tΔ)``, ``φ'(t)`` is the autodiff gradient's part on the trained entries,
    ``Δ_tᵀ∇L``, plus the part on the ``untrained`` ones (buffers: a BatchNorm's running statistics,
    which the backends do not differentiate), a central difference of the loss along them,
    ``[L(θ' + εΔ_u) − L(θ' − εΔ_u)] / 2ε``. Then ``ΔᵀHΔ = [φ'(ε) − φ'(−ε)] / 2ε`` and
    ``∇L(θ)ᵀΔ = [φ'(ε) + φ'(−ε)] / 2``, both up to ``O(ε²)``.

    Parameters
    ----------
    prepared, backend, theta, direction, x, y, step, batch_size
        As :func:`curvature_along`.
    untrained : bool array ``(d,)``, optional
        The entries the gradient does not cover (default none: then this is :func:`curvature_along`).
    mean_loss : callable, optional
        ``(k, d)`` vectors to their mean losses ``(k,)`` on ``x, y`` (inference mode); needed when
        ``direction`` moves an ``untrained`` entry.

    Returns
    -------
    (float, float)
        The curvature ``ΔᵀHΔ`` and the slope ``∇L(θ)ᵀΔ``.

    Raises
    ------
    ConfigurationError
        If ``direction`` moves an untrained entry and ``mean_loss`` is not given.
    """
    d = direction.astype(np.float64)
    moved = untrained is not None and bool(np.any(d[untrained] != 0))
    if moved and mean_loss is None:
        raise ConfigurationError("the direction moves entries the gradient does not cover (buffers); pass "
                                 "mean_loss= to differentiate the loss along them")
    trained_part = np.where(untrained, 0.0, d) if untrained is not None else d
    dtype = np.dtype(theta.dtype)
    slopes = []
    for sign in (1.0, -1.0):
        point = theta.astype(np.float64) + sign * step * d
        grad = full_gradient(prepared, backend, backend.asarray(point.astype(dtype)), x, y, batch_size)
        slope = float(trained_part @ grad)
        if moved:
            buffers = np.where(untrained, d, 0.0)
            up, down = np.asarray(mean_loss(np.stack([point + step * buffers, point - step * buffers]).astype(dtype)),
                                  dtype=np.float64)
            slope += float(up - down) / (2 * step)
        slopes.append(slope)
    return (slopes[0] - slopes[1]) / (2 * step), (slopes[0] + slopes[1]) / 2


def second_order_gap(lam: np.ndarray, slope_difference: float, h_start: float, h_end: float) -> tuple[Any, Any]:
    """The predicted gap ``λ(1−λ)(g₀−g₁)ᵀΔ + ½λ(1−λ)[λ h₀ + (1−λ) h₁]`` and its curvature term alone."""
    lam = np.asarray(lam, dtype=np.float64)
    curvature = 0.5 * lam * (1 - lam) * (lam * h_start + (1 - lam) * h_end)
    return lam * (1 - lam) * slope_difference + curvature, curvature


def _check_autodiff(pair: ModelSet, prepared: Any, ds: ArrayDataset) -> None:
    """Refuse, before the work, a backend whose prepared models give no gradients."""
    fn = getattr(prepared, "value_and_grad", None)
    problem = "" if callable(fn) else "it has no value_and_grad"
    if not problem:
        be = pair.backend_obj
        try:
            fn(be.asarray(pair.theta(0).copy()), be.asarray(ds.x[:1]), be.asarray(ds.y[:1]), loss_of(prepared),
               train=False)
        except (NotImplementedError, AttributeError, TypeError) as exc:
            problem = f"its value_and_grad failed: {type(exc).__name__}: {exc}"
    if problem:
        raise ConfigurationError(f"the curvature prediction needs the gradients of backend {pair.backend!r}, but "
                                 f"{problem}; pass curvature=False, or use a backend with autodiff (torch, jax)")


# -- the analysis --------------------------------------------------------------------------------
def _lambdas(lambdas: Sequence[float] | None) -> np.ndarray:
    grid = np.linspace(0.0, 1.0, 11) if lambdas is None else np.asarray(list(lambdas), dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise SamplerError(f"lambdas must be a non-empty sequence of numbers in [0, 1], got {lambdas!r}")
    bad = grid[~np.isfinite(grid) | (grid < 0) | (grid > 1)]
    if bad.size:
        raise SamplerError(f"lambdas {bad.tolist()} lie outside the path's range [0, 1] (λ = 0 is θ_A, λ = 1 is the "
                           "path's end)")
    return np.unique(np.concatenate([grid, [0.0, 1.0]]))


def _layers(pair: ModelSet, layers: Sequence[str] | None) -> list[str]:
    valid = list(pair.layer_names)
    if layers is None:
        return valid
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise UnknownNameError(f"unknown layer(s) {unknown}; valid: {', '.join(valid)}")
    if not layers:
        raise ConfigurationError(f"no layers given; valid: {', '.join(valid)}")
    return sorted(dict.fromkeys(layers), key=valid.index)


def _modes(modes: Sequence[str]) -> list[str]:
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UnknownNameError(f"unknown mode(s) {unknown or modes}; valid: {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def layerwise_barriers(
    pair: ModelSet,
    data: Any = "digits",
    *,
    lambdas: Sequence[float] | None = None,
    layers: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    curvature: bool = True,
    split: str = "test",
    limit: int | None = None,
    step: float = 1e-2,
    batch_size: int = 1000,
    out: str | Path | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Barriers of the paths on which one layer (or the layers up to it) moves from A to B.

    Parameters
    ----------
    pair : ModelPair
        Naive or aligned.
    data : str, (x, y) or ArrayDataset
        A dataset name (its ``split``) or the examples; the losses, barriers and
        curvatures are all taken on them.
    lambdas : sequence of float, optional
        Points of each path, in ``[0, 1]`` (0 and 1 are always added); default 11 equidistant.
    layers : sequence of str, optional
        Layers (``pair.layer_names``) to analyse; default all.
    modes : sequence of {"single", "cumulative"}
        Which families of paths.
    curvature : bool
        Also compute the second-order prediction (four gradient passes over the data per path).
    split, limit : str, int
        Split of a named dataset, and the number of its first examples used.
    step : float
        ``ε`` of the central difference of gradients (in units of ``λ``).
    batch_size : int
        Examples per forward or gradient pass.
    out : path, optional
        Write the result there (finished results of the same settings are reused).
    attrs : mapping, optional
        Extra attributes stored with the result.

    Returns
    -------
    xarray.Dataset
        Dims ``(mode, layer, lam)``: ``loss``, ``accuracy``, ``loss_gap`` (loss minus the
        chord of the path's ends), ``predicted_gap`` and ``curvature_gap``; dims ``(mode,
        layer)``: ``loss_barrier``, ``accuracy_barrier``, ``predicted_barrier``,
        ``curvature_start``, ``curvature_end``, ``slope_difference``, ``distance``;
        ``combinability_format = "layerwise_barriers"``.

    Raises
    ------
    UnknownNameError
        An unknown layer or mode (the valid ones are listed).
    SamplerError
        A ``λ`` outside ``[0, 1]``.
    ConfigurationError
        ``curvature=True`` on a backend that gives no gradients; a non-positive ``step``.
    """
    from combinability.experiments.compare import reuse_or_run

    grid = _lambdas(lambdas)
    names = _layers(pair, layers)
    modes = _modes(modes)
    if not (np.isfinite(step) and step > 0):
        raise ConfigurationError(f"step must be a positive number, got {step!r}")
    if int(batch_size) < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    ds = resolve_data(pair, data, split, limit)
    if curvature:
        _check_autodiff(pair, pair.backend_obj.prepare(pair.template, pair.layout), ds)
    key = {"analysis": "layerwise_barriers", "models": pair.fingerprints(), "lambdas": grid.tolist(),
           "layers": names, "modes": modes, "curvature": bool(curvature), "step": float(step),
           "data": data_identity(ds), "batch_size": int(batch_size), "evaluation": repr(pair.backend_obj)}

    def run(o: Path | None) -> xr.Dataset:
        check_out(o)
        return _run(pair, ds, grid, names, modes, bool(curvature), float(step), int(batch_size), attrs)

    return reuse_or_run(out, key, run, overwrite=overwrite)


def _run(pair: ModelSet, ds: ArrayDataset, grid: np.ndarray, names: list[str], modes: list[str], curvature: bool,
         step: float, batch_size: int, attrs: Mapping[str, Any] | None) -> xr.Dataset:
    from combinability.evaluation import Evaluator, device_data

    be = pair.backend_obj
    evaluator = Evaluator(be, pair.template, pair.layout, batch_size=batch_size)
    x, y = device_data(be)(ds)
    theta_a, delta_full = pair.theta(0), pair.theta(1).astype(np.float64) - pair.theta(0)
    layer_index = pair.layout.layer_index()
    order = list(pair.layer_names)
    shape2, shape3 = (len(modes), len(names)), (len(modes), len(names), grid.size)
    out = {k: np.full(shape3, np.nan) for k in ("loss", "accuracy", "loss_gap", "predicted_gap", "curvature_gap")}
    per = {k: np.full(shape2, np.nan) for k in ("curvature_start", "curvature_end", "slope_difference", "distance")}
    parameters = [int(np.sum(layer_index == order.index(name))) for name in names]
    # buffers (running statistics) move along the path too, but get no gradient: differentiated by the loss
    trained = set(be.trainable(pair.template))
    untrained = np.repeat([e.name not in trained for e in pair.layout.entries], [e.size for e in pair.layout.entries])

    def mean_loss(flats: np.ndarray) -> np.ndarray:
        return np.array([e.loss for e in evaluator.evaluate(flats, ds)])

    for m, mode in enumerate(modes):
        for j, name in enumerate(names):
            k = order.index(name)
            mask = (layer_index == k) if mode == "single" else (layer_index <= k)
            delta = np.where(mask, delta_full, 0.0)
            path = [(theta_a + lam * delta).astype(theta_a.dtype) for lam in grid]
            evs = evaluator.evaluate(np.stack(path), ds)
            loss = np.array([e.loss for e in evs])
            acc = np.array([e.accuracy for e in evs])
            out["loss"][m, j], out["accuracy"][m, j] = loss, acc
            out["loss_gap"][m, j] = loss - ((1 - grid) * loss[0] + grid * loss[-1])
            per["distance"][m, j] = float(np.linalg.norm(delta))
            if curvature:
                kw = {"untrained": untrained, "mean_loss": mean_loss, "step": step, "batch_size": batch_size}
                h0, s0 = curvature_and_slope(evaluator.prepared, be, theta_a, delta, x, y, **kw)
                h1, s1 = curvature_and_slope(evaluator.prepared, be, path[-1], delta, x, y, **kw)
                slope = s0 - s1
                per["curvature_start"][m, j], per["curvature_end"][m, j] = h0, h1
                per["slope_difference"][m, j] = slope
                out["predicted_gap"][m, j], out["curvature_gap"][m, j] = second_order_gap(grid, slope, h0, h1)
    acc_gap = (1 - grid) * out["accuracy"][..., :1] + grid * out["accuracy"][..., -1:] - out["accuracy"]
    variables: dict[str, Any] = {k: (("mode", "layer", "lam"), v) for k, v in out.items()}
    variables.update({k: (("mode", "layer"), v) for k, v in per.items()})
    variables["loss_barrier"] = (("mode", "layer"), out["loss_gap"].max(axis=-1))
    variables["accuracy_barrier"] = (("mode", "layer"), acc_gap.max(axis=-1))
    variables["predicted_barrier"] = (("mode", "layer"), out["predicted_gap"].max(axis=-1))
    result = xr.Dataset(
        variables,
        coords={"mode": modes, "layer": names, "lam": grid, "parameters": ("layer", parameters)},
        attrs=provenance(combinability_format="layerwise_barriers", architecture=pair.architecture,
                         width=float(pair.width), backend=be.name, dataset=ds.name, split=ds.split,
                         examples=len(ds), alignment=pair.alignment, curvature=bool(curvature), step=step,
                         hvp=("central difference of value_and_grad along the path (inference-mode loss); "
                              "buffers by central differences of the loss"),
                         fingerprints=pair.fingerprints(), **dict(attrs or {})),
    )
    return annotate(result, LABELS)
