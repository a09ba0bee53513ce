"""BatchNorm reset and REPAIR (combinability.repairs.batchnorm), against independent references.

References: torch's own BatchNorm running statistics (training mode, ``momentum=None``, the
data in one batch), and REPAIR's targets computed in numpy from the end models' features.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import combinability as cb
from combinability.data.base import ArrayDataset
from combinability.errors import ConfigurationError, DatasetError
from combinability.evaluation import Evaluator
from combinability.layers import LayerTable, Node
from combinability.layout import FlatLayout
from combinability.models import build_model
from combinability.plugins import get_backend, get_repair, list_repairs
from combinability.repairs import RepairContext
from combinability.testing import perturbed_state

torch = pytest.importorskip("torch")

SHAPE = (2, 6, 6)


def bn_table() -> LayerTable:
    """Conv and dense BatchNorms, a residual addition, a bias-free conv."""
    nodes = (Node("conv1", "conv", units=4, kernel=3, padding=1), Node("bn1", "norm", norm="batchnorm"),
             Node("act1", "relu"),
             Node("conv2", "conv", units=4, kernel=3, padding=1, bias=False), Node("bn2", "norm", norm="batchnorm"),
             Node("add", "add", ("act1", "bn2")), Node("act2", "relu"),
             Node("conv3", "conv", units=5, kernel=3, stride=2, padding=1), Node("bn3", "norm", norm="batchnorm"),
             Node("act3", "relu"), Node("pool", "avgpool"),
             Node("fc", "dense", units=6), Node("bn4", "norm", norm="batchnorm"), Node("act4", "relu"),
             Node("head", "dense", units=3))
    return LayerTable("bn_net", SHAPE, 3, nodes)


def ln_table() -> LayerTable:
    """LayerNorm and GroupNorm (REPAIR applies to any affine norm)."""
    nodes = (Node("conv1", "conv", units=4, kernel=3, padding=1), Node("ln1", "norm", norm="layernorm"),
             Node("act1", "relu"),
             Node("conv2", "conv", units=6, kernel=3, padding=1), Node("gn2", "norm", norm="groupnorm", groups=2),
             Node("act2", "relu"), Node("pool", "avgpool"), Node("head", "dense", units=3))
    return LayerTable("ln_net", SHAPE, 3, nodes)


def plain_table() -> LayerTable:
    return LayerTable("plain", SHAPE, 3, (Node("flat", "flatten"), Node("fc", "dense", units=5), Node("act", "relu"),
                                          Node("head", "dense", units=3)))


def _data(n: int = 240, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, (n, *SHAPE)) + rng.normal(0, 0.5, (1, SHAPE[0], 1, 1))).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 3, n).astype(np.int64), 3, name="random")


def _models(table: LayerTable, backend: str = "torch", k: int = 2) -> list:
    """``k`` models of ``table`` on ``backend``, all with the same weights as the torch ones (perturbed)."""
    torch_be, be = get_backend("torch"), get_backend(backend)
    out = []
    for seed in range(k):
        state = perturbed_state(torch_be.state(torch_be.build(table, seed=seed)), seed)
        out.append(be.with_state(be.build(table, seed=seed), state))
    return out


def _context(models: list, data: ArrayDataset, v=None, cache: dict | None = None, backend: str = "torch"):
    be = get_backend(backend)
    states = [be.state(m) for m in models]
    floats = [{k: a for k, a in s.items() if a.dtype.kind == "f"} for s in states]
    layout = FlatLayout.from_arrays(floats[0])
    ends = [be.asarray(layout.flatten(f)) for f in floats]
    ctx = RepairContext(be, models[0], layout, ends, v, data, be.table_of(models[0]), {} if cache is None else cache)
    return ctx, layout, ends


def _combined(ctx, vs):
    """(1 − Σ v) θ_A + Σ v_i θ_i, in numpy."""
    be = ctx.backend
    ends = [be.to_numpy(e).astype(np.float64) for e in ctx.ends]
    theta = (1 - sum(vs)) * ends[0] + sum(v * e for v, e in zip(vs, ends[1:], strict=True))
    return theta.astype(np.float32)


# -- reset -----------------------------------------------------------------------------------------------
def test_builtin_repairs_are_registered():
    assert {"reset", "repair"} <= set(list_repairs())
    assert callable(get_repair("reset").validate) and callable(get_repair("repair").validate)


def test_reset_equals_torch_training_mode_statistics_with_momentum_none():
    table = bn_table()
    models = _models(table)
    data = _data()
    ctx, layout, ends = _context(models, data)
    v = np.full(layout.size, 0.3, np.float32)
    theta = _combined(ctx, [v])
    got = layout.unflatten(ctx.backend.to_numpy(get_repair("reset")(ctx.backend.asarray(theta), ctx)))

    ref = get_backend("torch").with_state(models[0], {**get_backend("torch").state(models[0]),
                                                      **layout.unflatten(theta)})
    ref = copy.deepcopy(ref).train()
    for module in ref.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: with one batch, the exact statistics
    with torch.no_grad():
        ref(torch.tensor(data.x))
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    for node in table.norm_nodes():
        for buf in ("running_mean", "running_var"):
            np.testing.assert_allclose(got[f"{node.name}.{buf}"], want[f"{node.name}.{buf}"], atol=1e-5, rtol=1e-5)
    # everything else is the combination itself
    for name in layout.names:
        if "running" not in name:
            np.testing.assert_array_equal(got[name], layout.unflatten(theta)[name])


# -- REPAIR ----------------------------------------------------------------------------------------------
def _channel_weight(layout: FlatLayout, table: LayerTable, node: Node, v: np.ndarray) -> np.ndarray:
    """Mean of ``v`` over the producer's output row and bias entry of each channel (numpy)."""
    arrays = layout.unflatten(v.astype(np.float64))
    producer = table.producer(node.name).name
    rows = arrays[f"{producer}.weight"].reshape(arrays[f"{producer}.weight"].shape[0], -1)
    if f"{producer}.bias" in arrays:
        rows = np.concatenate([rows, arrays[f"{producer}.bias"][:, None]], axis=1)
    return rows.mean(axis=1)


@pytest.mark.parametrize("make", [bn_table, ln_table])
@pytest.mark.parametrize("k", [2, 3])
def test_repair_gives_each_norm_output_the_interpolated_statistics(make, k):
    table = make()
    models = _models(table, k=k)
    data = _data()
    ctx, layout, ends = _context(models, data)
    rng = np.random.default_rng(1)
    vs = [rng.uniform(0, 1.0 / (k - 1), layout.size).astype(np.float32) for _ in range(k - 1)]
    be = ctx.backend
    dev_v = tuple(be.asarray(v) for v in vs) if k == 3 else be.asarray(vs[0])
    ctx = RepairContext(be, ctx.template, layout, ends, dev_v, data, table, {})
    get_repair("repair").validate(ctx)
    out = be.to_numpy(get_repair("repair")(be.asarray(_combined(ctx, vs)), ctx))

    evaluator = Evaluator(be, models[0], layout)
    points = [n.name for n in table.norm_nodes()]
    feats = [evaluator.features(be.to_numpy(e), data, points) for e in ends]  # (examples x positions, channels)
    got = evaluator.features(out, data, points)
    for node in table.norm_nodes():
        ws = [_channel_weight(layout, table, node, v) for v in vs]
        shares = [1 - sum(ws), *ws]
        mean = sum(s * f[node.name].astype(np.float64).mean(0) for s, f in zip(shares, feats, strict=True))
        std = sum(s * f[node.name].astype(np.float64).std(0) for s, f in zip(shares, feats, strict=True))
        np.testing.assert_allclose(got[node.name].mean(0), mean, atol=1e-4, err_msg=node.name)
        np.testing.assert_allclose(got[node.name].std(0), std, atol=1e-4, rtol=1e-4, err_msg=node.name)


@pytest.mark.parametrize("make", [bn_table, ln_table])
def test_repair_at_v0_gives_back_model_a(make):
    table = make()
    models = _models(table)
    data = _data()
    ctx, layout, ends = _context(models, data)
    be = ctx.backend
    zero = be.asarray(np.zeros(layout.size, np.float32))
    ctx = RepairContext(be, models[0], layout, ends, zero, data, table, {})
    out = get_repair("repair")(ends[0], ctx)
    evaluator = Evaluator(be, models[0], layout)
    x = be.asarray(data.x)
    np.testing.assert_allclose(be.to_numpy(evaluator.logits([out], x)), be.to_numpy(evaluator.logits([ends[0]], x)),
                               atol=1e-4, rtol=1e-4)
    # a scalar coefficient (the linear path) is the same as a constant vector
    half = RepairContext(be, models[0], layout, ends, be.asarray(np.full(layout.size, 0.5, np.float32)), data, table)
    scalar = RepairContext(be, models[0], layout, ends, 0.5, data, table)
    theta = be.asarray(_combined(ctx, [np.float32(0.5)]))
    np.testing.assert_allclose(be.to_numpy(get_repair("repair")(theta, half)),
                               be.to_numpy(get_repair("repair")(theta, scalar)), atol=1e-6)


# -- the jax backend gives the same numbers ------------------------------------------------------------------
@pytest.mark.parametrize(("make", "name"), [(bn_table, "reset"), (bn_table, "repair"), (ln_table, "repair")])
def test_jax_backend_gives_the_same_numbers_as_torch(make, name):
    pytest.importorskip("jax")
    table, data = make(), _data(120)
    results = []
    for backend in ("torch", "jax"):
        models = _models(table, backend)
        ctx, layout, ends = _context(models, data, backend=backend)
        be = ctx.backend
        v = be.asarray(np.random.default_rng(2).uniform(0, 1, layout.size).astype(np.float32))
        ctx = RepairContext(be, models[0], layout, ends, v, data, table, {})
        theta = be.asarray(_combined(ctx, [be.to_numpy(v)]))
        results.append(be.to_numpy(get_repair(name)(theta, ctx)))
    np.testing.assert_allclose(results[1], results[0], atol=1e-4, rtol=1e-4)


# -- in a sweep -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bn_pair():
    recipe = cb.TrainRecipe(epochs=2)  # SGD with momentum, lr 0.01, no augmentation: pinned, not the paper's
    models = [cb.train("resnet20_bn", "digits", seed=s, width=0.25, recipe=recipe) for s in (0, 1)]
    return cb.ModelPair(*models, backend="torch").align("weight", seed=0)


def test_reset_and_repair_lower_the_midpoint_loss_of_batchnorm_nets(bn_pair):
    train, test = cb.load_dataset("digits", "train"), cb.load_dataset("digits", "test")
    repair_data = train.subset(600, seed=0)
    loss = {}
    for repair in (None, "reset", "repair"):
        ds = cb.sweep(bn_pair, cb.Linear(), data={"test": test}, values=[0.5], repair=repair,
                      repair_data=repair_data if repair else None)
        loss[repair] = float(ds["loss"].values.ravel()[0])
    assert loss["reset"] < loss[None]
    assert loss["repair"] < loss[None]


# -- bad inputs fail before any combination is evaluated ------------------------------------------------------
def _untrained_pair(architecture: str):
    models = [build_model(architecture, width=0.25, num_classes=10, input_shape=(1, 8, 8), seed=s)
              for s in (0, 1)]
    return cb.ModelPair(*models, backend="torch")


@pytest.mark.parametrize(("architecture", "repair", "repair_data", "error", "words"), [
    ("resnet20", "reset", "digits", ConfigurationError, ["no BatchNorm", "repair='repair'", "LayerNorm"]),
    ("resnet20_bn", "reset", None, ConfigurationError, ["repair_data="]),
    ("resnet20", "repair", None, ConfigurationError, ["repair_data="]),
    ("resnet20_bn", "reset", "wrong shape", DatasetError, ["(3, 8, 8)", "(1, 8, 8)"]),
    ("resnet20_bn", "repair", "wrong shape", DatasetError, ["(3, 8, 8)", "(1, 8, 8)"]),
    ("resnet20_bn", None, "digits", ConfigurationError, ["repair_data= is given but repair= is not"]),
])
def test_bad_inputs_fail_before_any_combination(monkeypatch, architecture, repair, repair_data, error, words):
    import combinability.combination as combination

    pair = _untrained_pair(architecture)
    if repair_data == "wrong shape":
        rng = np.random.default_rng(0)
        repair_data = ArrayDataset(rng.normal(size=(20, 3, 8, 8)).astype(np.float32), np.zeros(20, np.int64), 10)

    def fail(*args, **kwargs):
        raise AssertionError("a combination was formed before the repair checked its inputs")

    monkeypatch.setattr(combination, "combine", fail)
    test = cb.load_dataset("digits", "test").subset(20)
    with pytest.raises(error) as info:
        cb.sweep(pair, cb.Linear(), data={"test": test}, values=[0.5], repair=repair, repair_data=repair_data)
    for word in words:
        assert word in str(info.value)


def test_user_models_without_a_layer_table_are_refused():
    models = _models(bn_table())
    ctx, layout, ends = _context(models, _data(10))
    ctx = RepairContext(ctx.backend, models[0], layout, ends, None, ctx.data, None, {})
    for name in ("reset", "repair"):
        with pytest.raises(ConfigurationError, match="layer table"):
            get_repair(name).validate(ctx)


# -- the BatchNorm reference architectures --------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["resnet20_bn", "vgg11_bn"])
def test_batchnorm_reference_architectures(architecture):
    from combinability.testing import check_architecture

    check_architecture(architecture, "torch", width=0.25, num_classes=5, input_shape=(3, 10, 10))
    table = cb.get_architecture(architecture).layer_table(width=0.25, num_classes=5, input_shape=(3, 32, 32))
    assert {n.norm for n in table.norm_nodes()} == {"batchnorm"}
