"""Pairs (and triples) of models of one architecture, as flat vectors, and their alignment.

A :class:`ModelPair` holds model A and model B of the same architecture and width as
flat numpy vectors laid out by one :class:`~combinability.layout.FlatLayout`, plus what
a backend needs to evaluate combinations of them (a template native model). It is
immutable: :meth:`ModelPair.align` returns a new pair whose B is re-based to A,
``π(θ_B)``, and keeps the unaligned pair at hand as :attr:`ModelPair.naive`.

An optional third model C (§5.3–5.4: transitivity, three-model triangle) is aligned
to A with its own permutation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.errors import (
    ConfigurationError,
    IncompatibleModelsError,
    LayoutError,
    NonFiniteWeightsError,
    UnknownNameError,
)
from combinability.layout import FlatLayout
from combinability.matching import activation_matching, weight_matching
from combinability.permutation import Permutation, PermutationSpec, apply_permutation
from combinability.plugins import get_architecture, get_backend

if TYPE_CHECKING:
    from combinability.architecture import Architecture, ArchitectureImpl
    from combinability.backend import Backend
    from combinability.data.base import ArrayDataset

__all__ = ["ModelPair", "ALIGNMENT_METHODS", "model_config", "fingerprint"]

ALIGNMENT_METHODS = ("weight", "activation", "identity")


def model_config(model: Any) -> dict[str, Any]:
    """The configuration a backend stored on a native model at build time.

    Returns ``{"architecture", "width", "num_classes", "input_shape"}``.
    """
    cfg = getattr(model, "combinability_config", None)
    if not isinstance(cfg, Mapping):
        raise IncompatibleModelsError(
            f"{type(model).__name__} carries no combinability_config: build models with a backend "
            "(cb.train, backend.build or backend.load) so their architecture and width are known"
        )
    return {
        "architecture": str(cfg["architecture"]),
        "width": cfg["width"],
        "num_classes": int(cfg["num_classes"]),
        "input_shape": tuple(int(s) for s in cfg["input_shape"]),
    }


def fingerprint(theta: np.ndarray) -> str:
    """A short content hash of a flat vector (for provenance and resume checks)."""
    return hashlib.blake2b(np.ascontiguousarray(theta).tobytes(), digest_size=8).hexdigest()


def _check_finite(theta: np.ndarray, layout: FlatLayout, which: str) -> None:
    if np.all(np.isfinite(theta)):
        return
    bad = [e.name for e in layout.entries if not np.all(np.isfinite(theta[e.offset : e.stop]))]
    raise NonFiniteWeightsError(
        f"model {which} has NaN or infinite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
        "combinations of it would be meaningless"
    )


@dataclass(frozen=True, eq=False)
class ModelPair:
    """Model A and model B (and optionally C) of one architecture, as flat vectors.

    Parameters
    ----------
    model_a, model_b : native models
        Built by a backend (they carry ``combinability_config``).
    architecture : str, optional
        Registered architecture name; read from the models when omitted.
    backend : str, default "torch"
        Backend the models belong to.
    model_c : native model, optional
        A third model, for transitivity and three-model combinations.

    Raises
    ------
    IncompatibleModelsError
        If the models differ in architecture, width, classes or input shape.
    NonFiniteWeightsError
        If a model holds NaN or infinite weights.
    """

    model_a: Any = field(repr=False)
    model_b: Any = field(repr=False)
    architecture: str | None = None
    backend: str = "torch"
    model_c: Any = field(default=None, repr=False)
    # filled in __post_init__ / by align (not user arguments)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    layout: FlatLayout | None = field(default=None, repr=False)
    spec: PermutationSpec | None = field(default=None, repr=False)
    theta_a: np.ndarray | None = field(default=None, repr=False)
    theta_b: np.ndarray | None = field(default=None, repr=False)
    theta_c: np.ndarray | None = field(default=None, repr=False)
    permutation: Permutation | None = field(default=None, repr=False)
    permutation_c: Permutation | None = field(default=None, repr=False)
    alignment: str = "naive"
    naive: ModelPair | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.layout is not None:  # built by replace(): already checked
            return
        be = get_backend(self.backend)
        cfg_a = model_config(self.model_a)
        arch_name = self.architecture or cfg_a["architecture"]
        arch = get_architecture(arch_name)
        others = [("B", self.model_b)] + ([("C", self.model_c)] if self.model_c is not None else [])
        for which, model in others:
            cfg = model_config(model)
            diffs = {k: (cfg_a[k], cfg[k]) for k in cfg_a if cfg_a[k] != cfg[k]}
            if diffs:
                text = "; ".join(f"{k}: A has {a!r}, {which} has {b!r}" for k, (a, b) in diffs.items())
                raise IncompatibleModelsError(f"models A and {which} cannot be combined: {text}")
        if cfg_a["architecture"] != arch.name:
            raise IncompatibleModelsError(
                f"the models are {cfg_a['architecture']!r} networks, not {arch.name!r} as requested"
            )
        impl = arch.implementation(be.name)
        kw = {k: cfg_a[k] for k in ("width", "num_classes", "input_shape")}
        state_a = be.state(self.model_a)
        layout = FlatLayout.from_arrays(state_a, layers=impl.layers(**kw))
        spec = impl.spec(**kw)
        spec.validate(state_a, allow_unlisted=True)
        thetas = {"A": layout.flatten(state_a)}
        for which, model in others:
            state = be.state(model)
            try:
                layout.check_compatible(FlatLayout.from_arrays(state))
            except LayoutError as exc:
                raise IncompatibleModelsError(f"models A and {which} have different parameters: {exc}") from None
            thetas[which] = layout.flatten(state)
        for which, theta in thetas.items():
            _check_finite(theta, layout, which)
        object.__setattr__(self, "architecture", arch.name)
        object.__setattr__(self, "backend", be.name)
        object.__setattr__(self, "config", cfg_a)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "theta_a", thetas["A"])
        object.__setattr__(self, "theta_b", thetas["B"])
        object.__setattr__(self, "theta_c", thetas.get("C"))

    # -- accessors -------------------------------------------------------------------
    @property
    def arch(self) -> Architecture:
        """The registered :class:`~combinability.Architecture`."""
        return get_architecture(self.architecture)

    @property
    def impl(self) -> ArchitectureImpl:
        """The architecture's implementation for this pair's backend."""
        return self.arch.implementation(self.backend)

    @property
    def backend_obj(self) -> Backend:
        """The :class:`~combinability.Backend` instance."""
        return get_backend(self.backend)

    @property
    def width(self) -> Any:
        """Width multiplier of the models."""
        return self.config["width"]

    @property
    def layer_names(self) -> list[str]:
        """Names of the architecture's ordered layers."""
        kw = {k: self.config[k] for k in ("width", "num_classes", "input_shape")}
        return list(self.impl.layer_names(**kw))

    @property
    def is_aligned(self) -> bool:
        """True when B (and C) have been re-based to A."""
        return self.alignment != "naive"

    def params(self, which: str = "a") -> dict[str, np.ndarray]:
        """Named arrays of model ``"a"``, ``"b"`` or ``"c"`` (B and C as currently aligned)."""
        theta = {"a": self.theta_a, "b": self.theta_b, "c": self.theta_c}.get(which.lower())
        if theta is None:
            raise UnknownNameError(f"no model {which!r} in this pair; valid: 'a', 'b'" + (", 'c'" if self.theta_c
                                                                                             is not None else ""))
        return self.layout.unflatten(theta)

    def model(self, which: str = "a") -> Any:
        """A native model holding model ``which``'s (aligned) weights."""
        return self.backend_obj.with_state(self._fresh_template(), self.params(which))

    def _fresh_template(self) -> Any:
        be = self.backend_obj
        kw = {k: self.config[k] for k in ("width", "num_classes", "input_shape")}
        return be.build(self.arch, seed=0, **kw)

    @property
    def template(self) -> Any:
        """A native model of the right architecture (its weights are not used by evaluation)."""
        return self.model_a

    def fingerprints(self) -> dict[str, str]:
        """Content hashes of the flat vectors (provenance, resume checks)."""
        out = {"theta_a": fingerprint(self.theta_a), "theta_b": fingerprint(self.theta_b)}
        if self.theta_c is not None:
            out["theta_c"] = fingerprint(self.theta_c)
        return out

    # -- alignment ---------------------------------------------------------------------
    def align(
        self,
        method: str = "weight",
        *,
        seed: int = 0,
        data: str | ArrayDataset | None = None,
        restarts: int = 0,
        max_iter: int = 100,
        examples: int = 2000,
    ) -> ModelPair:
        """Re-base B (and C) to A: a new pair holding ``π(θ_B)``.

        Parameters
        ----------
        method : {"weight", "activation", "identity"}
            Weight matching (Git Re-Basin, appendix C), activation matching (correlation
            of activations on ``data``), or the identity (a no-op, for baselines).
        seed : int
            Seeds weight matching's sweep order and restarts.
        data : str or ArrayDataset, optional
            Inputs for activation matching (training split of a registered dataset, or
            an ArrayDataset); required for ``method="activation"``.
        restarts, max_iter : int
            Passed to :func:`~combinability.weight_matching`.
        examples : int
            Number of training examples whose activations are correlated.

        Returns
        -------
        ModelPair
            With ``permutation`` (and ``permutation_c``) set and ``naive`` pointing to the
            unaligned pair.
        """
        if method not in ALIGNMENT_METHODS:
            raise UnknownNameError(f"unknown alignment method {method!r}; valid: {', '.join(ALIGNMENT_METHODS)}")
        naive = self.naive or self
        params_a = naive.params("a")
        targets = {"b": naive.params("b")}
        if naive.theta_c is not None:
            targets["c"] = naive.params("c")
        perms: dict[str, Permutation] = {}
        for which, params in targets.items():
            if method == "weight":
                perms[which] = weight_matching(self.spec, params_a, params, seed=seed, restarts=restarts,
                                               max_iter=max_iter)
            elif method == "activation":
                perms[which] = self._activation_permutation(naive, which, data, examples)
            else:
                sizes = self.spec.perm_sizes(params_a)
                perms[which] = Permutation({p: np.arange(n) for p, n in sizes.items()}, method="identity")
        theta_b = self.layout.flatten(apply_permutation(self.spec, perms["b"], targets["b"]))
        theta_c = None
        if "c" in targets:
            theta_c = self.layout.flatten(apply_permutation(self.spec, perms["c"], targets["c"]))
        return replace(naive, theta_b=theta_b, theta_c=theta_c, permutation=perms["b"],
                       permutation_c=perms.get("c"), alignment=method, naive=naive)

    def _activation_permutation(self, naive: ModelPair, which: str, data: Any, examples: int) -> Permutation:
        if data is None:
            raise ConfigurationError("activation matching needs data: pass data='digits' (or another dataset name)")
        from combinability.data import load_dataset

        ds = load_dataset(data, "train") if isinstance(data, str) else data
        ds = ds.subset(examples, seed=0)
        kw = {k: self.config[k] for k in ("width", "num_classes", "input_shape")}
        points = self.impl.activation_points(**kw)
        be = self.backend_obj
        model_a = naive.model("a")
        model_x = naive.model(which)
        acts_a = be.activations(model_a, ds, list(dict.fromkeys(points.values())))
        acts_x = be.activations(model_x, ds, list(dict.fromkeys(points.values())))
        return activation_matching({p: acts_a[pt] for p, pt in points.items()},
                                   {p: acts_x[pt] for p, pt in points.items()})

    def with_thetas(self, theta_a: np.ndarray | None = None, theta_b: np.ndarray | None = None,
                    theta_c: np.ndarray | None = None, alignment: str | None = None) -> ModelPair:
        """A copy with some flat vectors replaced (same layout); used by transitivity and §6.3."""
        changes: dict[str, Any] = {}
        for name, theta in (("theta_a", theta_a), ("theta_b", theta_b), ("theta_c", theta_c)):
            if theta is not None:
                theta = np.asarray(theta)
                if theta.shape != (self.layout.size,):
                    raise LayoutError(f"{name} has shape {theta.shape}, the layout expects ({self.layout.size},)")
                changes[name] = theta
        if alignment is not None:
            changes["alignment"] = alignment
        return replace(self, **changes)

    def __repr__(self) -> str:
        return (f"ModelPair(architecture={self.architecture!r}, width={self.width!r}, backend={self.backend!r}, "
                f"d={self.layout.size}, alignment={self.alignment!r}, models={3 if self.theta_c is not None else 2})")
