"""The training loop's optimizer (``combinability.training.Optimizer``) against torch.optim.

The same gradient sequence goes to the library's flat-vector update and to
``torch.optim.Adam`` / ``torch.optim.SGD`` on a plain parameter; the parameters must agree
after every step, with and without weight decay and frozen entries, in numpy, torch and jax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import combinability as cb
from combinability.training import Optimizer, TrainRecipe

STEPS, SIZE = 6, 257


def namespaces():
    import array_api_compat.numpy as xnp
    import array_api_compat.torch as xtorch

    out = [("numpy", xnp, np.asarray), ("torch", xtorch, torch.from_numpy)]
    try:
        import jax.numpy as jnp
    except ImportError:
        return out
    return [*out, ("jax", jnp, jnp.asarray)]


def torch_reference(recipe: TrainRecipe, start: np.ndarray, grads: list[np.ndarray], lrs: list[float],
                    mask: np.ndarray) -> list[np.ndarray]:
    """torch.optim on one parameter; frozen entries get a zero gradient and no weight decay."""
    p = torch.nn.Parameter(torch.from_numpy(start.astype(np.float64)))
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam([p], lr=lrs[0], weight_decay=0.0)
    else:
        opt = torch.optim.SGD([p], lr=lrs[0], momentum=recipe.momentum, weight_decay=0.0)
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        # L2 decay added to the gradient (torch's weight_decay), only where the mask trains
        p.grad = torch.from_numpy((g + recipe.weight_decay * p.detach().numpy()) * mask)
        opt.step()
        out.append(p.detach().numpy().copy())
    return out


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("where", [n for n, _, _ in namespaces()])
def test_steps_match_torch_optim(where, optimizer, weight_decay, frozen):
    _, xp, conv = next(t for t in namespaces() if t[0] == where)
    rng = np.random.default_rng(0)
    recipe = TrainRecipe(epochs=1, lr=0.05, optimizer=optimizer, momentum=0.9, weight_decay=weight_decay)
    start = rng.standard_normal(SIZE).astype(np.float32)
    grads = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(STEPS)]
    lrs = [0.05 * (0.8**k) for k in range(STEPS)]  # a schedule: the rate changes every step
    mask = np.ones(SIZE, np.float32)
    if frozen:
        mask[rng.random(SIZE) < 0.3] = 0
    expected = torch_reference(recipe, start, grads, lrs, mask)

    opt = Optimizer(recipe, xp, conv(mask))
    flat = conv(start.copy())
    for k, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
        before = np.asarray(flat).copy()
        given = conv(g.copy())
        new = opt.step(flat, given, lr)
        np.testing.assert_array_equal(np.asarray(flat), before)  # the caller's vector is not changed
        np.testing.assert_array_equal(np.asarray(given), g)  # nor its gradient
        np.testing.assert_allclose(np.asarray(new), expected[k], rtol=2e-5, atol=2e-6)
        flat = new
    if frozen:
        np.testing.assert_array_equal(np.asarray(flat)[mask == 0], start[mask == 0])


def test_chance_loss_is_the_entropy_of_the_scored_labels():
    from combinability.training import chance_loss

    y = np.array([[0, 0, 1, -100], [2, 2, 2, -100]])
    p = np.array([2, 1, 3]) / 6
    assert chance_loss(y) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_training_that_ends_at_chance_warns_and_training_that_learns_does_not():
    """A learning rate of 0 leaves an MLP at its initial, chance-level loss (what a collapsed ResNet-20 shows):
    warned, naming the loss and the labels' entropy; the same MLP trained properly is not."""
    import warnings

    from combinability.errors import UntrainedModelWarning
    from combinability.training import TrainRecipe

    with pytest.warns(UntrainedModelWarning, match=r"no better than predicting the labels' frequencies \(2\.30"):
        cb.train("mlp", "digits", seed=0, width=0.125, recipe=TrainRecipe(epochs=1, lr=0.0, optimizer="adam"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedModelWarning)
        cb.train("mlp", "digits", seed=0, width=0.125, epochs=1)
