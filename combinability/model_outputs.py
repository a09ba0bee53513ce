"""A model's logits among what its forward pass returns (one rule for every backend)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["logits_of"]


def logits_of(out: Any, is_array: Callable[[Any], bool]) -> Any:
    """The logits in a model's output ``out``.

    ``out`` itself when it is an array; the first item of a tuple or list that starts with
    an array (nanoGPT's ``(logits, loss)``, a Hugging Face model's ``return_dict=False``
    output, a flax model's ``(logits, features)``); the ``"logits"`` entry of a mapping or
    the ``logits`` attribute of an output object (a Hugging Face ``ModelOutput``) that also
    carries caches and hidden states; else ``out`` as it is.

    Parameters
    ----------
    out : Any
        What the model's forward pass returned.
    is_array : callable
        Whether a value is one of the framework's arrays (or a traced stand-in for one).
    """
    if is_array(out):
        return out
    if isinstance(out, tuple | list) and out and is_array(out[0]):
        return out[0]
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return out if logits is None else logits
