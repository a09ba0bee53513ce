"""Training recipes of the paper's appendix A, backend-neutral.

A :class:`TrainRecipe` is a small frozen value; backends read its fields and ask it
for the learning rate of each step, so that every backend trains the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from combinability.errors import ConfigurationError, UnknownNameError

__all__ = ["TrainRecipe", "RECIPES", "recipe_for"]

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
}


def recipe_for(architecture: str, **changes) -> TrainRecipe:
    """The recipe registered for ``architecture`` with ``changes`` applied."""
    try:
        base = RECIPES[architecture]
    except KeyError:
        raise UnknownNameError(
            f"no training recipe for {architecture!r}; known: {', '.join(sorted(RECIPES))}"
        ) from None
    return base.with_(**changes) if changes else base
