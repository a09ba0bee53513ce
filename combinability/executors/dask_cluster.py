"""Sweep cells on the workers of a Dask cluster (``dask.distributed``).

A distributed sweep is the in-process sweep with another loop: its :class:`~.cells.CellWork`
(models, data, sampler, settings) is scattered to every worker once
(``client.scatter(..., broadcast=True)``), the cells still to do are cut into batches, one
task per batch, and the results come back as tasks finish (``as_completed``) into the
sweep's own result stream, lock and resume logic. Each cell draws from its own seed, so
the numbers do not depend on the spread, the order or the worker. Tasks of a CUDA sweep
request one ``GPU`` resource each; a task lost with a killed worker is run again
elsewhere by the scheduler, one that raises is retried (``retries``).

Before any task is submitted, :func:`check_workers` asks every worker (``client.run``)
for its combinability and framework versions, whether it can use the sweep's backend and
device, and :func:`check_payload` whether it can import every module the sweep's objects
(a user's model class, metric, repair) are pickled by reference to.
dask is imported only by the functions here, never by ``import combinability``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import pickletools
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from combinability.errors import (
    BackendUnavailableError,
    CombinabilityError,
    ConfigurationError,
    IncompatibleVersionError,
)

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.executors.cells import CellResult, CellWork

__all__ = ["CONNECT_TIMEOUT", "RETRIES", "TASKS_PER_WORKER", "SchedulerUnreachableError", "batches",
           "check_payload", "check_workers", "cluster_client", "connect", "is_client", "pickled_globals",
           "run_cells"]

#: Default number of tasks per worker a sweep's remaining cells are cut into.
TASKS_PER_WORKER = 4
#: How often a task that raises is run again (a task lost with its worker is rescheduled anyway).
RETRIES = 2
#: Seconds to wait for a scheduler before giving up (the default of :func:`connect`).
CONNECT_TIMEOUT = 5.0


class SchedulerUnreachableError(CombinabilityError, ConnectionError):
    """No Dask scheduler answered at the address given."""


def _dask() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise BackendUnavailableError(f"distributed sweeps need dask ({exc}); install it with: "
                                      "pip install 'combinability[dask]'") from exc
    return distributed


def is_client(obj: Any) -> bool:
    """Whether ``obj`` is a ``dask.distributed.Client`` (without importing dask when it is not loaded)."""
    module = sys.modules.get("distributed")
    return module is not None and isinstance(obj, module.Client)


def connect(scheduler: str | None = None, workers: int | None = None, *,
            timeout: float | None = None) -> Any:
    """A ``dask.distributed.Client``: to the scheduler at ``scheduler``, or to a new local cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``, as ``dask scheduler`` prints it).
    workers : int, optional
        Without ``scheduler``: start a ``LocalCluster`` of this many worker processes, one
        thread each, without Dask's ``MALLOC_TRIM_THRESHOLD_`` (it slows CPU evaluations;
        use :func:`cluster_client` to close the cluster with the client).
    timeout : float, optional
        Seconds to wait for the scheduler (default :data:`CONNECT_TIMEOUT`).

    Raises
    ------
    ConfigurationError
        If both or neither of ``scheduler`` and ``workers`` are given, or ``workers < 1``.
    SchedulerUnreachableError
        If no scheduler answers at ``scheduler`` within ``timeout`` seconds.
    BackendUnavailableError
        If dask is not installed (the message names the pip extra).
    """
    if (scheduler is None) == (workers is None):
        raise ConfigurationError("give either a scheduler address (--scheduler tcp://host:8786) or a number of "
                                 "local worker processes (--workers N), not both" if scheduler is not None
                                 else "give a scheduler address or a number of local workers")
    distributed = _dask()
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigurationError(f"workers must be an integer >= 1, got {workers!r}")
        import dask

        # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive mmap
        # threshold: every large activation buffer is then mapped and unmapped anew, and a CPU
        # evaluation runs about 1.4x slower than in-process (benchmarks/measure_distributed.py).
        environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            # the workers' own log lines off: a task's error reaches the client as its exception, and a Ctrl-C
            # (which the workers get too) would print their heartbeat and shutdown tracebacks
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.CRITICAL)
        return distributed.Client(cluster)
    timeout = CONNECT_TIMEOUT if timeout is None else float(timeout)
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise ConfigurationError(f"the scheduler address must be a string like tcp://host:8786, got {scheduler!r}")
    try:  # a malformed address is a usage error at once, not a wait for an answer
        from distributed.comm import get_address_host_port

        get_address_host_port(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    except ValueError as exc:
        raise ConfigurationError(f"the scheduler address {scheduler!r} is not an address like tcp://host:8786 "
                                 f"({exc})") from None
    try:
        return distributed.Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise SchedulerUnreachableError(
            f"no Dask scheduler answered at {scheduler!r} within {timeout:g} s ({detail}); start one with "
            "'dask scheduler' (it prints its address) and give that address") from None


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, workers: int | None = None, *,
                   timeout: float | None = None) -> Iterator[Any]:
    """:func:`connect` for a block: the client (and a local cluster it started) is closed after it."""
    client = connect(scheduler, workers, timeout=timeout)
    interrupted = False
    try:
        yield client
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        cluster = client.cluster if workers is not None else None
        quiet = logging.getLogger("distributed")
        level = quiet.level
        if interrupted:  # closing a cluster whose workers were interrupted too: its complaints are expected
            quiet.setLevel(logging.CRITICAL)
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        finally:
            quiet.setLevel(level)


def _worker_report(backend: str) -> dict[str, Any]:
    """Run on a worker: its library version and whether it can use ``backend`` (and on which devices)."""
    import combinability
    from combinability.plugins import get_backend

    report: dict[str, Any] = {"version": combinability.__version__, "error": None, "devices": [], "frameworks": {}}
    try:
        be = get_backend(backend)
        report["devices"] = sorted(be.devices())
        report["frameworks"] = dict(be.versions())
    except (CombinabilityError, ImportError) as exc:
        report["error"] = " ".join(str(exc).split())
    return report


def _resources(client: Any) -> dict[str, dict[str, float]]:
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed: every worker by default
        info = client.scheduler_info()
    return {addr: dict(w.get("resources") or {}) for addr, w in info.get("workers", {}).items()}


def check_workers(client: Any, backend: Backend) -> list[str]:
    """Refuse a cluster whose workers cannot run a sweep on ``backend``; return the workers' addresses.

    Raises
    ------
    ConfigurationError
        If ``client`` is not a ``dask.distributed.Client``, the cluster has no worker, a
        worker cannot reach the backend's device, or a CUDA sweep finds no worker
        declaring a ``GPU`` resource.
    IncompatibleVersionError
        If a worker runs another combinability version, or another version of the backend's
        framework (``backend.versions()``: its numbers could differ from this process's); both
        versions are named.
    BackendUnavailableError
        If a worker cannot use the backend (the worker and the pip extra are named).
    """
    import combinability

    if not is_client(client):
        raise ConfigurationError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    reports = client.run(_worker_report, backend.name, on_error="return")
    for addr, rep in sorted(reports.items()):
        if isinstance(rep, BaseException):  # the worker could not even load this library
            raise BackendUnavailableError(
                f"worker {addr} cannot run combinability ({type(rep).__name__}: {rep}); install it there with: "
                f"pip install 'combinability[{backend.extra}]' (version {combinability.__version__})")
    if not reports:
        raise ConfigurationError(f"the Dask cluster at {client.scheduler.address} has no workers; start some "
                                 "('dask worker ADDRESS') or give --workers N for a local cluster")
    mine = combinability.__version__
    for addr, rep in sorted(reports.items()):
        if rep["version"] != mine:
            raise IncompatibleVersionError(f"worker {addr} runs combinability {rep['version']}, this process "
                                           f"{mine}: install the same version on every worker")
    for addr, rep in sorted(reports.items()):
        if rep["error"] is not None:
            raise BackendUnavailableError(f"worker {addr} cannot use backend {backend.name!r} ({rep['error']}); "
                                          f"install it there with: pip install 'combinability[{backend.extra}]'")
    frameworks = dict(getattr(backend, "versions", dict)())
    for addr, rep in sorted(reports.items()):
        theirs = rep.get("frameworks", {})
        for name, version in sorted(frameworks.items()):
            if name in theirs and theirs[name] != version:
                raise IncompatibleVersionError(
                    f"worker {addr} runs {name} {theirs[name]}, this process {version}: a distributed sweep's numbers "
                    f"are the in-process ones only with the same framework; install {name}=={version} on every "
                    "worker (or run the client in the workers' environment)")
    device = backend.device()
    for addr, rep in sorted(reports.items()):
        if device not in rep["devices"]:
            raise ConfigurationError(f"worker {addr} has no device {device!r} for backend {backend.name!r} "
                                     f"(it has {', '.join(rep['devices'])}); run the sweep on the workers' device "
                                     "(--device)")
    if _needs_gpu(device):
        gpus = [a for a, r in _resources(client).items() if r.get("GPU", 0) >= 1]
        if not gpus:
            raise ConfigurationError("a CUDA sweep's tasks each request one 'GPU' resource, and no worker declares "
                                     "one: start the workers with --resources GPU=1 (dask worker, dask cuda worker) "
                                     "or LocalCUDACluster(resources={'GPU': 1}); see docs/clusters.md")
    return sorted(reports)


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def pickled_globals(obj: Any) -> list[tuple[str, str]]:
    """The ``(module, qualified name)`` of every class or function ``obj`` is pickled by reference to.

    ``obj`` is pickled as Dask pickles what a client scatters (``distributed.protocol.pickle``:
    pickle, or cloudpickle when it refers to ``__main__``; large buffers travel out of band and
    are not copied), and the pickle's ``GLOBAL``/``STACK_GLOBAL`` opcodes are read: a process
    that unpickles ``obj`` must import each of these modules and find each name in it.
    Classes defined in ``__main__`` travel by value and are not listed.

    Raises
    ------
    ConfigurationError
        If ``obj`` cannot be pickled (it could not be sent to a worker).
    """
    from distributed.protocol.pickle import dumps

    try:
        data = dumps(obj, buffer_callback=lambda buffer: None)
    except Exception as exc:  # noqa: BLE001  (pickling runs the user's objects' own code)
        raise ConfigurationError(f"the sweep's models, data, sampler, metrics or repair cannot be pickled to send "
                                 f"them to the Dask workers ({type(exc).__name__}: {exc}); a distributed sweep needs "
                                 "objects that pickle (or run it without client=)") from exc
    found: set[tuple[str, str]] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # the values of the last two pushes (strings, else None): STACK_GLOBAL's operands
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("MEMOIZE", *_PUT_OPS):
            memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
            continue
        if name in ("FRAME", "PROTO", "STOP"):
            continue
        if name == "GLOBAL":
            module, _, qualname = str(arg).partition(" ")
            found.add((module, qualname))
            value = None
        elif name == "STACK_GLOBAL":
            if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                found.add((pushed[-2], pushed[-1]))
            value = None
        elif name in _STRING_OPS:
            value = arg if isinstance(arg, str) else None
        elif name in _GET_OPS:
            value = memo.get(arg)
        else:
            value = None
        pushed = [*pushed[-1:], value]
    return sorted(found)


def _importable(names: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Run on a worker: the ``(module, name, error)`` of each of ``names`` this process cannot import."""
    missing = []
    for module, qualname in names:
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001  (importing a user's module runs its code)
            missing.append((module, qualname, f"{type(exc).__name__}: {exc}"))
    return missing


def check_payload(client: Any, payload: Any) -> None:
    """Refuse a sweep whose objects the workers could not unpickle, before anything is sent.

    Every module ``payload`` (the models, data, sampler, metrics and repair a sweep scatters)
    is pickled by reference to (:func:`pickled_globals`) is imported on every worker.

    Raises
    ------
    ConfigurationError
        If ``payload`` does not pickle, or a worker cannot import one of its modules or find a
        name in it (a user's model class in a module only the client's ``sys.path`` reaches, or
        another version of it); the message names the worker, the module and the class, and
        says how to make it importable there.
    """
    names = [(m, q) for m, q in pickled_globals(payload) if m != "__main__"]
    if not names:
        return
    reports = client.run(_importable, names, on_error="return")
    for addr, missing in sorted(reports.items()):
        if isinstance(missing, BaseException):
            raise ConfigurationError(f"worker {addr} could not check the modules of the sweep's objects "
                                     f"({type(missing).__name__}: {missing})")
        if missing:
            module, qualname, error = missing[0]
            top = module.split(".")[0]
            where = getattr(sys.modules.get(top), "__file__", None)
            single = where is not None and not where.endswith("__init__.py")
            upload = (f"client.upload_file({where!r}) ships it to the workers, " if single else "")
            others = "" if len(missing) == 1 else f" (and {', '.join(f'{m}.{q}' for m, q, _ in missing[1:4])}"\
                f"{', ...' if len(missing) > 4 else ''})"
            raise ConfigurationError(
                f"worker {addr} cannot unpickle the sweep's objects: it cannot import {module}.{qualname}{others} "
                f"({error}), which the models, data, sampler, metrics or repair refer to; make module {top!r} "
                f"importable on every worker, the same version as here: {upload}or install it in the workers' "
                "environment (pip install), or put its folder on their PYTHONPATH")


def _needs_gpu(device: str) -> bool:
    return device.split(":")[0] == "cuda"


def batches(cells: Sequence[tuple[int, int]], workers: int, cells_per_task: int | None = None
            ) -> list[list[tuple[int, int]]]:
    """Cut ``cells`` into tasks: ``cells_per_task`` each, default about :data:`TASKS_PER_WORKER` per worker."""
    size = cells_per_task or max(1, math.ceil(len(cells) / (TASKS_PER_WORKER * max(1, workers))))
    return [list(cells[k:k + size]) for k in range(0, len(cells), size)]


def run_cells(client: Any, work: CellWork, cells: Sequence[tuple[int, int]], *, device: str, workers: int,
              cells_per_task: int | None = None, retries: int = RETRIES) -> Iterator[CellResult]:
    """Evaluate ``cells`` on the cluster; yield each cell's result as its task finishes.

    ``work`` is scattered to every worker once; each task evaluates a batch of cells with
    :func:`~combinability.executors.cells.evaluate_cells`. Closing the iterator early (an
    error, Ctrl-C) cancels the tasks not yet finished.
    """
    distributed = _dask()
    from combinability.executors.cells import evaluate_cells

    if not cells:
        return
    resources = {"GPU": 1} if _needs_gpu(device) else None
    remote = client.scatter(work, broadcast=True, hash=False)
    futures = [client.submit(evaluate_cells, remote, batch, resources=resources, retries=retries, pure=False,
                             key=f"combinability-cells-{work.token}-{n}")
               for n, batch in enumerate(batches(cells, workers, cells_per_task))]
    try:
        for future in distributed.as_completed(futures):
            yield from future.result()
    finally:
        client.cancel(futures)
        remote.release()
