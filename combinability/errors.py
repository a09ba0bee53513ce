"""The library's exception hierarchy.

Every error the library raises on purpose derives from :class:`CombinabilityError`.
Subclasses also derive from the built-in exception they refine, so code written
against the built-ins (``except ValueError``) keeps working.
"""

from __future__ import annotations

__all__ = [
    "CombinabilityError",
    "PermutationSpecError",
    "LayoutError",
    "SamplerError",
    "IncompatibleModelsError",
    "NonFiniteWeightsError",
    "UnknownNameError",
    "BackendUnavailableError",
    "DatasetError",
    "DatasetNotFoundError",
    "CorruptFileError",
    "IncompatibleVersionError",
    "PluginError",
    "AlignmentError",
    "ConfigurationError",
    "TracingError",
    "NotATransformerError",
    "NotALayerTableError",
    "StackedLayersError",
    "OutputLockedError",
    "OutputExistsError",
    "OutputNotWritableError",
    "CombinabilityWarning",
    "NothingToAlignWarning",
    "UntracedModelWarning",
    "SmallerBatchWarning",
    "NonFiniteLossWarning",
    "UntrainedModelWarning",
]


class CombinabilityError(Exception):
    """Base class of every error raised by combinability on purpose."""


class PermutationSpecError(CombinabilityError, ValueError):
    """A permutation spec does not fit the parameters it is used with."""


class LayoutError(CombinabilityError, ValueError):
    """A flat vector or a set of named arrays does not match a :class:`FlatLayout`."""


class SamplerError(CombinabilityError, ValueError):
    """A sampler was given a parameter outside its valid range."""


class IncompatibleModelsError(CombinabilityError, ValueError):
    """Two or more models cannot be combined (different architecture, width or shapes)."""


class NonFiniteWeightsError(CombinabilityError, ValueError):
    """A model's weights contain NaN or infinite values."""


class UnknownNameError(CombinabilityError, KeyError):
    """A backend, architecture, dataset, sampler or split name is not registered.

    The message lists the valid names.
    """

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(CombinabilityError, ImportError):
    """A known backend whose framework is not installed; the message names the extra."""


class DatasetError(CombinabilityError, ValueError):
    """A dataset's files exist but are malformed or truncated."""


class DatasetNotFoundError(CombinabilityError, FileNotFoundError):
    """A dataset's files could not be found; the message says where they were looked for."""


class CorruptFileError(CombinabilityError, ValueError):
    """A checkpoint or results file cannot be read."""


class IncompatibleVersionError(CombinabilityError, ValueError):
    """A checkpoint or results file was written by an incompatible version of the library."""


class PluginError(CombinabilityError, RuntimeError):
    """A plugin is malformed (e.g. registers an object without the required attributes)."""


class AlignmentError(CombinabilityError, RuntimeError):
    """An alignment (matching) procedure failed."""


class ConfigurationError(CombinabilityError, ValueError):
    """An argument has an invalid value (a width, a batch size, a number of samples, ...)."""


class TracingError(CombinabilityError, ValueError):
    """A user's model could not be traced into a layer table (pass ``spec=`` by hand)."""


class NotATransformerError(TracingError):
    """The transformer (stream) tracer met a network that is not a transformer: operations on a
    convolution's maps beyond a patch embedding. A model that neither tracer follows is then
    reported with the layer-table tracer's reason alone."""


class NotALayerTableError(TracingError):
    """The layer-table tracer met a network that layer tables do not model at all: token ids read
    by an embedding (a language model). A model that neither tracer follows is then reported
    with the transformer tracer's reason alone."""


class ExampleInputError(TracingError):
    """The model does not run on ``example_input`` (an input of another shape or type than it takes):
    neither tracer can follow it, and this reason is given alone."""


class StackedLayersError(TracingError):
    """Layers stacked on a first axis and applied one a step by a scan (``nn.scan``, ``nnx.scan``):
    neither tracer follows them, and this reason is given alone."""


class OutputLockedError(CombinabilityError, OSError):
    """Another process is writing the same output file."""


class OutputExistsError(CombinabilityError, FileExistsError):
    """An output path holds a file this run did not write (not this library's, or another run's result)."""


class OutputNotWritableError(CombinabilityError, PermissionError):
    """An output location cannot be written; raised before any long work starts."""


class CombinabilityWarning(UserWarning):
    """Base class of every warning the library issues on purpose (results that may mislead)."""


class NothingToAlignWarning(CombinabilityWarning):
    """An alignment was asked of models whose spec has no transformation: every channel space is fixed
    (the input and logits only, or every hidden space held in place by the layers around it)."""


class IncompleteResultWarning(CombinabilityWarning):
    """A results file holds only part of its evaluations: its run was interrupted, or is still running."""


class SmallerBatchWarning(CombinabilityWarning):
    """A forward pass of ``batch_size`` examples ran out of memory (on the device, or the host): the
    evaluation goes on with half as many examples a call, which gives the same scores up to rounding."""


class NonFiniteLossWarning(CombinabilityWarning):
    """Some combined models of a sweep computed a loss that is not finite (NaN): their cells hold NaN, and
    barriers over them are NaN. Outside ``[0, 1]`` a BatchNorm's combined running variance can be negative."""


class UntracedModelWarning(CombinabilityWarning):
    """A user's own model could not be traced on ``example_input``; it is used with the spec given by hand,
    without the traced graph that activation matching, REPAIR and the feature analyses read."""


class UntrainedModelWarning(CombinabilityWarning):
    """Training ended no better than chance: the loss of its last steps is not below that of predicting the
    labels' frequencies (too few steps, or a learning rate too high for them, which collapses a network to a
    constant output). Alignments, barriers and timings of such a model are not those of a trained one."""
