"""The interface every framework backend implements: a thin adapter.

A backend turns the core's flat parameter vectors into running models of one framework.
It gives arrays and random numbers on its device, the state of a native model as numpy
arrays, module builders for :class:`~combinability.layers.LayerTable` descriptions, and
one *prepared* functional model per (model, layout): a batched forward pass over k flat
vectors, feature taps, and the value and gradient of a loss. Everything that needs no
framework — evaluation and metrics on logits, batching, the training loop, learning-rate
schedules, augmentation, checkpoints, architecture descriptions — lives once, in the core.

The core never imports a framework: it talks to backends only through this class.
Backends are registered as plugins (see :mod:`combinability.hookspecs`).
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from combinability.folding import NormFold
    from combinability.layers import LayerTable
    from combinability.layout import FlatLayout
    from combinability.permutation import PermutationSpec

__all__ = ["Backend", "Prepared", "RandomSource", "NumpyRandom", "bound_forward", "VMAP_MAX_PARAMETERS",
           "vmap_on_accelerator"]


class RandomSource(Protocol):
    """A stateful source of uniform random numbers on a backend's device.

    The array API has no random numbers, so every backend gives one of these, seeded
    from the user's seed. Samplers build every distribution from :meth:`uniform`.
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


class Prepared(Protocol):
    """A model made functional over one :class:`~combinability.layout.FlatLayout`.

    Entries of the model's state that the layout leaves out (integer counters such as
    BatchNorm's ``num_batches_tracked``) are taken from the model as it was prepared.
    All arrays are the backend's device arrays; ``x`` is channels-first float32.
    """

    def forward(self, flats: Any, x: Any) -> Any:
        """Logits of shape ``(k, n, classes)`` for ``flats`` of shape ``(k, d)`` (inference mode)."""
        ...

    def features(self, flat: Any, x: Any, points: Sequence[str]) -> dict[str, Any]:
        """The outputs of the named feature points for one ``(d,)`` vector, channels-first:
        ``(n, units)`` vectors, ``(n, c, *positions)`` maps."""
        ...

    # Optional: ``bind(flats)``, a context manager yielding ``forward(x)`` for many batches of
    # the same vectors, set up once (parameter views, inference mode) rather than per batch.
    # :func:`bound_forward` uses it when a backend has it, :meth:`forward` otherwise.
    # Optional: ``one_vector = True`` when ``forward`` and ``bind`` also take one ``(d,)`` vector
    # (logits ``(1, n, classes)``): the evaluator then passes a single vector as it is, which
    # spares a backend of immutable arrays (jax) the copy that making it ``(1, d)`` would be.
    # Optional: ``classes_second``, True when the model gives dense logits with their classes second
    # (a convolution's channels, ``(n, classes, H, W)``), False when last, None (or absent) when
    # unknown: it settles the shapes both layouts fit (:func:`combinability.evaluation.logit_rows`).

    def value_and_grad(self, flat: Any, x: Any, y: Any, loss: Callable[[Any, Any], Any], *,
                       train: bool = True) -> tuple[Any, Any, Any]:
        """``(loss value, gradient (d,), flat after the step's buffer updates)``, in training mode.

        ``loss(logits, y)`` is written with the backend's array namespace (:meth:`Backend.xp`)
        and must be differentiable by the framework. The gradient is zero on buffers;
        the returned vector carries updated buffers (BatchNorm running statistics), in a new
        array: ``flat`` itself is left as it is (it may share memory with a model's vector).
        ``train=False`` differentiates the inference-mode loss instead, the one evaluations
        measure (BatchNorm by its running statistics, no dropout): deterministic, and the
        returned vector holds ``flat``'s buffers unchanged.
        """
        ...


#: On an accelerator, several parameter vectors of fewer parameters each than this run in one
#: vmapped forward call; larger ones run one after the other. Measured on an NVIDIA H200
#: (``benchmarks/device/vmap_or_loop.py``; ``docs/performance.md``): vmapping is 7x faster
#: than the loop for the MLP (0.9 M parameters), 1.4-2x for Tiny-10 and ResNet-20 (0.02-0.3 M), a
#: tie at ResNet-20 x4 (4.4 M, bfloat16), and 1.2x (jax) to 1.55x (torch) slower at ResNet-20
#: x32 (276 M, bfloat16): once one vector's kernels fill the device, a vmapped convolution
#: (grouped over the vectors) only costs.
VMAP_MAX_PARAMETERS = 1 << 24


def vmap_on_accelerator(parameters: int) -> bool:
    """Whether vectors of ``parameters`` entries each run vmapped on an accelerator by default.

    A backend's ``vectorize=None`` means this on a GPU (an explicit ``vectorize`` overrides it);
    on the CPU each backend keeps its own measured rule.

    Examples
    --------
    >>> vmap_on_accelerator(269_722), vmap_on_accelerator(276_000_000)
    (True, False)
    """
    return int(parameters) < VMAP_MAX_PARAMETERS


def bound_forward(prepared: Prepared, flats: Any) -> contextlib.AbstractContextManager[Callable[[Any], Any]]:
    """``forward(x)`` of ``flats`` for many batches: the prepared model's ``bind`` when it has one.

    A backend whose per-call set-up (parameter views, entering inference mode) is worth
    doing once per vector rather than once per batch implements ``bind(flats)``: a
    context manager yielding the function; the logits are those of
    :meth:`Prepared.forward`. Otherwise each batch calls ``prepared.forward(flats, x)``.
    """
    bind = getattr(prepared, "bind", None)
    if bind is None:
        return contextlib.nullcontext(functools.partial(prepared.forward, flats))
    return bind(flats)


class Backend(ABC):
    """One framework's adapter. Subclasses set :attr:`name` and :attr:`extra`.

    Parameter arrays cross the boundary as numpy arrays keyed by the model's own
    parameter names; models built from a layer table use the table's (reference) names.
    """

    #: Registry name, e.g. ``"torch"``.
    name: str = ""
    #: The pip extra that installs the framework, e.g. ``"torch"``.
    extra: str = ""
    #: The floating-point types forward passes may compute in (see :meth:`with_compute_dtype`).
    compute_dtypes: tuple[str, ...] = ("float32",)
    #: The type forward passes and feature taps compute in; parameters stay float32 and
    #: logits come back as float32 either way.
    compute_dtype: str = "float32"

    # -- device and arrays -----------------------------------------------------------
    @abstractmethod
    def device(self) -> str:
        """The device evaluations run on, e.g. ``"cuda:0"`` or ``"cpu"``."""

    @abstractmethod
    def xp(self) -> Any:
        """The array-API namespace of this backend's arrays."""

    @abstractmethod
    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """Copy an array (numpy or this backend's) to the device, optionally cast."""

    @abstractmethod
    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy a device array back to host memory."""

    @abstractmethod
    def random(self, seed: int) -> RandomSource:
        """A :class:`RandomSource` on the device, seeded with ``seed``."""

    def devices(self) -> dict[str, Any]:
        """The devices this backend can reach here, by name (``{"cpu": ..., "cuda:0": ...}``).

        Aliases may map to one device (``"cuda"`` to the current GPU). The default knows
        only the device it runs on; framework backends override it.
        """
        return {self.device(): None}

    def with_device(self, device: Any) -> Backend:
        """A backend like this one on ``device`` (a value of :meth:`devices`); itself by default."""
        return self

    def on_device(self, device: str) -> Backend:
        """This backend on another ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

        Raises
        ------
        ConfigurationError
            If the device is not available to this backend here; the message lists the valid ones.
        """
        from combinability.errors import ConfigurationError

        available = self.devices()
        if device not in available:
            raise ConfigurationError(f"device {device!r} is not available to backend {self.name!r} on this machine; "
                                     f"valid: {', '.join(available)}")
        return self if device == self.device() else self.with_device(available[device])

    def with_compute_dtype(self, dtype: str) -> Backend:
        """This backend computing its forward passes in ``dtype`` (mixed precision).

        ``"bfloat16"`` runs inference in bfloat16 where the framework supports it (torch's
        autocast; jax casts parameters and inputs), with float32 parameters and float32
        logits, so metrics and results are unchanged in type; training steps keep float32.
        A study opts in (the default is float32): results then differ from float32 ones by
        bfloat16's rounding, and the result files record the type (``compute_dtype``).

        Raises
        ------
        ConfigurationError
            If this backend cannot compute in ``dtype``; the message lists the valid types.
        """
        from combinability.errors import ConfigurationError

        if dtype not in self.compute_dtypes:
            raise ConfigurationError(f"backend {self.name!r} cannot compute in {dtype!r}; valid: "
                                     f"{', '.join(self.compute_dtypes)}")
        return self if dtype == self.compute_dtype else self._with_compute_dtype(dtype)

    def _with_compute_dtype(self, dtype: str) -> Backend:
        """A copy computing in ``dtype`` (one of :attr:`compute_dtypes`); backends that have several override it."""
        raise NotImplementedError

    def with_compile(self, compile: bool | Mapping[str, Any] = True) -> Backend:  # noqa: A002
        """This backend evaluating models through its framework's graph compiler (or not: ``False``).

        A backend whose forward passes run eagerly overrides this (torch: :func:`torch.compile`,
        whose keyword arguments a mapping gives); compiling costs seconds to a minute per model
        and pays off on long evaluations of large models on a GPU. The default returns this
        backend unchanged: jax's evaluations are always compiled (``jax.jit``).
        """
        return self

    def synchronize(self) -> None:  # noqa: B027 - optional hook
        """Wait for queued device work (for timing); a no-op by default."""

    def versions(self) -> dict[str, str]:
        """Framework versions for provenance (``{"torch": "2.13.0"}``)."""
        return {}

    # -- models ----------------------------------------------------------------------
    @abstractmethod
    def build(self, table: LayerTable, *, seed: int) -> Any:
        """A freshly initialised native model of ``table`` (seeded), on the device.

        The model's state has exactly the table's parameter names and shapes, and the
        model remembers the table (:meth:`table_of`).
        """

    @abstractmethod
    def table_of(self, model: Any) -> LayerTable | None:
        """The layer table a model was built from, or None for a user's own model."""

    def describe(self, model: Any, example_input: Any) -> LayerTable:
        """The layer table of a user's own model, traced on ``example_input`` (a batch).

        Raises
        ------
        TracingError
            If the model cannot be traced into a table (the user may pass ``spec=`` by hand).
        """
        from combinability.errors import TracingError

        raise TracingError(f"the {self.name} backend cannot trace user models; pass spec= by hand")

    def symmetries(self, model: Any, example_input: Any) -> tuple[PermutationSpec, list[NormFold]]:
        """The symmetry spec of a user's transformer (heads, neurons, residual stream) and its norm folds.

        Raises
        ------
        TracingError
            If this backend cannot trace feature spaces (the user may pass ``spec=`` by hand).
        """
        from combinability.errors import TracingError

        raise TracingError(f"the {self.name} backend cannot trace a transformer's symmetries; pass spec= by hand")

    def module_path(self, name: str) -> str:
        """The module holding state entry ``name`` (``encoder.layers.0.linear1`` of
        ``encoder.layers.0.linear1.weight``; a parameter of the model itself, ``pos_embed``, is
        its own): the layers of a model without a layer table."""
        path, _, _ = name.rpartition(".")
        return path or name

    def adopt(self, model: Any, table: LayerTable) -> Any:
        """``model`` as a model of its traced ``table`` (after :meth:`describe`); unchanged by default."""
        return model

    @abstractmethod
    def state(self, model: Any) -> dict[str, np.ndarray]:
        """Every parameter and buffer of ``model`` as numpy arrays, in a fixed order."""

    def own(self, model: Any) -> Any:
        """The backend's own object for a user's ``model``, made once by :class:`~combinability.ModelSet`, so
        that what the backend compiles for it is kept with the set (jax: a ``FlaxModel`` of an NNX module or
        a linen ``(module, variables)`` pair) and that it runs as the library runs models (torch: a float32
        copy of a bfloat16 or float64 module); by default the model itself."""
        return model

    def native_state(self, model: Any) -> dict[str, np.ndarray]:
        """The state under the names and layouts of the model's own framework, as its own code saves
        and loads it (:func:`combinability.save_model` writes this): :meth:`state` unless the backend
        renames a user's traced model (jax: flax names, not the layer table's)."""
        return self.state(model)

    @abstractmethod
    def trainable(self, model: Any) -> tuple[str, ...]:
        """Names of the state entries trained by gradient (the others are buffers)."""

    @abstractmethod
    def with_state(self, model: Any, params: Mapping[str, np.ndarray]) -> Any:
        """A new model holding ``params`` (``model`` itself is left unchanged)."""

    @abstractmethod
    def prepare(self, model: Any, layout: FlatLayout) -> Prepared:
        """The functional form of ``model`` over ``layout`` (cached by the caller)."""

    def cross_entropy(self, logits: Any, y: Any) -> Any:
        """Per-example cross-entropy of ``logits`` ``(..., n, classes)`` against ``y`` ``(n,)``, in float32.

        The definition is the core's (:func:`combinability.evaluation.cross_entropy`); a backend
        may override this with its framework's fused kernel (same values up to rounding), as
        evaluation computes it for every batch of every combination.
        """
        from combinability.evaluation import cross_entropy

        return cross_entropy(self.xp(), logits, y)

    @abstractmethod
    def augment(self, x: Any, matrices: Any) -> Any:
        """Resample each image of ``x`` ``(n, c, h, w)`` through its affine map.

        ``matrices`` ``(n, 2, 3)`` maps output pixel coordinates, normalised to
        ``[-1, 1]`` (x right, y down, pixel centres), to input coordinates; bilinear,
        zeros outside the image (the semantics of torch's ``affine_grid`` +
        ``grid_sample`` with ``align_corners=False``).
        """
