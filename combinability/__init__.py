"""combinability: mode combinability of neural networks.

Align two (or more) trained networks modulo permutations of hidden units (Git
Re-Basin), then build and measure whole families of element-wise combinations of
their weights, ``θ_v = (1 − v) ⊙ θ_A + v ⊙ π(θ_B)``.

The core (this package) depends on numpy and scipy only; frameworks enter through
backend plugins (``combinability_torch``, ``combinability_jax``), imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from combinability.architecture import Architecture
from combinability.backend import Backend, NumpyRandom
from combinability.combination import combine, combine3, combine3_into, combine_into
from combinability.errors import (
    AlignmentError,
    BackendUnavailableError,
    CombinabilityError,
    ConfigurationError,
    CorruptFileError,
    DatasetError,
    DatasetNotFoundError,
    IncompatibleModelsError,
    IncompatibleVersionError,
    LayoutError,
    NonFiniteWeightsError,
    OutputExistsError,
    OutputLockedError,
    OutputNotWritableError,
    PermutationSpecError,
    PluginError,
    SamplerError,
    UnknownNameError,
)
from combinability.hookspecs import hookimpl
from combinability.layout import FlatLayout, ParamEntry
from combinability.matching import (
    activation_matching,
    matching_objective,
    perturb_permutation,
    random_derangement,
    unit_correlations,
    weight_matching,
)
from combinability.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from combinability.plugins import (
    get_architecture,
    get_backend,
    list_architectures,
    list_backends,
    list_datasets,
    list_samplers,
)
from combinability.specs import SpecBuilder
from combinability.training import TrainRecipe

__version__ = "0.1.0"

# Names whose modules import more (xarray, matplotlib) are loaded on first access.
_LAZY: dict[str, str] = {
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
}


#: Lazy names that are whole submodules (``cb.experiments.hypercube``, ``cb.plots.plot_sweep``).
_MODULES = {"experiments", "plots", "derive", "checkpoint"}
_LAZY["plots"] = "combinability.plots"
_LAZY["derive"] = "combinability.derive"
_LAZY["checkpoint"] = "combinability.checkpoint"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'combinability' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AlignmentError",
    "Architecture",
    "Backend",
    "BackendUnavailableError",
    "CombinabilityError",
    "ConfigurationError",
    "CorruptFileError",
    "DatasetError",
    "DatasetNotFoundError",
    "FlatLayout",
    "IncompatibleModelsError",
    "IncompatibleVersionError",
    "LayoutError",
    "NonFiniteWeightsError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputNotWritableError",
    "NumpyRandom",
    "ParamEntry",
    "Permutation",
    "PermutationSpec",
    "PermutationSpecError",
    "PluginError",
    "SamplerError",
    "SpecBuilder",
    "TrainRecipe",
    "UnknownNameError",
    "activation_matching",
    "combine",
    "combine3",
    "combine3_into",
    "combine_into",
    "apply_permutation",
    "compose_permutations",
    "get_architecture",
    "get_backend",
    "hookimpl",
    "identity_permutation",
    "invert_permutation",
    "list_architectures",
    "list_backends",
    "list_datasets",
    "list_samplers",
    "matching_objective",
    "perturb_permutation",
    "random_derangement",
    "random_permutation",
    "unit_correlations",
    "weight_matching",
    *_LAZY,
]
