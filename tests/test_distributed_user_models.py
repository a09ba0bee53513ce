"""Distributed sweeps of models and data a user brings, on a LocalCluster of two worker processes.

Each distributed result must equal the in-process sweep of the same settings bit for bit
(every variable, every coordinate): a user's torch CNN with a BatchNorm reset or REPAIR,
a language model on right-padded tokens (labels ``-100``) from a DataLoader of dict
batches, a three-model Triangle, flax linen and NNX models, with agreement counts and an
extra metric. Set-ups the workers cannot run (a model class they cannot import, another
framework version) are refused before any work, saying what to do.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("distributed")
torch = pytest.importorskip("torch")

import combinability as cb  # noqa: E402
from combinability.data.base import IGNORE_INDEX  # noqa: E402

nn, F = torch.nn, torch.nn.functional


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def assert_same(ds: xr.Dataset, ref: xr.Dataset) -> None:
    """``ds`` is ``ref`` bit for bit: every variable and coordinate (the attributes name the executor)."""
    assert sorted(ds.data_vars) == sorted(ref.data_vars)
    for name in ref.variables:
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name, strict=True)
    xr.testing.assert_identical(ds.drop_attrs(), ref.drop_attrs())


def both(pair, sampler, client, **kw) -> xr.Dataset:
    """The distributed sweep, checked against the in-process one."""
    ref = cb.sweep(pair, sampler, **kw)
    ds = cb.sweep(pair, sampler, client=client, **kw)
    assert ds.attrs["executor"] == "dask (2 workers)"
    assert_same(ds, ref)
    return ds


class BNNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 8) -> None:
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(vocab, d), nn.Linear(d, 16), nn.Linear(16, vocab)

    def forward(self, tokens):
        return self.out(F.relu(self.fc(self.emb(tokens))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _init(cls: type, seed: int, *args) -> nn.Module:
    torch.manual_seed(seed)
    return cls(*args).eval()


@pytest.fixture(scope="module")
def digits():
    train, test = cb.load_dataset("digits", "train"), cb.load_dataset("digits", "test")
    return (train.x[:64], train.y[:64]), (test.x[:48], test.y[:48])


@pytest.fixture(scope="module")
def mlp_pair(digits):
    x = torch.tensor(digits[0][0][:4])
    return cb.ModelPair(_init(MLP, 0), _init(MLP, 1), example_input=x).align("weight", seed=0)


@pytest.mark.parametrize("repair", ["reset", "repair"])
def test_batchnorm_cnn_with_repair(client, digits, repair):
    train, test = digits
    x = torch.tensor(train[0][:4])
    pair = cb.ModelPair(_init(BNNet, 0), _init(BNNet, 1), example_input=x).align("weight", seed=0)
    both(pair, cb.Uniform(), client, data=test, values=[0.0, 0.5], samples=2, repair=repair, repair_data=train,
         agreement=True)


def test_language_model_with_ignored_labels_from_a_dataloader_of_dicts(client):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (24, 6), generator=gen)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -2:] = IGNORE_INDEX  # right padding
    labels[::3, -4:] = IGNORE_INDEX
    rows = [{"input_ids": tokens[i], "labels": labels[i]} for i in range(len(tokens))]
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    pair = cb.ModelPair(_init(TinyLM, 0), _init(TinyLM, 1), example_input=tokens[:2]).align("weight", seed=0)
    ds = both(pair, cb.Uniform(), client, data=loader, values=[0.0, 0.5], samples=2, agreement=True,
              metrics=["brier"])
    # the padded positions are not scored: every category together counts the labelled ones
    assert (ds["agreement"].sum("category") == int((labels != IGNORE_INDEX).sum())).all()


def test_three_models_with_agreement_and_brier(client, digits):
    x = torch.tensor(digits[0][0][:4])
    pair = cb.ModelPair(_init(MLP, 0), _init(MLP, 1), model_c=_init(MLP, 2), example_input=x).align("weight", seed=0)
    both(pair, cb.Triangle(), client, data=digits[1], values=[(0.0, 0.0), (0.5, 0.25), (0.0, 1.0)],
         agreement=True, metrics=["brier"])


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_flax_models(client, digits, kind):
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax
    from flax import nnx

    train, test = digits
    x = train[0].transpose(0, 2, 3, 1)
    if kind == "linen":
        net = fnn.Sequential([lambda h: h.reshape(h.shape[0], -1), fnn.Dense(8), fnn.relu, fnn.Dense(10)])
        a, b = ((net, net.init(jax.random.PRNGKey(s), x[:1])) for s in (0, 1))
    else:
        a, b = (nnx.Sequential(lambda h: h.reshape(h.shape[0], -1), nnx.Linear(64, 8, rngs=nnx.Rngs(s)), nnx.relu,
                               nnx.Linear(8, 10, rngs=nnx.Rngs(s))) for s in (0, 1))
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight", seed=0)
    both(pair, cb.Uniform(), client, data=(test[0].transpose(0, 2, 3, 1), test[1]), values=[0.0, 0.5], samples=1,
         agreement=True, metrics=["brier"])


def test_model_class_the_workers_cannot_import_is_refused(client, digits, tmp_path, monkeypatch):
    folder = tmp_path / "only_here"
    folder.mkdir()
    (folder / "usernet_only_here.py").write_text(textwrap.dedent("""
        import torch.nn as nn


        class UserNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 10)

            def forward(self, x):
                return self.fc2(self.fc1(x.flatten(1)).relu())
    """))
    monkeypatch.syspath_prepend(str(folder))  # the client's path only: the workers are other processes
    import usernet_only_here

    try:
        x = torch.tensor(digits[0][0][:4])
        pair = cb.ModelPair(_init(usernet_only_here.UserNet, 0), _init(usernet_only_here.UserNet, 1),
                            example_input=x).align("weight", seed=0)
        kw = dict(data=digits[1], values=[0.0, 0.5], samples=1)
        with pytest.raises(cb.ConfigurationError) as err:
            cb.sweep(pair, cb.Uniform(), client=client, out=tmp_path / "r.nc", **kw)
        message = str(err.value)
        assert "usernet_only_here.UserNet" in message and "tcp://" in message
        assert "client.upload_file(" in message and "PYTHONPATH" in message
        assert not (tmp_path / "r.nc").exists()
        # as the message says: shipped to the workers, the same sweep runs, bit for bit
        client.upload_file(str(folder / "usernet_only_here.py"))
        both(pair, cb.Uniform(), client, **kw)
    finally:
        client.run(lambda: sys.modules.pop("usernet_only_here", None))
        sys.modules.pop("usernet_only_here", None)


def _set_torch_version(version: str) -> str:
    previous, torch.__version__ = torch.__version__, version
    return previous


def test_workers_with_another_framework_version_are_refused(client, mlp_pair, digits, tmp_path):
    worker = sorted(client.scheduler_info()["workers"])[0]
    previous = client.run(_set_torch_version, "0.0.1", workers=[worker])
    try:
        with pytest.raises(cb.IncompatibleVersionError) as err:
            cb.sweep(mlp_pair, cb.Linear(), data=digits[1], client=client, out=tmp_path / "v.nc")
    finally:
        client.run(_set_torch_version, previous[worker], workers=[worker])
    message = str(err.value)
    assert worker in message and "torch 0.0.1" in message and f"torch=={torch.__version__}" in message
    assert not (tmp_path / "v.nc").exists()


def test_unpicklable_objects_are_refused_before_any_work(client, mlp_pair, digits, tmp_path):
    import threading

    from combinability.evaluation import LogitMetric, cross_entropy

    lock = threading.Lock()

    def locked(xp, logits, y):
        with lock:
            return cross_entropy(xp, logits, y)

    with pytest.raises(cb.ConfigurationError, match="cannot be pickled to send them to the Dask workers"):
        cb.sweep(mlp_pair, cb.Linear(), data=digits[1], metrics=[LogitMetric("locked", locked)], client=client,
                 out=tmp_path / "p.nc")
    assert not (tmp_path / "p.nc").exists()


def test_a_file_with_every_cell_streamed_but_not_finished_resumes_to_the_final_result(client, mlp_pair, digits,
                                                                                   tmp_path, monkeypatch):
    """The client killed after its last cell was streamed and before the file was replaced."""
    from combinability.result_stream import ResultStream

    kw = dict(data=digits[1], values=[0.0, 0.5], samples=2, agreement=True, out=tmp_path / "s.nc")

    def killed(self, final):
        self.close()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ResultStream, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            cb.sweep(mlp_pair, cb.Uniform(), client=client, **kw)
    assert bool(xr.load_dataset(tmp_path / "s.nc")["done"].all())
    ds = cb.sweep(mlp_pair, cb.Uniform(), client=client, **kw)
    ref = cb.sweep(mlp_pair, cb.Uniform(), **{**kw, "out": None})
    assert_same(ds, ref)
    assert_same(xr.load_dataset(tmp_path / "s.nc"), ref)
