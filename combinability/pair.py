"""Pairs (and triples) of models: the two- and three-member :class:`~combinability.sets.ModelSet`.

:class:`ModelPair` keeps the v1 interface: model A (the reference) and model B, an
optional third model C (§5.3–5.4: transitivity, three-model triangle), ``theta_a`` …,
``permutation`` (B's) and ``permutation_c``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from combinability.errors import ConfigurationError
from combinability.permutation import Permutation
from combinability.sets import ModelSet, fingerprint

__all__ = ["ModelPair", "fingerprint"]


class ModelPair(ModelSet):
    """Model A and model B (and optionally C) of one architecture, as flat vectors.

    Parameters
    ----------
    model_a, model_b : native models
        Built by a backend (``cb.train``, ``backend.build``, checkpoints).
    architecture : str, optional
        Expected architecture name (checked against the models).
    backend : str or Backend, optional
        The models' backend, by name or as an instance (another device, bfloat16 forward
        passes: ``get_backend("torch").with_compute_dtype("bfloat16")``); inferred from the
        models when omitted.
    model_c : native model, optional
        A third model, for transitivity and three-model combinations.
    spec : PermutationSpec, optional
        The symmetry spec, for models not built from a layer table.
    example_input : array, optional
        A batch of inputs: a user's own models (any ``torch.nn.Module``, flax
        ``(module, variables)``) are traced into a layer table on it, and the derived spec
        is verified at once.
    """

    def __init__(self, model_a: Any, model_b: Any, architecture: str | None = None, backend: Any = None,
                 model_c: Any = None, *, spec: Any = None, example_input: Any = None) -> None:
        if architecture is not None and not isinstance(architecture, str):
            raise ConfigurationError(
                f"ModelPair(model_a, model_b, architecture=...): architecture must be a registered architecture's "
                f"name (a str), got a {type(architecture).__name__}; a third model is passed as model_c=, and more "
                "models make a cb.ModelSet([...])")
        models = [model_a, model_b] + ([model_c] if model_c is not None else [])
        super().__init__(models, backend=backend, spec=spec, architecture=architecture, example_input=example_input)

    def _init(self, **fields: Any) -> None:
        super()._init(**fields)
        if len(self.thetas) not in (2, 3):
            raise ConfigurationError(f"a ModelPair holds two or three models, not {len(self.thetas)}")

    @property
    def theta_a(self) -> np.ndarray:
        return self.thetas[0]

    @property
    def theta_b(self) -> np.ndarray:
        return self.thetas[1]

    @property
    def theta_c(self) -> np.ndarray | None:
        return self.thetas[2] if len(self.thetas) > 2 else None

    @property
    def model_a(self) -> Any:
        return self.models[0]

    @property
    def model_b(self) -> Any:
        return self.models[1]

    @property
    def model_c(self) -> Any:
        return self.models[2] if len(self.models) > 2 else None

    @property
    def permutation(self) -> Permutation | None:
        """B's permutation into A's basin (None while naive)."""
        return self.transforms[1]

    @property
    def permutation_c(self) -> Permutation | None:
        """C's permutation into A's basin (None while naive or without C)."""
        return self.transforms[2] if len(self.transforms) > 2 else None

    def with_thetas(self, theta_a: np.ndarray | None = None, theta_b: np.ndarray | None = None,
                    theta_c: np.ndarray | None = None, alignment: str | None = None) -> ModelPair:
        """A copy with some flat vectors replaced (same layout); used by transitivity and §6.3."""
        return super().with_thetas(theta_a, theta_b, theta_c if self.theta_c is not None else None,
                                   alignment=alignment)
