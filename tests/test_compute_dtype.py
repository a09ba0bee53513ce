"""Mixed precision: forward passes in bfloat16 on request, float32 parameters and logits, recorded in results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import combinability as cb
from combinability.data import load_dataset

LIMIT = 400


def _bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (round to nearest even), back in float32."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


def _reference_loss(state: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, low: bool) -> float:
    """Mean cross-entropy of the MLP by a plain numpy forward pass; ``low``: bf16 operands, as autocast."""
    r = _bf16 if low else (lambda a: a)
    h = x.reshape(len(x), -1).astype(np.float32)
    n = len([k for k in state if k.endswith(".weight")])
    for i in range(n):
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        h = r(r(h) @ r(w).T + r(b))  # float32 accumulation, output rounded
        if i < n - 1:
            h = np.maximum(h, 0)
    h = h.astype(np.float64)
    logp = h - h.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_bfloat16_sweep_matches_a_bfloat16_reference_and_records_its_type(digits_models, backend, tmp_path):
    if backend == "torch":
        a, b, _ = digits_models
    else:
        a, b = (cb.train("mlp", "digits", backend="jax", seed=s, epochs=2, width=0.25) for s in (0, 1))
    be = cb.plugins.get_backend(backend)
    low = be.with_compute_dtype("bfloat16")
    assert low.compute_dtype == "bfloat16" and be.compute_dtype == "float32"
    kw = dict(values=[0.0, 1.0], data="digits", splits=["test"], limit=LIMIT)
    f32 = cb.sweep(cb.ModelPair(a, b, architecture="mlp", backend=be), cb.Linear(), **kw)
    bf16 = cb.sweep(cb.ModelPair(a, b, architecture="mlp", backend=low), cb.Linear(), out=tmp_path / "bf16.nc", **kw)
    test = load_dataset("digits", "test").subset(LIMIT)
    state = be.state(a)
    exact, rounded = (_reference_loss(state, test.x, test.y, low) for low in (False, True))
    got32, got16 = float(f32["loss"].sel(lam=0.0).item()), float(bf16["loss"].sel(lam=0.0).item())
    np.testing.assert_allclose(got32, exact, rtol=1e-5)
    assert abs(got16 - got32) > 1e-6, "bfloat16 was not used"
    # bfloat16 keeps 8 bits: the library's loss is the rounded reference's, not the exact one's, to that precision
    assert abs(got16 - rounded) < 0.02 * rounded
    assert cb.open_results(tmp_path / "bf16.nc").attrs["compute_dtype"] == "bfloat16"
    assert f32.attrs["compute_dtype"] == "float32"


def test_an_unknown_compute_type_is_refused_with_the_valid_ones():
    be = cb.plugins.get_backend("torch")
    with pytest.raises(cb.ConfigurationError, match=r"cannot compute in 'int8'; valid: float32, bfloat16, float16"):
        be.with_compute_dtype("int8")
    with pytest.raises(cb.ConfigurationError, match="valid: float32, bfloat16, float16"):
        type(be)(compute_dtype="float64")
