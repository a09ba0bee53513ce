"""Layer-wise barriers and the curvature prediction (issue 13, item 2)."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.analysis.layerwise import curvature_along, second_order_gap
from combinability.errors import ConfigurationError, SamplerError, UnknownNameError
from tests.test_llfc import np_mean_ce, np_mlp_features


@pytest.fixture(scope="module")
def test_data():
    return cb.load_dataset("digits", "test").subset(150)


def np_loss(pair, theta: np.ndarray, data) -> float:
    _, logits = np_mlp_features(pair.layout.unflatten(theta, cast=False), data.x)
    return np_mean_ce(logits, data.y)


def layer_delta(pair, layer: str) -> np.ndarray:
    mask = pair.layout.layer_index() == pair.layer_names.index(layer)
    return np.where(mask, pair.theta_b.astype(np.float64) - pair.theta_a, 0.0)


def fd_second_derivative(pair, theta: np.ndarray, delta: np.ndarray, data, h: float = 1e-3, loss=None) -> float:
    """``d²/dt² L(θ + tΔ)`` at 0 by the three-point stencil of float64 numpy losses (no autodiff)."""
    theta = theta.astype(np.float64)
    loss = loss or np_loss
    up, mid, down = (loss(pair, theta + t * delta, data) for t in (h, 0.0, -h))
    return (up - 2 * mid + down) / h**2


def _check_curvature(pair, data, layers, loss, rtol: float) -> None:
    be = pair.backend_obj
    prepared = be.prepare(pair.template, pair.layout)
    x, y = be.asarray(data.x), be.asarray(data.y)
    for layer in layers:
        delta = layer_delta(pair, layer)
        h, grad = curvature_along(prepared, be, pair.theta_a, delta, x, y, step=1e-2, batch_size=64)
        want = fd_second_derivative(pair, pair.theta_a, delta, data, loss=loss)
        np.testing.assert_allclose(h, want, rtol=rtol, err_msg=layer)
        # the gradient's directional derivative against a central difference of numpy losses
        eps = 1e-4
        up, down = (loss(pair, pair.theta_a + t * delta, data) for t in (eps, -eps))
        np.testing.assert_allclose(grad @ delta, (up - down) / (2 * eps), rtol=1e-3, atol=1e-5)


class TanhNet:
    """A user's smooth network (tanh): its loss has a second derivative everywhere."""

    @staticmethod
    def build(seed: int):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1, self.fc2, self.fc3 = nn.Linear(64, 24), nn.Linear(24, 24), nn.Linear(24, 10)

            def forward(self, x):
                return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1))))))

        torch.manual_seed(seed)
        return Net()

    @staticmethod
    def loss(pair, theta: np.ndarray, data) -> float:
        p = pair.layout.unflatten(theta, cast=False)
        h = data.x.reshape(len(data.x), -1).astype(np.float64)
        for i in (1, 2):
            h = np.tanh(h @ p[f"fc{i}.weight"].T + p[f"fc{i}.bias"])
        return np_mean_ce(h @ p["fc3.weight"].T + p["fc3.bias"], data.y)


def test_curvature_matches_finite_difference_second_derivative_smooth_net(test_data):
    """ΔᵀHΔ (central difference of autodiff gradients) against a float64 numpy second difference of losses."""
    import torch

    pair = cb.ModelPair(TanhNet.build(0), TanhNet.build(1), example_input=torch.as_tensor(test_data.x[:16]))
    _check_curvature(pair, test_data, ("fc1", "fc2", "fc3"), TanhNet.loss, rtol=1e-3)


def test_curvature_of_a_network_with_dropout_is_the_inference_losss_and_the_same_each_time(test_data):
    """Dropout is off in the gradients behind the curvature, as in the losses the barriers are measured with:
    ΔᵀHΔ equals the float64 numpy second difference of the network without dropout, call after call."""
    import torch
    from torch import nn

    class Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 24), nn.Linear(24, 24), nn.Linear(24, 10)
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            h = self.drop(torch.tanh(self.fc1(x.flatten(1))))
            return self.fc3(self.drop(torch.tanh(self.fc2(h))))

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(Dropped().eval())
    pair = cb.ModelPair(*nets, example_input=torch.as_tensor(test_data.x[:16]))
    _check_curvature(pair, test_data, ("fc1", "fc2", "fc3"), TanhNet.loss, rtol=1e-3)
    first, again = (cb.layerwise_barriers(pair, test_data, lambdas=[0.0, 0.5, 1.0], modes=["cumulative"])
                    for _ in range(2))
    np.testing.assert_array_equal(first["curvature_start"].values, again["curvature_start"].values)
    assert "inference-mode" in first.attrs["hvp"]


def test_curvature_of_the_relu_mlp_output_layer_torch(digits_pair, test_data):
    """The output layer of a ReLU MLP: smooth along Δ (no kink after it), so the estimates agree closely."""
    _check_curvature(digits_pair, test_data, ("layers.3",), np_loss, rtol=1e-3)


def test_second_order_gap_is_exact_for_a_quadratic():
    """f(λ) = f0 + gλ + ½hλ²: the prediction equals f minus its chord at every λ."""
    f0, g, h = 0.7, -0.3, 2.5
    lam = np.linspace(0, 1, 7)
    f = f0 + g * lam + 0.5 * h * lam**2
    chord = (1 - lam) * f[0] + lam * f[-1]
    slope_difference = g * 1.0 - (g + h) * 1.0  # f'(0) − f'(1)
    predicted, curvature = second_order_gap(lam, slope_difference, h, h)
    np.testing.assert_allclose(predicted, f - chord, atol=1e-12)
    np.testing.assert_allclose(curvature, 0.5 * lam * (1 - lam) * h, atol=1e-12)


def test_layerwise_barriers_paths_and_prediction(digits_pair, test_data):
    data = (test_data.x, test_data.y)
    ds = cb.layerwise_barriers(digits_pair, data, lambdas=[0.25, 0.5, 0.75])
    assert ds.attrs["combinability_format"] == "layerwise_barriers"
    assert list(ds["layer"].values) == digits_pair.layer_names
    assert list(ds["lam"].values) == [0.0, 0.25, 0.5, 0.75, 1.0]
    loss = ds["loss"]
    a_loss = np_loss(digits_pair, digits_pair.theta_a, test_data)
    b_loss = np_loss(digits_pair, digits_pair.theta_b, test_data)
    np.testing.assert_allclose(loss.sel(lam=0.0).values, a_loss, rtol=1e-4)
    # the cumulative path through the last layer is the whole linear path A -> B
    np.testing.assert_allclose(float(loss.sel(mode="cumulative", layer="layers.3", lam=1.0)), b_loss, rtol=1e-4)
    # the single-layer path of layers.1 ends at A with B's layers.1
    end = digits_pair.theta_a + layer_delta(digits_pair, "layers.1")
    np.testing.assert_allclose(float(loss.sel(mode="single", layer="layers.1", lam=1.0)),
                               np_loss(digits_pair, end, test_data), rtol=1e-4)
    mid = digits_pair.theta_a + 0.5 * layer_delta(digits_pair, "layers.1")
    gap = np_loss(digits_pair, mid, test_data) - 0.5 * (a_loss + np_loss(digits_pair, end, test_data))
    np.testing.assert_allclose(float(ds["loss_gap"].sel(mode="single", layer="layers.1", lam=0.5)), gap,
                               rtol=1e-3, atol=1e-5)
    assert np.all(ds["loss_barrier"].values >= 0)
    np.testing.assert_allclose(ds["loss_barrier"].values, ds["loss_gap"].max("lam").values)
    # the curvature at the start of the single path of layers.3 against numpy's second difference
    want = fd_second_derivative(digits_pair, digits_pair.theta_a, layer_delta(digits_pair, "layers.3"), test_data)
    np.testing.assert_allclose(float(ds["curvature_start"].sel(mode="single", layer="layers.3")), want, rtol=2e-2)
    np.testing.assert_allclose(ds["predicted_gap"].sel(lam=[0.0, 1.0]).values, 0.0, atol=1e-12)


def test_layerwise_without_curvature_and_a_subset(digits_pair, test_data):
    ds = cb.layerwise_barriers(digits_pair, (test_data.x, test_data.y), layers=["layers.2", "layers.0"],
                               modes=["single"], curvature=False)
    assert list(ds["layer"].values) == ["layers.0", "layers.2"] and list(ds["mode"].values) == ["single"]
    assert np.isnan(ds["predicted_barrier"].values).all()


def test_layerwise_bad_input(digits_pair, test_data, monkeypatch):
    data = (test_data.x, test_data.y)
    with pytest.raises(UnknownNameError, match=r"unknown layer\(s\) \['fc9'\]; valid: layers.0, layers.1"):
        cb.layerwise_barriers(digits_pair, data, layers=["fc9"])
    with pytest.raises(UnknownNameError, match="valid: single, cumulative"):
        cb.layerwise_barriers(digits_pair, data, modes=["both"])
    with pytest.raises(SamplerError, match=r"lambdas \[1.5\] lie outside the path's range \[0, 1\]"):
        cb.layerwise_barriers(digits_pair, data, lambdas=[0.5, 1.5])
    with pytest.raises(ConfigurationError, match="step must be a positive number"):
        cb.layerwise_barriers(digits_pair, data, step=0)

    class NoGradients:
        def __init__(self, inner):
            self.forward, self.features = inner.forward, inner.features

    be = digits_pair.backend_obj
    original = be.prepare
    monkeypatch.setattr(be, "prepare", lambda model, layout: NoGradients(original(model, layout)))
    with pytest.raises(ConfigurationError, match="needs the gradients of backend 'torch'.*curvature=False"):
        cb.layerwise_barriers(digits_pair, data)


def test_curvature_matches_finite_difference_jax(test_data):
    pytest.importorskip("jax")
    a, b = (cb.train("mlp", "digits", backend="jax", seed=s, epochs=2, width=0.25) for s in (0, 1))
    pair = cb.ModelPair(a, b, backend="jax").align("weight", seed=0)
    _check_curvature(pair, test_data, ("layers.3",), np_loss, rtol=1e-3)
    ds = cb.layerwise_barriers(pair, (test_data.x, test_data.y), lambdas=[0.5], modes=["cumulative"],
                               layers=["layers.3"])
    np.testing.assert_allclose(float(ds["loss"].sel(lam=1.0).squeeze()), np_loss(pair, pair.theta_b, test_data),
                               rtol=1e-4)


def test_curvature_on_a_batchnorm_network_leaves_the_models_as_they_are():
    """The gradients behind the curvature leave the pair's vectors as they are (λ = 0 is model A's own loss,
    before and after): a training-mode pass would update BatchNorm's running statistics, in a copy."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(6, 10)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.c(x))).mean((2, 3)))

    torch.manual_seed(0)
    nets = []
    for _ in range(2):
        net = Net()
        with torch.no_grad():
            net.bn.running_mean.uniform_(-0.5, 0.5), net.bn.running_var.uniform_(0.5, 2.0)
        nets.append(net.eval())
    data = cb.load_dataset("digits", "test").subset(60)
    pair = cb.ModelPair(*nets, example_input=torch.tensor(data.x[:4])).align("weight")
    before = [t.copy() for t in pair.thetas]
    result = cb.layerwise_barriers(pair, data, lambdas=[0.0, 1.0], modes=["single"], curvature=True)
    for t, b in zip(pair.thetas, before, strict=True):
        np.testing.assert_array_equal(t, b)
    with torch.no_grad():
        want = float(F.cross_entropy(nets[0](torch.tensor(data.x)), torch.tensor(data.y)))
    assert result["loss"].sel(lam=0.0).values == pytest.approx(want, rel=1e-5)
    flat = pair.backend_obj.asarray(pair.theta(0).copy())
    kept = flat.clone()
    prepared = pair.backend_obj.prepare(pair.template, pair.layout)
    _, _, updated = prepared.value_and_grad(flat, pair.backend_obj.asarray(data.x[:8]),
                                            pair.backend_obj.asarray(data.y[:8]), lambda z, y: F.cross_entropy(z, y))
    assert torch.equal(flat, kept) and not torch.equal(updated, kept)  # statistics updated in the copy returned


def test_the_curvature_of_a_sequence_model_is_that_of_its_mean_loss_over_every_position():
    """A language model's ``(n, T, vocab)`` logits for ``(n, T)`` targets: the gradients behind the curvature are
    those of the loss the barriers measure, the mean over every position (float64 torch losses as reference)."""
    import copy

    import torch
    from torch import nn

    vocab, seq = 12, 5

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(vocab, 8), nn.Linear(8, 8), nn.Linear(8, vocab)

        def forward(self, ids):
            return self.head(torch.tanh(self.fc(self.emb(ids))))

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(LM().eval())
    g = torch.Generator().manual_seed(2)
    ids, labels = (torch.randint(0, vocab, (20, seq), generator=g) for _ in range(2))
    data = cb.ArrayDataset(x=ids.numpy(), y=labels.numpy(), num_classes=vocab, name="tokens", split="test")
    pair = cb.ModelPair(*nets, example_input=ids[:4])

    def loss(pair, theta, data) -> float:
        model = copy.deepcopy(nets[0]).double()
        params = pair.layout.unflatten(theta.astype(np.float64), cast=False)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
        with torch.no_grad():
            logits = model(torch.as_tensor(data.x))
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), torch.as_tensor(data.y).reshape(-1)))

    _check_curvature(pair, data, ("fc", "head"), loss, rtol=1e-3)
    ds = cb.layerwise_barriers(pair, data, lambdas=[0.0, 0.5, 1.0], modes=["cumulative"])
    assert np.isfinite(ds["curvature_start"].values).all()
