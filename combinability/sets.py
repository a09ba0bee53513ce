"""Sets of models of one architecture, as flat vectors, and their alignment into one basin.

A :class:`ModelSet` holds models ``θ_0, θ_1, …, θ_k`` of one architecture as flat numpy
vectors laid out by one :class:`~combinability.layout.FlatLayout`. Model 0 is the
reference; each other model ``i`` has its own transformation ``T_i`` into model 0's
basin (``None`` while naive). It is immutable: :meth:`ModelSet.align` returns a new set
holding ``T_i(θ_i)`` and keeps the unaligned set as :attr:`ModelSet.naive`. Any two or
three members are one selection away (:meth:`ModelSet.select`, :meth:`ModelSet.pair`);
:class:`~combinability.pair.ModelPair` is the set of two (or three) models.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.digests import freeze, memoized
from combinability.errors import (
    ConfigurationError,
    ExampleInputError,
    IncompatibleModelsError,
    LayoutError,
    NonFiniteWeightsError,
    NotALayerTableError,
    NotATransformerError,
    StackedLayersError,
    TracingError,
    UnknownNameError,
)
from combinability.kinds import Blocks, Orthogonal
from combinability.layout import FlatLayout, owns_memory
from combinability.permutation import Permutation, PermutationSpec, apply_permutation
from combinability.plugins import get_backend

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.folding import NormFold
    from combinability.layers import LayerTable

__all__ = ["ModelSet", "fingerprint", "infer_backend"]


def fingerprint(theta: np.ndarray) -> str:
    """A short content hash of a flat vector (for provenance and resume checks).

    Computed once for a read-only vector (:mod:`combinability.digests`), as a set's own.
    """

    def compute() -> str:
        return hashlib.blake2b(memoryview(np.ascontiguousarray(theta)).cast("B"), digest_size=8).hexdigest()

    return memoized("blake2b-8", (theta,), compute) if isinstance(theta, np.ndarray) else compute()


def _first_difference(a: PermutationSpec, b: PermutationSpec) -> str:
    """The first layer where two derived specs differ (heads of another count or size, ...)."""
    for name in a.perm_names:
        if a.kind(name) != b.kind(name):
            return f"{name!r} is {a.kind(name)} in A but {b.kind(name)} in the other"
    for name, axes in a.axes_to_perm.items():
        if b.axes_to_perm.get(name) != axes:
            return f"{name!r} has axes {axes} in A but {b.axes_to_perm.get(name)} in the other"
    return "their specs differ"


def infer_backend(model: Any) -> str:
    """The backend of a native model: ``"torch"`` for a ``torch.nn.Module``, ``"jax"`` for flax (NNX or linen).

    Only frameworks already imported are consulted (a model of a framework that is not
    imported cannot exist).

    Raises
    ------
    IncompatibleModelsError
        If the model belongs to no known framework.
    """
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        return "torch"
    jax_model = sys.modules.get("combinability_jax.backend")
    if jax_model is not None and isinstance(model, jax_model.FlaxModel):
        return "jax"
    if isinstance(model, tuple) and len(model) == 2 and "flax" in sys.modules:
        return "jax"
    if "flax.nnx" in sys.modules and isinstance(model, sys.modules["flax.nnx"].Module):
        return "jax"
    raise IncompatibleModelsError(
        f"cannot tell the framework of a {type(model).__name__}: pass a torch.nn.Module, a flax NNX module, "
        "a flax linen (module, variables) pair or a model built by the library, or name the backend with backend="
    )


def _check_one_framework(models: Sequence[Any]) -> None:
    """Refuse models of two frameworks in one set, naming both (a backend named for the first would
    otherwise tell the user to switch to the other's)."""
    first = infer_backend(models[0])
    for i, m in enumerate(models[1:], start=1):
        try:
            other = infer_backend(m)
        except IncompatibleModelsError:
            continue  # not a native model of any framework: the backend's own check names it
        if other != first:
            raise IncompatibleModelsError(
                f"model A ({type(models[0]).__name__}) is a model of the {first!r} backend, model {_label(i)} "
                f"({type(m).__name__}) one of the {other!r} backend: the models of a set come from one framework")


def _check_finite(theta: np.ndarray, layout: FlatLayout, which: int) -> None:
    if np.all(np.isfinite(theta)):
        return
    bad = [e.name for e in layout.entries if not np.all(np.isfinite(theta[e.offset : e.stop]))]
    raise NonFiniteWeightsError(f"model {_label(which)} has NaN or infinite weights in {bad[:5]}"
                                f"{' ...' if len(bad) > 5 else ''}; combinations of it would be meaningless")


def _module_layers(be: Backend, names: Iterable[str]) -> dict[str, int]:
    """A model without a layer table: the entries of one module (:meth:`Backend.module_path`) form one
    layer, the layers in the order their modules first appear in the state (torch: registration order)."""
    order: dict[str, int] = {}
    return {name: order.setdefault(be.module_path(name), len(order)) for name in names}


def _node_difference(a: Any, b: Any, label: str) -> str:
    """What differs between two layer-table nodes at one place, field by field (``units 16 in A, 8 in B``)."""
    if a.name != b.name or a.op != b.op:
        return f"node {a.name!r} ({a.op}) in A, {b.name!r} ({b.op}) in {label}"
    fields = [f"{k} {v!r} in A, {getattr(b, k)!r} in {label}" for k, v in vars(a).items() if getattr(b, k) != v]
    return f"node {a.name!r} ({a.op}): " + "; ".join(fields)


def _label(i: int) -> str:
    """``A``, ``B``, … for the first 26 members (model 0 is A), then ``model 26`` …"""
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i] if i < 26 else f"#{i}"


def _float_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The floating-point entries of a state: integer counters are left out of combinations."""
    return {k: v for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}


def _reasons(table_exc: TracingError, stream_exc: TracingError) -> str:
    """Why neither tracer follows a model: both reasons; one alone where it holds for either
    tracer (the model does not run on example_input; layers stacked by a scan); the layer-table
    tracer's alone where the stream tracer's says the model is no transformer (a CNN) or repeats
    it; the stream tracer's alone where the model reads token ids (a language model, which layer
    tables do not model)."""
    stacked = next((e for e in (table_exc, stream_exc) if isinstance(e, ExampleInputError)),
                   next((e for e in (stream_exc, table_exc) if isinstance(e, StackedLayersError)), None))
    if stacked is not None:
        return str(stacked)
    if isinstance(table_exc, NotALayerTableError):  # token ids: the stream tracer's reason is the one that helps
        return str(stream_exc)
    if isinstance(stream_exc, NotATransformerError) or str(stream_exc) == str(table_exc):
        return str(table_exc)
    return f"{table_exc}; traced as a transformer: {stream_exc}"


def _warn_untraced(model: Any, why: str) -> None:
    """Warn that ``model`` could not be traced and is used with the spec given by hand."""
    import warnings

    from combinability.errors import UntracedModelWarning

    warnings.warn(
        f"{type(model).__name__} could not be traced on example_input ({why}); the models are used with the spec "
        "given by hand: sweeps, weight matching and every sampler work on them, what reads their layers' "
        "features (activation matching, REPAIR and the feature analyses) needs a traced model",
        UntracedModelWarning, stacklevel=3)


class ModelSet:
    """Models ``θ_0 … θ_k`` of one architecture; model 0 is the reference.

    Parameters
    ----------
    models : sequence of native models
        Built by a backend (``cb.train``, ``backend.build``, checkpoints); at least two.
    backend : str or Backend, optional
        The models' backend, by name or as an instance (e.g. one on another device or computing
        in bfloat16: ``get_backend("torch").with_compute_dtype("bfloat16")``); inferred from the
        first model when omitted.
    spec : PermutationSpec, optional
        The symmetry spec; by default the one of the models' layer table.
    example_input : array, optional
        A batch of inputs (numpy or framework tensor), for a user's own models: they are
        traced into a layer table (:func:`combinability.derive.describe`) whose spec is
        verified on it at once.

    Raises
    ------
    IncompatibleModelsError
        If the models differ in architecture, width, classes or input shape.
    NonFiniteWeightsError
        If a model holds NaN or infinite weights.
    """

    def __init__(self, models: Sequence[Any], *, backend: str | Backend | None = None,
                 spec: PermutationSpec | None = None,
                 architecture: str | None = None, example_input: Any = None) -> None:
        models = list(models)
        if len(models) < 2:
            raise ConfigurationError(f"a ModelSet needs at least two models, got {len(models)}")
        be = get_backend(backend or infer_backend(models[0]))
        if backend is None:
            _check_one_framework(models)
        models = [be.own(m) for m in models]  # what the backend compiles for a model stays with the set
        tables = [be.table_of(m) for m in models]
        folds: tuple[NormFold, ...] = ()
        points: dict[str, str] = {}
        streamed = False  # traced by its feature spaces (a transformer): example_input kept, to observe its units
        if tables[0] is None and example_input is not None:
            from combinability.derive import derive_symmetries, describe
            from combinability.feature_spaces import opener_points
            from combinability.module_stacks import merge_blocks

            derived = None
            try:
                tables = [describe(models[0], example_input, backend=be, verify=spec is None)]
            except TracingError as exc:  # not a layer table: a transformer's feature spaces?
                try:
                    derived, derived_folds = derive_symmetries(models[0], example_input, backend=be)
                except TracingError as stream_exc:
                    reason = _reasons(exc, stream_exc)
                    if spec is None:
                        raise TracingError(reason) from None
                    # the spec given by hand stands, the models stay untraced
                    _warn_untraced(models[0], reason)
            else:  # A is a layer table: so must the others be (a failure is theirs, not a reason to trace A anew)
                for i, m in enumerate(models[1:], start=1):
                    try:
                        tables.append(describe(m, example_input, backend=be, verify=False))
                    except TracingError as exc:
                        raise IncompatibleModelsError(f"model A is traced, but model {_label(i)} "
                                                      f"({type(m).__name__}) is not: {exc}") from None
                models = [be.adopt(m, t) for m, t in zip(models, tables, strict=True)]
            if derived is not None:
                for i, m in enumerate(models[1:], start=1):
                    other = be.symmetries(m, example_input)[0]
                    if other != derived:  # (derived with its units per head or expert: merge_blocks)
                        other = merge_blocks(other, _float_state(be.state(m)))
                    if other != derived:
                        raise IncompatibleModelsError(
                            f"models A and {_label(i)} have different symmetries: "
                            f"{_first_difference(derived, other)}; they cannot be combined") from None
                points = opener_points(derived) if spec is None else {}  # a given spec names its own points
                streamed = spec is None
                spec, folds = spec if spec is not None else derived, tuple(derived_folds)
        table = tables[0]
        if table is None and spec is None:
            raise IncompatibleModelsError(
                f"model A ({type(models[0]).__name__}) is the user's own model: pass example_input= (a batch of "
                "inputs) so the library can trace it, or spec= (a PermutationSpec)")
        for i, t in enumerate(tables[1:], start=1):
            if t != table and table is not None and table.config.get("traced"):
                diff = next((_node_difference(a, b, _label(i)) for a, b in zip(table.nodes, t.nodes, strict=False)
                             if a != b), f"{len(table.nodes)} vs {len(t.nodes)} nodes")
                raise IncompatibleModelsError(f"models A and {_label(i)} trace to different networks ({diff}); "
                                              "they cannot be combined")
            if t != table:
                ca, ci = (dict(x.config) if x is not None else {} for x in (table, t))
                diffs = "; ".join(f"{k}: A has {ca.get(k)!r}, {_label(i)} has {ci.get(k)!r}"
                                  for k in sorted(set(ca) | set(ci)) if ca.get(k) != ci.get(k))
                raise IncompatibleModelsError(f"models A and {_label(i)} cannot be combined: "
                                              f"{diffs or 'different networks'}")
        if architecture is not None and table is not None and table.config.get("architecture") != architecture:
            raise IncompatibleModelsError(f"the models are {table.config.get('architecture')!r} networks, "
                                          f"not {architecture!r} as requested")
        states = [be.state(m) for m in models]
        floats = _float_state(states[0])
        layout = FlatLayout.from_arrays(floats, layers=table.layers() if table is not None else
                                        _module_layers(be, floats))
        spec = spec if spec is not None else table.spec()
        spec.validate(states[0], allow_unlisted=True)
        thetas = []
        for i, state in enumerate(states):
            mine = _float_state(state)
            if set(mine) == set(floats):  # the same names in another order (a flax tree rebuilt with sorted keys)
                mine = {k: mine[k] for k in floats}
            try:
                layout.check_compatible(FlatLayout.from_arrays(mine))
            except LayoutError as exc:
                raise IncompatibleModelsError(f"models A and {_label(i)} have different parameters: {exc}") from None
            theta = layout.flatten(mine)
            _check_finite(theta, layout, i)
            thetas.append(theta)
        self._init(backend=be.name, table=table, layout=layout, spec=spec, models=models, thetas=thetas,
                   transforms=[None] * len(models), alignment="naive", naive=None, folds=folds, points=points,
                   alignment_settings=None,
                   backend_instance=None if backend is None or isinstance(backend, str) else be,
                   example_input=example_input if points or streamed else None)

    def _init(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)
        # read-only: a set is immutable, and its vectors' fingerprints are then hashed once
        # (with the memory under a flattened vector, which no one else's array views)
        self.thetas = tuple(freeze(t, views=owns_memory(t)) if isinstance(t, np.ndarray) else t for t in self.thetas)
        self.transforms = tuple(self.transforms)
        self.models = tuple(self.models)

    def _replace(self, **changes: Any) -> ModelSet:
        new = object.__new__(type(self))
        new._init(**{**self.__dict__, **changes})
        return new

    # -- accessors -------------------------------------------------------------------
    backend: str
    table: LayerTable | None
    layout: FlatLayout
    spec: PermutationSpec
    models: tuple[Any, ...]
    thetas: tuple[np.ndarray, ...]
    transforms: tuple[Permutation | None, ...]
    alignment: str
    #: How the members were aligned (``{"method": ..., "seed": ..., "restarts": ...}``, JSON values), recorded
    #: in the files of sweeps and experiments; None while naive.
    alignment_settings: dict[str, Any] | None
    naive: ModelSet | None
    folds: tuple[NormFold, ...]
    points: dict[str, str]

    def __len__(self) -> int:
        return len(self.thetas)

    @property
    def backend_obj(self) -> Backend:
        """The :class:`~combinability.Backend` instance (the one given, else the registered one of its name)."""
        return self.__dict__.get("backend_instance") or get_backend(self.backend)

    @property
    def config(self) -> dict[str, Any]:
        """The models' configuration (``architecture``, ``width``, ``num_classes``, ``input_shape``)."""
        return dict(self.table.config) if self.table is not None else {"architecture": None, "width": 1.0}

    @property
    def architecture(self) -> str:
        """The registered architecture's name; for a user's own model, its class name."""
        return self.config.get("architecture") or self.config.get("model") or "user model"

    @property
    def width(self) -> Any:
        """Width multiplier of the models."""
        return self.config.get("width", 1.0)

    @property
    def layer_names(self) -> list[str]:
        """Names of the ordered layers (stitching, per-layer plots)."""
        if self.table is not None:
            return self.table.layer_names()
        return list(dict.fromkeys(self.backend_obj.module_path(name) for name in self.layout.names))

    @property
    def feature_points(self) -> dict[str, str]:
        """For each permutation, the feature point whose units it reorders (a layer table's points; for
        a model traced by its feature spaces, the output of the layer that opened each neuron space)."""
        return self.table.activation_points() if self.table is not None else dict(self.points)

    @property
    def part_points(self) -> dict[str, tuple[str, int, int]]:
        """For each permutation that reorders only some channels of its feature point, ``(point, start,
        stop)`` (:meth:`~combinability.layers.LayerTable.activation_parts`); empty without a layer table."""
        return self.table.activation_parts() if self.table is not None else {}

    @property
    def is_aligned(self) -> bool:
        """True when the members have been transformed into model 0's basin."""
        return self.alignment != "naive"

    @property
    def template(self) -> Any:
        """A native model of the right architecture (its weights are not used by evaluation)."""
        return self.models[0]

    def _index(self, which: int | str) -> int:
        if isinstance(which, str):
            idx = "abcdefghijklmnopqrstuvwxyz".find(which.lower()) if len(which) == 1 else -1
        else:
            idx = int(which)
        if not 0 <= idx < len(self):
            raise UnknownNameError(f"no model {which!r} in this set of {len(self)}; valid: 0..{len(self) - 1} "
                                   f"(or 'a', 'b', ...)")
        return idx

    def theta(self, which: int | str = 0) -> np.ndarray:
        """Flat vector of member ``which`` (as aligned)."""
        return self.thetas[self._index(which)]

    def params(self, which: int | str = 0) -> dict[str, np.ndarray]:
        """Named arrays of member ``which`` (as aligned)."""
        return self.layout.unflatten(self.theta(which))

    def model(self, which: int | str = 0) -> Any:
        """A native model holding member ``which``'s (aligned) weights."""
        i = self._index(which)
        be = self.backend_obj
        return be.with_state(self.models[i], {**be.state(self.models[i]), **self.params(i)})

    def fingerprints(self) -> dict[str, str]:
        """Content hashes of the flat vectors (provenance, resume checks)."""
        return {f"theta_{'abcdefghijklmnopqrstuvwxyz'[i]}": fingerprint(t) for i, t in enumerate(self.thetas)}

    def select(self, *members: int | str) -> ModelSet:
        """The set of the given members, in that order (the first is the new reference)."""
        from combinability.pair import ModelPair

        idx = [self._index(m) for m in members]
        if len(idx) < 2:
            raise ConfigurationError("select at least two members")
        cls = ModelPair if len(idx) in (2, 3) else ModelSet
        naive = self.naive._replace(**_pick(self.naive, idx)) if self.naive is not None else None
        if naive is not None:
            naive = _recast(naive, cls)
        return _recast(self._replace(**_pick(self, idx), naive=naive), cls)

    def pair(self, i: int | str = 0, j: int | str = 1) -> ModelSet:
        """Members ``i`` and ``j`` as a :class:`~combinability.pair.ModelPair` (``i`` is A)."""
        return self.select(i, j)

    # -- alignment ---------------------------------------------------------------------
    def align(self, method: str = "weight", *, seed: int = 0, data: Any = None, examples: int = 2000,
              progress: bool = False, symmetries: str = "all", **options: Any) -> ModelSet:
        """Transform every member into model 0's basin: a new set holding ``T_i(θ_i)``.

        Parameters
        ----------
        method : str
            A registered aligner (``combinability plugins`` lists them): ``"weight"``
            (Git Re-Basin weight matching), ``"activation"`` (needs ``data``), ``"identity"``, ...;
            or a many-model method of :func:`~combinability.align_many` (``"mergemany"``, ``"cycle"``,
            ``"hierarchical"``, ``"reference"``), which aligns the members jointly (its options:
            ``max_iter``, ``rounds``, ``fw_iter``; ``data`` is not read).
        seed : int
            Seeds the aligner.
        data : str, (x, y), DataLoader or ArrayDataset, optional
            Inputs for data-driven aligners (training split of a registered dataset, or the data).
        examples : int
            Examples whose features data-driven aligners see.
        progress : bool, default False
            Ask the aligner for a progress line (weight matching shows each sweep's
            objective on a terminal, else logs it at ``INFO``); aligners without one ignore it.
        symmetries : {"all", "permutation", "invertible"}, default "all"
            For a transformer: ``"all"`` aligns heads, neurons and the residual stream's
            orthogonal map (folding its norms into the layers that read them first: the
            members keep their functions, not their parameters); ``"permutation"``
            replaces the orthogonal map by a permutation, for comparison; ``"invertible"``
            adds general invertible maps inside each head, on its query/key and on its
            value/output units (Theus et al. 2025; where they keep the function: not
            under rotary embeddings or norms on queries and keys), found by tracing on
            the set's ``example_input`` (:func:`combinability.invertible_symmetries`).
            Weight matching only.
        **options
            Passed to the aligner (e.g. ``restarts``, ``max_iter`` for weight matching).
        """
        from combinability.align import AlignTask, align
        from combinability.data.convert import check_seed

        seed = check_seed(seed)
        spec = self._alignment_spec(symmetries)
        if not spec.perm_names and method != "identity":
            import warnings

            from combinability.errors import NothingToAlignWarning
            from combinability.plugins import _user_stacklevel

            warnings.warn(f"{method!r} alignment leaves the models as they are: their spec has no permutation (every "
                          "channel space is held in place, e.g. by grouped convolutions or W-asymmetric layers); "
                          "pass spec= to declare the symmetries by hand", NothingToAlignWarning,
                          stacklevel=_user_stacklevel())
        if _many_method(method):
            from combinability.align.many import align_set

            return align_set(self, method, seed=seed, symmetries=symmetries, **options)
        naive = (self.naive or self)._folded_for(spec)
        reference = naive.params(0)
        observed = self._observed(spec, naive, method, seed)
        features, correlations, moments = self._feature_source(naive, data, examples, observed.readings) \
            if data is not None else (None, None, None)
        learned = self._learning_context(naive, data, method)
        transforms: list[Permutation | None] = [None]
        thetas = [naive.thetas[0]]
        for i in range(1, len(naive)):
            task = AlignTask(spec=spec, reference=reference, other=naive.params(i), seed=seed,
                             feature_points=self._points_for(spec), part_points=self.part_points,
                             features=None if features is None else (lambda which, pts, i=i: features(
                                 0 if which == "reference" else i, pts)),
                             correlations=None if correlations is None else (lambda pts, i=i: correlations(
                                 naive.thetas[0], naive.thetas[i], pts)),
                             moments=None if moments is None else (lambda pts, i=i: moments(
                                 naive.thetas[0], naive.thetas[i], pts)),
                             observations=observed.pieces)
            perm = align(method, task, **({"progress": True} if progress else {}), **learned, **options)
            # units read where the probe saw them move exactly as their name says are observed the same in both
            # models' orders: no second round (one is needed where a unit is observed along another permuted axis)
            seen_all = all(p in observed.pieces for p in spec.perm_names if not isinstance(spec.kinds.get(p), Blocks)
                           and p not in {k.group for k in spec.kinds.values() if isinstance(k, Blocks)})
            if method == "activation" and self.table is None and not (observed.pieces and seen_all):
                perm = self._observed_again(task, perm, naive, (features, correlations, moments), options)
            transforms.append(perm)
            thetas.append(self.layout.flatten(apply_permutation(spec, perm, naive.params(i))))
        return self._replace(thetas=tuple(thetas), transforms=tuple(transforms), alignment=method, naive=self.naive
                             or self, models=naive._natives(thetas), spec=spec, alignment_settings=alignment_settings(
                                 method, seed=seed, symmetries=symmetries,
                                 **({"examples": examples} if data is not None else {}), **options))

    def _points_for(self, spec: PermutationSpec) -> dict[str, str]:
        """:attr:`feature_points` for aligning by ``spec``: a traced residual stream aligned by permutations
        only (``symmetries="permutation"``) is read at the layer that opened it, as a neuron space is."""
        if self.table is not None or not self.points:
            return self.feature_points
        from combinability.feature_spaces import opener_points

        return {**self.feature_points, **opener_points(spec)}

    def _observed_again(self, task: Any, perm: Permutation, naive: ModelSet, sources: tuple[Any, Any, Any],
                        options: Mapping[str, Any]) -> Permutation:
        """Activation matching of a model traced by its feature spaces, once more on B as first aligned.

        A unit may be observed along another permuted axis: MLP-Mixer's token-mixing units at each
        (example, feature), the features in each model's own order. Those observations correspond
        only once B's features are in A's order, so the assignment runs again on B so aligned; the
        result composes both (units observed on examples and positions only are assigned the same
        twice: the second is the identity).
        """
        from dataclasses import replace

        from combinability.align import align
        from combinability.permutation import compose_permutations

        features, correlations, moments = sources
        moved = apply_permutation(task.spec, perm, task.other)
        theta = self.layout.flatten(moved)
        again = replace(task, other=moved,
                        features=None if features is None else (lambda which, pts: features(
                            0 if which == "reference" else theta, pts)),
                        correlations=None if correlations is None else (lambda pts: correlations(
                            naive.thetas[0], theta, pts)),
                        moments=None if moments is None else (lambda pts: moments(naive.thetas[0], theta, pts)))
        second = align("activation", again, **options)
        out = compose_permutations(perm, second)
        return Permutation(dict(out), objective=second.objective, history=[*perm.history, *second.history],
                           method="activation")

    def _alignment_spec(self, symmetries: str) -> PermutationSpec:
        """The spec an alignment uses: every kind (``"all"``), permutations only, or with invertible maps in heads
        (of the naive set's symmetries: an aligned set's spec is the one it was aligned with)."""
        base = self.naive or self
        if symmetries == "all":
            return base.spec
        if symmetries == "permutation":
            return base.spec.permutations_only()
        if symmetries == "invertible":
            return base.invertible_spec()
        raise ConfigurationError(f"symmetries must be 'all' (every kind the model admits: heads, neurons, an "
                                 f"orthogonal residual stream), 'permutation' or 'invertible' (also invertible maps "
                                 f"inside attention heads), got {symmetries!r}")

    def invertible_spec(self) -> PermutationSpec:
        """The set's spec with general invertible maps inside attention heads (``symmetries="invertible"``).

        Raises
        ------
        ConfigurationError
            For models not traced as transformers from an ``example_input`` (a layer table's
            networks have no attention heads), or when no head admits such a map.
        """
        if self.naive is not None:
            return self.naive.invertible_spec()
        cached = self.__dict__.get("_invertible")
        if cached is not None:
            return cached
        example = self.__dict__.get("example_input")
        if example is None or not any(isinstance(k, Blocks) for k in self.spec.kinds.values()):
            raise ConfigurationError(
                "symmetries='invertible' (invertible maps inside attention heads) needs attention heads traced from "
                f"example_input; the {self.architecture} models have none: use 'all' or 'permutation'")
        from combinability.derive import invertible_symmetries

        spec = invertible_symmetries(self.models[0], example, self.spec, self.folds, backend=self.backend_obj)
        if spec == self.spec:
            raise ConfigurationError(
                "symmetries='invertible': no attention head of these models keeps its function under an invertible "
                "map of its query/key or value/output units (rotary embeddings, norms on queries and keys or "
                "grouped key/value heads fix them); use 'all'")
        object.__setattr__(self, "_invertible", spec)
        return spec

    def _folded_for(self, spec: PermutationSpec) -> ModelSet:
        """This set with its norms folded when ``spec`` has an orthogonal map (same functions, new parameters)."""
        if not (self.folds and any(isinstance(k, Orthogonal) for k in spec.kinds.values())):
            return self
        from combinability.folding import fold_norms

        folded = [self.layout.flatten(fold_norms(self.params(i), self.folds)) for i in range(len(self))]
        return self._replace(thetas=tuple(folded), models=self._natives(folded))

    def _natives(self, thetas: Sequence[np.ndarray]) -> tuple[Any, ...]:
        """Native models holding ``thetas`` (this set's own model object where a vector is unchanged)."""
        be = self.backend_obj
        return tuple(m if theta is old else be.with_state(m, {**be.state(m), **self.layout.unflatten(theta)})
                     for m, old, theta in zip(self.models, self.thetas, thetas, strict=True))

    def _learning_context(self, naive: ModelSet, data: Any, method: Any) -> dict[str, Any]:
        """``{"context": LearningContext}`` for aligners registered with ``needs=(..., "model")``, else ``{}``."""
        from combinability.plugins import get_registration

        if not isinstance(method, str) or "model" not in get_registration("aligners", method).needs:
            return {}
        from combinability.align.ste import LearningContext

        t = self.table
        return {"context": LearningContext(self.backend_obj, naive.models[0], self.layout, data,
                                           input_shape=t.data_shape if t is not None else None,
                                           num_classes=t.num_classes if t is not None else None)}

    def merge(self, *, repair: Any = None, repair_data: Any = None) -> Any:
        """The average of the members (as aligned), ``Σ_i θ_i / k``, as a native model of the members' kind.

        Parameters
        ----------
        repair : str or callable, optional
            A registered repair applied to the average: ``"reset"`` (BatchNorm statistics
            recomputed on ``repair_data``) or ``"repair"`` (REPAIR: every member's statistics
            averaged, each with weight ``1/k``).
        repair_data : str, (x, y) or ArrayDataset, optional
            Data for the repair (a dataset name's training split, or the data).

        Raises
        ------
        ConfigurationError
            If the repair does not fit the models or is given no data (checked before it runs).
        """
        be, layout = self.backend_obj, self.layout
        theta = np.mean(np.stack(self.thetas).astype(np.float64), axis=0).astype(layout.dtype)
        if repair is not None:
            from combinability.data.convert import as_dataset
            from combinability.repairs import RepairContext, get_repair

            repair_fn = get_repair(repair)
            data = as_dataset(repair_data, "train", name="repair_data") if repair_data is not None else None
            k = len(self)
            ctx = RepairContext(be, self.template, layout, [be.asarray(t) for t in self.thetas],
                                tuple(1.0 / k for _ in range(k - 1)), data, self.table, {})
            if callable(getattr(repair_fn, "validate", None)):
                repair_fn.validate(ctx)
            theta = be.to_numpy(repair_fn(be.asarray(theta), ctx))
        return be.with_state(self.models[0], {**be.state(self.models[0]), **layout.unflatten(theta)})

    def _observed(self, spec: PermutationSpec, naive: ModelSet, method: Any, seed: int) -> Any:
        """Where the units of ``spec``'s attention heads and residual streams are observed
        (:func:`combinability.observation.observe_model`), for an aligner that reads units at feature points;
        empty for other aligners, models without an ``example_input`` and specs without such names."""
        from combinability.kinds import Dual, Invertible
        from combinability.observation import Observed, Piece, observe_model
        from combinability.plugins import get_registration

        registration = get_registration("aligners", method) if isinstance(method, str) else method
        if not getattr(registration, "reads_points", False):
            return Observed()
        streams: dict[str, tuple[Piece, ...]] = {}
        if self.table is not None:  # a space with several activation outputs (a residual stream): read at each
            streams = {p: tuple(Piece(point, 0, None) for point in points)
                       for p, points in self.table.activation_observations().items()
                       if p in spec.perm_names and p not in self.part_points}
        example = self.__dict__.get("example_input")
        points = self._points_for(spec)
        base = (self.naive or self).spec
        unpointed = [p for p in spec.perm_names if p not in points and p not in self.part_points]  # heads moving
        if example is None or any(isinstance(k, Invertible | Dual) for k in spec.kinds.values()) or (  # refused
                not unpointed and not any(isinstance(k, Blocks | Orthogonal) and p not in points  # whole (Repeat)
                                          for p, k in [*spec.kinds.items(), *base.kinds.items()])):
            return Observed(pieces=streams)
        # a transformer: every name read wherever its units show (a stream at every block, a gated MLP's
        # hidden units at both its gate and its up projection, grouped key/value heads at their keys and values)
        names = [p for p in spec.perm_names if p not in self.part_points]
        found = observe_model(self.backend_obj, naive.models[0], self.layout, naive.thetas[0], example, spec, names,
                              seed=seed)
        return Observed(pieces={**streams, **found.pieces}, readings=found.readings)

    def _feature_source(self, naive: ModelSet, data: Any, examples: int,
                        readings: Mapping[str, str] | None = None) -> Any:
        from combinability.data.convert import as_dataset
        from combinability.evaluation import Evaluator

        cache: dict[Any, Any] = {}

        def ready() -> tuple[Any, Any]:
            if "data" not in cache:  # built on first use: data-free aligners never read the data
                shape = self.table.data_shape if self.table is not None else None
                cache["data"] = as_dataset(data, "train", input_shape=shape).subset(examples, seed=0)
                cache["evaluator"] = Evaluator(self.backend_obj, naive.models[0], self.layout)
            return cache["data"], cache["evaluator"]

        def features(i: int | np.ndarray, points: Sequence[str]) -> dict[str, np.ndarray]:
            """Features of member ``i`` (cached), or of a flat vector ``i``."""
            ds, evaluator = ready()
            wanted = list(dict.fromkeys(points))
            if isinstance(i, np.ndarray):
                return evaluator.features(i, ds, wanted, readings=readings)
            if i not in cache or any(p not in cache[i] for p in wanted):
                cache[i] = evaluator.features(naive.thetas[i], ds, wanted, readings=readings)
            return {p: cache[i][p] for p in wanted}

        def correlations(theta_a: np.ndarray, theta_b: np.ndarray, points: Sequence[str]) -> dict[str, np.ndarray]:
            ds, evaluator = ready()
            return evaluator.correlations(theta_a, theta_b, ds, list(dict.fromkeys(points)), readings=readings)

        def moments(theta_a: np.ndarray, theta_b: np.ndarray, points: Sequence[str]) -> dict[str, Any]:
            ds, evaluator = ready()
            return evaluator.moments(theta_a, theta_b, ds, list(dict.fromkeys(points)), readings=readings)

        return features, correlations, moments

    def with_thetas(self, *thetas: np.ndarray | None, alignment: str | None = None, **named: np.ndarray) -> ModelSet:
        """A copy with some flat vectors replaced (same layout); ``theta_b=...`` or positionally."""
        new = list(self.thetas)
        items = list(enumerate(thetas)) + [(self._index(k.removeprefix("theta_")), v) for k, v in named.items()]
        for i, theta in items:
            if theta is None:
                continue
            theta = np.asarray(theta)
            if theta.shape != (self.layout.size,):
                raise LayoutError(f"theta {i} has shape {theta.shape}, the layout expects ({self.layout.size},)")
            new[i] = theta
        return self._replace(thetas=tuple(new), alignment=alignment or self.alignment, models=self._natives(new),
                             alignment_settings=self.alignment_settings if alignment is None else None)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(architecture={self.architecture!r}, width={self.width!r}, "
                f"backend={self.backend!r}, d={self.layout.size}, alignment={self.alignment!r}, models={len(self)})")


def _many_method(method: Any) -> bool:
    """Whether ``method`` names a many-model method of :func:`~combinability.align_many` that no registered
    aligner shadows (``ModelSet.align("mergemany")`` aligns the members jointly)."""
    from combinability.align import list_aligners
    from combinability.align.many import METHODS

    return isinstance(method, str) and method in METHODS and method not in list_aligners()


def alignment_settings(method: str, **settings: Any) -> dict[str, Any]:
    """The settings of an alignment as JSON values (anything else, a callable or an array, by its repr)."""
    import json

    def plain(v: Any) -> Any:
        try:
            json.dumps(v)
            return v
        except (TypeError, ValueError):
            return repr(v)

    return {"method": method, **{k: plain(v) for k, v in settings.items()}}


def _pick(s: ModelSet, idx: list[int]) -> dict[str, Any]:
    return {"models": tuple(s.models[i] for i in idx), "thetas": tuple(s.thetas[i] for i in idx),
            "transforms": tuple(s.transforms[i] for i in idx)}


def _recast(s: ModelSet, cls: type) -> ModelSet:
    if type(s) is cls:
        return s
    new = object.__new__(cls)
    new._init(**s.__dict__)
    return new
