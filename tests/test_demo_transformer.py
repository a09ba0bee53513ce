"""The demo's transformer step (issue 14): two tiny ViTs trained, compared, reused, drawn.

The reference for the result is a plain forward pass of model A, rebuilt from its checkpoint's
arrays (read with safetensors, not the library) in the framework's own module, and a numpy
cross-entropy: the naive linear path at v = 0 is model A itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from combinability.data import load_dataset
from combinability.demo import DemoSettings, vit_symmetries
from combinability.hookspecs import hookimpl
from combinability.report import report
from combinability.results import open_results

NEEDS_FLAX = pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed")
BACKENDS = ["torch", pytest.param("jax", marks=NEEDS_FLAX)]
QUICK = DemoSettings.quick()
#: The quick ViT on 8x8 digits: a 4x4 grid of 2x2 patches, d_model 64 x 0.25.
GEOMETRY = {"image_size": 8, "patch_size": 2, "channels": 1, "num_classes": 10, "d_model": 16, "heads": 4,
            "depth": 2, "mlp": 32}


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def _plain_logits(backend: str, checkpoint: Path, x: np.ndarray) -> np.ndarray:
    """Model A's logits: the checkpoint's arrays in the framework's own TinyViT, called directly."""
    arrays = load_file(str(checkpoint))
    if backend == "torch":
        import torch
        from combinability_torch.transformers import TinyViT

        model = TinyViT(**GEOMETRY)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        with torch.no_grad():
            return model.eval()(torch.tensor(x)).numpy()
    from combinability_jax.transformers import TinyViT
    from flax.traverse_util import unflatten_dict

    variables = unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    return np.asarray(TinyViT(**GEOMETRY).apply(variables, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quick_step_matches_a_plain_forward_pass_reuses_and_draws(tmp_path, backend):
    ds = vit_symmetries(tmp_path, "digits", backend, QUICK)
    result = tmp_path / "symmetries.nc"
    checkpoints = sorted((tmp_path / "models").glob("tinyvit_seed*.ckpt"))
    assert result.exists() and [p.name for p in checkpoints] == ["tinyvit_seed0_n300.ckpt", "tinyvit_seed1_n300.ckpt"]

    test = load_dataset("digits", "test", limit=QUICK.vit_limit)
    own_loss = _cross_entropy(_plain_logits(backend, checkpoints[0], test.x), test.y)
    stored = open_results(result)
    path = stored["loss"].sel(sampler="linear", split="test").isel(sample=0)
    assert path.sel(alignment="naive", value=0.0) == pytest.approx(own_loss, rel=1e-4)
    for alignment in ("permutation", "all"):  # aligning B moves B only: every path starts at model A
        assert path.sel(alignment=alignment, value=0.0) == pytest.approx(own_loss, rel=1e-4)
    assert [str(a) for a in stored["alignment"].values] == ["naive", "permutation", "all"]
    assert [str(s) for s in stored["sampler"].values] == list(QUICK.vit_samplers)
    assert bool(stored["has_orthogonal"])  # the residual stream is found, so "all" rotates it

    stamps = {p: p.stat().st_mtime_ns for p in [result, *checkpoints]}
    again = vit_symmetries(tmp_path, "digits", backend, QUICK)  # finished work is reused, not redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    np.testing.assert_array_equal(again["loss"].values, ds["loss"].values)

    written = report([tmp_path], tmp_path / "figures")
    assert (tmp_path / "figures" / "symmetries.png") in written
    assert (tmp_path / "figures" / "symmetries.png").stat().st_size > 10_000
    summary = (tmp_path / "figures" / "summary.md").read_text()
    naive, perm, rotated = (float(stored["loss_barrier"].sel(alignment=a, sampler="linear", split="test"))
                            for a in ("naive", "permutation", "all"))
    assert f"| symmetries | linear | test | {naive:.3f} | {perm:.3f} | {rotated:.3f} |" in summary


def test_quick_settings_stay_small():
    assert QUICK.vit_train <= 300 and QUICK.vit_epochs == 1 and QUICK.vit_limit <= 100
    assert QUICK.vit_values() == {"linear": [0.0, 0.5, 1.0], "uniform": [0.5]}
    assert DemoSettings().vit_values()["linear"] == [0.0, 0.25, 0.5, 0.75, 1.0]


# -- the mechanism the demo trains through: architectures built by module factories --------------
def _plugin_net(*, width: float, num_classes: int, input_shape: tuple[int, ...], seed: int):
    """A plugin's factory: a seeded torch module of its own (no layer table)."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), int(8 * width)), nn.ReLU(),
                             nn.Linear(int(8 * width), num_classes))


class _FactoryPlugin:
    @hookimpl
    def combinability_register_architectures(self):
        from combinability.architecture import Architecture
        from combinability.training import TrainRecipe

        return [Architecture("factory_net", modules={"torch": _plugin_net}, default_width=2,
                             recipe=TrainRecipe(epochs=1, lr=1e-2, optimizer="adam", weight_decay=0.0))]


@pytest.fixture
def factory_plugin():
    from combinability import plugins

    plugins.reset_plugins()
    plugins.register_plugin(_FactoryPlugin(), name="factory-plugin")
    yield
    plugins.reset_plugins()


def test_a_plugins_factory_architecture_trains_saves_and_reloads(tmp_path, factory_plugin):
    import torch

    import combinability as cb
    from combinability.errors import ConfigurationError

    data = load_dataset("digits", "train", limit=200)
    ckpt = tmp_path / "net.ckpt"
    model = cb.train("factory_net", data, seed=3, checkpoint=ckpt)
    assert model[1].out_features == 16  # default width 2 reached the factory
    loaded = cb.load_model(ckpt, backend="torch")
    x = torch.tensor(load_dataset("digits", "test", limit=16).x)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    stamp = ckpt.stat().st_mtime_ns
    cb.train("factory_net", data, seed=3, checkpoint=ckpt)  # same settings: reused, not retrained
    assert ckpt.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigurationError, match="has no model for backend 'jax'; it has models for: torch"):
        cb.train("factory_net", data, backend="jax", seed=3)
    with pytest.raises(ConfigurationError, match="has no layer table"):
        cb.get_architecture("factory_net").layer_table(num_classes=10, input_shape=(1, 8, 8))


@NEEDS_FLAX
def test_an_architecture_needs_a_table_or_factories_and_a_checkpoint_its_own_backend(tmp_path):
    import combinability as cb
    from combinability.architecture import Architecture
    from combinability.errors import IncompatibleModelsError, PluginError

    with pytest.raises(PluginError, match="not neither"):
        Architecture("nothing")
    with pytest.raises(PluginError, match="not both"):
        Architecture("both", "combinability.zoo:mlp_table", modules={"torch": "x:y"})
    ckpt = tmp_path / "vit.ckpt"
    cb.train("tinyvit", load_dataset("digits", "train", limit=100), epochs=0, width=0.125, checkpoint=ckpt)
    with pytest.raises(IncompatibleModelsError, match="written by the 'torch' backend.*loads into backend='torch'"):
        cb.load_model(ckpt, backend="jax")


def test_the_demo_refuses_data_its_vits_cannot_take_before_training(tmp_path, monkeypatch):
    import combinability.data
    from combinability.data.base import ArrayDataset
    from combinability.demo import run_demo
    from combinability.errors import ConfigurationError

    vectors = ArrayDataset(np.zeros((4, 13), np.float32), np.zeros(4, np.int64), 2, "vectors", "test")
    monkeypatch.setattr(combinability.data, "load_dataset", lambda *args, **kwargs: vectors)
    with pytest.raises(ConfigurationError, match=r"dataset 'vectors' \(inputs \(13,\)\) does not fit its ViT step"):
        run_demo(tmp_path / "demo", data="vectors", quick=True, progress=False)
    assert not (tmp_path / "demo").exists()  # nothing trained, nothing written
