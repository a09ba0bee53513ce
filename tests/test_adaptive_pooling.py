"""Adaptive average pooling to an image (``nn.AdaptiveAvgPool2d((7, 7))``, torchvision's VGG and
AlexNet) in layer tables and traced user models, then flattened into the classifier.

References: a numpy adaptive pooling written with torch's window rule, both backends' table
forward passes against it (channel-by-channel and position-by-position flattens), and a
torchvision-style VGG whose planted permutation weight matching undoes, checked by torch itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.layers import LayerTable, Node
from tests.model_checks import table_logits
from tests.reference_nets import conv2d_general, relu


def adaptive_avg_pool(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """NCHW adaptive average pooling: output cell (i, j) averages rows floor(i h / oh) .. ceil((i + 1) h / oh)."""
    n, c, h, w = x.shape
    out = np.empty((n, c, *size), x.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            rows = slice(math.floor(i * h / size[0]), math.ceil((i + 1) * h / size[0]))
            cols = slice(math.floor(j * w / size[1]), math.ceil((j + 1) * w / size[1]))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


def _table(channels_last: bool) -> LayerTable:
    return LayerTable("adaptive", (2, 7, 5), 4, (
        Node("conv", "conv", units=3, kernel=3, padding=1),
        Node("act", "relu"),
        Node("pool", "avgpool", output_size=(3, 2)),  # uneven, overlapping windows on 7 x 5
        Node("flat", "flatten", channels_last=channels_last),
        Node("fc", "dense", units=4),
    ))


@pytest.mark.parametrize("channels_last", [False, True], ids=["c-h-w", "h-w-c"])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_pool_adaptively_and_flatten_in_the_tables_order(backend, channels_last):
    pytest.importorskip(backend)
    table = _table(channels_last)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in table.parameters().items()}
    x = rng.normal(size=(3, 2, 7, 5)).astype(np.float32)
    pooled = adaptive_avg_pool(relu(conv2d_general(x, params["conv.weight"], params["conv.bias"], (1, 1),
                                                   ((1, 1), (1, 1)), (1, 1), 1)), (3, 2))
    flat = (pooled.transpose(0, 2, 3, 1) if channels_last else pooled).reshape(3, -1)
    want = flat @ params["fc.weight"].T + params["fc.bias"]
    np.testing.assert_allclose(table_logits(backend, table, params, x), want, rtol=1e-4, atol=1e-5)
    assert table.spec().axes_to_perm["fc.weight"] == (None, cb.Repeat("P_conv", 6, channels_last))  # logits fixed


def test_bad_output_sizes_are_refused():
    with pytest.raises(ConfigurationError, match=r"output_size is an avgpool or upsample node's output size, one int"):
        Node("p", "avgpool", output_size=(0, 2))
    with pytest.raises(ConfigurationError, match="output_size"):
        Node("p", "maxpool", kernel=2, output_size=(2, 2))


torch = pytest.importorskip("torch")
nn = torch.nn


class VGG(nn.Module):
    """torchvision's VGG-BN layout, narrowed: features, ``AdaptiveAvgPool2d((7, 7))``, ``flatten``, classifier."""

    def __init__(self) -> None:
        super().__init__()
        layers, c = [], 3
        for v in (8, "M", 16, "M", 16, 16, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features, self.avgpool = nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(c * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_a_torchvision_style_vgg_permutes_every_conv_and_a_planted_permutation_is_undone():
    torch.manual_seed(0)
    model = VGG()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    model.eval()
    x = np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype(np.float32)  # a 2 x 2 map, pooled to 7 x 7
    spec = cb.derive_spec(model, x)
    assert spec.axes_to_perm["classifier.0.weight"] == ("P_classifier.0", cb.Repeat("P_features.11", 49))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=2), state)
    other = VGG()
    other.load_state_dict({k: torch.as_tensor(v) for k, v in moved.items()})
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(torch.as_tensor(x)), model(torch.as_tensor(x)), atol=1e-5, rtol=0)
    pair = cb.ModelPair(model, other, example_input=x).align("weight")
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)
