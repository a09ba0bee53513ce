"""Activations written out in a CNN's own code: ``x.clamp(min=0)``, ``torch.clamp(x, 0, 6)``, BERT's GELU
``0.5 * x * (1 + torch.erf(x / sqrt(2)))``, the tanh GELU with ``torch.pow(x, 3)``, MobileNetV3's
hard-swish ``x * F.relu6(x + 3) / 6`` and ``x ** 2``. The layer table keeps them as element-wise nodes it
does not name (``act`` of ``"elementwise"``), which keep each channel's place; such a table is not built.

References: the user's module run in float64 with a random transformation of the derived spec (it must
keep the outputs), weight matching that must undo it, and REPAIR's BatchNorm reset at both ends, which
must give each model's own loss (its statistics are its own).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError
from combinability.layers import Node
from tests.model_checks import assert_random_transformation_undone, randomise_batchnorms, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

WRITTEN_OUT = {
    "clamp": lambda x: x.clamp(min=0),
    "clamp 0-6": lambda x: torch.clamp(x, 0, 6),
    "gelu erf": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3)))),
    "hard-swish": lambda x: x * F.relu6(x + 3) / 6,
    "square": lambda x: x**2,
}


class Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.c1, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.fc = nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.fn(self.c2(self.fn(self.bn(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("name", list(WRITTEN_OUT))
def test_a_cnn_with_an_activation_written_out_is_traced_and_a_transformation_undone(name):
    model = randomise_batchnorms(randomised(Net(WRITTEN_OUT[name]), 0))
    x = torch.randn(4, 1, 6, 6)
    table = cb.derive.describe(model, x)
    if name != "hard-swish":  # F.relu6 is named; its product with x is a product of branches
        assert any(n.op == "act" and n.fn == "elementwise" for n in table.nodes)
    state = {k: v.double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    assert_random_transformation_undone(model, table.spec(), state, x, "c2.weight")


def test_repair_resets_the_ends_of_a_path_to_their_own_losses():
    a, b = (randomise_batchnorms(randomised(Net(WRITTEN_OUT["gelu erf"]), s)) for s in (0, 1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    for m in (a, b):  # statistics of these very images: the reset at each end changes nothing
        m.train()
        m.bn.momentum = None
        m.bn.reset_running_stats()
        with torch.no_grad():
            m(x)
        m.eval()
    pair = cb.ModelPair(a, b, example_input=x[:4]).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(x.numpy(), y.numpy()), values=[0.0, 1.0], splits=["test"],
                  repair="reset", repair_data=(x.numpy(), y.numpy()))
    with torch.no_grad():
        for m, lam in ((a, 0.0), (b, 1.0)):
            want = F.cross_entropy(m(x), y).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-4)


def test_a_table_with_unnamed_element_wise_functions_describes_but_is_not_built():
    table = cb.derive.describe(Net(WRITTEN_OUT["square"]).eval(), torch.randn(2, 1, 6, 6))
    assert Node("f", "act", fn="elementwise").fn == "elementwise"
    with pytest.raises(ConfigurationError, match=r"describes a traced model: nodes \['pow_1', 'pow_2'\] are "
                                                 r"element-wise functions of its own code"):
        cb.get_backend("torch").build(table, seed=0)


def test_a_flax_function_of_each_value_that_no_activation_matches_is_kept_unnamed():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax.numpy as jnp

    from tests.model_checks import flax_planted_permutation, flax_variables

    class ClippedSquare(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = jnp.clip(fnn.Conv(5, (3, 3))(x), 0, 3) ** 2  # matches no known activation
            return fnn.Dense(3)(jnp.mean(fnn.relu(fnn.Conv(5, (3, 3))(h)), axis=(1, 2)))

    net = ClippedSquare()
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 1)).astype(np.float32)
    variables = flax_variables(net, x, seed=0)
    table = cb.derive.describe((net, variables), x)
    assert [(n.op, n.fn) for n in table.nodes if n.op in ("act", "relu")] == [("act", "elementwise"), ("relu", "")]
    flax_planted_permutation(net, variables, x)
