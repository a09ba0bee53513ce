"""Identity stitching in both directions of the paper's §4.3 (issue 10, item 12).

The paper's formula (with Definition 3.2's convention) puts π(Θ_B) below the cut and Θ_A
above; its first sentence the lower part of A and the upper part of B. ``Stitch(lower="b")``
is the former (the default), ``Stitch(lower="a")`` the latter. Every reference here is
built independently of the code under test: masks from the layer numbers the test assigns,
forward passes of small MLPs written in plain numpy (float64), permutations applied by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import combinability as cb
from combinability.backend import NumpyRandom
from combinability.errors import SamplerError
from combinability.layout import FlatLayout
from combinability.samplers import DrawContext, Stitch, get_sampler
from combinability.sweeps import ResumeMismatchError

SIZES = (8, 16, 12, 3)  # input, two hidden layers, classes: three linear layers, L = 3
L = len(SIZES) - 1


# -- the mask ------------------------------------------------------------------------------
# arrays in flat order, with the layer each belongs to (deliberately not monotone in flat order)
ARRAYS = {"w0": (4, 0), "w2": (3, 2), "b0": (2, 0), "w1": (5, 1), "b2": (1, 2), "b1": (2, 1), "w3": (6, 3)}


def _layout() -> FlatLayout:
    params = {name: np.zeros(size, np.float32) for name, (size, _) in ARRAYS.items()}
    return FlatLayout.from_arrays(params, layers={name: layer for name, (_, layer) in ARRAYS.items()})


def _expected_mask(cut: int, lower: str) -> np.ndarray:
    """v (the weight of B) element by element: 1 where the element's layer is taken from B."""
    parts = []
    for size, layer in ARRAYS.values():
        below = layer < cut
        from_b = below if lower == "b" else not below
        parts.append(np.full(size, 1.0 if from_b else 0.0))
    return np.concatenate(parts)


@pytest.mark.parametrize("lower", ["a", "b"])
@pytest.mark.parametrize("cut", range(5))
def test_mask_matches_the_layer_numbers(lower, cut):
    ctx = DrawContext(_layout(), NumpyRandom(0))
    v = Stitch(lower=lower).draw(cut, ctx)
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, _expected_mask(cut, lower))


def test_the_two_directions_are_complements_and_swap_the_ends():
    ctx = DrawContext(_layout(), NumpyRandom(0))
    for cut in range(5):
        assert np.array_equal(Stitch(lower="a").draw(cut, ctx), 1 - Stitch(lower="b").draw(cut, ctx))
    # lower="b": l = 0 is A (v = 0), l = L is B (v = 1); lower="a": the other way round
    assert not Stitch(lower="b").draw(0, ctx).any() and Stitch(lower="b").draw(4, ctx).all()
    assert Stitch(lower="a").draw(0, ctx).all() and not Stitch(lower="a").draw(4, ctx).any()


def test_torch_arrays_give_the_same_mask():
    layout = _layout()
    layer_index = torch.as_tensor(np.repeat([layer for _, layer in ARRAYS.values()],
                                            [size for size, _ in ARRAYS.values()]))
    ctx = DrawContext(layout, NumpyRandom(0), xp=None, dtype=None, layer_index=layer_index,
                      theta_a=torch.zeros(layout.size))
    v = Stitch(lower="a").draw(2, ctx)
    assert isinstance(v, torch.Tensor)
    np.testing.assert_array_equal(v.numpy(), _expected_mask(2, "a"))


# -- settings, validation, registry -------------------------------------------------------------
def test_default_and_settings_carry_the_direction():
    assert Stitch().lower == "b"
    assert Stitch().settings == {"sampler": "stitch", "num_layers": None, "lower": "b"}
    assert Stitch(lower="A").settings["lower"] == "a"  # case-insensitive, stored normalised
    assert Stitch(lower="a") != Stitch(lower="b")
    assert get_sampler("stitch", lower="a") == Stitch(lower="a")


@pytest.mark.parametrize("bad", ["c", "", "ab", 1, None, "π(Θ_B)"])
def test_invalid_direction_is_refused_with_the_valid_values(bad):
    with pytest.raises(SamplerError, match=r"Stitch: lower=.* is not a model; valid values: 'b' .* or 'a'"):
        Stitch(lower=bad)
    with pytest.raises(ValueError):  # the builtin it refines
        get_sampler("stitch", lower=bad)


def test_direction_in_words():
    assert Stitch().direction == "layers below the cut from B (π(Θ_B)), above from A (Θ_A)"
    assert Stitch(lower="a").direction == "layers below the cut from A (Θ_A), above from B (π(Θ_B))"


# -- the stitched network against plain numpy -------------------------------------------------
def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < L - 1:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    with torch.no_grad():  # larger weights than the default init: cuts differ clearly in loss
        for p in net.parameters():
            p.mul_(3.0)
    return net


def _weights(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
            for m in net if isinstance(m, nn.Linear)]


def _numpy_loss(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> float:
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    z = h - h.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def _stitched(lower_w, upper_w, cut: int):
    """Layers ``< cut`` from ``lower_w``, the rest from ``upper_w``."""
    return [lower_w[i] if i < cut else upper_w[i] for i in range(L)]


@pytest.fixture(scope="module")
def mlp_case():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((96, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], 96)
    net_a, net_b = _mlp(0), _mlp(1)
    pair = cb.ModelPair(net_a, net_b, example_input=torch.as_tensor(x[:8]))
    return net_a, net_b, pair, x, y


@pytest.mark.parametrize("lower", ["a", "b"])
def test_sweep_of_a_naive_pair_equals_numpy_stitching(mlp_case, lower):
    net_a, net_b, pair, x, y = mlp_case
    assert pair.layout.num_layers == L
    ds = cb.sweep(pair, Stitch(lower=lower), data={"test": (x, y)}, splits=["test"])
    assert ds["layer"].values.tolist() == list(range(L + 1))
    wa, wb = _weights(net_a), _weights(net_b)
    below, above = (wa, wb) if lower == "a" else (wb, wa)
    got = ds["loss"].sel(split="test").isel(sample=0).values
    want = [_numpy_loss(_stitched(below, above, cut), x, y) for cut in range(L + 1)]
    mirrored = [_numpy_loss(_stitched(above, below, cut), x, y) for cut in range(L + 1)]
    # the reference tells the two directions apart at every interior cut
    assert all(abs(w - m) > 1e-2 for w, m in zip(want[1:-1], mirrored[1:-1], strict=True))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # the ends are the models, as documented: the `lower` model at l = L, the other at l = 0
    loss_a, loss_b = float(ds["loss_a"].sel(split="test")), float(ds["loss_b"].sel(split="test"))
    assert (got[L], got[0]) == ((loss_a, loss_b) if lower == "a" else (loss_b, loss_a))
    assert json.loads(ds.attrs["sampler_settings"])["lower"] == lower


def _permuted_by_hand(weights, perm) -> list[tuple[np.ndarray, np.ndarray]]:
    """π(B) with gather semantics: unit j of a hidden layer is B's unit perm[j] (matched by width)."""
    out = []
    previous = None
    for w, b in weights:
        p = perm.get(w.shape[0])
        w = w if previous is None else w[:, previous]
        out.append((w[p], b[p]) if p is not None else (w, b))
        previous = p
    return out


def test_identity_stitching_both_directions_on_an_aligned_pair(mlp_case, tmp_path):
    from combinability import experiments as ex

    net_a, net_b, pair, x, y = mlp_case
    aligned = pair.align("weight", seed=0)
    perm = {len(p): np.asarray(p) for p in aligned.permutation.values()}
    assert sorted(perm) == sorted(SIZES[1:-1])
    wa, wb, wpb = _weights(net_a), _weights(net_b), _permuted_by_hand(_weights(net_b), perm)
    data = {"test": (x, y)}
    for lower in ("a", "b"):
        ds = ex.identity_stitching(aligned, lower=lower, data=data, splits=["test"], out=tmp_path / f"{lower}.nc",
                                   attrs={"note": "test"})
        assert ds.attrs["stitch_lower"] == lower and ds.attrs["note"] == "test"
        assert ds.attrs["stitch_direction"] == Stitch(lower=lower).direction
        for alignment, b_weights in (("naive", wb), ("aligned", wpb)):
            below, above = (wa, b_weights) if lower == "a" else (b_weights, wa)
            got = ds["loss"].sel(alignment=alignment, split="test").isel(sample=0).values
            want = [_numpy_loss(_stitched(below, above, cut), x, y) for cut in range(L + 1)]
            np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"{lower=}, {alignment}")
    with pytest.raises(SamplerError, match="valid values"):
        ex.identity_stitching(aligned, lower="up", data=data, splits=["test"])


def test_a_file_of_one_direction_does_not_resume_the_other(mlp_case, tmp_path):
    _, _, pair, x, y = mlp_case
    path = tmp_path / "stitch.nc"
    cb.sweep(pair, Stitch(lower="b"), data={"test": (x, y)}, splits=["test"], out=path)
    with pytest.raises(ResumeMismatchError):
        cb.sweep(pair, Stitch(lower="a"), data={"test": (x, y)}, splits=["test"], out=path)


# -- figures ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lower", ["a", "b"])
def test_figure_says_which_model_is_below_the_cut(mlp_case, lower):
    from combinability.plots import plot_sweep

    _, _, pair, x, y = mlp_case
    ds = cb.sweep(pair, Stitch(lower=lower), data={"test": (x, y)}, splits=["test"])
    ds.attrs["layer_names"] = ", ".join(pair.layer_names)
    fig = plot_sweep(ds, splits=("test",))
    other = "A" if lower == "b" else "B"
    assert f"layers below the cut from {lower.upper()}" in fig._suptitle.get_text()
    assert fig.axes[0].get_xlabel() == f"layer l   (layers below l from model {lower.upper()}, above from {other})"
    ends = {ln.get_marker(): float(ln.get_xdata()[0]) for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 1}
    # square: model A, diamond: model B; the `lower` model sits at l = L
    assert (ends["s"], ends["D"]) == ((float(L), 0.0) if lower == "a" else (0.0, float(L)))


def test_figure_of_a_file_without_the_setting_reads_as_the_old_direction(mlp_case):
    """Files written before ``lower`` existed were all B-below-the-cut."""
    from combinability.plots import plot_sweep

    _, _, pair, x, y = mlp_case
    ds = cb.sweep(pair, Stitch(), data={"test": (x, y)}, splits=["test"])
    ds.attrs["sampler_settings"] = json.dumps({"sampler": "stitch", "num_layers": None})
    fig = plot_sweep(ds, splits=("test",))
    assert "layers below the cut from B (π(Θ_B)), above from A (Θ_A)" in fig._suptitle.get_text()


# -- the command line ---------------------------------------------------------------------------
def test_cli_sampler_arg_selects_the_direction(tmp_path, monkeypatch, capsys):
    from combinability.cli import main

    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        cb.train("mlp", "digits", seed=seed, epochs=1, width=0.125, checkpoint=tmp_path / f"m{seed}.ckpt",
                 progress=False)
    assert main(["sweep", "m0.ckpt", "m1.ckpt", "--sampler", "stitch", "--sampler-arg", "lower=a",
                 "--values", "0,4", "--limit", "100", "--out", "s.nc", "--quiet"]) == 0
    ds = cb.open_results("s.nc")
    assert json.loads(ds.attrs["sampler_settings"])["lower"] == "a"
    loss = ds["loss"].sel(split="test").isel(sample=0).values
    # lower="a": l = 0 is model B, l = L = 4 model A
    assert loss[0] == float(ds["loss_b"].sel(split="test")) and loss[1] == float(ds["loss_a"].sel(split="test"))
    capsys.readouterr()
    assert main(["sweep", "m0.ckpt", "m1.ckpt", "--sampler", "stitch", "--sampler-arg", "lower=c",
                 "--values", "0", "--limit", "100", "--out", "t.nc", "--quiet"]) != 0
    assert "valid values: 'b'" in capsys.readouterr().err


# -- the demo ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("attrs", "message"), [
    ({"note": [1, 2]}, r"invalid entries: \['note'\]"),
    ({1: "x"}, r"invalid entries: \[1\]"),
    ({"flag": True}, r"invalid entries: \['flag'\]"),
    ("note=x", "attrs must be a mapping"),
])
def test_demo_refuses_malformed_attrs_before_training(tmp_path, attrs, message):
    from combinability.demo import run_demo
    from combinability.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        run_demo(tmp_path / "demo", data="digits", quick=True, progress=False, attrs=attrs)
    assert not (tmp_path / "demo").exists()  # nothing trained, nothing written

