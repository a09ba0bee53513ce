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
:class:`Invertible`
    A general invertible map inside each block of a block group (the query/key or
    value/output units of each attention head: Theus et al.'s invertible maps), which
    moves the blocks as its group does: the matrix ``M`` whose block ``(i, σ(i))`` is an
    invertible ``G_i``. It acts on the axes bound to its name as ``M``; the axes on the
    other side of the bilinear form (a head's keys for its queries, the output
    projection's columns for its values) are bound to a second name of kind :class:`Dual`,
    whose value is ``M⁻ᵀ``, so that ``qᵀk`` and ``W_O v`` are unchanged.
:class:`Dual`
    The name whose value is the inverse transpose of an :class:`Invertible` name's.

Every kind supports apply (:func:`act`), inverse, compose and random draws; a
permutation is the special case of an orthogonal matrix with one 1 per row
(``act`` on an index array equals ``act`` on its permutation matrix), and an orthogonal
map the special case of an invertible one that is its own dual (``Q⁻ᵀ = Q``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from combinability.errors import PermutationSpecError

__all__ = ["Neuron", "Blocks", "Orthogonal", "Invertible", "Dual", "Kind", "kind_from_json", "act", "invert",
           "compose", "dual_of", "ones_complement", "random_orthogonal", "random_invertible", "block_matrix",
           "block_parts", "check_value"]


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


@dataclass(frozen=True)
class Invertible:
    """An invertible map inside each of ``blocks`` blocks of ``size`` units, the blocks moved as ``group`` moves them.

    The value is an ``(n, n)`` matrix, ``n = blocks × size``, whose block ``(i, σ(i))`` is
    an invertible ``size × size`` matrix and whose other blocks are zero (σ: the group's
    permutation). Axes bound to this name get ``M``; the axes that read what they write
    through a bilinear form are bound to a :class:`Dual` name, which gets ``M⁻ᵀ``.

    Parameters
    ----------
    group, blocks, size
        As for :class:`Blocks`.
    """

    group: str
    blocks: int
    size: int

    def __post_init__(self) -> None:
        Blocks(self.group, self.blocks, self.size)  # the same checks

    def to_json(self) -> dict[str, Any]:
        return {"kind": "invertible", "group": self.group, "blocks": int(self.blocks), "size": int(self.size)}


@dataclass(frozen=True)
class Dual:
    """The inverse transpose of the :class:`Invertible` name ``of`` (the other side of its bilinear form)."""

    of: str

    def __post_init__(self) -> None:
        if not isinstance(self.of, str) or not self.of:
            raise PermutationSpecError(f"Dual.of must be the name of an Invertible map, got {self.of!r}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "dual", "of": self.of}


Kind = Neuron | Blocks | Orthogonal | Invertible | Dual

_KIND_NAMES = ("neuron", "blocks", "orthogonal", "invertible", "dual")


def kind_from_json(data: Any) -> Kind:
    """The kind described by ``data`` (the output of ``kind.to_json()``)."""
    if not isinstance(data, dict) or data.get("kind") not in _KIND_NAMES:
        raise PermutationSpecError(f"a symmetry kind is {{'kind': {'|'.join(repr(k) for k in _KIND_NAMES)}, ...}}, "
                                   f"got {data!r}")
    if data["kind"] == "neuron":
        return Neuron()
    if data["kind"] in ("blocks", "invertible"):
        cls = Blocks if data["kind"] == "blocks" else Invertible
        return cls(str(data.get("group")), int(data.get("blocks", 0)), int(data.get("size", 0)))
    if data["kind"] == "dual":
        return Dual(str(data.get("of")))
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
    """The inverse transformation: argsort of an index array, transpose of an orthogonal matrix,
    the matrix inverse of any other invertible one."""
    if is_matrix(value):
        m = np.asarray(value)
        t = np.ascontiguousarray(m.T)
        if m.shape[0] and np.abs(t @ m - np.eye(m.shape[0])).max() > 1e-6:
            return np.linalg.inv(m)
        return t
    return np.argsort(np.asarray(value), kind="stable").astype(np.int64)


def dual_of(value: Any) -> np.ndarray:
    """The inverse transpose ``M⁻ᵀ`` of a transformation value (the value itself for a permutation or
    an orthogonal matrix, up to rounding): what a :class:`Dual` name holds."""
    if not is_matrix(value):
        return np.asarray(value).astype(np.int64)
    return np.ascontiguousarray(invert(value).T)


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
    """An orthonormal basis (n, n−1) of the vectors orthogonal to the all-ones vector (read-only; computed
    once per size)."""
    return _ones_complement(int(n))


@functools.lru_cache(maxsize=16)
def _ones_complement(n: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(np.eye(n) - 1.0 / n)  # singular values 1 (n−1 times) and 0 (on 1/√n)
    basis = np.ascontiguousarray(u[:, : n - 1])
    basis.flags.writeable = False
    return basis


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


def random_invertible(n: int, rng: np.random.Generator, *, spread: float = 0.5) -> np.ndarray:
    """A random invertible ``n × n`` matrix ``U diag(e^s) V`` (U, V Haar-orthogonal, s uniform in ±spread):
    condition number at most ``e^(2·spread)``, a negative determinant half of the time."""
    s = np.exp(rng.uniform(-spread, spread, n))
    return (random_orthogonal(n, rng) * s) @ random_orthogonal(n, rng)


def block_matrix(sigma: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The ``(b·s, b·s)`` matrix whose block ``(i, σ(i))`` is ``inner[i]`` (``b`` blocks of ``s`` units)."""
    sigma = np.asarray(sigma)
    b, s = len(sigma), inner.shape[-1]
    out = np.zeros((b, s, b, s), dtype=np.float64)
    out[np.arange(b), :, sigma, :] = inner
    return out.reshape(b * s, b * s)


def block_parts(name: str, value: np.ndarray, blocks: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(σ, inner)`` of a matrix made by :func:`block_matrix`; raises unless each block row has one block."""
    m = np.asarray(value, dtype=np.float64).reshape(blocks, size, blocks, size)
    norms = np.abs(m).max(axis=(1, 3))
    sigma = norms.argmax(axis=1)
    rest = norms.copy()
    rest[np.arange(blocks), sigma] = 0.0
    if (rest > 1e-9 * max(1.0, float(norms.max()))).any() or len(set(sigma.tolist())) != blocks:
        raise PermutationSpecError(f"{name!r} mixes units of different blocks (heads move whole; inside a head "
                                   "the map is any invertible one)")
    return sigma.astype(np.int64), m[np.arange(blocks), :, sigma, :]


def check_value(name: str, value: Any, size: int | None, kind: Kind, *, atol: float = 1e-5) -> None:
    """Raise :class:`PermutationSpecError` unless ``value`` is a valid transformation of ``kind``."""
    arr = np.asarray(value)
    if isinstance(kind, Invertible | Dual):
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or not np.issubdtype(arr.dtype, np.floating):
            raise PermutationSpecError(f"{name!r} is an invertible map: expected a square float matrix, got "
                                       f"{arr.dtype} {arr.shape}")
        if size is not None and arr.shape[0] != size:
            raise PermutationSpecError(f"{name!r} is a {arr.shape[0]}x{arr.shape[0]} matrix, the spec's axes have "
                                       f"size {size}")
        if not np.isfinite(arr).all() or (arr.size and np.linalg.cond(arr) > 1e12):
            raise PermutationSpecError(f"{name!r} is not invertible (condition number "
                                       f"{np.linalg.cond(arr) if np.isfinite(arr).all() else np.inf:.3g})")
        if isinstance(kind, Invertible):
            block_parts(name, arr, kind.blocks, kind.size)
        return
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
