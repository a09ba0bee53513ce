"""symmetry_comparison on a planted transformer pair: B is A moved by a random map of every kind."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import combinability as cb  # noqa: E402
from combinability.errors import ConfigurationError  # noqa: E402
from combinability.experiments.symmetries import symmetry_comparison  # noqa: E402
from tests.test_stream_trace import ViT, _randomise  # noqa: E402


def _planted_pair():
    a = _randomise(ViT(), 4)
    x = torch.randn(8, 1, 8, 8)
    spec, folds = cb.derive_symmetries(a, x)
    folded = cb.fold_norms({k: v.numpy().astype(np.float64) for k, v in a.state_dict().items()}, folds)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, folded, seed=3), folded)
    b = _randomise(ViT(), 5)
    b.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in moved.items()})
    return cb.ModelPair(a, b, example_input=x)


def test_only_alignment_with_every_kind_undoes_a_rotated_stream(tmp_path):
    pair = _planted_pair()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():  # labels: A's own predictions, so the end models are good and a mixture is not
        y = pair.model(0)(torch.as_tensor(x)).argmax(1).numpy()
    data = {"test": (x, y)}
    ds = symmetry_comparison(pair, data, samplers=[cb.Linear(), cb.Uniform()],
                             values={"linear": [0, 0.5, 1], "uniform": [0.25, 0.5]}, samples=1, out=tmp_path / "sym.nc")
    barrier = ds["loss_barrier"].sel(split="test")
    assert set(ds["alignment"].values) == {"naive", "permutation", "all"} and bool(ds["has_orthogonal"])
    # the same function at both ends: aligned with every kind, every combination is that function
    assert abs(float(barrier.sel(alignment="all", sampler="linear"))) < 1e-4
    assert abs(float(barrier.sel(alignment="all", sampler="uniform"))) < 1e-4
    assert float(barrier.sel(alignment="naive", sampler="linear")) > 0.05
    assert float(barrier.sel(alignment="permutation", sampler="linear")) > 0.05
    assert float(ds["objective"].sel(alignment="all")) > float(ds["objective"].sel(alignment="permutation"))
    again = symmetry_comparison(pair, data, samplers=[cb.Linear(), cb.Uniform()],
                                values={"linear": [0, 0.5, 1], "uniform": [0.25, 0.5]}, samples=1,
                                out=tmp_path / "sym.nc")
    assert again.attrs["created"] == ds.attrs["created"]  # reused, not recomputed


def test_an_aligned_pair_or_bad_samplers_are_refused_before_work():
    pair = _planted_pair()
    with pytest.raises(ConfigurationError, match="naive pair"):
        symmetry_comparison(pair.align("identity"), "digits")
    with pytest.raises(ConfigurationError, match="once"):
        symmetry_comparison(pair, "digits", samplers=[cb.Linear(), cb.Linear()])


def test_a_value_outside_a_samplers_range_is_refused_before_work():
    with pytest.raises(cb.SamplerError, match="outside"):
        symmetry_comparison(_planted_pair(), "digits", samplers=[cb.Uniform()], values={"uniform": [0.9]})


def test_the_figure_draws_each_alignment(tmp_path):
    import xarray as xr

    from combinability.plots import plot_symmetries

    value = xr.DataArray([0.0, 0.5, 1.0], dims="value")
    curves = np.array([[1.0, 3.0, 1.2], [1.0, 2.0, 1.2]])  # per sampler, along the value grid
    loss = xr.DataArray(np.broadcast_to(curves[None, :, None, :, None], (3, 2, 1, 3, 1)),
                        dims=("alignment", "sampler", "split", "value", "sample"),
                        coords={"alignment": ["naive", "permutation", "all"], "sampler": ["linear", "uniform"],
                                "split": ["test"], "value": value})
    ds = xr.Dataset({"loss": loss, "loss_barrier": loss.max(("value", "sample")) - 1.1})
    fig = plot_symmetries(ds, tmp_path / "sym.png")
    assert (tmp_path / "sym.png").stat().st_size > 1000
    bars = [p for p in fig.axes[1].patches if str(p.get_gid()).startswith("barrier|")]
    assert len(bars) == 6 and max(b.get_height() for b in bars) == pytest.approx(1.9)
    lines = [line for line in fig.axes[0].lines if str(line.get_gid()).startswith("path|")]
    assert [tuple(line.get_ydata()) for line in lines][0] == (1.0, 3.0, 1.2)
