"""The sweep against the paper's relations and against independent evaluations."""

import numpy as np
import pytest
import xarray as xr

import combinability as cb
from combinability.results import barriers

LIMIT = 300


def _ends(pair):
    """Loss of A and B on the test split, evaluated directly by the backend (not through the sweep)."""
    from combinability.data import load_dataset
    from combinability.evaluation import Evaluation
    from tests.reference_nets import numpy_evaluation

    test = load_dataset("digits", "test").subset(LIMIT)
    evs = []
    for theta in (pair.theta_a, pair.theta_b):
        loss, acc = numpy_evaluation(pair.layout, theta, test)
        evs.append(Evaluation(loss, acc, np.zeros(0)))
    return evs[0], evs[1]


@pytest.mark.parametrize(
    ("sampler", "a_value", "b_value"),
    [
        (cb.Subcube(), 0.0, 1.0),
        (cb.Hyperplane(), 0.0, 1.0),
        (cb.Bernoulli(), 0.0, 1.0),
        (cb.Linear(), 0.0, 1.0),
        (cb.Linear(start=-1, stop=2), 0.0, 1.0),
        (cb.Stitch(), 0, 4),
        (cb.Box(), 0.0, None),
    ],
    ids=lambda x: getattr(x, "name", None) or repr(x),
)
def test_endpoints_reproduce_a_and_b_exactly(digits_pair, sampler, a_value, b_value):
    values = [a_value] + ([b_value] if b_value is not None else [])
    ds = cb.sweep(digits_pair, sampler, data="digits", splits=["test"], values=values, samples=2, limit=LIMIT)
    ev_a, ev_b = _ends(digits_pair)
    param = ds.attrs["parameter"]
    at_a = ds["loss"].sel(split="test").isel({param: 0}).values
    loss_a = float(ds["loss_a"].sel(split="test"))
    assert np.all(at_a == loss_a)  # the combination at A is bitwise A
    assert loss_a == pytest.approx(ev_a.loss, rel=1e-5)  # and A is what a numpy forward pass computes
    if b_value is not None:
        assert np.all(ds["loss"].sel(split="test").isel({param: 1}).values == float(ds["loss_b"].sel(split="test")))
        assert float(ds["loss_b"].sel(split="test")) == pytest.approx(ev_b.loss, rel=1e-5)
        assert np.all(ds["accuracy"].sel(split="test").isel({param: 1}).values == ev_b.accuracy)


def test_triangle_corners_are_the_three_models(digits_triple):
    ds = cb.sweep(digits_triple, cb.Triangle(), data="digits", splits=["test"],
                  values=[(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)], limit=LIMIT)
    loss = ds["loss"].sel(split="test").isel(sample=0).values
    assert loss[0] == float(ds["loss_a"].sel(split="test"))
    assert loss[1] == float(ds["loss_b"].sel(split="test"))
    assert loss[2] == float(ds["loss_c"].sel(split="test"))
    assert list(ds["lam_b"].values) == [0.0, 1.0, 0.0]


def test_aligned_uniform_barrier_below_naive(digits_pair):
    kw = dict(data="digits", splits=["test"], values=[0.25, 0.5], samples=2, limit=LIMIT)
    naive = barriers(cb.sweep(digits_pair.naive, cb.Uniform(), **kw))
    aligned = barriers(cb.sweep(digits_pair, cb.Uniform(), **kw))
    assert float(aligned["loss_barrier"].sel(split="test")) < float(naive["loss_barrier"].sel(split="test"))
    assert float(aligned["accuracy_barrier"].sel(split="test")) < float(naive["accuracy_barrier"].sel(split="test"))


def test_min_model_is_worse_than_max_model(digits_pair):
    ds = cb.sweep(digits_pair, cb.MinMax(), data="digits", splits=["test"], values=[0.0, 1.0], limit=LIMIT)
    loss = ds["loss"].sel(split="test").isel(sample=0).values
    acc = ds["accuracy"].sel(split="test").isel(sample=0).values
    assert loss[1] > loss[0]  # λ = 1 is the Min model
    assert acc[1] < acc[0]


def test_sweep_matches_an_independent_combination(digits_pair):
    """One sweep entry equals combining by hand with the same seeded draw and evaluating directly."""
    from combinability.data import load_dataset

    ds = cb.sweep(digits_pair, cb.Uniform(), data="digits", splits=["test"], values=[0.5], samples=2, seed=3,
                  limit=LIMIT)
    import zlib

    import torch

    # the documented stream of (seed 3, value 0, sample 1), derived here without the library's code:
    # SeedSequence(seed, crc32(sampler), value index, sample) seeds a torch.Generator on the CPU
    stream = int(np.random.SeedSequence([3, zlib.crc32(b"uniform"), 0, 1]).generate_state(1, np.uint32)[0])
    generator = torch.Generator().manual_seed(stream)
    v = torch.rand(digits_pair.layout.size, generator=generator).numpy()  # U[0, 1) = U[0.5 ± s] at s = 0.5
    theta = (1 - v) * digits_pair.theta_a + v * digits_pair.theta_b
    from tests.reference_nets import numpy_evaluation

    loss, _ = numpy_evaluation(digits_pair.layout, theta, load_dataset("digits", "test").subset(LIMIT))
    assert float(ds["loss"].sel(split="test").isel(s=0, sample=1)) == pytest.approx(loss, rel=1e-5)


def test_results_round_trip_through_netcdf(digits_pair, tmp_path):
    ds = cb.sweep(digits_pair, cb.Bernoulli(), data="digits", values=[0.0, 0.3], samples=2, limit=LIMIT,
                  agreement=True)
    path = tmp_path / "bern.nc"
    cb.write_results(ds, path)
    back = cb.open_results(path)
    xr.testing.assert_identical(ds, back)
    assert back.attrs["sampler"] == "bernoulli"
    assert back.attrs["architecture"] == "mlp"
    # agreement counts at p = 0 (the combination is A), categorised by hand from numpy predictions
    n = back.attrs["examples"]
    from combinability.data import load_dataset
    from tests.reference_nets import zoo_forward

    test = load_dataset("digits", "test").subset(LIMIT)
    pa, pb = (zoo_forward("mlp", {k: v.astype(np.float64) for k, v in digits_pair.params(m).items()},
                          test.x).argmax(axis=1) for m in ("a", "b"))
    pred, y = pa, test.y  # Bernoulli(0) draws v = 0: the combined model is A
    both, a_only, b_only = (pred == pa) & (pred == pb), (pred == pa) & (pred != pb), (pred != pa) & (pred == pb)
    neither = (pred != pa) & (pred != pb)
    want = [int(np.sum(c & (pred == y))) if k % 2 == 0 else int(np.sum(c & (pred != y)))
            for c in (both, a_only, b_only, neither) for k in (0, 1)]
    got = back["agreement"].sel(split="test").isel(p=0, sample=0).values.tolist()
    assert got == want and sum(want) == len(y) and want[2] > 0  # some examples where only A is right
    import json

    sizes = json.loads(n)
    for split, size in sizes.items():
        assert np.all(back["agreement"].sel(split=split).sum("category").values == size)


def test_sweep_pairs_adds_alignment_dim(digits_pair):
    ds = cb.sweep_pairs({"naive": digits_pair.naive, "aligned": digits_pair}, cb.Linear(), data="digits",
                        splits=["test"], values=[0.5], limit=LIMIT)
    assert list(ds["alignment"].values) == ["naive", "aligned"]
    b = barriers(ds)
    assert b["loss_barrier"].dims == ("alignment", "split")


def test_caller_attrs_replace_the_librarys_but_not_the_results_identity(digits_pair):
    ds = cb.sweep(digits_pair, cb.Linear(), data="digits", splits=["test"], values=[0.5], limit=LIMIT,
                  attrs={"alignment": "weight, aligned earlier", "seed": "noted by hand", "project": "x"})
    assert (ds.attrs["alignment"], ds.attrs["seed"], ds.attrs["project"]) == ("weight, aligned earlier",
                                                                              "noted by hand", "x")
    assert ds.attrs["combinability_format"] == "sweep"
    for sweeper in (lambda a: cb.sweep(digits_pair, cb.Linear(), data="digits", values=[0.5], attrs=a),
                    lambda a: cb.sweep_pairs({"p": digits_pair}, cb.Linear(), data="digits", values=[0.5], attrs=a)):
        with pytest.raises(cb.ConfigurationError, match="may not set sweep_key.*reserved: combinability_format"):
            sweeper({"sweep_key": "mine"})


def test_bad_input_errors(digits_pair, digits_triple):
    with pytest.raises(cb.UnknownNameError, match="valid splits: train, test"):
        cb.sweep(digits_pair, cb.Linear(), data="digits", splits=["validation"])
    with pytest.raises(cb.SamplerError, match=r"s=0.7 is outside \[0, 0.5\]"):
        cb.sweep(digits_pair, cb.Uniform(), data="digits", values=[0.7])
    with pytest.raises(cb.IncompatibleModelsError, match="three models"):
        cb.sweep(digits_pair, cb.Triangle(), data="digits")
    with pytest.raises(cb.UnknownNameError, match="no_such_data.*digits"):
        cb.sweep(digits_pair, cb.Linear(), data="no_such_data")
    # arguments of the wrong type or form, named before any evaluation
    for kw, why in ((dict(samples=2.5), r"samples must be an int >= 1.*got 2.5"),
                    (dict(samples="3"), r"samples must be an int >= 1.*got '3'"),
                    (dict(values=0.5), r"values must be a sequence .* e.g. values=\[0.5\]"),
                    (dict(values=[0.25, 0.25]), r"values repeats 0.25")):
        with pytest.raises(cb.ConfigurationError, match=why):
            cb.sweep(digits_pair, cb.Uniform(), data="digits", **kw)
    with pytest.raises(cb.SamplerError, match=r"sampler=Subcube is the sampler's class; pass an instance"):
        cb.sweep(digits_pair, cb.Subcube, data="digits")
    with pytest.raises(cb.ConfigurationError, match=r"sweep takes a ModelPair .* got TableNet"):
        cb.sweep(digits_pair.model_a, cb.Linear(), data="digits")
    one = cb.sweep(digits_pair, cb.Linear(), data="digits", splits="test", values=[0.5], limit=40)  # one split
    assert list(one["split"].values) == ["test"]


def test_brier_metric_matches_numpy(digits_pair):
    from combinability.data import load_dataset
    from tests.reference_nets import zoo_forward

    ds = cb.sweep(digits_pair, cb.Linear(), data="digits", splits=["test"], values=[0.0], metrics=["brier"],
                  limit=LIMIT)
    test = load_dataset("digits", "test").subset(LIMIT)
    z = zoo_forward("mlp", {k: v.astype(np.float64) for k, v in digits_pair.params("a").items()}, test.x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(p.shape[1])[test.y]
    want = np.mean(np.sum((p - onehot) ** 2, axis=1))
    assert float(ds["brier"].values.ravel()[0]) == pytest.approx(want, rel=1e-4)
    with pytest.raises(cb.UnknownNameError, match="brier"):
        cb.sweep(digits_pair, cb.Linear(), data="digits", values=[0.0], metrics=["nope"], limit=LIMIT)
