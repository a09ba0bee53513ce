"""BatchNorm reset and REPAIR on torch models a user writes, against a reference computed by hand.

The reference (plain torch, forward hooks, statistics computed here) follows REPAIR as
Jordan et al. (2023) describe it and as ``docs/repairs.md`` defines it for the library:
every norm output (and, in a network without norms, every hidden layer's output) gets the
interpolated mean and standard deviation of the end models, a BatchNorm's running statistics
being reset first; ``reset`` is torch's own training-mode pass with ``momentum=None``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.repairs import RepairContext, get_repair
from combinability.repairs.batchnorm import repair_sites

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

BN = nn.modules.batchnorm._BatchNorm


# -- models a user writes ---------------------------------------------------------------------------------
class VGGish(nn.Module):
    """conv-BN-ReLU(inplace) and conv-ReLU-BN blocks, a max pool, flatten into the classifier."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(6, affine=affine))
        self.classifier = nn.Linear(6 * 9, 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Block(nn.Module):
    """torchvision's BasicBlock, with its 1 x 1 conv + BatchNorm downsampling shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(Block(4, 4, 1), Block(4, 6, 2))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(36, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.out(F.relu(self.bn2(self.fc2(x))))


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of each position (ConvNeXt's, REPAIR's LayerNorm ResNet's)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class NormCNN(nn.Module):
    """A LayerNorm2d and a GroupNorm(1, C) (LayerNorm over (C, H, W) with one scale per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 4, 3, padding=1), LayerNorm2d(4)
        self.c2, self.n2 = nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(1, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        return self.fc(F.relu(self.n2(self.c2(x))).mean((2, 3)))


class Plain(nn.Module):
    """No norms (REPAIR's VGG11 case): the hidden layers' outputs are corrected; ``c3`` has no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 1, bias=False)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c3(F.relu(self.c2(x))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


#: model, the hidden layers REPAIR corrects itself (no norm after them, a bias, not the logits)
MODELS = {"vggish": (VGGish, ()), "vggish_affine_false": (lambda: VGGish(affine=False), ()),
          "resnet": (ResNet, ()), "mlp_bn1d": (MLP, ()), "layernorm_cnn": (NormCNN, ()),
          "plain": (Plain, ("c1", "c2", "fc1"))}


def _data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, (n, 1, 6, 6)) + rng.normal(0.3, 0.5, (1, 1, 6, 6))).astype(np.float32)
    return x, rng.integers(0, 3, n).astype(np.int64)


def _model(make, seed: int) -> nn.Module:
    """A model with non-trivial affine parameters and running statistics (as after training)."""
    torch.manual_seed(seed)
    m = make()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, BN):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            if isinstance(mod, BN | nn.LayerNorm | nn.GroupNorm) and getattr(mod, "weight", None) is not None:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
    return m.eval()


# -- the reference ----------------------------------------------------------------------------------------
def _mix(a: nn.Module, b: nn.Module, v: dict[str, torch.Tensor]) -> nn.Module:
    out, sa, sb = copy.deepcopy(a), a.state_dict(), b.state_dict()
    out.load_state_dict({k: ((1 - v[k].double()) * sa[k].double() + v[k].double() * sb[k].double()).float()
                         if k in v else sa[k] for k in sa})
    return out.eval()


def _io(model: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of submodule ``name`` in eval mode (cloned before an in-place ReLU)."""
    got = {}
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.update(i=i[0].clone(), o=o.clone()))
    with torch.no_grad():
        model.eval()(x)
    hook.remove()
    return got["i"].double(), got["o"].double()


def _moments(t: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = t.reshape(-1, t.shape[-1]) if channels_last else t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.mean(0), t.std(0, unbiased=False)


def _sites(model: nn.Module, layers: tuple[str, ...]) -> list[str]:
    norms = [n for n, m in model.named_modules()
             if isinstance(m, BN) or (isinstance(m, nn.LayerNorm | nn.GroupNorm) and m.weight is not None)]
    order = [n for n, _ in model.named_modules()]
    return sorted(norms + list(layers), key=order.index)


def reference_repair(mid, a, b, x, layers, w) -> nn.Module:
    """REPAIR by hand: site by site in forward order; ``w[site]``: B's weight per channel (or a float)."""
    c = copy.deepcopy(mid)
    for name in _sites(c, layers):
        m = c.get_submodule(name)
        last = type(m) is nn.LayerNorm  # a LayerNorm's channels are the last axis (none here: LayerNorm2d permutes)
        (ma, sa), (mb, sb) = (_moments(_io(e, x, name)[1], last) for e in (a, b))
        wc = w[name] if isinstance(w, dict) else w
        mu_t, sd_t = (1 - wc) * ma + wc * mb, (1 - wc) * sa + wc * sb
        with torch.no_grad():
            if isinstance(m, BN):
                xin = _io(c, x, name)[0]
                mu_in, sd_in = _moments(xin, False)
                if m.weight is None:  # the running statistics are the norm's only affine map
                    var = (sd_in / sd_t) ** 2 - m.eps
                    m.running_var.copy_(var), m.running_mean.copy_(mu_in - mu_t * (var + m.eps).sqrt())
                    continue
                n = xin.numel() // xin.shape[1]
                m.running_mean.copy_(mu_in), m.running_var.copy_(sd_in**2 * n / (n - 1))
            mu_c, sd_c = _moments(_io(c, x, name)[1], last)
            r = sd_t / sd_c
            m.weight.copy_(m.weight.double() * r.reshape((-1,) + (1,) * (m.weight.ndim - 1)))
            m.bias.copy_((m.bias.double() - mu_c) * r + mu_t)
    return c


def reference_reset(model: nn.Module, x: torch.Tensor) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, BN):
            mod.reset_running_stats()
            mod.momentum = None
    with torch.no_grad():
        m.train()(x)
    return m.eval()


def _assert_state_close(got: nn.Module, want: nn.Module, atol: float = 2e-4) -> None:
    sg, sw = got.state_dict(), want.state_dict()
    for k in sw:
        if sw[k].dtype.is_floating_point:
            np.testing.assert_allclose(sg[k].numpy(), sw[k].numpy(), rtol=2e-4, atol=atol, err_msg=k)


def _pair(name: str, align: bool = False):
    make, layers = MODELS[name]
    x, _ = _data()
    pair = cb.ModelPair(_model(make, 0), _model(make, 1), example_input=torch.tensor(x[:4]))
    return (pair.align("weight", seed=0) if align else pair), layers


# -- the tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_midpoint_repair_and_reset_equal_the_hand_reference(name):
    pair, layers = _pair(name)
    x, y = _data()
    xt = torch.tensor(x)
    a, b = pair.models[0], pair.models[1]
    mid = _mix(a, b, {k: torch.tensor(0.5) for k, t in a.state_dict().items() if t.dtype.is_floating_point})
    got = pair.merge(repair="repair", repair_data=(x, y))
    want = reference_repair(mid, a, b, xt, layers, 0.5)
    _assert_state_close(got, want)
    with torch.no_grad():
        np.testing.assert_allclose(got(xt).numpy(), want(xt).numpy(), rtol=1e-3, atol=1e-3)
    if any(isinstance(m, BN) for m in a.modules()):
        _assert_state_close(pair.merge(repair="reset", repair_data=(x, y)), reference_reset(mid, xt), atol=1e-5)


def _channel_weights(v: dict[str, torch.Tensor], producer: str) -> torch.Tensor:
    """docs/repairs.md: the mean of v over the producing layer's weight row and bias entry of each channel."""
    rows = v[f"{producer}.weight"].double().reshape(v[f"{producer}.weight"].shape[0], -1)
    if f"{producer}.bias" in v:
        rows = torch.cat([rows, v[f"{producer}.bias"].double()[:, None]], 1)
    return rows.mean(1)


@pytest.mark.parametrize(("name", "producers"), [
    ("vggish", {"features.1": "features.0", "features.6": "features.4"}),
    ("resnet", {"bn1": "conv1", "layer1.0.bn1": "layer1.0.conv1", "layer1.0.bn2": "layer1.0.conv2",
                "layer1.1.bn1": "layer1.1.conv1", "layer1.1.bn2": "layer1.1.conv2",
                "layer1.1.downsample.1": "layer1.1.downsample.0"}),
    ("plain", {"c1": "c1", "c2": "c2", "fc1": "fc1"}),
])
def test_elementwise_coefficients_weigh_each_channel_by_its_producing_layer(name, producers):
    pair, layers = _pair(name, align=True)
    x, y = _data()
    a, b = pair.models[0], pair.models[1]
    rng = np.random.default_rng(3)
    layout = pair.layout
    v = rng.uniform(0, 1, layout.size).astype(np.float32)
    vd = {k: torch.tensor(t) for k, t in layout.unflatten(v).items()}
    theta = ((1 - v.astype(np.float64)) * pair.theta_a + v * pair.theta_b).astype(np.float32)
    be = pair.backend_obj
    ctx = RepairContext(be, pair.template, layout, [be.asarray(t) for t in pair.thetas], be.asarray(v),
                        _as_dataset(x, y), pair.table, {})
    repaired = be.with_state(a, {**be.state(a), **layout.unflatten(be.to_numpy(get_repair("repair")(
        be.asarray(theta), ctx)))})
    w = {site: _channel_weights(vd, producer) for site, producer in producers.items()}
    want = reference_repair(_mix(a, b, vd), a, b, torch.tensor(x), layers, w)
    _assert_state_close(repaired, want)


def _as_dataset(x: np.ndarray, y: np.ndarray):
    from combinability.data.base import ArrayDataset

    return ArrayDataset(x, y, 3, name="repair")


def test_sweep_midpoint_loss_equals_the_reference_models_loss():
    pair, layers = _pair("resnet", align=True)
    x, y = _data()
    xt, yt = _data(40, seed=1)
    a, b = pair.models[0], pair.models[1]
    mid = _mix(a, b, {k: torch.tensor(0.5) for k, t in a.state_dict().items() if t.dtype.is_floating_point})
    refs = {None: mid, "reset": reference_reset(mid, torch.tensor(x)),
            "repair": reference_repair(mid, a, b, torch.tensor(x), layers, 0.5)}
    for repair, model in refs.items():
        ds = cb.sweep(pair, cb.Linear(), data={"test": (xt, yt)}, values=[0.5], repair=repair,
                      repair_data=(x, y) if repair else None)
        with torch.no_grad():
            want = float(F.cross_entropy(model(torch.tensor(xt)), torch.tensor(yt)))
        assert float(ds["loss"].values.ravel()[0]) == pytest.approx(want, rel=1e-4, abs=1e-5), repair


def test_repair_of_a_network_without_norms_gives_back_the_ends_and_skips_layers_without_a_bias():
    pair, _ = _pair("plain")
    x, y = _data()
    sites = [n.name for n in repair_sites(pair.table)]
    assert sites == ["c1", "c2", "fc1"]  # c3: no bias; fc2: the logits
    ds = cb.sweep(pair, cb.Linear(), data={"test": (x, y)}, values=[0.0, 1.0], repair="repair", repair_data=(x, y))
    with torch.no_grad():
        for m, v in zip(pair.models, (0.0, 1.0), strict=True):
            want = float(F.cross_entropy(m(torch.tensor(x)), torch.tensor(y)))
            assert float(ds["loss"].sel(lam=v).values.ravel()[0]) == pytest.approx(want, rel=1e-4)


def test_a_network_with_nothing_to_repair_is_refused_before_any_combination():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.fc = nn.Conv2d(1, 4, 3, bias=False), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.c1(x)).mean((2, 3)))

    x, y = _data(8)
    pair = cb.ModelPair(Bare().eval(), Bare().eval(), example_input=torch.tensor(x[:4]))
    with pytest.raises(ConfigurationError, match="nothing to repair"):
        cb.sweep(pair, cb.Linear(), data={"test": (x, y)}, values=[0.5], repair="repair", repair_data=(x, y))


def test_batchnorm_without_running_statistics_is_refused_by_name():
    class NoStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.c(x))).mean((2, 3)))

    x, _ = _data(8)
    with pytest.raises(TracingError, match="track_running_stats=False"):
        cb.ModelPair(NoStats().eval(), NoStats().eval(), example_input=torch.tensor(x[:4]))


class DropoutClassifier(nn.Module):
    """A VGG classifier's ``Dropout → Linear → BatchNorm1d``: a training-mode pass would measure the norm's
    statistics on dropped-out inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.drop, self.fc, self.bn1 = nn.Dropout(0.5), nn.Linear(4 * 16, 8), nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.flatten(F.relu(self.bn(self.conv(x))), 1)
        return self.out(F.relu(self.bn1(self.fc(self.drop(h)))))


def test_reset_measures_the_statistics_with_dropout_off():
    x, y = _data()
    xt = torch.tensor(x)
    a, b = _model(DropoutClassifier, 0), _model(DropoutClassifier, 1)
    pair = cb.ModelPair(a, b, example_input=xt[:4])
    mid = _mix(a, b, {k: torch.tensor(0.5) for k, t in a.state_dict().items() if t.dtype.is_floating_point})
    want = copy.deepcopy(mid)
    for mod in want.modules():
        if isinstance(mod, BN):
            mod.reset_running_stats()
            mod.momentum = None
    want.train()
    want.drop.eval()  # the recipe with dropout off: statistics of the inputs the model sees at evaluation
    with torch.no_grad():
        want(xt)
    _assert_state_close(pair.merge(repair="reset", repair_data=(x, y)), want.eval(), atol=1e-5)
