"""Files that are never half-written: write to a temporary file, then rename.

Results, checkpoints, figures and summaries all go through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "output_lock", "lock_path", "check_writable", "stop_on_sigterm", "Terminated",
           "clean_stale_temporaries"]


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: hidden beside it, ``.<name>.lock`` (the holder's pid in ``.<name>.lock.pid``)."""
    target = Path(path)
    return target.with_name(f".{target.name}.lock")


def _temp_prefix(target: Path) -> str:
    """Prefix of ``target``'s temporary files: they name the host and pid that wrote them."""
    return f".{target.name}.{socket.gethostname()}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files left beside ``path`` by killed runs on this host; return them.

    A temporary file is ``.<name>.<host>.<pid>.<random>.tmp``; it is stale when ``<host>``
    is this machine and process ``<pid>`` no longer exists. Files of live processes, and
    of other hosts (a shared cluster filesystem), are left alone.
    """
    target = Path(path)
    host = socket.gethostname()
    removed = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.glob(f".{target.name}.*.tmp"):
        rest = candidate.name[len(target.name) + 2:].split(".")
        if len(rest) < 4 or ".".join(rest[:-3]) != host or not rest[-3].isdigit():
            continue
        if not _alive(int(rest[-3])):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def check_writable(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Check, before long work starts, that ``path`` can be created or replaced.

    Creates missing parent folders, then creates and removes a probe file beside
    ``path`` (the way :func:`atomic_path` will write it).

    Raises
    ------
    OutputNotWritableError
        If the folder cannot be created or written, or ``path`` is a folder.
    """
    from combinability.errors import OutputNotWritableError

    target = Path(path)
    if target.is_dir():
        raise OutputNotWritableError(f"the {what} path {target} is a folder; give a file name")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputNotWritableError(f"cannot write the {what} {target}: {blocking} is a file, not a folder; "
                                     "choose a writable location")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a missing folder that cannot be made: its parent refuses (``ro/fig`` in ``ro``)
        made = Path(exc.filename) if getattr(exc, "filename", None) else target.parent
        raise OutputNotWritableError(
            f"cannot write the {what} {target}: {exc.strerror or exc} (creating folder {made} in {made.parent}); "
            "choose a writable location"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot write the {what} {target}: {exc.strerror or exc} (folder {target.parent}); "
            "choose a writable location"
        ) from None
    return target


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that cleanup runs exactly as for Ctrl-C."""


@contextlib.contextmanager
def stop_on_sigterm() -> Any:
    """Turn SIGTERM into :class:`KeyboardInterrupt` for the block (main thread only).

    A batch system's ``kill`` (SIGTERM) then stops a run as cleanly as Ctrl-C: temporary
    files are removed, locks released and finished results kept.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Any:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    If the block raises (a failing write, a full disk, Ctrl-C), the temporary file is
    removed and ``path``'s previous content is left intact. Temporary files of killed
    runs (``kill -9``) are removed by the next write to the same path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_lock(path: str | os.PathLike | None, *, wait: float = 0.0) -> Any:
    """Hold an exclusive lock on ``path`` (a hidden ``.<name>.lock`` file beside it) for the block.

    The lock is the operating system's (:mod:`filelock`): it dies with the process that held
    it, so a lock left by a killed run is taken over by the next one. The holder's pid is
    kept in ``.<name>.lock.pid`` to name it (:func:`lock_path`). ``path=None`` locks nothing.

    Raises
    ------
    OutputNotWritableError
        If ``path``'s folder cannot be written (checked first, see :func:`check_writable`).
    OutputLockedError
        If another process holds the lock after ``wait`` seconds.
    """
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    from combinability.errors import OutputLockedError

    target = check_writable(path)
    lock = FileLock(lock_path(target), timeout=wait)
    owner = Path(f"{lock_path(target)}.pid")
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "unknown"
        raise OutputLockedError(f"{target} is being written by another process (pid {holder}); wait until it "
                                "finishes, or write to another file") from None
    try:
        owner.write_text(str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()  # the .lock file stays: removing it could let two processes hold two different locks
