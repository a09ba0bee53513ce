"""Many models a user wrote in plain torch: ``align_many`` (every method), ``ModelSet.align``, merging and the
two- and three-model sweeps on selections of a set.

References, independent of the library: permutations applied by hand to each member's state dict (numpy,
per architecture or per axis with the positions of flattened maps), the permuted modules run in float64, a
planted permutation of one member, cycle consistency by composing index arrays, the merged model's weights as a
numpy mean, and three-model combinations formed by hand in float64 (with BatchNorm statistics recomputed by
torch itself in train mode) scored with ``F.cross_entropy``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb
from combinability.align.many import METHODS, pairwise_permutation
from tests.model_checks import digits_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


X, Y = digits_images()
TRAIN, TEST = np.arange(0, 600), np.arange(1400, 1797)


class BNMLP(nn.Module):
    """Two hidden layers with BatchNorm1d."""

    def __init__(self, h: int = 16) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, h), nn.BatchNorm1d(h)
        self.fc2, self.bn2 = nn.Linear(h, h), nn.BatchNorm1d(h)
        self.out = nn.Linear(h, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        return self.out(F.relu(self.bn2(self.fc2(x))))


class ResFlatCNN(nn.Module):
    """BatchNorm2d convs with a residual block, a max pool and the 4 x 4 map flattened into a dense layer."""

    def __init__(self, w: int = 6) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv3, self.bn3 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.fc = nn.Linear(w * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(h)) + x), 2)
        return self.fc(torch.flatten(x, 1))


class LNMLP(nn.Module):
    """LayerNorm and GELU, in an ``nn.Sequential``."""

    def __init__(self, h: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, h), nn.LayerNorm(h),
                                 nn.GELU(), nn.Linear(h, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _inputs(cls: type[nn.Module]) -> np.ndarray:
    return X[:, None] if cls is ResFlatCNN else X.reshape(len(X), -1)


def _fit(cls: type[nn.Module], seed: int, epochs: int = 6) -> nn.Module:
    """A few seconds of Adam on 600 digits: a trained network."""
    torch.manual_seed(seed)
    model = cls()
    xs = torch.tensor(_inputs(cls)[TRAIN])
    ys = torch.tensor(Y[TRAIN])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(xs), generator=gen).split(50):
            opt.zero_grad()
            F.cross_entropy(model(xs[b]), ys[b]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def nets() -> dict[type[nn.Module], list[nn.Module]]:
    return {cls: [_fit(cls, s) for s in range(4)] for cls in (BNMLP, ResFlatCNN, LNMLP)}


def _f64(model: nn.Module, x: np.ndarray, state: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Logits of ``model`` (or of its class holding ``state``) in float64."""
    m = copy.deepcopy(model).double().eval()
    if state is not None:
        m.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    with torch.no_grad():
        return m(torch.tensor(x, dtype=torch.float64)).numpy()


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _by_axes(spec: cb.PermutationSpec, perm: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
    """Gather every listed axis by its permutation, by hand: a ``Repeat`` axis (channels flattened channel by
    channel, torch's ``flatten``) moves each channel's ``times`` positions together."""
    out = {}
    for name, value in state.items():
        for axis, p in enumerate(spec.axes_to_perm.get(name, ())):
            if p is None:
                continue
            if isinstance(p, str):
                index = np.asarray(perm[p])
            else:  # Repeat
                assert not p.interleaved
                index = (np.asarray(perm[p.name])[:, None] * p.times + np.arange(p.times)).ravel()
            value = np.take(value, index, axis=axis)
        out[name] = value
    return out


def _bnmlp_by_hand(perm: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BNMLP's hidden units reordered: unit ``j`` of the result is unit ``p[j]`` of ``state``."""
    p1, p2 = (np.asarray(perm[k]) for k in ("P_fc1", "P_fc2"))
    out = dict(state)
    for bn, p in (("bn1", p1), ("bn2", p2)):
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{bn}.{k}"] = state[f"{bn}.{k}"][p]
    out["fc1.weight"], out["fc1.bias"] = state["fc1.weight"][p1], state["fc1.bias"][p1]
    out["fc2.weight"], out["fc2.bias"] = state["fc2.weight"][p2][:, p1], state["fc2.bias"][p2]
    out["out.weight"] = state["out.weight"][:, p2]
    return out


@pytest.mark.parametrize("cls", [BNMLP, ResFlatCNN, LNMLP])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_moves_each_member_as_its_permutation_by_hand(nets, cls, method):
    models = nets[cls]
    x = _inputs(cls)
    ms = cb.align_many(models, method=method, example_input=x[:16], seed=0)
    assert ms.alignment == method and ms.transforms[0] is None and len(ms) == 4
    probe = x[TEST][:64]
    for i in range(1, 4):
        given = _numpy_state(models[i])
        moved = _by_axes(ms.spec, ms.transforms[i], given)
        if cls is BNMLP:  # the same, written out for this architecture
            hand = _bnmlp_by_hand(ms.transforms[i], given)
            for k in given:
                np.testing.assert_array_equal(moved[k], hand[k])
        aligned = _numpy_state(ms.models[i])
        for k, v in moved.items():
            np.testing.assert_array_equal(aligned[k], v)
        # the permuted member computes the given member's function (float64)
        np.testing.assert_allclose(_f64(models[i], probe, moved), _f64(models[i], probe), rtol=1e-9, atol=1e-9)
    # align_many promises consistent maps for every method: π_ik = π_jk ∘ π_ij, as index arrays
    for i, j, k in itertools.permutations(range(4), 3):
        pij, pjk, pik = (pairwise_permutation(ms, a, b) for a, b in ((i, j), (j, k), (i, k)))
        for name in pik:
            # moved_j[u] = given_i[pij[u]], then moved_k[u] = moved_j[pjk[u]]: composed index pij[pjk]
            np.testing.assert_array_equal(np.asarray(pij[name])[np.asarray(pjk[name])], pik[name])
    # the merged model holds the mean of the aligned members' floating-point entries
    merged = _numpy_state(ms.merge())
    members = [_numpy_state(m) for m in ms.models]
    for k, v in merged.items():
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(v, np.mean([m[k].astype(np.float64) for m in members], axis=0),
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_planted_permutation_of_a_member_is_undone(nets, method):
    a, _, c, _ = nets[BNMLP]
    rng = np.random.default_rng(7)
    planted = {"P_fc1": rng.permutation(16), "P_fc2": rng.permutation(16)}
    twin = copy.deepcopy(a)
    twin.load_state_dict({k: torch.as_tensor(v) for k, v in _bnmlp_by_hand(planted, _numpy_state(a)).items()})
    x = _inputs(BNMLP)
    ms = cb.align_many([a, twin, c], method=method, example_input=x[:16], seed=0)
    for name, p in planted.items():
        np.testing.assert_array_equal(ms.transforms[1][name], np.argsort(p))
    np.testing.assert_array_equal(ms.theta(1), ms.theta(0))
    # the twin as the reference: model 0 is moved onto it
    ms = cb.align_many([twin, a, c], method=method, example_input=x[:16], seed=0)
    np.testing.assert_array_equal(ms.theta(1), ms.theta(0))


def _hand_combination(ms: cb.ModelSet, members: tuple[int, ...], weights: list[float], template: nn.Module,
                      test: tuple[np.ndarray, np.ndarray], reset_on: np.ndarray | None) -> tuple[float, float]:
    """Loss and accuracy of ``Σ w_k θ_k`` in float64, BatchNorm statistics recomputed by torch when asked."""
    states = [_numpy_state(ms.models[i]) for i in members]
    combined = {k: (sum(w * s[k].astype(np.float64) for w, s in zip(weights, states, strict=True))
                    if np.issubdtype(states[0][k].dtype, np.floating) else states[0][k]) for k in states[0]}
    m = copy.deepcopy(template).double()
    m.load_state_dict({k: torch.as_tensor(v) for k, v in combined.items()})
    if reset_on is not None:
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None  # the cumulative average: one batch gives its exact statistics
        m.train()
        with torch.no_grad():
            m(torch.tensor(reset_on, dtype=torch.float64))
    m.eval()
    with torch.no_grad():
        z = m(torch.tensor(test[0], dtype=torch.float64))
    return float(F.cross_entropy(z, torch.tensor(test[1]))), float(np.mean(z.numpy().argmax(1) == test[1]))


@pytest.mark.parametrize("repair", [None, "reset"])
def test_three_and_two_model_sweeps_of_a_selection_match_combinations_by_hand(nets, repair):
    models = nets[ResFlatCNN]
    x = _inputs(ResFlatCNN)
    test, train = (x[TEST], Y[TEST]), (x[TRAIN][:300], Y[TRAIN][:300])
    ms = cb.align_many(models, method="mergemany", example_input=x[:16], seed=0)
    kwargs: dict = {"repair": repair, "repair_data": train} if repair else {}
    reset_on = train[0] if repair else None
    selection = (3, 0, 2)  # not in the set's order: member 3 is the selection's reference
    ds = cb.sweep(ms.select(*selection), cb.Triangle(resolution=2), data=test, **kwargs)
    for k in range(ds.sizes["point"]):
        lb, lc = float(ds["lam_b"][k]), float(ds["lam_c"][k])
        loss, acc = _hand_combination(ms, selection, [1 - lb - lc, lb, lc], models[0], test, reset_on)
        np.testing.assert_allclose(float(ds["loss"].sel(split="test").values[k, 0]), loss, rtol=1e-4, atol=1e-5)
        assert float(ds["accuracy"].sel(split="test").values[k, 0]) == pytest.approx(acc, abs=1.5 / len(TEST))
    ds = cb.sweep(ms.select(2, 1), cb.Linear(), data=test, values=[0.0, 0.25, 0.5, 1.0], **kwargs)
    for k, lam in enumerate([0.0, 0.25, 0.5, 1.0]):
        loss, _ = _hand_combination(ms, (2, 1), [1 - lam, lam], models[0], test, reset_on)
        np.testing.assert_allclose(float(ds["loss"].sel(split="test").values[k, 0]), loss, rtol=1e-4, atol=1e-5)


def test_set_align_takes_the_many_model_methods_and_transitivity_runs_on_them(nets):
    from combinability import experiments as ex

    models = nets[BNMLP]
    x = _inputs(BNMLP)
    naive = cb.ModelSet(models, example_input=x[:16])
    for method in METHODS:
        direct = cb.align_many(models, method=method, example_input=x[:16], seed=1)
        via_set = naive.align(method, seed=1)
        assert via_set.alignment == method and via_set.naive is naive
        assert via_set.alignment_settings == direct.alignment_settings
        for i in range(4):
            np.testing.assert_array_equal(via_set.theta(i), direct.theta(i))
    ms = cb.align_many(models, method="mergemany", example_input=x[:16], seed=0)
    pair = ms.select(1, 3).align("cycle")  # a pair of a set re-aligned by a many-model method: a pair again
    assert isinstance(pair, cb.ModelPair) and pair.alignment == "cycle"
    np.testing.assert_array_equal(pair.theta_a, ms.naive.theta(1))
    # §5.3 on a selection of a MergeMany set: 'direct' aligns C to B by the set's own method (it crashed:
    # "unknown aligner 'mergemany'")
    ds = ex.transitivity(ms.select(0, 1, 2), data=(x[TEST], Y[TEST]), values=[0.0, 0.5, 1.0])
    assert list(ds["alignment"].values) == ["naive", "transitive", "direct"]
    ends = ds["accuracy"].sel(split="test").values[:, [0, -1], 0]
    np.testing.assert_allclose(ends, ends[:1].repeat(3, axis=0))  # every pairing has the same end models


def test_options_a_method_does_not_take_are_refused_before_any_work(nets):
    models = nets[LNMLP]
    x = _inputs(LNMLP)[:16]
    with pytest.raises(cb.ConfigurationError, match="takes no option 'restarts'; its options are seed, max_iter"):
        cb.align_many(models, method="mergemany", example_input=x, restarts=3)
    with pytest.raises(cb.ConfigurationError, match="rounds must be an integer >= 1, got 0"):
        cb.align_many(models, method="mergemany", example_input=x, rounds=0)
    with pytest.raises(cb.ConfigurationError, match="fw_iter must be an integer >= 0, got -1"):
        cb.ModelSet(models, example_input=x).align("cycle", fw_iter=-1)
    with pytest.raises(cb.ConfigurationError, match="max_iter must be an integer >= 1, got 0"):
        cb.align_many(models, method="cycle", example_input=x, max_iter=0)
    # one set of options serves every method (compare_aligners passes the same to each)
    ms = cb.align_many(models, method="cycle", example_input=x, rounds=2, fw_iter=3)
    assert ms.alignment_settings["fw_iter"] == 3
    with pytest.raises(cb.ConfigurationError, match="takes no option 'round'"):  # before the pairs' alignments
        cb.experiments.compare_aligners(cb.ModelSet(models, example_input=x), methods=["weight"],
                                        many_methods=["mergemany"], many_options={"round": 2}, data=digits_images())


def test_results_and_merged_models_survive_a_round_trip(nets, tmp_path):
    models = nets[BNMLP]
    x = _inputs(BNMLP)
    test, train = (x[TEST], Y[TEST]), (x[TRAIN], Y[TRAIN])
    ms = cb.align_many(models, method="hierarchical", example_input=x[:16], seed=0)
    ds = cb.sweep(ms.select(2, 0, 1), cb.Triangle(resolution=1), data=test, out=tmp_path / "t.nc")
    back = cb.open_results(tmp_path / "t.nc")
    np.testing.assert_array_equal(back["loss"].values, ds["loss"].values)
    assert back.attrs["alignment"] == "hierarchical"
    merged = ms.merge(repair="reset", repair_data=train)
    cb.save_model(merged, tmp_path / "merged.safetensors")
    again = cb.load_into(BNMLP(), tmp_path / "merged.safetensors")
    np.testing.assert_array_equal(_f64(again, x[TEST]), _f64(merged, x[TEST]))
    accuracy: Callable[[nn.Module], float] = lambda m: float(np.mean(_f64(m, x[TEST]).argmax(1) == Y[TEST]))  # noqa: E731
    assert accuracy(merged) > 0.5 and min(accuracy(m) for m in models) > 0.8
