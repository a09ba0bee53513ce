"""Faults of a user's model that the library names: randomness at inference, a batch axis squeezed away."""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import DatasetError, TracingError
from tests.model_checks import randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Net(nn.Module):
    def __init__(self, dropout_bug: bool = False, squeeze: bool = False) -> None:
        super().__init__()
        self.dropout_bug, self.squeeze = dropout_bug, squeeze
        self.conv, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.dropout_bug:  # the common slip: F.dropout draws masks unless told training=self.training
            h = F.dropout(h, 0.5)
        h = F.adaptive_avg_pool2d(h, 1)
        return self.fc(h.squeeze() if self.squeeze else h.flatten(1))


X = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))


def test_a_model_random_in_eval_mode_is_refused_saying_so():
    with pytest.raises(TracingError, match=r"differ between two calls with the same weights.*F\.dropout"):
        cb.ModelPair(randomised(Net(dropout_bug=True), 0), randomised(Net(dropout_bug=True), 1), example_input=X)


def test_logits_whose_batch_axis_was_squeezed_away_are_refused_by_shape():
    a, b = randomised(Net(squeeze=True), 0), randomised(Net(squeeze=True), 1)
    pair = cb.ModelPair(a, b, example_input=X)
    y = np.arange(9) % 4
    ok = cb.sweep(pair, cb.Linear(), data=(X[:9].numpy(), y), values=[0.0], batch_size=3, splits=["test"])
    with torch.no_grad():  # whole batches: the loss is torch's own
        want = F.cross_entropy(a(X[:9]), torch.as_tensor(y)).item()
    assert float(ok["loss"].sel(split="test", lam=0.0).isel(sample=0)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(DatasetError, match=r"logits of shape \(4,\) for a batch of 1 example.*\.squeeze\(\)"):
        cb.sweep(pair, cb.Linear(), data=(X[:9].numpy(), y), values=[0.0], batch_size=4, splits=["test"])


def test_a_trace_that_fails_on_a_batch_of_one_says_to_pass_more_examples():
    a, b = randomised(Net(squeeze=True), 0), randomised(Net(squeeze=True), 1)
    with pytest.raises(TracingError, match=r"node 'squeeze'.*example_input holds one example.*two or more"):
        cb.ModelPair(a, b, example_input=X[:1])
    cb.ModelPair(a, b, example_input=X[:2])  # two examples keep the batch axis: traced


class BN(nn.Module):
    def __init__(self, var: float) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 4)
        self.bn.running_var.fill_(var)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_combined_batchnorm_variances_below_zero_are_named_in_a_warning():
    a, b = BN(0.1).eval(), BN(1.0).eval()
    pair = cb.ModelPair(a, b, example_input=X)
    y = np.arange(16) % 4
    with pytest.warns(cb.NonFiniteLossWarning, match=r"1 of 3 evaluations.*BatchNorm running variances "
                                                      r"\(bn.running_var, \.\.\.\).*repair='reset'"):
        ds = cb.sweep(pair, cb.Linear(start=-1, stop=1), data=(X.numpy(), y), values=[-1.0, 0.0, 1.0],
                      splits=["test"])
    # by hand: at v = -1 the variance is 2 * 0.1 - 1.0 < 0, and BatchNorm's square root of it is NaN
    assert np.isnan(float(ds["loss"].sel(lam=-1.0).squeeze())) and np.isfinite(ds["loss"].sel(lam=0.0)).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", cb.NonFiniteLossWarning)  # recomputed statistics: finite, no warning
        reset = cb.sweep(pair, cb.Linear(start=-1, stop=1), data=(X.numpy(), y), values=[-1.0], splits=["test"],
                         repair="reset", repair_data=(X.numpy(), y))
    assert np.isfinite(reset["loss"]).all()


def test_a_channel_shuffle_is_refused_by_name():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6, 4)

        def forward(self, x):
            h = F.relu(self.conv(x))
            b, c, hh, ww = h.shape  # ShuffleNet's channel_shuffle with 2 groups
            h = torch.transpose(h.view(b, 2, c // 2, hh, ww), 1, 2).contiguous().view(b, -1, hh, ww)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(TracingError, match=r"viewed as \(2, 3\) groups, as ShuffleNet's channel shuffle"):
        cb.derive_spec(Shuffle(), X)


def test_a_reset_of_models_without_batchnorm_statistics_says_there_is_nothing_to_reset():
    class Encoder(nn.Module):  # traced by its feature spaces: LayerNorms, no BatchNorm, no layer table
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
            self.enc, self.head = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)).mean(1))

    ids = torch.randint(0, 16, (6, 5), generator=torch.Generator().manual_seed(0))
    data = (ids.numpy(), np.arange(6) % 3)
    pair = cb.ModelPair(randomised(Encoder(), 0), randomised(Encoder(), 1), example_input=ids)
    with pytest.raises(cb.ConfigurationError, match=r"repair='reset' recomputes BatchNorm running statistics, and "
                                                     r"these models hold none.*nothing to reset"):
        cb.sweep(pair, cb.Linear(), data=data, values=[0.5], repair="reset", repair_data=data)
