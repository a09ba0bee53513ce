"""LLFC (issue 13, item 1) against a plain numpy forward pass, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import SamplerError, UnknownNameError


# -- independent reference: the library's MLP, in float64 numpy -----------------------------------
def np_mlp_features(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features at every point (``layers.i`` pre-activation, ``hidden_i`` after ReLU) and the logits."""
    h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n_layers = len([k for k in params if k.endswith(".weight")])
    feats = {}
    for i in range(n_layers):
        z = h @ params[f"layers.{i}.weight"].astype(np.float64).T + params[f"layers.{i}.bias"]
        if i == n_layers - 1:
            return feats, z
        feats[f"layers.{i}"] = z
        h = feats[f"hidden_{i}"] = np.maximum(z, 0.0)
    raise AssertionError("no layers")


def np_mean_ce(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def mix(params_a: dict, params_b: dict, lam: float) -> dict:
    return {k: (1 - lam) * params_a[k].astype(np.float64) + lam * params_b[k].astype(np.float64) for k in params_a}


def reference_cosine(f: np.ndarray, g: np.ndarray) -> float:
    """Mean over examples of the cosine, one example at a time."""
    return float(np.mean([fi @ gi / (np.linalg.norm(fi) * np.linalg.norm(gi)) for fi, gi in zip(f, g, strict=True)]))


@pytest.fixture(scope="module")
def test_data():
    return cb.load_dataset("digits", "test").subset(120)


def check_against_numpy(pair, data, lam: float, tol: float) -> None:
    ds = cb.llfc(pair, (data.x, data.y), values=[lam])
    pa, pb = pair.params("a"), pair.params("b")
    fa, _ = np_mlp_features(pa, data.x)
    fb, _ = np_mlp_features(pb, data.x)
    f, _ = np_mlp_features(mix(pa, pb, lam), data.x)
    assert list(ds["point"].values) == list(pair.table.feature_points())
    for p in ds["point"].values:
        g = (1 - lam) * fa[p] + lam * fb[p]
        want_scale = float(np.sum(f[p] * g) / np.sum(g * g))
        got = ds.sel(point=p, value=lam, sample=0)
        np.testing.assert_allclose(float(got["cosine"]), reference_cosine(f[p], g), rtol=tol, err_msg=p)
        np.testing.assert_allclose(float(got["scale"]), want_scale, rtol=tol, err_msg=p)
        np.testing.assert_allclose(float(got["coefficient"]), lam, rtol=1e-6)
        np.testing.assert_allclose(float(ds["baseline_cosine"].sel(point=p)), reference_cosine(fa[p], fb[p]),
                                   rtol=tol)


def test_llfc_linear_matches_numpy_torch(digits_pair, test_data):
    check_against_numpy(digits_pair, test_data, 0.3, 1e-4)


def test_llfc_naive_pair_is_less_connected(digits_pair, test_data):
    """Zhou et al.: LLFC holds where LMC does (aligned), much less without alignment."""
    kw = dict(data=(test_data.x, test_data.y), values=[0.5], points=["hidden_2"])
    aligned = float(cb.llfc(digits_pair, **kw)["cosine"].squeeze())
    naive = float(cb.llfc(digits_pair.naive, **kw)["cosine"].squeeze())
    assert aligned > 0.97 and naive < aligned


def test_llfc_elementwise_sampler_uses_the_layer_mean_coefficient(digits_pair, test_data):
    """Uniform: the reference combines the end features with each layer's mean of the drawn v."""
    from combinability.samplers.base import DrawContext
    from combinability.sweeps import sample_seed

    smp = cb.Uniform()
    ds = cb.llfc(digits_pair, (test_data.x, test_data.y), sampler=smp, values=[0.5], samples=2, seed=3,
                 points=["layers.1", "hidden_2"])
    assert ds["cosine"].dims == ("point", "value", "sample") and ds["cosine"].shape == (2, 1, 2)
    be = digits_pair.backend_obj
    ta, tb = be.asarray(digits_pair.theta_a), be.asarray(digits_pair.theta_b)
    layout = digits_pair.layout
    for s in range(2):
        ctx = DrawContext(layout, be.random(sample_seed(3, 0, s, smp.name)), theta_a=ta, theta_b=tb)
        v = be.to_numpy(smp.draw(0.5, ctx)).astype(np.float64)
        combined = layout.unflatten((1 - v) * digits_pair.theta_a + v * digits_pair.theta_b)
        f, _ = np_mlp_features(combined, test_data.x)
        fa, _ = np_mlp_features(digits_pair.params("a"), test_data.x)
        fb, _ = np_mlp_features(digits_pair.params("b"), test_data.x)
        for p, entry in (("layers.1", "layers.1"), ("hidden_2", "layers.2")):
            alpha = np.mean(np.concatenate([v[layout.slice(f"{entry}.weight")], v[layout.slice(f"{entry}.bias")]]))
            g = (1 - alpha) * fa[p] + alpha * fb[p]
            got = ds.sel(point=p, sample=s).isel(value=0)
            np.testing.assert_allclose(float(got["coefficient"]), alpha, rtol=1e-9)
            np.testing.assert_allclose(float(got["cosine"]), reference_cosine(f[p], g), rtol=1e-4)


def test_llfc_result_is_labelled_and_reused(digits_pair, test_data, tmp_path):
    out = tmp_path / "llfc.nc"
    ds = cb.llfc(digits_pair, (test_data.x, test_data.y), values=[0.0, 0.5, 1.0], out=out)
    for name in list(ds.coords) + list(ds.data_vars):
        assert ds[name].attrs.get("long_name"), name
    back = cb.open_results(out)
    assert back.attrs["combinability_format"] == "llfc"
    np.testing.assert_array_equal(back["cosine"].values, ds["cosine"].values)
    # ends: the combined model is A (B) itself, so the features agree exactly up to float32 rounding
    np.testing.assert_allclose(ds["cosine"].sel(value=[0.0, 1.0]).values, 1.0, atol=1e-6)
    again = cb.llfc(digits_pair, (test_data.x, test_data.y), values=[0.0, 0.5, 1.0], out=out)
    assert again.attrs["created"] == back.attrs["created"]  # reused, not recomputed


def test_llfc_bad_input_fails_before_work(digits_pair, test_data):
    data = (test_data.x, test_data.y)
    with pytest.raises(UnknownNameError, match=r"unknown feature point\(s\) \['conv9'\]; valid: layers.0, hidden_0"):
        cb.llfc(digits_pair, data, points=["conv9"])
    with pytest.raises(SamplerError, match=r"outside \[0, 1\]"):
        cb.llfc(digits_pair, data, values=[1.5])
    with pytest.raises(SamplerError, match="combines 3 models"):
        cb.llfc(digits_pair, data, sampler=cb.Triangle())


@pytest.fixture(scope="module")
def jax_pair():
    pytest.importorskip("jax")
    a, b = (cb.train("mlp", "digits", backend="jax", seed=s, epochs=2, width=0.25) for s in (0, 1))
    return cb.ModelPair(a, b, backend="jax").align("weight", seed=0)


def test_llfc_linear_matches_numpy_jax(jax_pair, test_data):
    check_against_numpy(jax_pair, test_data, 0.6, 1e-4)


def test_cli_analyse_and_report_draw_every_analysis(tmp_path, capsys):
    """`combinability analyse KIND` writes a result that `combinability report` draws (PNG)."""
    from combinability.cli import main

    for seed in (0, 1):
        cb.train("mlp", "digits", seed=seed, epochs=1, width=0.25, checkpoint=tmp_path / f"{seed}.ckpt")
    a, b = str(tmp_path / "0.ckpt"), str(tmp_path / "1.ckpt")
    kinds = {"llfc": [], "layerwise": ["--no-curvature"], "calibration": [], "lewc": ["--points", "hidden_1"]}
    for kind, extra in kinds.items():
        rc = main(["analyse", kind, a, b, "--values", "0.5", "--limit", "80", "-q", "--out",
                   str(tmp_path / f"{kind}.nc"), *extra])
        assert rc == 0, capsys.readouterr().err
        assert cb.open_results(tmp_path / f"{kind}.nc").attrs["cli_command"].startswith("combinability analyse")
    assert main(["report", *(str(tmp_path / f"{k}.nc") for k in kinds), "--out", str(tmp_path / "fig"), "-q"]) == 0
    for kind in kinds:
        png = tmp_path / "fig" / f"{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kind
    assert main(["analyse", "llfc", a, b, "--points", "nope", "-q", "--out", str(tmp_path / "x.nc")]) == 2
    assert "unknown feature point(s) ['nope']; valid: layers.0" in capsys.readouterr().err
