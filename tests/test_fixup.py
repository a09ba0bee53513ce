"""Parameters added to or multiplying a map directly: Fixup's scalar biases and scale (Zhang et al., 2019;
several per block), SkipInit's scalar, and a bias per channel held by the model (``x + self.shift``).

Each is a ``"shift"`` or ``"scale"`` node of the layer table: one value for every channel binds no
permutation, one per channel moves with the channels.

References: the user's module in float64 under a random transformation of the derived spec (outputs
equal to 1e-9) that weight matching undoes; the backends' own networks of the traced table, given the
user's weights, against the user's module; torch's cross-entropy at the ends of a sweep.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import assert_random_transformation_undone, table_logits

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class FixupBlock(nn.Module):
    """The Fixup basic block as its authors' CIFAR code writes it."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.downsample = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        identity = x
        out = self.conv1(x + self.bias1a)
        out = F.relu(out + self.bias1b)
        out = self.conv2(out + self.bias2a)
        out = out * self.scale + self.bias2b
        if self.downsample is not None:
            identity = self.downsample(x + self.bias1a)
        return F.relu(out + identity)


class FixupNet(nn.Module):
    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bias1 = nn.Parameter(torch.zeros(1))
        self.layer1 = FixupBlock(width, width)
        self.layer2 = FixupBlock(width, 2 * width, stride=2)
        self.bias2 = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(2 * width, classes)
        self.shift = nn.Parameter(torch.zeros(2 * width, 1, 1))  # a bias per channel held by the model itself
        self.gain = nn.Parameter(torch.ones(classes))  # one factor per logit

    def forward(self, x):
        x = F.relu(self.conv1(x) + self.bias1)
        x = self.layer2(self.layer1(x)) + self.shift
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x + self.bias2) * self.gain


def _random(seed: int) -> FixupNet:
    model = FixupNet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Fixup starts its scalars at 0 and 1: move them, so that a wrong binding shows
        for p in model.parameters():
            p.copy_(p + 0.4 * torch.randn(p.shape, generator=g))
    return model.eval()


X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_scalars_bind_nothing_and_a_shift_per_channel_moves_with_its_channels():
    model = _random(0)
    spec = cb.derive_spec(model, X)
    for name in ("bias1", "bias2", "layer1.bias1a", "layer1.bias1b", "layer1.bias2a", "layer1.scale",
                 "layer1.bias2b", "layer2.bias1a", "layer2.scale"):
        assert spec.axes_to_perm[name] == (None,), name
    out = spec.axes_to_perm["layer2.conv2.weight"][0]
    assert out is not None and spec.axes_to_perm["shift"] == (out, None, None)
    assert spec.axes_to_perm["layer2.downsample.weight"][0] == out  # the residual sum: one permutation
    assert spec.axes_to_perm["gain"] == (None,)  # the logits stay in place
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, spec, state, X, "shift")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_backends_networks_of_the_traced_table_compute_the_users_module(backend):
    if backend == "jax":
        pytest.importorskip("flax")
    model = _random(1)
    table = cb.derive.describe(model, X)
    assert {n.op for n in table.nodes} >= {"shift", "scale"}
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(X).numpy()
    np.testing.assert_allclose(table_logits(backend, table, params, X.numpy()), want, rtol=1e-4, atol=1e-5)


def test_a_fixup_pair_aligns_and_its_sweep_ends_score_as_torch_does():
    a, b = _random(2), _random(3)
    y = torch.arange(6) % 5
    pair = cb.ModelPair(a, b, example_input=X).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(X.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        np.testing.assert_allclose(pair.model(1)(X).numpy(), b(X).numpy(), rtol=1e-4, atol=1e-5)
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.cross_entropy(m(X), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_shift_and_a_scale_stored_with_a_batch_axis_move_with_their_channels(backend):
    if backend == "jax":
        pytest.importorskip("flax")

    class Batched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))  # as users write nn.Parameter(torch.zeros(1, C, 1, 1))
            self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x):
            return self.fc(F.relu(self.gamma * self.conv(x) + self.shift).mean((2, 3)))

    model = Batched().eval()
    spec = cb.derive_spec(model, X)
    conv = spec.axes_to_perm["conv.weight"][0]
    assert spec.axes_to_perm["shift"] == spec.axes_to_perm["gamma"] == (None, conv, None, None)
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, spec, state, X, "shift")
    table = cb.derive.describe(model, X)
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(X).numpy()
    np.testing.assert_allclose(table_logits(backend, table, params, X.numpy()), want, rtol=1e-4, atol=1e-5)


def test_a_shift_of_another_shape_is_refused_saying_how_to_store_it():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)
            self.shift = nn.Parameter(torch.zeros(4, 1))

        def forward(self, x):
            return self.fc(F.relu(self.conv(x) + self.shift.view(1, 4, 1, 1)).mean((2, 3)))

    with pytest.raises(TracingError, match=r"stored as \(4,\), \(4, 1, 1\) or \(1, 4, 1, 1\)"):
        cb.derive_spec(Odd(), X)
