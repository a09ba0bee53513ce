"""Global and adaptive max pooling: layer-table nodes (``avgpool`` with ``fn="max"``) on both backends
against numpy, and users' torch models that pool by ``nn.AdaptiveMaxPool2d``, ``F.adaptive_max_pool2d``
(fastai's concat pooling, the maximum beside the mean), ``amax`` over the positions, adaptively to a
small map that is then flattened, or by ``torch.max(x, 2)[0]`` over a point cloud (PointNet) and
``x.max(dim=-1).values`` over a sequence.

References: a plain numpy forward pass with torch's adaptive windows, and the user's module run in
float64 with a random transformation of the derived spec, which weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import assert_random_transformation_undone, randomise_batchnorms, randomised, table_logits
from tests.reference_nets import conv2d_general

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


def _adaptive_max(h: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(n, c, H, W)`` to ``(n, c, *size)``: output ``(i, j)`` is the maximum of rows ``floor(i H / h)`` to
    ``ceil((i + 1) H / h)`` and the same for columns (torch's windows)."""
    rows, cols = h.shape[2:]
    out = np.empty((*h.shape[:2], *size), h.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            r0, r1 = i * rows // size[0], -(-(i + 1) * rows // size[0])
            c0, c1 = j * cols // size[1], -(-(j + 1) * cols // size[1])
            out[:, :, i, j] = h[:, :, r0:r1, c0:c1].max(axis=(2, 3))
    return out


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A 3 x 3 convolution with padding 1, channels-first (the tests' numpy reference)."""
    return conv2d_general(x, w, b, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)


TABLE = LayerTable("max-pools", (2, 7, 5), 3, (
    Node("c1", "conv", units=4, kernel=3, padding=1), Node("r1", "relu"),
    Node("grid", "avgpool", output_size=(3, 2), fn="max"), Node("flat", "flatten"), Node("fc", "dense", units=4),
    Node("c2", "conv", inputs=("r1",), units=4, kernel=3, padding=1),
    Node("gmax", "avgpool", inputs=("c2",), fn="max"),
    Node("sum", "add", inputs=("fc", "gmax")), Node("head", "dense", units=3)))


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(_conv(x, p["c1.weight"], p["c1.bias"]), 0)
    grid = _adaptive_max(h, (3, 2)).reshape(len(x), -1) @ p["fc.weight"].T + p["fc.bias"]
    gmax = _conv(h, p["c2.weight"], p["c2.bias"]).max(axis=(2, 3))
    return (grid + gmax) @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_max_pooling_nodes_match_numpy_on_both_backends(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, (shape, _) in TABLE.parameters().items()}
    x = rng.normal(size=(3, 2, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)


def test_a_pooling_node_refuses_an_unknown_function_naming_the_valid_ones():
    with pytest.raises(ConfigurationError, match=r"the fn of avgpool nodes is one of '', 'max', got 'min'"):
        Node("p", "avgpool", fn="min")
    with pytest.raises(ConfigurationError, match=r"the fn of maxpool nodes is one of '', 'avg', got 'max'"):
        Node("p", "maxpool", kernel=2, stride=2, fn="max")


class MaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveMaxPool2d(1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.c2(F.relu(self.c1(x))))).flatten(1))


class ConcatPool(nn.Module):
    """fastai's AdaptiveConcatPool2d head: the maximum and the mean of each channel side by side."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(torch.cat([F.adaptive_max_pool2d(h, 1), F.adaptive_avg_pool2d(h, 1)], 1).flatten(1))


class Amax(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).amax(dim=(2, 3)))


class GridMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveMaxPool2d((3, 2)), nn.Linear(6 * 6, 3)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.c2(F.relu(self.c1(x))))).flatten(1))


class PointNet(nn.Module):
    """PointNet's shared per-point layers (1 x 1 convolutions over ``(n, 3, points)``) and its max over the points."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv1d(3, 6, 1), nn.BatchNorm1d(6)
        self.c2, self.bn2, self.fc = nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        return self.fc(torch.max(x, 2, keepdim=True)[0].view(-1, 6))


class MaxValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(3, 6, 3), nn.Conv1d(6, 6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).max(dim=-1).values)


@pytest.mark.parametrize("cls, fns", [(MaxHead, ["max"]), (ConcatPool, ["max", ""]), (Amax, ["max"]),
                                      (GridMax, ["max"]), (PointNet, ["max"]), (MaxValues, ["max"])])
def test_users_max_pooled_cnns_are_traced_and_a_transformation_undone(cls, fns):
    model = randomise_batchnorms(randomised(cls(), 0))
    x = torch.randn(4, 3, 9) if cls in (PointNet, MaxValues) else torch.randn(4, 1, 7, 5)
    table = cb.derive.describe(model, x)
    assert [n.fn for n in table.nodes if n.op == "avgpool"] == fns
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, table.spec(), state, x, "c2.weight")


class WithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.pool, self.fc = nn.Conv2d(1, 4, 3), nn.AdaptiveMaxPool2d(1, return_indices=True), nn.Linear(4, 3)

    def forward(self, x):
        pooled, _ = self.pool(self.c1(x))
        return self.fc(pooled.flatten(1))


class IndexFed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv1d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c1(x)).max(dim=-1).indices.float())


def test_max_pooling_that_returns_indices_is_refused_by_name():
    with pytest.raises(TracingError, match=r"return_indices=True"):
        cb.derive_spec(WithIndices(), torch.randn(2, 1, 6, 6))
    with pytest.raises(TracingError, match=r"the positions of the maxima \(indices\) feed the logits"):
        cb.derive.describe(IndexFed(), torch.randn(2, 3, 8))
