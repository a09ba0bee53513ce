"""Specs of a user's own model: traced by the backend, verified at once.

:func:`describe` asks the model's backend to trace it into a
:class:`~combinability.layers.LayerTable` (torch: :mod:`torch.fx`) and checks the result
before anything else uses it: the table must name exactly the model's parameters, and
for a random permutation π of its spec the permuted model must compute the same function
on ``example_input``, f(π(θ)) = f(θ). When it does not, the error names the permutation
and the parameters and axes it binds, where tracing could not follow the model.
:func:`derive_spec` returns the verified spec, an inspectable
:class:`~combinability.PermutationSpec` (``spec.to_json()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.data.base import input_dtype
from combinability.errors import LayoutError, PermutationSpecError, TracingError
from combinability.module_stacks import block_pairs, merge_blocks
from combinability.permutation import Permutation, PermutationSpec, apply_permutation, random_permutation

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.folding import NormFold
    from combinability.layers import LayerTable
    from combinability.permutation import PermutationSpec

__all__ = ["describe", "derive_spec", "derive_symmetries", "invertible_symmetries", "verify_spec"]


def _backend(model: Any, backend: str | Backend | None) -> Backend:
    from combinability.plugins import get_backend
    from combinability.sets import infer_backend

    return get_backend(backend or infer_backend(model))


def verify_spec(backend: Backend, model: Any, spec: PermutationSpec, example_input: Any, *, seed: int = 0,
                rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Check f(π(θ)) = f(θ) on ``example_input`` for a random π of ``spec``.

    Raises
    ------
    TracingError
        Naming each permutation that alone changes the function, with the parameters and
        axes it binds.
    """
    from combinability.evaluation import Evaluator
    from combinability.layout import FlatLayout

    state = backend.state(model)
    floats = {k: v for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    layout = FlatLayout.from_arrays(floats)
    x = backend.asarray(example_input, input_dtype(example_input))
    evaluator = Evaluator(backend, model, layout, batch_size=max(1, int(x.shape[0])))
    perm = random_permutation(spec, state, seed=seed, derange=True)  # every unit moves
    base = backend.to_numpy(evaluator.logits(layout.flatten(floats), x))[0]

    def changed(p: Permutation) -> bool:
        theta = layout.flatten(apply_permutation(spec, p, floats))
        out = backend.to_numpy(evaluator.logits(theta, x))[0]
        return not np.allclose(out, base, rtol=rtol, atol=atol * max(1.0, float(np.abs(base).max())))

    if not changed(perm):
        return
    if changed(Permutation({q: np.arange(n) for q, n in spec.perm_sizes(state).items()})):
        raise TracingError("the model's outputs on example_input differ between two calls with the same weights, in "
                           "eval mode: it draws random numbers at inference (F.dropout(x, p) without "
                           "training=self.training, torch.randn or a sampling step in forward); the library compares "
                           "and combines deterministic functions: make forward deterministic in eval mode")
    sizes = spec.perm_sizes(state)
    bad = [p for p in perm if changed(Permutation({q: (perm[q] if q == p else np.arange(n))
                                                   for q, n in sizes.items()}))]
    where = "; ".join(f"{p} binds " + ", ".join(f"{name} axis {axis}" for name, axis in spec.perm_to_axes[p])
                      for p in (bad or list(perm))[:4])
    raise TracingError(f"the derived spec does not preserve the model's function: permuting {where} changes the "
                       "outputs on example_input. The tracer could not follow the model there; pass spec= by hand "
                       "(cb.derive_spec(...).to_json() is a starting point)")


def describe(model: Any, example_input: Any, *, backend: str | Backend | None = None,
             verify: bool = True) -> LayerTable:
    """The verified layer table of a user's model (see the module docstring).

    Raises
    ------
    TracingError
        If the model cannot be traced, the table misses or adds parameters, or the spec
        does not preserve the function.
    """
    be = _backend(model, backend)
    table = be.describe(model, example_input)
    # the data a user passes is in the model's own layout (e.g. channels-last for flax)
    object.__setattr__(table, "config", {**table.config, "data_shape": tuple(int(s) for s in
                                                                            np.shape(example_input)[1:])})
    try:
        model = be.adopt(model, table)
        state = be.state(model)
        expected = table.parameters()
        if all(k in state for k in expected):  # a submodule forward never calls (an unused pooler): carried along
            state = {k: v for k, v in state.items() if k in expected}
        table.check_state(state, what=f"the state of {type(model).__name__}")
    except LayoutError as exc:
        raise TracingError(f"{exc}: the tracer did not see every parameter being used in forward; pass spec= by hand"
                           ) from None
    if verify:
        verify_spec(be, model, table.spec(), example_input)
    return table


def derive_spec(model: Any, example_input: Any, *, backend: str | Backend | None = None) -> PermutationSpec:
    """The permutation spec of a user's model, traced on ``example_input`` and verified.

    Examples
    --------
    >>> import torch, combinability as cb
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> spec = cb.derive_spec(net, torch.randn(5, 4))
    >>> dict(spec.axes_to_perm)["2.weight"]
    (None, 'P_0')
    >>> cb.PermutationSpec.from_json(spec.to_json()) == spec
    True
    """
    return describe(model, example_input, backend=backend).spec()


def derive_symmetries(model: Any, example_input: Any, *, backend: str | Backend | None = None,
                      seed: int = 0) -> tuple[PermutationSpec, list[NormFold]]:
    """The symmetries of a user's transformer — heads, FFN neurons, residual stream — verified.

    The backend traces the model's feature spaces (torch:
    :mod:`combinability_torch.trace_stream`): attention heads become block permutations,
    feed-forward units neuron permutations, and a residual stream that only linear
    maps, norms and additions touch an orthogonal map, with the norms to fold
    (:func:`combinability.fold_norms`) before it applies. Units that sit on an axis of their own
    beside their heads' or experts' (flax's ``(d, heads, head_dim)`` kernels, experts stacked as
    ``(E, d, h)``) are then permuted per head or expert where that keeps the function
    (:func:`combinability.module_stacks.merge_blocks`). The result is checked at once:
    the model with its norms folded, transformed by a random map of every kind, must
    compute the same outputs on ``example_input``.

    Returns
    -------
    (PermutationSpec, list of NormFold)
        The spec (``spec.permutations_only()`` for permutation-only alignment) and the folds.

    Raises
    ------
    TracingError
        If the model cannot be traced, or the derived symmetries change its outputs.
    """
    from combinability.folding import fold_norms

    be = _backend(model, backend)
    spec, folds = be.symmetries(model, example_input)
    floats, change = _output_change(be, model, example_input)
    try:
        spec.perm_sizes(floats)
    except PermutationSpecError as exc:  # a packing of features read one way by one layer, another by the next
        raise TracingError(f"the symmetries derived for {type(model).__name__} do not fit its parameters ({exc}): "
                           "features packed in a way the stream tracer does not follow; pass spec= by hand"
                           ) from None
    folded = fold_norms(floats, folds)

    def keeps(pairs: Mapping[str, str]) -> PermutationSpec | None:
        """``spec`` with ``pairs`` of units per block (:func:`merge_blocks`) if a random map of it keeps the outputs."""
        try:
            finer = merge_blocks(spec, folded, pairs)
        except PermutationSpecError:
            return None
        moved = apply_permutation(finer, random_permutation(finer, folded, seed, derange=True), folded)
        return finer if change(moved) is None else None

    # per-head (per-expert) units where heads (experts) sit on an axis of their own: all pairs, else each that holds
    pairs = block_pairs(spec)
    if pairs and change(folded) is None:
        finer = keeps(pairs)
        if finer is None:
            held = {p: g for p, g in pairs.items() if keeps({p: g}) is not None}
            finer = keeps(held) if held else None
        if finer is not None:
            return finer, folds
    for what, params in (("folding the norms", folded),
                         ("a random transformation", apply_permutation(
                             spec, random_permutation(spec, folded, seed, derange=True), folded))):
        moved = change(params)
        if moved is not None:
            raise TracingError(f"the derived symmetries of {type(model).__name__} do not preserve its function "
                               f"({what} changes the outputs on example_input by up to {moved:.3g}); "
                               "pass spec= by hand")
    return spec, folds


def invertible_symmetries(model: Any, example_input: Any, spec: PermutationSpec, folds: Any = (), *,
                          backend: str | Backend | None = None, seed: int = 0) -> PermutationSpec:
    """``spec`` (of :func:`derive_symmetries`) with general invertible maps inside attention heads where they hold.

    Each head's query/key and value/output units become an invertible map and its inverse
    transpose (:func:`combinability.invertible.invertible_spec`) wherever a random map of
    that kind, with every other name of the spec drawn at random too, keeps the model's
    outputs on ``example_input`` (with its norms folded); elsewhere (rotary embeddings,
    norms on queries and keys) the permutations inside heads stay.

    Returns
    -------
    PermutationSpec
    """
    from combinability.folding import fold_norms
    from combinability.invertible import invertible_spec

    be = _backend(model, backend)
    floats, change = _output_change(be, model, example_input)
    folded = fold_norms(floats, list(folds))

    def keeps(candidate: PermutationSpec) -> bool:
        moved = apply_permutation(candidate, random_permutation(candidate, folded, seed, derange=True), folded)
        return change(moved) is None

    return invertible_spec(spec, keeps)


def _output_change(be: Backend, model: Any, example_input: Any) -> tuple[dict[str, np.ndarray], Any]:
    """The model's float parameters, and ``change(params)``: how far ``params`` move its outputs on
    ``example_input``, or None when they keep them."""
    state = be.state(model)
    floats = {k: v for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    x = be.asarray(example_input, input_dtype(example_input))
    logits = _logits_of(be, model, floats, x)
    base = logits(floats)

    def change(params: Mapping[str, np.ndarray]) -> float | None:
        out = logits(params)
        close = np.allclose(out, base, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(base).max())))
        return None if close else float(np.abs(out - base).max())

    return floats, change


def _logits_of(be: Backend, model: Any, like: dict[str, np.ndarray], x: Any) -> Any:
    """``params -> logits on x`` (numpy), with one evaluator (one compilation) for every call."""
    from combinability.evaluation import Evaluator
    from combinability.layout import FlatLayout

    layout = FlatLayout.from_arrays(like)
    evaluator = Evaluator(be, model, layout, batch_size=max(1, int(x.shape[0])))

    def logits(params: dict[str, np.ndarray]) -> np.ndarray:
        flat = layout.flatten({k: np.asarray(v, dtype=np.float32) for k, v in params.items()})
        return be.to_numpy(evaluator.logits(flat, x)[0])

    return logits
