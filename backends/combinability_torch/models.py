"""The generic torch builder: one :class:`TableNet` module interprets any layer table.

Submodules sit at the table's node paths (``stage0_block0.conv1``), so the state names
are the table's reference names. LayerNorm normalises the channel axis at every
position (:class:`ChannelLayerNorm`); inputs are channels-first. W-Asymmetric dense and
conv nodes are :class:`FrozenLinear` / :class:`FrozenConv2d` and σ-Asymmetric gates are
:class:`Gate`: their frozen arrays are non-persistent buffers rebuilt from the table, so the
state names stay the table's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from combinability.layers import LayerTable, Node

__all__ = ["ChannelLayerNorm", "FrozenConv2d", "FrozenLinear", "Gate", "TableConv2d", "TableConvTranspose", "TableNet",
           "conv2d", "conv_transpose"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (axis 1) at every position of an ``(n, c, ...)`` tensor; ``kind``
    ``"rmsnorm"`` divides by the root mean square of the channels instead (a weight, no bias), ``"l2norm"`` by
    their L2 norm (``F.normalize(x, dim=1)``), and ``"layernorm_map"`` normalises each example's whole map
    (``shape``: its ``(c, *positions)``, the weight's and bias's shape)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, leaves: tuple[str, ...] = ("weight", "bias"),
                 kind: str = "layernorm", shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.num_channels, self.eps, self.kind = num_channels, eps, kind
        self.shape = tuple(shape) if kind == "layernorm_map" and shape else (num_channels,)
        # the learned parameters the node has (:meth:`~combinability.layer_nodes.Node.norm_leaves`)
        self.weight = nn.Parameter(torch.ones(self.shape)) if "weight" in leaves else None
        self.bias = nn.Parameter(torch.zeros(self.shape)) if "bias" in leaves else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm_map":
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        if self.kind == "l2norm":
            return F.normalize(x, dim=1, eps=self.eps)
        h = x.movedim(1, -1)
        if self.kind == "rmsnorm":
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h if self.weight is None else h * self.weight).movedim(-1, 1)
        return F.layer_norm(h, (self.num_channels,), self.weight, self.bias, self.eps).movedim(-1, 1)


class _Frozen:
    """Mixin: the weight's entries under ``fixed_mask`` are replaced by ``fixed_values`` (W-Asymmetric)."""

    weight: torch.Tensor

    def _freeze(self, mask: Any, values: Any) -> None:
        self.register_buffer("fixed_mask", torch.as_tensor(mask), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("fixed_values", torch.as_tensor(values), persistent=False)  # type: ignore[attr-defined]
        with torch.no_grad():  # the stored weight shows the weight in use
            self.weight.copy_(self.effective(self.weight))

    def effective(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the layer computes with: ``where(fixed_mask, fixed_values, weight)``."""
        return torch.where(self.fixed_mask, self.fixed_values.to(weight.dtype), weight)


class FrozenLinear(_Frozen, nn.Linear):
    """A dense layer some of whose weights are frozen at fixed values (W-Asymmetric)."""

    def __init__(self, c_in: int, units: int, bias: bool, mask: Any, values: Any) -> None:
        super().__init__(c_in, units, bias=bias)
        self._freeze(mask, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective(self.weight), self.bias)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class TableConv2d(nn.Conv2d):
    """The convolution of a conv node on an input of any spatial rank (1 to 3), with any padding.

    Its weight is ``(out, in / groups, *kernel)``, one kernel axis per spatial axis (a
    ``Conv1d``'s on sequences, a ``Conv2d``'s on images). ``nn.Conv2d`` pads both sides of
    an axis alike: this one pads ``extra_padding`` (``F.pad``'s order, last axis first)
    first, then convolves unpadded. A 2-D conv node padded alike on both sides is a plain
    ``nn.Conv2d`` (:func:`conv2d`).
    """

    def __init__(self, c_in: int, node: Node, ndim: int = 2) -> None:
        g = node.conv_geometry(ndim)
        inner = g.symmetric_padding if node.padding_mode == "zeros" else None  # other modes: padded by F.pad
        # nn.Conv2d keeps tuples of any length as given: its weight is (out, in / groups, *kernel)
        super().__init__(c_in, node.units, g.kernel, stride=g.stride, padding=inner or (0,) * ndim,
                         dilation=g.dilation, groups=node.groups, bias=node.bias)
        self.extra_padding = None if inner else tuple(p for pair in reversed(g.padding) for p in pair)
        self.pad_mode = "constant" if node.padding_mode == "zeros" else node.padding_mode
        self._conv = _CONV[ndim]

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.extra_padding is None else F.pad(x, self.extra_padding, mode=self.pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._padded(x), self.weight, self.bias)


def conv2d(c_in: int, node: Node, ndim: int = 2) -> nn.Conv2d:
    """The module of a conv node on ``ndim`` spatial axes: ``nn.Conv2d`` for an image padded alike
    on both sides of each axis, else :class:`TableConv2d`."""
    g = node.conv_geometry(ndim)
    if g.symmetric_padding is None or ndim != 2 or node.padding_mode != "zeros":
        return TableConv2d(c_in, node, ndim)
    return nn.Conv2d(c_in, node.units, g.kernel, stride=g.stride, padding=g.symmetric_padding, dilation=g.dilation,
                     groups=node.groups, bias=node.bias)


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_TRANSPOSE_MODULES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class TableConvTranspose(nn.ConvTranspose2d):
    """The transposed convolution of a conv_transpose node on any spatial rank, with any crop.

    Its weight is ``(in, out, *kernel)`` (torch's). It computes the full transposed
    convolution, then crops ``padding``'s ``(before, after)`` and extends each axis by
    ``output_padding`` at the end (positions that only the bias reaches), which covers the
    geometries ``nn.ConvTranspose2d`` cannot take (unequal crops, an ``output_padding`` of
    at least the stride). Other geometries are a plain ``nn.ConvTranspose{1,2,3}d``
    (:func:`conv_transpose`).
    """

    def __init__(self, c_in: int, node: Node, ndim: int = 2) -> None:
        g = node.conv_geometry(ndim)
        super().__init__(c_in, node.units, g.kernel, stride=g.stride, padding=(0,) * ndim, dilation=g.dilation,
                         bias=node.bias)
        ends = (hi - op for (_, hi), op in zip(g.padding, node.output_paddings(ndim), strict=True))
        self.crop = tuple(-v for (lo, _), hi in zip(reversed(g.padding), reversed(tuple(ends)), strict=True)
                          for v in (lo, hi))  # F.pad's order: last axis first; negative entries crop
        self._conv = _CONV_TRANSPOSE[ndim]

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        y = F.pad(self._conv(x, self.weight, None, self.stride, 0, 0, 1, self.dilation), self.crop)
        return y if self.bias is None else y + self.bias.reshape(-1, *(1,) * (y.dim() - 2))


def conv_transpose(c_in: int, node: Node, ndim: int = 2) -> nn.Module:
    """The module of a conv_transpose node on ``ndim`` spatial axes: ``nn.ConvTranspose{1,2,3}d`` when its
    geometry is one torch takes (equal crops, ``output_padding`` below the stride or dilation), else
    :class:`TableConvTranspose`."""
    g, extra = node.conv_geometry(ndim), node.output_paddings(ndim)
    if g.symmetric_padding is None or any(op >= max(st, d) for op, st, d in zip(extra, g.stride, g.dilation,
                                                                                  strict=True)):
        return TableConvTranspose(c_in, node, ndim)
    return _CONV_TRANSPOSE_MODULES[ndim](c_in, node.units, g.kernel, stride=g.stride, padding=g.symmetric_padding,
                                         output_padding=extra, dilation=g.dilation, bias=node.bias)


class FrozenConv2d(_Frozen, TableConv2d):
    """A convolution some of whose kernel entries are frozen at fixed values (W-Asymmetric)."""

    def __init__(self, c_in: int, node: Node, mask: Any, values: Any, ndim: int = 2) -> None:
        super().__init__(c_in, node, ndim)
        self._freeze(mask, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._padded(x), self.effective(self.weight), self.bias)


class Gate(nn.Module):
    """σ-Asymmetric FiGLU ``x * sigmoid(G x)``, ``G`` a frozen ``(c, c)`` matrix over the channels (axis 1)."""

    def __init__(self, matrix: Any) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.as_tensor(matrix), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.matrix.to(x.dtype)
        mixed = F.linear(x, g) if x.dim() == 2 else torch.einsum("oc,nc...->no...", g, x)
        return x * torch.sigmoid(mixed)


def _module(node: Node, c_in: int, rank: int, table: LayerTable, frozen: dict[str, Any],
            spatial: tuple[int, ...] = ()) -> nn.Module | None:
    """The module of ``node`` reading ``c_in`` channels of a tensor of ``rank`` axes (batch included)."""
    if node.op in ("dense", "conv") and node.fixed:
        mask, values = frozen[f"{node.name}.weight"]
        if node.op == "dense":
            return FrozenLinear(c_in, node.units, node.bias, mask, values)
        return FrozenConv2d(c_in, node, mask, values, rank - 2)
    if node.op == "gate":
        return Gate(table.gate_matrix(node.name))
    if node.op == "dense":
        return nn.Linear(c_in, node.units, bias=node.bias)
    if node.op == "conv":
        return conv2d(c_in, node, rank - 2)
    if node.op == "conv_transpose":
        return conv_transpose(c_in, node, rank - 2)
    if node.op == "norm" and node.norm == "batchnorm":
        return {5: nn.BatchNorm3d, 4: nn.BatchNorm2d}.get(rank, nn.BatchNorm1d)(c_in, eps=node.eps, affine=node.affine)
    if node.op == "norm" and node.norm == "groupnorm":
        return nn.GroupNorm(node.groups, c_in, eps=node.eps, affine=node.affine)
    if node.op == "norm":
        return ChannelLayerNorm(c_in, node.eps, node.norm_leaves(), node.norm, (c_in, *spatial))
    if node.op == "prelu":
        return nn.PReLU(node.units)
    return None


_ADAPTIVE_AVG = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {3: F.adaptive_max_pool1d, 4: F.adaptive_max_pool2d, 5: F.adaptive_max_pool3d}
_AVG_POOL = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}
_MAX_POOL = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}
_LINEAR_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


def _at_rank(v: torch.Tensor, rank: int) -> torch.Tensor:
    """``v`` with trailing axes of length 1 up to ``rank`` axes: ``(n, c)`` -> ``(n, c, 1, 1)``."""
    return v if v.dim() == rank else v.reshape(*v.shape, *(1,) * (rank - v.dim()))


class TableNet(nn.Module):
    """A torch network interpreting a :class:`~combinability.layers.LayerTable`.

    ``forward(x, taps=None)``: when ``taps`` is a dict whose keys are node names, the
    outputs of those nodes are stored into it (the library's feature taps).
    """

    def __init__(self, table: LayerTable) -> None:
        super().__init__()
        self.table = table
        shapes, frozen = table.shapes(), table.frozen_weights()
        for node in table.nodes:
            src = shapes[table.inputs_of(node)[0]]
            if node.op in ("scale", "shift"):  # a parameter of the module at the node's path (made when missing)
                shape = table.parameters()[node.parameter_name()][0]
                init = torch.ones if node.op == "scale" else torch.zeros
                owner = node.parameter_name().rpartition(".")[0]
                self._owner(owner).register_parameter(node.leaf, nn.Parameter(init(shape)))
                continue
            module = _module(node, src.channels, 2 + len(src.spatial or ()), table, frozen, tuple(src.spatial or ()))
            if module is not None:
                parent = self
                *path, leaf = node.name.split(".")
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, module)
        self._modules_by_node = {n.name: self.get_submodule(n.parameter_name().rpartition(".")[0]
                                                            if n.op in ("scale", "shift") else n.name)
                                 for n in table.nodes
                                 if n.op in ("dense", "conv", "conv_transpose", "norm", "gate", "prelu", "scale",
                                             "shift")}
        # nodes whose output is a fresh tensor (not a view of, or the same tensor as, another value)
        fresh = ("dense", "conv", "conv_transpose", "norm", "concat", "upsample")
        self._fresh = {n.name for n, ins, _ in table.schedule
                       if n.op in fresh or (n.op in ("add", "mul") and len(ins) > 1)}

    def _owner(self, path: str) -> nn.Module:
        """The submodule at ``path``, made (an empty ``nn.Module``) where missing."""
        owner: nn.Module = self
        for part in path.split(".") if path else ():
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        return owner

    def forward(self, x: torch.Tensor, taps: dict[str, Any] | None = None) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {"<input>": x}
        # no autograd: a ReLU may overwrite its input (not while torch.compile traces: it cannot ask, nor gain by it)
        inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
        h = x
        for node, reads, dropped in self.table.schedule:  # each value dropped after its last reader
            ins = [values[i] for i in reads]
            h = ins[0]
            if node.op == "dense" and h.dim() > 2:  # the channels of each position
                h = self._modules_by_node[node.name](h.movedim(1, -1)).movedim(-1, 1)
            elif node.op in ("scale", "shift"):
                factor = getattr(self._modules_by_node[node.name], node.leaf)
                if factor.dim() == h.dim():  # stored with a batch axis, (1, c, 1, 1)
                    factor = factor[0]
                factor = factor if factor.dim() == h.dim() - 1 or factor.numel() == 1 else _at_rank(factor, h.dim() - 1)
                h = h * factor if node.op == "scale" else h + factor
            elif node.op in ("dense", "conv", "conv_transpose", "norm", "gate", "prelu"):
                h = self._modules_by_node[node.name](h)
            elif node.op == "relu":
                source = reads[0]
                own = (inference and source in dropped and source in self._fresh
                       and (taps is None or source not in taps))
                h = F.relu(h, inplace=own)
            elif node.op == "act":
                h = getattr(F, node.fn)(h)
            elif node.op == "flatten":
                h = (h.movedim(1, -1) if node.channels_last and h.ndim > 2 else h).flatten(1)
            elif node.op == "avgpool" and node.output_size:
                h = (_ADAPTIVE_MAX if node.fn == "max" else _ADAPTIVE_AVG)[h.ndim](h, node.output_size)
            elif node.op == "avgpool" and node.fn == "max":
                h = h.amax(dim=tuple(range(2, h.ndim)), keepdim=node.keepdims)
            elif node.op == "avgpool":
                h = h.mean(dim=tuple(range(2, h.ndim)), keepdim=node.keepdims)
            elif node.op == "maxpool":
                if min(h.shape[2:]) >= node.kernel:
                    pool = (_AVG_POOL if node.fn == "avg" else _MAX_POOL)[h.ndim]
                    pads = node.paddings(h.ndim - 2)
                    if all(lo == hi for lo, hi in pads) and len({lo for lo, _ in pads}) == 1:
                        h = pool(h, node.kernel, max(1, node.stride), pads[0][0])
                    else:  # padded more on one side (flax's "SAME"): by hand, zeros for a mean, -inf for a max
                        fill = 0.0 if node.fn == "avg" else float("-inf")
                        h = pool(F.pad(h, tuple(v for pair in reversed(pads) for v in pair), value=fill),
                                 node.kernel, max(1, node.stride))
            elif node.op == "slice":
                h = h[:, node.channel_range[0]:node.channel_range[1]]
            elif node.op == "channel_reduce":
                h = h.mean(1, keepdim=True) if node.fn == "mean" else h.amax(1, keepdim=True)
            elif node.op == "pad":  # F.pad's order: the last axis first (then the channels)
                widths = tuple(v for pair in reversed(node.paddings(h.ndim - 2)) for v in pair)
                if any(node.channel_padding):
                    widths += tuple(node.channel_padding)
                h = F.pad(h, widths, mode="constant" if node.padding_mode == "zeros" else node.padding_mode)
            elif node.op == "upsample":
                linear = node.fn == "linear"
                h = F.interpolate(h, size=node.output_size, mode=_LINEAR_MODES[h.dim()] if linear else node.fn,
                                  align_corners=node.align_corners if linear else None)
            elif node.op == "add":
                h = ins[0]
                for other in ins[1:]:
                    h = h + other
            elif node.op == "concat":
                h = torch.cat(ins, dim=1)
            elif node.op == "mul":  # a vector scales every position of an image: (n, c) -> (n, c, 1, 1)
                rank = max(v.dim() for v in ins)
                h = _at_rank(ins[0], rank)
                for other in ins[1:]:
                    h = h * _at_rank(other, rank)
            values[node.name] = h
            if taps is not None and node.name in taps:
                taps[node.name] = h
            for name in dropped:
                del values[name]
        return h
