"""A feature map flattened into a dense layer (``conv → flatten → fc``): the dense layer's input
axis repeats each channel of the last conv over its positions (:class:`combinability.Repeat`),
so that conv's channels are permuted (they were left in place).

References: index arithmetic written out by hand (torch's channel-by-channel ``flatten``, flax's
position-by-position reshape), a Kronecker product for an orthogonal map, the plain Git Re-Basin
algorithm on the split spec, finite differences, and the models' own forward passes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import combinability as cb
from combinability.align.sinkhorn import one_hot, sinkhorn, soft_apply, soft_apply_grad
from combinability.errors import PermutationSpecError
from combinability.kinds import Orthogonal, random_orthogonal
from combinability.permutation import Repeat, split_repeats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_rebasin as rebasin  # noqa: E402

C, T, H = 3, 4, 5  # channels, positions per channel, dense units


def _spec(interleaved=False):
    return cb.PermutationSpec({"conv.weight": ("C", None), "conv.bias": ("C",),
                               "fc.weight": ("H", Repeat("C", T, interleaved)), "fc.bias": ("H",),
                               "out.weight": (None, "H")})


def _params(rng):
    return {"conv.weight": rng.normal(size=(C, 2)), "conv.bias": rng.normal(size=C),
            "fc.weight": rng.normal(size=(H, C * T)), "fc.bias": rng.normal(size=H),
            "out.weight": rng.normal(size=(2, H))}


@pytest.mark.parametrize("interleaved", [False, True], ids=["channel-by-channel", "position-by-position"])
def test_a_repeated_axis_moves_each_channels_positions_together(interleaved):
    spec = _spec(interleaved)
    params = _params(np.random.default_rng(0))
    perm = {"C": np.array([2, 0, 1]), "H": np.arange(H)[::-1].copy()}
    out = cb.apply_permutation(spec, perm, params)
    fc = params["fc.weight"][perm["H"]]
    want = np.empty_like(fc)
    for c in range(C):
        for t in range(T):
            new, old = (t * C + c, t * C + perm["C"][c]) if interleaved else (c * T + t, perm["C"][c] * T + t)
            want[:, new] = fc[:, old]
    np.testing.assert_array_equal(out["fc.weight"], want)
    np.testing.assert_array_equal(out["conv.weight"], params["conv.weight"][perm["C"]])
    assert cb.PermutationSpec.from_json(spec.to_json()) == spec and not spec.is_plain
    assert spec.perm_sizes(params) == {"C": C, "H": H} and spec.repeats == {"C": [("fc.weight", 1, T)]}
    back = cb.apply_permutation(spec, cb.invert_permutation(perm), out)
    np.testing.assert_array_equal(back["fc.weight"], params["fc.weight"])


def test_an_orthogonal_map_acts_on_every_position_of_a_repeated_axis():
    spec = cb.PermutationSpec({"fc.weight": (None, Repeat("R", T))}, kinds={"R": Orthogonal()})
    w = np.random.default_rng(1).normal(size=(2, C * T))
    q = random_orthogonal(C, np.random.default_rng(2))
    out = cb.apply_permutation(spec, {"R": q}, {"fc.weight": w})["fc.weight"]
    np.testing.assert_allclose(out, w @ np.kron(q, np.eye(T)).T, atol=1e-12)  # (Q ⊗ I) on the channel blocks


def test_repeated_axes_of_the_wrong_size_and_bad_entries_are_refused():
    params = _params(np.random.default_rng(0))
    params["fc.weight"] = params["fc.weight"][:, :-1]
    with pytest.raises(PermutationSpecError, match=r"'fc.weight' axis 1 has size 11, but it repeats each of the 3 "
                                                   r"units of 'C' 4 times \(12\)"):
        _spec().validate(params)
    with pytest.raises(PermutationSpecError, match="Repeat.times must be a positive int"):
        Repeat("C", 0)
    with pytest.raises(PermutationSpecError, match="or a Repeat"):
        cb.PermutationSpec({"w": ({"repeat": "C"},)})


@pytest.mark.parametrize("interleaved", [False, True])
def test_weight_matching_on_a_repeated_axis_takes_the_reference_algorithms_steps(interleaved):
    rng = np.random.default_rng(3)
    spec = _spec(interleaved)
    a, b = _params(rng), _params(rng)
    plain, a_split, b_split = split_repeats(spec, a, b)
    assert plain.is_plain and plain.axes_to_perm["fc.weight"] == (("H", None, "C") if interleaved else
                                                                   ("H", "C", None))
    want, _ = rebasin.weight_matching(0, plain.axes_to_perm, a_split, b_split)
    got = cb.weight_matching(spec, a, b, seed=0)
    assert {p: v.tolist() for p, v in got.items()} == {p: v.tolist() for p, v in want.items()}
    assert got.objective == pytest.approx(rebasin.objective(plain.axes_to_perm, a_split, b_split, want), rel=1e-9)


@pytest.mark.parametrize("interleaved", [False, True])
def test_soft_permutations_on_a_repeated_axis_and_their_gradient(interleaved):
    rng = np.random.default_rng(4)
    spec, params = _spec(interleaved), _params(rng)
    perm = cb.random_permutation(spec, params, seed=5)
    soft = soft_apply(spec, one_hot(perm), params)
    for name, value in cb.apply_permutation(spec, perm, params).items():
        np.testing.assert_allclose(soft[name], value, atol=1e-12)
    mats = {p: sinkhorn(rng.normal(size=(len(v), len(v))))[0] for p, v in perm.items()}
    grads = {n: rng.normal(size=v.shape) for n, v in params.items()}
    analytic = soft_apply_grad(spec, mats, params, grads)

    def f(m):
        out = soft_apply(spec, m, params)
        return sum(np.sum(grads[n] * out[n]) for n in params)

    eps = 1e-6
    for i, j in [(0, 1), (2, 0)]:
        up, down = ({k: v.copy() for k, v in mats.items()} for _ in range(2))
        up["C"][i, j] += eps
        down["C"][i, j] -= eps
        assert analytic["C"][i, j] == pytest.approx((f(up) - f(down)) / 2 / eps, rel=1e-6, abs=1e-9)


torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class MnistNet(nn.Module):
    """The PyTorch MNIST example, narrowed: two convs, a max pool, ``torch.flatten(x, 1)``, two dense layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, 1), nn.Conv2d(8, 6, 3, 1)
        self.fc1, self.fc2 = nn.Linear(6 * 5 * 5, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


X = np.random.default_rng(0).normal(size=(40, 1, 14, 14)).astype(np.float32)


def _moved(model, spec, seed):
    """``model`` with its units permuted by a random permutation of ``spec``, checked by torch itself."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    other = MnistNet()
    other.load_state_dict({k: torch.as_tensor(v) for k, v in
                           cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=seed), state).items()})
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(torch.as_tensor(X)), model(torch.as_tensor(X)), atol=1e-5, rtol=0)
    assert not torch.equal(other.conv2.weight, model.conv2.weight)
    return other.eval()


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_torch_cnn_flattening_its_last_feature_map_permutes_that_maps_channels(method):
    torch.manual_seed(0)
    model = MnistNet().eval()
    spec = cb.derive_spec(model, X)
    assert spec.axes_to_perm["fc1.weight"] == ("P_fc1", Repeat("P_conv2", 25))
    assert spec.axes_to_perm["conv2.weight"][0] == "P_conv2"
    pair = cb.ModelPair(model, _moved(model, spec, seed=1), example_input=X)
    data = (X, np.arange(len(X)) % 10)
    aligned = pair.align(method, **({"data": data} if method == "activation" else {}))
    np.testing.assert_array_equal(aligned.theta_b, aligned.theta_a)


def test_a_flax_cnn_reshaping_its_nhwc_map_permutes_that_maps_channels():
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    from tests.model_checks import flax_planted_permutation

    class CNN(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.relu(linen.Conv(6, (3, 3), padding="VALID", name="conv1")(x))
            x = linen.max_pool(linen.relu(linen.Conv(5, (3, 3), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
            return linen.Dense(10, name="fc2")(linen.relu(linen.Dense(12, name="fc1")(x.reshape((x.shape[0], -1)))))

    x = np.moveaxis(X[:8], 1, -1)
    net = CNN()
    variables = net.init(jax.random.PRNGKey(0), x)
    pair, _ = flax_planted_permutation(net, variables, x)
    assert pair.spec.axes_to_perm["fc1.weight"] == ("P_fc1", Repeat("P_conv2", 25, interleaved=True))
