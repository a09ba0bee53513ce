"""Convolutional text classifiers (Kim, 2014): token embeddings transposed to ``(n, features, tokens)``,
``Conv1d`` over the tokens (with BatchNorm), the maximum or mean over time, concatenated, then a
Linear head. Traced by their feature spaces, as token models are.

References: the spec written by hand for Kim's model, the user's module run in float64 with a random
transformation of the derived spec (it must keep the outputs), weight matching that must undo it, and
sweep ends equal to torch's own cross-entropy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import combinability as cb
from tests.model_checks import assert_random_transformation_undone, randomise_batchnorms, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB = 40


class KimCNN(nn.Module):
    """Three kernel sizes over the embedded tokens, each max-pooled over time, concatenated."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.convs = nn.ModuleList([nn.Conv1d(8, 5, k) for k in (2, 3, 4)])
        self.dropout, self.fc = nn.Dropout(0.5), nn.Linear(15, 3)

    def forward(self, x):
        e = self.embedding(x).permute(0, 2, 1)
        pooled = [F.max_pool1d(F.relu(conv(e)), conv(e).shape[2]).squeeze(2) for conv in self.convs]
        return self.fc(self.dropout(torch.cat(pooled, 1)))


class DeepTextCNN(nn.Module):
    """Two convolutions with BatchNorm, ``torch.max(h, dim=2)[0]`` over time."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.c1, self.bn1 = nn.Conv1d(8, 6, 3, padding=1), nn.BatchNorm1d(6)
        self.c2, self.fc = nn.Conv1d(6, 6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(self.embedding(x).transpose(1, 2))))
        return self.fc(torch.max(F.relu(self.c2(h)), dim=2)[0])


def _tokens(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, 10), generator=g), torch.randint(0, 3, (n,), generator=g)


def test_kims_text_cnn_gets_the_spec_written_by_hand():
    spec, folds = cb.derive_symmetries(KimCNN().eval(), _tokens(0)[0])
    want = {"embedding.weight": (None, "P_embedding"),
            "fc.weight": (None, ("P_convs.0", "P_convs.1", "P_convs.2")),  # the three pooled parts, in order
            "fc.bias": (None,)}
    for i in range(3):
        want |= {f"convs.{i}.weight": (f"P_convs.{i}", "P_embedding", None), f"convs.{i}.bias": (f"P_convs.{i}",)}
    assert dict(spec.axes_to_perm) == want and folds == []


@pytest.mark.parametrize("cls, moved", [(KimCNN, "convs.1.weight"), (DeepTextCNN, "c2.weight")])
def test_a_transformation_of_a_text_cnn_keeps_its_outputs_and_is_undone(cls, moved):
    model = randomise_batchnorms(randomised(cls(), 0))
    x = _tokens(1)[0]
    spec, _ = cb.derive_symmetries(model, x)
    state = {k: v.double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    assert_random_transformation_undone(model, spec, state, x, moved)


def test_a_sweep_of_text_cnns_ends_at_torchs_own_losses():
    a, b = (randomise_batchnorms(randomised(DeepTextCNN(), s)) for s in (0, 1))
    x, y = _tokens(2, 12)
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 0.5, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.cross_entropy(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)
    assert np.isfinite(float(ds["loss"].sel(split="test", lam=0.5).isel(sample=0)))


def test_activation_matching_reads_each_convolution_over_time_channels_first():
    # the embedded tokens' permute(0, 2, 1) moves their units first: the convolutions after it are channels-first
    # (they were read as channels-last, their positions taken for units)
    model = randomised(KimCNN(), 0)
    x = _tokens(1)[0]
    spec, _ = cb.derive_symmetries(model, x)
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    planted = copy.deepcopy(model)
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3), state)
    planted.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in moved.items()})
    pair = cb.ModelPair(model, planted, example_input=x)
    tokens, labels = _tokens(4, 200)
    aligned = pair.align("activation", data=(tokens.numpy(), labels.numpy()))
    np.testing.assert_allclose(aligned.theta(1), aligned.theta(0), atol=1e-6)
