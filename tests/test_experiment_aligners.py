"""The aligner comparison (issue 12, item 4): its numbers against independent computations, bad input,
the result file, the figure and the command line."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import (
    ConfigurationError,
    CorruptFileError,
    DatasetError,
    OutputExistsError,
    OutputNotWritableError,
    SamplerError,
    UnknownNameError,
)
from combinability.experiments import compare_aligners
from tests.reference_nets import numpy_evaluation

LIMIT = 300
#: The values 5 equidistant picks of the linear path's 25-value grid land on.
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def test_data():
    return cb.load_dataset("digits", "test").subset(LIMIT)


def _path_scores(layout, theta_a, theta_b, data):
    """Losses and accuracies of the linear path at LAMBDAS, by a plain numpy forward pass."""
    scores = [numpy_evaluation(layout, (1 - lam) * theta_a.astype(np.float64) + lam * theta_b.astype(np.float64),
                               data) for lam in LAMBDAS]
    return np.array([s[0] for s in scores]), np.array([s[1] for s in scores])


def _path_barriers(layout, theta_a, theta_b, data):
    """Loss and accuracy barriers of the linear path at LAMBDAS (Def. 3.3, written out)."""
    losses, accs = _path_scores(layout, theta_a, theta_b, data)
    return losses.max() - (losses[0] + losses[-1]) / 2, (accs[0] + accs[-1]) / 2 - accs.min()


# -- numbers ---------------------------------------------------------------------------------------
def test_pair_barriers_match_a_numpy_forward_pass_and_an_independent_sweep(digits_models, test_data):
    a, b, _ = digits_models
    ds = compare_aligners([a, b], "digits", methods=("identity", "weight"), samplers=(cb.Linear(), cb.Subcube()),
                          many_methods=(), values_per_sampler=5, samples=2, limit=LIMIT)
    assert ds.attrs["combinability_format"] == "aligners"
    assert list(ds["aligner"].values) == ["identity", "weight"]
    assert list(ds["scheme"].values) == ["linear", "subcube"]
    naive = cb.ModelPair(a, b)
    weight = naive.align("weight", seed=0)
    for name, pair in (("identity", naive), ("weight", weight)):
        loss_b, acc_b = _path_barriers(pair.layout, pair.theta_a, pair.theta_b, test_data)
        row = ds.sel(aligner=name, scheme="linear", split="test")
        assert float(row["loss_barrier"]) == pytest.approx(loss_b, abs=1e-4)
        assert float(row["accuracy_barrier"]) == pytest.approx(acc_b, abs=1e-9)
        losses, accs = _path_scores(pair.layout, pair.theta_a, pair.theta_b, test_data)
        assert float(row["mean_loss"]) == pytest.approx(losses.mean(), abs=1e-4)
        assert float(row["mean_accuracy"]) == pytest.approx(accs.mean(), abs=1e-9)
    assert float(ds["loss_barrier"].sel(aligner="identity", scheme="linear", split="test")) > 0.5  # naive is bad
    # the element-wise scheme: the same draws as an independent sweep of the same aligned pair
    grid = np.asarray(cb.Subcube().grid)
    own = cb.sweep(weight, cb.Subcube(), data="digits", splits=["test"], values=list(grid[[0, 6, 12, 18, 24]]),
                   samples=2, seed=0, limit=LIMIT)
    ref = cb.barriers(own).sel(split="test")
    row = ds.sel(aligner="weight", scheme="subcube", split="test")
    assert float(row["loss_barrier"]) == pytest.approx(float(ref["loss_barrier"]), abs=1e-6)
    assert float(row["accuracy_barrier"]) == pytest.approx(float(ref["accuracy_barrier"]), abs=1e-9)
    assert float(ds["align_time"].sel(aligner="weight")) > 0
    assert float(ds["accuracy_a"].sel(split="test")) == pytest.approx(
        numpy_evaluation(naive.layout, naive.theta_a, test_data)[1])


def test_ste_elementwise_is_ste_trained_on_the_element_wise_sampler(digits_models, test_data):
    a, b, _ = digits_models
    options = {"eval_examples": 200, "lr": 1e-2}  # a step size at which the two samplers lead apart
    ds = compare_aligners([a, b], "digits", methods=("ste", "ste_elementwise", "sinkhorn"), samplers=(cb.Linear(),),
                          many_methods=(), train_examples=600, epochs=1, ste_sampler=cb.Uniform(),
                          learned_options=options, limit=LIMIT)
    train = cb.load_dataset("digits", "train").subset(600, seed=0)
    perms = {}
    for name, sampler in (("ste", None), ("ste_elementwise", cb.Uniform())):
        extra = {"sampler": sampler} if sampler is not None else {}
        pair = cb.ModelPair(a, b).align("ste", data=train, seed=0, epochs=1, **options, **extra)
        perms[name] = pair.permutation
        loss_b, _ = _path_barriers(pair.layout, pair.theta_a, pair.theta_b, test_data)
        assert float(ds["loss_barrier"].sel(aligner=name, scheme="linear", split="test")) == pytest.approx(
            loss_b, abs=1e-4), name
    # the check can tell the two apart: they learn different permutations here
    assert any(not np.array_equal(perms["ste"][p], perms["ste_elementwise"][p]) for p in perms["ste"])
    assert np.all(np.isfinite(ds["loss_barrier"].values)) and np.all(ds["align_time"].values > 0)


def test_merged_models_and_worst_pairs_match_numpy(digits_models, test_data):
    ds = compare_aligners(digits_models, "digits", methods=(), samplers=(), many_methods=("mergemany", "reference"),
                          n_models=(2, 3), limit=LIMIT)
    assert "loss_barrier" not in ds and list(ds["n_models"].values) == [2, 3]
    for n in (2, 3):
        for method in ("mergemany", "reference"):
            ms = cb.align_many(digits_models[:n], method=method, seed=0)
            mean = np.mean([t.astype(np.float64) for t in ms.thetas], axis=0)
            loss, acc = numpy_evaluation(ms.layout, mean, test_data)
            row = ds.sel(n_models=n, merge_method=method, split="test")
            assert float(row["merged_loss"]) == pytest.approx(loss, abs=1e-4)
            assert float(row["merged_accuracy"]) == pytest.approx(acc, abs=1e-9)
            pairs = [_path_barriers(ms.layout, ms.thetas[i], ms.thetas[j], test_data)
                     for i, j in combinations(range(n), 2)]
            assert float(row["worst_pair_loss_barrier"]) == pytest.approx(max(p[0] for p in pairs), abs=1e-4)
            assert float(row["worst_pair_accuracy_barrier"]) == pytest.approx(max(p[1] for p in pairs), abs=1e-9)
        members = [numpy_evaluation(ms.layout, ms.naive.thetas[i], test_data)[1] for i in range(n)]
        assert float(ds["members_accuracy"].sel(n_models=n, split="test")) == pytest.approx(np.mean(members))


# -- bad input, before any work ------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Any alignment or sweep fails the test: the checks must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cb.ModelSet, "align", boom)
    monkeypatch.setattr("combinability.sweeps.sweep_pairs", boom)
    monkeypatch.setattr("combinability.align.many.align_many", boom)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"methods": ("weight", "magic")}, ConfigurationError,
     r"unknown aligner\(s\) \['magic'\]; valid: .*ste_elementwise"),
    ({"methods": ("weight", "weight")}, ConfigurationError, "must not repeat"),
    ({"many_methods": ("cycle", "voting")}, ConfigurationError, r"unknown many-model method\(s\) \['voting'\]"),
    ({"n_models": (2, 4)}, ConfigurationError, "n_models must be distinct integers from 2 to the 3 models"),
    ({"samplers": (cb.Triangle(),)}, SamplerError, "two-model samplers"),
    ({"samplers": (cb.Linear(), "linear")}, SamplerError, "each scheme may appear once"),
    ({"ste_sampler": cb.Triangle()}, SamplerError, "two-model samplers"),
    ({"methods": (), "samplers": (), "many_methods": ()}, ConfigurationError, "nothing to run"),
    ({"epochs": 0}, ConfigurationError, "epochs must be an integer >= 1, got 0"),
    ({"limit": -5}, ConfigurationError, "limit must be an integer >= 1 or None"),
    ({"data": (np.zeros((5, 3)), np.zeros(5, dtype=int))}, DatasetError, r"examples have shape \(3,\)"),
    ({"train_data": (np.zeros((5, 7)), np.zeros(5, dtype=int))}, DatasetError, r"examples have shape \(7,\)"),
])
def test_bad_input_is_refused_before_any_work(digits_models, no_work, kwargs, error, match):
    kwargs = {"data": "digits", **kwargs}
    with pytest.raises(error, match=match):
        compare_aligners(digits_models, **kwargs)


def test_the_number_of_models_is_checked(digits_models, no_work):
    with pytest.raises(ConfigurationError, match="needs 2 to 8 models, got 1"):
        compare_aligners(digits_models[:1], "digits")
    with pytest.raises(ConfigurationError, match="needs 2 to 8 models, got 9"):
        compare_aligners([digits_models[0]] * 9, "digits")
    with pytest.raises(ConfigurationError, match="got str"):
        compare_aligners("models.ckpt", "digits")


def test_a_mapping_without_training_data_is_refused_for_data_driven_aligners(digits_models, no_work):
    test = cb.load_dataset("digits", "test")
    with pytest.raises(ConfigurationError, match="pass train_data="):
        compare_aligners(digits_models[:2], {"test": test}, methods=("activation",), many_methods=())


# -- the result file ------------------------------------------------------------------------------------
def _small(models, **kwargs):
    return compare_aligners(models, "digits", methods=("identity",), samplers=(cb.Linear(),),
                            many_methods=("reference",), limit=100, values_per_sampler=3, **kwargs)


def test_a_finished_result_is_reused_and_another_refused(digits_models, tmp_path, monkeypatch):
    out = tmp_path / "aligners.nc"
    first = _small(digits_models[:2], out=out)
    stamp = out.stat().st_mtime_ns
    assert cb.open_results(out).attrs["combinability_format"] == "aligners"

    def boom(*args, **kwargs):
        raise AssertionError("a finished result was computed again")

    with monkeypatch.context() as m:
        m.setattr(cb.ModelSet, "align", boom)
        again = _small(digits_models[:2], out=out)
    assert out.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again["loss_barrier"].values, first["loss_barrier"].values)
    with pytest.raises(OutputExistsError, match=r"settings that differ: .*seed: 0 in the file, 1 now"):
        _small(digits_models[:2], out=out, seed=1)
    with pytest.raises(OutputExistsError, match="models"):
        _small(digits_models[1:], out=out)
    replaced = _small(digits_models[:2], out=out, seed=1, overwrite=True)
    assert replaced.attrs["seed"] == 1 and out.stat().st_mtime_ns != stamp


def test_an_unwritable_output_is_refused_before_any_work(digits_models, tmp_path, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputNotWritableError, match="is a file, not a folder"):
        _small(digits_models[:2], out=blocker / "aligners.nc")


def test_a_foreign_file_is_not_replaced(digits_models, tmp_path, no_work):
    out = tmp_path / "aligners.nc"
    out.write_text("someone's notes")
    with pytest.raises(OutputExistsError, match="not a combinability result"):
        _small(digits_models[:2], out=out)
    assert out.read_text() == "someone's notes"


# -- the figure ----------------------------------------------------------------------------------------
def test_the_figure_draws_the_dataset(digits_models, tmp_path):
    from combinability.plots import plot_aligners
    from combinability.report import figure_for

    ds = compare_aligners(digits_models, "digits", methods=("identity", "weight"),
                          samplers=(cb.Linear(), cb.Uniform()), many_methods=("reference", "cycle"),
                          limit=100, values_per_sampler=3, samples=1)
    fig = plot_aligners(ds, tmp_path / "aligners.png")
    assert (tmp_path / "aligners.png").stat().st_size > 10_000
    bars = {}
    for ax in fig.axes:
        for patch in ax.patches:
            if patch.get_gid():
                bars.setdefault(patch.get_gid(), []).append(patch.get_height())
    for metric in ("loss", "accuracy"):
        for aligner in ("identity", "weight"):
            expected = ds[f"{metric}_barrier"].sel(aligner=aligner, split="test").transpose("scheme").values
            np.testing.assert_allclose(bars[f"{metric}|{aligner}"], expected)
    lines = {line.get_gid(): line.get_ydata() for ax in fig.axes for line in ax.lines if line.get_gid()}
    np.testing.assert_allclose(lines["merged_accuracy|cycle"],
                               ds["merged_accuracy"].sel(merge_method="cycle", split="test").values)
    assert len(fig.axes) == 4
    assert figure_for(ds, tmp_path / "report.png") == [tmp_path / "report.png"]
    with pytest.raises(UnknownNameError, match="valid: test"):
        plot_aligners(ds, split="train")
    with pytest.raises(CorruptFileError, match="not an aligner comparison"):
        plot_aligners(ds[["members_loss"]])
    only_pairs = plot_aligners(ds[["loss_barrier", "accuracy_barrier", "align_time"]])
    assert len(only_pairs.axes) == 2


# -- the command line ----------------------------------------------------------------------------------
def test_cli_experiment_aligners(digits_models, tmp_path, capsys):
    from combinability.cli import main
    from combinability.models import save_model

    paths = []
    for i, model in enumerate(digits_models):
        paths.append(str(tmp_path / f"m{i}.ckpt"))
        save_model(model, paths[-1], backend="torch")
    out = tmp_path / "aligners.nc"
    argv = ["experiment", "aligners", *paths, "--data", "digits", "--methods", "identity", "weight",
            "--samplers", "linear", "--many-methods", "reference", "--n-models", "2", "3", "--limit", "100",
            "--values-per-sampler", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "aligners finished" in printed and "merged_accuracy" in printed
    ds = cb.open_results(out)
    assert list(ds["aligner"].values) == ["identity", "weight"] and list(ds["n_models"].values) == [2, 3]
    assert "cli_command" in ds.attrs or "cli_settings" in ds.attrs
    assert main([*argv[:-3], "--seed", "1", "--out", str(out), "--quiet"]) == 1  # another run's file is refused
    assert "settings that differ" in capsys.readouterr().err
    assert main(["experiment", "aligners", paths[0], "--data", "digits", "--out", str(tmp_path / "x.nc")]) != 0


# -- a user's own models ------------------------------------------------------------------------------
def test_own_torch_modules_as_a_list_or_a_model_set(test_data):
    import torch

    x = cb.load_dataset("digits", "train").x[:16]
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
            for _ in range(3)]
    settings = dict(methods=("identity", "weight"), samplers=(cb.Linear(),), many_methods=("reference",),
                    values_per_sampler=5, limit=LIMIT)
    from_list = compare_aligners(nets, "digits", example_input=x, **settings)
    from_set = compare_aligners(cb.ModelSet(nets, example_input=x), "digits", **settings)  # no example_input here
    ms = cb.align_many(nets, method="reference", example_input=x)
    p = ms.layout.unflatten(np.mean([t.astype(np.float64) for t in ms.thetas], axis=0))
    hidden = np.maximum(test_data.x.reshape(len(test_data), -1) @ p["1.weight"].T + p["1.bias"], 0)
    accuracy = np.mean((hidden @ p["3.weight"].T + p["3.bias"]).argmax(1) == test_data.y)
    for ds in (from_list, from_set):
        assert float(ds["merged_accuracy"].sel(n_models=3, merge_method="reference", split="test")) == pytest.approx(
            accuracy, abs=1e-9)
