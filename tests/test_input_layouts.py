"""Models that lay their input out anew before the first layer: the tutorial CNN that views flat
images as ``(n, 1, 28, 28)``, ``x.unsqueeze(1)`` adding a channel axis to a signal, ``(n, length,
features)`` sequences transposed for ``Conv1d``, channels-last images permuted to channels-first,
and an input normalised by buffers the model holds (``(x - self.mean) / self.std``).

References: the user's module run in float64 with a random transformation of the derived spec (it
must keep the outputs), weight matching that must undo it, activation matching on data in the
model's own input shape, and a sweep whose ends equal torch's own cross-entropy.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import assert_random_transformation_undone, randomise_batchnorms, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class FlatImages(nn.Module):
    """The classic MNIST tutorial CNN: flat inputs viewed as images, BatchNorm, max pooling."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.fc = nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        return self.fc(F.relu(self.c2(x)).view(x.size(0), -1))


class Signal(nn.Module):
    """A 1-d signal ``(n, length)`` given a channel axis by ``unsqueeze(1)``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(1, 6, 5, padding=2), nn.Conv1d(6, 6, 3), nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x.unsqueeze(1)))))
        return self.fc(F.adaptive_avg_pool1d(x, 1).squeeze(-1))


class Sequences(nn.Module):
    """``(n, length, features)`` sequences, centred by a constant and transposed for ``Conv1d``."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6)
        self.c2, self.fc = nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        x = (x - 0.5).transpose(1, 2)
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean(-1))


class ChannelsLastImages(nn.Module):
    """``(n, h, w, c)`` images permuted to channels-first."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x.permute(0, 3, 1, 2)))))
        return self.fc(x.mean((2, 3)))


class Normalised(nn.Module):
    """An input normalised by buffers of the model, one persistent (in the state) and one not."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.25, -0.5, 0.1]))
        self.register_buffer("std", torch.tensor([0.5, 2.0, 1.5]), persistent=False)
        self.c1, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.fc(F.relu(self.c1(x)).mean((2, 3)))


CASES = {
    "flat images": (FlatImages, (64,), (1, 8, 8), "c1.weight"),
    "signal": (Signal, (20,), (1, 20), "c1.weight"),
    "sequences": (Sequences, (12, 4), (4, 12), "c1.weight"),
    "channels-last images": (ChannelsLastImages, (6, 6, 3), (3, 6, 6), "c1.weight"),
    "normalised": (Normalised, (3, 6, 6), (3, 6, 6), "c1.weight"),
}


def _model(name: str, seed: int):
    return randomise_batchnorms(randomised(CASES[name][0](), seed))


@pytest.mark.parametrize("name", list(CASES))
def test_the_table_reads_the_input_as_the_first_layer_does_and_a_transformation_is_undone(name):
    _, data_shape, table_shape, moved = CASES[name]
    model = _model(name, 0)
    x = torch.randn(5, *data_shape)
    table = cb.derive.describe(model, x)
    assert table.input_shape == table_shape
    assert table.data_shape == data_shape
    state = {k: v.double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    assert_random_transformation_undone(model, table.spec(), state, x, moved)


def test_buffers_that_normalise_the_input_are_carried_unpermuted_and_combined():
    a, b = _model("normalised", 0), _model("normalised", 1)
    with torch.no_grad():
        b.mean.copy_(torch.tensor([0.75, 0.5, -0.1]))  # another normalisation: the combination takes the mean
    x = torch.randn(6, 3, 6, 6)
    pair = cb.ModelPair(a, b, example_input=x)
    assert pair.table.input_constants == {"mean": ((3,), True)}
    assert pair.spec.axes_to_perm.get("mean", (None,)) == (None,)
    merged = cb.ModelPair(a, b, example_input=x).align("weight").merge()
    np.testing.assert_allclose(merged.mean.numpy(), [0.5, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(merged.std.numpy(), a.std.numpy())  # not in the state: the model's own


def test_activation_matching_reads_data_in_the_models_own_input_shape():
    a = _model("flat images", 0)
    state = {k: v.numpy() for k, v in a.state_dict().items()}
    x = torch.randn(64, 64)
    spec = cb.derive_spec(a, x)
    perm = cb.random_permutation(spec, {k: v for k, v in state.items() if v.dtype.kind == "f"}, seed=3)
    b = FlatImages().eval()
    b.load_state_dict({k: torch.as_tensor(v) for k, v in {**state, **cb.apply_permutation(spec, perm, state)}.items()})
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    y = np.zeros(len(x), np.int64)
    aligned = cb.ModelPair(a, b, example_input=x).align("activation", data=(x.numpy(), y))
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def test_a_sweep_of_flat_image_cnns_ends_at_torchs_own_losses():
    a, b = _model("flat images", 0), _model("flat images", 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 64, generator=g), torch.randint(0, 3, (40,), generator=g)
    pair = cb.ModelPair(a, b, example_input=x[:8]).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.cross_entropy(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


class TwoLayouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.lin, self.fc = nn.Conv1d(1, 4, 3, padding=1), nn.Linear(16, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c1(x.unsqueeze(1))).mean(-1) + self.lin(x))


class BatchMoved(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv1d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):  # (length, n, features) read as (n, features, length): the batch axis moves
        return self.fc(F.relu(self.c1(x.permute(1, 2, 0))).mean(-1))


def test_an_input_read_in_two_layouts_or_with_its_batch_axis_moved_is_refused_by_name():
    with pytest.raises(TracingError, match=r"reads its input in 2 layouts \(\(1, 16\) by node 'c1', \(16,\) by node "
                                           r"'lin'\)"):
        cb.derive_spec(TwoLayouts(), torch.randn(4, 16))
    with pytest.raises(TracingError, match=r"permute\(1, 2, 0\)"):
        cb.derive_spec(BatchMoved(), torch.randn(4, 5, 4))


def test_a_flax_model_reshaping_flat_inputs_to_images_is_traced_into_a_layer_table():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax.numpy as jnp

    from tests.model_checks import flax_planted_permutation, flax_variables

    class FlatImagesFlax(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], 6, 6, 1))
            x = fnn.relu(fnn.Conv(5, (3, 3))(x))
            x = fnn.relu(fnn.Conv(5, (3, 3))(x))
            return fnn.Dense(3)(jnp.max(x, axis=(1, 2)))

    net = FlatImagesFlax()
    x = np.random.default_rng(0).normal(size=(4, 36)).astype(np.float32)
    variables = flax_variables(net, x, seed=0)
    table = cb.derive.describe((net, variables), x)
    assert table.input_shape == (1, 6, 6) and table.data_shape == (36,)
    assert [(n.op, n.fn) for n in table.nodes if n.op == "avgpool"] == [("avgpool", "max")]
    flax_planted_permutation(net, variables, x)
