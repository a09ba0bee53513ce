"""Classifiers that end in a softmax or log-softmax: PyTorch's MNIST example returns
``F.log_softmax(x, dim=1)`` and trains with ``F.nll_loss``; a LeNet written Keras-style ends in
``nn.Softmax(dim=1)``. The library reads the logits the final step reads.

References: the example's own loss (``F.nll_loss`` of its output), minus the log of the model's own
probabilities, a random transformation of the derived spec run through the user's module in float64,
and weight matching that must undo it.
"""

from __future__ import annotations

import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import assert_random_transformation_undone, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class MnistExample(nn.Module):
    """pytorch/examples' mnist/main.py ``Net``, narrower and on 12 x 12 images."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, 1), nn.Conv2d(4, 6, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = torch.flatten(self.dropout1(F.max_pool2d(x, 2)), 1)
        x = self.fc2(self.dropout2(F.relu(self.fc1(x))))
        return F.log_softmax(x, dim=1)


class SoftmaxLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                                      nn.Conv2d(4, 6, 3), nn.Tanh(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.Tanh(), nn.Linear(12, 10),
                                        nn.Softmax(dim=1))

    def forward(self, x):
        return self.classifier(self.features(x))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 1, 12, 12, generator=g), torch.randint(0, 10, (24,), generator=g)


@pytest.mark.parametrize("cls, moved", [(MnistExample, "conv2.weight"), (SoftmaxLeNet, "features.3.weight")])
def test_the_final_softmax_is_not_a_layer_and_a_transformation_is_undone(cls, moved):
    model = randomised(cls(), 0)
    x, _ = _data()
    table = cb.derive.describe(model, x)
    assert table.nodes[-1].op == "dense" and table.num_classes == 10
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, table.spec(), state, x, moved)


def test_sweep_losses_are_the_examples_own_nll_loss_and_minus_the_log_of_the_probabilities():
    x, y = _data(1)
    for cls, own_loss in ((MnistExample, lambda out: F.nll_loss(out, y)),
                          (SoftmaxLeNet, lambda out: -torch.log(out[torch.arange(len(y)), y]).mean())):
        a, b = randomised(cls(), 0), randomised(cls(), 1)
        pair = cb.ModelPair(a, b, example_input=x[:8]).align("weight")
        ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
        with torch.no_grad():
            for m, lam in ((a, 0.0), (b, 1.0)):
                out = m(x)
                got = ds.sel(split="test", lam=lam).isel(sample=0)
                assert float(got["loss"]) == pytest.approx(own_loss(out).item(), rel=1e-5)
                assert float(got["accuracy"]) == pytest.approx((out.argmax(1) == y).float().mean().item())


class SoftmaxOverExamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=0)  # over the batch: not a classifier's probabilities


def test_a_softmax_over_another_axis_is_not_taken_for_the_output_normalisation():
    with pytest.raises(TracingError, match=r"node 'softmax'"):
        cb.derive.describe(SoftmaxOverExamples(), torch.randn(4, 16))
