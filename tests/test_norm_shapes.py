"""Normalisation layers of every shape users write in torch CNNs and MLPs (``combinability_torch.trace_norms``).

Independent references: the user's own module in float64 with its hidden channels permuted by hand (the
permutation written out per model below, not read from the library) computes the same function; the derived
spec binds exactly those axes; weight matching undoes that permutation planted in a copy; a sweep's end losses
are torch's own cross-entropy of each model; and the layer tables' own models of the new norm kinds compute
as numpy does.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.layers import LayerTable, Node
from tests.model_checks import table_logits

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class MyGroupNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.group_norm(x, 2, self.weight, self.bias, 1e-5)


class MyLayerNorm(MyGroupNorm):
    def forward(self, x):
        return F.layer_norm(x, (self.weight.shape[0],), self.weight, self.bias)


class MyBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False)


class MapNorms(nn.Module):
    """LayerNorm over each example's whole map: affine, without bias, and functional without parameters."""

    def __init__(self, c: int = 4, hw: int = 5) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(2, c, 3, padding=1), nn.LayerNorm([c, hw, hw])
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.LayerNorm([c, hw, hw], bias=False)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)))
        h = F.relu(F.layer_norm(self.n2(self.c2(h)), h.shape[1:]))
        return self.fc(h.mean((2, 3)))

    spaces = ({"c1.weight": 0, "c1.bias": 0, "n1.weight": 0, "n1.bias": 0, "c2.weight": 1},
              {"c2.weight": 0, "c2.bias": 0, "n2.weight": 0, "fc.weight": 1})


class Functional(nn.Module):
    """F.group_norm, F.batch_norm, F.normalize and F.layer_norm on modules' own parameters and buffers, and a
    ConvNeXt-style LayerNorm on channels-last maps."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(2, c, 3, padding=1), MyGroupNorm(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), MyBatchNorm(c)
        self.c3, self.ln3 = nn.Conv2d(c, c, 1), nn.LayerNorm(c)
        self.bn3 = nn.BatchNorm2d(c, momentum=None)
        self.fc1, self.ln = nn.Linear(c, 6), MyLayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.g1(self.c1(x)))
        h = F.normalize(F.relu(self.b2(self.c2(h))), dim=1)
        h = self.ln3(self.c3(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.relu(self.bn3(h)).mean((2, 3))
        return self.fc(F.relu(self.ln(self.fc1(h))))

    spaces = ({"c1.weight": 0, "c1.bias": 0, "g1.weight": 0, "g1.bias": 0, "c2.weight": 1},
              {"c2.weight": 0, "c2.bias": 0, "b2.weight": 0, "b2.bias": 0, "b2.running_mean": 0,
               "b2.running_var": 0, "c3.weight": 1},
              {"c3.weight": 0, "c3.bias": 0, "ln3.weight": 0, "ln3.bias": 0, "bn3.weight": 0, "bn3.bias": 0,
               "bn3.running_mean": 0, "bn3.running_var": 0, "fc1.weight": 1},
              {"fc1.weight": 0, "fc1.bias": 0, "ln.weight": 0, "ln.bias": 0, "fc.weight": 1})


class MLPNorms(nn.Module):
    """LayerNorm without bias, RMSNorm, LayerNorm without parameters and F.normalize on vectors."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc1, self.n1 = nn.Linear(10, d), nn.LayerNorm(d, bias=False)
        self.fc2, self.n2 = nn.Linear(d, d), nn.RMSNorm(d)
        self.fc3, self.n3 = nn.Linear(d, d), nn.LayerNorm(d, elementwise_affine=False)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        h = F.relu(self.n1(self.fc1(x)))
        h = F.relu(self.n2(self.fc2(h)))
        h = F.normalize(F.relu(self.n3(self.fc3(h))), dim=1) * 3
        return self.fc(h)

    spaces = ({"fc1.weight": 0, "fc1.bias": 0, "n1.weight": 0, "fc2.weight": 1},
              {"fc2.weight": 0, "fc2.bias": 0, "n2.weight": 0, "fc3.weight": 1},
              {"fc3.weight": 0, "fc3.bias": 0, "fc.weight": 1})


CASES = {"map": (MapNorms, (2, 5, 5)), "functional": (Functional, (2, 5, 5)), "mlp": (MLPNorms, (10,))}


def _model(cls, seed: int):
    """A model with every parameter drawn from ``seed`` (norm scales around 1) and positive running variances."""
    torch.manual_seed(seed)
    model = cls()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = name.split(".")[0][0] in "nglb" and name.endswith("weight")  # the norms' weights
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if scale else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _permutation(n: int, rng: np.random.Generator, groups: int = 1) -> np.ndarray:
    """A random permutation of ``n`` channels moving ``groups`` blocks whole and the channels within each."""
    size = n // groups
    return np.concatenate([g * size + rng.permutation(size) for g in rng.permutation(groups)])


def _permuted(model, spaces, seed: int = 3):
    """A copy of ``model`` with each hidden space's channels permuted by hand (GroupNorm's space by blocks)."""
    rng = np.random.default_rng(seed)
    out, state = copy.deepcopy(model), model.state_dict()
    moved = dict(state)
    for space in spaces:
        n = state[next(iter(space))].shape[space[next(iter(space))]]
        perm = torch.as_tensor(_permutation(n, rng, 2 if "g1.weight" in space else 1))
        for name, axis in space.items():
            moved[name] = moved[name].index_select(axis, perm)
    out.load_state_dict(moved)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_hand_permutation_keeps_the_function_and_is_the_derived_spec(case):
    cls, shape = CASES[case]
    a = _model(cls, 0)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    b = _permuted(a, cls.spaces)
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    with torch.no_grad():
        assert not torch.allclose(a.state_dict()["fc.weight"], b.state_dict()["fc.weight"])
        torch.testing.assert_close(b64(x.double()), a64(x.double()), rtol=1e-10, atol=1e-10)
    spec = cb.derive_spec(a, x)
    derived = sorted(sorted(axes) for axes in spec.perm_to_axes.values())
    assert derived == sorted(sorted(space.items()) for space in cls.spaces)
    pair = cb.ModelPair(a, b, example_input=x).align("weight", seed=0)
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_sweep_end_losses_are_torchs_cross_entropy_of_each_model(case):
    cls, shape = CASES[case]
    a, b = _model(cls, 0), _model(cls, 1)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(2))
    y = torch.arange(40) % 3
    pair = cb.ModelPair(a, b, example_input=x[:8]).align("weight", seed=0)
    data = (x.numpy(), y.numpy())
    loss = cb.sweep(pair, cb.Linear(), data=data, values=[0, 1], splits=["test"])["loss"].values.ravel()
    with torch.no_grad():
        expected = [float(F.cross_entropy(m(x), y)) for m in (a, b)]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    if case == "map":  # REPAIR corrects each channel of the whole-map LayerNorm: the ends stay the models
        repaired = cb.sweep(pair, cb.Linear(), data=data, values=[0, 0.5, 1], splits=["test"], repair="repair",
                            repair_data=data)["loss"].values.ravel()
        np.testing.assert_allclose(repaired[[0, 2]], expected, rtol=1e-4)
        assert np.isfinite(repaired[1])
        with pytest.raises(cb.errors.ConfigurationError, match="no BatchNorm"):
            cb.sweep(pair, cb.Linear(), data=data, values=[0], repair="reset", repair_data=data)


def test_norm_shapes_without_a_permutation_symmetry_in_the_table_are_refused_saying_why():
    x = torch.randn(2, 2, 5, 5)

    class Net(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.c, self.n, self.fc = nn.Conv2d(2, 4, 3, padding=1), norm, nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.n(self.c(x)).mean((2, 3)))

    with pytest.raises(TracingError, match="order is part of the function"):
        cb.derive_spec(Net(nn.LocalResponseNorm(3)).eval(), x)
    with pytest.raises(TracingError, match="shared by every channel"):
        cb.derive_spec(Net(nn.LayerNorm([5, 5])).eval(), x)

    class RootOwned(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
            self.weight, self.bias = nn.Parameter(torch.ones(4, 5, 5)), nn.Parameter(torch.zeros(4, 5, 5))

        def forward(self, x):
            return self.fc(F.layer_norm(self.c(x), (4, 5, 5), self.weight, self.bias).mean((2, 3)))

    with pytest.raises(TracingError, match="keep the norm's in a submodule"):
        cb.derive_spec(RootOwned().eval(), x)

    class BatchStats(MyBatchNorm):
        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True)

    with pytest.raises(TracingError, match="statistics of each batch"):
        cb.derive_spec(Net(BatchStats(4)).eval(), x)


# -- the tables' own models of the new norm kinds ------------------------------------------------------
TABLE = LayerTable("norm-kinds", (2, 4, 4), 3, (
    Node("c1", "conv", units=3, kernel=3, padding=1),
    Node("m1", "norm", norm="layernorm_map"),
    Node("c2", "conv", units=3, kernel=1),
    Node("m2", "norm", norm="layernorm_map", bias=False),
    Node("l2", "norm", norm="l2norm", affine=False),
    Node("pool", "avgpool"),
    Node("fc1", "dense", units=5),
    Node("r1", "norm", norm="rmsnorm"),
    Node("fc2", "dense", units=5),
    Node("ln", "norm", norm="layernorm", bias=False),
    Node("fc3", "dense", units=3),
))


def _reference(p, x):
    def conv(name, h, k):
        w, pad = p[f"{name}.weight"], k // 2
        h = np.pad(h, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        n, _, hh, ww = h.shape
        out = np.zeros((n, w.shape[0], hh - k + 1, ww - k + 1))
        for i in range(k):
            for j in range(k):
                out += np.einsum("ncxy,oc->noxy", h[:, :, i:i + out.shape[2], j:j + out.shape[3]], w[:, :, i, j])
        return out + p[f"{name}.bias"][None, :, None, None]

    def whole(h, name):
        mu, var = h.mean(axis=(1, 2, 3), keepdims=True), h.var(axis=(1, 2, 3), keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * p[f"{name}.weight"] + p.get(f"{name}.bias", 0)

    h = whole(conv("c1", x, 3), "m1")
    h = whole(conv("c2", h, 1), "m2")
    h = (h / np.maximum(np.sqrt((h ** 2).sum(axis=1, keepdims=True)), 1e-5)).mean(axis=(2, 3))
    h = h @ p["fc1.weight"].T + p["fc1.bias"]
    h = h / np.sqrt((h ** 2).mean(axis=1, keepdims=True) + 1e-5) * p["r1.weight"]
    h = h @ p["fc2.weight"].T + p["fc2.bias"]
    h = (h - h.mean(axis=1, keepdims=True)) / np.sqrt(h.var(axis=1, keepdims=True) + 1e-5) * p["ln.weight"]
    return h @ p["fc3.weight"].T + p["fc3.bias"]


def test_the_new_norm_kinds_bind_their_parameters_along_the_channels():
    params, spec = TABLE.parameters(), TABLE.spec()
    assert params["m1.weight"][0] == params["m1.bias"][0] == (3, 4, 4)
    assert "m2.bias" not in params and "r1.bias" not in params and "ln.bias" not in params
    assert not any(k.startswith("l2.") for k in params)
    assert spec.axes_to_perm["m1.weight"] == ("P_c1", None, None) and spec.axes_to_perm["r1.weight"] == ("P_fc1",)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_build_the_new_norm_kinds_as_numpy_computes_them(backend):
    pytest.importorskip(backend)
    rng = np.random.default_rng(0)
    params = {k: (rng.normal(0, 0.6, shape) + (1.0 if k.endswith("weight") and k[:2] in ("m1", "m2", "r1", "ln")
                                                 else 0.0)).astype(np.float32)
              for k, (shape, _) in TABLE.parameters().items()}
    x = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(table_logits(backend, TABLE, params, x), _reference(params, x), rtol=1e-4, atol=1e-4)
