"""The in-memory dataset every loader returns and every backend consumes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ArrayDataset", "IGNORE_INDEX", "input_dtype", "input_fault", "integer_hint", "labelled_targets"]

#: The label of a target that is not scored (a padded position of a sequence, a pixel outside the
#: labelled region): torch's ``cross_entropy`` default and Hugging Face's convention. Such targets are
#: left out of every loss, accuracy, metric and agreement count, and of the number they are averaged
#: over; every other label must be a class.
IGNORE_INDEX = -100

_SIGNED = ("int8", "int16", "int32", "int64")


def labelled_targets(y: Any) -> int:
    """How many targets of the labels ``y`` are scored: those not :data:`IGNORE_INDEX`.

    >>> labelled_targets(np.array([[3, 1, -100], [2, -100, -100]]))
    3
    """
    y = np.asarray(y)
    return int(y.size - np.count_nonzero(y == IGNORE_INDEX))


def input_dtype(x: Any) -> np.dtype:
    """The type in which the library hands ``x`` to a model: int64 for signed integers, else float32.

    Signed integer inputs are token ids (for an ``nn.Embedding`` or ``flax.linen.Embed``) and
    stay integers; floating inputs, and unsigned or boolean ones (``uint8`` images), become
    float32. ``x`` is a numpy, torch or jax array, or anything ``numpy.asarray`` takes.

    Examples
    --------
    >>> input_dtype(np.array([[3, 1]])), input_dtype(np.zeros((2, 3), np.uint8)), input_dtype([0.5])
    (dtype('int64'), dtype('float32'), dtype('float32'))
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = np.asarray(x).dtype
    return np.dtype(np.int64) if str(dtype).rsplit(".", 1)[-1] in _SIGNED else np.dtype(np.float32)


def integer_hint(x: Any) -> str:
    """A note for an error on integer inputs (passed on as token ids, :func:`input_dtype`); ``""`` otherwise."""
    if input_dtype(x) != np.int64:
        return ""
    return (" (example_input holds integers, which the model receives as integer token ids: give images and "
            "features as floats)")


def input_fault(exc: BaseException, x: Any, what: str = "the data's inputs") -> str | None:
    """What in inputs ``x`` a model's own error ``exc`` points at, said for the user; None where it points at
    nothing in them (a genuine failure of the model or the library).

    Integer inputs reach a model as they are, as token ids (:func:`input_dtype`): an index out of range then
    means an id beyond the vocabulary or a sequence longer than the context; a type error, a model that
    reads floats. Float inputs that a model wanted as integer indices (an embedding) are named too.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    shown = f"({type(exc).__name__}: {first})"
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        if isinstance(exc, IndexError) or re.search(r"out of (range|bounds)", text):
            return (f"the model failed on {what}, token ids {shown}: ids {int(arr.min())} to {int(arr.max())} in "
                    f"inputs of shape {tuple(arr.shape[1:])} each; an id at or beyond the model's vocabulary, a "
                    f"negative one, or a sequence longer than its context (its table of positions) fails so")
        if re.search(r"type", text, re.IGNORECASE):
            return (f"the model failed on {what} {shown}, which are integers ({arr.dtype}) and reach the "
                    f"model as they are, as token ids; give images and features as floats, e.g. "
                    f"x.astype(np.float32)")
    if np.issubdtype(arr.dtype, np.floating) and re.search(r"indices|Long, Int|integer", text):
        return (f"the model failed on {what} {shown}, which are floats ({arr.dtype}); a model that embeds "
                f"token ids takes them as integers, e.g. x.astype(np.int64)")
    return None


@dataclass(frozen=True)
class ArrayDataset:
    """One split of a classification dataset, held as numpy arrays.

    Attributes
    ----------
    x : numpy.ndarray of float32 (or int64 token ids)
        Inputs, channels-first: ``(n, c, h, w)`` for images, ``(n, f)`` for vectors;
        already normalised (per-channel mean 0, std 1 on the training split). Token ids
        (sequences ``(n, T)``) given as signed integers stay integers (:func:`input_dtype`).
    y : numpy.ndarray of int64, shape (n,)
        Labels in ``[0, num_classes)``.
    num_classes : int
    name : str
        Registry name of the dataset, e.g. ``"fashion_mnist"``.
    split : str
        ``"train"`` or ``"test"``.
    classes : tuple of str
        Human-readable class names (may be empty).
    """

    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    num_classes: int
    name: str = ""
    split: str = ""
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, channels-first."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        """True for ``(n, c, h, w)`` inputs."""
        return self.x.ndim == 4

    def subset(self, n: int | None = None, *, seed: int | None = None) -> ArrayDataset:
        """The first ``n`` examples, or ``n`` drawn without replacement when ``seed`` is given."""
        if n is None or n >= len(self):
            return self
        if seed is None:
            idx = np.arange(n)
        else:
            idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        x, y = self.x[idx], self.y[idx]  # copies: read-only as their source, so their digest is computed once
        for source, part in ((self.x, x), (self.y, y)):
            if isinstance(source, np.ndarray) and not source.flags.writeable:
                part.flags.writeable = False
        return ArrayDataset(x, y, self.num_classes, self.name, self.split, self.classes)
