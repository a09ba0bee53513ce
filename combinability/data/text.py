"""Character-level text: a vocabulary, disjoint windows, a positional train/test split, the Jargon File.

The corpus is **The Jargon File 4.4.7** (Eric S. Raymond et al., public domain), shipped by
Debian's ``jargon-text`` package as ``/usr/share/doc/jargon-text/jargon.txt.gz``
(``apt-get install jargon-text``; 650 kB compressed). After normalisation (see
:func:`normalise`) it is 1,527,682 characters of English prose written over decades by
many authors: dictionary entries with definitions, usage notes, anecdotes and quotations,
plus essays (the introduction and appendices on hacker folklore). It is a fair corpus for
a character-level model: real human prose larger than the customary Tiny Shakespeare
(1.1 MB), a stable versioned text (the same bytes on every machine with the package), and
free of licence constraints. Its vocabulary is 155 characters (ASCII plus a few typographic
quotes, dashes, box-drawing and Greek letters).

Windows and split
-----------------
The text is encoded to token ids and cut into consecutive, disjoint windows of
``context + 1`` characters (no character is in two windows). A window gives the inputs
``x = w[:-1]`` and the next-character targets ``y = w[1:]``. Windows are grouped in runs of
``group`` consecutive windows; every ``test_every``-th run (the 10th, 20th, ...) is test
data, the rest training data — a deterministic split by position, with no overlap, that
samples the whole text (the file is alphabetical, so a plain tail would test only on
late letters and the appendices).

Example
-------
>>> vocab = build_vocab("abracadabra")
>>> vocab.chars, vocab.encode("cab").tolist()
('abcdr', [2, 0, 1])
>>> x, y = text_windows(vocab.encode("abracadabra"), context=4)
>>> vocab.decode(x[0]), vocab.decode(y[0])
('abra', 'brac')
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from combinability.data.base import ArrayDataset
from combinability.data.locate import search_dirs
from combinability.data.registry import check_split
from combinability.errors import DatasetError, DatasetNotFoundError

__all__ = ["CONTEXT", "JARGON_DIRS", "JARGON_FILE", "JARGON_VOCAB_SIZE", "Vocabulary", "build_vocab", "normalise",
           "text_windows", "split_indices", "text_split", "read_jargon", "load_jargon_arrays", "load_jargon"]

#: Default context (characters a model sees; windows hold ``CONTEXT + 1`` characters).
CONTEXT = 64
#: The Jargon File as Debian's ``jargon-text`` installs it, and the folders searched last.
JARGON_FILE = "jargon.txt"
JARGON_DIRS: tuple[str, ...] = ("/usr/share/doc/jargon-text",)
#: Distinct characters of the normalised Jargon File (the model's vocabulary size).
JARGON_VOCAB_SIZE = 155
_INSTALL = ("install it with `apt-get install jargon-text` (Debian/Ubuntu, as root); where dpkg skips /usr/share/doc "
            "(minimal images), `apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb DIR` and pass "
            "root=DIR/usr/share/doc/jargon-text")


@dataclass(frozen=True)
class Vocabulary:
    """Characters <-> token ids; ``chars[i]`` is token ``i`` (sorted by code point)."""

    chars: str

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``; raises :class:`DatasetError` naming any character not in the vocabulary."""
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise DatasetError(f"characters {''.join(missing)!r} are not in the vocabulary of {len(self)} characters")
        return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids: np.ndarray) -> str:
        """The text of token ids."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def build_vocab(text: str) -> Vocabulary:
    """The vocabulary of every distinct character of ``text``, sorted."""
    if not text:
        raise DatasetError("cannot build a vocabulary from an empty text")
    return Vocabulary("".join(sorted(set(text))))


def normalise(text: str) -> str:
    """Strip every line's leading and trailing whitespace and collapse runs of blank lines to one.

    The Jargon File indents all its text by three spaces; kept, they would be free
    predictions that flatter the model.
    """
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.strip() for line in text.splitlines())).strip() + "\n"


def text_windows(tokens: np.ndarray, context: int = CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint windows of ``context + 1`` tokens: inputs ``x (n, context)`` and targets ``y = x`` shifted by one.

    The tail shorter than a window is dropped.
    """
    if isinstance(context, bool) or not isinstance(context, int | np.integer) or context < 1:
        raise DatasetError(f"context must be a positive integer, got {context!r}")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n = len(tokens) // (context + 1)
    if n == 0:
        raise DatasetError(f"a text of {len(tokens)} characters holds no window of context + 1 = {context + 1}")
    w = tokens[: n * (context + 1)].reshape(n, context + 1)
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


def split_indices(n_windows: int, split: str, group: int = 128, test_every: int = 10) -> np.ndarray:
    """Indices of the windows of ``split``.

    Window ``i`` is in run ``r = i // group``; run ``r`` is test data when ``r % test_every == test_every - 1``.
    """
    check_split(split)
    if group < 1 or test_every < 2:
        raise DatasetError(f"group must be >= 1 and test_every >= 2, got group={group}, test_every={test_every}")
    is_test = (np.arange(n_windows) // group) % test_every == test_every - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def text_split(text: str, split: str, context: int = CONTEXT, vocab: Vocabulary | None = None, group: int = 128,
               test_every: int = 10) -> tuple[np.ndarray, np.ndarray, Vocabulary]:
    """``(x, y, vocab)`` of one split of ``text``: int64 windows ``(n, context)`` (see the module docstring).

    ``vocab`` defaults to that of the whole ``text`` (so both splits share it).
    """
    vocab = build_vocab(text) if vocab is None else vocab
    x, y = text_windows(vocab.encode(text), context)
    idx = split_indices(len(x), split, group, test_every)
    if len(idx) == 0:
        raise DatasetError(f"the {split} split of {len(x)} windows is empty (group={group}, test_every={test_every})")
    return x[idx], y[idx], vocab


def _find_jargon(root: str | os.PathLike | None) -> Path:
    dirs = [*search_dirs("jargon", root), *map(Path, JARGON_DIRS)]
    for d in dirs:
        for name in (JARGON_FILE, JARGON_FILE + ".gz"):
            if (d / name).is_file():
                return d / name
    looked = "\n".join(f"  {d}" for d in dirs)
    raise DatasetNotFoundError(f"the Jargon File ({JARGON_FILE} or {JARGON_FILE}.gz) was not found in:\n{looked}\n"
                               f"{_INSTALL}, or put the file in one of those folders")


@functools.lru_cache(maxsize=2)
def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return normalise(raw.decode("utf-8"))
    except (UnicodeDecodeError, OSError) as err:
        raise DatasetError(f"{path} is not a readable UTF-8 (gzip) text: {err}") from err


def read_jargon(root: str | os.PathLike | None = None) -> str:
    """The normalised text of the Jargon File (searched in ``root``, ``root/jargon``, ``$COMBINABILITY_DATA/jargon``,
    the cache folder, then ``/usr/share/doc/jargon-text``).

    Raises
    ------
    DatasetNotFoundError
        Listing the folders searched and the install command.
    """
    return _read(_find_jargon(root))


def load_jargon_arrays(split: str, root: str | os.PathLike | None = None,
                       context: int = CONTEXT) -> tuple[np.ndarray, np.ndarray, Vocabulary]:
    """``(x, y, vocab)`` of one split of the Jargon File; x and y int64 ``(n, context)``."""
    return text_split(read_jargon(root), split, context)


def load_jargon(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """One split of the Jargon File as an :class:`ArrayDataset` (the registry's loader).

    ``x`` holds int64 token ids ``(n, 64)`` (not normalised: they index an embedding) and
    ``y`` the next-character targets ``(n, 64)``; ``classes`` are the vocabulary's characters.
    About 21,200 training and 2,300 test windows.
    """
    x, y, vocab = load_jargon_arrays(split, root)
    return ArrayDataset(x=x, y=y, num_classes=len(vocab), name="jargon", split=split, classes=tuple(vocab.chars))
