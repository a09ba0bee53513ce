"""Builders of permutation specs for common layers, in a backend's axis convention.

Frameworks store the same layer with different names and axis orders:

=========  ===========================  =============================
layer      torch                         flax
=========  ===========================  =============================
dense      ``name.weight`` (out, in)     ``name/kernel`` (in, out)
conv       ``name.weight`` (out, in, kh, kw)  ``name/kernel`` (kh, kw, in, out)
norm       ``name.weight``, ``name.bias``     ``name/scale``, ``name/bias``
=========  ===========================  =============================

A :class:`SpecBuilder` hides that table, so an architecture describes its
permutations once per backend with the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from combinability.errors import PermutationSpecError
from combinability.permutation import PermutationSpec

__all__ = ["SpecBuilder", "Convention", "CONVENTIONS"]

P = str | None


@dataclass(frozen=True)
class Convention:
    """Parameter naming and axis order of one framework."""

    name: str
    sep: str
    dense_weight: str
    conv_weight: str
    norm_weight: str
    bias: str
    dense_axes: tuple[str, str]  # order of ("in", "out") in a dense weight
    conv_axes: tuple[str, ...]  # order of ("out", "in", "kh", "kw")


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention("torch", ".", "weight", "weight", "weight", "bias", ("out", "in"), ("out", "in", "kh", "kw")),
    "flax": Convention("flax", "/", "kernel", "kernel", "scale", "bias", ("in", "out"), ("kh", "kw", "in", "out")),
}
CONVENTIONS["jax"] = CONVENTIONS["flax"]


class SpecBuilder:
    """Assemble a :class:`PermutationSpec` layer by layer.

    Parameters
    ----------
    convention : {"torch", "flax", "jax"}
        Axis convention and parameter naming of the backend.

    Examples
    --------
    >>> b = SpecBuilder("torch")
    >>> b.dense("fc1", None, "P0").dense("fc2", "P0", None).build().axes_to_perm["fc2.weight"]
    (None, 'P0')
    >>> SpecBuilder("flax").dense("fc1", None, "P0").build().axes_to_perm["fc1/kernel"]
    (None, 'P0')
    """

    def __init__(self, convention: str = "torch") -> None:
        try:
            self.convention = CONVENTIONS[convention]
        except KeyError:
            raise PermutationSpecError(
                f"unknown axis convention {convention!r}; valid: {', '.join(CONVENTIONS)}"
            ) from None
        self._axes: dict[str, tuple[P, ...]] = {}

    def _name(self, prefix: str, leaf: str) -> str:
        return f"{prefix}{self.convention.sep}{leaf}" if prefix else leaf

    def add(self, name: str, axes: tuple[P, ...]) -> SpecBuilder:
        """Add one parameter with explicit axes; a name given twice is an error."""
        if name in self._axes:
            raise PermutationSpecError(f"parameter {name!r} was added to the spec twice")
        self._axes[name] = tuple(axes)
        return self

    def dense(self, name: str, p_in: P, p_out: P, *, bias: bool = True) -> SpecBuilder:
        """A fully connected layer whose inputs are permuted by ``p_in`` and outputs by ``p_out``."""
        role = {"in": p_in, "out": p_out}
        self.add(self._name(name, self.convention.dense_weight), tuple(role[a] for a in self.convention.dense_axes))
        if bias:
            self.add(self._name(name, self.convention.bias), (p_out,))
        return self

    def conv(self, name: str, p_in: P, p_out: P, *, bias: bool = True) -> SpecBuilder:
        """A 2-d convolution (input channels ``p_in``, output channels ``p_out``)."""
        role = {"in": p_in, "out": p_out, "kh": None, "kw": None}
        self.add(self._name(name, self.convention.conv_weight), tuple(role[a] for a in self.convention.conv_axes))
        if bias:
            self.add(self._name(name, self.convention.bias), (p_out,))
        return self

    def norm(self, name: str, p: P, *, scale: bool = True, bias: bool = True) -> SpecBuilder:
        """A per-channel normalisation (LayerNorm / GroupNorm / BatchNorm affine) over ``p``."""
        if scale:
            self.add(self._name(name, self.convention.norm_weight), (p,))
        if bias:
            self.add(self._name(name, self.convention.bias), (p,))
        return self

    def buffers(self, name: str, p: P, leaves: tuple[str, ...] = ("running_mean", "running_var")) -> SpecBuilder:
        """Per-channel buffers (e.g. BatchNorm running statistics) permuted by ``p``."""
        for leaf in leaves:
            self.add(self._name(name, leaf), (p,))
        return self

    def basic_block(
        self,
        *,
        conv1: str,
        norm1: str,
        conv2: str,
        norm2: str,
        p_in: P,
        p_inner: P,
        p_out: P,
        shortcut_conv: str | None = None,
        shortcut_norm: str | None = None,
        conv_bias: bool = False,
    ) -> SpecBuilder:
        """A residual basic block ``relu(norm2(conv2(relu(norm1(conv1 x)))) + shortcut(x))``.

        With an identity shortcut the block's output lives in the input's stream, so
        ``p_out`` must equal ``p_in``; with a projection shortcut (``shortcut_conv``)
        it starts a new stream.
        """
        if shortcut_conv is None and p_out != p_in:
            raise PermutationSpecError(
                f"block {conv1!r}: an identity shortcut keeps the residual stream, so p_out ({p_out!r}) "
                f"must equal p_in ({p_in!r}); give shortcut_conv for a projection"
            )
        self.conv(conv1, p_in, p_inner, bias=conv_bias).norm(norm1, p_inner)
        self.conv(conv2, p_inner, p_out, bias=conv_bias).norm(norm2, p_out)
        if shortcut_conv is not None:
            self.conv(shortcut_conv, p_in, p_out, bias=conv_bias)
            if shortcut_norm is not None:
                self.norm(shortcut_norm, p_out)
        return self

    def build(self) -> PermutationSpec:
        """The finished :class:`PermutationSpec`."""
        return PermutationSpec(dict(self._axes))
