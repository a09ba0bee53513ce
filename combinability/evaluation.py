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

import contextlib
import functools
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.backend import bound_forward
from combinability.data.base import IGNORE_INDEX, input_dtype, input_fault, labelled_targets
from combinability.errors import (
    CombinabilityError,
    ConfigurationError,
    DatasetError,
    LayoutError,
    SmallerBatchWarning,
)
from combinability.hookspecs import Registration, hookimpl
from combinability.host_memory import keep_freed_memory

if TYPE_CHECKING:
    from combinability.backend import Backend, Prepared
    from combinability.data.base import ArrayDataset
    from combinability.layout import FlatLayout

__all__ = ["Evaluation", "Evaluator", "LogitMetric", "cross_entropy", "brier", "DeviceData", "BUILTIN_METRICS",
           "CrossMoments"]


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


def scored(xp: Any, y: Any) -> tuple[Any, Any]:
    """``(labels, weights)`` for scoring: targets labelled :data:`IGNORE_INDEX` get weight 0 (float32)
    and, so that no index runs outside the logits, the label 0; every other target weight 1."""
    keep = y != IGNORE_INDEX
    return xp.where(keep, y, xp.zeros_like(y)), xp.astype(keep, xp.float32)


def summed_cross_entropy(xp: Any, logits: Any, y: Any, classes_second: bool | None = None) -> tuple[Any, Any]:
    """The sum of :func:`cross_entropy` over the scored targets, and their number (both 0-d, float32).

    Targets ``(n, *positions)`` (a sequence's ``(n, T)``, a segmentation's ``(n, H, W)``) take
    logits in any layout :func:`logit_rows` reads (``classes_second`` as there): one row per target.
    Targets labelled :data:`IGNORE_INDEX` add nothing to either.
    """
    if len(y.shape) > 1 or logits.ndim > 2:
        logits = logit_rows(xp, logits, tuple(y.shape), classes_second=classes_second)
    labels, weights = scored(xp, xp.reshape(y, (-1,)))
    return xp.sum(cross_entropy(xp, logits, labels) * weights), xp.sum(weights)


def mean_cross_entropy(xp: Any, logits: Any, y: Any, classes_second: bool | None = None) -> Any:
    """The mean of :func:`cross_entropy` over every scored target (a training loss): targets labelled
    :data:`IGNORE_INDEX` are left out of the sum and the count (0 where a batch has none scored).

    Targets ``(n, *positions)`` (a sequence's ``(n, T)``, a segmentation's ``(n, H, W)``) take
    logits in any layout :func:`logit_rows` reads (``classes_second`` as there): one row per target.
    """
    total, count = summed_cross_entropy(xp, logits, y, classes_second)
    return total / (count + xp.astype(count == 0, count.dtype))


def logit_rows(xp: Any, logits: Any, targets: tuple[int, ...], lead: int = 0,
               classes_second: bool | None = None) -> Any:
    """``logits`` as ``(*lead axes, rows, classes)``: one row per target, example-major.

    Parameters
    ----------
    xp : array namespace
    logits : array
        ``lead`` leading axes (the combined models of one forward call), then one of:

        * ``(n, classes)`` for targets ``(n,)``, or ``(n * positions, classes)`` for targets
          ``(n, *positions)`` (already one row per target);
        * ``(n, *positions, classes)``: classes last (a sequence model's ``(n, T, vocab)``, a
          channels-last segmentation map ``(n, H, W, classes)``, flax's layout);
        * ``(n, classes, *positions)``: classes second, as torch's ``cross_entropy`` takes a
          dense prediction (a segmentation network's ``(n, classes, H, W)``).
    targets : tuple of int
        The targets' shape ``(n, *positions)``.
    lead : int
        Leading axes kept as they are.
    classes_second : bool, optional
        Where the model is known to give its classes (``True``: second, a convolution's channels;
        ``False``: last), for the shapes both dense layouts fit; the shape decides the others.

    Raises
    ------
    DatasetError
        If the logits fit none of these layouts.

    Notes
    -----
    Where both dense layouts fit (as many classes as every position axis has entries: a
    vocabulary as long as the sequence, 32 classes on 32 x 32 images), ``classes_second``
    decides: the :class:`Evaluator` takes it from the prepared model
    (:attr:`~combinability.backend.Prepared` ``classes_second``; torch's says True for a module
    whose logits come from a convolution). Unknown (None), the classes are read last, as every
    sequence model returns them.
    """
    shape = tuple(int(s) for s in logits.shape)
    head, rest, positions = shape[:lead], shape[lead + 1 :], tuple(int(s) for s in targets[1:])
    if not rest or shape[lead] not in (int(targets[0]), math.prod(targets)):
        raise DatasetError(
            f"the model gives logits of shape {shape[lead:]} for a batch of {int(targets[0])} example(s): the "
            f"first axis must be the batch's (a .squeeze() in forward also drops it for a batch of one example; "
            f"use .flatten(1) or .squeeze(-1) there)")
    if len(rest) == 1:
        return logits
    last, second = rest[:-1] == positions, rest[1:] == positions
    if second and (not last or classes_second):  # (…, n, classes, *positions) -> (…, n, *positions, classes)
        axes = (*range(lead + 1), *range(lead + 2, len(shape)), lead + 1)
        logits = xp.permute_dims(logits, axes)
        rest = (*rest[1:], rest[0])
    elif not last:
        raise DatasetError(
            f"the model gives {math.prod(shape[lead:-1])} rows of logits for {math.prod(targets)} targets (logits "
            f"of shape {shape[lead:]}, targets {tuple(targets)}): a classifier returns (n, classes) for targets "
            f"(n,); for targets (n, *positions) (a sequence's (n, T), a segmentation's (n, H, W)) a model returns "
            f"the logits of every position, as (n, *positions, classes), (n, classes, *positions) or "
            f"(n * positions, classes) (a model that returns the last position's only unless it is given targets, "
            f"as nanoGPT's GPT does, needs a forward that returns them all)")
    return xp.reshape(logits, (*head, -1, rest[-1]))


def _rows(xp: Any, logits: Any, targets: tuple[int, ...] | None = None, classes_second: bool | None = None) -> Any:
    """``(k, rows, classes)`` logits of ``k`` models: :func:`logit_rows` for targets of shape ``targets``;
    without targets, a sequence model's ``(k, n, T, classes)`` as ``(k, n * T, classes)``."""
    if targets is not None:
        return logit_rows(xp, logits, targets, lead=1, classes_second=classes_second)
    if logits.ndim > 3 and classes_second:  # (k, n, classes, *positions): the classes last first
        logits = xp.permute_dims(logits, (0, 1, *range(3, logits.ndim), 2))
    return logits if logits.ndim <= 3 else xp.reshape(logits, (logits.shape[0], -1, logits.shape[-1]))


@functools.cache
def training_loss(xp: Any, classes_second: bool | None = None) -> Callable[[Any, Any], Any]:
    """:func:`mean_cross_entropy` over ``xp`` as a ``loss(logits, y)``: one function per namespace
    (and ``classes_second``, a prepared model's, as :func:`logit_rows` takes it).

    A backend may compile its gradient step once per loss function (jax keys ``jax.jit`` on
    it): the same function for every call lets a probe, a training run and a learned
    aligner on one model share one compilation.
    """
    def loss(logits: Any, y: Any) -> Any:
        return mean_cross_entropy(xp, logits, y, classes_second)

    return loss


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
    """Device copies of datasets (x float32, or int64 token ids: :func:`input_dtype`; y int64), cached per
    dataset object."""

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
        x = self.backend.asarray(np.ascontiguousarray(data.x, dtype=input_dtype(data.x)))
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


#: Logits (elements) held before they are scored: each metric then runs once for many
#: batches (the MLP's 10,000 Fashion-MNIST test images in one call, not ten), in 16 MB.
_SCORED_TOGETHER = 1 << 22


@contextlib.contextmanager
def input_faults_named(data: ArrayDataset) -> Iterator[None]:
    """Around a model's forward pass on ``data``: where the model's own error points at the inputs (integer
    images, token ids beyond the vocabulary or sequences beyond the context, float token ids), a
    :class:`DatasetError` that says so (:func:`~combinability.data.base.input_fault`)."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        reason = None if isinstance(exc, CombinabilityError) else input_fault(exc, data.x)
        if reason is None:
            raise
        raise DatasetError(reason) from exc


_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "resource_exhausted", "failed to allocate")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that the device or the host ran out of memory: ``MemoryError``, torch's
    ``OutOfMemoryError`` (CUDA) and its CPU allocator's failure, XLA's ``RESOURCE_EXHAUSTED`` (jax)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OUT_OF_MEMORY)


def _check_labels(data: ArrayDataset, classes: int) -> None:
    """Refuse labels outside ``[0, classes)`` (the model's logits' last axis) before they are scored: an index
    beyond the logits fails in torch and is clamped silently in jax. :data:`IGNORE_INDEX` marks a target
    that is not scored."""
    y = np.asarray(data.y)
    y = y[y != IGNORE_INDEX]
    low, high = (int(y.min()), int(y.max())) if y.size else (0, 0)
    if low < 0 or high >= classes:
        raise DatasetError(f"the data's labels run from {low} to {high}, but the model gives {classes} classes "
                           f"(logits of {classes} values): labels must lie in [0, {classes})"
                           + (f"; a target that is not to be scored (padding) is labelled {IGNORE_INDEX}, "
                              f"torch's ignore_index" if low < 0 else ""))


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
        #: where the model gives its classes, for logits both dense layouts fit (:func:`logit_rows`)
        self.classes_second: bool | None = getattr(self.prepared, "classes_second", None)
        #: examples a forward call takes: ``batch_size``, halved each time a call runs out of memory
        self.step = self.batch_size
        self._data = device_data(backend)
        keep_freed_memory()  # every batch's activations reuse the memory of the last (host_memory)

    def _stack(self, flats: Any) -> Any:
        be, xp = self.backend, self.backend.xp()
        dtype = np.dtype(self.layout.dtype)
        if isinstance(flats, list | tuple):
            if not flats:
                raise LayoutError("no parameter vectors to evaluate")
            rows = [xp.reshape(be.asarray(f, dtype), (-1,)) for f in flats]
            stacked = rows[0] if len(rows) == 1 else xp.stack(rows)
        else:
            stacked = be.asarray(flats, dtype)
        if stacked.ndim == 1 and not getattr(self.prepared, "one_vector", False):
            # one vector (a sweep's cell): a (1, d) view, not a d-sized copy, unless the prepared model
            # takes it as it is (``Prepared.one_vector``: jax, whose (1, d) would be a copy)
            stacked = stacked[None, :]
        if stacked.ndim not in (1, 2) or stacked.shape[-1] != self.layout.size:
            raise LayoutError(f"parameter vectors have shape {tuple(stacked.shape)}; the layout expects (d,) or "
                              f"(k, d) with d = {self.layout.size}")
        return stacked

    def _batches(self, n: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of the forward calls over ``n`` examples, ``step`` at a time; after a call that ran
        out of memory (:meth:`_attempt`), the same examples again at the smaller step."""
        s = 0
        while s < n:
            stop = min(s + self.step, n)
            self._retry = False
            yield s, stop
            if not self._retry:
                s = stop

    _retry = False

    def _attempt(self, call: Callable[[], Any], data: ArrayDataset | None, start: int, stop: int) -> Any:
        """``call()`` (a forward pass over the examples ``start:stop`` of :meth:`_batches`), or None where it ran out
        of memory and took more than one example: ``step`` is then halved and the caller goes on to the next
        ``(start, stop)``, which holds the same examples in two calls."""
        try:
            with input_faults_named(data) if data is not None else contextlib.nullcontext():
                return call()
        except Exception as exc:
            if not out_of_memory(exc) or stop - start <= 1:
                raise
            what = type(exc).__name__
        self.step = max(1, (stop - start) // 2)
        self._retry = True
        warnings.warn(f"a forward pass of {stop - start} examples ran out of memory ({what}); evaluating "
                      f"{self.step} at a time from here (batch_size={self.step} avoids the retries)",
                      SmallerBatchWarning, stacklevel=4)
        return None

    def _one(self, flat: Any) -> Any:
        """One ``(d,)`` device vector from ``flat`` (``(d,)``, ``(1, d)`` or a sequence of one)."""
        stacked = self._stack(flat)
        if stacked.ndim == 1:
            return stacked
        if stacked.shape[0] != 1:
            raise LayoutError(f"one parameter vector is needed here, got {stacked.shape[0]}")
        return stacked[0]

    @staticmethod
    def _count(stacked: Any) -> int:
        """How many vectors ``stacked`` holds: ``(k, d)``, or one ``(d,)`` vector."""
        return 1 if stacked.ndim == 1 else int(stacked.shape[0])

    def _chunk(self, stacked: Any, start: int) -> Any:
        """The vectors of one forward call from ``start``: ``stacked`` itself when they are all of it
        (slicing copies immutable arrays, jax's)."""
        if start == 0 and self._count(stacked) <= self.vectors:
            return stacked
        return stacked[start : start + self.vectors, ...]

    def logits(self, flats: Any, x: Any, label_shape: tuple[int, ...] | None = None) -> Any:
        """Logits ``(k, rows, C)`` of the vectors on inputs ``x`` (device arrays), batched.

        ``label_shape`` is one example's labels' (``y.shape[1:]``: ``()`` for a class, a
        sequence's ``(T,)``, a segmentation's ``(H, W)``): the rows are then one per label,
        example-major, as :func:`logit_rows` reads them. Without it, one row per example, or a
        sequence model's ``(k, n, T, C)`` as ``(k, n * T, C)``.
        """
        xp = self.backend.xp()
        stacked = self._stack(flats)
        rows = []

        for c in range(0, self._count(stacked), self.vectors):
            chunk = self._chunk(stacked, c)
            parts = []
            with bound_forward(self.prepared, chunk) as forward:
                for s, stop in self._batches(int(x.shape[0])):
                    out = self._attempt(lambda s=s, stop=stop: forward(x[s:stop, ...]), None, s, stop)
                    if out is not None:
                        targets = None if label_shape is None else (stop - s, *label_shape)
                        parts.append(_rows(xp, out, targets, self.classes_second))
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
            One per vector, in order; a vector whose loss is NaN (NaN logits) has a NaN accuracy.
        """
        n = len(data)
        if n == 0:
            raise DatasetError("cannot evaluate on an empty dataset")
        # every scored target counts once (every labelled character of a sequence)
        targets = labelled_targets(data.y)
        if targets == 0:
            raise DatasetError(f"every label of the data is {IGNORE_INDEX} (not scored): there is nothing to evaluate")
        ignoring = targets < np.size(data.y)
        stacked = self._stack(flats)
        x, y = self._data(data)
        k = self._count(stacked)
        loss = np.zeros(k)
        correct = np.zeros(k)
        extra = np.zeros((len(self.metrics), k))
        preds = []
        for c in range(0, k, self.vectors):
            self._evaluate_chunk(stacked, c, data, x, y, loss, correct, extra, preds, ignoring)
        predictions = np.concatenate(preds, axis=0)
        # a NaN loss (NaN logits: a diverged combination) leaves the accuracy undefined, as the framework's
        # argmax over NaN decides the predictions: NaN, so that accuracy barriers are NaN with loss barriers
        correct[np.isnan(loss)] = np.nan
        return [Evaluation(loss=float(loss[i] / targets), accuracy=float(correct[i] / targets),
                           predictions=predictions[i],
                           values={m.name: float(extra[j, i] / targets) for j, m in enumerate(self.metrics)})
                for i in range(k)]

    def _evaluate_chunk(self, stacked: Any, c: int, data: ArrayDataset, x: Any, y: Any, loss: np.ndarray,
                        correct: np.ndarray, extra: np.ndarray, preds: list[np.ndarray],
                        ignoring: bool = False) -> None:
        """Add the sums of the vectors ``c : c + vectors`` over every batch to ``loss``, ``correct`` and
        ``extra`` (at their rows), and their predictions to ``preds``; ``ignoring``: some targets are
        labelled :data:`IGNORE_INDEX` (weighed 0)."""
        be, xp, n = self.backend, self.backend.xp(), int(x.shape[0])
        chunk = self._chunk(stacked, c)
        kc = self._count(chunk)
        # per-group sums stay on the device and cross to the host once per chunk (no sync per batch)
        sums: list[list[Any]] = [[] for _ in range(2 + len(self.metrics))]
        chunk_preds: list[Any] = []
        pending: list[Any] = []  # logits of the batches since ``start``, scored together
        with bound_forward(self.prepared, chunk) as forward:  # the vectors set up once, not per batch
            start = held = 0
            for s, stop in self._batches(n):
                out = self._attempt(lambda s=s, stop=stop: forward(x[s:stop, ...]), data, s, stop)
                if out is None:
                    continue
                logits = _rows(xp, out, (stop - s, *y.shape[1:]), self.classes_second)
                if s == 0:
                    _check_labels(data, int(logits.shape[-1]))
                pending.append(logits)
                held += math.prod(logits.shape)
                if held >= _SCORED_TOGETHER or stop == n:  # one call per metric for the group's batches
                    self._score(pending, y[start:stop], sums, chunk_preds, ignoring)
                    pending, start, held = [], stop, 0
        for target, batches in zip((loss, correct, *extra), sums, strict=True):
            for row in be.to_numpy(xp.stack(batches)).astype(np.float64):  # batch after batch, in float64
                target[c : c + kc] += row
        preds.append(be.to_numpy(xp.concat(chunk_preds, axis=1)).astype(np.int64))

    def _score(self, logits: list[Any], y: Any, sums: list[list[Any]], preds: list[Any],
               ignoring: bool = False) -> None:
        """Append the sums of loss, correct predictions and extra metrics of consecutive batches.

        ``logits`` are the batches' ``(k, rows, classes)`` logits, ``y`` their targets;
        everything stays on the device. With ``ignoring``, targets labelled :data:`IGNORE_INDEX`
        add nothing to any sum (their predictions are kept).
        """
        be, xp = self.backend, self.backend.xp()
        group = logits[0] if len(logits) == 1 else xp.concat(logits, axis=1)
        if len(y.shape) > 1:  # targets (n, *positions): the logits are one row per target (logit_rows)
            y = xp.reshape(y, (-1,))
        if group.shape[1] != y.shape[0]:
            raise DatasetError(
                f"the model gives {group.shape[1]} rows of logits for {y.shape[0]} targets: a classifier returns "
                f"(n, classes) for targets (n,), a sequence model (n, T, classes) for targets (n, T), the logits of "
                f"every position (a model that returns the last position's only unless it is given targets, as "
                f"nanoGPT's GPT does, needs a forward that returns them all)")
        pred = xp.argmax(group, axis=-1)
        labels, weights = scored(xp, y) if ignoring else (y, None)

        def summed(values: Any) -> Any:  # a metric's value at an unscored target may be anything: not multiplied
            return xp.sum(values if weights is None else xp.where(weights > 0, values, xp.zeros_like(values)), axis=1)

        sums[0].append(summed(be.cross_entropy(group, labels)))
        sums[1].append(summed(xp.astype(pred == labels, xp.float32)))
        for j, metric in enumerate(self.metrics):
            sums[2 + j].append(summed(metric.per_example(xp, group, labels)))
        preds.append(pred)

    def features(self, flat: Any, data: ArrayDataset, points: Sequence[str], *,
                 readings: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Per-unit features at ``points`` for one vector: ``{point: (examples x positions, units)}``.

        Convolutional ``(n, c, h, w)`` outputs (and a sequence's ``(n, c, length)``) are
        flattened example-major, then row-major positions, to ``(n * h * w, c)``; vectors
        stay ``(n, units)``. ``readings`` names points read otherwise
        (:data:`combinability.observation.READINGS`): ``"last"``, the units on the last axis (a
        transformer block's ``(n, tokens, features)`` output, which a backend gives as it is), read
        ``(n * tokens, features)``; ``"heads"``, the units on the last two axes of the map (a flax
        ``DenseGeneral``'s ``(n, tokens, heads, head_dim)``), read ``(n * tokens, heads * head_dim)``. Every example's
        features are returned at once (float32, written into one preallocated array per
        point); statistics of features need not hold them: see :meth:`correlations`.
        """
        be = self.backend
        flat = self._one(flat)
        x, _ = self._data(data)
        n = int(x.shape[0])
        out: dict[str, np.ndarray] = {}
        for s, stop in self._batches(n):
            feats = self._attempt(lambda s=s, stop=stop: self._features(flat, x[s:stop, ...], list(points),
                                                                        readings), data, s, stop)
            if feats is None:
                continue
            for p in points:
                f = be.to_numpy(_units_last(be.xp(), feats[p]))
                rows = f.shape[0] // (stop - s)  # rows per example
                if p not in out:
                    out[p] = np.empty((n * rows, f.shape[1]), dtype=np.float32)
                out[p][s * rows : s * rows + f.shape[0]] = f
        return out

    def correlations(self, flat_a: Any, flat_b: Any, data: ArrayDataset, points: Sequence[str], *,
                     readings: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Pearson correlation of every unit of A with every unit of B at ``points``, streamed.

        Both vectors see the same batch; each batch's features are reduced on the device
        to their means and centred cross-products (float32) and merged into float64
        running statistics (:class:`CrossMoments`), so memory is ``O(batch x units +
        units²)`` whatever the number of examples. Observations are as in
        :meth:`features` (examples, and positions of convolutional outputs).

        Parameters
        ----------
        flat_a, flat_b : array ``(d,)``
            The two parameter vectors (numpy or device).
        data : ArrayDataset
        points : sequence of str
            Feature points.
        readings : mapping of str to str, optional
            Points read otherwise than channels-first (see :meth:`features`).

        Returns
        -------
        dict of str to numpy.ndarray, float64 ``(units_a, units_b)``
            Units with zero variance correlate 0 with everything (as
            :func:`combinability.matching.unit_correlations`).
        """
        return {p: m.correlation() for p, m in self.moments(flat_a, flat_b, data, points,
                                                            readings=readings).items()}

    def moments(self, flat_a: Any, flat_b: Any, data: ArrayDataset, points: Sequence[str], *,
                readings: Mapping[str, str] | None = None) -> dict[str, CrossMoments]:
        """The running moments of A's and B's units at ``points`` (:class:`CrossMoments`), streamed
        as :meth:`correlations` streams them: their correlations, covariances and second moments."""
        be = self.backend
        flat_a, flat_b = self._one(flat_a), self._one(flat_b)
        x, _ = self._data(data)
        if int(x.shape[0]) == 0:
            raise DatasetError("cannot compute correlations on an empty dataset")
        wanted = list(dict.fromkeys(points))
        acc = {p: CrossMoments() for p in wanted}
        for s, stop in self._batches(int(x.shape[0])):
            xb = x[s:stop, ...]
            both = self._attempt(lambda xb=xb: (self._features(flat_a, xb, wanted, readings),
                                                self._features(flat_b, xb, wanted, readings)), data, s, stop)
            if both is None:
                continue
            fa, fb = both
            for p in wanted:
                acc[p].update(fa[p], fb[p], backend=be)
            del fa, fb, both
        return acc

    def _features(self, flat: Any, x: Any, points: list[str], readings: Mapping[str, str] | None) -> dict[str, Any]:
        """The prepared model's features at ``points``, channels-first (those of ``readings`` made so)."""
        from combinability.observation import channels_first

        feats = self.prepared.features(flat, x, points)
        xp = self.backend.xp()
        for p, reading in (readings or {}).items():
            if feats.get(p) is not None:
                feats[p] = channels_first(xp, feats[p], reading)
        return feats


def _units_last(xp: Any, f: Any) -> Any:
    """Features as ``(observations, units)``: channels-first maps ``(n, c, *positions)`` (a
    sequence's ``(n, c, length)``, an image's ``(n, c, h, w)``) to ``(n * positions, c)``,
    example-major then positions row-major; vectors ``(n, units)`` as they are."""
    if f.ndim >= 3:
        return xp.reshape(xp.permute_dims(f, (0, *range(2, f.ndim), 1)), (-1, f.shape[1]))
    return f


#: Observations reduced together (in the features' precision) before a float64 merge.
_CHUNK = 4096


#: A unit whose standard deviation is at most this fraction of its mean did not vary (float32 rounding only)
_CONSTANT_RELATIVE = 1e-6


class CrossMoments:
    """Running means, variances and cross-covariances of two sets of units, merged batch by batch.

    :meth:`update` reduces one batch of both sets' features, observed on the same inputs,
    to its count, means, centred sums of squares and centred cross-products (in the
    features' own precision, on their device, at most ``_CHUNK`` observations at a time),
    and merges them into float64 host accumulators with Chan et al.'s pairwise update, which avoids the cancellation of
    ``E[ab] − E[a]E[b]``. Memory: ``O(units_a x units_b)``, independent of the number of
    observations.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(100, 3)), rng.normal(size=(100, 4))
    >>> m = CrossMoments()
    >>> for s in range(0, 100, 32):
    ...     m.update(a[s : s + 32], b[s : s + 32])
    >>> bool(np.allclose(m.correlation(), np.corrcoef(a.T, b.T)[:3, 3:]))
    True
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean_a: np.ndarray | None = None
        self.mean_b: np.ndarray | None = None
        self.m2_a: np.ndarray | None = None
        self.m2_b: np.ndarray | None = None
        self.comoment: np.ndarray | None = None

    def update(self, a: Any, b: Any, *, backend: Backend | None = None) -> None:
        """Merge one batch: ``a`` and ``b`` are features of the same observations.

        Parameters
        ----------
        a, b : array
            ``(n, units)`` vectors or ``(n, channels, h, w)`` convolutional outputs (a
            channel's observations are examples and positions); numpy arrays, or device
            arrays of ``backend``.
        backend : Backend, optional
            The arrays' backend (reductions run on its device); numpy when omitted.
        """
        if backend is None:
            xp: Any = np
            host: Any = np.asarray
        else:
            xp, host = backend.xp(), backend.to_numpy
        a, b = _units_last(xp, a), _units_last(xp, b)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"the two feature batches hold {a.shape[0]} and {b.shape[0]} observations; "
                             "correlations need the same observations of both models")
        if self.mean_a is not None and (a.shape[1], b.shape[1]) != self.comoment.shape:
            raise ValueError(f"a batch of ({a.shape[1]}, {b.shape[1]}) units after batches of "
                             f"{self.comoment.shape}: every batch must have the same units")
        # float32 sums over many observations lose digits: reduce at most _CHUNK rows at a time on the
        # device, merge the chunks in float64
        for start in range(0, int(a.shape[0]), _CHUNK):
            self._merge(a[start : start + _CHUNK, ...], b[start : start + _CHUNK, ...], xp, host)

    def _merge(self, a: Any, b: Any, xp: Any, host: Any) -> None:
        """Reduce one chunk of observations on its device and merge it into the float64 statistics."""
        m = int(a.shape[0])
        mean_a, mean_b = xp.mean(a, axis=0), xp.mean(b, axis=0)
        da, db = a - mean_a[None, :], b - mean_b[None, :]
        batch = (host(mean_a).astype(np.float64), host(mean_b).astype(np.float64),
                 host(xp.sum(da * da, axis=0)).astype(np.float64), host(xp.sum(db * db, axis=0)).astype(np.float64),
                 host(xp.matmul(xp.permute_dims(da, (1, 0)), db)).astype(np.float64))
        del da, db
        if self.mean_a is None:
            self.count = m
            self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.comoment = batch
            return
        n, total = self.count, self.count + m
        delta_a, delta_b = batch[0] - self.mean_a, batch[1] - self.mean_b
        w = n * m / total
        self.comoment += batch[4] + np.outer(delta_a, delta_b) * w
        self.m2_a += batch[2] + delta_a * delta_a * w
        self.m2_b += batch[3] + delta_b * delta_b * w
        self.mean_a += delta_a * (m / total)
        self.mean_b += delta_b * (m / total)
        self.count = total

    def covariance(self) -> np.ndarray:
        """Biased cross-covariance ``(units_a, units_b)`` of the observations so far."""
        if self.comoment is None:
            raise ValueError("no observations yet: call update() with at least one batch")
        return self.comoment / self.count

    def second_moment(self) -> np.ndarray:
        """The uncentred cross moment ``E[a bᵀ]`` ``(units_a, units_b)`` of the observations so far (what an
        orthogonal map between the two sets of units is fitted to)."""
        return self.covariance() + np.outer(self.mean_a, self.mean_b)

    def constant(self) -> tuple[np.ndarray, np.ndarray]:
        """Which units of A and of B did not vary over the observations: bool arrays ``(units_a,)``,
        ``(units_b,)``.

        A unit is constant when its variance is within float32 rounding of its mean (``var ≤ (10⁻⁶
        mean)²``): a dead ReLU (always 0), a unit that reads only its bias. Its correlation with
        anything is undefined; :meth:`correlation` gives 0.
        """
        if self.comoment is None:
            raise ValueError("no observations yet: call update() with at least one batch")

        def flat(m2: np.ndarray, mean: np.ndarray) -> np.ndarray:
            return m2 / self.count <= (_CONSTANT_RELATIVE * mean) ** 2

        return flat(self.m2_a, self.mean_a), flat(self.m2_b, self.mean_b)

    def correlation(self) -> np.ndarray:
        """Pearson correlations ``(units_a, units_b)``; a constant unit (:meth:`constant`) correlates 0."""
        still_a, still_b = self.constant()
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = self.comoment / np.sqrt(np.outer(self.m2_a, self.m2_b))
        corr[still_a, :] = 0.0
        corr[:, still_b] = 0.0
        return np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
