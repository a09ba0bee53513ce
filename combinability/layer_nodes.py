"""The nodes of a layer table: one operation each, with its settings and their checks.

A :class:`Node` is one step of a :class:`~combinability.layers.LayerTable` (a dense or conv
layer, a normalisation, an activation, pooling, a residual addition, ...); it checks its own
settings when made, so a table never holds a node it cannot run. :class:`ConvGeometry` is a
convolution's kernel, stride, padding and dilation per spatial axis, with the output sizes
they give. Both are re-exported by :mod:`combinability.layers`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from combinability.errors import ConfigurationError
from combinability.upsampling import UPSAMPLE_MODES

__all__ = ["Node", "ConvGeometry", "OPS", "NORMS", "ACTIVATIONS", "TRACED_ELEMENTWISE"]

#: The operations a node may perform.
OPS = ("dense", "conv", "conv_transpose", "norm", "relu", "act", "prelu", "scale", "shift", "gate", "identity",
       "flatten",
       "avgpool", "maxpool", "upsample", "add", "concat", "mul", "pad", "slice", "channel_reduce")
#: An ``"act"`` node's ``fn`` for an element-wise function written in a traced model's own code that the
#: table does not name (``x.clamp(min=0)``, ``torch.erf`` in a hand-written GELU): it keeps each channel's
#: place, and a table holding one describes the traced model without running it.
TRACED_ELEMENTWISE = "elementwise"
#: What each pooling node may compute in its windows (``fn``): the mean (``""`` for avgpool) or the
#: maximum (``""`` for maxpool, whose ``"avg"`` is an average pool with its kernel and stride).
POOL_FUNCTIONS = {"avgpool": ("", "max"), "maxpool": ("", "avg"), "channel_reduce": ("mean", "max")}
#: Kinds of normalisation: LayerNorm over the channel axis (at every position), BatchNorm, GroupNorm,
#: RMSNorm over the channel axis (at every position, a learned scale and no shift), the L2 normalisation of
#: each position's channels (``F.normalize(x, dim=1)``: no parameters), and LayerNorm over each example's
#: whole map (``"layernorm_map"``: torch's ``LayerNorm([C, H, W])``, its weight and bias of the map's shape).
NORMS = ("layernorm", "batchnorm", "groupnorm", "rmsnorm", "l2norm", "layernorm_map")
#: How a conv or pad node fills its padding: zeros, or the input mirrored without its edge (``reflect``),
#: its edge repeated (``replicate``) or wrapped around (``circular``), as torch's ``padding_mode``.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: Element-wise activations an ``"act"`` node may name (torch.nn.functional / jax.nn names).
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu", "elu", "leaky_relu", "softplus", "relu6", "hardtanh",
               "hardswish", "hardsigmoid", "mish", "selu", "celu", "softsign", "tanhshrink", "logsigmoid")


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
        ``1 x 1`` image with ``keepdims``; to an image of ``output_size`` when given), or
        global (adaptive) max pooling with ``fn="max"``;
        ``"maxpool"`` is a ``kernel`` x ``kernel`` max pool (``stride``, ``padding``: an int, or one
        ``(before, after)`` pair per spatial axis, as flax's ``padding="SAME"`` pads a stride-2 pool more
        after than before; an average pool, counting the zeros padded, when ``fn="avg"``), skipped when
        the image is smaller than the kernel;
        ``"act"`` applies the element-wise function ``fn`` (one of :data:`ACTIVATIONS`, or
        :data:`TRACED_ELEMENTWISE` for one a traced model computes in its own code);
        ``"prelu"`` is ``max(x, 0) + a · min(x, 0)`` with learned slopes ``a`` (parameter
        ``weight``), one for all channels (``units=1``) or one per channel (``units`` = the
        input's channels: the slopes move with the channels);
        ``"scale"`` multiplies each of its ``units`` channels by a learned factor (a layer
        scale: ConvNeXt's ``layer_scale`` or ``gamma``), the parameter ``leaf`` of shape
        ``(units,)``, or ``(units, 1, ..., 1)`` with a 1 per spatial axis when ``keepdims``;
        ``units=1`` is one factor for every channel (Fixup's and SkipInit's scalar ``scale``);
        ``"shift"`` adds a learned offset the same way (Fixup's scalar biases, a bias per
        channel held by the model: ``x + self.shift`` of shape ``(1, c, 1, 1)``);
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
        ``"pad"`` pads each spatial axis of a map by ``padding`` positions, ``(before, after)``
        per axis, filled as ``padding_mode`` says (torch's ``F.pad``, ``nn.ZeroPad2d``,
        ``nn.ReflectionPad2d``; flax's ``jnp.pad`` with zeros): each channel from itself alone;
        with ``channel_padding`` ``(before, after)``, zero channels are put before and after the
        input's (the option-A shortcut of CIFAR ResNets, ``F.pad(x, (0, 0, 0, 0, p, p))``);
        ``"slice"`` keeps the channels ``channel_range`` ``(start, stop)`` of its input (one part of
        ``x.chunk(2, dim=1)``, a gated convolution's halves, ShuffleNet's split);
        ``"channel_reduce"`` takes the mean (``fn="mean"``) or maximum (``fn="max"``) over the
        channels at each position, one channel out (CBAM's spatial attention): it reads every
        channel alike, so any permutation keeps it;
        ``"gate"`` is the σ-Asymmetric FiGLU ``x * sigmoid(G x)``, ``G`` a frozen random
        ``(c, c)`` matrix applied over the channels at every position
        (:meth:`LayerTable.gate_matrix`); ``"identity"`` passes its input on.
    inputs : tuple of str
        Names of the nodes read; ``()`` reads the previous node (the network's input for
        the first node). ``"add"`` takes two or more, and so does ``"concat"``, which
        concatenates its inputs' channels in order (images of one size, or vectors), and
        ``"mul"``, their element-wise product, where a ``1 x 1`` image or a vector scales
        every position of an image of as many channels (a squeeze-and-excitation gate), and a
        map of one channel scales every channel of a map of the same size (a spatial attention).
    units : int
        Output features (dense) or channels (conv); a prelu node's slopes (1, or its channels).
    kernel, stride, padding : int
        Convolution and max-pool geometry. A conv node also takes ``(height, width)``
        pairs for each, and ``padding`` may be ``((top, bottom), (left, right))``;
        :meth:`conv_geometry` gives the conv's in one normal form.
    dilation : int or (int, int)
        A conv node's kernel dilation.
    padding_mode : str
        How a conv node fills its padding, one of :data:`PADDING_MODES` (torch's
        ``padding_mode``; flax's ``"CIRCULAR"`` and ``"REFLECT"`` paddings). Each channel is
        padded from itself alone, so every mode keeps the channels' permutations.
    keepdims : bool
        For ``op="avgpool"``: pool to a ``1 x 1`` image ``(n, c, 1, 1)`` rather than a vector.
        For ``op="scale"`` and ``"shift"``: the parameter's shape is ``(units, 1, 1)`` (on an image) rather than
        ``(units,)``.
    channel_padding : (int, int)
        For a zero ``op="pad"`` node: zero channels added before and after the input's.
    channel_range : (int, int)
        For ``op="slice"``: the input's channels ``start:stop`` it keeps.
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
        Whether a dense or conv layer has a bias; whether an affine LayerNorm has one (torch's
        ``LayerNorm(C, bias=False)``, flax's ``use_scale=True, use_bias=False``: a scale alone).
    norm : str
        For ``op="norm"``: one of :data:`NORMS`.
    affine : bool
        For ``op="norm"``: whether it scales and shifts each channel by learned ``weight`` and
        ``bias`` (torch's ``affine``/``elementwise_affine``, flax's ``use_scale``/``use_bias``);
        without them a BatchNorm keeps its running statistics only, and the others have no
        parameters (torch's default ``InstanceNorm2d``). An ``"rmsnorm"`` node's learned
        parameter is its ``weight`` alone; an ``"l2norm"`` node has none (``affine=False``).
        A ``"layernorm_map"`` node's ``weight`` and ``bias`` have the shape of its input map,
        channels first (``(C, H, W)``: torch's; flax's ``(H, W, C)`` moves the channel axis last).
    groups : int
        For ``norm="groupnorm"``: the number of groups. For a conv node: its feature
        groups (torch's ``groups``, flax's ``feature_group_count``); ``groups`` equal to the
        input channels and to ``units`` is a depthwise convolution, which keeps its input's
        channel space (channel ``c`` reads input channel ``c`` only).
    fn : str
        For ``op="act"``: the activation's name. For ``op="avgpool"``: ``""`` (the mean of
        each window) or ``"max"`` (its maximum: torch's ``AdaptiveMaxPool2d``, ``amax`` over
        the positions). For ``op="maxpool"``: ``""`` or ``"avg"``.
    leaf : str
        For ``op="scale"`` and ``"shift"``: the name of its parameter (``f"{name}.{leaf}"``), default ``"weight"``.
    batch_axis : bool
        For ``op="scale"`` and ``"shift"`` with ``keepdims``: the parameter is stored with a leading axis of one,
        ``(1, units, 1, ..., 1)``, as users often write ``nn.Parameter(torch.zeros(1, C, 1, 1))``.
    param : str
        For ``op="scale"`` and ``"shift"``: the parameter's whole name where it is not ``f"{name}.{leaf}"``
        (one of several a module holds, as Fixup's blocks hold ``bias1a``, ``bias1b``, ...; a parameter of the
        model's root module); it ends in ``f".{leaf}"`` (or is ``leaf``). Default ``""``: ``f"{name}.{leaf}"``.
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
    padding_mode: str = "zeros"
    affine: bool = True
    channel_padding: tuple[int, int] = (0, 0)
    channel_range: tuple[int, int] | None = None
    param: str = ""
    batch_axis: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigurationError(f"node {self.name!r}: unknown op {self.op!r}; valid ops: {', '.join(OPS)}")
        if self.op == "norm" and self.norm not in NORMS:
            raise ConfigurationError(f"node {self.name!r}: unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if not self.affine and self.op != "norm":
            raise ConfigurationError(f"node {self.name!r}: affine=False belongs to a norm node, not a {self.op!r} node")
        if self.op == "norm" and self.norm == "l2norm" and self.affine:
            raise ConfigurationError(f"node {self.name!r}: an l2norm node has no parameters; give it affine=False")
        if self.op == "norm" and not self.bias and self.norm in ("batchnorm", "groupnorm"):
            raise ConfigurationError(f"node {self.name!r}: a {self.norm} node has a bias when it is affine; bias=False "
                                     "belongs to a layernorm or layernorm_map node (an rmsnorm node has none)")
        if self.op == "act" and self.fn not in (*ACTIVATIONS, TRACED_ELEMENTWISE):
            raise ConfigurationError(f"node {self.name!r}: unknown activation {self.fn!r}; "
                                     f"valid: {', '.join(ACTIVATIONS)} (and {TRACED_ELEMENTWISE!r}, a traced "
                                     "model's own element-wise function)")
        if self.op in POOL_FUNCTIONS and self.fn not in POOL_FUNCTIONS[self.op]:
            raise ConfigurationError(f"node {self.name!r}: the fn of {self.op} nodes is one of "
                                     f"{', '.join(map(repr, POOL_FUNCTIONS[self.op]))}, got {self.fn!r}")
        if self.leaf != "weight" and (self.op not in ("scale", "shift") or not self.leaf.isidentifier()):
            raise ConfigurationError(f"node {self.name!r}: leaf names a scale or shift node's parameter (an "
                                     f"identifier), got "
                                     f"leaf={self.leaf!r} on a {self.op!r} node")
        if self.batch_axis and (self.op not in ("scale", "shift") or not self.keepdims):
            raise ConfigurationError(f"node {self.name!r}: batch_axis belongs to a scale or shift node with keepdims "
                                     f"(a parameter of shape (1, units, 1, ...)), not a {self.op!r} node"
                                     + ("" if self.keepdims else " without keepdims"))
        if self.param and (self.op not in ("scale", "shift") or self.param.rpartition(".")[2] != self.leaf):
            raise ConfigurationError(f"node {self.name!r}: param names a scale or shift node's parameter, ending in "
                                     f"its leaf {self.leaf!r}; got param={self.param!r} on a {self.op!r} node")
        if self.op in ("dense", "conv", "conv_transpose", "prelu", "scale", "shift") and self.units < 1:
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
        if self.padding_mode not in PADDING_MODES or (self.padding_mode != "zeros" and self.op not in ("conv", "pad")):
            raise ConfigurationError(f"node {self.name!r}: padding_mode is a conv or pad node's, one of "
                                     f"{', '.join(PADDING_MODES)}; got {self.padding_mode!r} on a {self.op!r} node")
        if tuple(self.channel_padding) != (0, 0) and (
                self.op != "pad" or self.padding_mode != "zeros" or not isinstance(self.channel_padding, tuple)
                or len(self.channel_padding) != 2 or not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
                                                             and v >= 0 for v in self.channel_padding)):
            raise ConfigurationError(f"node {self.name!r}: channel_padding is a zero pad node's (before, after) "
                                     f"channels, two ints >= 0; got {self.channel_padding!r} on a {self.op!r} node "
                                     f"with padding_mode {self.padding_mode!r}")
        if (self.op == "slice") != (self.channel_range is not None) or (self.channel_range is not None and not (
                isinstance(self.channel_range, tuple) and len(self.channel_range) == 2
                and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in self.channel_range)
                and 0 <= self.channel_range[0] < self.channel_range[1])):
            raise ConfigurationError(f"node {self.name!r}: a slice node takes the channels (start, stop) of its input, "
                                     f"0 <= start < stop, and only it takes channel_range; got {self.channel_range!r} "
                                     f"on a {self.op!r} node")
        if self.op == "pad":
            self.paddings(self.spatial_dims or 2)  # validates the widths
            if any(v != 1 for v in (self.kernel, self.stride, self.dilation)):
                raise ConfigurationError(f"node {self.name!r}: a pad node takes padding (and padding_mode) only, got "
                                         f"kernel={self.kernel!r}, stride={self.stride!r}, dilation={self.dilation!r}")
        if self.op == "conv":
            self.conv_geometry()  # validates kernel, stride, padding and dilation
            if isinstance(self.groups, bool) or not isinstance(self.groups, int | np.integer) or self.groups < 1 \
                    or self.units % self.groups:
                raise ConfigurationError(f"node {self.name!r}: a conv node's groups must be an int >= 1 dividing "
                                         f"its {self.units} units, got {self.groups!r}")
        elif self.op != "conv_transpose" and (
                any(isinstance(v, tuple) for v in (self.kernel, self.stride)) or self.dilation != 1
                or (isinstance(self.padding, tuple) and self.op not in ("pad", "maxpool"))):
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
        return ConvGeometry(kernel, stride, self.paddings(ndim), dilation)

    def paddings(self, ndim: int) -> tuple[tuple[int, int], ...]:
        """A conv, pad or maxpool node's ``padding`` as one ``(before, after)`` pair per each of ``ndim`` spatial
        axes.

        Examples
        --------
        >>> Node("p", "pad", padding=((0, 1), (2, 2))).paddings(2)
        ((0, 1), (2, 2))
        >>> Node("p", "pad", padding=1).paddings(1)
        ((1, 1),)
        >>> Node("chomp", "pad", padding=((0, -2),)).paddings(1)  # crops the last two positions
        ((0, -2),)
        """
        where, pad = f"node {self.name!r}", self.padding
        low = None if self.op == "pad" and self.padding_mode == "zeros" else 0  # a zero pad's negative widths crop
        if isinstance(pad, tuple | list) and all(isinstance(p, tuple | list) for p in pad) and len(pad) == ndim:
            return tuple(_per_axis(p, "padding", where, low, 2) for p in pad)  # type: ignore[misc]
        return tuple((p, p) for p in _per_axis(pad, "padding", where, low, ndim))

    def output_paddings(self, ndim: int) -> tuple[int, ...]:
        """A conv_transpose node's ``output_padding``, one entry per each of ``ndim`` spatial axes."""
        return _per_axis(self.output_padding, "output_padding", f"node {self.name!r}", 0, ndim)

    def parameter_name(self) -> str:
        """A scale or shift node's parameter: :attr:`param`, else ``f"{name}.{leaf}"``."""
        return self.param or f"{self.name}.{self.leaf}"

    def norm_leaves(self) -> tuple[str, ...]:
        """A norm node's learned parameters: ``("weight", "bias")`` when it is affine, ``("weight",)`` for
        an affine RMSNorm or a LayerNorm without a bias, ``()`` without a learned scale and shift."""
        if self.op != "norm" or not self.affine:
            return ()
        return ("weight",) if self.norm == "rmsnorm" or not self.bias else ("weight", "bias")

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


def _per_axis(value: Any, what: str, where: str, low: int | None, ndim: int) -> tuple[int, ...]:
    """``value`` (an int, or one int per axis, each >= ``low``; any int where ``low`` is None) as one int
    per each of ``ndim`` axes."""
    entries = (value,) * ndim if isinstance(value, int | np.integer) and not isinstance(value, bool) else value
    if not (isinstance(entries, tuple | list) and len(entries) == ndim
            and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and (low is None or v >= low)
                    for v in entries)):
        bound = "an int" if low is None else f"an int >= {low}"
        raise ConfigurationError(f"{where}: {what} must be {bound} or {_AXES.get(ndim, f'{ndim} ints')} "
                                 f"of them, got {value!r}")
    return tuple(int(v) for v in entries)


def _node_rng(node: Node) -> np.random.Generator:
    """The generator of a node's frozen arrays: its seed and the CRC-32 of its name (no hash salt)."""
    return np.random.default_rng([int(node.seed), zlib.crc32(node.name.encode())])
