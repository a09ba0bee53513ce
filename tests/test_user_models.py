"""Any user torch model, no plugin: traced into a layer table, its spec derived and verified.

References: specs written by hand with :class:`~combinability.SpecBuilder` for the same
networks (compared as partitions of (parameter, axis) pairs: the names differ), planted
permutations, and plain torch forward passes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ExampleInputError, IncompatibleModelsError, TracingError

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class ResCNN(nn.Module):
    """A user's BatchNorm CNN with a residual block, written with functional ops."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(h)) + x)
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def _partition(spec) -> set[frozenset]:
    return {frozenset(axes) for axes in spec.perm_to_axes.values()}


def _x(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32))


def test_derived_spec_of_a_residual_bn_cnn_is_the_hand_written_one():
    spec = cb.derive_spec(ResCNN(), _x())
    b = cb.SpecBuilder("torch").conv("conv1", None, "S").norm("bn1", "S").buffers("bn1", "S")
    b.conv("conv2", "S", "I", bias=False).norm("bn2", "I").buffers("bn2", "I")
    b.conv("conv3", "I", "S", bias=False).norm("bn3", "S").buffers("bn3", "S").dense("fc", "S", None)
    assert _partition(spec) == _partition(b.build())
    assert cb.PermutationSpec.from_json(spec.to_json()) == spec


def test_mlp_and_sequential_and_layernorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 12),
                        nn.Tanh(), nn.Linear(12, 3))
    spec = cb.derive_spec(net, torch.randn(4, 1, 4, 4))
    want = (cb.SpecBuilder("torch").dense("1", None, "A").norm("2", "A").dense("4", "A", "B").dense("6", "B", None)
            .build())
    assert _partition(spec) == _partition(want)


def test_a_planted_permutation_is_recovered_on_a_user_model():
    a = ResCNN(width=12).eval()
    table = cb.derive.describe(a, _x())
    spec = table.spec()
    state = {k: v.detach().numpy() for k, v in a.state_dict().items() if v.is_floating_point()}
    perm = cb.random_permutation(spec, state, seed=4)
    b = ResCNN(width=12).eval()
    b.load_state_dict({**a.state_dict(), **{k: torch.from_numpy(v) for k, v in
                                            cb.apply_permutation(spec, perm, state).items()}})
    with torch.no_grad():
        np.testing.assert_allclose(a(_x()).numpy(), b(_x()).numpy(), rtol=1e-4, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=_x()).align("weight", seed=0)
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)


def test_user_pair_sweeps_with_arrays_tensors_and_a_dataloader():
    digits = cb.load_dataset("digits", "test")
    a, b = ResCNN().eval(), ResCNN().eval()
    pair = cb.ModelPair(a, b, example_input=digits.x[:4]).align("weight")
    assert pair.layer_names == ["conv1", "conv2", "conv3", "fc"]
    x, y = digits.x[:200], digits.y[:200]
    kw = dict(values=[0.0, 0.5], splits=["test"])
    from_numpy = cb.sweep(pair, cb.Linear(), data=(x, y), **kw)
    from_torch = cb.sweep(pair, cb.Linear(), data=(torch.tensor(x), torch.tensor(y)), **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y)),
                                         batch_size=64)
    from_loader = cb.sweep(pair, cb.Linear(), data=loader, **kw)
    np.testing.assert_array_equal(from_numpy["loss"].values, from_torch["loss"].values)
    np.testing.assert_array_equal(from_numpy["loss"].values, from_loader["loss"].values)
    with torch.no_grad():
        logits = a(torch.tensor(x)).double()
    want = F.cross_entropy(logits, torch.tensor(y)).item()
    assert float(from_numpy["loss"].values[0, 0, 0]) == pytest.approx(want, rel=1e-5)
    assert from_numpy["loss"].dims == ("split", "lam", "sample")
    feats = cb.ModelPair(a, b, example_input=x[:4]).align("activation", data=(x, y))
    assert set(feats.permutation) == set(pair.permutation)


def test_bad_user_input_gets_the_librarys_errors():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.cumsum(self.a(x), dim=1))

    with pytest.raises(TracingError, match=r"node 'cumsum'.*cannot follow.*spec="):
        cb.derive_spec(Cumulative(), torch.randn(2, 4))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(TracingError, match="torch.fx cannot trace Branchy.*branches on the values of a tensor"):
        cb.derive_spec(Branchy(), torch.randn(2, 4))
    with pytest.raises(TracingError, match=r"example_input of shape \(2, 3, 8, 8\)"):
        cb.derive_spec(ResCNN(), torch.randn(2, 3, 8, 8))
    with pytest.raises(TracingError) as flat:  # the model's own error, alone: no transformer advice
        cb.ModelPair(ResCNN(), ResCNN(), example_input=torch.randn(2, 3 * 16 * 16))
    with pytest.raises(ExampleInputError):
        cb.derive.describe(ResCNN(), torch.randn(2, 3 * 16 * 16))
    assert str(flat.value).startswith("running ResCNN on example_input of shape (2, 768) failed: RuntimeError: ")
    assert "ShapeProp" not in str(flat.value) and "transformer" not in str(flat.value)
    with pytest.raises(IncompatibleModelsError, match=r"trace to different networks \(node '\w+' \(conv\): units 8 in "
                                                      r"A, 6 in B\)"):
        cb.ModelPair(ResCNN(width=8), ResCNN(width=6), example_input=_x())
    with pytest.raises(IncompatibleModelsError, match=r"model A is traced, but model B \(Branchy\) is not: running "):
        cb.ModelPair(ResCNN(), Branchy(), example_input=_x())
    with pytest.raises(IncompatibleModelsError, match="example_input="):
        cb.ModelPair(ResCNN(), ResCNN())
    pair = cb.ModelPair(ResCNN(), ResCNN(), example_input=_x())
    with pytest.raises(cb.DatasetError, match=r"shape \(1, 4, 4\).*\(1, 8, 8\)"):
        cb.sweep(pair, cb.Linear(), data=(np.zeros((3, 1, 4, 4), np.float32), np.zeros(3, np.int64)))


class WeightNormed(nn.Module):
    """An MLP whose first layer's weight is a parametrization: ``g * v / ||v||`` row by row."""

    def __init__(self, hook: str = "parametrization") -> None:
        super().__init__()
        if hook == "parametrization":
            self.l1 = nn.utils.parametrizations.weight_norm(nn.Linear(6, 8))
        elif hook == "spectral":
            self.l1 = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8))
        else:
            with warnings.catch_warnings():  # torch's deprecation of the hook
                warnings.simplefilter("ignore", FutureWarning)
                self.l1 = nn.utils.weight_norm(nn.Linear(6, 8))
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)))


@pytest.mark.parametrize(("hook", "held"), [("parametrization", "l1.parametrizations.weight.original0"),
                                            ("spectral", "l1.parametrizations.weight.original"),
                                            ("old hook", "l1.weight_g")])
def test_a_computed_weight_is_refused_by_layer_tables_and_a_weight_norm_derived_as_by_hand(hook, held):
    torch.manual_seed(0)
    a, b = WeightNormed(hook).eval(), WeightNormed(hook).eval()
    x, y = torch.randn(10, 6), torch.arange(10) % 3
    remedy = "remove_weight_norm" if hook == "old hook" else "remove_parametrizations"
    with pytest.raises(TracingError, match=rf"module 'l1' .* computes its weight from other tensors \(.*{held}.*"
                                           rf"{remedy}"):
        cb.derive_spec(a, x)
    if hook == "old hook":  # torch cannot copy such a module: refused by name where the library would
        with pytest.raises(cb.ConfigurationError, match="deprecated hook for its weight.*remove_weight_norm"):
            cb.get_backend("torch").with_state(a, cb.get_backend("torch").state(a))
    if hook != "parametrization":
        return
    # weight norm: permuting the units permutes the rows of g and v (each row's norm moves with it)
    spec = cb.PermutationSpec({"l1.parametrizations.weight.original0": ("P", None),
                               "l1.parametrizations.weight.original1": ("P", None), "l1.bias": ("P",),
                               "l2.weight": (None, "P")})
    derived = cb.ModelPair(a, b, example_input=x).spec  # traced with the weight as computed (test_weight_norm.py)
    assert {k: tuple("P" if e == "P_l1" else e for e in v) for k, v in derived.axes_to_perm.items()} == \
        {**spec.axes_to_perm, "l2.bias": (None,)}
    pair = cb.ModelPair(a, b, example_input=x, spec=spec).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip((a, b), (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


def test_a_wrong_spec_is_caught_by_the_verification_and_named():
    from combinability.derive import verify_spec

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    wrong = cb.SpecBuilder("torch").dense("0", None, "H0").dense("2", "H0", "H1").dense("4", None, None).build()
    with pytest.raises(TracingError, match=r"permuting H1 binds 2.weight axis 0, 2.bias axis 0"):
        verify_spec(cb.get_backend("torch"), net, wrong, torch.randn(8, 4))


MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))
'''


def test_cli_sweeps_plain_state_dicts_of_a_user_class(tmp_path, monkeypatch, capsys):
    from combinability.cli import main
    from combinability.models import load_into

    (tmp_path / "usernets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import usernets

    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(usernets.Net().state_dict(), tmp_path / f"net{seed}.pt")
    digits = cb.load_dataset("digits", "test")
    np.savez(tmp_path / "mine.npz", x_test=digits.x[:100], y_test=digits.y[:100])
    assert main(["sweep", "net0.pt", "net1.pt", "--model", "usernets:Net", "--data", "mine.npz", "--sampler",
                 "linear", "--values", "0,0.5,1", "--naive", "--out", "lin.nc", "--quiet"]) == 0
    ds = cb.open_results("lin.nc")
    net0 = usernets.Net().eval()
    net0.load_state_dict(torch.load(tmp_path / "net0.pt"))
    with torch.no_grad():
        want = F.cross_entropy(net0(torch.tensor(digits.x[:100])).double(), torch.tensor(digits.y[:100]))
    assert float(ds["loss_a"].sel(alignment="aligned", split="test")) == pytest.approx(want.item(), rel=1e-5)
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    capsys.readouterr()
    assert main(["sweep", "net0.pt", "other.pt", "--model", "usernets:Net", "--data", "mine.npz", "--quiet"]) == 1
    assert "other.pt does not fit Net" in capsys.readouterr().err
    with pytest.raises(IncompatibleModelsError, match=r"unknown names \['weight', 'bias'\]"):
        load_into(usernets.Net(), tmp_path / "other.pt")


def test_layer_based_experiments_and_figures_use_the_traced_layers(tmp_path):
    """Stitching, §6.3 robustness and edge lengths run on a user pair, with the traced layer order."""
    from combinability import experiments as ex
    from combinability import plots

    digits = cb.load_dataset("digits", "test")
    data = {"test": (digits.x[:120], digits.y[:120])}
    pair = cb.ModelPair(ResCNN(), ResCNN(), example_input=digits.x[:4]).align("weight")
    stitched = ex.identity_stitching(pair, data=data, splits=["test"])
    assert stitched["layer"].values.tolist() == [0, 1, 2, 3, 4]  # before conv1 .. after fc: 4 traced layers
    assert stitched.attrs["layer_names"] == "conv1, conv2, conv3, fc"
    edges = ex.edge_lengths(pair)
    assert edges["layer_name"].values.tolist() == ["conv1", "conv2", "conv3", "fc"]
    robust = ex.alignment_robustness(pair, data=cb.data.ArrayDataset(digits.x[:120], digits.y[:120], 10),
                                     steps=2, lambdas=(0.5,))
    assert set(robust["permutation"].values) == set(pair.permutation)
    as_arrays = ex.alignment_robustness(pair, data=(digits.x[:120], digits.y[:120]), steps=2, lambdas=(0.5,))
    np.testing.assert_array_equal(as_arrays["loss_barrier"].values, robust["loss_barrier"].values)
    plots.plot_sweep(stitched, tmp_path / "stitch.png")
    plots.plot_edge_lengths(edges, tmp_path / "edges.png")
    assert (tmp_path / "stitch.png").stat().st_size > 10_000 and (tmp_path / "edges.png").stat().st_size > 10_000


class TiedAutoencoder(nn.Module):
    """An encoder and a decoder sharing one weight tensor (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
        self.mid, self.out = nn.Linear(6, 8), nn.Linear(8, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(self.out(torch.relu(self.mid(self.enc(x)))))


def _tied_autoencoder_loss(params, x, y):
    """Plain numpy forward pass of :class:`TiedAutoencoder`: the decoder reads the encoder's weight."""
    e = params["enc.weight"]
    h = np.maximum((x @ e.T) @ params["mid.weight"].T + params["mid.bias"], 0)
    logits = (h @ params["out.weight"].T + params["out.bias"]) @ e.T
    logits = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]))


def test_tied_weights_are_combined_once_and_stay_tied():
    torch.manual_seed(0)
    models = [TiedAutoencoder() for _ in range(2)]
    x, y = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32), np.arange(20) % 6
    with pytest.raises(TracingError, match="ties dec.weight to enc.weight"):
        cb.derive_spec(models[0], x)  # a layer table cannot express the tie; the feature spaces can
    pair = cb.ModelPair(*models, example_input=x)
    assert "dec.weight" not in pair.layout.names and "enc.weight" in pair.layout.names
    # the encoder reads the input, the decoder writes the output: the tie fixes both of its axes
    assert pair.spec.axes_to_perm["enc.weight"] == (None, None)
    assert set(pair.spec.perm_to_axes) == {"P_mid"}
    ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 0.3, 1.0], splits=["test"])
    a, b = ({k: v.detach().numpy().astype(np.float64) for k, v in m.named_parameters()} for m in models)
    for lam in (0.0, 0.3, 1.0):
        want = _tied_autoencoder_loss({k: (1 - lam) * a[k] + lam * b[k] for k in a}, x.astype(np.float64), y)
        assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)
    merged = pair.merge()  # the native model: still one tensor under both names, at the pair's mean
    assert merged.dec.weight is merged.enc.weight
    np.testing.assert_allclose(merged.dec.weight.detach().numpy(), (a["enc.weight"] + b["enc.weight"]) / 2, atol=1e-6)
    with torch.no_grad():
        out = merged(torch.as_tensor(x)).numpy()
    mean = {k: (a[k] + b[k]) / 2 for k in a}
    h = np.maximum((x @ mean["enc.weight"].T) @ mean["mid.weight"].T + mean["mid.bias"], 0)
    np.testing.assert_allclose(out, (h @ mean["out.weight"].T + mean["out.bias"]) @ mean["enc.weight"].T, atol=1e-5)


def test_activation_matching_reads_a_traced_neuron_space_where_its_layer_opened_it():
    torch.manual_seed(1)
    a, b = TiedAutoencoder(), TiedAutoencoder()
    planted = np.random.default_rng(2).permutation(8)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # B: A's hidden units in the planted order (index arithmetic written out)
        b.mid.weight.copy_(a.mid.weight[planted]), b.mid.bias.copy_(a.mid.bias[planted])
        b.out.weight.copy_(a.out.weight[:, planted])
    x, y = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32), np.arange(64) % 6
    pair = cb.ModelPair(a, b, example_input=x)
    assert pair.feature_points == {"P_mid": "mid"}  # the layer that opened the space (was: no point, an error)
    aligned = pair.align("activation", data=(x, y), examples=64)
    np.testing.assert_array_equal(aligned.permutation["P_mid"], np.argsort(planted))
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-7)


def _three_class_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random float32 inputs of 10 features and labels of 3 classes."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 10)).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_a_model_in_another_precision_runs_as_its_float32_copy(dtype):
    """A bfloat16 (a Hugging Face checkpoint loaded with torch_dtype) or float64 module: traced, aligned and
    swept as its float32 copy (the library's inputs are float32), which torch computes the same."""
    nn, F = torch.nn, torch.nn.functional
    x, y = _three_class_data(40)

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 3)).to(getattr(torch, dtype)).eval()

    a, b = make(0), make(1)
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    assert pair.table is not None and next(a.parameters()).dtype == getattr(torch, dtype)  # the user's model as it was
    aligned = pair.model_b
    assert next(aligned.parameters()).dtype == torch.float32
    with torch.no_grad():
        xt = torch.tensor(x)
        np.testing.assert_allclose(aligned(xt).numpy(), b.float()(xt).numpy(), rtol=1e-5, atol=1e-6)
        own = [float(F.cross_entropy(m.float()(xt), torch.tensor(y))) for m in (make(0), make(1))]
    result = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0])
    np.testing.assert_allclose(result["loss"].values.ravel(), own, rtol=1e-5)


@pytest.mark.parametrize("wrapper", ["compile", "dataparallel"])
def test_a_wrapped_model_is_the_module_it_runs(wrapper):
    """``torch.compile(model)`` and ``nn.DataParallel(model)`` (as a training script leaves them): the pair holds
    the module they run, under its own names, and the sweep's ends are the wrapped models' losses."""
    nn, F = torch.nn, torch.nn.functional
    x, y = _three_class_data(24)

    def make(seed):
        torch.manual_seed(seed)
        inner = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
        return inner, (torch.compile(inner) if wrapper == "compile" else nn.DataParallel(inner))

    (inner_a, a), (inner_b, b) = make(0), make(1)
    pair = cb.ModelPair(a, b, example_input=x[:4])
    assert pair.models[0] is inner_a and pair.layout.names[0] == "0.weight"
    with torch.no_grad():
        own = [float(F.cross_entropy(m(torch.tensor(x)), torch.tensor(y))) for m in (inner_a, inner_b)]
    result = cb.sweep(pair.align("weight"), cb.Linear(), data=(x, y), values=[0.0, 1.0])
    np.testing.assert_allclose(result["loss"].values.ravel(), own, rtol=1e-5)
