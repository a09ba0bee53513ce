"""Models with weight norms (``torch.nn.utils.parametrizations.weight_norm``, as TCNs and WaveNets use): a
weight is stored as gains ``g`` and directions ``v``, ``w = g v / ‖v‖`` (the norm over every axis but
``dim``). The model is traced with each weight as computed, and a unit's permutation then moves its
entries of ``v`` and, along the norm's axis, of ``g``.

References: the spec written by hand, the user's module run in float64 with a random transformation of
the derived spec (it must keep the outputs), which weight matching must undo, and the model left as it
was (torch's own removal of a parametrization from a copy would strip the model's class).
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import assert_random_transformation_undone, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
weight_norm = nn.utils.parametrizations.weight_norm


class WeightNormed(nn.Module):
    """Convolutions normed per output channel (``dim=0``) and a Linear normed per input feature (``dim=1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = weight_norm(nn.Conv1d(2, 6, 3, padding=1))
        self.c2 = weight_norm(nn.Conv1d(6, 6, 3, padding=1))
        self.fc1 = weight_norm(nn.Linear(6, 5), dim=1)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x)))).mean(-1)
        return self.fc2(F.relu(self.fc1(h)))


def _state(model):
    return {k: v.double().numpy() for k, v in model.state_dict().items()}


def test_the_gains_move_along_the_norms_axis_and_the_directions_as_the_weight():
    model = randomised(WeightNormed(), 0)
    x = torch.randn(4, 2, 8)
    spec, folds = cb.derive_symmetries(model, x)
    g, v = "parametrizations.weight.original0", "parametrizations.weight.original1"
    assert folds == [] and dict(spec.axes_to_perm) == {
        f"c1.{g}": ("P_c1", None, None), f"c1.{v}": ("P_c1", None, None), "c1.bias": ("P_c1",),
        f"c2.{g}": ("P_c2", None, None), f"c2.{v}": ("P_c2", "P_c1", None), "c2.bias": ("P_c2",),
        f"fc1.{g}": (None, "P_c2"), f"fc1.{v}": ("P_fc1", "P_c2"), "fc1.bias": ("P_fc1",),
        "fc2.weight": (None, "P_fc1"), "fc2.bias": (None,)}
    assert isinstance(model.c1.weight, torch.Tensor)  # the model keeps its parametrizations
    assert_random_transformation_undone(model, spec, _state(model), x, f"c2.{v}")


def test_a_pair_of_weight_normed_models_is_aligned_and_swept():
    a, b = randomised(WeightNormed(), 0), randomised(WeightNormed(), 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    aligned = pair.model(1)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), rtol=1e-5, atol=1e-5)
    ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.cross_entropy(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)
    assert np.isfinite(pair.permutation.objective)


class SpectralNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 6))
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_other_parametrizations_are_refused_by_name():
    with pytest.raises(TracingError, match=r"module 'fc1' \(ParametrizedLinear\) computes its weight from other "
                                           r"tensors"):
        cb.ModelPair(SpectralNormed(), SpectralNormed(), example_input=torch.randn(2, 4))


def test_activation_matching_reads_a_weight_normed_models_layer_outputs():
    a = randomised(WeightNormed(), 0)
    x = torch.randn(64, 2, 8)
    spec, _ = cb.derive_symmetries(a, x[:4])
    state = {k: v.numpy() for k, v in a.state_dict().items()}
    perm = cb.random_permutation(spec, state, seed=3)
    b = WeightNormed().eval()
    b.load_state_dict({k: torch.as_tensor(v) for k, v in {**state, **cb.apply_permutation(spec, perm, state)}.items()})
    aligned = cb.ModelPair(a, b, example_input=x[:4]).align("activation", data=(x.numpy(), np.zeros(64, np.int64)))
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)
