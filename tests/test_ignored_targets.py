"""Targets labelled -100 (torch's ``ignore_index``, Hugging Face's padding label) are not scored, and data a
user's pipeline yields (dict batches, map-style datasets) is read as it is.

References: torch's own ``F.cross_entropy(..., ignore_index=-100)`` on each model's logits, its autograd
gradient of that loss, and the same evaluation on the data with the unscored examples dropped.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.data.base import IGNORE_INDEX
from combinability.data.convert import as_dataset, as_datasets
from combinability.errors import DatasetError
from combinability.evaluation import mean_cross_entropy
from combinability.metrics import agreement_counts

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB, T, D = 13, 7, 16


class TokenNet(nn.Module):
    """A per-position language model (embedding, MLP, logits over the vocabulary): ``(n, T)`` -> ``(n, T, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.fc1 = nn.Linear(D, 24)
        self.fc2 = nn.Linear(24, VOCAB)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.embed(x))))


def _padded(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences right-padded with token 0, their next-token labels -100 where padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (n, T))
    labels = rng.integers(0, VOCAB, (n, T))
    lengths = rng.integers(2, T + 1, n)
    for i, length in enumerate(lengths):
        tokens[i, length:] = 0
        labels[i, length:] = IGNORE_INDEX
    return tokens, labels


def _models() -> list[nn.Module]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(TokenNet().eval())
    return out


def test_a_language_pairs_padded_positions_are_not_scored_as_torch_ignores_them():
    a, b = _models()
    tokens, labels = _padded()
    x = torch.tensor(tokens)
    pair = cb.ModelPair(a, b, example_input=x[:2]).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(tokens, labels), values=[0.0, 1.0], splits=["test"],
                  metrics=["brier"], agreement=True)
    y = torch.tensor(labels)
    keep = labels != IGNORE_INDEX
    with torch.no_grad():
        for model, lam in zip((a, b), (0.0, 1.0), strict=True):
            logits = model(x)
            want = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE_INDEX).item()
            cell = ds.sel(split="test", lam=lam).isel(sample=0)
            assert float(cell["loss"]) == pytest.approx(want, rel=1e-5)
            pred = logits.argmax(-1).numpy()
            assert float(cell["accuracy"]) == pytest.approx(np.mean(pred[keep] == labels[keep]))
            p = torch.softmax(logits, -1).numpy()[keep]
            onehot = np.eye(VOCAB)[labels[keep]]
            assert float(cell["brier"]) == pytest.approx(np.mean(((p - onehot) ** 2).sum(-1)), rel=1e-5)
            assert int(cell["agreement"].sum()) == int(keep.sum())  # every scored target, once


def test_an_ignored_example_counts_as_a_dropped_one(digits_pair):
    test = cb.load_dataset("digits", "test")
    x, y = test.x[:300], test.y[:300].copy()
    dropped = np.arange(0, 300, 7)
    y[dropped] = IGNORE_INDEX
    kept = np.setdiff1d(np.arange(300), dropped)
    settings = dict(values=[0.0, 0.3, 0.5], samples=2, seed=4, splits=["test"], metrics=["brier"], agreement=True)
    ignored = cb.sweep(digits_pair, cb.Uniform(), data=(x, y), **settings)
    reference = cb.sweep(digits_pair, cb.Uniform(), data=(x[kept], y[kept]), **settings)
    for name in ("loss", "accuracy", "brier", "agreement", "loss_a", "accuracy_b"):
        np.testing.assert_allclose(ignored[name].values, reference[name].values, rtol=1e-5, err_msg=name)


def test_agreement_counts_leave_out_ignored_targets():
    pred = np.array([[0, 1, 2, 3], [1, 1, 1, 1]])
    labels = np.array([0, IGNORE_INDEX, 2, 3])
    counts = agreement_counts(pred, [0, 1, 0, 0], [0, 0, 2, 0], labels)
    want = agreement_counts(pred[:, [0, 2, 3]], [0, 0, 0], [0, 2, 0], [0, 2, 3])
    np.testing.assert_array_equal(counts, want)
    assert counts.sum(axis=1).tolist() == [3, 3]


def test_the_training_loss_and_its_gradient_are_torchs_with_ignore_index():
    from combinability.analysis.layerwise import full_gradient

    model = _models()[0]
    tokens, labels = _padded(n=9, seed=2)
    x, y = torch.tensor(tokens), torch.tensor(labels)
    logits = model(x)
    reference = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE_INDEX)
    from array_api_compat import torch as xp

    assert mean_cross_entropy(xp, logits.detach(), y).item() == pytest.approx(reference.item(), rel=1e-6)
    # a batch of padding only adds nothing (no 0 / 0)
    none = torch.full_like(y, IGNORE_INDEX)
    assert mean_cross_entropy(xp, logits.detach(), none).item() == 0.0

    grads = torch.autograd.grad(reference, list(model.parameters()))
    want = np.concatenate([g.detach().numpy().ravel() for g in grads])
    pair = cb.ModelPair(model, _models()[1], example_input=x[:2])
    be = pair.backend_obj
    prepared = be.prepare(pair.template, pair.layout)
    names = [n for n, _ in model.named_parameters()]
    order = np.concatenate([np.arange(e.offset, e.stop) for n in names for e in pair.layout.entries if e.name == n])
    got = full_gradient(prepared, be, be.asarray(pair.theta(0)), x, y, batch_size=4)  # batches of unequal padding
    np.testing.assert_allclose(got[order], want, rtol=1e-4, atol=1e-7)


def test_labels_outside_the_classes_other_than_the_ignore_index_are_refused():
    a, b = _models()
    tokens, labels = _padded()
    pair = cb.ModelPair(a, b, example_input=torch.tensor(tokens[:2]))
    for bad in (-1, VOCAB):
        wrong = labels.copy()
        wrong[0, 0] = bad
        with pytest.raises(DatasetError, match=rf"\[0, {VOCAB}\)" + (".*labelled -100" if bad < 0 else "")):
            cb.sweep(pair, cb.Linear(), data=(tokens, wrong), values=[0.5], splits=["test"])
    with pytest.raises(DatasetError, match="every label .* is -100"):
        cb.sweep(pair, cb.Linear(), data=(tokens, np.full_like(labels, IGNORE_INDEX)), values=[0.5],
                 splits=["test"])


# -- data as a user's pipeline yields it ---------------------------------------------------------------------
def test_dict_batches_and_map_style_datasets_read_as_their_arrays():
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    tokens, labels = _padded(n=10)
    records = [{"input_ids": torch.tensor(t), "labels": torch.tensor(label), "attention_mask": torch.ones(T)}
               for t, label in zip(tokens, labels, strict=True)]

    class Records(Dataset):
        def __len__(self) -> int:
            return len(records)

        def __getitem__(self, i: int) -> dict:
            return records[i]

    for data in (DataLoader(Records(), batch_size=4), Records(), TensorDataset(torch.tensor(tokens),
                                                                                 torch.tensor(labels)),
                 {"input_ids": tokens, "labels": labels}):
        ds = as_dataset(data)
        np.testing.assert_array_equal(ds.x, tokens)
        np.testing.assert_array_equal(ds.y, labels)
    images = {"image": np.zeros((3, 1, 4, 4), np.float32), "label": np.array([0, 2, 1])}
    assert as_dataset(images).num_classes == 3
    one_split = as_datasets({"input_ids": tokens, "labels": labels})
    assert list(one_split) == ["test"] and len(one_split["test"]) == 10


def test_batches_the_library_cannot_pass_whole_are_refused_by_name():
    from torch.utils.data import DataLoader

    tokens, labels = _padded(n=6)
    masked = [{"input_ids": torch.tensor(tokens), "labels": torch.tensor(labels),
               "attention_mask": torch.tensor((tokens != 0).astype(np.int64))}]
    with pytest.raises(DatasetError, match="'attention_mask' beside the inputs.*positions -100"):
        as_dataset(DataLoader(masked, batch_size=None))
    with pytest.raises(DatasetError, match=r"keys \['ids', 'labels', 'mask'\].*one key of the inputs"):
        as_dataset({"ids": tokens, "mask": tokens, "labels": labels})
    ragged = [(torch.tensor(tokens[:3, :5]), torch.tensor(labels[:3, :5])), (torch.tensor(tokens[3:]),
                                                                             torch.tensor(labels[3:]))]
    with pytest.raises(DatasetError, match="several shapes.*pad sequences to one length"):
        as_dataset(DataLoader(ragged, batch_size=None))


# -- jax: the same definitions in the jitted evaluation and training loss --------------------------------------
def test_a_flax_language_models_padded_positions_are_not_scored():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax

    class FlaxTokenNet(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.relu(fnn.Dense(24)(fnn.Embed(VOCAB, D)(x)))
            return fnn.Dense(VOCAB)(h)

    tokens, labels = _padded(n=10, seed=5)
    net = FlaxTokenNet()
    variables = [net.init(jax.random.PRNGKey(s), tokens[:2]) for s in (0, 1)]
    pair = cb.ModelPair(*((net, v) for v in variables), example_input=tokens[:2]).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(tokens, labels), values=[0.0, 1.0], splits=["test"], batch_size=4)
    keep = labels != IGNORE_INDEX
    for lam, v in zip((0.0, 1.0), variables, strict=True):
        z = np.asarray(net.apply(v, tokens), dtype=np.float64)[keep]  # numpy reference over the scored targets
        top = z.max(-1, keepdims=True)
        ce = np.log(np.exp(z - top).sum(-1)) + top[:, 0] - z[np.arange(len(z)), labels[keep]]
        cell = ds.sel(split="test", lam=lam).isel(sample=0)
        assert float(cell["loss"]) == pytest.approx(ce.mean(), rel=1e-5)
        assert float(cell["accuracy"]) == pytest.approx(np.mean(z.argmax(-1) == labels[keep]))
    # the jitted training loss: the same mean, and a padding-only batch adds 0
    from combinability.evaluation import training_loss

    xp = pair.backend_obj.xp()
    loss = jax.jit(training_loss(xp))
    z = net.apply(variables[0], tokens)
    top = np.asarray(z, np.float64)
    want = np.mean((np.log(np.exp(top).sum(-1)) - np.take_along_axis(top, np.where(keep, labels, 0)[..., None],
                                                                       -1)[..., 0])[keep])
    assert float(loss(z, labels)) == pytest.approx(want, rel=1e-5)
    assert float(loss(z, np.full_like(labels, IGNORE_INDEX))) == 0.0
