"""Symmetry kinds: what a spec's named transformation may be, and how it acts on one axis.

A :class:`~combinability.PermutationSpec` names a transformation for each axis it
binds. By default a name is a **neuron permutation** (an index array). Its ``kinds``
may declare two more:

:class:`Blocks`
    A permutation of ``blocks × size`` units that moves whole blocks of ``size``
    consecutive units (attention heads, experts) as its *group* permutation moves
    them, and permutes units only inside each block: ``π(i·size + a) = σ(i)·size + τ_i(a)``.
    Several names may share one group (a head's query/key rows and its value/output
    rows move with the same head permutation σ but have their own τ); the group name
    is itself a permutation of ``blocks`` (bound, for example, to an MoE gate's rows).
:class:`Orthogonal`
    An orthogonal matrix Q acting on every bound axis (a transformer's residual
    stream): a weight that writes to the stream gets ``Q W``, one that reads from it
    ``W Qᵀ`` — both are "Q along that axis". With ``fix_ones=True`` Q also maps the
    all-ones vector to itself, the maps that commute with LayerNorm's centring.

Every kind supports apply (:func:`act`), inverse, compose and random draws; a
permutation is the special case of an orthogonal matrix with one 1 per row
(``act`` on an index array equals ``act`` on its permutation matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from combinability.errors import PermutationSpecError

__all__ = ["Neuron", "Blocks", "Orthogonal", "Kind", "kind_from_json", "act", "invert", "compose",
           "ones_complement", "random_orthogonal", "check_value"]


@dataclass(frozen=True)
class Neuron:
    """A plain permutation of units (the default kind)."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": "neuron"}


@dataclass(frozen=True)
class Blocks:
    """A permutation that moves blocks of ``size`` units as the permutation ``group`` moves blocks.

    Parameters
    ----------
    group : str
        Name of the block-level permutation (of ``blocks`` entries) shared by every
        member of the group.
    blocks : int
        Number of blocks (heads, experts).
    size : int
        Units per block (head dimension, expert width).
    """

    group: str
    blocks: int
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise PermutationSpecError(f"Blocks.group must be a permutation name, got {self.group!r}")
        for what in ("blocks", "size"):
            value = getattr(self, what)
            if not isinstance(value, int | np.integer) or value < 1:
                raise PermutationSpecError(f"Blocks.{what} must be a positive int, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "blocks", "group": self.group, "blocks": int(self.blocks), "size": int(self.size)}


@dataclass(frozen=True)
class Orthogonal:
    """An orthogonal map of every bound axis (a residual stream).

    Parameters
    ----------
    fix_ones : bool, default False
        Restrict to maps with ``Q 1 = 1`` (they commute with LayerNorm's centring), for
        streams read through ``LayerNorm``; ``False`` for RMSNorm or no norm.
    requires : tuple of (str, float)
        Parameters that must hold one constant for the map to preserve the function —
        the scales (1) and shifts (0) of the norms on the stream, which
        :func:`combinability.fold_norms` folds into the layers that read them. A model whose
        norms are not folded is refused, naming the parameter.
    """

    fix_ones: bool = False
    requires: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", tuple((str(n), float(v)) for n, v in self.requires))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "orthogonal", "fix_ones": bool(self.fix_ones), "requires": [list(r) for r in self.requires]}


Kind = Neuron | Blocks | Orthogonal


def kind_from_json(data: Any) -> Kind:
    """The kind described by ``data`` (the output of ``kind.to_json()``)."""
    if not isinstance(data, dict) or data.get("kind") not in ("neuron", "blocks", "orthogonal"):
        raise PermutationSpecError(f"a symmetry kind is {{'kind': 'neuron'|'blocks'|'orthogonal', ...}}, got {data!r}")
    if data["kind"] == "neuron":
        return Neuron()
    if data["kind"] == "blocks":
        return Blocks(str(data.get("group")), int(data.get("blocks", 0)), int(data.get("size", 0)))
    return Orthogonal(bool(data.get("fix_ones", False)), tuple(tuple(r) for r in data.get("requires", ())))


def is_matrix(value: Any) -> bool:
    """Whether a transformation value is a matrix (orthogonal kind) rather than an index array."""
    return np.ndim(value) == 2


def act(value: Any, array: np.ndarray, axis: int) -> np.ndarray:
    """Apply one transformation value along ``axis``: gather for an index array, ``Q ×_axis`` for a matrix."""
    if is_matrix(value):
        q = np.asarray(value)
        dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.result_type(q, array)
        moved = np.tensordot(q.astype(dtype), array, axes=([1], [axis]))
        return np.moveaxis(moved, 0, axis)
    return np.take(array, np.asarray(value), axis=axis)


def invert(value: Any) -> np.ndarray:
    """The inverse transformation: argsort of an index array, transpose of an orthogonal matrix."""
    if is_matrix(value):
        return np.ascontiguousarray(np.asarray(value).T)
    return np.argsort(np.asarray(value), kind="stable").astype(np.int64)


def compose(first: Any, second: Any) -> np.ndarray:
    """``first`` then ``second``: ``first[second]`` for index arrays, ``Q_second Q_first`` for matrices."""
    if is_matrix(first) or is_matrix(second):
        return as_matrix(second) @ as_matrix(first)
    return np.asarray(first)[np.asarray(second)].astype(np.int64)


def as_matrix(value: Any) -> np.ndarray:
    """The matrix of a transformation value (an index array becomes its permutation matrix)."""
    if is_matrix(value):
        return np.asarray(value, dtype=np.float64)
    idx = np.asarray(value)
    m = np.zeros((len(idx), len(idx)))
    m[np.arange(len(idx)), idx] = 1.0
    return m


def ones_complement(n: int) -> np.ndarray:
    """An orthonormal basis (n, n−1) of the vectors orthogonal to the all-ones vector."""
    u, _, _ = np.linalg.svd(np.eye(n) - 1.0 / n)  # singular values 1 (n−1 times) and 0 (on 1/√n)
    return u[:, : n - 1]


def random_orthogonal(n: int, rng: np.random.Generator, *, fix_ones: bool = False) -> np.ndarray:
    """A Haar-random orthogonal matrix; with ``fix_ones``, Haar on the maps with ``Q 1 = 1``."""
    m = n - 1 if fix_ones else n
    if m <= 0:
        return np.eye(n)
    z = rng.standard_normal((m, m))
    q, r = np.linalg.qr(z)
    q = q * np.sign(np.diag(r))
    if not fix_ones:
        return q
    b = ones_complement(n)
    return np.full((n, n), 1.0 / n) + b @ q @ b.T


def check_value(name: str, value: Any, size: int | None, kind: Kind, *, atol: float = 1e-5) -> None:
    """Raise :class:`PermutationSpecError` unless ``value`` is a valid transformation of ``kind``."""
    arr = np.asarray(value)
    if isinstance(kind, Orthogonal):
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or not np.issubdtype(arr.dtype, np.floating):
            raise PermutationSpecError(f"{name!r} is orthogonal: expected a square float matrix, got {arr.dtype} "
                                       f"{arr.shape}")
        n = arr.shape[0]
        if size is not None and n != size:
            raise PermutationSpecError(f"{name!r} is a {n}x{n} matrix, the spec's axes have size {size}")
        err = float(np.abs(arr.T @ arr - np.eye(n)).max()) if n else 0.0
        if err > atol:
            raise PermutationSpecError(f"{name!r} is not orthogonal: max |QᵀQ − I| = {err:.2e} (tolerance {atol:g})")
        if kind.fix_ones and n and float(np.abs(arr @ np.ones(n) - 1.0).max()) > atol:
            raise PermutationSpecError(f"{name!r} must map the all-ones vector to itself (a stream read through "
                                       "LayerNorm); it does not")
        return
    n = len(arr) if arr.ndim == 1 else -1
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise PermutationSpecError(f"permutation {name!r} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if size is not None and n != size:
        raise PermutationSpecError(f"permutation {name!r} has length {n}, the spec's axes have size {size}")
    if n and (arr.min() < 0 or arr.max() >= n or np.bincount(arr, minlength=n).max() != 1):
        raise PermutationSpecError(f"permutation {name!r} is not a permutation of range({n})")


def block_structure(name: str, value: np.ndarray, kind: Blocks) -> np.ndarray:
    """The block permutation σ of a :class:`Blocks` value; raises unless blocks move whole."""
    idx = np.asarray(value).reshape(kind.blocks, kind.size)
    sigma = idx[:, 0] // kind.size
    if not np.array_equal(idx // kind.size, np.repeat(sigma[:, None], kind.size, axis=1)):
        raise PermutationSpecError(f"{name!r} splits a block of {kind.size} units (heads/experts move whole)")
    return sigma.astype(np.int64)


def expand_blocks(sigma: np.ndarray, inner: np.ndarray, size: int) -> np.ndarray:
    """The unit permutation with block permutation ``sigma`` and within-block permutations ``inner[i]``."""
    sigma = np.asarray(sigma)
    return (sigma[:, None] * size + np.asarray(inner).reshape(len(sigma), size)).reshape(-1).astype(np.int64)
