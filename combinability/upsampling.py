"""Resizing a feature map along one axis: the weights of an upsample node (:class:`~combinability.layers.Node`).

An ``"upsample"`` node resizes every channel of a map to ``output_size`` positions, one
axis at a time, as ``torch.nn.functional.interpolate(x, size=output_size, mode=...)``
does: each output position is a fixed mixture of input positions, the same for every
channel, so the node keeps its input's channel space (its permutation passes through).
:func:`resize_weights` gives that mixture as an ``(out, in)`` matrix, once, for the
backends that do not have torch's interpolation (the flax builder applies it per axis).

Modes, each with torch's definition of the source position of output position ``j``
(``scale = in / out``):

* ``"nearest"``: input ``floor(j * scale)`` (torch's ``"nearest"``);
* ``"nearest-exact"``: input ``floor((j + 0.5) * scale)`` (half-pixel centres);
* ``"linear"``: the two inputs around ``(j + 0.5) * scale - 0.5`` (at least 0), weighted
  by distance (torch's ``"linear"``, ``"bilinear"`` and ``"trilinear"`` are this on each
  axis); with ``align_corners``, around ``j * (in - 1) / (out - 1)``, the corner
  positions of input and output aligned.

Examples
--------
>>> resize_weights(2, 4, "nearest")
array([[1., 0.],
       [1., 0.],
       [0., 1.],
       [0., 1.]], dtype=float32)
>>> resize_weights(2, 4, "linear")
array([[1.  , 0.  ],
       [0.75, 0.25],
       [0.25, 0.75],
       [0.  , 1.  ]], dtype=float32)
"""

from __future__ import annotations

import numpy as np

from combinability.errors import ConfigurationError

__all__ = ["UPSAMPLE_MODES", "resize_weights"]

#: The resizing modes of an upsample node.
UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear")


def resize_weights(size_in: int, size_out: int, mode: str, align_corners: bool = False) -> np.ndarray:
    """The ``(size_out, size_in)`` float32 matrix that resizes one axis as torch's ``interpolate`` does.

    Parameters
    ----------
    size_in, size_out : int
        Positions of the axis before and after (each >= 1).
    mode : str
        One of :data:`UPSAMPLE_MODES`.
    align_corners : bool, default False
        For ``"linear"``: align the first and last positions of input and output.

    Returns
    -------
    numpy.ndarray, float32, shape (size_out, size_in)
        Row ``j`` holds the weights of the inputs that make output ``j`` (each row sums to 1).

    Raises
    ------
    ConfigurationError
        If a size is below 1, the mode is unknown, or ``align_corners`` is asked of a nearest mode.
    """
    if min(size_in, size_out) < 1:
        raise ConfigurationError(f"resizing needs sizes >= 1, got {size_in} -> {size_out}")
    if mode not in UPSAMPLE_MODES:
        raise ConfigurationError(f"unknown resizing mode {mode!r}; valid: {', '.join(UPSAMPLE_MODES)}")
    if align_corners and mode != "linear":
        raise ConfigurationError(f"align_corners applies to the 'linear' mode only, got mode {mode!r}")
    out = np.arange(size_out, dtype=np.float32)
    weights = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    scale = np.float32(size_in) / np.float32(size_out)  # torch computes the scale in float32
    if mode != "linear":
        source = out * scale if mode == "nearest" else (out + np.float32(0.5)) * scale
        weights[rows, np.minimum(np.floor(source).astype(np.int64), size_in - 1)] = 1.0
        return weights
    if align_corners:
        step = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
        source = out * step
    else:
        source = np.maximum((out + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = (source - low).astype(np.float32)
    np.add.at(weights, (rows, low), 1 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights
