"""The interface every framework backend implements.

A backend turns the core's flat numpy vectors into running models of one framework
(PyTorch, JAX/Flax, ...). The core never imports a framework: it talks to backends
only through this class. Backends are registered as plugins (see
:mod:`combinability.hookspecs`) and instantiated on first use.

Framework types are only named under ``TYPE_CHECKING``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from combinability.architecture import Architecture
    from combinability.data.base import ArrayDataset
    from combinability.layout import FlatLayout
    from combinability.training import TrainRecipe

__all__ = ["Backend", "Evaluation", "RandomSource", "NumpyRandom"]


class RandomSource(Protocol):
    """A stateful source of uniform random numbers on a backend's device.

    The array API has no random numbers, so every backend gives one of these,
    seeded from the user's seed. Samplers build every distribution from
    :meth:`uniform`.
    """

    def uniform(self, shape: int | tuple[int, ...], dtype: Any = None) -> Any:
        """Independent U[0, 1) draws of ``shape`` as an array of the backend's namespace."""
        ...


class NumpyRandom:
    """:class:`RandomSource` over :class:`numpy.random.Generator` (PCG64).

    Parameters
    ----------
    seed : int or numpy.random.Generator
    """

    def __init__(self, seed: int | np.random.Generator = 0) -> None:
        self.generator = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def uniform(self, shape: int | tuple[int, ...], dtype: Any = None) -> np.ndarray:
        return self.generator.random(shape, dtype=np.dtype(dtype or np.float32))


@dataclass
class Evaluation:
    """Scores of one parameter vector on one dataset split.

    Attributes
    ----------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct top-1 predictions.
    predictions : numpy.ndarray of int64, shape (n,)
        Predicted label of every example, in dataset order.
    """

    loss: float
    accuracy: float
    predictions: np.ndarray = field(repr=False)


class Backend(ABC):
    """One framework's implementation of model building, evaluation and training.

    Subclasses set :attr:`name` and :attr:`extra` and implement the abstract
    methods. Parameter arrays cross the boundary as numpy arrays keyed by the
    framework's own parameter names, in the framework's axis convention.
    """

    #: Registry name, e.g. ``"torch"``.
    name: str = ""
    #: The pip extra that installs the framework, e.g. ``"torch"``.
    extra: str = ""

    # -- device and arrays -----------------------------------------------------
    @abstractmethod
    def device(self) -> str:
        """The device evaluations run on, e.g. ``"cuda:0"`` or ``"cpu"``."""

    @abstractmethod
    def xp(self) -> Any:
        """The array-API namespace of this backend's arrays."""

    @abstractmethod
    def asarray(self, array: np.ndarray) -> Any:
        """Copy a numpy array to the device, as an array of :meth:`xp`."""

    @abstractmethod
    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy a device array back to host memory."""

    @abstractmethod
    def random(self, seed: int) -> RandomSource:
        """A :class:`RandomSource` on the device, seeded with ``seed``."""

    def synchronize(self) -> None:  # noqa: B027 - optional hook
        """Wait for queued device work (for timing); a no-op by default."""

    def versions(self) -> dict[str, str]:
        """Framework versions for provenance (``{"torch": "2.13.0"}``)."""
        return {}

    # -- models ----------------------------------------------------------------
    @abstractmethod
    def build(
        self,
        architecture: Architecture,
        *,
        width: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
    ) -> Any:
        """A freshly initialised native model (seeded)."""

    @abstractmethod
    def state(self, model: Any) -> dict[str, np.ndarray]:
        """Every parameter and buffer of ``model`` as numpy arrays, in a fixed order."""

    @abstractmethod
    def with_state(self, model: Any, params: Mapping[str, np.ndarray]) -> Any:
        """A model holding ``params`` (may return ``model`` itself, updated in place)."""

    @abstractmethod
    def evaluate(
        self,
        model: Any,
        layout: FlatLayout,
        flats: Any,
        data: ArrayDataset,
        *,
        batch_size: int = 1000,
    ) -> list[Evaluation]:
        """Evaluate parameter vectors on ``data``.

        Parameters
        ----------
        model : native model
            Supplies the architecture; its own weights are not used.
        layout : FlatLayout
            How a flat vector maps onto the model's named parameters.
        flats : array of shape ``(d,)`` or ``(k, d)``, or a sequence of ``(d,)`` arrays
            Numpy or device arrays of this backend.
        data : ArrayDataset
        batch_size : int

        Returns
        -------
        list of Evaluation
            One per parameter vector, in order.
        """

    @abstractmethod
    def activations(
        self,
        model: Any,
        data: ArrayDataset,
        points: Sequence[str],
        *,
        batch_size: int = 1000,
    ) -> dict[str, np.ndarray]:
        """Per-unit activations at the named points of ``model``.

        Returns ``{point: array of shape (n_examples_or_positions, units)}``; convolutional
        activations are flattened over batch and spatial positions.
        """

    @abstractmethod
    def train(
        self,
        model: Any,
        data: ArrayDataset,
        recipe: TrainRecipe,
        *,
        seed: int,
        progress: bool = False,
    ) -> Any:
        """Train ``model`` on ``data`` with ``recipe``; seeded batch order and augmentation."""

    @abstractmethod
    def save(self, model: Any, path: str | Path, metadata: Mapping[str, Any]) -> None:
        """Write a checkpoint atomically (temporary file, then rename)."""

    @abstractmethod
    def load(self, path: str | Path, architecture: Architecture | None = None) -> tuple[Any, dict[str, Any]]:
        """Read a checkpoint written by :meth:`save`: ``(model, metadata)``."""
