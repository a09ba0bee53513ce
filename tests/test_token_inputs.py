"""Integer inputs (token ids) reach a user's model as integers: ``nn.Embedding`` / ``flax.linen.Embed``
read them as they are, with no ``.long()`` in the model.

References: plain torch / flax forward passes and a numpy cross-entropy.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.data.base import input_dtype

VOCAB, T = 11, 6


def _tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (n, T)), rng.integers(0, VOCAB, (n, T))


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = np.asarray(logits, np.float64).reshape(-1, VOCAB)
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), y.reshape(-1)]))


def test_input_dtype_keeps_signed_integers_only():
    assert input_dtype(np.zeros(3, np.int32)) == np.int64
    assert input_dtype(np.zeros(3, np.uint8)) == np.float32  # raw images
    assert input_dtype(np.zeros(3, bool)) == np.float32
    assert input_dtype(np.zeros(3, np.float64)) == np.float32
    from combinability.data.convert import as_dataset

    ds = as_dataset((np.arange(12).reshape(2, 6), np.zeros((2, 6), np.int64)), "test")
    assert ds.x.dtype == np.int64


def test_a_torch_language_model_without_long_runs_on_token_ids():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TinyLM(nn.Module):
        def __init__(self, d: int = 8) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, d)  # reads the ids as given: an int tensor, never a float one
            self.pos = nn.Parameter(0.1 * torch.randn(1, T, d))
            self.norm = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
            self.head = nn.Linear(d, VOCAB)

        def forward(self, idx):
            h = self.tok(idx) + self.pos
            a = self.norm(h)
            h = h + self.attn(a, a, a, need_weights=False)[0]
            h = h + self.fc2(torch.relu(self.fc1(h)))
            return self.head(h).reshape(-1, VOCAB)

    torch.manual_seed(0)
    a, b = TinyLM().eval(), TinyLM().eval()
    x, y = _tokens(24, 1)
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight", symmetries="permutation")
    with torch.no_grad():
        direct = a(torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(pair.model(1)(torch.as_tensor(x)).numpy(), b(torch.as_tensor(x)).numpy(),
                                   rtol=1e-4, atol=1e-5)  # aligned B computes B's function
    ds = cb.sweep(pair.naive, cb.Linear(), data=(x, y), values=[0.0], splits=["test"])
    assert float(ds["loss"].values.ravel()[0]) == pytest.approx(_cross_entropy(direct, y), rel=1e-5)


def test_a_flax_language_model_runs_on_token_ids():
    jax = pytest.importorskip("jax")
    fnn = pytest.importorskip("flax.linen")

    class TinyLM(fnn.Module):
        @fnn.compact
        def __call__(self, idx):
            h = fnn.Embed(VOCAB, 8)(idx)  # jnp.take of the table: integer ids only
            h = h + fnn.Dense(8)(fnn.relu(fnn.Dense(16)(fnn.LayerNorm()(h))))
            return fnn.Dense(VOCAB)(h).reshape(-1, VOCAB)

    x, y = _tokens(24, 2)
    net = TinyLM()
    va, vb = net.init(jax.random.PRNGKey(0), x[:2]), net.init(jax.random.PRNGKey(1), x[:2])
    pair = cb.ModelPair((net, va), (net, vb), example_input=x[:4].astype(np.int32))
    # the second split (13 sequences) runs padded to the 24 compiled for the first: its loss must
    # count the rows of its own 13 sequences (13 * T logits), no more and no fewer
    data = {"test": (x.astype(np.int32), y), "train": (x[:13].astype(np.int32), y[:13])}
    ds = cb.sweep(pair, cb.Linear(), data=data, values=[0.0, 1.0], splits=["test", "train"])
    for split, n in (("test", 24), ("train", 13)):
        losses = ds["loss"].sel(split=split).values.ravel()
        assert losses[0] == pytest.approx(_cross_entropy(np.asarray(net.apply(va, x[:n])), y[:n]), rel=1e-5)
        assert losses[1] == pytest.approx(_cross_entropy(np.asarray(net.apply(vb, x[:n])), y[:n]), rel=1e-5)


def test_integer_images_get_a_hint_with_the_tracing_error():
    torch = pytest.importorskip("torch")
    from combinability.errors import TracingError

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 2))
    images = np.random.default_rng(0).integers(0, 255, (4, 1, 8, 8))  # int64 pixels, not floats
    with pytest.raises(TracingError, match=r"which are integers \(int64\) and reach the model as they are, as token"):
        cb.derive_spec(net, images)
