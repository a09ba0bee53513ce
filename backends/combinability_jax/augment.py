"""The paper's data augmentation (appendix A), batched on the device, for JAX.

The same transformation as :mod:`combinability_torch.augment` (random resize in
[0.8, 1.2], random crop back to the input's own size with zero padding, random
horizontal flip, random rotation in [-30°, 30°], composed into one affine map per
image), for NHWC batches, sampled bilinearly with
:func:`jax.scipy.ndimage.map_coordinates` (``order=1``, zeros outside the image).
Everything is traceable: ``jax.jit(augment_batch)`` works, with the ranges as static
arguments.

Geometry, in pixel coordinates centred on the image (x to the right, y down): an
output pixel ``p`` shows the input at ``(F R(-a) p + t) / s`` (scale ``s``, angle ``a``
counter-clockwise as :func:`jax.numpy.rot90`, ``F`` the optional left-right flip,
``t`` the crop window's centre relative to the resized image's centre, in pixels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from combinability.errors import DatasetError

__all__ = ["PAPER_SCALE", "PAPER_MAX_ANGLE", "sample_params", "apply_augmentation", "augment_batch"]

PAPER_SCALE: tuple[float, float] = (0.8, 1.2)
PAPER_MAX_ANGLE: float = 30.0


def _check_batch(x) -> None:
    if getattr(x, "ndim", None) != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        desc = f"{x.dtype} array of shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
        raise DatasetError(f"expected a floating-point image batch of shape (N, H, W, C), got {desc}")


def sample_params(
    key: jax.Array,
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = PAPER_SCALE,
    max_angle: float = PAPER_MAX_ANGLE,
    flip: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Draw ``(scale, angle, flip, shift)`` for ``n`` images, distributed as in the torch backend."""
    lo, hi = scale
    if not 0 < lo <= hi:
        raise DatasetError(f"scale range must satisfy 0 < low <= high, got {scale}")
    u = jax.random.uniform(key, (n, 5), dtype=jnp.float32)
    s = lo + (hi - lo) * u[:, 0]
    angle = max_angle * (2 * u[:, 1] - 1)
    flips = (u[:, 2] < 0.5) if flip else jnp.zeros(n, dtype=bool)
    room = jnp.stack([jnp.abs(s * width - width) / 2, jnp.abs(s * height - height) / 2], axis=1)
    shift = room * (2 * u[:, 3:5] - 1)
    return s, angle, flips, shift


def _source_coords(scale, angle, flip, shift, height: int, width: int, dtype):
    """Input (row, col) coordinates of every output pixel: two arrays of shape (N, H, W)."""
    rad = jnp.deg2rad(angle.astype(dtype))
    cos, sin = jnp.cos(rad), jnp.sin(rad)
    f = 1.0 - 2.0 * flip.astype(dtype)
    s = scale.astype(dtype)
    u = jnp.arange(width, dtype=dtype) + 0.5 - width / 2  # centred x of output columns
    v = jnp.arange(height, dtype=dtype) + 0.5 - height / 2  # centred y of output rows
    uu, vv = u[None, None, :], v[None, :, None]

    def per_image(a):
        return a[:, None, None]

    x_in = (per_image(f * cos) * uu - per_image(f * sin) * vv + per_image(shift[:, 0])) / per_image(s)
    y_in = (per_image(sin) * uu + per_image(cos) * vv + per_image(shift[:, 1])) / per_image(s)
    return y_in + height / 2 - 0.5, x_in + width / 2 - 0.5


def apply_augmentation(x: jax.Array, scale, angle, flip, shift) -> jax.Array:
    """Augment ``x`` (N, H, W, C) with explicit per-image parameters.

    Parameters
    ----------
    x : Array
        Floating-point images, channels-last.
    scale : Array of shape (N,)
        Resize factor.
    angle : Array of shape (N,)
        Rotation in degrees, counter-clockwise.
    flip : Array of shape (N,), bool
        Mirror left-right.
    shift : Array of shape (N, 2)
        Crop window centre ``(x, y)`` relative to the resized image's centre, in pixels.

    Returns
    -------
    Array
        Same shape and dtype as ``x``; pixels from outside the source image are 0.
    """
    _check_batch(x)
    n, height, width, _ = x.shape
    scale, angle, flip, shift = (jnp.asarray(a) for a in (scale, angle, flip, shift))
    for name, a, want in (("scale", scale, (n,)), ("angle", angle, (n,)), ("flip", flip, (n,)),
                          ("shift", shift, (n, 2))):
        if a.shape != want:
            raise DatasetError(f"{name} must have shape {want} for a batch of {n}, got {a.shape}")
    rows, cols = _source_coords(scale, angle, flip.astype(bool), shift.astype(x.dtype), height, width, x.dtype)

    def one_channel(channel, r, c):
        return map_coordinates(channel, [r, c], order=1, mode="constant", cval=0.0)

    per_channel = jax.vmap(one_channel, in_axes=(2, None, None), out_axes=2)  # over C
    return jax.vmap(per_channel)(x, rows, cols).astype(x.dtype)  # over N


def augment_batch(
    x: jax.Array,
    key: jax.Array,
    *,
    scale: tuple[float, float] = PAPER_SCALE,
    max_angle: float = PAPER_MAX_ANGLE,
    flip: bool = True,
) -> jax.Array:
    """Apply the paper's random augmentation to a batch ``x`` of shape (N, H, W, C).

    Parameters
    ----------
    x : Array
        Floating-point images, channels-last.
    key : PRNG key
        Source of randomness.
    scale, max_angle, flip
        Ranges of the random resize, rotation and flip (defaults: the paper's).

    Returns
    -------
    Array
        Same shape and dtype as ``x``.
    """
    _check_batch(x)
    n, height, width, _ = x.shape
    params = sample_params(key, n, height, width, scale=scale, max_angle=max_angle, flip=flip)
    return apply_augmentation(x, *params)
