"""The paper's augmentation (random resize, crop, flip, rotation): core maps, every backend.

The parameters and affine maps are drawn in the core (:mod:`combinability.augmentation`);
each backend resamples through them (``Backend.augment``). References: exact pixel
permutations (identity, flip, rot90, integer shifts) and :func:`scipy.ndimage.affine_transform`
(bilinear, zeros outside) for general parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import affine_transform

from combinability.augmentation import AugmentParams, affine_matrices, sample_params
from combinability.errors import DatasetError
from tests.test_backend_conformance import BACKENDS


def params(n, scale=1.0, angle=0.0, flip=False, shift=(0.0, 0.0)):
    """Explicit per-image parameters as numpy arrays."""
    return (np.full(n, scale, np.float32), np.full(n, angle, np.float32), np.full(n, flip, bool),
            np.tile(np.asarray(shift, np.float32), (n, 1)))


def apply(backend: str, x: np.ndarray, p) -> np.ndarray:
    from combinability.plugins import get_backend

    be = get_backend(backend)
    theta = affine_matrices(AugmentParams(*p), *x.shape[2:])
    return be.to_numpy(be.augment(be.asarray(x), be.asarray(theta)))


def scipy_reference(x: np.ndarray, scale, angle, flip, shift) -> np.ndarray:
    """Output pixel p (centred, x right, y down) shows input (F R(-a) p + t) / s."""
    n, c, h, w = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(n):
        a = np.deg2rad(float(angle[i]))
        f = -1.0 if flip[i] else 1.0
        m = np.array([[f * np.cos(a), -f * np.sin(a)], [np.sin(a), np.cos(a)]]) / scale[i]  # on (x, y)
        b = shift[i] / scale[i]
        m_rc = m[::-1, ::-1]  # the same map on (row, col)
        centre = np.array([h / 2 - 0.5, w / 2 - 0.5])
        offset = centre + b[::-1] - m_rc @ centre
        for ch in range(c):
            out[i, ch] = affine_transform(x[i, ch].astype(np.float64), m_rc, offset=offset, order=1,
                                          mode="grid-constant", cval=0.0)
    return out


@pytest.fixture
def batch():
    return np.random.default_rng(0).standard_normal((3, 2, 7, 10)).astype(np.float32)


def random_params(n, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.8, 1.2, n).astype(np.float32), rng.uniform(-30, 30, n).astype(np.float32),
            rng.random(n) < 0.5, rng.uniform(-2, 2, (n, 2)).astype(np.float32))




@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_and_flip(backend, batch):
    np.testing.assert_allclose(apply(backend, batch, params(3)), batch, atol=1e-5)
    np.testing.assert_allclose(apply(backend, batch, params(3, flip=True)), batch[..., ::-1], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [6, 7])
def test_rotation_by_90_is_rot90(backend, size):
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    for angle, k in ((90.0, 1), (-90.0, -1), (180.0, 2)):
        np.testing.assert_allclose(apply(backend, x, params(2, angle=angle)), np.rot90(x, k, axes=(-2, -1)),
                                   atol=1e-5)
    corner = np.zeros((1, 1, size, size), np.float32)  # counter-clockwise: top-right moves to top-left
    corner[0, 0, 0, -1] = 1.0
    assert apply(backend, corner, params(1, angle=90.0))[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_shift_moves_the_crop_window(backend, batch):
    tx, ty = 2, -1
    expected = np.zeros_like(batch)
    h, w = batch.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + ty < h and 0 <= j + tx < w:
                expected[..., i, j] = batch[..., i + ty, j + tx]
    np.testing.assert_allclose(apply(backend, batch, params(3, shift=(tx, ty))), expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_general_parameters_match_scipy(backend, batch):
    p = random_params(3)
    p[0][0] = 0.5  # a strong zoom-out: zero padding around the image
    np.testing.assert_allclose(apply(backend, batch, p), scipy_reference(batch, *p), atol=1e-5)


def test_sampled_parameters_follow_the_paper():
    n, h, w = 4000, 32, 20
    s, angle, flip, shift = sample_params(n, h, w, np.random.default_rng(0))
    assert 0.8 <= s.min() and s.max() <= 1.2 and s.min() < 0.81 and s.max() > 1.19
    assert -30 <= angle.min() and angle.max() <= 30 and angle.min() < -29 and angle.max() > 29
    assert 0.45 < flip.mean() < 0.55
    room = np.stack([np.abs(s * w - w) / 2, np.abs(s * h - h) / 2], axis=1)
    assert np.all(np.abs(shift) <= room + 1e-6) and np.abs(shift[:, 1]).max() > 3.0  # up to 3.2
    assert not sample_params(10, h, w, np.random.default_rng(1), flip=False).flip.any()
    again = sample_params(n, h, w, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(again, (s, angle, flip, shift), strict=True))


def test_bad_parameters_are_rejected():
    with pytest.raises(DatasetError, match="disagree"):
        affine_matrices(AugmentParams(np.ones(2), np.zeros(2), np.zeros(2, bool), np.zeros(2)), 4, 4)
    with pytest.raises(DatasetError, match="positive"):
        affine_matrices(AugmentParams(*params(1, scale=0.0)), 4, 4)
    with pytest.raises(DatasetError, match="0 < low"):
        sample_params(3, 4, 4, np.random.default_rng(0), scale=(1.2, 0.8))
