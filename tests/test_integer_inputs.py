"""Integer inputs reach a model as they are (token ids); a model that reads floats (images, features) fails
on them with the framework's own error, which the library names: a DatasetError that says the inputs are
integers and how to give floats."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import DatasetError, TracingError

torch = pytest.importorskip("torch")
nn = torch.nn


def _pair():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
            for _ in range(2)]
    return cb.ModelPair(*nets, example_input=torch.randn(4, 1, 4, 4))


def test_integer_images_are_named_in_a_sweep_and_in_activation_matching():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 17, size=(8, 1, 4, 4)), rng.integers(0, 3, size=8)
    with pytest.raises(DatasetError, match=r"integers \(int64\).*x\.astype\(np\.float32\)"):
        cb.sweep(_pair(), cb.Linear(), data=(x, y), values=[0.5], splits=["test"])
    with pytest.raises(DatasetError, match=r"integers \(int64\)"):
        _pair().align("activation", data=(x, y))
    ds = cb.sweep(_pair(), cb.Linear(), data=(x.astype(np.float32), y), values=[0.5], splits=["test"])
    assert np.isfinite(float(ds["loss"].squeeze()))


class TinyLM(nn.Module):
    """Token and position embeddings, a Linear per position: logits (n, T, vocab)."""

    def __init__(self, vocab: int = 7, context: int = 6) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, 8), nn.Embedding(context, 8)
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, vocab)

    def forward(self, idx):
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        return self.head(torch.relu(self.fc(h)))


def _lm_pair():
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (4, 6))
    return cb.ModelPair(TinyLM().eval(), TinyLM().eval(), example_input=tokens)


def test_labels_outside_the_models_classes_are_named_before_scoring():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 7, size=(5, 6)), rng.integers(0, 7, size=(5, 6))
    for bad, why in ((7, r"labels run from \d+ to 7, but the model gives 7 classes"),
                     (-1, r"labels run from -1 to \d+.*labelled -100, torch's ignore_index")):  # -100 is not scored
        labels = y.copy()
        labels[0, 0] = bad
        with pytest.raises(DatasetError, match=why):
            cb.sweep(_lm_pair(), cb.Linear(), data=(x, labels), values=[0.5], splits=["test"])


def test_token_ids_beyond_the_vocabulary_or_the_context_and_float_ids_are_named():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=(5, 6))
    beyond = rng.integers(0, 7, size=(5, 6))
    beyond[1, 2] = 7
    with pytest.raises(DatasetError, match=r"token ids \(IndexError: .*\): ids 0 to 7 in inputs of shape \(6,\)"):
        cb.sweep(_lm_pair(), cb.Linear(), data=(beyond, y), values=[0.5], splits=["test"])
    longer = rng.integers(0, 7, size=(5, 9))
    with pytest.raises(DatasetError, match=r"a sequence longer than its context"):
        cb.sweep(_lm_pair(), cb.Linear(), data=(longer, rng.integers(0, 7, size=(5, 9))), values=[0.5],
                 splits=["test"])
    with pytest.raises(DatasetError, match=r"which are floats \(float32\); a model that embeds token ids takes them"):
        cb.sweep(_lm_pair(), cb.Linear(), data=(beyond.astype(np.float32), y), values=[0.5], splits=["test"])
    with pytest.raises(TracingError, match=r"on example_input of shape \(2, 9\): the model failed on example_input, "
                                              r"token ids"):
        cb.ModelPair(TinyLM().eval(), TinyLM().eval(), example_input=torch.randint(0, 7, (2, 9)))


def test_jax_labels_outside_the_classes_are_refused_not_clamped():
    pytest.importorskip("jax")
    a, b = (cb.train("mlp", "digits", backend="jax", seed=s, epochs=1, width=0.25) for s in (0, 1))
    data = cb.load_dataset("digits", "test").subset(20)
    y = data.y.copy()
    y[3] = 10
    with pytest.raises(DatasetError, match=r"outside \[0, 10\)"):
        cb.sweep(cb.ModelPair(a, b, backend="jax"), cb.Linear(), data=(data.x, y), values=[0.5], splits=["test"])
