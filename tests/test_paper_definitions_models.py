"""An audit of the paper's experiments on tiny trained models (MLPs on digits).

Each reference evaluates the combined model *independently* of the library's evaluation:
the combination is formed in numpy from the paper's formula, loaded into a copy of the torch
module with ``load_state_dict`` and scored with ``torch.nn.functional.cross_entropy``. The
library's sweeps, barriers, agreement counts, stitching, Min/Max models, transitivity,
three-model combinations, edge lengths and robustness baseline must give the same numbers.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import combinability as cb  # noqa: E402
from combinability import experiments as ex  # noqa: E402
from combinability.data import load_dataset  # noqa: E402
from combinability.metrics import AGREEMENT_CATEGORIES  # noqa: E402

TOL = 2e-5  # float32 forward passes in different batchings


@pytest.fixture(scope="module")
def models():
    return [cb.train("mlp", "digits", epochs=2, width=0.125, seed=s) for s in (0, 1, 2)]


@pytest.fixture(scope="module")
def pair(models):
    a, b, _ = models
    return cb.ModelPair(a, b).align("weight", seed=0)


@pytest.fixture(scope="module")
def triple(models):
    a, b, c = models
    return cb.ModelPair(a, b, model_c=c).align("weight", seed=0)


@pytest.fixture(scope="module")
def test_data():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def evaluate(models, pair, test_data):
    """``theta -> (mean cross-entropy, accuracy, predictions)`` of a flat vector, on the test split."""
    template = models[0]
    x = torch.as_tensor(np.asarray(test_data.x, np.float32))
    y = torch.as_tensor(np.asarray(test_data.y)).long()

    def run(theta):
        net = copy.deepcopy(template).eval()
        state = pair.layout.unflatten(np.asarray(theta, np.float32))
        net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
        with torch.no_grad():
            z = net(x).double()
        pred = z.argmax(1)
        return float(torch.nn.functional.cross_entropy(z, y)), float((pred == y).double().mean()), pred.numpy()

    return run


def _curve(ds, name="loss", **sel):
    return ds[name].sel(split="test", **sel).squeeze().values


def test_linear_path_and_extrapolation_sections_3_and_5_1(pair, evaluate):
    lams = [-0.5, 0.0, 0.3, 1.0, 1.25]
    ds = cb.sweep(pair, cb.Linear(start=-1, stop=2), values=lams, data="digits", splits=["test"])
    a, b = pair.theta_a.astype(np.float64), pair.theta_b.astype(np.float64)
    for lam, got in zip(lams, _curve(ds), strict=True):
        assert got == pytest.approx(evaluate((1 - lam) * a + lam * b)[0], abs=TOL)
    # the ends are the original models: π(Θ_B) computes Θ_B's function
    assert float(ds["loss_a"].squeeze()) == pytest.approx(evaluate(a)[0], abs=TOL)
    assert float(ds["loss_b"].squeeze()) == pytest.approx(evaluate(pair.naive.theta_b)[0], abs=TOL)
    # Def. 3.1 on this grid: max over the path minus the mean of the ends
    ends = (evaluate(a)[0] + evaluate(b)[0]) / 2
    path = [evaluate((1 - lam) * a + lam * b)[0] for lam in lams if 0 <= lam <= 1]
    sub = cb.sweep(pair, cb.Linear(), values=[0.0, 0.3, 1.0], data="digits", splits=["test"])
    assert float(cb.barriers(sub)["loss_barrier"].squeeze()) == pytest.approx(max(path) - ends, abs=TOL)


def test_every_interpolating_sampler_runs_from_a_to_b(pair, evaluate):
    """Subcube (§4.2.2), hyperplane (§4.2.3), Bernoulli (§4.2.4): parameter 0 is A, 1 is B; the Θ_A-centred
    box (§5.2) at s = 0 is A; the uniform cube (§4.2.1) at s = 0 is the midpoint of the linear path."""
    la, lb = evaluate(pair.theta_a)[0], evaluate(pair.theta_b)[0]
    for sampler in (cb.Subcube(), cb.Hyperplane(), cb.Bernoulli()):
        ds = cb.sweep(pair, sampler, values=[0.0, 1.0], samples=1, data="digits", splits=["test"])
        np.testing.assert_allclose(_curve(ds), [la, lb], atol=TOL)
    box = cb.sweep(pair, cb.Box(), values=[0.0], samples=1, data="digits", splits=["test"])
    assert float(_curve(box)) == pytest.approx(la, abs=TOL)
    mid = cb.sweep(pair, cb.Uniform(), values=[0.0], samples=1, data="digits", splits=["test"])
    assert float(_curve(mid)) == pytest.approx(evaluate(0.5 * (pair.theta_a + pair.theta_b))[0], abs=TOL)


def test_min_max_models_section_4_5_1(pair, evaluate):
    a, b = pair.theta_a.astype(np.float64), pair.theta_b.astype(np.float64)
    max_model = np.where(np.abs(b) > np.abs(a), b, a)  # the weight of larger absolute value
    min_model = np.where(np.abs(b) < np.abs(a), b, a)  # of smaller absolute value
    ds = cb.sweep(pair, cb.MinMax(), values=[0.0, 0.5, 1.0], data="digits", splits=["test"])
    ref = [evaluate(max_model)[0], evaluate(0.5 * (max_model + min_model))[0], evaluate(min_model)[0]]
    np.testing.assert_allclose(_curve(ds), ref, atol=TOL)


@pytest.mark.parametrize("lower", ["b", "a"])
def test_identity_stitching_section_4_3(pair, evaluate, lower):
    state_a = pair.layout.unflatten(pair.theta_a)
    state_b = pair.layout.unflatten(pair.theta_b)  # π(Θ_B)
    low, high = (state_b, state_a) if lower == "b" else (state_a, state_b)
    cuts = list(range(5))  # the MLP's layers.0 ... layers.3, cut before each and after the last
    ds = cb.sweep(pair, cb.Stitch(lower=lower), values=cuts, data="digits", splits=["test"])
    for cut, got in zip(cuts, _curve(ds), strict=True):
        # the lower `cut` layers (each Linear's weight and bias) from the `lower` model, the rest from the other
        stitched = {k: (low if int(k.split(".")[1]) < cut else high)[k] for k in state_a}
        assert got == pytest.approx(evaluate(pair.layout.flatten(stitched))[0], abs=TOL)


def test_hypercube_barriers_definition_3_3(pair):
    """Empirical barriers of a sample of Bernoulli combinations, naive and aligned (figs 5, 7)."""
    res = ex.hypercube(pair, samplers=(cb.Bernoulli(),), values=[0.25, 0.5, 0.75], samples=2,
                       data="digits", splits=["test"])["bernoulli"]
    out = cb.barriers(res)
    for name in ("naive", "aligned"):
        sel = res.sel(alignment=name, split="test")
        loss, acc = sel["loss"].values, sel["accuracy"].values
        assert loss.shape == (3, 2)
        mean_loss = (float(sel["loss_a"]) + float(sel["loss_b"])) / 2
        mean_acc = (float(sel["accuracy_a"]) + float(sel["accuracy_b"])) / 2
        got = out.sel(alignment=name, split="test")
        assert float(got["loss_barrier"]) == pytest.approx(loss.max() - mean_loss, abs=1e-12)
        assert float(got["accuracy_barrier"]) == pytest.approx(mean_acc - acc.min(), abs=1e-12)
    # the two original models are the same functions in both pairs: the ends agree
    np.testing.assert_allclose(res["loss_b"].sel(alignment="naive"), res["loss_b"].sel(alignment="aligned"), atol=TOL)


def test_agreement_categories_section_6_1(pair, evaluate, test_data):
    ds = cb.sweep(pair, cb.Linear(), values=[0.0, 0.5, 1.0], agreement=True, data="digits", splits=["test"])
    pred_a = evaluate(pair.theta_a)[2]
    pred_b = evaluate(pair.naive.theta_b)[2]  # B as trained predicts what π(B) predicts
    labels = np.asarray(test_data.y)
    for lam in (0.0, 0.5, 1.0):
        pred = evaluate((1 - lam) * pair.theta_a.astype(np.float64) + lam * pair.theta_b)[2]
        ref = dict.fromkeys(AGREEMENT_CATEGORIES, 0)
        for p, pa, pb, y in zip(pred, pred_a, pred_b, labels, strict=True):
            group = "both" if p == pa == pb else "a_only" if p == pa else "b_only" if p == pb else "neither"
            ref[f"{group}_{'correct' if p == y else 'wrong'}"] += 1
        got = ds["agreement"].sel(split="test", lam=lam).squeeze("sample")
        assert dict(zip(AGREEMENT_CATEGORIES, got.values.tolist(), strict=True)) == ref


def test_three_models_section_5_4(triple, evaluate):
    points = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.2, 0.3), (0.5, 0.5)]
    ds = cb.sweep(triple, cb.Triangle(), values=points, data="digits", splits=["test"])
    a, b, c = (t.astype(np.float64) for t in (triple.theta_a, triple.theta_b, triple.theta_c))
    ref = [evaluate(a + lb * (b - a) + lc * (c - a))[0] for lb, lc in points]  # Θ_A + λ_B(…) + λ_C(…)
    np.testing.assert_allclose(_curve(ds), ref, atol=TOL)
    ends = [float(ds[f"loss_{m}"].squeeze()) for m in "abc"]
    np.testing.assert_allclose(ends, ref[:3], atol=TOL)
    assert float(cb.barriers(ds)["loss_barrier"].squeeze()) == pytest.approx(max(ref) - np.mean(ends), abs=TOL)


def test_transitivity_section_5_3(triple, evaluate):
    ds = ex.transitivity(triple, values=[0.0, 0.5, 1.0], data="digits", splits=["test"])
    naive_b, naive_c = triple.naive.theta_b, triple.naive.theta_c
    lb, lc = evaluate(naive_b)[0], evaluate(naive_c)[0]
    for alignment in ("naive", "transitive", "direct"):
        curve = _curve(ds, alignment=alignment)
        np.testing.assert_allclose(curve[[0, 2]], [lb, lc], atol=TOL)  # λ = 0 is B, λ = 1 is C, whatever π
    # π_B(Θ_B) and π_C(Θ_C), both re-based to A and never to each other
    mid = evaluate(0.5 * (triple.theta_b.astype(np.float64) + triple.theta_c))[0]
    assert _curve(ds, alignment="transitive")[1] == pytest.approx(mid, abs=TOL)
    assert _curve(ds, alignment="naive")[1] == pytest.approx(evaluate(0.5 * (naive_b + naive_c.astype(float)))[0],
                                                             abs=TOL)


def test_edge_lengths_section_6_2(pair):
    res = ex.edge_lengths(pair, bins=20)
    edges = res["bin_edges"].values
    layer_of = pair.layout.layer_index()
    for name, p in (("naive", pair.naive), ("aligned", pair)):
        length = np.abs(p.theta_a.astype(np.float64) - p.theta_b)  # |Θ_A − π(Θ_B)| (naive: no π)
        for layer in range(pair.layout.num_layers):
            sel = length[layer_of == layer]
            counts = np.histogram(np.minimum(sel, edges[-1]), bins=edges)[0]  # longer edges in the last bin
            assert res["count"].sel(alignment=name, layer=layer).values.tolist() == counts.tolist()
            assert float(res["mean"].sel(alignment=name, layer=layer)) == pytest.approx(sel.mean(), rel=1e-6)


def test_robustness_baseline_and_steps_section_6_3(pair, evaluate, test_data):
    res = ex.alignment_robustness(pair, (test_data.x, test_data.y), permutations=["P_layers.1"], steps=3,
                                  lambdas=(0.25, 0.5, 0.75), examples=200)
    a, b = pair.theta_a.astype(np.float64), pair.theta_b.astype(np.float64)
    ends = [evaluate(a), evaluate(b)]
    path = [evaluate((1 - lam) * a + lam * b) for lam in (0.25, 0.5, 0.75)]
    assert float(res["baseline_loss_barrier"]) == pytest.approx(
        max(p[0] for p in path) - (ends[0][0] + ends[1][0]) / 2, abs=TOL)
    assert float(res["baseline_accuracy_barrier"]) == pytest.approx(
        (ends[0][1] + ends[1][1]) / 2 - min(p[1] for p in path), abs=TOL)
    # "k ranging between 2 and the number of filters N"
    assert res["k"].sel(permutation="P_layers.1").values.tolist() == [2, 33, 64]
    assert np.all(np.isfinite(res["loss_barrier"].values))


def test_robustness_barrier_is_nan_when_a_path_point_diverged(pair, test_data, monkeypatch):
    """A diverged (NaN-loss) point of the path, wherever it lies, makes the barrier NaN (Def. 3.1 has no
    worst value then); Python's ``max`` dropped a NaN that was not first."""
    import dataclasses

    from combinability.experiments import robustness

    class Diverging(robustness.Evaluator):
        def evaluate(self, thetas, data, *args, **kwargs):
            out = super().evaluate(thetas, data, *args, **kwargs)
            if len(out) == 3:  # the path's three points: the middle one diverges
                out[1] = dataclasses.replace(out[1], loss=float("nan"))
            return out

    monkeypatch.setattr(robustness, "Evaluator", Diverging)
    res = ex.alignment_robustness(pair, (test_data.x, test_data.y), permutations=["P_layers.1"], steps=1,
                                  lambdas=(0.25, 0.5, 0.75), examples=200)
    assert np.isnan(float(res["baseline_loss_barrier"]))
    assert np.isnan(res["loss_barrier"].values).all()
    assert np.isfinite(float(res["baseline_accuracy_barrier"]))


@pytest.mark.parametrize("name,value,lo,hi", [("uniform", 0.2, 0.3, 0.7), ("subcube", 0.3, 0.0, 0.6),
                                              ("subcube", 0.8, 0.6, 1.0), ("box", 0.25, -0.25, 0.25)])
def test_laws_on_the_torch_random_source(name, value, lo, hi):
    """Sweeps draw from the backend's source (torch here): the §4.2.1, §4.2.2 and §5.2 laws hold there too."""
    from scipy import stats

    from combinability.plugins import get_backend

    layout = cb.FlatLayout.from_arrays({"w": np.zeros(100_000, np.float32)})
    v = cb.get_sampler(name).draw(value, cb.DrawContext(layout, get_backend("torch").random(3)))
    v = v.numpy().astype(np.float64)
    assert v.min() >= lo and v.max() <= hi
    assert stats.kstest(v, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3


def test_bernoulli_and_hyperplane_on_the_torch_random_source():
    from scipy import optimize, stats

    from combinability.plugins import get_backend

    layout = cb.FlatLayout.from_arrays({"w": np.zeros(100_000, np.float32)})
    ctx = cb.DrawContext(layout, get_backend("torch").random(4))
    v = cb.Bernoulli().draw(0.3, ctx).numpy()
    assert set(np.unique(v).tolist()) == {0.0, 1.0}
    assert stats.binomtest(int(v.sum()), v.size, 0.3).pvalue > 1e-3
    h = cb.Hyperplane().draw(0.2, ctx).numpy().astype(np.float64)
    # the exponential law truncated to [0, 1] with mean 0.2: density ∝ e^{−b x}, b found from scipy's own mean
    b = optimize.brentq(lambda r: stats.truncexpon(r, scale=1 / r).mean() - 0.2, 1, 10)
    assert stats.kstest(h, stats.truncexpon(b, scale=1 / b).cdf).pvalue > 1e-3


def test_a_combination_with_nan_logits_has_an_undefined_accuracy(pair, test_data, evaluate):
    """NaN logits (a diverged model) give a NaN loss; the accuracy is then NaN too, not whatever a framework's
    argmax over NaN picks, so that the accuracy barrier is undefined with the loss barrier."""
    from combinability.evaluation import Evaluator

    theta = pair.theta_b.copy()
    entry = pair.layout.entries[-1]  # the logits' bias: a NaN there makes every logit row NaN somewhere
    theta[entry.offset] = np.nan
    loss, _, _ = evaluate(theta)
    assert np.isnan(loss)
    evaluator = Evaluator(pair.backend_obj, pair.template, pair.layout)
    nan_ev, finite_ev = evaluator.evaluate([theta, pair.theta_b], test_data)
    assert np.isnan(nan_ev.loss) and np.isnan(nan_ev.accuracy)
    assert finite_ev.accuracy == pytest.approx(evaluate(pair.theta_b)[1])


def test_robustness_rematches_dead_pairs_last(models, test_data):
    """Pairs whose two units are both dead on the activation data have no correlation; they are re-matched
    last and counted (``silent_pairs``), checked against a numpy forward pass of both aligned models."""
    from combinability.evaluation import CrossMoments
    from combinability.experiments.robustness import pair_scores

    a, b = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    with torch.no_grad():  # kill units 0-4 of A's second hidden layer and units 10-12 of B's
        for net, dead in ((a, range(5)), (b, range(10, 13))):
            layer = getattr(net.layers, "1")
            layer.weight[list(dead)] = 0.0
            layer.bias[list(dead)] = -1.0
    pair = cb.ModelPair(a, b).align("weight", seed=0)
    x = np.asarray(test_data.x, np.float64).reshape(len(test_data.x), -1)

    def hidden_1(params):
        h = np.maximum(x @ params["layers.0.weight"].T.astype(np.float64) + params["layers.0.bias"], 0)
        return np.maximum(h @ params["layers.1.weight"].T.astype(np.float64) + params["layers.1.bias"], 0)

    ha, hb = hidden_1(pair.params("a")), hidden_1(pair.params("b"))
    still = (ha.std(0) == 0) & (hb.std(0) == 0)
    assert still.sum() >= 1  # the killed units of A and B are (mostly) paired with each other
    res = ex.alignment_robustness(pair, (test_data.x, test_data.y), permutations=["P_layers.1"], steps=2,
                                  lambdas=(0.5,), examples=200)
    assert int(res["silent_pairs"].sel(permutation="P_layers.1")) == int(still.sum())
    moments = CrossMoments()
    moments.update(ha, hb)
    scores, silent = pair_scores(moments)
    assert silent.tolist() == still.tolist()
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.nan_to_num(np.diag(np.corrcoef(ha.T, hb.T)[: ha.shape[1], ha.shape[1]:]))
    assert np.all(np.isinf(scores[still]))
    np.testing.assert_allclose(scores[~still], reference[~still], atol=1e-9)
    order = np.argsort(scores, kind="stable")
    assert set(order[-int(still.sum()):].tolist()) == set(np.flatnonzero(still).tolist())
