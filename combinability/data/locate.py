"""Where dataset files are looked for, and how they are downloaded.

A dataset called ``name`` is looked for, in order, in

1. the ``root`` the caller names (``root`` itself, then ``root/<name>``),
2. ``$COMBINABILITY_DATA/<name>``,
3. the platform's cache folder, ``pooch.os_cache("combinability")/<name>``: on Linux
   ``~/.cache/combinability/<name>`` (``$XDG_CACHE_HOME/combinability/<name>`` when that is set),
   on macOS ``~/Library/Caches/combinability/<name>``,
4. system directories where a distribution installs the data, e.g. Debian's
   ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).

Each candidate may also hold the files one level down in a dataset-specific
``subdir`` (CIFAR's ``cifar-10-batches-py``). When nothing is found,
:class:`~combinability.errors.DatasetNotFoundError` lists every directory looked in
and how to get the files.

Downloads (with :mod:`pooch`) go to the first place of the same list (``root/<name>``, else
``$COMBINABILITY_DATA/<name>``, else the cache), are written atomically (a temporary
file in the target directory, renamed once complete) and are checked against the
MD5 sums the dataset's authors publish; a file with another checksum is not kept. A
progress bar is shown when standard error is a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from combinability.errors import DatasetError, DatasetNotFoundError

__all__ = [
    "ENV_VAR",
    "SYSTEM_DIRS",
    "Resource",
    "cache_home",
    "search_dirs",
    "download_dir",
    "locate_files",
    "md5sum",
    "fetch",
    "extract_tar",
]

logger = logging.getLogger(__name__)

#: Environment variable naming a folder that holds one sub-folder per dataset.
ENV_VAR = "COMBINABILITY_DATA"

#: System-wide locations of datasets installed by a package manager, per dataset name.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}

def cache_home() -> Path:
    """The platform's cache folder for combinability, ``pooch.os_cache("combinability")``.

    On Linux ``$XDG_CACHE_HOME/combinability``, by default ``~/.cache/combinability``; on macOS
    ``~/Library/Caches/combinability``; on Windows the user's local application data folder.
    """
    import pooch  # imported on use: it is not needed to list or load datasets from elsewhere

    return Path(pooch.os_cache("combinability"))


def search_dirs(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in order (existing or not)."""
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root, root / name]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(cache_home() / name)
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, ())]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def download_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where a download of ``name`` is written: ``root/<name>``, ``$COMBINABILITY_DATA/<name>`` or the cache."""
    if root is not None:
        return Path(root).expanduser() / name
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser() / name
    return cache_home() / name


def _find_one(directory: Path, filename: str, compressed_ok: bool) -> Path | None:
    candidates = [filename, filename + ".gz"] if compressed_ok else [filename]
    for candidate in candidates:
        path = directory / candidate
        if path.is_file():
            return path
    return None


def locate_files(
    name: str,
    filenames: Sequence[str],
    *,
    root: str | os.PathLike | None = None,
    subdir: str | None = None,
    compressed_ok: bool = True,
    how_to_get: str = "",
) -> dict[str, Path]:
    """Find the first searched directory that holds all of ``filenames``.

    Parameters
    ----------
    name : str
        Dataset name (the per-dataset folder name under ``root``, ``$COMBINABILITY_DATA``
        and the cache).
    filenames : sequence of str
        Files that must all be in the same directory.
    root : path, optional
        A directory the caller names; searched first.
    subdir : str, optional
        A dataset-specific sub-folder also tried inside each searched directory.
    compressed_ok : bool
        Accept ``<filename>.gz`` in place of ``<filename>``.
    how_to_get : str
        Appended to the error message: how to obtain the files.

    Returns
    -------
    dict of str to pathlib.Path
        Each requested filename mapped to the file found (possibly ending in ``.gz``).

    Raises
    ------
    DatasetNotFoundError
        Listing every directory looked in, what was missing there, and ``how_to_get``.
    """
    report: list[str] = []
    for base in search_dirs(name, root):
        if not base.is_dir():
            report.append(f"  {base}  (no such directory)")
            continue
        for directory in [base, base / subdir] if subdir else [base]:
            if not directory.is_dir():
                report.append(f"  {directory}  (no such directory)")
                continue
            found = {f: _find_one(directory, f, compressed_ok) for f in filenames}
            missing = [f for f, p in found.items() if p is None]
            if not missing:
                return {f: p for f, p in found.items() if p is not None}
            gz = "[.gz]" if compressed_ok else ""
            report.append(f"  {directory}  (missing {', '.join(m + gz for m in missing)})")
    message = (
        f"dataset {name!r} not found: need {', '.join(filenames)}"
        f"{' (plain or .gz)' if compressed_ok else ''} in one directory; looked in:\n" + "\n".join(report)
    )
    if how_to_get:
        message += "\n" + how_to_get
    raise DatasetNotFoundError(message)


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    import pooch

    return str(pooch.file_hash(str(path), alg="md5"))


@dataclass(frozen=True)
class Resource:
    """One file to download.

    Parameters
    ----------
    filename : str
        Name of the file in the dataset's directory.
    urls : tuple of str
        Where to get it, tried in order (mirrors): ``https://``, ``http://`` or ``ftp://`` URLs,
        as :func:`pooch.retrieve` reads them.
    md5 : str
        Published MD5 sum of the file.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Route pooch's own messages (it prints them on a handler of its own) through this module's logger."""
    import pooch

    pooch_logger = pooch.get_logger()
    level = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pooch_logger.setLevel(level)


def _progressbar() -> bool:
    """Whether to show pooch's download progress bar: only when standard error is a terminal."""
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


def _retrieve(url: str, resource: Resource, directory: Path, timeout: float) -> str | None:
    """Download ``url`` to ``directory/<filename>`` with pooch; None on success, else why it failed.

    Raises
    ------
    _ChecksumMismatch
        If the file arrived but its MD5 differs (pooch removes it).
    """
    import pooch
    import requests

    downloader = pooch.HTTPDownloader(progressbar=_progressbar(), timeout=timeout)
    try:
        with _quiet_pooch():
            pooch.retrieve(url, known_hash=f"md5:{resource.md5}", fname=resource.filename, path=directory,
                           downloader=downloader)
    except ValueError as exc:
        if "does not match the known hash" in str(exc):
            raise _ChecksumMismatch(str(exc)) from None
        return str(exc)  # e.g. an unsupported URL scheme
    except (OSError, requests.RequestException) as exc:  # connection, HTTP status, timeout, disk
        return f"{type(exc).__name__}: {exc}"
    return None


class _ChecksumMismatch(Exception):
    """A downloaded file whose MD5 differs from the published one."""


def fetch(resource: Resource, directory: str | os.PathLike, *, timeout: float = 60.0) -> Path:
    """Download ``resource`` into ``directory`` unless a file with the right MD5 is already there.

    The download goes through :func:`pooch.retrieve`: each URL is tried in turn, the file
    is streamed to a temporary file in ``directory`` and appears under its final name only
    once its MD5 matches; a progress bar is shown when standard error is a terminal.

    Raises
    ------
    DatasetError
        If a URL delivered a file whose checksum does not match (and no other URL delivered the
        right one); nothing is kept. The message names each URL and the folder.
    DatasetNotFoundError
        If no URL could be read; the message names each URL, why, and the folder.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / resource.filename
    if target.is_file() and md5sum(target) == resource.md5:
        return target
    failures: list[str] = []
    bad_checksum = False
    for url in resource.urls:
        logger.info("downloading %s to %s", url, target)
        try:
            why = _retrieve(url, resource, directory, timeout)
        except _ChecksumMismatch as exc:
            bad_checksum = True
            failures.append(f"  {url}: MD5 mismatch, expected {resource.md5} ({exc})")
            continue
        if why is None:
            return target
        failures.append(f"  {url}: {why}")
    message = f"could not download {resource.filename} into {directory}:\n" + "\n".join(failures)
    if bad_checksum:
        raise DatasetError(message + "\n(a checksum mismatch means a corrupt or altered file; nothing was kept)")
    raise DatasetNotFoundError(
        message + f"\ndownload it by hand from {resource.urls[0]} (MD5 {resource.md5}) into {directory}"
    )


def extract_tar(archive: str | os.PathLike, directory: str | os.PathLike, member: str) -> Path:
    """Extract the folder ``member`` of a tar archive into ``directory``, atomically.

    The archive is unpacked into a temporary folder next to the target, with
    :func:`tarfile.data_filter` (no absolute paths, links out of the tree or devices),
    and ``member`` is then renamed into place, replacing an older copy.

    Raises
    ------
    DatasetError
        If the archive cannot be read or lacks ``member``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / member
    staging = Path(tempfile.mkdtemp(prefix=f".{member}.", dir=directory))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"{archive}: cannot extract archive ({exc})") from exc
        extracted = staging / member
        if not extracted.is_dir():
            raise DatasetError(f"{archive}: archive has no folder {member!r}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
