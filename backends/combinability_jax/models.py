"""The generic flax builder: one linen :class:`TableNet` interprets any layer table.

Modules are named after the table's nodes (dots become ``_``), so the flattened variables
are :meth:`~combinability.layers.LayerTable.flax_names`. Inputs are channels-first and
transposed to NHWC inside; feature taps and flattening use the reference's NCHW order.
W-Asymmetric dense and conv nodes (:class:`FrozenDense`, :class:`FrozenConv`) and σ-Asymmetric
gates take their frozen arrays from the table as constants, not variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from combinability.layers import ConvGeometry, LayerTable
from combinability.upsampling import resize_weights

__all__ = ["FlaxModel", "FrozenConv", "FrozenDense", "Norm", "TableNet", "flatten_variables", "unflatten_variables"]

#: A conv or pad node's padding_mode as ``jnp.pad``'s mode.
_JNP_PAD = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


#: Flax variables as ``{"collection/path/leaf": array}``, and back.
flatten_variables = partial(flatten_dict, sep="/")
unflatten_variables = partial(unflatten_dict, sep="/")


#: Activations whose ``jax.nn`` function is missing or has other defaults than torch's.
_ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "tanh": jnp.tanh, "hardtanh": jax.nn.hard_tanh,
                "hardswish": jax.nn.hard_swish, "hardsigmoid": jax.nn.hard_sigmoid, "softsign": jax.nn.soft_sign,
                "logsigmoid": jax.nn.log_sigmoid, "tanhshrink": lambda x: x - jnp.tanh(x)}


def _adaptive_pool(size: int, out: int) -> np.ndarray:
    """``(out, size)`` weights of adaptive average pooling along one axis (torch's windows)."""
    weights = np.zeros((out, size), np.float32)
    for i in range(out):
        start, stop = (i * size) // out, -((-(i + 1) * size) // out)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def _adaptive_max(h: jax.Array, output_size: tuple[int, ...]) -> jax.Array:
    """Adaptive max pooling of a channels-last map to ``output_size`` (torch's windows, as
    :func:`_adaptive_pool`'s), one spatial axis at a time: the maximum is taken axis by axis."""
    for axis, (size, out) in enumerate(zip(h.shape[1:-1], output_size, strict=True), start=1):
        windows = [jax.lax.slice_in_dim(h, (i * size) // out, -((-(i + 1) * size) // out), axis=axis)
                   for i in range(out)]
        h = jnp.concatenate([jnp.max(w, axis=axis, keepdims=True) for w in windows], axis=axis)
    return h


@lru_cache(maxsize=128)
def _resize(size_in: int, size_out: int, mode: str, align_corners: bool) -> np.ndarray:
    return resize_weights(size_in, size_out, mode, align_corners)


def _nchw(h: jax.Array) -> jax.Array:
    """A channels-last map ``(n, *positions, c)`` channels-first; a vector as it is."""
    return jnp.moveaxis(h, -1, 1) if h.ndim > 2 else h


def _at_rank(v: jax.Array, rank: int) -> jax.Array:
    """A vector ``(n, c)`` as a channels-last map of ``rank`` axes with one position: ``(n, 1, 1, c)``."""
    return v if v.ndim == rank else v.reshape(v.shape[0], *(1,) * (rank - v.ndim), *v.shape[1:])


class Norm(nn.Module):
    """LayerNorm over the channel (last) axis, GroupNorm, or BatchNorm with torch's running statistics.

    BatchNorm's running statistics update as torch's: ``0.9 * old + 0.1 * batch``, with the
    unbiased batch variance for ``var``; normalisation uses the biased one.
    """

    kind: str = "layernorm"
    eps: float = 1e-5
    groups: int = 1
    #: the learned parameters the node has (:meth:`~combinability.layer_nodes.Node.norm_leaves`)
    leaves: tuple[str, ...] = ("weight", "bias")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c, shape = x.shape[-1], x.shape
        size = tuple(shape[1:]) if self.kind == "layernorm_map" else (c,)  # (h, w, c) over the whole map
        scale = self.param("scale", nn.initializers.ones, size) if "weight" in self.leaves else 1.0
        bias = self.param("bias", nn.initializers.zeros, size) if "bias" in self.leaves else 0.0
        if self.kind == "rmsnorm":
            return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * scale
        if self.kind == "l2norm":  # torch's F.normalize: x / max(||x||, eps)
            return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), self.eps)
        if self.kind == "layernorm_map":
            axes = tuple(range(1, x.ndim))
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
            return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        if self.kind == "batchnorm":
            ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
            ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
            mean, var = ra_mean.value, ra_var.value
            if train:
                mean, var = jnp.mean(x, axis=tuple(range(x.ndim - 1))), jnp.var(x, axis=tuple(range(x.ndim - 1)))
                if not self.is_initializing():
                    m = x.size // c
                    ra_mean.value = 0.9 * ra_mean.value + 0.1 * mean
                    ra_var.value = 0.9 * ra_var.value + 0.1 * var * (m / max(m - 1, 1))
        else:  # statistics over the channels at each position, or over positions and a group's channels
            axes = (-1,) if self.kind == "layernorm" else (*range(1, x.ndim - 1), x.ndim)
            x = x if self.kind == "layernorm" else x.reshape(*shape[:-1], self.groups, c // self.groups)
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        return ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape) * scale + bias


@lru_cache(maxsize=32)
def _frozen_flax(table: LayerTable) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The table's frozen weights (mask, values) in flax axes: dense ``(in, out)``, conv ``(*kernel, in, out)``."""
    def order(ndim: int) -> tuple[int, ...]:
        return (*range(2, ndim), 1, 0)

    return {name.rsplit(".", 1)[0]: (np.transpose(m, order(m.ndim)), np.transpose(v, order(m.ndim)))
            for name, (m, v) in table.frozen_weights().items()}


class FrozenDense(nn.Module):
    """A dense layer computing with ``where(mask, values, kernel)`` (W-Asymmetric); ``mask``: ``(in, out)``."""

    units: int
    mask: Any
    values: Any
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.units))
        y = x @ jnp.where(self.mask, jnp.asarray(self.values, kernel.dtype), kernel)
        return y + self.param("bias", nn.initializers.zeros, (self.units,)) if self.use_bias else y


class FrozenConv(nn.Module):
    """A channels-last convolution computing with ``where(mask, values, kernel)``; ``mask``:
    ``(*kernel, in / groups, out)`` (``(kh, kw, in / groups, out)`` on images)."""

    units: int
    geometry: ConvGeometry
    groups: int
    mask: Any
    values: Any
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.geometry
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*g.kernel, x.shape[-1] // self.groups, self.units))
        y = jax.lax.conv_general_dilated(x, jnp.where(self.mask, jnp.asarray(self.values, kernel.dtype), kernel),
                                         g.stride, g.padding, rhs_dilation=g.dilation,
                                         dimension_numbers=_CHANNELS_LAST[x.ndim], feature_group_count=self.groups)
        return y + self.param("bias", nn.initializers.zeros, (self.units,)) if self.use_bias else y


_CHANNELS_LAST = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC"), 5: ("NDHWC", "DHWIO", "NDHWC")}


def _gate(table: LayerTable, name: str, h: jax.Array) -> jax.Array:
    """σ-Asymmetric FiGLU on a channels-last array: ``h * sigmoid(h @ G.T)``."""
    g = jnp.asarray(_gate_matrix(table, name), h.dtype)
    return h * jax.nn.sigmoid(h @ g.T)


@lru_cache(maxsize=128)
def _gate_matrix(table: LayerTable, name: str) -> np.ndarray:
    return table.gate_matrix(name)


class Scale(nn.Module):
    """Each channel (the last axis) times a learned factor: a layer scale, parameter ``leaf`` of ``(units,)``."""

    units: int
    leaf: str = "weight"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param(self.leaf, nn.initializers.ones, (self.units,)).astype(x.dtype)


class Shift(nn.Module):
    """Each channel (the last axis) plus a learned offset, parameter ``leaf`` of ``(units,)`` (one for all: 1)."""

    units: int
    leaf: str = "weight"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.param(self.leaf, nn.initializers.zeros, (self.units,)).astype(x.dtype)


class PReLU(nn.Module):
    """``max(x, 0) + a · min(x, 0)`` with ``units`` learned slopes ``a`` over the last (channel) axis
    (torch's ``nn.PReLU(units)``: initialised to 0.25)."""

    units: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.param("negative_slope", nn.initializers.constant(0.25), (self.units,))
        return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


class TableNet(nn.Module):
    """A flax network interpreting a :class:`~combinability.layers.LayerTable`.

    ``__call__(x, train=False, taps=None)``: ``x`` is channels-first; when ``taps`` is a dict
    whose keys are node names, the outputs of those nodes are stored into it, channels-first.
    """

    table: LayerTable

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, taps: dict[str, Any] | None = None) -> jax.Array:
        values = {"<input>": jnp.moveaxis(x, 1, -1) if x.ndim > 2 else x}
        for node, reads, _ in self.table.schedule:
            ins = [values[i] for i in reads]
            h, name, k = ins[0], node.name.replace(".", "_"), node.kernel
            if node.op in ("dense", "conv") and node.fixed:
                mask, frozen = _frozen_flax(self.table)[node.name]
                h = (FrozenDense(node.units, mask, frozen, node.bias, name=name) if node.op == "dense" else
                     FrozenConv(node.units, node.conv_geometry(h.ndim - 2), node.groups, mask, frozen, node.bias,
                                name=name))(h)
            elif node.op == "gate":
                h = _gate(self.table, node.name, h)
            elif node.op == "dense":
                h = nn.Dense(node.units, use_bias=node.bias, name=name)(h)
            elif node.op == "conv":
                g = node.conv_geometry(h.ndim - 2)
                padding = g.padding
                if node.padding_mode != "zeros":  # each channel padded from itself, then convolved unpadded
                    h = jnp.pad(h, [(0, 0), *g.padding, (0, 0)], mode=_JNP_PAD[node.padding_mode])
                    padding = tuple((0, 0) for _ in g.padding)
                h = nn.Conv(node.units, g.kernel, strides=g.stride, padding=padding, kernel_dilation=g.dilation,
                            feature_group_count=node.groups, use_bias=node.bias, name=name)(h)
            elif node.op == "conv_transpose":
                g = node.conv_geometry(h.ndim - 2)
                h = nn.ConvTranspose(node.units, g.kernel, strides=g.stride,
                                     padding=g.dilated_input_padding(node.output_paddings(h.ndim - 2)),
                                     kernel_dilation=g.dilation,
                                     use_bias=node.bias, name=name)(h)
            elif node.op == "slice":  # channels last
                h = h[..., node.channel_range[0]:node.channel_range[1]]
            elif node.op == "channel_reduce":  # channels last
                h = jnp.mean(h, axis=-1, keepdims=True) if node.fn == "mean" else jnp.max(h, axis=-1, keepdims=True)
            elif node.op == "pad":  # channels last: the spatial axes are 1 .. ndim - 2
                widths = [(0, 0), *node.paddings(h.ndim - 2), tuple(node.channel_padding)]
                h = jax.lax.pad(h, jnp.zeros((), h.dtype), [(b, a, 0) for b, a in widths]) \
                    if node.padding_mode == "zeros" else jnp.pad(h, widths, mode=_JNP_PAD[node.padding_mode])  # crops
            elif node.op == "upsample":  # one spatial axis at a time
                for axis, (n, m) in enumerate(zip(h.shape[1:-1], node.output_size, strict=True), start=1):
                    weights = _resize(n, m, node.fn, node.align_corners).astype(h.dtype)
                    h = jnp.moveaxis(jnp.tensordot(weights, h, axes=(1, axis)), 0, axis)
            elif node.op == "norm":
                h = Norm(node.norm, node.eps, node.groups, node.norm_leaves(), name=name)(h, train)
            elif node.op == "prelu":
                h = PReLU(node.units, name=name)(h)
            elif node.op == "scale":
                h = Scale(node.units, node.leaf, name=name)(h)
            elif node.op == "shift":
                h = Shift(node.units, node.leaf, name=name)(h)
            elif node.op == "relu":
                h = nn.relu(h)
            elif node.op == "act":
                h = (_ACTIVATIONS[node.fn] if node.fn in _ACTIVATIONS else getattr(jax.nn, node.fn))(h)
            elif node.op == "flatten":
                h = jnp.reshape(h if node.channels_last else _nchw(h), (h.shape[0], -1))
            elif node.op == "avgpool" and node.output_size and node.fn == "max":
                h = _adaptive_max(h, node.output_size)
            elif node.op == "avgpool" and node.output_size:  # one spatial axis at a time
                for axis, (n, m) in enumerate(zip(h.shape[1:-1], node.output_size, strict=True), start=1):
                    h = jnp.moveaxis(jnp.tensordot(_adaptive_pool(n, m), h, axes=(1, axis)), 0, axis)
            elif node.op == "avgpool" and node.fn == "max":
                h = jnp.max(h, axis=tuple(range(1, h.ndim - 1)), keepdims=node.keepdims)
            elif node.op == "avgpool":
                h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)), keepdims=node.keepdims)
            elif node.op == "maxpool" and min(h.shape[1:-1]) >= k:
                pool, nd = nn.avg_pool if node.fn == "avg" else nn.max_pool, h.ndim - 2
                h = pool(h, (k,) * nd, strides=(max(1, node.stride),) * nd, padding=node.paddings(nd))
            elif node.op == "add":
                h = sum(ins[1:], ins[0])
            elif node.op == "concat":  # channels-last
                h = jnp.concatenate(ins, axis=-1)
            elif node.op == "mul":  # a vector scales every position of an image: (n, c) -> (n, 1, 1, c)
                rank = max(v.ndim for v in ins)
                h = _at_rank(ins[0], rank)
                for other in ins[1:]:
                    h = h * _at_rank(other, rank)
            values[node.name] = h
            if taps is not None and node.name in taps:
                taps[node.name] = _nchw(h)
        return h


@dataclass(frozen=True, eq=False)
class FlaxModel:
    """The jax backend's native model: a flax ``module``, its ``variables`` and its ``table``.

    ``table`` is None for a user's own module. ``counters`` holds the integer 0-d counters
    flax does not keep (BatchNorm's ``num_batches_tracked``) by flax name
    (``"counters/<module>/count"``), numpy int64; they are carried along, not updated.
    """

    module: nn.Module
    variables: Mapping[str, Any]
    table: LayerTable | None = None
    counters: Mapping[str, np.ndarray] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every variable and counter by flax name, ``"collection/path/leaf"``."""
        return {**flatten_variables(self.variables), **self.counters}

    def nnx(self) -> Any:
        """This model as a flax NNX module, for a model that came from one (an aligned or combined one).

        Raises
        ------
        TypeError
            If the model is a linen module's or the library's own.
        """
        from combinability_jax.nnx_bridge import to_nnx

        return to_nnx(self.module, self.variables)

    def __repr__(self) -> str:
        what = self.table.name if self.table is not None else type(self.module).__name__
        return f"FlaxModel({what}, {len(self.flat())} arrays)"
