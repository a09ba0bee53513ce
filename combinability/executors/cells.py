"""The work of one sweep cell ``(value index, sample)``, the same in every executor.

A cell draws its coefficients from its own seed (:func:`combinability.sweeps.sample_seed`
of the user's seed, the value index, the sample and the sampler), forms the combination,
applies the optional repair and evaluates it on every split, one vector per call. The
in-process loop and the Dask workers both call :class:`CellRunner`, so a cell gives the
same bits wherever it runs (on the same kind of device).

:class:`CellWork` is everything a process needs for any cell of one sweep: the models'
flat vectors, a template model, the data, the sampler and grid, the evaluation settings.
It is what a Dask client scatters to its workers once; a worker builds its
:class:`CellRunner` from it on the first task and keeps it for the following ones
(:meth:`CellRunner.for_work`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.errors import CombinabilityError, ConfigurationError

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.data.base import ArrayDataset
    from combinability.evaluation import Evaluator, LogitMetric
    from combinability.layout import FlatLayout
    from combinability.samplers.base import Sampler

__all__ = ["BackendRef", "CellResult", "CellRunner", "CellWork", "portable_backend"]


@dataclass(frozen=True)
class BackendRef:
    """A registered backend by name and device, rebuilt in the process that uses it.

    Backends hold framework objects (a JAX ``Device``) that do not always pickle; a
    reference travels instead, and :meth:`resolve` checks that the rebuilt backend is the
    one the sweep was keyed with (its ``repr``: device and mode).
    """

    name: str
    device: str
    description: str
    compute_dtype: str = "float32"

    def resolve(self) -> Backend:
        """The backend ``name`` on ``device`` in this process.

        Raises
        ------
        BackendUnavailableError
            If the backend's framework is not installed here (the message names the pip extra).
        ConfigurationError
            If the device is not available here, or the backend differs from the sweep's.
        """
        from combinability.plugins import get_backend

        be = get_backend(self.name)
        if be.device() != self.device:
            be = be.on_device(self.device)
        be = be.with_compute_dtype(self.compute_dtype)
        if repr(be) != self.description:
            raise ConfigurationError(f"backend {self.name!r} here is {be!r}, the sweep's is {self.description}; "
                                     "pass a registered backend, or one that pickles, to a distributed sweep")
        return be


def portable_backend(be: Backend) -> Backend | BackendRef:
    """What to send to another process for ``be``: a :class:`BackendRef` when the registry rebuilds it, else ``be``."""
    ref = BackendRef(be.name, be.device(), repr(be), be.compute_dtype)
    try:
        ref.resolve()
    except CombinabilityError:
        return be  # a backend object of the user's own: it travels pickled
    return ref


@dataclass(frozen=True)
class CellWork:
    """Everything needed to evaluate any cell of one sweep (what is scattered to workers).

    Attributes
    ----------
    token : str
        Identifies this sweep's work in a process's cache of :class:`CellRunner`.
    backend : Backend or BackendRef
    template : native model
        A model of the architecture (evaluation replaces its weights).
    layout : FlatLayout
    thetas : tuple of numpy.ndarray
        The flat vectors of models A, B (and C).
    sampler : Sampler
    grid : tuple
        The validated parameter values; a cell's value index points into it.
    seed : int
        The user's seed.
    three : bool
        Whether the sampler combines three models.
    datasets : dict of str to ArrayDataset
        The splits evaluated, in result order.
    batch_size : int
    metrics : tuple of LogitMetric
        Extra logit metrics.
    agreement : bool
        Count the §6.1 agreement categories (needs ``end_predictions``).
    end_predictions : dict of str to (numpy.ndarray, numpy.ndarray)
        Per split, the predictions of models A and B (for agreement).
    repair_fn : callable, optional
    repair_data : ArrayDataset, optional
    table : LayerTable, optional
    """

    token: str
    backend: Any
    template: Any
    layout: FlatLayout
    thetas: tuple[np.ndarray, ...]
    sampler: Sampler
    grid: tuple[Any, ...]
    seed: int
    three: bool
    datasets: dict[str, ArrayDataset]
    batch_size: int
    metrics: tuple[LogitMetric, ...] = ()
    agreement: bool = False
    end_predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    repair_fn: Any = None
    repair_data: Any = None
    table: Any = None


@dataclass(frozen=True)
class CellResult:
    """The numbers of one cell, one entry per split (in :attr:`CellWork.datasets` order)."""

    value: int
    sample: int
    loss: np.ndarray
    accuracy: np.ndarray
    values: dict[str, np.ndarray]
    counts: np.ndarray | None = None


_cache_lock = threading.Lock()
_runners: OrderedDict[str, CellRunner] = OrderedDict()
#: Runners kept per process (a worker serving several sweeps at once).
_CACHE_SIZE = 2


class CellRunner:
    """Evaluate cells of one sweep in this process.

    Parameters
    ----------
    work : CellWork
    backend : Backend
        The evaluation backend (``work.backend`` resolved in this process).
    evaluator : Evaluator, optional
        Built from ``work`` when omitted.
    ends : mapping of str to device array, optional
        The models' flat vectors on the device (``"a"``, ``"b"``[, ``"c"``]); copied from
        ``work.thetas`` when omitted.
    """

    def __init__(self, work: CellWork, backend: Backend, evaluator: Evaluator | None = None,
                 ends: Mapping[str, Any] | None = None) -> None:
        from combinability.evaluation import Evaluator

        self.work = work
        self.backend = backend
        self.evaluator = evaluator if evaluator is not None else Evaluator(
            backend, work.template, work.layout, batch_size=work.batch_size, metrics=work.metrics)
        self.ends = dict(ends) if ends is not None else {m: backend.asarray(t)
                                                         for m, t in zip("abc", work.thetas, strict=False)}
        self.repair_cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_work(cls, work: CellWork) -> CellRunner:
        """The runner of ``work`` in this process: built on first use, then reused (a worker's tasks share it)."""
        with _cache_lock:
            runner = _runners.get(work.token)
            if runner is None:
                be = work.backend.resolve() if isinstance(work.backend, BackendRef) else work.backend
                runner = _runners[work.token] = cls(work, be)
                while len(_runners) > _CACHE_SIZE:
                    _runners.popitem(last=False)
            _runners.move_to_end(work.token)
            return runner

    def context(self, coefficients: Any) -> Any:
        """The :class:`~combinability.repairs.RepairContext` of one combination (``None``: validation)."""
        from combinability.repairs import RepairContext

        w = self.work
        return RepairContext(self.backend, w.template, w.layout, list(self.ends.values()), coefficients,
                             w.repair_data, w.table, self.repair_cache)

    def validate_repair(self) -> None:
        """Let the repair check its inputs (BatchNorm present, data shape) before any cell runs."""
        fn = self.work.repair_fn
        if fn is not None and callable(getattr(fn, "validate", None)):
            fn.validate(self.context(None))

    def combination(self, value: int, sample: int) -> tuple[Any, Any]:
        """Cell ``(value, sample)``'s combined vector and coefficients ``(theta, v)``, on the device."""
        from combinability.combination import combine, combine3
        from combinability.samplers.base import DrawContext
        from combinability.sweeps import sample_seed

        w, dev = self.work, self.ends
        rng = self.backend.random(sample_seed(w.seed, value, sample, w.sampler.name))
        ctx = DrawContext(w.layout, rng, theta_a=dev["a"], theta_b=dev["b"])
        if w.three:
            v_b, v_c = w.sampler.draw(w.grid[value], ctx)
            return combine3(dev["a"], dev["b"], dev["c"], v_b, v_c), (v_b, v_c)
        v = w.sampler.draw(w.grid[value], ctx)
        return combine(dev["a"], dev["b"], v), v

    def __call__(self, value: int, sample: int) -> CellResult:
        """Evaluate cell ``(value, sample)`` on every split."""
        from combinability.metrics import AGREEMENT_CATEGORIES, agreement_counts

        w = self.work
        with self._lock:  # a worker with several threads: one cell at a time on this runner's device memory
            theta, v = self.combination(value, sample)
            if w.repair_fn is not None:
                theta = w.repair_fn(theta, self.context(v))
            del v
            n = len(w.datasets)
            loss, accuracy = np.full(n, np.nan), np.full(n, np.nan)
            values = {m.name: np.full(n, np.nan) for m in w.metrics}
            counts = np.zeros((n, len(AGREEMENT_CATEGORIES)), dtype=np.int64) if w.agreement else None
            for k, (split, data) in enumerate(w.datasets.items()):
                (ev,) = self.evaluator.evaluate([theta], data)
                loss[k], accuracy[k] = ev.loss, ev.accuracy
                for m in w.metrics:
                    values[m.name][k] = ev.values[m.name]
                if counts is not None:
                    pred_a, pred_b = w.end_predictions[split]
                    # every label counts (a sequence's positions, a segmentation's pixels), example-major
                    counts[k] = agreement_counts(ev.predictions, pred_a, pred_b, np.ravel(data.y))
            del theta
        return CellResult(int(value), int(sample), loss, accuracy, values, counts)

    def run(self, cells: Iterable[Sequence[int]]) -> list[CellResult]:
        """Evaluate several cells, in order."""
        return [self(int(i), int(s)) for i, s in cells]


def evaluate_cells(work: CellWork, cells: Sequence[Sequence[int]]) -> list[CellResult]:
    """Evaluate ``cells`` of ``work`` with this process's cached runner (the body of a Dask task)."""
    return CellRunner.for_work(work).run(cells)
