"""The paper's augmentation (random resize, crop, flip, rotation), torch and jax.

References: exact pixel permutations (identity, flip, rot90, integer shifts) and
:func:`scipy.ndimage.affine_transform` (bilinear, zeros outside) for general parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import affine_transform

from combinability.errors import DatasetError

torch = pytest.importorskip("torch")
taug = pytest.importorskip("combinability_torch.augment")


def params(n, scale=1.0, angle=0.0, flip=False, shift=(0.0, 0.0)):
    """Explicit per-image parameters as numpy arrays."""
    return (np.full(n, scale, np.float32), np.full(n, angle, np.float32), np.full(n, flip, bool),
            np.tile(np.asarray(shift, np.float32), (n, 1)))


def torch_apply(x: np.ndarray, p) -> np.ndarray:
    return taug.apply_augmentation(torch.from_numpy(x), *(torch.from_numpy(a) for a in p)).numpy()


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


# -- torch -------------------------------------------------------------------------------------
def test_identity_parameters_give_the_input(batch):
    np.testing.assert_allclose(torch_apply(batch, params(3)), batch, atol=1e-5)


def test_pure_flip_is_flip_of_last_axis(batch):
    x = torch.from_numpy(batch)
    np.testing.assert_allclose(torch_apply(batch, params(3, flip=True)), x.flip(-1).numpy(), atol=1e-5)


@pytest.mark.parametrize("size", [6, 7])
def test_rotation_by_90_is_rot90(size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    for angle, k in ((90.0, 1), (-90.0, -1), (180.0, 2)):
        got = torch_apply(x.numpy(), params(2, angle=angle))
        np.testing.assert_allclose(got, torch.rot90(x, k, dims=(-2, -1)).numpy(), atol=1e-5)
    # counter-clockwise: the top-right corner moves to the top-left
    corner = torch.zeros(1, 1, size, size)
    corner[0, 0, 0, -1] = 1.0
    assert torch_apply(corner.numpy(), params(1, angle=90.0))[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)


def test_integer_shift_moves_the_crop_window(batch):
    tx, ty = 2, -1
    expected = np.zeros_like(batch)
    h, w = batch.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + ty < h and 0 <= j + tx < w:
                expected[..., i, j] = batch[..., i + ty, j + tx]
    np.testing.assert_allclose(torch_apply(batch, params(3, shift=(tx, ty))), expected, atol=1e-5)


def test_general_parameters_match_scipy(batch):
    p = random_params(3)
    p[0][0] = 0.5  # a strong zoom-out: zero padding around the image
    np.testing.assert_allclose(torch_apply(batch, p), scipy_reference(batch, *p), atol=1e-5)


def test_seeded_reproducible_and_shapes_preserved(batch):
    x = torch.from_numpy(batch)
    a = taug.augment_batch(x, torch.Generator().manual_seed(5))
    b = taug.augment_batch(x, torch.Generator().manual_seed(5))
    c = taug.augment_batch(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, x)
    d = taug.augment_batch(x.double(), torch.Generator().manual_seed(5))
    assert d.dtype == torch.float64
    np.testing.assert_allclose(d.numpy(), a.numpy(), atol=1e-5)


def test_sampled_parameters_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    n, h, w = 4000, 32, 20
    s, angle, flip, shift = taug.sample_params(n, h, w, g)
    assert 0.8 <= s.min() and s.max() <= 1.2 and s.min() < 0.81 and s.max() > 1.19
    assert -30 <= angle.min() and angle.max() <= 30 and angle.min() < -29 and angle.max() > 29
    assert 0.45 < flip.float().mean() < 0.55
    room = torch.stack([(s * w - w).abs() / 2, (s * h - h).abs() / 2], dim=1)
    assert bool((shift.abs() <= room + 1e-6).all()) and shift[:, 1].abs().max() > 3.0  # up to 3.2 = (1.2 * 32 - 32) / 2
    assert not taug.sample_params(10, h, w, g, flip=False).flip.any()


def test_bad_input_is_rejected():
    with pytest.raises(DatasetError, match=r"\(N, C, H, W\)"):
        taug.augment_batch(torch.zeros(3, 8, 8))
    with pytest.raises(DatasetError, match="floating-point"):
        taug.augment_batch(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(DatasetError, match="shift must have shape"):
        taug.apply_augmentation(torch.zeros(2, 1, 4, 4), torch.ones(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(DatasetError, match="positive"):
        taug.apply_augmentation(torch.zeros(1, 1, 4, 4), *(torch.from_numpy(a) for a in params(1, scale=0.0)))


# -- jax ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jaug():
    pytest.importorskip("jax")
    return pytest.importorskip("combinability_jax.augment")


def jax_apply(jaug, x_nchw: np.ndarray, p) -> np.ndarray:
    out = jaug.apply_augmentation(x_nchw.transpose(0, 2, 3, 1), *p)
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_jax_exact_cases(jaug, batch):
    np.testing.assert_allclose(jax_apply(jaug, batch, params(3)), batch, atol=1e-5)
    np.testing.assert_allclose(jax_apply(jaug, batch, params(3, flip=True)), batch[..., ::-1], atol=1e-5)
    square = batch[..., :7]
    np.testing.assert_allclose(jax_apply(jaug, square, params(3, angle=90.0)),
                               np.rot90(square, 1, axes=(-2, -1)), atol=1e-5)


def test_jax_matches_torch_and_scipy(jaug, batch):
    p = random_params(3, seed=7)
    got = jax_apply(jaug, batch, p)
    np.testing.assert_allclose(got, torch_apply(batch, p), atol=1e-5)
    np.testing.assert_allclose(got, scipy_reference(batch, *p), atol=1e-5)


def test_jax_random_jit_and_reproducible(jaug, batch):
    import jax

    x = jax.numpy.asarray(batch.transpose(0, 2, 3, 1))
    key = jax.random.key(0)
    a = jaug.augment_batch(x, key)
    b = jax.jit(jaug.augment_batch)(x, key)
    c = jaug.augment_batch(x, jax.random.key(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert not np.allclose(np.asarray(a), np.asarray(c)) and not np.allclose(np.asarray(a), batch.transpose(0, 2, 3, 1))
    s, angle, flip, shift = jaug.sample_params(key, 4000, 32, 20)
    assert 0.8 <= float(s.min()) and float(s.max()) <= 1.2 and float(abs(angle).max()) <= 30
    assert 0.45 < float(flip.mean()) < 0.55
    with pytest.raises(DatasetError, match=r"\(N, H, W, C\)"):
        jaug.augment_batch(x[0], key)
