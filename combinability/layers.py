"""Layer tables: one framework-neutral description per architecture.

A :class:`LayerTable` lists the nodes of a network in forward order — dense and conv
layers, normalisations, activations, pooling, flatten and residual additions — as a
small dataflow graph. Everything the library needs to know about an architecture is
derived from it, once, in the core:

* the named parameters and buffers with their shapes (:meth:`LayerTable.parameters`),
  in the reference (torch) naming and axis convention;
* the permutation spec (:meth:`LayerTable.spec`), found by following which nodes share
  a channel space (a residual addition ties its inputs' spaces together);
* the layer map of stitching and per-layer plots (:meth:`LayerTable.layers`);
* the feature points (:meth:`LayerTable.feature_points`) and the point whose units each
  permutation reorders (:meth:`LayerTable.activation_points`);
* the torch ⇄ flax conversion of names and axes (:meth:`LayerTable.to_flax`);
* the frozen arrays of the asymmetric layers (:meth:`LayerTable.frozen_weights`,
  :meth:`LayerTable.gate_matrix`), drawn from seeds stored in the nodes.

Asymmetric networks (Lim et al., 2024, "The empirical impact of neural parameter
symmetries") are tables too. A dense or conv node with ``fixed=k`` is *W-Asymmetric*:
``k`` entries of each output unit's fan-in are frozen at random values, so the layer
computes with ``where(mask, frozen, weight)`` and no two units are interchangeable. A
``"gate"`` node is *σ-Asymmetric*: ``x * sigmoid(G x)`` with a frozen random ``G`` mixing the
channels (FiGLU). Both break the permutation symmetry of the channel spaces they touch,
and :meth:`LayerTable.spec` leaves those spaces without a permutation.

Backends build a module from a table with one generic builder (an interpreter of the
nodes), so adding an architecture is writing a table.

Examples
--------
>>> t = LayerTable("tiny", (4,), 3, (Node("fc1", "dense", units=5), Node("act1", "relu"),
...                                   Node("fc2", "dense", units=3)))
>>> dict(t.spec().axes_to_perm)
{'fc1.weight': ('P_fc1', None), 'fc1.bias': ('P_fc1',), 'fc2.weight': (None, 'P_fc1'), 'fc2.bias': (None,)}
>>> t.activation_points()
{'P_fc1': 'act1'}
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from combinability.errors import ConfigurationError, LayoutError
from combinability.kinds import Blocks
from combinability.permutation import Entry, PermutationSpec, Repeat
from combinability.upsampling import UPSAMPLE_MODES

__all__ = ["Node", "LayerTable", "OPS", "NORMS", "ACTIVATIONS"]

#: The operations a node may perform.
OPS = ("dense", "conv", "conv_transpose", "norm", "relu", "act", "prelu", "scale", "gate", "identity", "flatten",
       "avgpool", "maxpool", "upsample", "add", "concat", "mul")
#: Kinds of normalisation: LayerNorm over the channel axis (at every position), BatchNorm, GroupNorm.
NORMS = ("layernorm", "batchnorm", "groupnorm")
#: Element-wise activations an ``"act"`` node may name (torch.nn.functional / jax.nn names).
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu", "elu", "leaky_relu", "softplus", "relu6", "hardtanh",
               "hardswish", "hardsigmoid")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Node:
    """One operation of a :class:`LayerTable`.

    Parameters
    ----------
    name : str
        Module path in the reference (torch) naming, e.g. ``"stage0_block0.conv1"``; it is
        also the name of the feature point that reads the node's output.
    op : str
        One of :data:`OPS`. ``"avgpool"`` is global average pooling to ``(n, c)`` (to a
        ``1 x 1`` image with ``keepdims``; to an image of ``output_size`` when given);
        ``"maxpool"`` is a ``kernel`` x ``kernel`` max pool (``stride``, ``padding``; an
        average pool when ``fn="avg"``), skipped when the image is smaller than the kernel;
        ``"act"`` applies the element-wise function ``fn`` (one of :data:`ACTIVATIONS`);
        ``"prelu"`` is ``max(x, 0) + a · min(x, 0)`` with learned slopes ``a`` (parameter
        ``weight``), one for all channels (``units=1``) or one per channel (``units`` = the
        input's channels: the slopes move with the channels);
        ``"scale"`` multiplies each of its ``units`` channels by a learned factor (a layer
        scale: ConvNeXt's ``layer_scale`` or ``gamma``), the parameter ``leaf`` of shape
        ``(units,)``, or ``(units, 1, ..., 1)`` with a 1 per spatial axis when ``keepdims``;
        ``"dense"`` on an image acts on the channels of each position (a ``Linear`` on a
        channels-last map, a 1 x 1 convolution with an ``(out, in)`` weight);
        ``"conv_transpose"`` is a transposed convolution (torch's ``ConvTranspose2d``, flax's
        ``ConvTranspose``; a U-Net's or decoder's upsampling layer): ``kernel``, ``stride``,
        ``dilation`` and ``padding`` as torch defines them (``padding`` crops the full output,
        ``output_padding`` adds positions at the end of each axis), weight ``(in, out, *kernel)``;
        ``"upsample"`` resizes each channel to ``output_size`` positions (``fn``: one of
        :data:`~combinability.upsampling.UPSAMPLE_MODES`, ``align_corners`` for ``"linear"``;
        torch's ``F.interpolate``, :func:`~combinability.upsampling.resize_weights`), keeping
        its input's channels;
        ``"gate"`` is the σ-Asymmetric FiGLU ``x * sigmoid(G x)``, ``G`` a frozen random
        ``(c, c)`` matrix applied over the channels at every position
        (:meth:`LayerTable.gate_matrix`); ``"identity"`` passes its input on.
    inputs : tuple of str
        Names of the nodes read; ``()`` reads the previous node (the network's input for
        the first node). ``"add"`` takes two or more, and so does ``"concat"``, which
        concatenates its inputs' channels in order (images of one size, or vectors), and
        ``"mul"``, their element-wise product, where a ``1 x 1`` image or a vector scales
        every position of an image of as many channels (a squeeze-and-excitation gate).
    units : int
        Output features (dense) or channels (conv); a prelu node's slopes (1, or its channels).
    kernel, stride, padding : int
        Convolution and max-pool geometry. A conv node also takes ``(height, width)``
        pairs for each, and ``padding`` may be ``((top, bottom), (left, right))``;
        :meth:`conv_geometry` gives the conv's in one normal form.
    dilation : int or (int, int)
        A conv node's kernel dilation.
    keepdims : bool
        For ``op="avgpool"``: pool to a ``1 x 1`` image ``(n, c, 1, 1)`` rather than a vector.
        For ``op="scale"``: the factors' shape is ``(units, 1, 1)`` (on an image) rather than ``(units,)``.
    output_padding : int or (int, int)
        For ``op="conv_transpose"``: positions added at the end of each spatial axis of the output.
    align_corners : bool
        For ``op="upsample"`` with ``fn="linear"``: align the corner positions of input and output.
    output_size : (int, int) or None
        For ``op="upsample"``: the output's spatial size (required). For ``op="avgpool"``:
        adaptive average pooling to an image of this ``(height, width)``
        (torch's ``AdaptiveAvgPool2d``: output row ``i`` averages input rows
        ``floor(i * h / height)`` to ``ceil((i + 1) * h / height)``, and so for columns).
    channels_last : bool
        For ``op="flatten"``: flatten an image position by position, ``(h, w, c)`` (a flax
        model's reshape of its NHWC map), rather than channel by channel, ``(c, h, w)``
        (torch's ``flatten``). A dense layer reading the vector takes the channels'
        permutation on every position (:class:`~combinability.Repeat`).
    bias : bool
        Whether a dense or conv layer has a bias.
    norm : str
        For ``op="norm"``: one of :data:`NORMS`.
    groups : int
        For ``norm="groupnorm"``: the number of groups. For a conv node: its feature
        groups (torch's ``groups``, flax's ``feature_group_count``); ``groups`` equal to the
        input channels and to ``units`` is a depthwise convolution, which keeps its input's
        channel space (channel ``c`` reads input channel ``c`` only).
    fn : str
        For ``op="act"``: the activation's name.
    leaf : str
        For ``op="scale"``: the name of its parameter (``f"{name}.{leaf}"``), default ``"weight"``.
    eps : float
        Normalisation epsilon.
    layer : str
        The layer this node belongs to in stitching and per-layer plots; default: the
        node's own name for dense/conv nodes, the previous parametrised node's layer for
        the others.
    fixed : int
        For dense and conv nodes: frozen entries per output unit (W-Asymmetric); 0, the
        default, is a standard layer. At most the unit's fan-in (``in / groups x kh x kw``).
    scale : float
        Standard deviation of the frozen random values: the frozen weights of a
        ``fixed > 0`` node, the gate matrix of a ``"gate"`` node.
    seed : int
        Seed of the frozen arrays (with the node's name, see :meth:`LayerTable.frozen_weights`).
        Two models of one table share them, as the linear paths of Lim et al. require.
    """

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    units: int = 0
    kernel: int | tuple[int, int] = 1
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = 0
    bias: bool = True
    norm: str = "layernorm"
    eps: float = 1e-5
    layer: str = ""
    groups: int = 1
    fn: str = ""
    fixed: int = 0
    scale: float = 1.0
    seed: int = 0
    dilation: int | tuple[int, int] = 1
    keepdims: bool = False
    channels_last: bool = False
    output_size: tuple[int, int] | None = None
    leaf: str = "weight"
    output_padding: int | tuple[int, int] = 0
    align_corners: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigurationError(f"node {self.name!r}: unknown op {self.op!r}; valid ops: {', '.join(OPS)}")
        if self.op == "norm" and self.norm not in NORMS:
            raise ConfigurationError(f"node {self.name!r}: unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if self.op == "act" and self.fn not in ACTIVATIONS:
            raise ConfigurationError(f"node {self.name!r}: unknown activation {self.fn!r}; "
                                     f"valid: {', '.join(ACTIVATIONS)}")
        if self.leaf != "weight" and (self.op != "scale" or not self.leaf.isidentifier()):
            raise ConfigurationError(f"node {self.name!r}: leaf names a scale node's parameter (an identifier), got "
                                     f"leaf={self.leaf!r} on a {self.op!r} node")
        if self.op in ("dense", "conv", "conv_transpose", "prelu", "scale") and self.units < 1:
            raise ConfigurationError(f"node {self.name!r}: a {self.op} node needs units >= 1, got {self.units}")
        if self.op == "conv_transpose":
            self.conv_geometry()  # validates kernel, stride, padding and dilation
            self.output_paddings(self.spatial_dims or 2)
            if self.groups != 1 or self.fixed:
                raise ConfigurationError(f"node {self.name!r}: a conv_transpose node has groups=1 and fixed=0 (grouped "
                                         f"and W-Asymmetric transposed convolutions are not expressed), got "
                                         f"groups={self.groups!r}, fixed={self.fixed!r}")
        elif self.output_padding != 0:
            raise ConfigurationError(f"node {self.name!r}: output_padding belongs to a conv_transpose node, not a "
                                     f"{self.op!r} node")
        if self.op == "upsample" and (self.fn not in UPSAMPLE_MODES or self.output_size is None
                                      or (self.align_corners and self.fn != "linear")):
            raise ConfigurationError(f"node {self.name!r}: an upsample node needs output_size and a mode fn in "
                                     f"{UPSAMPLE_MODES} (align_corners with 'linear' only), got fn={self.fn!r}, "
                                     f"output_size={self.output_size!r}, align_corners={self.align_corners!r}")
        if self.align_corners and self.op != "upsample":
            raise ConfigurationError(f"node {self.name!r}: align_corners belongs to an upsample node, not a "
                                     f"{self.op!r} node")
        if self.op == "conv":
            self.conv_geometry()  # validates kernel, stride, padding and dilation
            if isinstance(self.groups, bool) or not isinstance(self.groups, int | np.integer) or self.groups < 1 \
                    or self.units % self.groups:
                raise ConfigurationError(f"node {self.name!r}: a conv node's groups must be an int >= 1 dividing "
                                         f"its {self.units} units, got {self.groups!r}")
        elif self.op != "conv_transpose" and (
                any(isinstance(v, tuple) for v in (self.kernel, self.stride, self.padding)) or self.dilation != 1):
            raise ConfigurationError(f"node {self.name!r}: only a conv node takes (height, width) pairs or a "
                                     f"dilation; a {self.op!r} node takes ints")
        if self.output_size is not None and (self.op not in ("avgpool", "upsample") or self.keepdims or not (
                isinstance(self.output_size, tuple) and len(self.output_size) in (1, 2, 3) and all(
                    isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in self.output_size))):
            raise ConfigurationError(f"node {self.name!r}: output_size is an avgpool or upsample node's output "
                                     f"size, one int >= 1 per spatial axis (height, width), without keepdims; got "
                                     f"{self.output_size!r} on a {self.op!r} node")
        if self.fixed and self.op not in ("dense", "conv"):
            raise ConfigurationError(f"node {self.name!r}: fixed={self.fixed!r} frozen entries per unit need a dense "
                                     f"or conv node, not a {self.op!r} node")
        if isinstance(self.fixed, bool) or not isinstance(self.fixed, int | np.integer) or self.fixed < 0:
            raise ConfigurationError(f"node {self.name!r}: fixed must be an int >= 0 (frozen entries per unit), "
                                     f"got {self.fixed!r}")
        if not (np.isfinite(self.scale) and self.scale >= 0) or isinstance(self.seed, bool) or \
                not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise ConfigurationError(f"node {self.name!r}: the asymmetry needs a finite scale >= 0 and an int "
                                     f"seed >= 0, got scale={self.scale!r}, seed={self.seed!r}")

    @property
    def asymmetric(self) -> bool:
        """Whether the node breaks the permutation symmetry of its channels (W- or σ-Asymmetric)."""
        return self.fixed > 0 or self.op == "gate"

    @property
    def spatial_dims(self) -> int | None:
        """The spatial axes a conv node's geometry names (the length of its tuples), or None when
        every entry is an int (which then applies to each axis of the input it reads)."""
        for value in (self.kernel, self.stride, self.dilation, self.padding, self.output_padding):
            if isinstance(value, tuple | list):
                return len(value)
        return None

    def conv_geometry(self, ndim: int | None = None) -> ConvGeometry:
        """The kernel, stride, padding and dilation of a conv node, one entry per spatial axis.

        ``ndim`` is the number of spatial axes of the input (1 for a sequence ``(n, c, length)``,
        2 for an image, 3 for a volume); by default the length of the node's tuples, else 2.

        Examples
        --------
        >>> Node("c", "conv", units=4, kernel=(1, 7), padding=(0, 3)).conv_geometry()
        ConvGeometry(kernel=(1, 7), stride=(1, 1), padding=((0, 0), (3, 3)), dilation=(1, 1))
        >>> Node("c1d", "conv", units=4, kernel=5, padding=2).conv_geometry(ndim=1)
        ConvGeometry(kernel=(5,), stride=(1,), padding=((2, 2),), dilation=(1,))
        """
        where = f"node {self.name!r}"
        own = self.spatial_dims
        if ndim is None:
            ndim = own or 2
        elif own is not None and own != ndim:
            raise ConfigurationError(f"{where}: a conv node with {own}-axis geometry reads an input with {ndim} "
                                     f"spatial axes; its kernel, stride, padding and dilation need {ndim} entries")
        kernel, stride, dilation = (_per_axis(v, what, where, low, ndim) for v, what, low in
                                    ((self.kernel, "kernel", 1), (self.stride, "stride", 1),
                                     (self.dilation, "dilation", 1)))
        pad = self.padding
        if isinstance(pad, tuple | list) and all(isinstance(p, tuple | list) for p in pad) and len(pad) == ndim:
            padding = tuple(_per_axis(p, "padding", where, 0, 2) for p in pad)
        else:
            padding = tuple((p, p) for p in _per_axis(pad, "padding", where, 0, ndim))
        return ConvGeometry(kernel, stride, padding, dilation)

    def output_paddings(self, ndim: int) -> tuple[int, ...]:
        """A conv_transpose node's ``output_padding``, one entry per each of ``ndim`` spatial axes."""
        return _per_axis(self.output_padding, "output_padding", f"node {self.name!r}", 0, ndim)

    def depthwise(self, c_in: int) -> bool:
        """Whether this is a depthwise conv on ``c_in`` channels: one group per channel, one channel out each."""
        return self.op == "conv" and self.groups > 1 and self.groups == c_in == self.units


class ConvGeometry(NamedTuple):
    """A convolution's geometry, each entry per spatial axis (e.g. height, width)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]

    def output(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The output's spatial size for an input of ``spatial``."""
        return tuple((s + lo + hi - d * (k - 1) - 1) // st + 1
                     for s, k, st, (lo, hi), d in zip(spatial, self.kernel, self.stride, self.padding, self.dilation,
                                                      strict=True))

    def transposed_output(self, spatial: tuple[int, ...], output_padding: tuple[int, ...]) -> tuple[int, ...]:
        """The output's spatial size of the transposed convolution of this geometry (torch's definition:
        ``(s - 1) * stride - before - after + dilation * (kernel - 1) + 1 + output_padding``)."""
        return tuple((s - 1) * st - lo - hi + d * (k - 1) + 1 + op
                     for s, k, st, (lo, hi), d, op in zip(spatial, self.kernel, self.stride, self.padding,
                                                          self.dilation, output_padding, strict=True))

    def dilated_input_padding(self, output_padding: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """The transposed convolution of this geometry as a convolution of its stride-dilated input
        (``jax.lax.conv_transpose``'s explicit padding, a kernel reversed): each axis padded by
        ``dilation * (kernel - 1)`` less the crop before, and less the crop after plus ``output_padding``.

        Examples
        --------
        >>> g = Node("t", "conv_transpose", units=2, kernel=3, stride=2, padding=((0, 1), (1, 0))).conv_geometry()
        >>> g.dilated_input_padding((0, 1))
        ((2, 1), (1, 3))
        >>> ConvGeometry.from_dilated_input_padding(g.kernel, g.stride, g.dilation, ((2, 1), (1, 3)))
        (ConvGeometry(kernel=(3, 3), stride=(2, 2), padding=((0, 1), (1, 0)), dilation=(1, 1)), (0, 1))
        """
        return tuple((d * (k - 1) - lo, d * (k - 1) - hi + op) for k, d, (lo, hi), op in
                     zip(self.kernel, self.dilation, self.padding, output_padding, strict=True))

    @classmethod
    def from_dilated_input_padding(cls, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                                   pads: tuple[tuple[int, int], ...]) -> tuple[ConvGeometry, tuple[int, ...]]:
        """The inverse of :meth:`dilated_input_padding`: the geometry (its crops) and the ``output_padding``
        of a transposed convolution given as padding of its dilated input (crops below zero after an
        axis become ``output_padding``; before one they are padding torch's geometry cannot express,
        left negative for the caller to refuse)."""
        crops = tuple((d * (k - 1) - lo, d * (k - 1) - hi) for k, d, (lo, hi) in zip(kernel, dilation, pads,
                                                                                   strict=True))
        return (cls(tuple(kernel), tuple(stride), tuple((lo, max(hi, 0)) for lo, hi in crops), tuple(dilation)),
                tuple(max(-hi, 0) for _, hi in crops))

    @property
    def symmetric_padding(self) -> tuple[int, ...] | None:
        """The padding of each axis when each is padded alike on both sides, else None."""
        return None if any(lo != hi for lo, hi in self.padding) else tuple(lo for lo, _ in self.padding)


_AXES = {1: "a (length,) tuple", 2: "a (height, width) pair", 3: "a (depth, height, width) triple"}


def _per_axis(value: Any, what: str, where: str, low: int, ndim: int) -> tuple[int, ...]:
    """``value`` (an int, or one int per axis, each >= ``low``) as one int per each of ``ndim`` axes."""
    entries = (value,) * ndim if isinstance(value, int | np.integer) and not isinstance(value, bool) else value
    if not (isinstance(entries, tuple | list) and len(entries) == ndim
            and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= low for v in entries)):
        raise ConfigurationError(f"{where}: {what} must be an int >= {low} or {_AXES.get(ndim, f'{ndim} ints')} "
                                 f"of them, got {value!r}")
    return tuple(int(v) for v in entries)


def _is_point(spatial: tuple[int, ...] | None) -> bool:
    """Whether a feature map has one position (``1 x 1``): it broadcasts like a vector."""
    return spatial is not None and all(s == 1 for s in spatial)


def _ndim(shape: _Shape) -> int | None:
    """The spatial axes of a node output (None for a vector)."""
    return None if shape.spatial is None else len(shape.spatial)


def _node_rng(node: Node) -> np.random.Generator:
    """The generator of a node's frozen arrays: its seed and the CRC-32 of its name (no hash salt)."""
    return np.random.default_rng([int(node.seed), zlib.crc32(node.name.encode())])


@dataclass(frozen=True)
class _Shape:
    """Inferred output of a node: channels (or features), spatial size (None: a vector)."""

    channels: int
    spatial: tuple[int, ...] | None


@dataclass(frozen=True)
class LayerTable:
    """A network as an ordered graph of :class:`Node` values.

    Parameters
    ----------
    name : str
        Architecture name.
    input_shape : tuple of int
        Channels-first input shape without the batch axis: ``(c, h, w)`` or ``(features,)``.
    num_classes : int
        Outputs of the last node.
    nodes : tuple of Node
        In forward order; the last node's output is the logits.
    config : mapping
        The configuration the table was made from (``width`` ...), kept for checkpoints.
    flax_sep : str
        What the dots of a node's name become in its flax module path (:meth:`flax_names`):
        ``"_"`` for the library's modules (``stage0_block0``), ``"/"`` for a traced user
        module, whose ``Block_0.Dense_1`` is the submodule ``Dense_1`` of ``Block_0``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    nodes: tuple[Node, ...]
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    flax_sep: str = field(default="_", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigurationError(f"layer table {self.name!r}: node names used twice: {dup}")
        if not self.nodes:
            raise ConfigurationError(f"layer table {self.name!r} has no nodes")
        shapes = self.shapes()  # validates the graph
        last = shapes[self.nodes[-1].name]
        if last.spatial is not None or last.channels != self.num_classes:
            raise ConfigurationError(
                f"layer table {self.name!r}: the last node gives {last}, expected {self.num_classes} logits"
            )

    # -- graph -------------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example as the model takes it (a traced flax model: channels-last)."""
        return tuple(self.config.get("data_shape", self.input_shape))

    def inputs_of(self, node: Node) -> tuple[str, ...]:
        """The names a node reads (``"<input>"`` is the network's input)."""
        if node.inputs:
            return node.inputs
        i = self.nodes.index(node)
        return (self.nodes[i - 1].name,) if i else ("<input>",)

    @functools.cached_property
    def schedule(self) -> tuple[tuple[Node, tuple[str, ...], tuple[str, ...]], ...]:
        """The forward pass as ``(node, names it reads, names no later node reads)`` in order.

        An interpreter may drop the values of the third entry once the node has run, so
        that a batch holds a few activations at a time rather than every layer's (the
        network's output is never dropped). Computed once per table.
        """
        reads = []
        for i, node in enumerate(self.nodes):
            reads.append(node.inputs or ((self.nodes[i - 1].name,) if i else ("<input>",)))
        last = {name: k for k, ins in enumerate(reads) for name in ins}
        output = self.nodes[-1].name
        return tuple((node, ins, tuple(n for n in dict.fromkeys(ins) if last[n] == k and n != output))
                     for k, (node, ins) in enumerate(zip(self.nodes, reads, strict=True)))

    def shapes(self) -> dict[str, _Shape]:
        """Output shape of every node (and of ``"<input>"``), inferred in order.

        Raises
        ------
        ConfigurationError
            If a node reads an unknown or later node, or the shapes do not fit.
        """
        if 2 <= len(self.input_shape) <= 4:
            out = {"<input>": _Shape(self.input_shape[0], self.input_shape[1:])}
        elif len(self.input_shape) == 1:
            out = {"<input>": _Shape(self.input_shape[0], None)}
        else:
            raise ConfigurationError(
                f"layer table {self.name!r}: input_shape must be (features,), or channels first then one to three "
                f"spatial axes: (c, length), (c, h, w) or (c, d, h, w); got {self.input_shape}"
            )
        for node in self.nodes:
            ins = []
            for name in self.inputs_of(node):
                if name not in out:
                    raise ConfigurationError(f"node {node.name!r} reads {name!r}, which is not an earlier node")
                ins.append(out[name])
            x = ins[0]
            where = f"layer table {self.name!r}, node {node.name!r}"
            if node.op == "conv" and x.channels % node.groups:
                raise ConfigurationError(f"{where}: {x.channels} input channels do not split into "
                                         f"groups={node.groups}")
            if node.op in ("dense", "conv") and node.fixed:
                fan_in = (x.channels // node.groups * math.prod(node.conv_geometry(_ndim(x)).kernel)
                          if node.op == "conv" else x.channels)
                if node.fixed > fan_in:
                    raise ConfigurationError(f"{where}: fixed={node.fixed} frozen entries per unit exceed the fan-in "
                                             f"of {fan_in}; valid: 0 to {fan_in}")
            if node.op == "dense":  # on an image: the channels of each position
                out[node.name] = _Shape(node.units, x.spatial)
            elif node.op in ("conv", "conv_transpose"):
                if x.spatial is None:
                    raise ConfigurationError(f"{where}: a {node.op} layer needs an image, got a vector")
                geometry = node.conv_geometry(len(x.spatial))
                size = (geometry.output(x.spatial) if node.op == "conv" else
                        geometry.transposed_output(x.spatial, node.output_paddings(len(x.spatial))))
                if min(size) < 1:
                    raise ConfigurationError(f"{where}: the image {x.spatial} is too small for the kernel")
                out[node.name] = _Shape(node.units, size)
            elif node.op == "upsample":
                if x.spatial is None or len(node.output_size) != len(x.spatial):
                    raise ConfigurationError(f"{where}: an upsample node resizes a map of {len(node.output_size)} "
                                             f"spatial axes to {node.output_size}, got {x}")
                out[node.name] = _Shape(x.channels, node.output_size)
            elif node.op == "flatten":
                size = x.channels * (math.prod(x.spatial) if x.spatial else 1)
                out[node.name] = _Shape(size, None)
            elif node.op == "avgpool":
                if (node.keepdims or node.output_size) and x.spatial is None:
                    raise ConfigurationError(f"{where}: pooling a vector to an image (keepdims, output_size)")
                if node.output_size and len(node.output_size) != len(x.spatial):
                    raise ConfigurationError(f"{where}: output_size {node.output_size} names {len(node.output_size)} "
                                             f"spatial axes, the input has {len(x.spatial)} ({x.spatial})")
                out[node.name] = _Shape(x.channels, node.output_size or (
                    (1,) * len(x.spatial) if node.keepdims else None))
            elif node.op == "maxpool":
                if x.spatial is None:
                    raise ConfigurationError(f"{where}: max pooling needs an image")
                k, st, pad = node.kernel, max(1, node.stride), node.padding
                sp = x.spatial if min(x.spatial) < k else tuple((s + 2 * pad - k) // st + 1 for s in x.spatial)
                out[node.name] = _Shape(x.channels, sp)
            elif node.op == "add":
                if len(ins) < 2 or any(s != x for s in ins):
                    raise ConfigurationError(f"{where}: an addition needs two or more inputs of one shape, got {ins}")
                out[node.name] = x
            elif node.op == "mul":
                full = [s for s in ins if s.spatial is not None and not _is_point(s.spatial)]
                if len(ins) < 2 or any(s.channels != x.channels for s in ins) or len({s.spatial for s in full}) > 1:
                    raise ConfigurationError(f"{where}: a product needs two or more inputs of as many channels, each "
                                             f"an image of one size, a 1 x 1 image or a vector, got {ins}")
                points = [s.spatial for s in ins if _is_point(s.spatial)]
                out[node.name] = _Shape(x.channels, full[0].spatial if full else points[0] if points else None)
            elif node.op == "scale" and (node.units != x.channels or (node.keepdims and x.spatial is None)):
                raise ConfigurationError(f"{where}: a scale node has one factor per channel: units {x.channels}, got "
                                         f"{node.units}" + (" (keepdims needs an image)" if node.keepdims else ""))
            elif node.op == "prelu" and node.units not in (1, x.channels):
                raise ConfigurationError(f"{where}: a prelu node has one slope or one per channel: units 1 or "
                                         f"{x.channels}, got {node.units}")
            elif node.op == "concat":
                if len(ins) < 2 or any(s.spatial != x.spatial for s in ins):
                    raise ConfigurationError(f"{where}: a concatenation needs two or more inputs of one spatial size "
                                             f"(or vectors), got {ins}")
                out[node.name] = _Shape(sum(s.channels for s in ins), x.spatial)
            else:  # norm, relu
                out[node.name] = x
        return out

    # -- parameters ----------------------------------------------------------------------
    def parameters(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every parameter and buffer: ``{name: (shape, dtype)}`` in the reference convention.

        Dense ``weight`` is ``(out, in)``, conv ``weight`` is ``(out, in / groups, kh, kw)`` (one
        kernel axis per spatial axis: ``(out, in / groups, k)`` on sequences); a BatchNorm
        has ``weight``, ``bias``, ``running_mean``, ``running_var`` and an int64 0-d
        ``num_batches_tracked`` counter.
        """
        shapes = self.shapes()
        params: dict[str, tuple[tuple[int, ...], str]] = {}
        for node in self.nodes:
            src = shapes[self.inputs_of(node)[0]]
            c_in = src.channels
            if node.op == "dense":
                params[f"{node.name}.weight"] = ((node.units, c_in), "float32")
            elif node.op == "conv":
                kernel = node.conv_geometry(_ndim(src)).kernel
                params[f"{node.name}.weight"] = ((node.units, c_in // node.groups, *kernel), "float32")
            elif node.op == "conv_transpose":  # torch's layout: (in, out, *kernel)
                params[f"{node.name}.weight"] = ((c_in, node.units, *node.conv_geometry(_ndim(src)).kernel), "float32")
            elif node.op == "norm":
                params[f"{node.name}.weight"] = ((c_in,), "float32")
                params[f"{node.name}.bias"] = ((c_in,), "float32")
                if node.norm == "batchnorm":
                    params[f"{node.name}.running_mean"] = ((c_in,), "float32")
                    params[f"{node.name}.running_var"] = ((c_in,), "float32")
                    params[f"{node.name}.num_batches_tracked"] = ((), "int64")
                continue
            elif node.op == "prelu":
                params[f"{node.name}.weight"] = ((node.units,), "float32")
                continue
            elif node.op == "scale":
                trailing = (1,) * len(src.spatial or ()) if node.keepdims else ()
                params[f"{node.name}.{node.leaf}"] = ((node.units, *trailing), "float32")
                continue
            else:
                continue
            if node.bias:
                params[f"{node.name}.bias"] = ((node.units,), "float32")
        return params

    def buffers(self) -> tuple[str, ...]:
        """Names of the entries of :meth:`parameters` that are not trained by gradient."""
        return tuple(f"{n.name}.{b}" for n in self.nodes if n.op == "norm" and n.norm == "batchnorm"
                     for b in _BN_BUFFERS)

    def check_state(self, state: Mapping[str, Any], what: str = "state") -> None:
        """Raise :class:`LayoutError` unless ``state`` has exactly this table's names and shapes."""
        from combinability.layout import check_names

        check_names({k: shape for k, (shape, _) in self.parameters().items()},
                    {k: np.shape(v) for k, v in state.items()}, f"{what} does not fit the {self.name!r} layer table")

    # -- channel spaces and the permutation spec ----------------------------------------
    def _spaces(self) -> tuple[dict[str, tuple[int, ...]], dict[int, Entry | None],
                               dict[str, tuple[str, int, int]]]:
        """Channel spaces of every node's output, each space's spec entry (None: fixed), and the
        ``(group name, groups, channels)`` of each permutation that moves blocks of channels.

        A node's output is a tuple of spaces: one, or the parts of a concatenation in order.
        A dense or conv node opens a new space; norms, activations, pooling and depthwise
        convs keep their input's; an addition merges its inputs' spaces (union-find), part
        by part when they are concatenations split alike; a concatenation joins its inputs'
        parts. An image flattened for dense layers keeps its channels' space (:meth:`_repeats`;
        the entry repeats it over the positions).

        Groups move channels in blocks. A space that GroupNorm normalises in ``G`` groups,
        and the output of a conv with ``G`` groups (other than depthwise), is a block
        permutation (:class:`~combinability.kinds.Blocks`): groups move whole, as the group
        permutation ``<P>/groups`` moves them, and channels move within their group. The
        input of such a conv moves whole blocks only, in the same order as its output's
        (``Repeat(<group>, channels // G)``): the weight's input axis runs within a group.

        Fixed (not permutable): the network's input and the logits, an image flattened
        otherwise (a concatenation's, or read by other nodes), every part of a concatenation
        one of whose parts is fixed (a packed axis moves all its segments), a space split
        into groups of two sizes or packed into a concatenation, and every space whose
        blocks move with a fixed one's.
        """
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        def new() -> int:
            parent[len(parent)] = len(parent)
            return len(parent) - 1

        shapes = self.shapes()
        repeats = self._repeats()

        def src_channels(node: Node) -> int:
            return shapes[self.inputs_of(node)[0]].channels

        fixed = {new()}
        size = {0: shapes["<input>"].channels}  # channels of each space
        # (space, groups, group variable, rigid) of each GroupNorm and grouped conv: the space moves
        # as blocks (GroupNorm, a grouped conv's output) or whole blocks only (rigid: a grouped conv's input)
        grouped: list[tuple[int, int, int, bool]] = []
        space: dict[str, tuple[int, ...]] = {"<input>": (0,)}
        opened: dict[int, str] = {}

        def opens(node: Node) -> tuple[int, ...]:
            s = new()
            opened[s], size[s] = node.name, node.units
            return (s,)

        def fixed_space(channels: int) -> tuple[int, ...]:
            s = new()
            fixed.add(s)
            size[s] = channels
            return (s,)

        for node in self.nodes:
            ins = [space[i] for i in self.inputs_of(node)]
            if node.op == "conv" and node.depthwise(src_channels(node)):
                s = ins[0]
                if node.fixed:
                    fixed.update(s)
            elif node.op in ("dense", "conv", "conv_transpose"):
                s = opens(node)
                if node.fixed or (node.op == "conv" and node.groups > 1 and len(ins[0]) > 1):
                    # frozen entries at fixed rows and columns, or groups straddling a concatenation's parts
                    fixed.update((*s, *ins[0]))
                elif node.op == "conv" and node.groups > 1:
                    # group k reads input block k and writes output block k: blocks move together; the
                    # weight's input axis runs within a group, so input blocks keep their channels' order
                    grouped += [(ins[0][0], node.groups, len(grouped), True), (s[0], node.groups, len(grouped), False)]
            elif node.op == "gate":
                s = ins[0]
                fixed.update(s)  # G mixes the channels: only permutations commuting with it keep the function
            elif node.op == "flatten":
                src = shapes[self.inputs_of(node)[0]]
                if src.spatial is None or _is_point(src.spatial) or node.name in repeats:
                    s = ins[0]  # a flattened feature map read by dense layers: its channels' entries move together
                else:
                    s = fixed_space(shapes[node.name].channels)
                    fixed.update(ins[0])
            elif node.op == "norm" and node.norm == "groupnorm" and node.groups not in (1, src_channels(node)):
                s = ins[0]
                if len(s) == 1:  # channels move within their group, and groups move whole: blocks
                    grouped.append((s[0], node.groups, len(grouped), False))
                else:  # a concatenation's parts split by the groups: fixed
                    fixed.update(s)
            elif node.op == "concat":
                s = tuple(part for parts in ins for part in parts)
            elif node.op in ("add", "mul"):  # a sum or product of several spaces: one permutation moves them
                s = ins[0]
                if all([size[p] for p in other] == [size[p] for p in s] for other in ins[1:]):
                    for other in ins[1:]:
                        for pa, pb in zip(s, other, strict=True):
                            ra, rb = find(pa), find(pb)
                            if ra != rb:
                                parent[max(ra, rb)] = min(ra, rb)
                else:  # a sum of concatenations split differently: no permutation of the parts keeps it
                    fixed.update(p for parts in ins for p in parts)
                    s = fixed_space(shapes[node.name].channels)
            else:
                s = ins[0]
            space[node.name] = s
        fixed.update(space[self.nodes[-1].name])
        fixed_roots = {find(s) for s in fixed}
        blocked: dict[int, list[tuple[int, int, bool]]] = {}  # root -> (groups, variable, rigid)
        for s, g, var, rigid in grouped:
            blocked.setdefault(find(s), []).append((g, var, rigid))
        group_of = {var: var for _, _, var, _ in grouped}  # union-find of group variables

        def group(v: int) -> int:
            while group_of[v] != v:
                v = group_of[v]
            return v

        packed = {find(p) for parts in space.values() if len(parts) > 1 for p in parts}
        flattened = {find(p) for node in self.nodes if node.op == "flatten" and node.name in repeats
                     for p in space[self.inputs_of(node)[0]]}
        for root, recs in blocked.items():
            counts = {g for g, _, _ in recs}
            # groups of two sizes on one space, a grouped space packed into a concatenation, or whole
            # blocks flattened for a dense layer (a repeat within a repeat): fixed
            if len(counts) > 1 or root in packed or (
                    root in flattened and any(rigid for _, _, rigid in recs) and size[root] > recs[0][0]):
                fixed_roots.add(root)
            for _, var, _ in recs[1:]:
                group_of[group(var)] = group(recs[0][1])
        changed = True
        while changed:  # a concatenation moves all its parts or none; blocks of one group move together
            changed = False
            for parts in space.values():
                roots = {find(p) for p in parts}
                if len(roots) > 1 and not roots.isdisjoint(fixed_roots) and not roots <= fixed_roots:
                    fixed_roots |= roots
                    changed = True
            held = {group(var) for root, recs in blocked.items() if root in fixed_roots for _, var, _ in recs}
            for root, recs in blocked.items():
                if root not in fixed_roots and any(group(var) in held for _, var, _ in recs):
                    fixed_roots.add(root)
                    changed = True
        names: dict[int, Entry | None] = {}
        for s in sorted(parent):
            root = find(s)
            if root in fixed_roots:
                names[s] = None
            else:
                first = min(t for t in parent if find(t) == root and t in opened)
                names[s] = f"P_{opened[first]}"
        group_names: dict[int, str] = {}
        for root in sorted(blocked, key=lambda r: (all(rigid for _, _, rigid in blocked[r]), r)):
            if root not in fixed_roots:
                group_names.setdefault(group(blocked[root][0][1]), f"{names[root]}/groups")
        blocks: dict[str, tuple[str, int, int]] = {}
        for root, recs in blocked.items():
            if root in fixed_roots:
                continue
            g, name = recs[0][0], group_names[group(recs[0][1])]
            if any(rigid for _, _, rigid in recs):  # whole blocks: the group permutation on each block's channels
                entry: Entry = name if size[root] == g else Repeat(name, size[root] // g)
                names.update({s: entry for s in parent if find(s) == root})
            else:
                blocks[str(names[root])] = (name, g, size[root])
        return {k: tuple(find(p) for p in v) for k, v in space.items()}, names, blocks

    def _repeats(self) -> dict[str, int]:
        """Flatten nodes of a feature map larger than 1 x 1, of one layer's channels, read by dense
        layers only: each to the entries per channel (``h * w``) of its output."""
        shapes = self.shapes()
        readers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in self.inputs_of(node):
                readers.setdefault(name, []).append(node)
        out: dict[str, int] = {}
        for node in self.nodes:
            if node.op != "flatten":
                continue
            src = self.inputs_of(node)[0]
            spatial = shapes[src].spatial
            if spatial is None or _is_point(spatial) or src == "<input>" or node is self.nodes[-1]:
                continue
            if self.node(src).op == "concat" or not all(r.op == "dense" for r in readers.get(node.name, [])):
                continue
            out[node.name] = math.prod(spatial)
        return out

    def _entries(self, spaces: tuple[Any, ...] | None = None) -> dict[str, Entry]:
        """Every node's output channels as a spec entry: a permutation name, None, the names of
        a concatenation's parts (the segments of a packed axis), or for a flattened feature map
        its channels' permutation repeated over the positions (:class:`~combinability.Repeat`).
        ``spaces``: :meth:`_spaces`, when the caller has it."""
        space, names, _ = self._spaces() if spaces is None else spaces
        repeats = self._repeats()
        out: dict[str, Entry] = {}
        for node_name, parts in space.items():
            named = tuple(names[p] for p in parts)
            out[node_name] = named[0] if len(named) == 1 else None if named[0] is None else named
            if node_name in repeats and isinstance(out[node_name], str):
                out[node_name] = Repeat(out[node_name], repeats[node_name], self.node(node_name).channels_last)
        return out

    def spec(self) -> PermutationSpec:
        """The permutation spec of the table's parameters (reference convention).

        A layer reading a concatenation binds that axis to its parts' permutations, as the
        segments of a packed axis (see :class:`~combinability.PermutationSpec`); one reading a
        flattened image, to the image's channel permutation repeated over the positions
        (:class:`~combinability.Repeat`).
        """
        spaces = self._spaces()
        entry = self._entries(spaces)
        shapes = self.shapes()
        axes: dict[str, tuple[Any, ...]] = {}
        for node in self.nodes:
            p_in = entry[self.inputs_of(node)[0]]
            p_out = entry[node.name]
            if node.op == "dense":
                axes[f"{node.name}.weight"] = (p_out, p_in)
            elif node.op == "conv":  # grouped: the input axis runs within a group (depthwise: length 1)
                kernel_axes = len(shapes[self.inputs_of(node)[0]].spatial or (0, 0))
                axes[f"{node.name}.weight"] = (p_out, p_in if node.groups == 1 else None, *(None,) * kernel_axes)
            elif node.op == "conv_transpose":  # (in, out, *kernel)
                kernel_axes = len(shapes[self.inputs_of(node)[0]].spatial or ())
                axes[f"{node.name}.weight"] = (p_in, p_out, *(None,) * kernel_axes)
            elif node.op == "norm":
                axes[f"{node.name}.weight"] = (p_out,)
                axes[f"{node.name}.bias"] = (p_out,)
                if node.norm == "batchnorm":
                    axes[f"{node.name}.running_mean"] = (p_out,)
                    axes[f"{node.name}.running_var"] = (p_out,)  # the counter is left alone
                continue
            elif node.op == "prelu":  # one slope per channel moves with the channels; a shared one stays
                axes[f"{node.name}.weight"] = (p_out if node.units > 1 else None,)
                continue
            elif node.op == "scale":  # the factors move with their channels
                trailing = len(shapes[self.inputs_of(node)[0]].spatial or ()) if node.keepdims else 0
                axes[f"{node.name}.{node.leaf}"] = (p_out, *(None,) * trailing)
                continue
            else:
                continue
            if node.bias:
                axes[f"{node.name}.bias"] = (p_out,)
        kinds = {p: Blocks(group, groups, channels // groups) for p, (group, groups, channels) in spaces[2].items()}
        return PermutationSpec(axes, kinds)

    def feature_points(self) -> tuple[str, ...]:
        """Every node whose output is a set of hidden features (all but the logits)."""
        return tuple(n.name for n in self.nodes[:-1] if n.op != "flatten")

    def activation_points(self) -> dict[str, str]:
        """For each permutation, the feature point whose units it reorders.

        The last activation output in the permutation's space (for a residual stream: the
        output of its last block); the last node in that space when it has no activation.
        """
        entry = self._entries()
        points: dict[str, str] = {}
        relu: dict[str, str] = {}
        for node in self.nodes[:-1]:
            p = entry[node.name]
            if not isinstance(p, str) or node.op == "flatten":  # fixed, or a concatenation of several
                continue
            points[p] = node.name
            if node.op in ("relu", "act", "gate"):
                relu[p] = node.name
        return {p: relu.get(p, pt) for p, pt in points.items()}

    # -- asymmetric layers: frozen arrays ------------------------------------------------
    def frozen_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The frozen entries of every W-Asymmetric weight: ``{name: (mask, values)}``.

        Reference convention and the weight's shape; ``mask`` is boolean, ``values`` float32
        (0 off the mask). The layer computes with ``where(mask, values, weight)``: the stored
        weight's entries under the mask are never used (training keeps them at ``values``).
        Each node draws from ``numpy.random.default_rng([node.seed, crc32(node.name)])``:
        first ``u = rng.random((units, fan_in))``, each unit freezing the ``fixed`` positions of
        its fan-in (flattened ``in x kernel x kernel``) with the smallest ``u``; then
        ``rng.standard_normal((units, fixed)) * node.scale`` for them, in increasing position order.

        Examples
        --------
        >>> t = LayerTable("w", (6,), 2, (Node("fc", "dense", units=3, fixed=2, seed=1), Node("out", "dense", units=2)))
        >>> mask, values = t.frozen_weights()["fc.weight"]
        >>> mask.sum(axis=1).tolist(), bool(np.all(values[~mask] == 0))
        ([2, 2, 2], True)
        """
        params = self.parameters()
        out = {}
        for node in self.nodes:
            if not node.fixed:
                continue
            shape = params[f"{node.name}.weight"][0]
            units, fan_in = shape[0], int(np.prod(shape[1:]))
            rng = _node_rng(node)
            chosen = np.sort(np.argsort(rng.random((units, fan_in)), axis=1, kind="stable")[:, : node.fixed], axis=1)
            mask = np.zeros((units, fan_in), dtype=bool)
            np.put_along_axis(mask, chosen, True, axis=1)
            values = np.zeros((units, fan_in), dtype=np.float64)
            np.put_along_axis(values, chosen, rng.standard_normal((units, node.fixed)) * node.scale, axis=1)
            out[f"{node.name}.weight"] = (mask.reshape(shape), values.astype(np.float32).reshape(shape))
        return out

    def gate_matrix(self, name: str) -> np.ndarray:
        """The frozen ``(c, c)`` float32 matrix ``G`` of the ``"gate"`` node ``name``: ``x * sigmoid(G x)``.

        Drawn as ``default_rng([node.seed, crc32(node.name)]).standard_normal((c, c)) * node.scale``
        (rows: output channels).

        Raises
        ------
        ConfigurationError
            If ``name`` is not a gate node (the error lists the gate nodes).
        """
        gates = [n.name for n in self.nodes if n.op == "gate"]
        if name not in gates:
            raise ConfigurationError(f"layer table {self.name!r}: {name!r} is not a gate node; gate nodes: {gates}")
        node = self.node(name)
        c = self.shapes()[self.inputs_of(node)[0]].channels
        return (_node_rng(node).standard_normal((c, c)) * node.scale).astype(np.float32)

    @property
    def asymmetric(self) -> bool:
        """Whether any node is W- or σ-Asymmetric."""
        return any(n.asymmetric for n in self.nodes)

    # -- layers (stitching, per-layer plots) ---------------------------------------------
    def _node_layers(self) -> dict[str, str]:
        current = ""
        out = {}
        for node in self.nodes:
            if node.layer:
                current = node.layer
            elif node.op in ("dense", "conv", "conv_transpose"):
                current = node.name
            out[node.name] = current or node.name
        return out

    def layer_names(self) -> list[str]:
        """Names of the ordered layers (groups of parametrised nodes)."""
        names: list[str] = []
        node_layer = self._node_layers()
        for node in self.nodes:
            if node.op in ("dense", "conv", "conv_transpose", "norm", "prelu", "scale") \
                    and node_layer[node.name] not in names:
                names.append(node_layer[node.name])
        return names

    def layers(self) -> dict[str, int]:
        """Layer index (0-based, forward order) of every parameter and buffer."""
        order = {name: i for i, name in enumerate(self.layer_names())}
        node_layer = self._node_layers()
        return {p: order[node_layer[p.rsplit(".", 1)[0]]] for p in self.parameters()}

    # -- torch <-> flax --------------------------------------------------------------------
    def flax_names(self) -> dict[str, str]:
        """Reference name -> flax name (``"collection/module/leaf"``, module dots become :attr:`flax_sep`)."""
        out = {}
        for ref in self.parameters():
            module, leaf = ref.rsplit(".", 1)
            mod = module.replace(".", self.flax_sep)
            node = self.node(module)
            if node.op == "norm":
                flax_leaf = {"weight": "params/scale", "bias": "params/bias", "running_mean": "batch_stats/mean",
                             "running_var": "batch_stats/var", "num_batches_tracked": "counters/count"}[leaf]
            elif node.op == "prelu":
                flax_leaf = "params/negative_slope"
            elif node.op == "scale":
                flax_leaf = f"params/{leaf}"
            else:
                flax_leaf = {"weight": "params/kernel", "bias": "params/bias"}[leaf]
            collection, leaf_name = flax_leaf.split("/")
            out[ref] = f"{collection}/{mod}/{leaf_name}"
        return out

    def norm_nodes(self) -> list[Node]:
        """The normalisation nodes, in forward order."""
        return [n for n in self.nodes if n.op == "norm"]

    def producer(self, name: str) -> Node | None:
        """The dense or conv node whose output channels reach node ``name`` (None: the input).

        Walks back through channel-keeping nodes; for an addition, the first input; None
        through a concatenation.
        """
        node = self.node(name)
        while True:
            src = self.inputs_of(node)[0]
            if src == "<input>":
                return None
            node = self.node(src)
            if node.op in ("dense", "conv", "conv_transpose"):
                return node
            if node.op in ("flatten", "concat"):  # a concatenation's channels come from several layers
                return None

    def producers(self, name: str) -> list[tuple[Node | None, int]]:
        """The layers whose output channels reach node ``name``, as ``(producer, channels)`` in channel order.

        One entry (:meth:`producer`), or one per part of a concatenation on the way (each part
        walked back in turn).

        Examples
        --------
        >>> t = LayerTable("c", (3,), 2, (Node("a", "dense", units=4), Node("b", "dense", ("<input>",), units=2),
        ...                               Node("ab", "concat", ("a", "b")), Node("n", "norm"),
        ...                               Node("o", "dense", units=2)))
        >>> [(p.name, c) for p, c in t.producers("n")]
        [('a', 4), ('b', 2)]
        """
        shapes = self.shapes()

        def walk(src: str) -> list[tuple[Node | None, int]]:
            while src != "<input>":
                node = self.node(src)
                if node.op in ("dense", "conv", "conv_transpose"):
                    return [(node, shapes[src].channels)]
                if node.op == "flatten":
                    break
                if node.op == "concat":
                    return [part for i in self.inputs_of(node) for part in walk(i)]
                src = self.inputs_of(node)[0]
            return [(None, shapes[src].channels)]

        return walk(self.inputs_of(self.node(name))[0])

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_flax(self, params: Mapping[str, Any], xp: Any = np) -> dict[str, Any]:
        """Reference-convention arrays to flax names and axes (dense and conv kernels transposed)."""
        names = self.flax_names()
        out = {}
        for ref, value in params.items():
            op = self.node(ref.rsplit(".", 1)[0]).op
            if ref.endswith(".weight") and op == "dense":
                value = xp.permute_dims(value, (1, 0)) if xp is not np else np.transpose(value)
            elif ref.endswith(".weight") and op == "conv":  # (out, in, *kernel) -> (*kernel, in, out)
                order = (*range(2, len(value.shape)), 1, 0)
                value = xp.permute_dims(value, order) if xp is not np else np.transpose(value, order)
            elif ref.endswith(".weight") and op == "conv_transpose":
                # (in, out, *kernel) -> (*kernel, in, out), the kernel reversed: flax's ConvTranspose
                # (transpose_kernel=False) correlates the stride-dilated input with its kernel as it is
                order = (*range(2, len(value.shape)), 0, 1)
                spatial = tuple(range(len(value.shape) - 2))
                value = (xp.flip(xp.permute_dims(value, order), axis=spatial) if xp is not np
                         else np.flip(np.transpose(value, order), axis=spatial))
            elif op == "scale":  # (units, 1, 1) -> (units,): flax broadcasts over the last (channel) axis
                value = xp.reshape(value, (-1,)) if xp is not np else np.reshape(value, -1)
            out[names[ref]] = value
        return out

    def from_flax(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Inverse of :meth:`to_flax` (numpy arrays)."""
        back = {v: k for k, v in self.flax_names().items()}
        unknown = [k for k in params if k not in back]
        if unknown:
            raise LayoutError(f"flax arrays {unknown[:8]} are not in the {self.name!r} layer table")
        out, shapes = {}, self.parameters()
        for key, value in params.items():
            ref = back[key]
            op = self.node(ref.rsplit(".", 1)[0]).op
            value = np.asarray(value)
            if ref.endswith(".weight") and op == "dense":
                value = value.T
            elif ref.endswith(".weight") and op == "conv":  # (*kernel, in, out) -> (out, in, *kernel)
                value = np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
            elif ref.endswith(".weight") and op == "conv_transpose":  # reversed (*kernel, in, out) -> (in, out, *k)
                spatial = tuple(range(value.ndim - 2))
                value = np.transpose(np.flip(value, axis=spatial), (value.ndim - 2, value.ndim - 1, *spatial))
            elif op == "scale":
                value = value.reshape(shapes[ref][0])
            out[ref] = value
        return {k: out[k] for k in shapes if k in out}
