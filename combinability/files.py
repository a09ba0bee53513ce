"""Files that are never half-written: write to a temporary file, then rename.

Results, checkpoints, figures and summaries all go through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "output_lock"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Any:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    If the block raises (a failing write, a full disk, Ctrl-C), the temporary file is
    removed and ``path``'s previous content is left intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
    """Hold an exclusive lock on ``path`` (a ``<path>.lock`` file beside it) for the block.

    The lock is the operating system's (:mod:`filelock`): it dies with the process that held
    it, so a lock left by a killed run is taken over by the next one. The holder's pid is
    kept in ``<path>.lock.pid`` to name it. ``path=None`` locks nothing.

    Raises
    ------
    OutputLockedError
        If another process holds the lock after ``wait`` seconds.
    """
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    from combinability.errors import OutputLockedError

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{target}.lock", timeout=wait)
    owner = Path(f"{target}.lock.pid")
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
