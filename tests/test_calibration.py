"""Temperature calibration and LEWC (issue 13, item 3)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import log_softmax

import combinability as cb
from combinability.analysis import CalibrationOverlapWarning
from combinability.analysis.calibration import lewc_fit
from combinability.errors import ConfigurationError, SamplerError, UnknownNameError
from tests.test_llfc import mix, np_mlp_features


def brute_force_beta(logits: np.ndarray, y: np.ndarray, lo: float = 1e-2, hi: float = 1e2) -> tuple[float, float]:
    """The best inverse temperature on a dense log grid, and its loss (scipy's log_softmax)."""
    betas = np.exp(np.linspace(np.log(lo), np.log(hi), 20001))
    losses = [-np.mean(log_softmax(b * logits, axis=1)[np.arange(len(y)), y]) for b in betas]
    i = int(np.argmin(losses))
    return float(betas[i]), float(losses[i])


def test_fit_temperature_matches_a_brute_force_grid():
    rng = np.random.default_rng(0)
    for scale in (0.3, 1.0, 4.0):  # under-confident, about right, over-confident logits
        y = rng.integers(0, 5, 400)
        logits = rng.normal(size=(400, 5)) + 1.5 * np.eye(5)[y]
        logits *= scale
        beta = cb.fit_temperature(logits, y)
        grid_beta, grid_loss = brute_force_beta(logits, y)
        np.testing.assert_allclose(beta, grid_beta, rtol=1e-3)
        loss = -np.mean(log_softmax(beta * logits, axis=1)[np.arange(len(y)), y])
        assert loss <= grid_loss + 1e-9


def test_fit_temperature_bad_input():
    with pytest.raises(ConfigurationError, match="0 < low < high"):
        cb.fit_temperature(np.zeros((3, 2)), np.zeros(3, int), bounds=(1.0, 0.5))
    with pytest.raises(ConfigurationError, match=r"expected logits \(n, C\) and labels \(n,\)"):
        cb.fit_temperature(np.zeros((3, 2)), np.zeros(4, int))


@pytest.fixture(scope="module")
def splits():
    test = cb.load_dataset("digits", "test").subset(150)
    calib = cb.load_dataset("digits", "train").subset(200, seed=1)
    return test, calib


def test_calibrate_against_numpy_logits(digits_pair, splits):
    test, calib = splits
    lams = [0.5]
    ds = cb.calibrate(digits_pair, (test.x, test.y), lambdas=lams, calibration_data=(calib.x, calib.y))
    assert ds.attrs["combinability_format"] == "calibration"
    assert list(ds["alignment"].values) == ["naive", "aligned"]
    assert list(ds["lam"].values) == [0.0, 0.5, 1.0]
    for alignment, pair in (("naive", digits_pair.naive), ("aligned", digits_pair)):
        row = ds.sel(alignment=alignment)
        losses, calibrated = [], []
        for lam in (0.0, 0.5, 1.0):
            params = mix(pair.params("a"), pair.params("b"), lam)
            _, z_cal = np_mlp_features(params, calib.x)
            _, z = np_mlp_features(params, test.x)
            beta, _ = brute_force_beta(z_cal, calib.y)
            got = row.sel(lam=lam)
            np.testing.assert_allclose(float(got["inverse_temperature"]), beta, rtol=2e-3)
            ce = [-np.mean(log_softmax(b * z, axis=1)[np.arange(len(test.y)), test.y]) for b in (1.0, beta)]
            np.testing.assert_allclose(float(got["loss"]), ce[0], rtol=1e-4)
            np.testing.assert_allclose(float(got["loss_calibrated"]), ce[1], rtol=1e-3)
            np.testing.assert_allclose(float(got["accuracy"]), np.mean(z.argmax(1) == test.y))
            losses.append(ce[0])
            calibrated.append(ce[1])
        np.testing.assert_allclose(float(row["loss_barrier"]), max(losses) - 0.5 * (losses[0] + losses[2]), rtol=1e-3)
        np.testing.assert_allclose(float(row["loss_barrier_calibrated"]),
                                   max(calibrated) - 0.5 * (calibrated[0] + calibrated[2]), rtol=1e-2, atol=1e-4)


def test_calibrate_warns_when_calibration_overlaps_evaluation(digits_pair, splits):
    test, _ = splits
    with pytest.warns(CalibrationOverlapWarning, match="150 of the 150 calibration examples are also evaluation"):
        cb.calibrate(digits_pair, (test.x, test.y), lambdas=[0.5], calibration_data=(test.x, test.y), naive=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationOverlapWarning)
        ds = cb.calibrate(digits_pair, "digits", lambdas=[0.5], limit=100, naive=False)
    assert ds.attrs["examples"] == 50 and ds.attrs["calibration_examples"] == 50  # disjoint halves of the split


def test_calibrate_bad_input(digits_pair, splits):
    test, calib = splits
    data, held_out = (test.x, test.y), (calib.x, calib.y)
    with pytest.raises(ConfigurationError, match=r"calibration_fraction must lie in \(0, 1\), got 1.0"):
        cb.calibrate(digits_pair, data, calibration_fraction=1.0)
    with pytest.raises(SamplerError, match=r"lambdas \[-0.5\] lie outside the linear path's range \[0, 1\]"):
        cb.calibrate(digits_pair, data, calibration_data=held_out, lambdas=[-0.5, 0.5])
    with pytest.raises(ConfigurationError, match="0 < low < high"):
        cb.calibrate(digits_pair, data, calibration_data=held_out, bounds=(0.0, 10.0))


def test_lewc_fit_against_lstsq():
    rng = np.random.default_rng(1)
    fa, fb = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    f = 0.3 * fa + 0.6 * fb + 0.05 * rng.normal(size=(50, 7))
    a, b, r2 = lewc_fit(f, fa, fb)
    coef, *_ = np.linalg.lstsq(np.stack([fa.ravel(), fb.ravel()], axis=1), f.ravel(), rcond=None)
    np.testing.assert_allclose([a, b], coef, rtol=1e-10)
    resid = f - coef[0] * fa - coef[1] * fb
    np.testing.assert_allclose(r2, 1 - np.sum(resid**2) / np.sum((f - f.mean(0)) ** 2), rtol=1e-10)


def test_lewc_on_the_mlp(digits_pair, splits):
    test, _ = splits
    ds = cb.lewc(digits_pair.naive, (test.x, test.y), lambdas=[0.25, 0.5], points=["layers.0", "hidden_1"])
    assert ds.attrs["combinability_format"] == "lewc"
    assert list(ds["depth"].values) == [1, 2]
    # the first layer's pre-activation is linear in the weights: exactly (1 − λ) f_A + λ f_B
    first = ds.sel(point="layers.0")
    np.testing.assert_allclose(first["a"].values, [0.75, 0.5], atol=1e-4)
    np.testing.assert_allclose(first["b"].values, [0.25, 0.5], atol=1e-4)
    np.testing.assert_allclose(first["r2"].values, 1.0, atol=1e-6)
    # deeper: the fit against numpy features and an independent least-squares solve
    pair = digits_pair.naive
    fa, _ = np_mlp_features(pair.params("a"), test.x)
    fb, _ = np_mlp_features(pair.params("b"), test.x)
    f, _ = np_mlp_features(mix(pair.params("a"), pair.params("b"), 0.5), test.x)
    p = "hidden_1"
    coef, *_ = np.linalg.lstsq(np.stack([fa[p].ravel(), fb[p].ravel()], axis=1), f[p].ravel(), rcond=None)
    got = ds.sel(point=p, lam=0.5)
    np.testing.assert_allclose([float(got["a"]), float(got["b"])], coef, rtol=1e-3)
    np.testing.assert_allclose(float(got["a_predicted"]), 0.25)
    pred = 0.25 * fa[p] + 0.25 * fb[p]
    want = 1 - np.sum((f[p] - pred) ** 2) / np.sum((f[p] - f[p].mean(0)) ** 2)
    np.testing.assert_allclose(float(got["r2_predicted"]), want, rtol=1e-3)
    with pytest.raises(UnknownNameError, match="valid: layers.0, hidden_0"):
        cb.lewc(pair, (test.x, test.y), points=["nope"])


def test_width_ablation_calibrate(tmp_path):
    from combinability import experiments as ex

    ds = ex.width_ablation("mlp", "digits", widths=(0.25,), samplers=(cb.Linear(),), epochs=1,
                           values_per_sampler=3, splits=["test"], limit=100, calibrate=True,
                           model_dir=tmp_path)
    for var in ("loss_barrier_linear", "loss_barrier_calibrated", "inverse_temperature"):
        assert var in ds, var
    assert ds["loss_barrier_calibrated"].dims == ("width", "alignment")
    # wiring: the numbers are those of cb.calibrate (tested against numpy above) on the width's pair
    a, b = (cb.train("mlp", "digits", seed=s, epochs=1, width=0.25,
                     checkpoint=tmp_path / f"mlp_digits_w0.25_s{s}_e1_torch.ckpt") for s in (0, 1))
    pair = cb.ModelPair(a, b).align("weight")
    cal = cb.calibrate(pair, "digits", lambdas=[0.0, 0.5, 1.0], limit=100)
    np.testing.assert_allclose(ds["loss_barrier_calibrated"].sel(width=0.25).values,
                               cal["loss_barrier_calibrated"].values)
