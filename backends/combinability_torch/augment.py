"""The paper's data augmentation (appendix A), batched on the device, for torch.

Each image gets, in this order: a random resize (scale factor in [0.8, 1.2]), a random
crop back to its own height x width (zero padding where the resized image is smaller),
a random horizontal flip and a random rotation in [-30°, 30°]. The four steps are
composed into one affine map per image and applied in a single
:func:`torch.nn.functional.grid_sample` pass (bilinear, zeros outside the image), so
a whole batch is augmented by two kernel launches on whatever device it lives on.

Geometry, in pixel coordinates centred on the image (x to the right, y down): an
output pixel ``p`` shows the input at ``(F R(-a) p + t) / s``, where ``s`` is the scale,
``a`` the angle (counter-clockwise, as :func:`torch.rot90`), ``F`` flips x when asked,
and ``t`` is the centre of the crop window relative to the centre of the resized
image, in resized pixels. With ``s = 1, a = 0``, no flip and ``t = 0`` the output is
the input.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from combinability.errors import DatasetError

__all__ = ["PAPER_SCALE", "PAPER_MAX_ANGLE", "AugmentParams", "sample_params", "affine_theta",
           "apply_augmentation", "augment_batch"]

#: Range of the random resize factor (paper, appendix A).
PAPER_SCALE: tuple[float, float] = (0.8, 1.2)
#: Largest rotation, in degrees (paper, appendix A).
PAPER_MAX_ANGLE: float = 30.0


class AugmentParams(NamedTuple):
    """Per-image parameters of one augmentation.

    Attributes
    ----------
    scale : Tensor of shape (N,)
        Resize factor (> 0).
    angle : Tensor of shape (N,)
        Rotation in degrees, counter-clockwise.
    flip : Tensor of shape (N,), bool
        Mirror left-right.
    shift : Tensor of shape (N, 2)
        Crop window centre ``(x, y)`` relative to the resized image's centre, in pixels.
    """

    scale: torch.Tensor
    angle: torch.Tensor
    flip: torch.Tensor
    shift: torch.Tensor


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DatasetError(f"expected a floating-point image batch of shape (N, C, H, W), got {desc}")


def sample_params(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    scale: tuple[float, float] = PAPER_SCALE,
    max_angle: float = PAPER_MAX_ANGLE,
    flip: bool = True,
) -> AugmentParams:
    """Draw the parameters of ``n`` augmentations.

    Scale is uniform on ``scale``, the angle uniform on ``[-max_angle, max_angle]``, the
    flip a fair coin (never when ``flip=False``), and each shift coordinate uniform on
    ``[-|s L - L| / 2, |s L - L| / 2]`` (``L`` the width or height): every crop position
    that keeps the window inside the resized image, or the image inside the window.

    The draws are made on ``generator``'s device (``device`` when no generator is
    given) and returned on ``device`` (default: the generator's device).
    """
    lo, hi = scale
    if not 0 < lo <= hi:
        raise DatasetError(f"scale range must satisfy 0 < low <= high, got {scale}")
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand((n, 5), generator=generator, device=draw_device, dtype=torch.float32)
    if device is not None:
        u = u.to(device)
    s = lo + (hi - lo) * u[:, 0]
    angle = max_angle * (2 * u[:, 1] - 1)
    flips = (u[:, 2] < 0.5) if flip else torch.zeros(n, dtype=torch.bool, device=u.device)
    room = torch.stack([(s * width - width).abs() / 2, (s * height - height).abs() / 2], dim=1)
    shift = room * (2 * u[:, 3:5] - 1)
    return AugmentParams(s, angle, flips, shift)


def affine_theta(params: AugmentParams, height: int, width: int) -> torch.Tensor:
    """The ``(N, 2, 3)`` matrices for :func:`F.affine_grid` (``align_corners=False``)."""
    s = params.scale
    rad = params.angle * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    f = 1.0 - 2.0 * params.flip.to(s.dtype)
    # M = F R(-a) / s in centred pixel units; theta = D^-1 M D with D = diag(W/2, H/2)
    m00, m01 = f * cos / s, -f * sin / s
    m10, m11 = sin / s, cos / s
    theta = torch.stack(
        [
            torch.stack([m00, m01 * (height / width), params.shift[:, 0] / s * (2.0 / width)], dim=-1),
            torch.stack([m10 * (width / height), m11, params.shift[:, 1] / s * (2.0 / height)], dim=-1),
        ],
        dim=1,
    )
    return theta


def apply_augmentation(
    x: torch.Tensor,
    scale: torch.Tensor,
    angle: torch.Tensor,
    flip: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """Augment ``x`` (N, C, H, W) with explicit per-image parameters (see :class:`AugmentParams`).

    Returns a tensor of the same shape, dtype and device; pixels that fall outside the
    source image are 0.
    """
    _check_batch(x)
    n, _, height, width = x.shape

    def as_t(v, shape):
        t = torch.as_tensor(v, device=x.device)
        t = t.to(torch.bool) if shape == "flip" else t.to(x.dtype)
        want = (n, 2) if shape == "shift" else (n,)
        if tuple(t.shape) != want:
            raise DatasetError(f"{shape} must have shape {want} for a batch of {n}, got {tuple(t.shape)}")
        return t

    params = AugmentParams(as_t(scale, "scale"), as_t(angle, "angle"), as_t(flip, "flip"), as_t(shift, "shift"))
    if bool((params.scale <= 0).any()):
        raise DatasetError("scale must be positive")
    return _warp(x, params)


def _warp(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    n, c, height, width = x.shape
    theta = affine_theta(params, height, width)
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = PAPER_SCALE,
    max_angle: float = PAPER_MAX_ANGLE,
    flip: bool = True,
) -> torch.Tensor:
    """Apply the paper's random augmentation to a batch ``x`` of shape (N, C, H, W).

    Parameters
    ----------
    x : Tensor
        Floating-point images, channels-first, on any device.
    generator : torch.Generator, optional
        Source of randomness (seeded for reproducible augmentation); on CPU or on
        ``x``'s device.
    scale, max_angle, flip
        Ranges of the random resize, rotation and flip (defaults: the paper's).

    Returns
    -------
    Tensor
        Same shape, dtype and device as ``x``.
    """
    _check_batch(x)
    n, _, height, width = x.shape
    params = sample_params(n, height, width, generator, device=x.device, scale=scale, max_angle=max_angle,
                           flip=flip)
    params = AugmentParams(*(p.to(x.dtype) if p.is_floating_point() else p for p in params))
    return _warp(x, params)  # no host synchronisation: the parameters are valid by construction
