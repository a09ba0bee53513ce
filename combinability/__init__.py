"""combinability: mode combinability of neural networks.

Align two (or more) trained networks modulo permutations of hidden units (Git
Re-Basin), then build and measure whole families of element-wise combinations of
their weights, ``θ_v = (1 − v) ⊙ θ_A + v ⊙ π(θ_B)``.

The core (this package) depends on numpy and scipy only; frameworks enter through
backend plugins (``combinability_torch``, ``combinability_jax``), imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from combinability.errors import (
    AlignmentError,
    BackendUnavailableError,
    CombinabilityError,
    CombinabilityWarning,
    ConfigurationError,
    CorruptFileError,
    DatasetError,
    DatasetNotFoundError,
    IncompatibleModelsError,
    IncompatibleVersionError,
    LayoutError,
    NonFiniteLossWarning,
    NonFiniteWeightsError,
    NothingToAlignWarning,
    OutputExistsError,
    OutputLockedError,
    OutputNotWritableError,
    PermutationSpecError,
    PluginError,
    SamplerError,
    SmallerBatchWarning,
    UnknownNameError,
    UntracedModelWarning,
    UntrainedModelWarning,
)

__version__ = "0.1.0"

# Every other name is loaded on first access (PEP 562): ``import combinability`` (and the
# ``combinability`` command's ``--help``) then costs no numpy, scipy, xarray or framework import.
_CORE: dict[str, tuple[str, ...]] = {
    "combinability.architecture": ("Architecture",),
    "combinability.backend": ("Backend", "NumpyRandom"),
    "combinability.combination": ("combine", "combine3", "combine3_into", "combine_into"),
    "combinability.folding": ("NormFold", "Reader", "fold_norms"),
    "combinability.hookspecs": ("hookimpl",),
    "combinability.kinds": ("Blocks", "Neuron", "Orthogonal"),
    "combinability.layout": ("FlatLayout", "ParamEntry"),
    "combinability.module_stacks": ("Stack", "Part", "stack_modules"),
    "combinability.matching": ("activation_matching", "matching_objective", "perturb_permutation",
                               "random_derangement", "unit_correlations", "weight_matching"),
    "combinability.permutation": ("Permutation", "PermutationSpec", "Repeat", "apply_permutation",
                                  "compose_permutations", "identity_permutation", "invert_permutation",
                                  "random_permutation"),
    "combinability.plugins": ("get_architecture", "get_backend", "list_architectures", "list_backends",
                              "list_datasets", "list_samplers"),
    "combinability.specs": ("SpecBuilder",),
    "combinability.training": ("TrainRecipe",),
}
_LAZY: dict[str, str] = {name: module for module, names in _CORE.items() for name in names}
_LAZY.update({
    "Uniform": "combinability.samplers",
    "Subcube": "combinability.samplers",
    "Hyperplane": "combinability.samplers",
    "Bernoulli": "combinability.samplers",
    "Linear": "combinability.samplers",
    "Stitch": "combinability.samplers",
    "MinMax": "combinability.samplers",
    "Box": "combinability.samplers",
    "Triangle": "combinability.samplers",
    "get_sampler": "combinability.samplers",
    "Sampler": "combinability.samplers",
    "DrawContext": "combinability.samplers",
    "SAMPLERS": "combinability.samplers",
    "register_sampler": "combinability.samplers",
    "agreement_counts": "combinability.metrics",
    "AGREEMENT_CATEGORIES": "combinability.metrics",
    "edge_length_histogram": "combinability.metrics",
    "DatasetSpec": "combinability.data",
    "download": "combinability.data",
    "loss_barrier": "combinability.metrics",
    "empirical_barrier": "combinability.metrics",
    "agreement_categories": "combinability.metrics",
    "edge_lengths": "combinability.metrics",
    "load_dataset": "combinability.data",
    "train": "combinability.models",
    "load_model": "combinability.models",
    "save_model": "combinability.models",
    "load_into": "combinability.models",
    "ModelPair": "combinability.pair",
    "sweep": "combinability.sweeps",
    "sweep_pairs": "combinability.sweeps",
    "sweep_coefficients": "combinability.coefficients",
    "open_results": "combinability.results",
    "write_results": "combinability.results",
    "barriers": "combinability.results",
    "experiments": "combinability.experiments",
    "ArrayDataset": "combinability.data.base",
    "Evaluation": "combinability.evaluation",
    "Registration": "combinability.hookspecs",
    "RepairContext": "combinability.repairs",
    "AlignTask": "combinability.align",
    "Evaluator": "combinability.evaluation",
    "LogitMetric": "combinability.evaluation",
    "LayerTable": "combinability.layers",
    "Node": "combinability.layers",
    "ModelSet": "combinability.sets",
    "derive_spec": "combinability.derive",
    "derive_symmetries": "combinability.derive",
    "invertible_symmetries": "combinability.derive",
    "llfc": "combinability.analysis",
    "layerwise_barriers": "combinability.analysis",
    "calibrate": "combinability.analysis",
    "fit_temperature": "combinability.analysis",
    "lewc": "combinability.analysis",
    "align_many": "combinability.align.many",
})


#: Lazy names that are whole submodules (``cb.experiments.hypercube``, ``cb.plots.plot_sweep``).
_MODULES = {"experiments", "plots", "derive", "checkpoint"}
_LAZY["plots"] = "combinability.plots"
_LAZY["derive"] = "combinability.derive"
_LAZY["checkpoint"] = "combinability.checkpoint"


def __getattr__(name: str) -> Any:
    """Load a name of :data:`__all__` (or a submodule, e.g. ``cb.plugins``) on first access."""
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'combinability' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it as an attribute
    mod = importlib.import_module(module)
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AlignmentError",
    "BackendUnavailableError",
    "CombinabilityError",
    "CombinabilityWarning",
    "ConfigurationError",
    "CorruptFileError",
    "DatasetError",
    "DatasetNotFoundError",
    "IncompatibleModelsError",
    "IncompatibleVersionError",
    "LayoutError",
    "NonFiniteLossWarning",
    "NonFiniteWeightsError",
    "NothingToAlignWarning",
    "UntracedModelWarning",
    "UntrainedModelWarning",
    "SmallerBatchWarning",
    "OutputExistsError",
    "OutputLockedError",
    "OutputNotWritableError",
    "PermutationSpecError",
    "PluginError",
    "SamplerError",
    "UnknownNameError",
    *_LAZY,
]
