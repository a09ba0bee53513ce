"""A CNN written as Hugging Face writes its vision models (``modeling_resnet``): the input checked
against the configuration (a branch plain torch.fx cannot record), keyword arguments with defaults,
activation modules, and an output object with ``logits`` and hidden states.

References: a permuted copy checked by torch itself, which weight and activation matching must undo
exactly, and torch's cross-entropy of the model's logits.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class ConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, activation: bool = True) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


class BasicLayer(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if cin != cout or stride != 1 else nn.Identity()
        self.layer = nn.Sequential(ConvLayer(cin, cout, stride), ConvLayer(cout, cout, activation=False))
        self.activation = nn.ReLU()

    def forward(self, hidden_state):
        residual = self.shortcut(hidden_state)
        hidden_state = self.layer(hidden_state)
        hidden_state += residual
        return self.activation(hidden_state)


class ResNetForImageClassification(nn.Module):
    def __init__(self, num_channels: int = 3, shared_relu: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.embedder = ConvLayer(num_channels, 8)
        self.stages = nn.Sequential(BasicLayer(8, 8, 1), BasicLayer(8, 16, 2))
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
        if shared_relu:  # one activation module run at several places
            self.stages[1].activation = self.stages[0].activation

    def forward(self, pixel_values=None, labels=None, output_hidden_states=None, return_dict=None):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match the configuration.")
        hidden = self.stages(self.embedder(pixel_values))
        logits = self.classifier(self.pooler(hidden))
        return {"logits": logits, "hidden_states": (hidden,) if output_hidden_states else None}


X = np.random.default_rng(0).normal(size=(24, 3, 8, 8)).astype(np.float32)
Y = np.arange(len(X)) % 5


def _model(seed, **kw):
    torch.manual_seed(seed)
    model = ResNetForImageClassification(**kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity, and no channel dead
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_an_hf_style_cnn_is_traced_on_its_example_and_a_planted_permutation_is_undone(method):
    model = _model(0)
    spec = cb.derive_spec(model, X)  # plain torch.fx cannot record the channel check; the example's way is taken
    assert spec.axes_to_perm["stages.1.layer.0.convolution.weight"][0] == "P_stages.1.layer.0.convolution"
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=1), state)
    other = _model(1)
    other.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
    with torch.no_grad():
        torch.testing.assert_close(other(torch.as_tensor(X))["logits"], model(torch.as_tensor(X))["logits"],
                                   atol=1e-5, rtol=0)
    pair = cb.ModelPair(model, other, example_input=X)
    aligned = pair.align(method, **({"data": (X, Y)} if method == "activation" else {}))
    np.testing.assert_array_equal(aligned.theta_b, aligned.theta_a)
    ds = cb.sweep(aligned, cb.Linear(), data=(X, Y), values=[0.0], splits=["test"])
    with torch.no_grad():
        want = F.cross_entropy(model(torch.as_tensor(X))["logits"], torch.as_tensor(Y)).item()
    assert float(ds["loss"].sel(split="test", lam=0.0).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_a_feature_point_whose_module_runs_twice_is_refused():
    models = [_model(s, shared_relu=True) for s in (0, 1)]
    pair = cb.ModelPair(*models, example_input=X)
    # activation matching refuses it as it refuses every point it cannot read (the backend's reason kept)
    with pytest.raises(cb.ConfigurationError, match="runs more than once in a forward pass.*'weight' or 'ste'"):
        pair.align("activation", data=(X, Y))
