"""Training: the paper's recipes (appendix A) and the one training loop, backend-neutral.

A :class:`TrainRecipe` is a small frozen value; :func:`fit` reads its fields and asks it
for the learning rate of each step around the backend's ``value_and_grad``, so every
backend trains the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.errors import ConfigurationError, UnknownNameError

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.data.base import ArrayDataset

__all__ = ["TrainRecipe", "RECIPES", "recipe_for", "fit", "Optimizer", "batch_bounds"]

_SCHEDULES = ("constant", "step", "warmup_cosine")


@dataclass(frozen=True)
class TrainRecipe:
    """How to train a reference model.

    Parameters
    ----------
    epochs : int
        Passes over the training set.
    lr : float
        Peak learning rate.
    momentum : float
        SGD momentum (paper: 0.9).
    weight_decay : float
        L2 weight decay (paper: 1e-4).
    batch_size : int
        Examples per step (paper: 100).
    schedule : {"constant", "step", "warmup_cosine"}
        ``"step"`` divides the rate by 10 at one and two thirds of training (Tiny-10);
        ``"warmup_cosine"`` rises linearly from ``warmup_start`` to ``lr`` over
        ``warmup_epochs`` then decays with a cosine to 0 (ResNet-20).
    warmup_epochs : float
        Length of the linear warm-up.
    warmup_start : float
        Learning rate at step 0 of the warm-up (paper: 1e-6).
    augment : bool
        Apply the paper's augmentation (images only).
    optimizer : {"sgd", "adam"}
        SGD with momentum (the paper's choice) or Adam (fast for MLPs on CPU).
    """

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 100
    schedule: str = "constant"
    warmup_epochs: float = 1.0
    warmup_start: float = 1e-6
    augment: bool = False
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise ConfigurationError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigurationError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigurationError(f"need epochs >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")

    def with_(self, **changes) -> TrainRecipe:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def learning_rate(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate at optimisation step ``step`` (0-based)."""
        total = max(1, self.epochs * steps_per_epoch)
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            frac = step / total
            return self.lr * (0.1 if frac >= 1 / 3 else 1.0) * (0.1 if frac >= 2 / 3 else 1.0)
        warm = max(1, int(round(self.warmup_epochs * steps_per_epoch)))
        if step < warm:
            return self.warmup_start + (self.lr - self.warmup_start) * step / warm
        rest = max(1, total - warm)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / rest)))


#: The paper's recipes (appendix A) with CPU-friendly epoch counts; pass ``epochs=`` to change.
RECIPES: dict[str, TrainRecipe] = {
    "mlp": TrainRecipe(epochs=5, lr=1e-3, optimizer="adam", weight_decay=0.0, batch_size=100),
    "tiny10": TrainRecipe(epochs=300, lr=0.01, schedule="step", augment=True),
    "resnet20": TrainRecipe(epochs=250, lr=0.1, schedule="warmup_cosine", augment=True),
    "vgg16": TrainRecipe(epochs=250, lr=0.1, schedule="warmup_cosine", augment=True),
    "resnet20_bn": TrainRecipe(epochs=250, lr=0.1, schedule="warmup_cosine", augment=True),
    "vgg11_bn": TrainRecipe(epochs=250, lr=0.1, schedule="warmup_cosine", augment=True),
}
# the asymmetric variants (fewer symmetries) train as the networks they vary
RECIPES.update({f"{base}_{kind}": RECIPES[base] for base in ("mlp", "tiny10") for kind in ("wasym", "sigmaasym")})


def recipe_for(architecture: str, **changes) -> TrainRecipe:
    """The recipe registered for ``architecture`` with ``changes`` applied."""
    try:
        base = RECIPES[architecture]
    except KeyError:
        raise UnknownNameError(
            f"no training recipe for {architecture!r}; known: {', '.join(sorted(RECIPES))}"
        ) from None
    return base.with_(**changes) if changes else base


# -- the training loop (framework-free, around the backend's value_and_grad) -------------
class Optimizer:
    """SGD with momentum or Adam (L2 weight decay, as torch's) on one flat vector, array API.

    Only the entries of ``mask`` (the trainable ones) are updated. The moment buffers are
    the optimizer's own and are updated in place where the arrays allow it (numpy, torch;
    jax arrays rebind), so a step allocates a few temporaries instead of one per operation
    (the results are bitwise those of the out-of-place formulas: the same operations in
    the same order).
    """

    def __init__(self, recipe: TrainRecipe, xp: Any, mask: Any) -> None:
        self.recipe, self.xp, self.mask = recipe, xp, mask
        self.masked = not bool(xp.all(mask == 1))  # an all-ones mask changes nothing: skip it
        self.m: Any = None
        self.v: Any = None
        self.t = 0

    def step(self, flat: Any, grad: Any, lr: float) -> Any:
        """The updated copy of ``flat`` after one step along ``grad`` (``flat`` is not modified)."""
        xp, r = self.xp, self.recipe
        g = grad * self.mask if self.masked else grad
        if r.weight_decay:
            decay = r.weight_decay * flat
            if self.masked:
                decay *= self.mask
            g = g + decay
        self.t += 1
        if r.optimizer == "sgd":
            if self.m is None:
                self.m = g * 1  # the optimizer's own buffer, never the caller's gradient
            else:
                self.m *= r.momentum
                self.m += g
            return flat - lr * self.m
        b1, b2, eps = 0.9, 0.999, 1e-8
        scaled = (1 - b1) * g
        if self.m is None:
            self.m = scaled
        else:
            self.m *= b1
            self.m += scaled
        squared = (1 - b2) * g
        squared *= g
        if self.v is None:
            self.v = squared
        else:
            self.v *= b2
            self.v += squared
        step = lr / (1 - b1**self.t)
        denom = xp.sqrt(self.v)
        denom /= math.sqrt(1 - b2**self.t)
        denom += eps
        update = step * self.m
        update /= denom
        return flat - update


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the training batches of ``n`` examples: ``batch_size`` each, in order, a last
    batch of a single example joined to the one before (a norm over the batch, BatchNorm in training
    mode, has no statistics of one example).

    Examples
    --------
    >>> batch_bounds(5, 2)
    [(0, 2), (2, 5)]
    >>> batch_bounds(4, 2)
    [(0, 2), (2, 4)]
    """
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def chance_loss(y: Any) -> float:
    """The cross-entropy of predicting the labels' frequencies (the best a constant output does): the entropy of
    the scored labels of ``y`` (those not ``IGNORE_INDEX``), in nats.

    >>> round(chance_loss(np.arange(10).repeat(3)), 4)  # ten balanced classes: ln 10
    2.3026
    """
    from combinability.data.base import IGNORE_INDEX

    labels = np.asarray(y).ravel()
    labels = labels[labels != IGNORE_INDEX]
    if not labels.size:
        return float("nan")
    p = np.bincount(labels.astype(np.int64)) / labels.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


#: Training whose last epoch's mean loss is above this fraction of the chance loss did not learn
UNTRAINED_FRACTION = 0.98


def warn_if_untrained(last_loss: float, data: ArrayDataset, recipe: TrainRecipe, steps_per_epoch: int,
                      desc: str = "train") -> None:
    """Warn (:class:`~combinability.errors.UntrainedModelWarning`) when ``last_loss``, the mean training loss of
    the last steps, is not clearly below :func:`chance_loss` of ``data``'s labels."""
    import warnings

    from combinability.errors import UntrainedModelWarning
    from combinability.plugins import _user_stacklevel

    chance = chance_loss(data.y)
    if not (chance > 0 and last_loss >= UNTRAINED_FRACTION * chance):
        return
    warm = max(1, int(round(recipe.warmup_epochs * steps_per_epoch))) if recipe.schedule == "warmup_cosine" else 0
    how = (f"it warms up to lr={recipe.lr:g} over {warm} step(s) of {steps_per_epoch * recipe.epochs}" if warm
           else f"lr={recipe.lr:g}, {steps_per_epoch * recipe.epochs} step(s)")
    warnings.warn(
        f"{desc}: the training loss of the last steps is {last_loss:.4f}, no better than predicting the labels' "
        f"frequencies ({chance:.4f}): the model did not learn ({how}). Too few steps do that, and so does a "
        f"learning rate too high for them, which collapses a network to a constant output: train for more "
        f"epochs, or with a lower rate or a longer warm-up (recipe=TrainRecipe(...))", UntrainedModelWarning,
        stacklevel=_user_stacklevel())


def fit(backend: Backend, model: Any, data: ArrayDataset, recipe: TrainRecipe, *, seed: int,
        progress: bool = False, desc: str = "train") -> Any:
    """Train ``model`` on ``data`` with ``recipe``; returns a new model holding the trained state.

    The loop is the same for every backend: a seeded batch order, the paper's augmentation
    drawn in numpy and applied by the backend, the recipe's learning-rate schedule and an
    SGD-with-momentum or Adam update of the flat parameter vector on the device; the
    backend only gives the loss's value and gradient. The same seed gives bitwise the
    same weights on the CPU at a fixed thread count.

    Raises
    ------
    DatasetError
        If ``data`` is empty.
    NonFiniteWeightsError
        If the training loss becomes NaN or infinite (lower the learning rate).
    """
    from combinability.augmentation import affine_matrices, sample_params
    from combinability.data.convert import check_labels, check_seed
    from combinability.errors import DatasetError, NonFiniteWeightsError
    from combinability.evaluation import device_data, training_loss
    from combinability.layout import FlatLayout
    from combinability.progress import progress_bar

    seed = check_seed(seed)
    n = len(data)
    if n == 0:
        raise DatasetError("cannot train on an empty dataset")
    table = backend.table_of(model)
    if table is not None:
        check_labels(data, table.num_classes)
    xp = backend.xp()
    state = backend.state(model)
    floats = {k: v for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    layout = FlatLayout.from_arrays(floats)
    trainable = set(backend.trainable(model))
    mask_np = np.zeros(layout.size, dtype=layout.dtype)
    frozen = table.frozen_weights() if table is not None else {}
    for e in layout.entries:
        if e.name in trainable:
            mask_np[e.offset : e.stop] = 1
        if e.name in frozen:  # W-Asymmetric entries: held at their frozen values, never updated
            fixed, values = frozen[e.name]
            mask_np[e.offset : e.stop][fixed.ravel()] = 0
            floats[e.name] = np.where(fixed, values, floats[e.name]).astype(floats[e.name].dtype)
    prepared = backend.prepare(model, layout)
    flat = backend.asarray(layout.flatten(floats))
    opt = Optimizer(recipe, xp, backend.asarray(mask_np))
    x, y = device_data(backend)(data)
    rng = np.random.default_rng(seed)
    aug_rng = np.random.default_rng(rng.integers(2**62)) if recipe.augment and data.is_image else None
    bounds = batch_bounds(n, int(recipe.batch_size))  # a last batch of one example joins the one before
    steps_per_epoch = len(bounds)

    loss_fn = training_loss(xp, getattr(prepared, "classes_second", None))
    step = 0
    with progress_bar(recipe.epochs * steps_per_epoch, desc, "step", progress) as bar:
        for epoch in range(recipe.epochs):
            order = backend.asarray(rng.permutation(n).astype(np.int64))
            losses = []
            for b in range(steps_per_epoch):
                idx = order[slice(*bounds[b])]
                xb, yb = xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)
                if aug_rng is not None:
                    h, w = data.x.shape[2:]
                    theta = affine_matrices(sample_params(int(idx.shape[0]), h, w, aug_rng), h, w)
                    xb = backend.augment(xb, backend.asarray(theta))
                loss, grad, flat = prepared.value_and_grad(flat, xb, yb, loss_fn)
                flat = opt.step(flat, grad, recipe.learning_rate(step, steps_per_epoch))
                losses.append(loss)
                step += 1
                bar.update(1)
            running = float(np.sum([float(backend.to_numpy(v)) for v in losses], dtype=np.float64))
            mean_loss = running / steps_per_epoch
            if not math.isfinite(mean_loss):
                raise NonFiniteWeightsError(f"training diverged in epoch {epoch + 1}: the mean loss is {mean_loss}; "
                                            f"lower the learning rate (now {recipe.lr})")
            bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}")
    if recipe.epochs:  # the last quarter of the last epoch's steps: where training ended, not how it began
        tail = [float(backend.to_numpy(v)) for v in losses[-max(1, len(losses) // 4):]]
        warn_if_untrained(float(np.mean(tail)), data, recipe, steps_per_epoch, desc)
    trained = layout.unflatten(backend.to_numpy(flat))
    return backend.with_state(model, {**state, **trained})
