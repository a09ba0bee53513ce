"""The paper's data augmentation (appendix A): parameters and affine maps, framework-free.

Each image gets, in this order: a random resize (scale factor in [0.8, 1.2]), a random
crop back to its own height x width (zero padding where the resized image is smaller),
a random horizontal flip and a random rotation in [-30°, 30°]. The four steps compose
into one affine map per image (:func:`affine_matrices`); the backend resamples the
batch through them in one pass (:meth:`combinability.Backend.augment`: bilinear, zeros
outside the image).

Geometry, in pixel coordinates centred on the image (x to the right, y down): an output
pixel ``p`` shows the input at ``(F R(-a) p + t) / s``, where ``s`` is the scale, ``a``
the angle (counter-clockwise), ``F`` flips x when asked, and ``t`` is the centre of the
crop window relative to the centre of the resized image, in resized pixels. With
``s = 1, a = 0``, no flip and ``t = 0`` the output is the input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from combinability.errors import DatasetError

__all__ = ["PAPER_SCALE", "PAPER_MAX_ANGLE", "AugmentParams", "sample_params", "affine_matrices"]

#: Range of the random resize factor (paper, appendix A).
PAPER_SCALE: tuple[float, float] = (0.8, 1.2)
#: Largest rotation, in degrees (paper, appendix A).
PAPER_MAX_ANGLE: float = 30.0


class AugmentParams(NamedTuple):
    """Per-image parameters of one augmentation (numpy arrays).

    Attributes
    ----------
    scale : (n,) float
        Resize factor (> 0).
    angle : (n,) float
        Rotation in degrees, counter-clockwise.
    flip : (n,) bool
        Mirror left-right.
    shift : (n, 2) float
        Crop window centre ``(x, y)`` relative to the resized image's centre, in pixels.
    """

    scale: np.ndarray
    angle: np.ndarray
    flip: np.ndarray
    shift: np.ndarray


def sample_params(n: int, height: int, width: int, rng: np.random.Generator, *,
                  scale: tuple[float, float] = PAPER_SCALE, max_angle: float = PAPER_MAX_ANGLE,
                  flip: bool = True) -> AugmentParams:
    """Draw the parameters of ``n`` augmentations.

    Scale is uniform on ``scale``, the angle uniform on ``[-max_angle, max_angle]``, the
    flip a fair coin (never when ``flip=False``), and each shift coordinate uniform on
    ``[-|s L - L| / 2, |s L - L| / 2]`` (``L`` the width or height): every crop position
    that keeps the window inside the resized image, or the image inside the window.
    """
    lo, hi = scale
    if not 0 < lo <= hi:
        raise DatasetError(f"scale range must satisfy 0 < low <= high, got {scale}")
    u = rng.random((n, 5), dtype=np.float32)
    s = lo + (hi - lo) * u[:, 0]
    angle = max_angle * (2 * u[:, 1] - 1)
    flips = (u[:, 2] < 0.5) if flip else np.zeros(n, dtype=bool)
    room = np.stack([np.abs(s * width - width) / 2, np.abs(s * height - height) / 2], axis=1)
    return AugmentParams(s, angle, flips, room * (2 * u[:, 3:5] - 1))


def affine_matrices(params: AugmentParams, height: int, width: int) -> np.ndarray:
    """The ``(n, 2, 3)`` float32 maps from normalised output to input coordinates.

    Raises
    ------
    DatasetError
        If a scale is not positive or the parameter shapes disagree.
    """
    s = np.asarray(params.scale, dtype=np.float64)
    n = s.shape[0]
    shift = np.asarray(params.shift, dtype=np.float64)
    if s.ndim != 1 or np.shape(params.angle) != (n,) or np.shape(params.flip) != (n,) or shift.shape != (n, 2):
        raise DatasetError(f"augmentation parameters disagree: scale {s.shape}, angle {np.shape(params.angle)}, "
                           f"flip {np.shape(params.flip)}, shift {shift.shape}; expected (n,), (n,), (n,), (n, 2)")
    if np.any(s <= 0):
        raise DatasetError("scale must be positive")
    rad = np.deg2rad(np.asarray(params.angle, dtype=np.float64))
    cos, sin = np.cos(rad), np.sin(rad)
    f = 1.0 - 2.0 * np.asarray(params.flip, dtype=np.float64)
    # M = F R(-a) / s in centred pixel units; in normalised units D^-1 M D with D = diag(W/2, H/2)
    theta = np.empty((n, 2, 3))
    theta[:, 0, 0] = f * cos / s
    theta[:, 0, 1] = -f * sin / s * (height / width)
    theta[:, 0, 2] = shift[:, 0] / s * (2.0 / width)
    theta[:, 1, 0] = sin / s * (width / height)
    theta[:, 1, 1] = cos / s
    theta[:, 1, 2] = shift[:, 1] / s * (2.0 / height)
    return theta.astype(np.float32)
