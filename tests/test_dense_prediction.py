"""Dense predictions (a segmentation network's logits per position) and models used with a spec by hand.

References: torch's own ``F.cross_entropy`` (which takes ``(n, classes, H, W)`` logits for
``(n, H, W)`` targets) and argmax accuracy on the same data, numpy's ``moveaxis`` for the
layouts of :func:`combinability.evaluation.logit_rows`, and a planted permutation of a
network's hidden channels.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import combinability as cb
from combinability.data.convert import as_dataset
from combinability.errors import DatasetError, TracingError
from combinability.evaluation import logit_rows, mean_cross_entropy

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

CLASSES, H, W = 4, 5, 6


class SegNet(nn.Module):
    """A small fully convolutional segmentation network: one logit map per class."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.head = nn.Conv2d(hidden, CLASSES, 1)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return self.head(F.relu(self.conv2(h)))


def _data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, H, W)).astype(np.float32), rng.integers(0, CLASSES, (n, H, W))


def _trained_like(seed: int) -> SegNet:
    torch.manual_seed(seed)
    model = SegNet()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        model.bn1.running_mean.normal_()
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _torch_scores(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(torch.tensor(x))
        target = torch.tensor(y)
        return F.cross_entropy(logits, target).item(), (logits.argmax(1) == target).double().mean().item()


def _assert_sweep_ends_are_torchs(pair, models, x: np.ndarray, y: np.ndarray) -> None:
    """The loss and accuracy of a sweep's ends are torch's own of each model (every pixel counted)."""
    ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0])
    for v, model in enumerate(models):
        loss, accuracy = _torch_scores(model, x, y)
        assert float(ds["loss"].isel(lam=v).item()) == pytest.approx(loss, rel=1e-5)
        assert float(ds["accuracy"].isel(lam=v).item()) == pytest.approx(accuracy, abs=1e-12)


# -- logit layouts -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["second", "last", "flat"])
def test_logit_rows_reads_each_layout_one_row_per_target(layout):
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((3, 2, CLASSES, H, W)).astype(np.float32)  # (k, n, classes, H, W)
    expected = np.moveaxis(dense, 2, -1).reshape(3, -1, CLASSES)  # row (i, h, w) holds the classes of pixel (h, w)
    given = {"second": dense, "last": np.moveaxis(dense, 2, -1),
             "flat": np.moveaxis(dense, 2, -1).reshape(3, 2 * H * W, CLASSES)}[layout]
    rows = logit_rows(np, given, (2, H, W), lead=1)
    np.testing.assert_array_equal(rows, expected)


def test_logit_rows_refuses_logits_that_fit_no_layout():
    match = r"gives 6 rows of logits for 10 targets \(logits of shape \(2, 3, 7\), targets \(2, 5\)\).*\(n, classes, \*"
    with pytest.raises(DatasetError, match=match):
        logit_rows(np, np.zeros((2, 3, 7)), (2, 5))


def test_logit_rows_reads_classes_last_when_both_layouts_fit():
    # a vocabulary as long as the sequence: (n, T, vocab) as every sequence model returns it
    logits = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    np.testing.assert_array_equal(logit_rows(np, logits, (2, 3)), logits.reshape(6, 3))


def test_logit_rows_reads_classes_second_when_both_fit_and_the_model_says_so():
    logits = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)  # (n, classes, T) with classes == T
    np.testing.assert_array_equal(logit_rows(np, logits, (2, 3), classes_second=True),
                                  np.moveaxis(logits, 1, -1).reshape(6, 3))
    # the shape decides where only one layout fits, whatever the hint
    np.testing.assert_array_equal(logit_rows(np, np.zeros((2, 3, 4)), (2, 3), classes_second=True), np.zeros((6, 4)))


class SquareSegNet(SegNet):
    """As many classes as the images have rows and columns: both dense layouts fit its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 6, 1)


def test_a_square_segmentation_map_is_read_with_its_classes_second():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((10, 1, 6, 6)).astype(np.float32), rng.integers(0, 6, (10, 6, 6))
    torch.manual_seed(0)
    a, b = SquareSegNet().eval(), SquareSegNet().eval()
    pair = cb.ModelPair(a, b, example_input=torch.tensor(x[:4]))
    _assert_sweep_ends_are_torchs(pair, (a, b), x, y)


def test_where_a_traced_torch_model_gives_its_classes():
    from combinability_torch.trace import classes_second

    class Permuted(SegNet):
        def forward(self, x):
            return super().forward(x).permute(0, 2, 3, 1)

    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
    assert classes_second(torch.fx.symbolic_trace(SegNet())) is True
    assert classes_second(torch.fx.symbolic_trace(mlp)) is False
    assert classes_second(torch.fx.symbolic_trace(Permuted())) is None


def test_training_loss_of_a_dense_prediction_is_torchs():
    x, y = _data()
    model = _trained_like(0)
    with torch.no_grad():
        logits = model(torch.tensor(x))
    ours = mean_cross_entropy(cb.get_backend("torch").xp(), logits, torch.tensor(y))
    assert float(ours) == pytest.approx(F.cross_entropy(logits, torch.tensor(y)).item(), rel=1e-6)


# -- a traced segmentation network ---------------------------------------------------------------
def test_segmentation_network_is_traced_and_swept_as_torch_scores_it():
    x, y = _data()
    a, b = _trained_like(0), _trained_like(1)
    pair = cb.ModelPair(a, b, example_input=torch.tensor(x[:4]))
    assert len(pair.spec.perm_names) == 2  # the two hidden channel spaces; the classes stay in place
    _assert_sweep_ends_are_torchs(pair, (a, b), x, y)


def test_calibration_of_a_segmentation_pair_scores_every_pixel_as_torch():
    from combinability.analysis.calibration import calibrate

    x, y = _data(16, seed=1)
    a, b = _trained_like(0), _trained_like(1)
    pair = cb.ModelPair(a, b, example_input=torch.tensor(x[:4]))
    ds = calibrate(pair, (x, y), lambdas=[0.0, 1.0], calibration_data=_data(12, seed=2), naive=False)
    for lam, model in ((0.0, a), (1.0, b)):
        at = ds.sel(lam=lam).isel(alignment=0)
        with torch.no_grad():
            logits, target = model(torch.tensor(x)).double(), torch.tensor(y)
        beta = float(at["inverse_temperature"])
        assert float(at["loss"]) == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
        assert float(at["loss_calibrated"]) == pytest.approx(F.cross_entropy(beta * logits, target).item(), rel=1e-5)
        assert float(at["accuracy"]) == pytest.approx((logits.argmax(1) == target).double().mean().item(), abs=1e-12)


def test_functional_agreement_of_a_segmentation_pair_counts_every_pixel():
    from combinability.experiments import functional_agreement

    x, y = _data(12, seed=3)
    a, b = _trained_like(0), _trained_like(1)
    pair = cb.ModelPair(a, b, example_input=torch.tensor(x[:4]))
    (ds,) = functional_agreement(pair, (cb.Linear(),), data={"test": (x, y)}, values=[0.0, 1.0]).values()
    with torch.no_grad():
        pa, pb = (m(torch.tensor(x)).argmax(1).numpy() for m in (a, b))  # (n, H, W) per pixel
    for lam, pred in ((0.0, pa), (1.0, pb)):
        counts = ds["agreement"].sel(split="test", lam=lam).isel(sample=0).to_series()
        assert counts.sum() == y.size
        both = (pred == pa) & (pred == pb)
        assert counts["both_correct"] == np.sum(both & (pred == y))
        assert counts["both_wrong"] == np.sum(both & (pred != y))


def test_weight_matching_undoes_a_planted_permutation_of_a_segmentation_network():
    x, y = _data()
    a = _trained_like(0)
    b = _trained_like(0)
    rng = np.random.default_rng(3)
    p1, p2 = rng.permutation(8), rng.permutation(8)
    with torch.no_grad():  # B: A with both hidden channel spaces shuffled, the same function
        for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
            t = b.get_parameter(name) if "running" not in name else b.get_buffer(name)
            t.copy_(t[p1])
        b.conv2.weight.copy_(b.conv2.weight[p2][:, p1])
        b.conv2.bias.copy_(b.conv2.bias[p2])
        b.head.weight.copy_(b.head.weight[:, p2])
    assert _torch_scores(b, x, y)[0] == pytest.approx(_torch_scores(a, x, y)[0], rel=1e-5)
    pair = cb.ModelPair(a, b, example_input=torch.tensor(x[:4])).align("weight", seed=0)
    for name, tensor in a.state_dict().items():
        if tensor.is_floating_point():
            np.testing.assert_allclose(pair.params(1)[name], tensor.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
    mid = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.5])
    assert float(mid["loss"].item()) == pytest.approx(_torch_scores(a, x, y)[0], rel=1e-5)


def test_dense_labels_are_accepted_by_shape():
    x, y = _data(n=6)
    ds = as_dataset((x, y))
    assert ds.y.shape == (6, H, W) and ds.num_classes == int(y.max()) + 1


# -- a spec given by hand for a model the tracers refuse ----------------------------------------
class Cumulative(SegNet):
    """Sums its hidden maps along the width (an operation the tracers do not follow, which keeps the channels)."""

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return self.head(F.relu(self.conv2(torch.cumsum(h, dim=3))))


def _cumulative_spec() -> cb.PermutationSpec:
    return cb.PermutationSpec({
        "conv1.weight": ("P1", None, None, None), "conv1.bias": ("P1",), "bn1.weight": ("P1",), "bn1.bias": ("P1",),
        "bn1.running_mean": ("P1",), "bn1.running_var": ("P1",),
        "conv2.weight": ("P2", "P1", None, None), "conv2.bias": ("P2",),
        "head.weight": (None, "P2", None, None), "head.bias": (None,)})


def test_a_spec_by_hand_stands_when_the_model_cannot_be_traced():
    x, y = _data()
    torch.manual_seed(0)
    a, b = Cumulative().eval(), Cumulative().eval()
    with pytest.raises(TracingError):
        cb.ModelPair(a, b, example_input=torch.tensor(x[:4]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = cb.ModelPair(a, b, spec=_cumulative_spec(), example_input=torch.tensor(x[:4]))
    assert [w.category for w in caught if issubclass(w.category, cb.CombinabilityWarning)] == [cb.UntracedModelWarning]
    assert "activation matching" in str(next(w.message for w in caught if w.category is cb.UntracedModelWarning))
    ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0])
    for v, model in ((0, a), (1, b)):
        assert float(ds["loss"].isel(lam=v).item()) == pytest.approx(_torch_scores(model, x, y)[0], rel=1e-5)


# -- flax: a channels-last segmentation network ----------------------------------------------------
def test_a_flax_segmentation_network_sweeps_as_jax_scores_it_and_its_planted_permutation_is_undone():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp

    from tests.model_checks import flax_planted_permutation

    class FlaxSeg(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.relu(fnn.Conv(8, (3, 3), padding="SAME")(x))
            return fnn.Conv(CLASSES, (1, 1))(fnn.relu(fnn.Conv(8, (3, 3), padding="SAME")(h)))

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((10, H, W, 1)).astype(np.float32), rng.integers(0, CLASSES, (10, H, W))
    net = FlaxSeg()
    variables = [net.init(jax.random.PRNGKey(s), x[:2]) for s in (0, 1)]
    pair = cb.ModelPair(*((net, v) for v in variables), example_input=x[:4])
    assert pair.table is not None and pair.table.num_classes == CLASSES  # a layer table, its last map the classes
    ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0])
    for lam, v in zip((0, 1), variables, strict=True):
        z = net.apply(v, x)  # (n, H, W, classes): the classes last
        loss = jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0])
        assert float(ds["loss"].isel(lam=lam).item()) == pytest.approx(float(loss), rel=1e-5)
        assert float(ds["accuracy"].isel(lam=lam).item()) == pytest.approx(float(jnp.mean(z.argmax(-1) == y)))
    flax_planted_permutation(net, variables[0], x[:4])
