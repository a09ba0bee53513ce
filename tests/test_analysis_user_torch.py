"""Feature-level analyses on torch models a user writes, against references from the papers' definitions.

The references run the user's own module (forward hooks, ``torch.func.functional_call``, autograd),
never the library's evaluator: LLFC (Zhou et al. 2023) is the cosine of ``f(θ_λ)`` with
``(1 − λ) f(θ_A) + λ f(θ_B)`` and its least-squares scale; the curvature of a layer-wise path
(Adilova et al.; Singh et al.) is a central difference of autograd gradients along the path,
BatchNorm's running statistics included.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

import combinability as cb  # noqa: E402
from combinability.errors import ConfigurationError, SamplerError, UnknownNameError  # noqa: E402


# -- the user's models ----------------------------------------------------------------------------
class BnNet(nn.Module):
    """A BatchNorm CNN with a residual block and one ``ReLU(inplace=True)`` module called three times."""

    def __init__(self, width: int = 6, act: str = "relu") -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True) if act == "relu" else nn.Tanh()
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(h)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyUNet(nn.Module):
    """Dense prediction ``(n, classes, H, W)`` with as many classes as rows and columns (8 on 8 × 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.down = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.up, self.dec = nn.ConvTranspose2d(8, 6, 2, stride=2), nn.Conv2d(12, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.tanh(self.enc(x))
        u = torch.tanh(self.up(torch.tanh(self.down(F.max_pool2d(e, 2)))))
        return self.out(torch.tanh(self.dec(torch.cat([u, e], 1))))


class TinyEncoder(nn.Module):
    """A transformer encoder classifier: 8 tokens of 8 features (a digit's rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x.reshape(len(x), 8, 8))).mean(1))


# -- data and training ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = cb.load_dataset("digits", "train").subset(400)
    return np.array(data.x, dtype=np.float32), np.array(data.y, dtype=np.int64)


def fit(make, x: np.ndarray, y: np.ndarray, seed: int, steps: int = 20, loss=F.cross_entropy) -> nn.Module:
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    for s in range(steps):
        idx = torch.arange(s * 32, s * 32 + 32) % len(xt)
        opt.zero_grad()
        loss(model(xt[idx]), yt[idx]).backward()
        opt.step()
    return model.eval()


# -- independent references -----------------------------------------------------------------------
def states(pair) -> tuple[nn.Module, dict, dict]:
    """The user's module and the two aligned ends' state dicts (B in A's order)."""
    a, b = pair.model(0), pair.model(1)
    return a, dict(a.state_dict()), dict(b.state_dict())


def combined(template: nn.Module, sa: dict, sb: dict, coef) -> nn.Module:
    """``template`` holding ``(1 − c) θ_A + c θ_B`` entry by entry (``coef(name) = c``); counters stay A's."""
    model = copy.deepcopy(template)
    model.load_state_dict({k: ((1 - coef(k)) * v.double() + coef(k) * sb[k].double()).to(v.dtype)
                           if v.is_floating_point() else v for k, v in sa.items()})
    return model.eval()


def hooked(model: nn.Module, x: np.ndarray, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules (a tuple's first entry), float64 copies."""
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(
        lambda _m, _i, o, n=n: out.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach().double().clone()))
        for n in names]
    model(torch.as_tensor(x))  # with autograd on: no fused fast path that skips the submodules' hooks
    for h in handles:
        h.remove()
    return out


def cosine_and_scale(f: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """Zhou et al.: mean per-example cosine of ``f`` and ``g``, and the least-squares ``c`` of ``f ≈ c g``."""
    f, g = f.reshape(len(f), -1).numpy(), g.reshape(len(g), -1).numpy()
    cos = [fi @ gi / (np.linalg.norm(fi) * np.linalg.norm(gi)) for fi, gi in zip(f, g, strict=True)]
    return float(np.mean(cos)), float(np.sum(f * g) / np.sum(g * g))


def explicit_bn(model: nn.Module) -> nn.Module:
    """A copy whose eval-mode BatchNorms are written out, so that autograd reaches the running statistics."""
    model = copy.deepcopy(model).eval()
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            def forward(self, x):
                shape = (1, -1) + (1,) * (x.dim() - 2)
                h = (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)
                return h * self.weight.view(shape) + self.bias.view(shape)
            mod.forward = types.MethodType(forward, mod)
    return model


def reference_curvature(model: nn.Module, state: dict, delta: dict, x, y, loss, eps: float = 1e-2):
    """``ΔᵀHΔ`` and ``∇Lᵀ Δ`` by a central difference of autograd gradients over every float entry."""
    model = explicit_bn(model)

    def grad(sign: float) -> dict[str, torch.Tensor]:
        leaves = {k: (v.double() + sign * eps * delta[k]).to(v.dtype).requires_grad_(True)
                  for k, v in state.items() if v.is_floating_point()}
        out = torch.func.functional_call(model, {**state, **leaves}, (torch.as_tensor(x),))
        grads = torch.autograd.grad(loss(out, torch.as_tensor(y)), list(leaves.values()), allow_unused=True)
        return {k: (torch.zeros_like(leaves[k]) if g is None else g).double()
                for k, g in zip(leaves, grads, strict=True)}

    up, down = grad(1.0), grad(-1.0)
    slope = [float((delta[k] * (up[k] - down[k])).sum()) for k in up]
    mean = [float((delta[k] * (up[k] + down[k])).sum()) / 2 for k in up]
    return sum(slope) / (2 * eps), sum(mean)


def check_layerwise_curvature(pair, groups: dict[str, list[str]], x, y, loss, rtol: float) -> None:
    """Every cumulative path's loss, curvature at both ends and slope difference against the references."""
    model, sa, sb = states(pair)
    layer = {k: next(g for g, prefixes in groups.items() if any(k.startswith(p) for p in prefixes))
             for k, v in sa.items() if v.is_floating_point()}
    ds = cb.layerwise_barriers(pair, (x, y), lambdas=[0.5], modes=["cumulative"])
    for j, name in enumerate(pair.layer_names):
        moving = {k for k, g in layer.items() if pair.layer_names.index(g) <= j}
        delta = {k: (sb[k].double() - sa[k].double()) * (k in moving) for k in layer}
        end = {k: ((v.double() + delta[k]).to(v.dtype) if v.is_floating_point() else v) for k, v in sa.items()}
        h0, s0 = reference_curvature(model, sa, delta, x, y, loss)
        h1, s1 = reference_curvature(model, end, delta, x, y, loss)
        with torch.no_grad():
            half = combined(model, sa, sb, lambda k, m=moving: 0.5 * (k in m))
            mid = loss(half(torch.as_tensor(x)), torch.as_tensor(y)).item()
        got = ds.sel(mode="cumulative", layer=name)
        np.testing.assert_allclose(float(got["loss"].sel(lam=0.5)), mid, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose([float(got["curvature_start"]), float(got["curvature_end"])], [h0, h1],
                                   rtol=rtol, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(float(got["slope_difference"]), s0 - s1, rtol=rtol, atol=1e-4, err_msg=name)


# -- the tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bn_pair(digits):
    x, y = digits
    a, b = (fit(BnNet, x, y, s) for s in (0, 1))
    return cb.ModelPair(a, b, example_input=x[:8]).align("weight", seed=0)


def test_llfc_bn_residual_inplace_relu_matches_hooks(bn_pair, digits, tmp_path):
    """Every point (the three calls of one in-place ReLU, the residual sum, the pooling) against hooks."""
    x, y = digits[0][:120], digits[1][:120]
    out = tmp_path / "llfc.nc"
    ds = cb.llfc(bn_pair, (x, y), values=[0.5], out=out)
    model, sa, sb = states(bn_pair)
    refs = []
    for lam in (0.0, 1.0, 0.5):
        m, calls = combined(model, sa, sb, lambda k, lam=lam: lam), []
        m.act.register_forward_pre_hook(lambda _m, i, c=calls: c.append(i[0].detach().double().clone()))
        m.act.register_forward_hook(lambda _m, _i, o, c=calls: c.append(o.detach().double().clone()))
        f = hooked(m, x, ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"])
        f.update(act=calls[1], act_1=calls[3], add=calls[4], act_2=calls[5])
        f["adaptive_avg_pool2d"] = f["act_2"].mean((2, 3))
        refs.append(f)
    fa, fb, fm = refs
    assert set(ds["point"].values) == set(fm)
    for p in ds["point"].values:
        cos, scale = cosine_and_scale(fm[p], 0.5 * fa[p] + 0.5 * fb[p])
        got = ds.sel(point=p, value=0.5, sample=0)
        np.testing.assert_allclose([float(got["cosine"]), float(got["scale"])], [cos, scale], rtol=1e-5, err_msg=p)
    again = cb.open_results(out)
    np.testing.assert_array_equal(again["cosine"].values, ds["cosine"].values)


def test_layerwise_curvature_counts_batchnorm_running_statistics(digits):
    """The path moves the running statistics; the curvature and slopes must differentiate along them too."""
    x, y = digits
    a, b = (fit(lambda: BnNet(act="tanh"), x, y, s) for s in (0, 1))
    pair = cb.ModelPair(a, b, example_input=x[:8]).align("weight", seed=0)
    groups = {"conv1": ["conv1.", "bn1."], "conv2": ["conv2.", "bn2."], "conv3": ["conv3.", "bn3."], "fc": ["fc."]}
    check_layerwise_curvature(pair, groups, x[:150], y[:150], F.cross_entropy, rtol=2e-3)


def test_layerwise_curvature_reads_dense_logits_as_the_evaluations_do(digits):
    """8 classes on 8 × 8 maps fit both logit layouts: the gradients must read the classes second as the
    losses are measured (a convolution makes them), not last."""
    x, y = digits
    seg = np.where(x[:, 0] > 0.3, y[:, None, None] % 7 + 1, 0).astype(np.int64)
    seg[:, 0, :] = -100  # a void row: not scored

    def loss(out, t):
        return F.cross_entropy(out, t, ignore_index=-100)

    a, b = (fit(TinyUNet, x, seg, s, loss=loss) for s in (0, 1))
    pair = cb.ModelPair(a, b, example_input=x[:8]).align("weight", seed=0)
    groups = {n: [n + "."] for n in ("enc", "down", "up", "dec", "out")}
    check_layerwise_curvature(pair, groups, x[:100], seg[:100], loss, rtol=1e-3)


def test_llfc_transformer_attention_output_is_a_feature_point(digits):
    """nn.MultiheadAttention returns ``(output, weights)``: its point is the output, as a hook reads it."""
    x, y = digits
    a, b = (fit(TinyEncoder, x, y, s) for s in (0, 1))
    pair = cb.ModelPair(a, b, example_input=x[:8]).align("weight", seed=0)
    points = ["embed", "block.self_attn", "block.linear1", "block.norm1", "block", "head"]
    ds = cb.llfc(pair, (x[:100], y[:100]), values=[0.25], points=points)
    model, sa, sb = states(pair)
    fa, fb, fm = (hooked(combined(model, sa, sb, lambda k, c=c: c), x[:100], points) for c in (0.0, 1.0, 0.25))
    for p in points:
        cos, scale = cosine_and_scale(fm[p], 0.75 * fa[p] + 0.25 * fb[p])
        got = ds.sel(point=p, value=0.25, sample=0)
        np.testing.assert_allclose([float(got["cosine"]), float(got["scale"])], [cos, scale], rtol=1e-5, err_msg=p)


def test_calibrate_matches_scipy_on_the_users_logits(bn_pair, digits, tmp_path):
    """Ito et al.: β minimises the held-out NLL of β · logits (a scipy bounded search of our own)."""
    from scipy.optimize import minimize_scalar

    x, y = digits
    held, evaluation = (x[:150], y[:150]), (x[150:300], y[150:300])
    ds = cb.calibrate(bn_pair, evaluation, lambdas=[0.5], calibration_data=held, out=tmp_path / "cal.nc")
    model, sa, sb = states(bn_pair)
    with torch.no_grad():
        z = combined(model, sa, sb, lambda k: 0.5)(torch.as_tensor(held[0])).double()

    def nll(t: float) -> float:
        return F.cross_entropy(np.exp(t) * z, torch.as_tensor(held[1])).item()

    beta = float(np.exp(minimize_scalar(nll, bounds=(np.log(1e-2), np.log(1e2)), method="bounded",
                                        options={"xatol": 1e-9}).x))
    np.testing.assert_allclose(float(ds["inverse_temperature"].sel(alignment="aligned", lam=0.5)), beta, rtol=1e-5)
    assert float(cb.open_results(tmp_path / "cal.nc")["inverse_temperature"].sel(alignment="aligned", lam=0.5)) \
        == float(ds["inverse_temperature"].sel(alignment="aligned", lam=0.5))


def test_lewc_matches_least_squares_on_hooked_features(bn_pair, digits):
    """Ito et al.'s two-term fit ``f(θ_λ) ≈ a f(θ_A) + b f(θ_B)`` at the convolutions, by numpy lstsq."""
    x, y = digits[0][:100], digits[1][:100]
    naive = bn_pair.naive
    ds = cb.lewc(naive, (x, y), lambdas=[0.5], points=["conv1", "conv2", "bn3"])
    model, sa, sb = states(naive)
    fa, fb, fm = (hooked(combined(model, sa, sb, lambda k, c=c: c), x, ["conv1", "conv2", "bn3"])
                  for c in (0.0, 1.0, 0.5))
    for p in ("conv1", "conv2", "bn3"):
        design = np.stack([fa[p].numpy().ravel(), fb[p].numpy().ravel()], 1)
        (a, b), *_ = np.linalg.lstsq(design, fm[p].numpy().ravel(), rcond=None)
        np.testing.assert_allclose([float(ds["a"].sel(point=p).squeeze()), float(ds["b"].sel(point=p).squeeze())],
                                   [a, b], rtol=1e-6, atol=1e-8, err_msg=p)


@pytest.mark.parametrize(("call", "error", "words"), [
    (lambda p, d: cb.llfc(p, d, points=["nope"]), UnknownNameError, "bn1"),
    (lambda p, d: cb.llfc(p, d, values=[1.5]), SamplerError, "1.5"),
    (lambda p, d: cb.layerwise_barriers(p, d, layers=["bn1"]), UnknownNameError, "conv1"),
    (lambda p, d: cb.layerwise_barriers(p, d, lambdas=[-0.1]), SamplerError, "-0.1"),
    (lambda p, d: cb.layerwise_barriers(p, d, step=0), ConfigurationError, "step"),
    (lambda p, d: cb.calibrate(p, d, bounds=(0, 1)), ConfigurationError, "bounds"),
    (lambda p, d: cb.lewc(p, d, lambdas=[2]), SamplerError, "[0, 1]"),
    (lambda p, d: cb.llfc(p, (d[0][:, :, :4], d[1])), ValueError, "shape"),
])
def test_bad_input_is_refused_by_name(bn_pair, digits, call, error, words):
    with pytest.raises(error, match=None) as info:
        call(bn_pair, (digits[0][:20], digits[1][:20]))
    assert words in str(info.value)
