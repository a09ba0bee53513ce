"""Tracing a user's flax linen module into a layer table (:func:`describe`) and tapping its features (:func:`taps`).

:func:`jax.make_jaxpr` gives the dataflow of ``module.apply(variables, x)`` (jitted and custom-derivative calls
inlined); :func:`flax.linen.intercept_methods` runs each module call under a named scope holding its path. A call of
``nn.Dense``, ``nn.Conv``, ``nn.BatchNorm``, ``nn.LayerNorm`` or ``nn.GroupNorm`` becomes a node named by its path
(``Block_0.Dense_1``); between them the tracer follows element-wise functions (named by their values on a probe;
scalings pass their input on), sums of two branches, ``nn.avg_pool``/``nn.max_pool``, means over the spatial axes
and reshapes to ``(n, -1)``. Anything else raises :class:`~combinability.errors.TracingError` naming it.
"""

from __future__ import annotations

import inspect
import itertools
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from combinability.errors import NotALayerTableError, TracingError
from combinability.layer_nodes import TRACED_ELEMENTWISE
from combinability.layers import ConvGeometry, LayerTable, Node, input_layout
from combinability.upsampling import resize_weights
from combinability_jax.jaxpr_walk import JaxprWalker
from combinability_jax.nnx_bridge import call_path

__all__ = ["describe", "taps", "train_kwargs"]

_ELEMENTWISE = {"add", "add_any", "sub", "mul", "div", "neg", "max", "min", "exp", "exp2", "expm1", "log", "log1p",
                "tanh", "logistic", "erf", "erfc", "integer_pow", "pow", "sqrt", "rsqrt", "abs", "sign", "select_n",
                "gt", "ge", "lt", "le", "eq", "ne", "convert_element_type", "square", "copy", "copy_p", "clamp"}
_FUNCTIONS = (("relu", jax.nn.relu), ("gelu", partial(jax.nn.gelu, approximate=False)), ("gelu", jax.nn.gelu),
              ("tanh", jnp.tanh), ("sigmoid", jax.nn.sigmoid), ("silu", jax.nn.silu), ("elu", jax.nn.elu),
              ("leaky_relu", jax.nn.leaky_relu), ("softplus", jax.nn.softplus), ("relu6", jax.nn.relu6),
              ("hardtanh", jax.nn.hard_tanh), ("hardswish", jax.nn.hard_swish), ("hardsigmoid", jax.nn.hard_sigmoid),
              ("mish", jax.nn.mish), ("selu", jax.nn.selu), ("celu", jax.nn.celu), ("softsign", jax.nn.soft_sign),
              ("tanhshrink", lambda x: x - jnp.tanh(x)), ("logsigmoid", jax.nn.log_sigmoid))
_FOLLOWS = ("it follows nn.Dense, 1-d to 3-d nn.Conv and nn.ConvTranspose, nn.BatchNorm, nn.LayerNorm, "
            "nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm, element-wise activations, "
            "sums and products of two branches, concatenations of channels (the last axis), nn.avg_pool/nn.max_pool, "
            "zero padding of the spatial axes (jnp.pad), means and maxima over the spatial axes and reshapes to "
            "(n, -1)")


#: Arguments of a ``__call__`` that set a flax model's mode, and each one's value in training
#: (``train=True``, flax's examples; ``deterministic=False``, dropout's flag in Hugging Face and
#: lm1b models; ``use_running_average=False``, BatchNorm's flag passed through).
TRAIN_FLAGS = {"train": True, "training": True, "is_training": True, "deterministic": False,
               "use_running_average": False}


def train_kwargs(module: nn.Module, train: bool) -> dict[str, bool]:
    """The mode flags of :data:`TRAIN_FLAGS` that the module's ``__call__`` takes, set for
    training (``train=True``) or inference; ``{}`` for a model that takes none."""
    params = inspect.signature(type(module).__call__).parameters
    return {name: train == in_training for name, in_training in TRAIN_FLAGS.items() if name in params}


def _bind(prim: Any, params: dict, args: list) -> list:
    bound = prim.get_bind_params(params)  # jax < 0.7: (subfuns, params)
    subfuns, bound = bound if isinstance(bound, tuple) else ((), bound)
    out = prim.bind(*subfuns, *args, **bound)
    return list(out) if prim.multiple_results else [out]


def _per_axis(v: Any, nd: int) -> tuple:
    """A flax conv setting (None, an int or string, or one per axis) as one entry per each of ``nd`` axes."""
    return (1,) * nd if v is None else (v,) * nd if isinstance(v, int | str) else tuple(v)


def _positions(rank: int) -> tuple[int, ...]:
    """The spatial axes of a channels-last map of ``rank`` axes."""
    return tuple(range(1, rank - 1))


def _conv_padding(pad: Any, kernel: tuple, stride: tuple, dilation: tuple,
                  spatial: tuple) -> tuple[tuple[int, int], ...] | None:
    """A flax ``Conv``'s padding as one ``(before, after)`` pair per spatial axis; None for one that is not zeros.

    ``"SAME"`` pads as ``lax`` does: up to a multiple of the stride, the smaller half first.
    """
    if isinstance(pad, str):
        if pad.upper() not in ("SAME", "VALID"):
            return None
        same = pad.upper() == "SAME"
        totals = (max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0) * same
                  for n, k, s, d in zip(spatial, kernel, stride, dilation, strict=True))
        return tuple((t // 2, t - t // 2) for t in totals)
    per_axis = [pad] * len(kernel) if isinstance(pad, int) else list(pad)
    if len(per_axis) != len(kernel):
        return None
    return tuple((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in per_axis)


def _lax_transpose_padding(k: int, s: int, mode: str) -> tuple[int, int]:
    """``jax.lax.conv_transpose``'s padding of the stride-dilated input for ``"SAME"`` or ``"VALID"``
    (``k``: the dilated kernel's extent, ``s``: the stride): ``"SAME"`` makes ``in * s`` outputs,
    ``"VALID"`` ``in * s + max(k - s, 0)``."""
    total = k + s - 2 + (max(k - s, 0) if mode == "VALID" else 0)
    before = k - 1 if mode == "VALID" or s > k - 1 else -(-total // 2)
    return before, total - before


def _conv_transpose_node(path: str, m: nn.ConvTranspose, nd: int, ins: tuple[str, ...], what: str,
                         hint: str) -> Node:
    """The node of an ``nn.ConvTranspose`` (``transpose_kernel=False``) on ``nd`` spatial axes.

    flax pads the stride-dilated input by ``(before, after)``; torch's geometry crops
    ``dilation * (kernel - 1) - before`` and ``- after`` of the full output instead (less
    than nothing after: ``output_padding``).
    """
    kernel, stride, dilation = (_per_axis(v, nd) for v in (m.kernel_size, m.strides, m.kernel_dilation))
    reach = tuple(d * (k - 1) for k, d in zip(kernel, dilation, strict=True))
    pad = m.padding
    if isinstance(pad, str) and pad.upper() in ("SAME", "VALID"):
        pads = tuple(_lax_transpose_padding(r + 1, s, pad.upper()) for r, s in zip(reach, stride, strict=True))
    elif not isinstance(pad, str):
        pads = _conv_padding(pad, kernel, stride, dilation, (0,) * nd)
    else:
        pads = None
    g, extra = ConvGeometry.from_dilated_input_padding(kernel, stride, dilation, pads) if pads else (None, ())
    if m.transpose_kernel or g is None or any(lo < 0 for lo, _ in g.padding):
        raise TracingError(f"{what}: the tracer follows nn.ConvTranspose with transpose_kernel=False and zero "
                           f"padding of at most dilation x (kernel - 1) before each axis (got transpose_kernel="
                           f"{m.transpose_kernel}, padding {m.padding!r})" + hint)
    return Node(path, "conv_transpose", ins, units=m.features, kernel=kernel, stride=stride, dilation=dilation,
                padding=g.padding, output_padding=extra, bias=m.use_bias)


def _leaf_node(path: str, m: nn.Module, shape: tuple[int, ...], ins: tuple[str, ...], hint: str) -> Node:
    """The node of one call of a Dense, Conv or normalisation module on an input of ``shape``."""
    nd, what = len(shape), f"module {path!r} ({type(m).__name__})"
    last = [tuple(int(a) % nd for a in np.atleast_1d(-1 if axes is None else axes)) == (nd - 1,)
            for axes in (getattr(m, "reduction_axes", -1), getattr(m, "feature_axes", -1), getattr(m, "axis", -1))]
    scaled, shifted = getattr(m, "use_scale", True), getattr(m, "use_bias", not isinstance(m, nn.RMSNorm))
    affine = scaled and shifted  # both, or (a parameter-free norm) neither
    if isinstance(m, nn.Dense) and nd >= 2:  # on a channels-last map: the channels of each position
        return Node(path, "dense", ins, units=m.features, bias=m.use_bias)
    if isinstance(m, nn.Conv) and 3 <= nd <= 5 and len(_per_axis(m.kernel_size, nd - 2)) == nd - 2:
        kernel, stride, dilation = (_per_axis(v, nd - 2) for v in (m.kernel_size, m.strides, m.kernel_dilation))
        padding = _conv_padding(m.padding, kernel, stride, dilation, shape[1:-1])
        mode = {"CIRCULAR": "circular", "REFLECT": "reflect"}.get(m.padding.upper() if isinstance(m.padding, str)
                                                                  else "", "zeros")
        if mode != "zeros":  # flax pads (k - 1) // 2 before and k // 2 after each axis (k dilated), then VALID
            padding = tuple(((d * (k - 1)) // 2, (d * (k - 1) + 1) // 2) for k, d in zip(kernel, dilation, strict=True))
        if set(_per_axis(m.input_dilation, nd - 2)) == {1} and padding is not None:
            return Node(path, "conv", ins, units=m.features, kernel=kernel, stride=stride, padding=padding,
                        dilation=dilation, groups=m.feature_group_count, bias=m.use_bias, padding_mode=mode)
        raise TracingError(f"{what}: only zero-padded convolutions without input dilation are supported (got "
                           f"padding {m.padding!r}, input_dilation {m.input_dilation})" + hint)
    if isinstance(m, nn.ConvTranspose) and 3 <= nd <= 5:
        return _conv_transpose_node(path, m, nd - 2, ins, what, hint)
    whole = tuple(range(1, nd))  # every axis but the batch's: a LayerNorm over each example's whole map
    over_map = [nd > 2 and axes is not None and tuple(sorted(int(a) % nd for a in np.atleast_1d(axes))) == whole
                for axes in (getattr(m, "reduction_axes", -1), getattr(m, "feature_axes", -1))]
    if isinstance(m, nn.LayerNorm) and over_map[0] and over_map[1] and (scaled or not shifted):
        # statistics over every channel and position; scale and bias (h, w, c) move along their channel axis
        return Node(path, "norm", ins, norm="layernorm_map", eps=m.epsilon, affine=scaled, bias=shifted)
    if isinstance(m, nn.LayerNorm) and over_map[0] and last[1] and scaled == shifted:
        # statistics over the whole map, one scale and bias per channel: GroupNorm with one group
        return Node(path, "norm", ins, norm="groupnorm", eps=m.epsilon, groups=1, affine=affine)
    if isinstance(m, nn.LayerNorm | nn.RMSNorm) and last[0] and last[1] and scaled and not shifted:
        # a scale alone: RMSNorm (it has no bias), LayerNorm(use_bias=False)
        return Node(path, "norm", ins, norm="rmsnorm" if isinstance(m, nn.RMSNorm) else "layernorm", eps=m.epsilon,
                    bias=False)
    if isinstance(m, nn.RMSNorm) and last[0] and last[1] and not scaled:
        return Node(path, "norm", ins, norm="rmsnorm", eps=m.epsilon, affine=False)
    norm = next((k for k, ok in {"batchnorm": isinstance(m, nn.BatchNorm) and last[2],
                                 "layernorm": isinstance(m, nn.LayerNorm) and last[0] and last[1],
                                 "groupnorm": isinstance(m, nn.GroupNorm) and m.reduction_axes is None,
                                 "instancenorm": isinstance(m, nn.InstanceNorm) and last[1] and nd > 2}.items()
                 if ok and scaled == shifted), None)
    if norm == "instancenorm":  # each channel of each example over its positions: a group per channel
        return Node(path, "norm", ins, norm="groupnorm", eps=m.epsilon, groups=shape[-1], affine=affine)
    if norm is not None:
        groups = (m.num_groups or shape[-1] // m.group_size) if norm == "groupnorm" else 1
        return Node(path, "norm", ins, norm=norm, eps=m.epsilon, groups=groups, affine=affine)
    raise TracingError(f"{what} on an input of shape {shape}: {_FOLLOWS} (Dense on vectors; norms over the last axis "
                       "with both scale and bias, or neither, LayerNorm and RMSNorm with a scale alone too; LayerNorm "
                       "over every axis but the batch's, reduction_axes and feature_axes (1, ..., ndim - 1), as "
                       "torch's LayerNorm([C, H, W]); a norm with a bias and no scale, or over some of the "
                       "positions, has no layer-table node)" + hint)


class _Trace(JaxprWalker):
    """``module.apply(variables, x)`` as flat equations ``(primitive, params, input ids, output ids, scope)``, and
    the layer-table nodes read from them (``var[node]``: the id holding a node's output).

    ``scope`` is ``"L=path"`` inside a Dense/Conv/norm call, else ``"C=path"`` of the innermost module.
    """

    def __init__(self, module: nn.Module, variables: Any, x: Any) -> None:
        self.name, self.calls = type(module).__name__, {}
        self.hint = f"; pass spec= (a combinability.PermutationSpec) by hand for {self.name}"
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
            raise NotALayerTableError(f"{self.name} takes integer inputs (token ids, read by an embedding), which "
                                      "layer tables do not model" + self.hint)
        if not 2 <= np.ndim(x) <= 5:
            raise TracingError(f"example_input of {self.name} must be (n, features) or channels-last sequences "
                               f"(n, length, c), images (n, h, w, c) or volumes (n, d, h, w, c), got shape "
                               f"{tuple(np.shape(x))}")
        self._walk(module, variables, x, self._intercept, train_kwargs(module, False))
        self.nodes, self.var, self.values = [], {}, {}
        self.node_of, self.alias, self.root = {self.inputs[-1]: "<input>"}, {}, {}  # root: element-wise -> source
        self.producer = {o: k for k, op in enumerate(self.ops) for o in op[3]}
        self.last = {op[4]: op[3][0] for op in self.ops}
        acts = {self.inputs[-1]}
        for prim, params, ins, outs, scope in self.ops:
            if acts.isdisjoint(ins):
                continue
            acts.update(outs)
            if scope[:2] == "L=" and scope[2:] not in self.var:
                m, shape = self.calls[scope[2:]]
                self._add(_leaf_node(scope[2:], m, shape, (self._name(next(i for i in ins if i in acts)),),
                                     self.hint), self.last[scope])
            elif scope[:2] == "C=":
                self._free(prim, params, [i for i in ins if i in acts], outs, scope[2:], len(ins),
                           [i for i in ins if i not in acts])

    def _intercept(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        m, path = context.module, ".".join(call_path(context))
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        leaf = isinstance(m, nn.Dense | nn.Conv | nn.ConvTranspose | nn.BatchNorm | nn.LayerNorm | nn.GroupNorm
                          | nn.InstanceNorm | nn.RMSNorm)
        if leaf and path in self.calls:
            raise TracingError(f"module {path!r} ({type(m).__name__}) is called twice: shared weights, or layers "
                               "stacked by nn.scan/nnx.scan (one array per parameter for all layers), which are "
                               "not traced: unroll them into a loop over blocks" + self.hint)
        if leaf:
            self.calls[path] = (m, tuple(np.shape(args[0])))
        with jax.named_scope(("L=" if leaf else "C=") + path):
            return next_fun(*args, **kwargs)


    def _free(self, prim: Any, p: dict, acts: list[int], outs: list[int], path: str, operands: int,
              others: list[int] = ()) -> None:
        """One operation of the user's modules on the input's dataflow (``operands``: all its inputs,
        ``others``: those not on the dataflow)."""
        n, shape, s = prim.name, self.shape[outs[0]], self.shape[acts[0]]
        where = f"operation {n!r} in {f'module {path!r}' if path else f'the top-level {self.name}'}"
        variable = self._variable(others[0]) if n == "mul" and len(acts) == 1 and len(others) == 1 else None
        if variable is not None:  # a layer scale: one learned factor per channel (the last axis)
            parts = variable.split("/")
            c = shape[-1] if len(shape) >= 2 else 0
            if parts[0] == "params" and len(parts) > 2 and s == shape and self.shape[self._root_of(others[0])] == (c,):
                self._add(Node(".".join(parts[1:-1]), "scale", (self._name(acts[0]),), units=c, leaf=parts[-1]),
                          outs[0])
                return
            raise TracingError(f"{where} multiplies by the variable {variable!r} of shape "
                               f"{self.shape[self._root_of(others[0])]}: the tracer follows a layer scale, a "
                               f"submodule's parameter (params/<module>/<name>) of one factor per channel, shape "
                               f"({c},), times a map or vector" + self.hint)
        if n == "concatenate" and 2 <= len(shape) <= 5 and p["dimension"] == len(shape) - 1 \
                and len(acts) == operands:  # channels (the last axis) of the input's dataflow only
            self._add(Node(self._fresh(path, "concat"), "concat", tuple(map(self._name, acts))), outs[0])
            return
        spread = n == "mul" and len(acts) == 2 and all(  # a 1 x 1 gate broadcast over the positions
            len(self.shape[a]) == len(shape) and all(d in (1, e) for d, e in zip(self.shape[a], shape, strict=True))
            for a in acts)
        if n in _ELEMENTWISE and (spread or all(self.shape[a] == shape for a in acts)):  # constants: see the probe
            roots = {self.root.get(a, a) for a in acts}
            if len(roots) > 1 and (n not in ("add", "add_any", "mul") or len(acts) != 2):
                raise TracingError(f"{where} combines two branches; the tracer follows only their sum or product"
                                   + self.hint)
            if len(roots) > 1:
                op = "mul" if n == "mul" else "add"  # a product: a gate (squeeze-and-excitation, gated units)
                self._add(Node(self._fresh(path, op), op, tuple(map(self._name, acts))), outs[0])
            else:
                self.root[outs[0]] = roots.pop()
        elif len(acts) == 1 and n == "broadcast_in_dim" and len(shape) > 2 and s[0] == shape[0] \
                and s[-1] == shape[-1] and math.prod(s[1:-1]) == 1:
            self._name(acts[0])  # a vector or 1 x 1 image spread over the positions: a product broadcasts it
            self.alias[outs[0]] = acts[0]
        elif len(acts) == 1 and n in ("reshape", "squeeze", "broadcast_in_dim", "expand_dims") and (
                math.prod(s) == math.prod(shape) and s[0] == shape[0] and (len(s) == 2 or s == shape or len(s) > 2
                                                                     and len(shape) == 2)):
            if len(s) > 2 and len(shape) == 2:  # a reshape of the channels-last map: position by position
                self._add(Node(self._fresh(path, "flatten"), "flatten", (self._name(acts[0]),), channels_last=True),
                          outs[0])
            else:
                self._name(acts[0])
                self.alias[outs[0]] = acts[0]
        elif len(acts) == 1 and n == "gather" and len(others) == 1 and len(s) > 2:
            self._add(Node(self._fresh(path, "resize"), "upsample", (self._name(acts[0]),),
                           fn=self._nearest_resize(p, s, shape, others[0], where), output_size=tuple(shape[1:-1])),
                      outs[0])
        elif len(acts) == 1 and n == "pad" and len(s) > 2 and others and self._zero(others[0]) and \
                tuple(p["padding_config"][0]) == (0, 0, 0) and min(p["padding_config"][-1][:2]) >= 0 and \
                all(inner == 0 for _, _, inner in p["padding_config"]):
            # jnp.pad with zeros of the spatial axes (each channel from itself; lax.pad's negative widths crop), and
            # zero channels around the input's (the option-A shortcut)
            self._add(Node(self._fresh(path, "pad"), "pad", (self._name(acts[0]),),
                           padding=tuple((int(lo), int(hi)) for lo, hi, _ in p["padding_config"][1:-1]),
                           channel_padding=tuple(int(v) for v in p["padding_config"][-1][:2])), outs[0])
        elif len(acts) == 1 and n == "slice" and len(s) > 2 and p["strides"] is not None and \
                tuple(p["start_indices"]) == (0,) * len(s) and tuple(p["limit_indices"]) == s and \
                p["strides"][0] == p["strides"][-1] == 1 and len(set(p["strides"][1:-1])) == 1 and p["strides"][1] > 1:
            # x[:, ::2, ::2, :]: every step-th position from the first, a max pool of kernel 1
            self._add(Node(self._fresh(path, "subsample"), "maxpool", (self._name(acts[0]),), kernel=1,
                           stride=int(p["strides"][1])), outs[0])
        elif len(acts) == 1 and n == "reduce_sum" and len(s) > 2 and tuple(p["axes"]) == _positions(len(s)):
            self._add(Node(self._fresh(path, "mean"), "avgpool", (self._name(acts[0]),)), outs[0])
        elif len(acts) == 1 and n == "split" and len(s) > 2 and p["axis"] % len(s) == len(s) - 1:
            stops = list(itertools.accumulate(int(v) for v in p["sizes"]))  # parts of the channels
            for out, start, stop in zip(outs, [0, *stops[:-1]], stops, strict=True):
                self._add(Node(self._fresh(path, "slice"), "slice", (self._name(acts[0]),),
                               channel_range=(start, stop)), out)
        elif len(acts) == 1 and n == "slice" and len(s) > 2 and not any(v not in (None, 1) for v in
                                                                     (p["strides"] or ())) and \
                tuple(p["start_indices"][:-1]) == (0,) * (len(s) - 1) and tuple(p["limit_indices"][:-1]) == s[:-1]:
            self._add(Node(self._fresh(path, "slice"), "slice", (self._name(acts[0]),),
                           channel_range=(int(p["start_indices"][-1]), int(p["limit_indices"][-1]))), outs[0])
        elif len(acts) == 1 and n == "slice" and len(s) > 2 and not any(v not in (None, 1) for v in
                                                                     (p["strides"] or ())) and \
                (p["start_indices"][0], p["start_indices"][-1]) == (0, 0) and \
                (p["limit_indices"][0], p["limit_indices"][-1]) == (s[0], s[-1]):
            # x[:, :-k, :] (a TCN's causal crop), x[:, a:b, c:d, :], x[:, -1] (then squeezed: a flatten): a crop
            self._add(Node(self._fresh(path, "crop"), "pad", (self._name(acts[0]),), padding=tuple(
                (-int(lo), int(hi) - int(size)) for lo, hi, size in
                zip(p["start_indices"][1:-1], p["limit_indices"][1:-1], s[1:-1], strict=True))), outs[0])
        elif len(acts) == 1 and n in ("reduce_sum", "reduce_max") and len(s) > 2 and tuple(p["axes"]) == (len(s) - 1,):
            fn = "mean" if n == "reduce_sum" else "max"  # over the channels at each position (the mean's 1 / c follows)
            self._add(Node(self._fresh(path, fn), "channel_reduce", (self._name(acts[0]),), fn=fn), outs[0])
        elif len(acts) == 1 and n in ("broadcast_in_dim", "reshape", "expand_dims") and shape == (*s, 1) and \
                self.nodes and self.node_of.get(acts[0]) is not None and \
                self.nodes[[x.name for x in self.nodes].index(self.node_of[acts[0]])].op == "channel_reduce":
            self.alias[outs[0]] = acts[0]  # a reduction over the channels given its one channel back
        elif len(acts) == 1 and n == "reduce_max" and len(s) > 2 and tuple(p["axes"]) == _positions(len(s)):
            self._add(Node(self._fresh(path, "max"), "avgpool", (self._name(acts[0]),), fn="max"), outs[0])
        elif len(acts) == 1 and n in ("reduce_window_sum", "reduce_window_max") and len(s) > 2 and (
                len({*p["window_dimensions"][1:-1]}) == 1 and len({*p["window_strides"][1:-1]}) == 1
                and {p["window_dimensions"][0], p["window_dimensions"][-1], p["window_strides"][0],
                     p["window_strides"][-1], *p["base_dilation"], *p["window_dilation"]} == {1}
                and min(v for pad in p["padding"][1:-1] for v in pad) >= 0
                and tuple(p["padding"][0]) == tuple(p["padding"][-1]) == (0, 0)):
            avg = n == "reduce_window_sum"
            pads = tuple((int(lo), int(hi)) for lo, hi in p["padding"][1:-1])  # "SAME" may pad one side more
            self._add(Node(self._fresh(path, "avg_pool" if avg else "max_pool"), "maxpool", (self._name(acts[0]),),
                           kernel=p["window_dimensions"][1], stride=p["window_strides"][1],
                           padding=pads[0][0] if len({v for pad in pads for v in pad}) == 1 else pads,
                           fn="avg" if avg else ""), outs[0])
        else:
            raise TracingError(f"{where}: the tracer cannot follow this operation ({_FOLLOWS})" + self.hint)

    def _zero(self, i: int) -> bool:
        """Whether array ``i`` is a constant zero (a padding value)."""
        try:
            return bool(np.all(np.asarray(self._value(i)) == 0))
        except Exception:  # not a constant
            return False

    def _nearest_resize(self, p: dict, s: tuple, shape: tuple, indices: int, where: str) -> str:
        """The mode of a gather that resizes one spatial axis of a channels-last map by nearest neighbours
        (``jax.image.resize(..., "nearest")`` gathers one axis at a time), read off its constant indices."""
        dims = p["dimension_numbers"]
        axis = dims.collapsed_slice_dims[0] if len(dims.collapsed_slice_dims) == 1 else None
        if axis in _positions(len(s)) and tuple(dims.start_index_map) == (axis,) and \
                not getattr(dims, "operand_batching_dims", ()) and len(shape) == len(s) and \
                tuple(dims.offset_dims) == tuple(j for j in range(len(s)) if j != axis) and \
                tuple(p["slice_sizes"]) == tuple(1 if j == axis else v for j, v in enumerate(s)) and \
                all(shape[j] == s[j] for j in range(len(s)) if j != axis):
            index = np.asarray(self._value(indices)).reshape(-1)
            for mode in ("nearest-exact", "nearest"):
                if np.array_equal(index, resize_weights(s[axis], shape[axis], mode).argmax(axis=1)):
                    return mode
        raise TracingError(f"{where}: the tracer follows a gather only as a nearest-neighbour resize of one spatial "
                           f"axis of a map (jax.image.resize(..., 'nearest')), got {s} -> {shape}" + self.hint)

    def _root_of(self, i: int) -> int:
        """The id that ``i`` is a broadcast, reshape or cast of (``i`` itself when it is none)."""
        while i in self.producer:
            prim, _, ins, _, _ = self.ops[self.producer[i]]
            if prim.name not in ("broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "expand_dims") \
                    or len(ins) != 1:
                break
            i = ins[0]
        return i

    def _variable(self, i: int) -> str | None:
        """The path of the model variable that ``i`` is (or is a broadcast or reshape of); None otherwise."""
        root = self._root_of(i)
        return self.src.get(root) if root not in self.const else None

    def _value(self, i: int) -> Any:
        """The value of an id that does not depend on the input (folded on first use)."""
        if i in self.src and i not in self.const:
            raise TracingError(f"the variable {self.src[i]!r} is used outside a Dense, Conv or norm module"
                               + self.hint)
        if i not in self.values and i in self.const:
            self.values[i] = self.const[i]
        elif i not in self.values:
            prim, params, ins, outs, _ = self.ops[self.producer[i]]
            with jax.ensure_compile_time_eval():
                self.values.update(zip(outs, _bind(prim, params, [self._value(j) for j in ins]), strict=True))
        return self.values[i]

    def _match(self, a: int, r: int) -> str | None:
        """The activation computing ``a`` from ``r`` (``""``: a scaling, None: none known), found on a probe."""
        seen, todo = set(), [a]
        while todo:
            if (i := todo.pop()) in self.root and i not in seen:
                seen.add(i)
                todo += self.ops[self.producer[i]][2]
        probe = np.linspace(-6, 6, math.prod(self.shape[r]), dtype=np.float32).reshape(self.shape[r])
        dtype = self.dtype.get(r) or np.float32  # the model's computation type (bfloat16: as precise as it is)
        low = jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
        rtol, atol = (2e-2, 2e-2) if low else (1e-4, 1e-5)
        env: dict[int, Any] = {r: probe.astype(dtype)}
        with jax.ensure_compile_time_eval():
            for k in sorted({self.producer[i] for i in seen}):
                _, params, ins, outs, _ = op = self.ops[k]
                env.update(zip(outs, _bind(op[0], params, [env[i] if i in env else self._value(i) for i in ins]),
                               strict=True))
            probe = np.asarray(env[r], np.float64)
            y = np.asarray(env[a], np.float64)
            fn = next((fn for fn, f in _FUNCTIONS if np.allclose(y, f(probe), rtol=rtol, atol=atol)), None)
        slope = (y.flat[-1] - y.flat[0]) / 12
        scaling = slope != 0 and np.allclose(y, y.flat[0] + slope * (probe + 6), rtol=rtol, atol=atol)
        return "" if fn is None and scaling else fn

    def _name(self, a: int) -> str:
        """The node whose output ``a`` is; an element-wise result becomes an activation node here."""
        while a in self.alias:
            a = self.alias[a]
        if a in self.node_of:
            return self.node_of[a]
        if a not in self.root:
            raise TracingError(f"{self.name} reads an intermediate value of a Dense, Conv or norm module"
                               + self.hint)
        r, (prim, _, ins, _, scope) = self.root[a], self.ops[self.producer[a]]
        fn = self._match(a, r)
        if fn == "":  # a scaling passes its input on (the mean, not the sum, is the pool's output)
            name = self._name(r)
            if self.node_of.get(r) == name != "<input>":
                self.var[name] = a
        elif fn is not None:
            name = self._add(Node(self._fresh(scope[2:], fn), "relu" if fn == "relu" else "act", (self._name(r),),
                                  fn="" if fn == "relu" else fn), a)
        elif prim.name in ("add", "add_any") and len(ins) == 2 and all(i in self.root or i == r for i in ins):
            name = self._add(Node(self._fresh(scope[2:], "add"), "add", tuple(map(self._name, ins))), a)
        else:  # a function of each value of r alone that no known activation matches: kept, unnamed
            name = self._add(Node(self._fresh(scope[2:], prim.name), "act", (self._name(r),), fn=TRACED_ELEMENTWISE),
                             a)
        self.node_of[a] = name
        return name

    def _fresh(self, path: str, base: str) -> str:
        taken, stem = {n.name for n in self.nodes} | set(self.calls), f"{path}.{base}" if path else base
        return next(name for k in range(len(taken) + 1) if (name := f"{stem}_{k}" if k else stem) not in taken)

    def _add(self, node: Node, i: int) -> str:
        self.nodes.append(node)
        self.var[node.name], self.node_of[i] = i, node.name
        return node.name

    def table(self) -> LayerTable:
        """The layer table (input shape channels-first)."""
        if len(self.out) != 1 or len(self.shape[self.out[0]]) < 2 or self.out[0] in self.src:
            raise TracingError(f"{self.name}.__call__ must return one array of logits, (n, classes) or a map's "
                               f"(n, *positions, classes)" + self.hint)
        if not self.nodes or self._name(self.out[0]) != self.nodes[-1].name:
            raise TracingError(f"{self.name}.__call__ must return the logits made by its last operation" + self.hint)
        x = self.shape[self.inputs[-1]]
        # the input as the first layers read it (a flat batch reshaped to images: x.reshape(n, h, w, c))
        reads: dict[tuple[int, ...], str] = {}
        for node in self.nodes:
            if node.inputs == ("<input>",) and node.name in self.calls:
                reads.setdefault(self.calls[node.name][1], node.name)
        x = input_layout(self.name, reads, self.hint) or x
        try:
            # the classes: the last axis (a dense prediction's map is channels-last, its channels the classes)
            return LayerTable(self.name, (x[-1], *x[1:-1]) if len(x) > 2 else x[1:], self.shape[self.out[0]][-1],
                              tuple(self.nodes), flax_sep="/")
        except Exception as exc:
            raise TracingError(f"the traced graph of {self.name} is not a valid layer table: {exc}" + self.hint
                               ) from None


def describe(module: nn.Module, variables: Any, x: Any) -> LayerTable:
    """The layer table of a user's flax module, traced on ``x`` (a channels-last batch; inference mode).

    Raises
    ------
    TracingError
        If the module cannot be run on ``x``, or an operation is one the table cannot express.
    """
    table = _Trace(module, variables, x).table()
    object.__setattr__(table, "config", {"architecture": None, "model": type(module).__qualname__, "width": 1.0,
                                         "num_classes": table.num_classes, "input_shape": table.input_shape,
                                         "traced": True, "framework": "flax"})
    return table


def taps(module: nn.Module, variables: Any, x: Any, points: tuple[str, ...]) -> dict[str, Any]:
    """The outputs of the table nodes ``points`` of ``module.apply(variables, x)``, channels-last (jit-friendly)."""
    t = _Trace(module, variables, x)
    env = {**t.const, **dict(zip(t.inputs, [*jax.tree_util.tree_leaves(variables), x], strict=True))}
    for prim, params, ins, outs, _ in t.ops:
        env.update(zip(outs, _bind(prim, params, [env[i] for i in ins]), strict=True))
    return {p: env[t.var[p]] for p in points}
