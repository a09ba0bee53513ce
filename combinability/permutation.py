"""Permutation specs and the operations on permutations of hidden units.

A :class:`PermutationSpec` says, for every named parameter, which permutation (if
any) acts on each of its axes. A *permutation* is a mapping from permutation name to
an integer index array ``perm[P]`` of length ``n_P``; applying it to parameters
gathers along every axis bound to ``P``::

    out[name] (index j along a P-axis) == params[name] (index perm[P][j])

so that ``apply_permutation(spec, perm, params_b)`` is a network functionally
identical to ``params_b`` whose unit ``j`` is B's unit ``perm[P][j]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np

from combinability.errors import PermutationSpecError

__all__ = [
    "PermutationSpec",
    "Permutation",
    "apply_permutation",
    "invert_permutation",
    "compose_permutations",
    "identity_permutation",
    "random_permutation",
    "check_permutation",
]


class PermutationSpec:
    """Which permutation acts on which axis of which parameter.

    Parameters
    ----------
    axes_to_perm : mapping of str to tuple of (str or None)
        One entry per parameter; the tuple has one element per axis: the name of the
        permutation acting on that axis, or ``None``.

    Examples
    --------
    >>> spec = PermutationSpec({
    ...     "fc1.weight": ("P0", None), "fc1.bias": ("P0",),
    ...     "fc2.weight": (None, "P0"), "fc2.bias": (None,),
    ... })
    >>> spec.perm_to_axes["P0"]
    [('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)]
    """

    def __init__(self, axes_to_perm: Mapping[str, tuple[str | None, ...]]) -> None:
        checked: dict[str, tuple[str | None, ...]] = {}
        for name, axes in axes_to_perm.items():
            if not isinstance(name, str):
                raise PermutationSpecError(f"parameter names must be str, got {name!r}")
            if isinstance(axes, str) or not isinstance(axes, tuple | list):
                raise PermutationSpecError(
                    f"{name!r}: axes must be a tuple with one entry (a permutation name or None) per axis, "
                    f"got {axes!r}"
                )
            for p in axes:
                if p is not None and not isinstance(p, str):
                    raise PermutationSpecError(f"{name!r}: permutation names must be str or None, got {p!r}")
            checked[name] = tuple(axes)
        self._axes = MappingProxyType(checked)

    @property
    def axes_to_perm(self) -> Mapping[str, tuple[str | None, ...]]:
        """Parameter name to the permutation name (or ``None``) of each axis."""
        return self._axes

    @cached_property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name to the ``(parameter, axis)`` pairs it acts on, in spec order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, axes in self._axes.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    out.setdefault(p, []).append((name, axis))
        return out

    @property
    def perm_names(self) -> tuple[str, ...]:
        """Permutation names, in order of first appearance."""
        return tuple(self.perm_to_axes)

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self._axes)} parameters, permutations {list(self.perm_names)})"

    def to_json(self) -> str:
        """The spec as JSON: ``{"format": "combinability-spec", "version": 1, "axes": {name: [perm|null, ...]}}``."""
        import json

        return json.dumps({"format": "combinability-spec", "version": 1,
                           "axes": {k: list(v) for k, v in self._axes.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PermutationSpec:
        """Read a spec written by :meth:`to_json` (or a plain ``{name: [perm|null, ...]}`` object).

        Raises
        ------
        PermutationSpecError
            If the text is not JSON or does not describe a spec.
        """
        import json

        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise PermutationSpecError(f"not a JSON permutation spec: {exc}") from None
        if isinstance(data, dict) and data.get("format") == "combinability-spec":
            if data.get("version") != 1:
                raise PermutationSpecError(f"permutation spec version {data.get('version')!r}; this library reads 1")
            data = data.get("axes")
        if not isinstance(data, dict):
            raise PermutationSpecError("a JSON permutation spec is an object {parameter: [permutation or null, ...]}")
        return cls({k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermutationSpec) and dict(self._axes) == dict(other._axes)

    def __hash__(self) -> int:
        return hash(tuple(self._axes.items()))

    def perm_sizes(self, params: Mapping[str, Any]) -> dict[str, int]:
        """Size of each permutation, read off ``params`` (which :meth:`validate` checks)."""
        self.validate(params, allow_unlisted=True)
        return {p: int(np.shape(params[axes[0][0]])[axes[0][1]]) for p, axes in self.perm_to_axes.items()}

    def validate(self, params: Mapping[str, Any], *, allow_unlisted: bool = False) -> None:
        """Check that the spec fits ``params``.

        Parameters
        ----------
        params : mapping of str to array-like
            Named parameters (only their shapes are read).
        allow_unlisted : bool, default False
            Accept parameters that the spec does not list (left unpermuted).

        Raises
        ------
        PermutationSpecError
            Naming the parameter and axis at fault: a listed parameter that does not
            exist, a parameter the spec misses, an entry with the wrong number of axes,
            or two axes bound to one permutation with different sizes.
        """
        missing = [n for n in self._axes if n not in params]
        if missing:
            known = ", ".join(list(params)[:12]) + (" ..." if len(params) > 12 else "")
            raise PermutationSpecError(
                f"the spec names parameter(s) that do not exist: {missing}; the model has: {known}"
            )
        if not allow_unlisted:
            unlisted = [n for n in params if n not in self._axes]
            if unlisted:
                raise PermutationSpecError(
                    f"the spec misses parameter(s) {unlisted}; list every parameter, with None for "
                    "axes no permutation acts on (or pass allow_unlisted=True)"
                )
        for name, axes in self._axes.items():
            shape = np.shape(params[name])
            if len(axes) != len(shape):
                raise PermutationSpecError(
                    f"{name!r} has {len(shape)} axes (shape {tuple(shape)}) but the spec gives {len(axes)}: {axes}"
                )
        for p, entries in self.perm_to_axes.items():
            first_name, first_axis = entries[0]
            size = np.shape(params[first_name])[first_axis]
            for name, axis in entries[1:]:
                other = np.shape(params[name])[axis]
                if other != size:
                    raise PermutationSpecError(
                        f"permutation {p!r} binds axes of different sizes: {name!r} axis {axis} has size "
                        f"{other}, but {first_name!r} axis {first_axis} has size {size}"
                    )


class Permutation(dict):
    """A permutation of a spec: ``{name: int64 index array}``, plus how it was found.

    It is a plain ``dict`` (so ``perm["P0"]`` works) with attributes filled in by the
    matching procedures.

    Attributes
    ----------
    objective : float or None
        The matching objective reached (for weight matching, ``Σ ⟨θ_A, π(θ_B)⟩``).
    history : list of float
        Objective after the start and after each sweep of the best run.
    iterations : int
        Sweeps of the best run.
    method : str
        ``"weight"``, ``"activation"``, ``"identity"``, ``"random"``, ...
    """

    def __init__(self, *args: Any, objective: float | None = None, history: list[float] | None = None,
                 iterations: int = 0, method: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.history = list(history or [])
        self.iterations = iterations
        self.method = method

    def copy(self) -> Permutation:  # keep the type and metadata
        return Permutation({k: v.copy() for k, v in self.items()}, objective=self.objective,
                           history=self.history, iterations=self.iterations, method=self.method)

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self.items()}
        return f"Permutation(method={self.method!r}, sizes={sizes}, objective={self.objective})"


def check_permutation(perm: Mapping[str, Any], sizes: Mapping[str, int] | None = None) -> None:
    """Raise :class:`PermutationSpecError` unless every entry is a permutation of ``range(n)``.

    When ``sizes`` is given, ``perm`` must hold exactly those names with those lengths.
    """
    if sizes is not None:
        missing = sorted(set(sizes) - set(perm))
        extra = sorted(set(perm) - set(sizes))
        if missing or extra:
            raise PermutationSpecError(
                f"permutation names do not match the spec: missing {missing}, unexpected {extra}"
            )
    for p, idx in perm.items():
        arr = np.asarray(idx)
        n = len(arr) if arr.ndim == 1 else -1
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise PermutationSpecError(f"permutation {p!r} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        if sizes is not None and n != sizes[p]:
            raise PermutationSpecError(f"permutation {p!r} has length {n}, the spec's axes have size {sizes[p]}")
        if n and (arr.min() < 0 or arr.max() >= n or np.bincount(arr, minlength=n).max() != 1):
            raise PermutationSpecError(f"permutation {p!r} is not a permutation of range({n})")


def apply_permutation(
    spec: PermutationSpec,
    perm: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    except_perm: str | None = None,
) -> dict[str, np.ndarray]:
    """Permute ``params`` by ``perm``.

    Parameters
    ----------
    spec : PermutationSpec
    perm : mapping of str to int array
        One index array per permutation of ``spec``.
    params : mapping of str to numpy array
        Parameters not listed in the spec are returned unchanged.
    except_perm : str, optional
        Leave the axes of this permutation unpermuted (used inside weight matching).

    Returns
    -------
    dict of str to numpy.ndarray
        New arrays (inputs are not modified), in the order of ``params``.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        arr = np.asarray(value)
        axes = spec.axes_to_perm.get(name)
        if axes is not None:
            if len(axes) != arr.ndim:
                raise PermutationSpecError(
                    f"{name!r} has {arr.ndim} axes (shape {arr.shape}) but the spec gives {len(axes)}: {axes}"
                )
            for axis, p in enumerate(axes):
                if p is None or p == except_perm:
                    continue
                if p not in perm:
                    raise PermutationSpecError(f"no index array for permutation {p!r} (needed by {name!r})")
                idx = np.asarray(perm[p])
                if len(idx) != arr.shape[axis]:
                    raise PermutationSpecError(
                        f"permutation {p!r} has length {len(idx)} but {name!r} axis {axis} has size {arr.shape[axis]}"
                    )
                arr = np.take(arr, idx, axis=axis)
        out[name] = arr
    return out


def identity_permutation(sizes: Mapping[str, int]) -> Permutation:
    """The identity permutation for permutation sizes ``{name: n}``."""
    return Permutation({p: np.arange(n, dtype=np.int64) for p, n in sizes.items()}, method="identity")


def invert_permutation(perm: Mapping[str, Any]) -> Permutation:
    """The inverse: ``apply(inv, apply(perm, x)) == x``."""
    return Permutation({p: np.argsort(np.asarray(idx), kind="stable").astype(np.int64) for p, idx in perm.items()},
                       method="inverse")


def compose_permutations(first: Mapping[str, Any], second: Mapping[str, Any]) -> Permutation:
    """The permutation that applies ``first`` then ``second``.

    ``apply(compose(p, q), x) == apply(q, apply(p, x))``; in index form
    ``compose(p, q)[P] == p[P][q[P]]``.
    """
    if set(first) != set(second):
        raise PermutationSpecError(
            f"cannot compose permutations of different names: {sorted(first)} vs {sorted(second)}"
        )
    return Permutation({p: np.asarray(first[p])[np.asarray(second[p])].astype(np.int64) for p in first},
                       method="composed")


def random_permutation(
    spec: PermutationSpec,
    params: Mapping[str, Any],
    seed: int | np.random.Generator | None = 0,
) -> Permutation:
    """A uniformly random permutation of every permutation in ``spec`` (seeded numpy Generator)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sizes = spec.perm_sizes(params)
    return Permutation({p: rng.permutation(n).astype(np.int64) for p, n in sizes.items()}, method="random")


def iter_axes(spec: PermutationSpec) -> Iterator[tuple[str, int, str]]:
    """Yield ``(parameter, axis, permutation)`` for every permuted axis."""
    for p, entries in spec.perm_to_axes.items():
        for name, axis in entries:
            yield name, axis, p
