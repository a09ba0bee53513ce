"""Evaluation in the core: batching, and every metric computed on logits.

A backend gives one batched functional forward pass (``Prepared.forward``: flat vectors
``(k, d)`` and inputs ``(n, ...)`` to logits ``(k, n, classes)``); everything else is
here, once, written against the array API so it runs on the backend's device:
batches of the data kept on the device, the mean cross-entropy, the accuracy, the
predictions (for §6.1 agreement) and any *logit metric* a plugin registers.

A logit metric is a small frozen value (:class:`LogitMetric`) whose ``per_example``
maps ``(xp, logits (k, b, C), labels (b,))`` to per-example values ``(k, b)``; the core
averages them over the dataset. Register one with the ``combinability_register_metrics``
hook (:class:`~combinability.hookspecs.Registration` pointing at the value).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.errors import ConfigurationError, DatasetError, LayoutError
from combinability.hookspecs import Registration, hookimpl

if TYPE_CHECKING:
    from combinability.backend import Backend, Prepared
    from combinability.data.base import ArrayDataset
    from combinability.layout import FlatLayout

__all__ = ["Evaluation", "Evaluator", "LogitMetric", "cross_entropy", "brier", "DeviceData", "BUILTIN_METRICS"]


@dataclass
class Evaluation:
    """Scores of one parameter vector on one dataset split.

    Attributes
    ----------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct top-1 predictions.
    predictions : numpy.ndarray of int64, shape (n,)
        Predicted label of every example, in dataset order.
    values : dict of str to float
        The means of any extra logit metrics asked for.
    """

    loss: float
    accuracy: float
    predictions: np.ndarray = field(repr=False)
    values: dict[str, float] = field(default_factory=dict)


def _logsumexp(xp: Any, logits: Any) -> Any:
    top = xp.max(logits, axis=-1, keepdims=True)
    return xp.log(xp.sum(xp.exp(logits - top), axis=-1)) + top[..., 0]


def _pick(xp: Any, logits: Any, y: Any) -> Any:
    """``logits[..., y]`` per example, via a one-hot mask (the array API has no gather)."""
    classes = xp.arange(logits.shape[-1], device=_device(xp, logits))
    onehot = xp.astype(xp.reshape(y, (*((1,) * (logits.ndim - 2)), -1, 1)) == classes, logits.dtype)
    return xp.sum(logits * onehot, axis=-1)


def _device(xp: Any, array: Any) -> Any:
    from array_api_compat import device

    return device(array)


def cross_entropy(xp: Any, logits: Any, y: Any) -> Any:
    """Per-example cross-entropy ``logsumexp(z) - z_y``, shape ``logits.shape[:-1]``."""
    logits = xp.astype(logits, xp.float32)
    return _logsumexp(xp, logits) - _pick(xp, logits, y)


def mean_cross_entropy(xp: Any, logits: Any, y: Any) -> Any:
    """The mean of :func:`cross_entropy` over every axis (a training loss)."""
    return xp.mean(cross_entropy(xp, logits, y))


def brier(xp: Any, logits: Any, y: Any) -> Any:
    """Per-example Brier score ``sum_c (softmax(z)_c - [c = y])^2``."""
    logits = xp.astype(logits, xp.float32)
    p = xp.exp(logits - _logsumexp(xp, logits)[..., None])
    p_y = _pick(xp, p, y)
    return xp.sum(p * p, axis=-1) - 2 * p_y + 1


@dataclass(frozen=True)
class LogitMetric:
    """A metric of logits, averaged over the examples of a split.

    Parameters
    ----------
    name : str
        Variable name in result Datasets.
    per_example : callable
        ``per_example(xp, logits (k, b, C), labels (b,)) -> (k, b)`` with array-API ops.
    long_name : str
        Description (the variable's ``long_name``).
    """

    name: str
    per_example: Callable[[Any, Any, Any], Any]
    long_name: str = ""

    def __call__(self, xp: Any, logits: Any, y: Any) -> Any:
        """Per-example values ``(k, b)``."""
        return self.per_example(xp, logits, y)


#: Metrics every evaluation computes, and those available by name.
BRIER = LogitMetric("brier", brier, "mean Brier score")
BUILTIN_METRICS: dict[str, LogitMetric] = {"brier": BRIER}


@hookimpl
def combinability_register_metrics() -> list[Registration]:
    """The built-in logit metrics beside loss and accuracy (which every evaluation computes)."""
    return [Registration(name, f"combinability.evaluation:{name.upper()}", metric.long_name)
            for name, metric in BUILTIN_METRICS.items()]


def get_logit_metric(metric: str | LogitMetric) -> LogitMetric:
    """A :class:`LogitMetric` from its registered name (built-in or plugin) or itself."""
    if isinstance(metric, LogitMetric):
        return metric
    from combinability.errors import PluginError, UnknownNameError
    from combinability.plugins import get_metric, list_metrics

    try:
        value = get_metric(metric)
    except UnknownNameError:
        raise UnknownNameError(f"unknown metric {metric!r}; available: "
                               f"{', '.join(list_metrics())}") from None
    if not isinstance(value, LogitMetric):
        raise PluginError(f"metric {metric!r} is a {type(value).__name__}, not a combinability.LogitMetric")
    return value


class DeviceData:
    """Device copies of datasets (x float32, y int64), cached per dataset object."""

    def __init__(self, backend: Backend, size: int = 4) -> None:
        self.backend = backend
        self.size = max(1, int(size))
        self._cache: OrderedDict[int, tuple[weakref.ref, Any, Any]] = OrderedDict()

    def __call__(self, data: ArrayDataset) -> tuple[Any, Any]:
        key = id(data)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is data:
            self._cache.move_to_end(key)
            return hit[1], hit[2]
        x = self.backend.asarray(np.ascontiguousarray(data.x, dtype=np.float32))
        y = self.backend.asarray(np.ascontiguousarray(data.y, dtype=np.int64))
        cache = self._cache
        cache[key] = (weakref.ref(data, lambda _, key=key, cache=cache: cache.pop(key, None)), x, y)
        while len(cache) > self.size:
            cache.popitem(last=False)
        return x, y


_device_data: dict[int, DeviceData] = {}


def device_data(backend: Backend) -> DeviceData:
    """The process-wide :class:`DeviceData` cache of ``backend``."""
    cache = _device_data.get(id(backend))
    if cache is None or cache.backend is not backend:
        cache = _device_data[id(backend)] = DeviceData(backend)
    return cache


class Evaluator:
    """Evaluate flat vectors of one model's layout on datasets, batched, on the device.

    Parameters
    ----------
    backend : Backend
    model : native model
        Supplies the architecture (and buffers the layout leaves out).
    layout : FlatLayout
    batch_size : int
        Examples per forward pass.
    vectors : int
        Parameter vectors per forward pass.
    metrics : sequence of str or LogitMetric
        Extra metrics beside loss and accuracy.
    """

    def __init__(self, backend: Backend, model: Any, layout: FlatLayout, *, batch_size: int = 1000,
                 vectors: int = 8, metrics: Sequence[str | LogitMetric] = (),
                 prepared: Prepared | None = None) -> None:
        if int(batch_size) < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.layout = layout
        self.batch_size = int(batch_size)
        self.vectors = max(1, int(vectors))
        self.metrics = tuple(get_logit_metric(m) for m in metrics)
        self.prepared = prepared if prepared is not None else backend.prepare(model, layout)
        self._data = device_data(backend)

    def _stack(self, flats: Any) -> Any:
        be, xp = self.backend, self.backend.xp()
        dtype = np.dtype(self.layout.dtype)
        if isinstance(flats, list | tuple):
            if not flats:
                raise LayoutError("no parameter vectors to evaluate")
            rows = [be.asarray(f, dtype) for f in flats]
            stacked = xp.stack([xp.reshape(r, (-1,)) for r in rows])
        else:
            stacked = be.asarray(flats, dtype)
            if stacked.ndim == 1:
                stacked = stacked[None, :]
        if stacked.ndim != 2 or stacked.shape[1] != self.layout.size:
            raise LayoutError(f"parameter vectors have shape {tuple(stacked.shape)}; the layout expects (d,) or "
                              f"(k, d) with d = {self.layout.size}")
        return stacked

    def logits(self, flats: Any, x: Any) -> Any:
        """Logits ``(k, n, C)`` of the vectors on inputs ``x`` (device arrays), batched."""
        xp = self.backend.xp()
        stacked = self._stack(flats)
        rows = []
        for c in range(0, stacked.shape[0], self.vectors):
            chunk = stacked[c : c + self.vectors, ...]
            parts = [self.prepared.forward(chunk, x[s : s + self.batch_size, ...])
                     for s in range(0, x.shape[0], self.batch_size)]
            rows.append(xp.concat(parts, axis=1))
        return xp.concat(rows, axis=0)

    def evaluate(self, flats: Any, data: ArrayDataset) -> list[Evaluation]:
        """Loss, accuracy, predictions (and extra metrics) of each vector on ``data``.

        Parameters
        ----------
        flats : array ``(d,)`` or ``(k, d)``, or a sequence of ``(d,)`` arrays
            Numpy or device arrays.
        data : ArrayDataset

        Returns
        -------
        list of Evaluation
            One per vector, in order.
        """
        n = len(data)
        if n == 0:
            raise DatasetError("cannot evaluate on an empty dataset")
        be, xp = self.backend, self.backend.xp()
        stacked = self._stack(flats)
        x, y = self._data(data)
        k = stacked.shape[0]
        loss = np.zeros(k)
        correct = np.zeros(k)
        extra = np.zeros((len(self.metrics), k))
        preds = []
        for c in range(0, k, self.vectors):
            chunk = stacked[c : c + self.vectors, ...]
            kc = chunk.shape[0]
            chunk_preds = []
            for s in range(0, n, self.batch_size):
                yb = y[s : s + self.batch_size]
                logits = self.prepared.forward(chunk, x[s : s + self.batch_size, ...])
                pred = xp.argmax(logits, axis=-1)
                loss[c : c + kc] += be.to_numpy(xp.sum(be.cross_entropy(logits, yb), axis=1)).astype(np.float64)
                correct[c : c + kc] += be.to_numpy(xp.sum(xp.astype(pred == yb, xp.float32), axis=1))
                for j, metric in enumerate(self.metrics):
                    extra[j, c : c + kc] += be.to_numpy(xp.sum(metric.per_example(xp, logits, yb), axis=1))
                chunk_preds.append(be.to_numpy(pred).astype(np.int64))
            preds.append(np.concatenate(chunk_preds, axis=1))
        predictions = np.concatenate(preds, axis=0)
        return [Evaluation(loss=float(loss[i] / n), accuracy=float(correct[i] / n), predictions=predictions[i],
                           values={m.name: float(extra[j, i] / n) for j, m in enumerate(self.metrics)})
                for i in range(k)]

    def features(self, flat: Any, data: ArrayDataset, points: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-unit features at ``points`` for one vector: ``{point: (examples x positions, units)}``.

        Convolutional ``(n, c, h, w)`` outputs are flattened example-major, then row-major
        positions, to ``(n * h * w, c)``; vectors stay ``(n, units)``.
        """
        be, xp = self.backend, self.backend.xp()
        (flat,) = self._stack(flat)
        x, _ = self._data(data)
        out: dict[str, list[np.ndarray]] = {p: [] for p in points}
        for s in range(0, x.shape[0], self.batch_size):
            feats = self.prepared.features(flat, x[s : s + self.batch_size, ...], list(points))
            for p in points:
                f = feats[p]
                if f.ndim == 4:
                    f = xp.reshape(xp.permute_dims(f, (0, 2, 3, 1)), (-1, f.shape[1]))
                elif f.ndim != 2:
                    f = xp.reshape(f, (f.shape[0], -1))
                out[p].append(be.to_numpy(f).astype(np.float32))
        return {p: np.concatenate(v) for p, v in out.items()}
