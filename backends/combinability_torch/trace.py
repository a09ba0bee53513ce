"""Tracing a user's ``torch.nn.Module`` into a layer table (:func:`describe`) and tapping its features.

:func:`torch.fx.symbolic_trace` gives the module's dataflow graph; each node becomes a
:class:`~combinability.layers.Node` (linear, conv, norms, activations, residual additions,
channel concatenations, products of branches, pooling, flatten); parametrised modules keep
their qualified name, so the table's parameter names are the module's ``state_dict`` names.
A node the table cannot express raises :class:`~combinability.errors.TracingError` naming it.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from combinability import model_outputs
from combinability.data.base import input_fault, integer_hint
from combinability.errors import ConfigurationError, ExampleInputError, NotALayerTableError, TracingError
from combinability.layer_nodes import TRACED_ELEMENTWISE
from combinability.layers import ACTIVATIONS, LayerTable, Node, input_layout
from combinability_torch.trace_norms import NORM_FUNCTIONS, function_norm, module_norm, norm_owner

__all__ = ["describe", "example_value", "feeding_logits", "reads_shape", "TapRunner", "table_names", "tensor_aliases"]

_ACT_MODULES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu",
                nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.Softplus: "softplus", nn.ReLU6: "relu6",
                nn.Hardtanh: "hardtanh", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Mish: "mish",
                nn.SELU: "selu", nn.CELU: "celu", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink",
                nn.LogSigmoid: "logsigmoid"}
_KEEP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_ACT_FUNCTIONS = {getattr(F, n): n for n in ACTIVATIONS} | {torch.relu: "relu", torch.tanh: "tanh",
                                                              torch.sigmoid: "sigmoid"}
_ADD = {operator.add, operator.iadd, torch.add}
_SCALE = {operator.mul, operator.truediv, operator.imul, operator.itruediv, torch.mul}
#: Functions of each value alone that the table does not name (``x.clamp(min=0)``, ``torch.erf`` in a GELU
#: written out, ``x ** 2``): an ``act`` node of :data:`~combinability.layer_nodes.TRACED_ELEMENTWISE`.
_UNARY_NAMES = ("erf", "erfc", "exp", "exp2", "expm1", "log", "log1p", "log2", "sin", "cos", "abs", "sqrt", "rsqrt",
                "square", "pow", "clamp", "clamp_min", "clamp_max", "clip", "reciprocal", "sign", "sinh", "cosh",
                "atan", "asinh", "arctan", "floor", "ceil", "round", "trunc", "frac", "nan_to_num")
_UNARY = {getattr(torch, n) for n in _UNARY_NAMES if hasattr(torch, n)} | set(_UNARY_NAMES) | \
    {operator.pow, F.threshold, F.hardshrink, F.softshrink}
#: With one traced tensor, a constant shift of each value (``x - 0.5``, ``1 - x``, ``-x``).
_SHIFT = {operator.sub, operator.isub, torch.sub, operator.neg, torch.neg}
_KEEP_METHODS = {"contiguous", "clone", "detach", "float"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MUL = {operator.mul, operator.imul, torch.mul, "mul"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_FUNCTIONS = {F.max_pool1d: "", F.max_pool2d: "", F.max_pool3d: "", F.avg_pool1d: "avg", F.avg_pool2d: "avg",
                   F.avg_pool3d: "avg"}
_ADAPTIVE_AVG = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INTERPOLATE = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
#: torch's interpolation modes as an upsample node's: linear on every axis is one mode.
_RESIZE_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "linear", "bilinear": "linear",
                 "trilinear": "linear"}
#: Reshapes that turn a vector ``(n, c)`` into ``(n, c, 1, 1)`` (or on the way there), and broadcasts of that.
_VIEWS = {"reshape", "view", "unsqueeze", "squeeze", "flatten", torch.reshape, torch.unsqueeze, torch.squeeze}
_TO_IMAGE = {"view", "reshape", "unsqueeze", torch.reshape, torch.unsqueeze, operator.getitem, "expand",
             "expand_as"}


def _hint(model: nn.Module) -> str:
    return (f"; pass spec= (a combinability.PermutationSpec) by hand to cb.ModelPair for this "
            f"{type(model).__name__}")


def computed_weights(model: nn.Module) -> tuple[str, nn.Module, list[str], bool] | None:
    """The first module of ``model`` whose tensors are computed from others: ``(path, module, names,
    hooked)``, ``hooked`` for torch's older ``weight_norm`` / ``spectral_norm`` hooks (a forward
    pre-hook) rather than a parametrization (``torch.nn.utils.parametrizations``); None if none is."""
    from torch.nn.utils import parametrize

    for path, m in model.named_modules():
        hooked = [h.name for h in m._forward_pre_hooks.values() if type(h).__name__ in ("WeightNorm", "SpectralNorm")]
        computed = hooked or (list(m.parametrizations) if parametrize.is_parametrized(m) else [])
        if computed:
            return path, m, computed, bool(hooked)
    return None


def without_weight_norm(model: nn.Module) -> tuple[nn.Module, dict[str, list[tuple[str, tuple[int | None, ...]]]]]:
    """A copy of ``model`` with each weight norm (``torch.nn.utils.parametrizations.weight_norm``) removed, its
    weight held as computed (the same function), and for each such weight the tensors the model stores it as:
    ``{"c1.weight": [("c1.parametrizations.weight.original0", along), ("c1.parametrizations.weight.original1",
    (0, 1, ...))]}``, ``along`` naming for each axis of the gains ``g`` the weight's axis it runs along (the
    norm's ``dim``; None for its size-1 axes) (:meth:`combinability.PermutationSpec.stored_as`).

    ``({}, model)``-like results: the copy and an empty mapping when the model has no weight norm. Other
    parametrizations and the older hooks are refused (:func:`refuse_computed_weights`).
    """
    from torch.nn.utils import parametrize

    found = computed_weights(model)
    if found is None:
        return model, {}
    norms = [(path, m, name) for path, m in model.named_modules() if parametrize.is_parametrized(m)
             for name in m.parametrizations]
    if found[3] or any(len(m.parametrizations[name]) != 1 or type(m.parametrizations[name][0]).__name__ != "_WeightNorm"
                       for _, m, name in norms):
        refuse_computed_weights(model)
    plain = copy.deepcopy(model)
    parts: dict[str, list[tuple[str, tuple[int | None, ...]]]] = {}
    for path, m, name in norms:
        stored = m.parametrizations[name]
        g, v, dim = stored.original0, stored.original1, stored[0].dim
        prefix = f"{path}.parametrizations.{name}" if path else f"parametrizations.{name}"
        along = () if g.dim() == 0 else tuple(i if i == dim % v.dim() else None for i in range(g.dim()))
        parts[f"{path}.{name}" if path else name] = [(f"{prefix}.original0", along),
                                                     (f"{prefix}.original1", tuple(range(v.dim())))]
    # the copy's modules made plain by hand: torch's remove_parametrizations deletes the property from the
    # parametrized class, which the copy shares with the model
    for path in dict.fromkeys(path for path, _, _ in norms):
        m, sub = model.get_submodule(path), plain.get_submodule(path)
        with torch.no_grad():
            values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
        del sub._modules["parametrizations"]
        sub.__class__ = type(m).__bases__[0]
        for name, value in values.items():
            sub.register_parameter(name, nn.Parameter(value))
    return plain, parts


def refuse_computed_weights(model: nn.Module) -> None:
    """Refuse a module whose tensors are computed from others (a parametrization such as
    ``torch.nn.utils.parametrizations.weight_norm``, or the older ``weight_norm`` and
    ``spectral_norm`` hooks): the tracers bind a layer's own ``weight``, which such a model
    does not hold as a parameter.

    Raises
    ------
    TracingError
        Naming the first such module, its computed tensors and what it holds instead.
    """
    found = computed_weights(model)
    if found is None:
        return
    path, m, computed, hooked = found
    where = f"module {path!r} ({type(m).__name__})" if path else type(model).__name__
    held = ", ".join(f"{path}.{name}" if path else name for name, _ in m.named_parameters())
    remedy = ("torch.nn.utils.remove_weight_norm(module) (or remove_spectral_norm). torch cannot copy a module "
              "with this deprecated hook, so a spec by hand does not help" if hooked else
              "torch.nn.utils.parametrize.remove_parametrizations(module, name); or pass spec= by hand naming "
              f"those tensors to cb.ModelPair for this {type(model).__name__}")
    raise TracingError(f"{where} computes its {', '.join(computed)} from other tensors ({held}): a "
                       f"parametrization (weight_norm, spectral_norm, ...) the tracers do not follow. Remove it "
                       f"first, which keeps the function: {remedy}")


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, failing with :class:`TracingError` that says why."""
    held = other_arguments(model)  # refuses a forward that needs more than its input
    refuse_computed_weights(model)
    before = {id(m): dict(vars(m)) for m in model.modules()}
    try:  # the other arguments at their defaults, as the library calls model(x): ``targets=None`` takes its branch
        gm = fx.symbolic_trace(model, concrete_args=held or None)
    except Exception as exc:
        raise TracingError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0]}){_hint(model)}") from None
    finally:
        assigned = _undo_assignments(model, before)
    if assigned:
        raise TracingError(f"{type(model).__name__}.forward assigns {', '.join(assigned)} (a module attribute set "
                           f"from traced values, as openai/CLIP's self.attn_mask = self.attn_mask.to(...)), which "
                           f"torch.fx cannot record; keep the value in a local variable{_hint(model)}")
    return gm


def _undo_assignments(model: nn.Module, before: dict[int, dict[str, Any]]) -> list[str]:
    """Put back the module attributes that tracing ``forward`` set to traced values; return their names."""
    assigned = []
    for path, m in model.named_modules():
        for key, value in list(vars(m).items()):
            if isinstance(value, fx.Proxy):
                assigned.append(f"{path}.{key}" if path else f"self.{key}")
                if key in before.get(id(m), {}):
                    object.__setattr__(m, key, before[id(m)][key])
                else:
                    delattr(m, key)
    return assigned


def reads_shape(n: fx.Node) -> bool:
    """Whether ``n`` reads only a tensor's size, shape, type or device (``x.size()``, ``x.shape``,
    ``torch.is_floating_point(x)``)."""
    return (n.op == "call_method" and n.target in ("size", "dim", "is_floating_point")) or (
        n.op == "call_function" and n.target is torch.is_floating_point) or (
        n.op == "call_function" and n.target is getattr and len(n.args) > 1
        and n.args[1] in ("shape", "dtype", "device"))


def table_names(gm: fx.GraphModule) -> dict[str, str]:
    """fx node name -> table node name: a parametrised module's qualified name (or, for an operation
    on parameters read directly, ``F.layer_norm(x, shape, self.weight, self.bias)`` or a layer scale
    ``self.gamma * x``, their module's), else the fx name."""
    names: dict[str, str] = {}
    for n in gm.graph.nodes:
        owner = _param_owner(n)
        if n.op == "call_module" and _holds_state(gm.get_submodule(n.target)):
            names[n.name] = str(n.target)
        elif owner is not None and owner[0] and owner[0] not in names.values():
            names[n.name] = owner[0]
        elif owner is not None and n.target in _MUL | _ADD | {"add"}:  # another of its module's (Fixup's), a root's
            names[n.name] = ".".join(p for p in owner if p)
        elif n.op not in ("placeholder", "output", "get_attr"):
            names[n.name] = n.name
    return names


def _holds_state(m: nn.Module) -> bool:
    """Whether module ``m`` itself holds parameters or saved buffers (a BatchNorm without affine parameters
    keeps its running statistics)."""
    return any(True for _ in m.parameters(recurse=False)) or \
        any(k not in m._non_persistent_buffers_set for k in m._buffers)


def attribute_of(n: Any) -> str | None:
    """The parameter a node is, or is a view of (``self.gamma.reshape(1, -1, 1, 1)``); None otherwise."""
    while isinstance(n, fx.Node) and n.op != "get_attr":
        if not (n.op == "call_method" and n.target in _VIEWS or n.op == "call_function" and n.target in _VIEWS):
            return None
        n = n.args[0]
    return str(n.target) if isinstance(n, fx.Node) else None


#: Layers written as functions of parameters read directly (an ``nn.Conv2d`` subclass padding by hand
#: before ``F.conv2d(x, self.weight, self.bias, ...)``: timm's ``Conv2dSame``, EfficientNet-PyTorch's).
_LAYER_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, F.linear: 0}


def _param_owner(n: fx.Node) -> tuple[str, str] | None:
    """``(module path, leaf)`` of the parameter that a normalisation function (``F.layer_norm``'s weight,
    ``F.batch_norm``'s), a layer function or a product with a parameter (a layer scale) reads directly; None
    for other nodes."""
    if n.op == "call_function" and n.target in NORM_FUNCTIONS:  # its weight (or running_mean)
        return norm_owner(n, attribute_of)
    if n.op == "call_function" and n.target in _LAYER_FUNCTIONS:  # F.conv2d(x, self.weight, self.bias, ...)
        target = attribute_of(n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"))
    elif n.op in ("call_function", "call_method") and n.target in _MUL | _ADD | {"add"} and len(n.args) == 2:
        targets = [t for t in map(attribute_of, n.args) if t is not None]
        target = targets[0] if len(targets) == 1 else None
    else:
        return None
    if target is None:
        return None
    path, _, leaf = target.rpartition(".")
    return path, leaf


def _shape(n: Any) -> tuple[int, ...] | None:
    meta = getattr(n, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


#: Arithmetic on sizes worked out from the example (TF-style "same" padding: ``math.ceil(ih / s)``).
_SIZE_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, operator.pow, math.ceil, math.floor, max, min, abs, int)


def example_value(value: Any) -> Any:
    """``value`` as it was on the example: a number, or a traced size (``x.shape[2]``, ``x.size(-1)``)
    and integer arithmetic on sizes (U-Net's ``diff // 2``) worked out from the recorded shapes;
    None where it is anything else."""
    if isinstance(value, tuple | list):
        items = [example_value(v) for v in value]
        return None if any(v is None for v in items) else type(value)(items)
    if not isinstance(value, fx.Node):
        return value
    if value.op == "call_method" and value.target == "size" and value.args:  # a tensor's sizes
        shape, dim = _shape(value.args[0]), example_value(value.args[1]) if len(value.args) > 1 else None
        return None if shape is None else shape if len(value.args) == 1 else None if dim is None else shape[dim]
    if value.op == "call_function" and value.target is getattr and value.args[1:] == ("shape",):
        return _shape(value.args[0])
    args = [example_value(a) for a in value.args]
    if any(a is None for a in args):
        return None
    if value.op == "call_function" and value.target is operator.getitem and isinstance(args[0], tuple):
        return args[0][args[1]]
    if value.op == "call_function" and value.target in _SIZE_ARITHMETIC and \
            all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        return value.target(*args)
    return None


def _first_size(value: Any, where: str, model: nn.Module) -> int | None:
    """A pooling argument as one int (the first of a tuple; None stays None), sizes read from the example.

    A size may be a traced tensor's (``F.avg_pool1d(x, x.shape[-1])``, a global pool written
    with the input's length): the traced table is the example's, so it takes the example's value
    (:func:`example_value`).
    """
    if isinstance(value, tuple | list):
        value = value[0] if value else None
    if value is None or isinstance(value, int):
        return value
    size = example_value(value)
    if isinstance(size, int):
        return size
    raise TracingError(f"{where}: a pooling size the tracer cannot read ({value!r}); give it as a number or as "
                       f"a traced tensor's size (x.shape[-1], x.size(2))" + _hint(model))


_PAD_MODULES = {nn.ZeroPad1d: "zeros", nn.ZeroPad2d: "zeros", nn.ZeroPad3d: "zeros", nn.ConstantPad1d: "zeros",
                nn.ConstantPad2d: "zeros", nn.ConstantPad3d: "zeros", nn.ReflectionPad1d: "reflect",
                nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
                nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate", nn.CircularPad1d: "circular",
                nn.CircularPad2d: "circular", nn.CircularPad3d: "circular"}
#: ``F.pad``'s modes as a pad node's ``padding_mode``.
_PAD_FUNCTION_MODES = {"constant": "zeros", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _article(word: str) -> str:
    """``word`` with its indefinite article (an InstanceNorm2d, a Mish)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _pad_node(name: str, ins: tuple[str, ...], widths: Any, mode: str, value: Any, shape_in: tuple[int, ...] | None,
              where: str, model: nn.Module) -> Node:
    """The pad node of ``F.pad(x, widths, mode, value)`` (or a padding module) on a channels-first map.

    ``widths`` is in ``F.pad``'s order, ``(left, right, top, bottom, ...)``: the last axis first.
    """
    widths = tuple(widths) if isinstance(widths, tuple | list) else (widths,) * 2
    mode = _PAD_FUNCTION_MODES.get(mode, mode)
    spatial = len(shape_in) - 2 if shape_in is not None else 0
    if mode not in ("zeros", "reflect", "replicate", "circular") or (mode == "zeros" and value not in (None, 0)):
        raise TracingError(f"{where}: padding with mode {mode!r}" + (f" and value {value!r}" if value else "") +
                           "; the tracer follows zeros, reflect, replicate and circular paddings" + _hint(model))
    if not all(isinstance(v, int) for v in widths):
        raise TracingError(f"{where}: padding widths {widths} the tracer cannot work out from the example's sizes "
                           "(it follows numbers, sizes and +, -, *, /, //, %, ceil, floor, max, min of them)"
                           + _hint(model))
    channels = (0, 0)
    if len(widths) // 2 == spatial + 1 and mode == "zeros" and not len(widths) % 2:
        widths, channels = widths[:-2], tuple(widths[-2:])  # zero channels around the input's (option-A shortcut)
    if len(widths) % 2 or not 0 <= len(widths) // 2 <= spatial or not all(v >= 0 for v in channels) or \
            not (widths or any(channels)) or (mode != "zeros" and not all(v >= 0 for v in widths)):
        raise TracingError(f"{where}: padding {widths} of a map of shape {shape_in}; the tracer follows paddings "
                           "of its spatial axes by whole positions (ints >= 0; negative ones crop, with zeros), zero "
                           "channels before and after its channels" + _hint(model))
    pairs = [tuple(widths[i:i + 2]) for i in range(0, len(widths), 2)][::-1]  # first spatial axis first
    pairs = [(0, 0)] * (spatial - len(pairs)) + pairs
    return Node(name, "pad", ins, padding=tuple(pairs), padding_mode=mode, channel_padding=channels)


def _conv_padding(m: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[tuple[int, int], ...]:
    """A convolution's padding as one ``(before, after)`` pair per spatial axis (``((top, bottom), (left, right))``).

    ``padding="same"`` pads ``dilation x (kernel - 1)`` in all on an axis, the smaller half
    first (torch's split); ``"valid"`` pads nothing.
    """
    if m.padding == "valid":
        return tuple((0, 0) for _ in m.kernel_size)
    if m.padding == "same":
        totals = (d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True))
        return tuple((t // 2, t - t // 2) for t in totals)  # type: ignore[return-value]
    return tuple((int(p), int(p)) for p in m.padding)  # type: ignore[return-value]


def _node(n: fx.Node, gm: fx.GraphModule, name: str, ins: tuple[str, ...], model: nn.Module,
          last: bool = False) -> Node | tuple[Node, ...] | None:
    """The table node of one fx node (or nodes, each reading the one before); None for a node that passes its
    input on unchanged.

    ``last``: the node reads a channels-last map (``(n, h, w, c)``, after a ``permute``), on
    which linear layers and LayerNorm act on the channels of each position.
    """
    where = f"node {n.name!r} ({n.op} {n.target!r})"
    shape_in = _shape(n.args[0]) if n.args else None
    if last:
        return _channels_last_node(n, gm, name, ins, model, where)
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Linear):
            if shape_in is not None and len(shape_in) > 2:
                raise TracingError(f"{where}: a Linear on a channels-first map ({tuple(shape_in)}) mixes the "
                                   "positions of its last axis; on the channels it reads a channels-last map "
                                   "(x.permute(0, 2, 3, 1))" + _hint(model))
            return Node(name, "dense", ins, units=m.out_features, bias=m.bias is not None)
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return Node(name, "conv", ins, units=m.out_channels, kernel=tuple(m.kernel_size), stride=tuple(m.stride),
                        padding=_conv_padding(m), dilation=tuple(m.dilation), groups=m.groups,
                        bias=m.bias is not None, padding_mode=m.padding_mode)
        if isinstance(m, _CONV_TRANSPOSE_MODULES):
            return _conv_transpose_node(n, m, name, ins, model, where)
        if isinstance(m, nn.Upsample):
            return _upsample_node(n, name, ins, m.mode, m.align_corners, False, model, where)
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            if not m.track_running_stats:
                raise TracingError(f"{where}: a BatchNorm without running statistics (track_running_stats=False) "
                                   "normalises every batch by its own statistics, even in eval mode; the tracer "
                                   "follows track_running_stats=True" + _hint(model))
            return Node(name, "norm", ins, norm="batchnorm", eps=m.eps, affine=m.affine)
        if isinstance(m, nn.GroupNorm):
            return Node(name, "norm", ins, norm="groupnorm", groups=m.num_groups, eps=m.eps, affine=m.affine)
        if isinstance(m, nn.PReLU):
            return Node(name, "prelu", ins, units=m.num_parameters)
        if isinstance(m, nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d):
            if m.track_running_stats:
                raise TracingError(f"{where}: an InstanceNorm with running statistics (track_running_stats=True) "
                                   "normalises by them in eval mode, which the tracer does not express; it follows "
                                   "the default, statistics of each example" + _hint(model))
            # each channel of each example normalised over its positions: GroupNorm with a group per channel
            return Node(name, "norm", ins, norm="groupnorm", groups=m.num_features, eps=m.eps, affine=m.affine)
        norm = module_norm(m, name, ins, shape_in, False, where, _hint(model))  # LayerNorm, RMSNorm of any shape
        if norm is not None:
            return norm
        act = _activation_node(m, name, ins)
        if act is not None or isinstance(m, _KEEP_MODULES):
            return act
        if isinstance(m, nn.Flatten):
            return Node(name, "flatten", ins)
        if isinstance(m, nn.Embedding | nn.EmbeddingBag):
            raise NotALayerTableError(f"{where}: an {type(m).__name__} reads token ids, which layer tables do not "
                                      "model" + _hint(model))
        if type(m) in _PAD_MODULES:
            return _pad_node(name, ins, m.padding, _PAD_MODULES[type(m)], getattr(m, "value", 0), shape_in, where,
                             model)
        if isinstance(m, nn.modules.pooling._AdaptiveAvgPoolNd | nn.modules.pooling._AdaptiveMaxPoolNd):
            fn = "max" if isinstance(m, nn.modules.pooling._AdaptiveMaxPoolNd) else ""
            return _adaptive_pool_node(name, ins, _shape(n), fn, fn == "max" and m.return_indices, where, model)
        if isinstance(m, _POOL_MODULES):
            k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride or m.kernel_size,
                                                                   m.padding))
            return Node(name, "maxpool", ins, kernel=k, stride=s, padding=p,
                        fn="avg" if isinstance(m, _AVG_POOL_MODULES) else "")
        raise TracingError(f"{where}: the tracer cannot follow {_article(type(m).__name__)} module" + _hint(model))
    tensors: list[fx.Node] = []
    fx.node.map_arg(n.args, tensors.append)
    target = n.target
    if n.op == "call_function" and target in _ADD and len(tensors) >= 2:
        return Node(name, "add", ins)
    if n.op in ("call_function", "call_method") and target in _MUL and len(ins) == 2:
        return Node(name, "mul", ins)  # a gate (squeeze-and-excitation, gated units): its factors move together
    if n.op == "call_function" and target in _CAT:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
        out = _shape(n)
        if out is None or len(out) not in (2, 3, 4, 5) or dim % len(out) != 1:
            raise TracingError(f"{where}: only concatenations along the channel axis (dim 1) of images or "
                               f"vectors are followed (got dim {dim} of an output of shape {out})" + _hint(model))
        if len(ins) < 2:  # torch.cat of one tensor: that tensor
            return None
        return Node(name, "concat", ins)
    if n.op == "call_function" and target in NORM_FUNCTIONS:  # without parameters (F.layer_norm(x, x.shape[1:]))
        return _norm_function(n, gm, name, ins, False, where, model)
    known, node = _elementwise_function(n, name, ins, tensors)
    if known:
        return node
    out = _shape(n)
    rank = len(shape_in) if shape_in is not None else 0
    if target in (torch.mean, "mean", torch.amax, "amax", torch.max, "max") and len(tensors) == 1 and rank >= 2 and \
            _reduced_axes(n, rank) == {1} and (n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)):
        # the mean or maximum over the channels at each position (CBAM's spatial attention), kept as one channel
        return Node(name, "channel_reduce", ins, fn="mean" if target in (torch.mean, "mean") else "max")
    if target in (torch.max, "max") and len(tensors) == 1 and rank >= 3 and \
            _reduced_axes(n, rank) == set(range(2, rank)):  # (values, indices) over every position
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        return Node(name, "avgpool", ins, keepdims=bool(keep), fn="max")
    if target in _SPLITS and len(tensors) == 1:
        if _split_ranges(n) is None:
            raise TracingError(f"{where}: a split the tracer follows cuts the channels (dim 1) into parts of sizes it "
                               f"can read" + _hint(model))
        return None  # the parts: each picked by an index (a slice node)
    source = n.args[0] if n.args else None
    if target is operator.getitem and isinstance(source, fx.Node) and source.target in _SPLITS:
        ranges = _split_ranges(source)
        return Node(name, "slice", ins, channel_range=ranges[n.args[1]])
    if target is operator.getitem and shape_in is not None and _keeps_everything(n.args[1], shape_in):
        return None  # x[:, :c] of c channels (GhostNet's slice when its channels come out even): x itself
    if target is operator.getitem and shape_in is not None and len(shape_in) >= 2:
        channels = _channel_slice(n.args[1], shape_in)
        if channels is not None:  # x[:, a:b]: some of the channels
            return Node(name, "slice", ins, channel_range=channels)
    if target is operator.getitem and shape_in is not None and len(shape_in) >= 3:
        step = _subsampling_step(n.args[1], len(shape_in))
        if step is not None:  # x[:, :, ::2, ::2]: every step-th position, from the first (the option-A shortcut)
            return Node(name, "maxpool", ins, kernel=1, stride=step)
    if target is operator.getitem and shape_in is not None and len(shape_in) >= 3:
        crop = _position_crop(n.args[1], shape_in)
        if crop is not None:  # x[:, :, :-k] (a TCN's Chomp1d), x[:, :, a:b, c:d], x[:, :, -1] (the last step)
            widths, indexed = crop
            node = Node(name, "pad", ins, padding=widths)
            return (node, Node(f"{name}_squeeze", "flatten", (name,))) if indexed else node
    source = n.args[0] if n.args else None
    if isinstance(source, fx.Node) and source.target in (torch.max, "max") and len(n.args) > 1 and (
            (target is operator.getitem and n.args[1] in (0, 1)) or (target is getattr
                                                                   and n.args[1] in ("values", "indices"))):
        if n.args[1] in (0, "values"):
            return None  # the maxima: the pooled map itself
        raise TracingError(f"{where}: the positions of the maxima (indices) feed the logits; the tracer follows "
                           "their values" + _hint(model))
    if target in (torch.flatten, "flatten", "view", "reshape", "squeeze") and out is not None and len(out) == 2:
        return Node(name, "flatten", ins)
    if target in _TO_IMAGE and out is not None and shape_in is not None and len(shape_in) in (2, 3, 4, 5) \
            and len(out) in (3, 4, 5) and out[:2] == shape_in[:2] and set(shape_in[2:]) <= {1} \
            and (set(out[2:]) <= {1} or target in ("expand", "expand_as")):
        return None  # a vector as (n, c, 1, 1): the table keeps the vector, which a product broadcasts
    if (target in (torch.mean, "mean") and out is not None and shape_in is not None and len(shape_in) >= 3
            and out[:2] == shape_in[:2] and len(out) in (2, len(shape_in)) and set(out[2:]) <= {1}
            and _reduced_axes(n, len(shape_in)) in (None, set(range(2, len(shape_in))))):
        return Node(name, "avgpool", ins, keepdims=len(out) > 2)  # the mean over every position
    if (target in (torch.amax, "amax") and out is not None and shape_in is not None and len(shape_in) >= 3
            and out[:2] == shape_in[:2] and len(out) in (2, len(shape_in)) and set(out[2:]) <= {1}
            and _reduced_axes(n, len(shape_in)) == set(range(2, len(shape_in)))):
        return Node(name, "avgpool", ins, keepdims=len(out) > 2, fn="max")  # the maximum over every position
    if target in _ADAPTIVE_AVG | _ADAPTIVE_MAX:
        args = {**dict(zip(("input", "output_size", "return_indices"), n.args, strict=False)), **n.kwargs}
        fn = "max" if target in _ADAPTIVE_MAX else ""
        return _adaptive_pool_node(name, ins, out, fn, bool(args.get("return_indices")), where, model)
    if target in _INTERPOLATE:
        args = {**dict(zip(("input", "size", "scale_factor", "mode", "align_corners"), n.args, strict=False)),
                **n.kwargs}
        mode = {F.upsample_nearest: "nearest", F.upsample_bilinear: "bilinear"}.get(target, args.get("mode", "nearest"))
        corners = True if target is F.upsample_bilinear else args.get("align_corners")
        return _upsample_node(n, name, ins, mode, corners, bool(args.get("antialias")), model, where)
    if target is F.pad:
        args = {**dict(zip(("input", "pad", "mode", "value"), n.args, strict=False)), **n.kwargs}
        widths = example_value(args.get("pad"))  # sizes worked out from the example's shapes
        return _pad_node(name, ins, args.get("pad") if widths is None else widths, args.get("mode", "constant"),
                         args.get("value"), shape_in, where, model)
    if target in _POOL_FUNCTIONS:
        args = {**dict(zip(("input", "kernel_size", "stride", "padding"), n.args, strict=False)), **n.kwargs}
        k, s, p = (_first_size(args.get(key), where, model) for key in ("kernel_size", "stride", "padding"))
        return Node(name, "maxpool", ins, kernel=k, stride=s or k, padding=p or 0, fn=_POOL_FUNCTIONS[target])
    if target in ("view", "reshape", torch.reshape) and out is not None and shape_in is not None and \
            len(out) == len(shape_in) + 1 and len(shape_in) >= 3 and out[0] == shape_in[0] and \
            out[1] * out[2] == shape_in[1] and out[3:] == shape_in[2:]:
        raise TracingError(f"{where}: the channels viewed as ({out[1]}, {out[2]}) groups, as ShuffleNet's channel "
                           f"shuffle does before it transposes them: a shuffle interleaves the channels of its groups, "
                           f"which the layer table does not express (the channel permutations then differ on each "
                           f"side of it)" + _hint(model))
    raise TracingError(f"{where}: the tracer cannot follow this operation (it follows linear, conv, transposed conv, "
                       "BatchNorm, LayerNorm, GroupNorm, InstanceNorm, element-wise activations, PReLU, residual "
                       "additions, channel concatenations, slices, chunks and splits of the channels, products of "
                       "branches (gates), pooling, padding, upsampling and flatten)"
                       + _hint(model))


def _adaptive_pool_node(name: str, ins: tuple[str, ...], out: tuple[int, ...] | None, fn: str, indices: bool,
                        where: str, model: nn.Module) -> Node:
    """The node of adaptive average (``fn=""``) or max (``fn="max"``) pooling of a channels-first map to the
    traced output's size: to one position (global pooling, kept as a 1 x 1 map) or to a smaller map."""
    if indices:
        raise TracingError(f"{where}: max pooling that returns its indices (return_indices=True) gives a pair; the "
                           "tracer follows the pooled map alone" + _hint(model))
    if out is None or len(out) < 3:
        raise TracingError(f"{where}: adaptive pooling of a map of shape {out}; the tracer follows it on "
                           "channels-first maps (n, c, *positions)" + _hint(model))
    if set(out[2:]) == {1}:
        return Node(name, "avgpool", ins, keepdims=True, fn=fn)
    return Node(name, "avgpool", ins, output_size=tuple(int(v) for v in out[2:]), fn=fn)


_SPLITS = {"chunk", "split", torch.chunk, torch.split}


def _split_ranges(n: fx.Node) -> list[tuple[int, int]] | None:
    """The channel ranges of the parts of ``x.chunk(k, dim=1)`` or ``x.split(size or sizes, dim=1)`` (torch's
    sizes: chunks of ``ceil(c / k)``); None when it splits another axis or its sizes cannot be read."""
    shape = _shape(n.args[0])
    size_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("chunks", n.kwargs.get("split_size_or_sections",
                                                                                        n.kwargs.get("split_size")))
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    size_arg = example_value(size_arg)
    if shape is None or len(shape) < 2 or not isinstance(dim, int) or dim % len(shape) != 1 or size_arg is None:
        return None
    c = shape[1]
    if n.target in ("chunk", torch.chunk):
        if not isinstance(size_arg, int) or size_arg < 1:
            return None
        step = -(-c // size_arg)
        sizes = [step] * (c // step) + ([c % step] if c % step else [])
    elif isinstance(size_arg, int):
        sizes = [size_arg] * (c // size_arg) + ([c % size_arg] if c % size_arg else [])
    else:
        sizes = list(size_arg)
    if sum(sizes) != c or not all(isinstance(v, int) and v > 0 for v in sizes):
        return None
    stops = list(itertools.accumulate(sizes))
    return list(zip([0, *stops[:-1]], stops, strict=True))


def _full_index(index: Any, rank: int) -> tuple[Any, ...] | None:
    """A getitem's index on a tensor of ``rank`` axes as one entry per axis (``...`` and the axes left out
    written as whole slices); None for an index that is not a tuple or names more axes."""
    if not isinstance(index, tuple):
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (rank - len(index) + 1) + index[k + 1:]
    index = index + (slice(None),) * (rank - len(index))
    return index if len(index) == rank else None


def _keeps_everything(index: Any, shape: tuple[int, ...]) -> bool:
    """Whether an index keeps every entry of a tensor of ``shape`` in place (``x[:, :c]`` of ``c`` channels)."""
    index = _full_index(index if isinstance(index, tuple) else (index,), len(shape))
    return index is not None and all(
        isinstance(i, slice) and all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step))
        and i.indices(d) == (0, d, 1) for i, d in zip(index, shape, strict=True))


def _channel_slice(index: Any, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The channels ``(start, stop)`` of an index that keeps every example and position and a contiguous range
    of the channels (``x[:, :c]``, ``x[:, c:]``, ``x[:, a:b, ...]``); None for any other index."""
    if not isinstance(index, tuple) or len(index) < 2:
        return None
    index = _full_index(index, len(shape))
    if index is None or not all(isinstance(i, slice) for i in index):
        return None
    if any(i != slice(None) for k, i in enumerate(index) if k != 1) or index[1].step not in (None, 1):
        return None
    start, stop, _ = index[1].indices(shape[1])
    return (start, stop) if 0 <= start < stop and (start, stop) != (0, shape[1]) else None


def _subsampling_step(index: Any, rank: int) -> int | None:
    """The step ``s`` of an index that keeps every example and channel and every ``s``-th position of each spatial
    axis from the first (``[:, :, ::2, ::2]``, ``[..., ::2, ::2]``); None for any other index."""
    index = _full_index(index, rank)
    if index is None or not all(isinstance(i, slice) for i in index):
        return None
    if any(i.start not in (None, 0) or i.stop is not None for i in index):
        return None
    steps = {i.step or 1 for i in index[2:]}
    if any((i.step or 1) != 1 for i in index[:2]) or len(steps) != 1:
        return None
    step = steps.pop()
    return step if isinstance(step, int) and step > 1 else None


def _position_crop(index: Any, shape: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], bool] | None:
    """The crop of an index that keeps every example and channel and, on each spatial axis, a contiguous range of
    positions (``x[:, :, :-k]``, ``x[:, :, a:b, c:d]``) or one position (``x[:, :, -1]``, on every spatial axis):
    ``(-before, -after)`` positions per spatial axis (a zero pad's negative widths), and whether the index drops
    the spatial axes (the result is a vector); None for any other index, or one that keeps every position.

    Slice bounds may be traced sizes (``x[:, :, : x.size(2) - k]``), read from the example."""
    index = _full_index(index, len(shape))
    if index is None or any(i != slice(None) for i in index[:2]):
        return None
    widths: list[tuple[int, int]] = []
    dropped: list[bool] = []
    for i, size in zip(index[2:], shape[2:], strict=True):
        if isinstance(i, slice):
            bounds = [None if v is None else example_value(v) for v in (i.start, i.stop, i.step)]
            if any(v is not None and not isinstance(v, int) for v in bounds) or bounds[2] not in (None, 1):
                return None
            start, stop, _ = slice(bounds[0], bounds[1]).indices(size)
            if stop <= start:
                return None
            widths.append((-start, stop - size))
            dropped.append(False)
        else:
            at = example_value(i)
            if not isinstance(at, int) or isinstance(at, bool) or not -size <= at < size:
                return None
            at %= size
            widths.append((-at, at + 1 - size))
            dropped.append(True)
    if any(dropped) and not all(dropped):
        return None  # drops some spatial axes, keeps others: no table node reshapes a map so
    if not any(dropped) and all(w == (0, 0) for w in widths):
        return None
    return tuple(widths), all(dropped)


def _conv_transpose_node(n: fx.Node, m: nn.Module, name: str, ins: tuple[str, ...], model: nn.Module,
                         where: str) -> Node:
    """The node of a ``ConvTranspose{1,2,3}d``; its ``output_padding`` read off the traced output, which
    also covers a call given ``output_size``."""
    if m.groups != 1 or m.padding_mode != "zeros":
        raise TracingError(f"{where}: the tracer follows transposed convolutions with groups=1 and zero padding "
                           f"(got groups={m.groups}, padding_mode={m.padding_mode!r})" + _hint(model))
    node = Node(name, "conv_transpose", ins, units=m.out_channels, kernel=tuple(m.kernel_size), stride=tuple(m.stride),
                padding=tuple((int(p), int(p)) for p in m.padding), dilation=tuple(m.dilation), bias=m.bias is not None)
    shape_in, out = _shape(n.args[0]), _shape(n)
    if shape_in is None or out is None:
        raise TracingError(f"{where}: the shapes of a transposed convolution were not recorded" + _hint(model))
    planned = node.conv_geometry().transposed_output(tuple(shape_in[2:]), (0,) * len(m.kernel_size))
    return Node(**{**node.__dict__, "output_padding": tuple(o - p for o, p in zip(out[2:], planned, strict=True))})


def _upsample_node(n: fx.Node, name: str, ins: tuple[str, ...], mode: str, align_corners: bool | None,
                   antialias: bool, model: nn.Module, where: str) -> Node:
    """The node of ``nn.Upsample`` or ``F.interpolate``: each channel resized to the traced output's size."""
    out = _shape(n)
    if mode not in _RESIZE_MODES or antialias or out is None or len(out) < 3:
        raise TracingError(f"{where}: the tracer follows resizing of feature maps in the modes "
                           f"{', '.join(_RESIZE_MODES)} without antialias (got mode {mode!r}"
                           f"{', antialias' if antialias else ''})" + _hint(model))
    linear = _RESIZE_MODES[mode] == "linear"
    return Node(name, "upsample", ins, fn=_RESIZE_MODES[mode], output_size=tuple(int(v) for v in out[2:]),
                align_corners=bool(align_corners) and linear)


def _activation_node(m: nn.Module, name: str, ins: tuple[str, ...]) -> Node | None:
    """The node of an element-wise activation module (``nn.ReLU``, ``nn.GELU`` ...); None for another module."""
    fn = next((fn for cls, fn in _ACT_MODULES.items() if type(m) is cls), None)
    if fn is None:
        return None
    return Node(name, "relu", ins) if fn == "relu" else Node(name, "act", ins, fn=fn)


def _elementwise_function(n: fx.Node, name: str, ins: tuple[str, ...],
                          tensors: list[fx.Node]) -> tuple[bool, Node | None]:
    """``(True, node)`` for a function or method that acts on each value alone: an activation's node,
    or None for one that passes its input on (a constant shift or scale, a copy, dropout);
    ``(False, None)`` for any other operation."""
    target = n.target
    if (n.op == "call_function" and target in _ADD | _SCALE | _SHIFT and len(tensors) == 1) or \
            (n.op == "call_method" and target in _KEEP_METHODS) or target is F.dropout:
        return True, None
    if target in _ACT_FUNCTIONS or (n.op == "call_method" and target in ACTIVATIONS):
        fn = _ACT_FUNCTIONS.get(target, target)
        return True, Node(name, "relu", ins) if fn == "relu" else Node(name, "act", ins, fn=fn)
    if target in _UNARY and len(tensors) == 1 and n.args and n.args[0] is tensors[0]:
        return True, Node(name, "act", ins, fn=TRACED_ELEMENTWISE)  # the function of each value, unnamed
    return False, None


def _channels_last_node(n: fx.Node, gm: fx.GraphModule, name: str, ins: tuple[str, ...], model: nn.Module,
                        where: str) -> Node | None:
    """The table node of an operation on a channels-last map: per-position linear layers and
    LayerNorm (ConvNeXt blocks), activations, flatten (position by position) and means over the positions."""
    shape_in, out = _shape(n.args[0]), _shape(n)
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Linear):
            return Node(name, "dense", ins, units=m.out_features, bias=m.bias is not None)
        norm = module_norm(m, name, ins, shape_in, True, where, _hint(model))
        if norm is not None:
            return norm
        act = _activation_node(m, name, ins)
        if act is not None or isinstance(m, _KEEP_MODULES):
            return act
        if isinstance(m, nn.Flatten) and out is not None and len(out) == 2:
            return Node(name, "flatten", ins, channels_last=True)
    else:
        target = n.target
        if n.op == "call_function" and target in NORM_FUNCTIONS:
            return _norm_function(n, gm, name, ins, True, where, model)
        tensors: list[fx.Node] = []
        fx.node.map_arg(n.args, tensors.append)
        known, node = _elementwise_function(n, name, ins, tensors)
        if known:
            return node
        if target in (torch.flatten, "flatten", "view", "reshape") and out is not None and len(out) == 2:
            return Node(name, "flatten", ins, channels_last=True)
        if (target in (torch.mean, "mean", torch.amax, "amax") and out is not None and len(out) == 2
                and out[1] == shape_in[-1] and _reduced_axes(n, len(shape_in)) == set(range(1, len(shape_in) - 1))):
            return Node(name, "avgpool", ins, fn="max" if target in (torch.amax, "amax") else "")
    raise TracingError(f"{where} on a channels-last map ({tuple(shape_in or ())}): the tracer follows Linear, "
                       "LayerNorm over the channels, activations, flatten, means over the positions and a "
                       "permute back to channels-first there" + _hint(model))


#: Operations that lay the same values out anew (the input's layout as the first layer reads it).
_RELAYOUT_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten", "permute", "transpose",
                     "movedim", "swapaxes", "swapdims"}
_RELAYOUT_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten, torch.permute,
                       torch.transpose, torch.movedim, torch.swapaxes, torch.swapdims}
_AXIS_MOVES = {"permute", "transpose", "movedim", "swapaxes", "swapdims", torch.permute, torch.transpose,
               torch.movedim, torch.swapaxes, torch.swapdims}


def input_relayouts(gm: fx.GraphModule) -> set[str]:
    """The nodes that only lay the model's input out anew before its first layer reads it (``x.view(-1, 1, 28,
    28)`` of flat images, ``x.unsqueeze(1)`` adding a channel axis, ``x.transpose(1, 2)`` turning ``(n, length,
    features)`` into a sequence of channels), possibly after constant shifts and scales of the input: reshapes
    that give a map (three axes or more) and moves of axes, each keeping the batch axis first.

    Reads only the graph and its recorded shapes: :func:`channels_last_nodes` does not take such a permute for
    a move to channels-last.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    derived = {placeholders[0].name} if placeholders else set()
    moved: set[str] = set()
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function") or not n.args or not isinstance(n.args[0], fx.Node) \
                or n.args[0].name not in derived:
            continue
        tensors: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), tensors.append)
        tensors = [t for t in tensors if not reads_shape(t) and _shape(t) is not None]
        if len(tensors) != 1:
            continue
        shape_in, out = _shape(n.args[0]), _shape(n)
        relayout = (n.op == "call_method" and n.target in _RELAYOUT_METHODS) or \
            (n.op == "call_function" and n.target in _RELAYOUT_FUNCTIONS)
        dims = permute_dims(n)
        if relayout and shape_in is not None and out is not None and len(out) >= 3 and out[0] == shape_in[0] \
                and (dims is None or dims[0] == 0) and (n.target not in _AXIS_MOVES or dims is not None
                                                         or 0 not in _moved_axes(n, len(shape_in))):
            derived.add(n.name)
            moved.add(n.name)
        elif (n.op == "call_function" and n.target in _ADD | _SCALE | _SHIFT) or \
                (n.op == "call_method" and n.target in _KEEP_METHODS | {"to", "type"}):
            derived.add(n.name)  # a constant shift or scale, a copy or a cast of the input
    return moved


def _moved_axes(n: fx.Node, rank: int) -> set[int]:
    """The axes a ``transpose`` / ``movedim`` / ``swapaxes`` node names (non-negative)."""
    names = ("dim0", "dim1") if n.target in ("transpose", torch.transpose, "swapaxes", "swapdims", torch.swapaxes,
                                             torch.swapdims) else ("source", "destination")
    given = [*n.args[1:3], *(n.kwargs[k] for k in names if k in n.kwargs)]
    axes: set[int] = set()
    for value in given:
        for d in (value if isinstance(value, tuple | list) else (value,)):
            if not isinstance(d, int):
                return {0}  # not worked out: taken for the batch axis, so refused
            axes.add(d % rank)
    return axes


def channels_last_nodes(gm: fx.GraphModule) -> set[str]:
    """The fx nodes whose output is a channels-last map: moved there by ``permute(0, 2, 3, 1)`` (any rank:
    the channel axis last), and every node reading one, until ``permute(0, 3, 1, 2)`` moves it back.

    Reads only the graph (no shapes): :class:`TapRunner` turns these nodes' outputs channels-first.
    """
    last: set[str] = set()
    # outputs with their units last already: an embedding's or a Linear's (n, tokens, units), and what reads them
    tokens: set[str] = set()
    relayouts = input_relayouts(gm)
    for n in gm.graph.nodes:
        dims = permute_dims(n)
        if n.name in relayouts:
            continue  # the input laid out as the first layer reads it, channels first
        read: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), read.append)
        if dims is not None:
            rank = len(dims)
            source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            # (0, 2, 1) is its own inverse: on units already last (embedded tokens), it moves them first
            back = rank == 3 and source is not None and (source.name in last or source.name in tokens)
            if dims == (0, *range(2, rank), 1) and rank > 2 and not back:
                last.add(n.name)
            continue  # back to channels-first (or another permute, which the tracer refuses)
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), UNITS_LAST_MODULES):
            tokens.add(n.name)
        elif n.op not in ("placeholder", "get_attr", "output") and any(r.name in tokens for r in read):
            tokens.add(n.name)
        if n.op not in ("placeholder", "get_attr", "output") and any(r.name in last for r in read):
            last.add(n.name)
    return last


def permute_dims(n: fx.Node) -> tuple[int, ...] | None:
    """The axis order of a ``permute`` node (``x.permute(0, 2, 3, 1)``, ``torch.permute(x, (0, 2, 3, 1))``)."""
    if not ((n.op == "call_method" and n.target == "permute") or (n.op == "call_function"
                                                                    and n.target is torch.permute)):
        return None
    dims = n.args[1:] if n.op == "call_method" else n.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = tuple(dims[0])
    dims = dims or tuple(n.kwargs.get("dims", ()))
    rank = len(dims)
    return tuple(int(d) % rank for d in dims) if all(isinstance(d, int) for d in dims) else None


def _reduced_axes(n: fx.Node, rank: int) -> set[int] | None:
    """The axes a ``mean``, ``amax`` or ``max`` node reduces (non-negative), or None when it names none (all of
    them)."""
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dim is None:
        return None
    return {int(d) % rank for d in (dim if isinstance(dim, tuple | list) else (dim,))}


def _rank(n: fx.Node) -> int:
    shape = _shape(n)
    return len(shape) if shape is not None else 0


def _check_permute(n: fx.Node, dims: tuple[int, ...], on_last: bool, model: nn.Module) -> None:
    """Accept the permutes between channels-first and channels-last maps, refuse every other."""
    rank = len(dims)
    to_last, to_first = (0, *range(2, rank), 1), (0, rank - 1, *range(1, rank - 1))
    if rank > 2 and ((dims == to_last and not on_last) or (dims == to_first and on_last)):
        return
    raise TracingError(f"node {n.name!r}: permute{dims} on a {'channels-last' if on_last else 'channels-first'} "
                       f"map; the tracer follows the permutes from channels-first to channels-last "
                       f"{to_last} and back {to_first} only" + _hint(model))


def _parameter_node(n: fx.Node, gm: fx.GraphModule, name: str, ins: tuple[str, ...], model: nn.Module,
                    on_last: bool, params_read: list[fx.Node]) -> Node:
    """The node of an operation reading parameters directly: ``F.layer_norm`` over the channels
    (a ``LayerNorm2d``'s forward) or a layer scale, one factor per channel times a map or vector."""
    where = f"node {n.name!r} ({n.op} {n.target!r})"
    owner = _param_owner(n)
    if n.op == "call_function" and n.target in NORM_FUNCTIONS:  # on a module's weight, bias, running statistics
        return _norm_function(n, gm, name, ins, on_last, where, model)
    learned = dict(gm.named_parameters())
    if n.target in _LAYER_FUNCTIONS and owner is not None and owner[1] == "weight" and \
            f"{owner[0]}.weight" in learned and len(ins) == 1:
        return _layer_function_node(n, name, ins, learned[f"{owner[0]}.weight"], owner[0], on_last, where, model)
    added = n.target in _ADD or n.target == "add"
    whole = ".".join(p for p in owner if p) if owner is not None else ""
    if (n.target in _MUL or added) and whole in learned and len(ins) == 1 and len(n.args) == 2 and not n.kwargs:
        factor = next(a for a in n.args if attribute_of(a) is not None)
        traced = next(a for a in n.args if a is not factor)
        param = learned[whole]
        seen, shape = tuple(_shape(factor) or ()), tuple(_shape(traced) or ())
        c = shape[-1] if on_last or len(shape) == 2 else shape[1] if len(shape) > 2 else 0
        rank = len(shape)
        op, what = ("shift", "an offset") if added else ("scale", "a factor")
        extra = {"param": whole} if whole != f"{name}.{owner[1]}" else {}
        if param.numel() == 1 and param.dim() <= 1 and len(seen) <= 1:  # one for every channel (Fixup's)
            return Node(name, op, ins, units=1, leaf=owner[1], **extra)
        per_channel = ({(c,), (1,) * (rank - 1) + (c,)} if on_last or rank == 2
                       else {(c,) + (1,) * (rank - 2), (1, c) + (1,) * (rank - 2)})
        stored = {(c,)} | ({(c,) + (1,) * (rank - 2), (1, c) + (1,) * (rank - 2)} if not on_last and rank > 2
                           else set())
        if c and seen in per_channel and tuple(param.shape) in stored:
            batch = param.dim() == rank  # (1, c, 1, 1): stored with the batch axis
            return Node(name, op, ins, units=c, leaf=owner[1], keepdims=param.dim() > 1, batch_axis=batch, **extra)
        raise TracingError(f"{where}: {'a sum' if added else 'a product'} with the parameter {whole} "
                           f"(shape {tuple(param.shape)}, used as {seen}) on {shape}: the tracer follows {what} per "
                           f"channel stored as ({c},), ({c}, 1, 1) or (1, {c}, 1, 1), or one for all channels"
                           + _hint(model))
    raise TracingError(f"node {n.name!r}: a parameter or buffer used directly in forward "
                       f"({', '.join(str(attribute_of(a)) for a in params_read)}) cannot be followed there; the "
                       "tracer follows F.layer_norm, F.linear and F.conv1d/2d/3d on a module's own weight and bias, "
                       "and layer scales (learned parameters)" + _hint(model))


def _norm_function(n: fx.Node, gm: fx.GraphModule, name: str, ins: tuple[str, ...], on_last: bool, where: str,
                   model: nn.Module) -> Node:
    """The node of a normalisation function (:func:`combinability_torch.trace_norms.function_norm`)."""
    state = {k for k, _ in itertools.chain(model.named_parameters(), model.named_buffers())}  # gm's: those it reads
    return function_norm(n, name, ins, _shape(n.args[0]) if n.args else None, on_last, attribute_of, example_value,
                         state, where, _hint(model))


def _layer_function_node(n: fx.Node, name: str, ins: tuple[str, ...], weight: torch.Tensor, path: str,
                         on_last: bool, where: str, model: nn.Module) -> Node:
    """The dense or conv node of ``F.linear`` / ``F.conv*d`` on a module's own ``weight`` (and ``bias``)."""
    names = ("input", "weight", "bias") + (("stride", "padding", "dilation", "groups") if n.target is not F.linear
                                           else ())
    args = {**dict(zip(names, n.args, strict=False)), **n.kwargs}
    bias = attribute_of(args.get("bias"))
    if bias not in (None, f"{path}.bias") or (args.get("bias") is not None and bias is None):
        raise TracingError(f"{where}: a layer function on {path}.weight with another bias ({args.get('bias')}); the "
                           f"tracer follows a module's own weight and bias" + _hint(model))
    if n.target is F.linear:
        shape_in = _shape(n.args[0]) or ()
        if len(shape_in) > 2 and not on_last:
            raise TracingError(f"{where}: F.linear on a channels-first map ({tuple(shape_in)}) mixes the positions "
                               f"of its last axis" + _hint(model))
        return Node(name, "dense", ins, units=int(weight.shape[0]), bias=bias is not None)
    nd = _LAYER_FUNCTIONS[n.target]
    settings = {k: example_value(args.get(k, default)) for k, default in
                (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}
    if any(v is None for v in settings.values()):
        raise TracingError(f"{where}: convolution settings the tracer cannot work out ({args})" + _hint(model))
    stride, padding, dilation, groups = (settings[k] for k in ("stride", "padding", "dilation", "groups"))
    kernel = tuple(int(k) for k in weight.shape[2:])
    per_axis = [(v,) * nd if isinstance(v, int) else tuple(v) for v in (stride, dilation)]
    if padding == "valid":
        padding = 0
    elif padding == "same":
        totals = [d * (k - 1) for d, k in zip(per_axis[1], kernel, strict=True)]
        padding = tuple((t // 2, t - t // 2) for t in totals)
    elif not isinstance(padding, int):
        padding = tuple((int(p), int(p)) for p in padding)
    return Node(name, "conv", ins, units=int(weight.shape[0]), kernel=kernel, stride=tuple(per_axis[0]),
                padding=padding, dilation=tuple(per_axis[1]), groups=int(groups), bias=bias is not None)


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """The names under which ``model`` holds a tensor it already holds under an earlier name.

    Tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are one tensor
    under several names: the first name in registration order is the tensor's name in the
    model's state, the others are aliases of it. Combining, matching and checkpoints see
    the tensor once, so a combination keeps it tied.

    Returns
    -------
    dict of str to str
        Alias to the name it aliases; empty when nothing is tied.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in first and first[id(tensor)] != name:
            aliases[name] = first[id(tensor)]
        else:
            first.setdefault(id(tensor), name)
    return aliases


def logits_of(out: Any) -> Any:
    """A torch model's logits (:func:`combinability.model_outputs.logits_of`); an fx graph's
    output nodes are read the same way."""
    return model_outputs.logits_of(out, lambda v: isinstance(v, torch.Tensor | fx.Node | fx.Proxy))


_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}


def output_softmax(gm: fx.GraphModule) -> fx.Node | None:
    """The node that turns the logits into (log-)probabilities as the model's last step, if it has one:
    ``F.log_softmax(x, dim=1)`` as PyTorch's MNIST example returns, ``nn.Softmax(dim=1)`` ending a
    classifier, along the class axis (the last, or axis 1). None otherwise.

    The library reads the logits before it: the cross-entropy of log-probabilities is theirs, of
    probabilities it is not.
    """
    output = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    node = logits_of(output.args[0]) if output is not None else None
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        dim = m.dim if isinstance(m, nn.Softmax | nn.LogSoftmax) else None
    elif (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _SOFTMAX_METHODS):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    else:
        return None
    rank = len(_shape(node.args[0]) or ()) or None
    if not isinstance(dim, int) or (rank is not None and dim % rank not in (1, rank - 1)):
        return None
    return node


def strip_output_softmax(gm: fx.GraphModule) -> bool:
    """Make ``gm`` return the logits that its final softmax or log-softmax (:func:`output_softmax`) reads;
    return whether it had one."""
    node = output_softmax(gm)
    if node is None:
        return False
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    output.args = fx.node.map_arg(output.args, lambda a: node.args[0] if a is node else a)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return True


def feeding_logits(gm: fx.GraphModule) -> set[str]:
    """The names of the nodes the model's logits are computed from (the output's other items, such as a
    mixture of experts' load-balancing loss in ``(logits, aux_loss)``, are not)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    todo: list[fx.Node] = []
    fx.node.map_arg(logits_of(output.args[0]), todo.append)
    seen: set[str] = set()
    writes = [n for n in gm.graph.nodes if _writes_in_place(n)]
    while todo:
        while todo:
            node = todo.pop()
            if node.name not in seen:
                seen.add(node.name)
                todo.extend(node.all_input_nodes)
        # in-place writes into a tensor the logits read (``out[rows] += ...``, ``index_add_``) feed them too
        todo = [n for n in writes if n.name not in seen and isinstance(n.args[0], fx.Node) and n.args[0].name in seen]
    return seen


def _writes_in_place(n: fx.Node) -> bool:
    """Whether ``n`` writes into its first argument (``x[i] = v``, ``x.index_add_(...)``, ``x.copy_(v)``)."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_function":
        return n.target is operator.setitem or getattr(n.target, "__name__", "").endswith("_")
    return n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_") and \
        not n.target.startswith("_")


#: Modules whose output holds its channels on axis 1 (a map ``(n, c, *positions)``).
_CHANNELS_FIRST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                           nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                           nn.Upsample, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_CHANNELS_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                             F.batch_norm, F.group_norm, F.instance_norm, *_INTERPOLATE, *_POOL_FUNCTIONS,
                             *_ADAPTIVE_AVG, *_ADAPTIVE_MAX}


def classes_second(gm: fx.GraphModule) -> bool | None:
    """Whether ``gm``'s logits hold their classes on axis 1 (True: they come from a convolution, a norm
    or a resize of channels-first maps, as a segmentation network's ``(n, classes, H, W)``), on the
    last axis (False: from a Linear, an Embedding or a recurrent layer), or unknown (None).

    Read from the layer that makes the logits, through the operations that keep the layout
    (activations, dropout, additions, a cast); a reshape or permute on the way leaves it unknown.
    """
    output = next((n for n in gm.graph.nodes if n.op == "output"), None)
    node = logits_of(output.args[0]) if output is not None else None
    for _ in range(len(gm.graph.nodes)):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _CHANNELS_FIRST_MODULES):
                return True
            if isinstance(m, UNITS_LAST_MODULES):
                return False
            if not isinstance(m, (*_ACT_MODULES, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.Identity)):
                return None
        elif node.op == "call_function" and node.target in _CHANNELS_FIRST_FUNCTIONS:
            return True
        elif node.op == "call_function" and node.target is F.linear:
            return False
        elif not ((node.op == "call_function" and (node.target in _ACT_FUNCTIONS or node.target in _ADD
                                                    or node.target is F.dropout))
                  or (node.op == "call_method" and (node.target in _KEEP_METHODS or node.target in ACTIVATIONS))):
            return None
        node = next((a for a in node.all_input_nodes if a.op != "get_attr"), None)
    return None


def other_arguments(model: nn.Module) -> dict[str, Any]:
    """The defaults of ``model.forward``'s arguments after the first (the input), which tracing
    holds at their defaults as the library's calls ``model(x)`` do (``attention_mask=None``, ...).

    Raises
    ------
    TracingError
        If ``forward`` requires another argument (``forward(input, hidden)``): the library calls
        ``model(x)``, so that argument needs a default, or the model a wrapper that supplies it.
    """
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())[1:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise TracingError(f"{type(model).__name__}.forward requires {', '.join(map(repr, required))} besides its "
                           f"input, but the library calls model(x): give {'them' if len(required) > 1 else 'it'} a "
                           f"default (hidden=None), or wrap the model in a module whose forward(x) supplies "
                           f"{'them' if len(required) > 1 else 'it'} (an RNN's zero initial state) and returns "
                           f"the logits")
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _failure_on(model: nn.Module, x: torch.Tensor) -> Exception | None:
    """The error of ``model`` itself, in inference mode, on ``x`` (not only of its traced graph); None if it runs."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:
        return exc
    finally:
        model.train(was_training)
    return None


def _refuse_failing_input(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse ``example_input`` that ``model`` itself fails on, with its error and what in the input it points at
    (:func:`~combinability.data.base.input_fault`)."""
    exc = _failure_on(model, x)
    if exc is None:
        return
    first = (str(exc).strip().splitlines() or [""])[0]
    reason = input_fault(exc, x.numpy(), "example_input")
    where = f"running {type(model).__name__} on example_input of shape {tuple(x.shape)}"
    raise ExampleInputError(f"{where}: {reason}" if reason else
                            f"{where} failed: {type(exc).__name__}: {first}{integer_hint(x)}")


def _module_alias(model: nn.Module, alias: str, name: str) -> bool:
    """Whether tensor name ``alias`` is ``name`` because one module is registered under two paths (a TCN's
    ``self.conv1`` also held in ``self.net``), not because two modules share a tensor (a tied head).

    Such a module is traced under its first path, the name its tensors have in the state; called once, it is a
    layer like any other (called more often, :func:`describe` refuses it as shared)."""
    path_a, _, leaf_a = alias.rpartition(".")
    path_b, _, leaf_b = name.rpartition(".")
    return leaf_a == leaf_b and model.get_submodule(path_a) is model.get_submodule(path_b)


def describe(model: nn.Module, example_input: torch.Tensor) -> tuple[LayerTable, fx.GraphModule]:
    """The layer table of a user's module, traced with torch.fx on ``example_input`` (a batch).

    Raises
    ------
    TracingError
        If fx cannot trace the module, or a node is an operation the table cannot express.
    """
    try:
        return _describe(model, example_input)
    except TracingError as exc:
        if isinstance(example_input, torch.Tensor) and example_input.dim() and int(example_input.shape[0]) == 1:
            raise type(exc)(f"{exc}; example_input holds one example: an operation such as .squeeze() drops the "
                            f"batch axis of a batch of one, so pass two or more examples") from None
        raise


def _describe(model: nn.Module, example_input: torch.Tensor) -> tuple[LayerTable, fx.GraphModule]:
    """:func:`describe` (its errors not yet told of a one-example batch)."""
    from torch.fx.passes.shape_prop import ShapeProp

    _refuse_failing_input(model, example_input)
    if isinstance(example_input, torch.Tensor) and not (example_input.is_floating_point() or
                                                        example_input.is_complex()) and \
            any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in model.modules()):
        raise NotALayerTableError(f"{type(model).__name__} takes integer inputs (token ids, read by an embedding), "
                                  "which layer tables do not model" + _hint(model))
    tied = {a: b for a, b in tensor_aliases(model).items() if not _module_alias(model, a, b)}
    if tied:
        raise TracingError(f"{type(model).__name__} ties {', '.join(f'{a} to {b}' for a, b in tied.items())} (one "
                           "tensor under two names), which a layer table cannot express; its feature spaces can "
                           "(cb.derive_symmetries)")
    try:
        gm = trace(model)
    except TracingError:  # branches on shapes, checks of the input: follow the example's way
        from combinability_torch.concrete_trace import concrete_trace

        gm = concrete_trace(model, example_input, _hint(model))
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        while exc.__cause__ is not None:  # fx's ShapeProp wraps the model's own error
            exc = exc.__cause__
        raise TracingError(f"running {type(model).__name__} on example_input of shape {tuple(example_input.shape)} "
                           f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                           f"{integer_hint(example_input)}") from None
    finally:
        gm.train(was_training)
    names = table_names(gm)
    held = other_arguments(model)
    last = channels_last_nodes(gm)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters(recurse=False)):
            calls[n.target] = calls.get(n.target, 0) + 1
    shared = {t: k for t, k in calls.items() if k > 1}
    if shared:
        target, times = next(iter(shared.items()))
        raise TracingError(f"module {target!r} ({type(gm.get_submodule(target)).__name__}) is called {times} times: "
                           "one set of weights in several places (an iterated block, an MLP shared by two "
                           "branches), which a layer table does not express; give each call its own module"
                           + _hint(model))
    alias: dict[str, str] = {}
    applied: dict[str, Node] = {}  # the parameter of a scale or shift node -> that node
    nodes: list[Node] = []
    output = None
    live = feeding_logits(gm)
    relayouts = input_relayouts(gm)
    softmax = output_softmax(gm)  # the logits are what it reads
    input_shapes: dict[tuple[int, ...], str] = {}  # the input's layouts read by a layer, and the first reader
    constants: dict[str, tuple[tuple[int, ...], bool]] = {}  # state entries that normalise the input
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output") and n.name not in live:
            continue  # another output's work (an auxiliary loss, features returned beside the logits)
        if n.op == "placeholder":
            if alias and not held:
                raise TracingError(f"{type(model).__name__}.forward takes more than one tensor input")
            if not alias:
                alias[n.name] = "<input>"
            continue  # the others: arguments held at their defaults
        if n.op == "output":
            output = logits_of(n.args[0])
            continue
        if n.op == "get_attr" or attribute_of(n) is not None:
            continue  # a parameter (or a view of one) read directly: see the operation that uses it
        read: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), read.append)
        params_read = [a for a in read if attribute_of(a) is not None]
        ins = tuple(dict.fromkeys(alias[a.name] for a in read if a.name in alias)) \
            if n.target not in _ADD | _CAT | _MUL else tuple(alias[a.name] for a in read if a.name in alias)
        if reads_shape(n):
            continue  # sizes and types, not features
        if not ins:
            if _shape(n) is None:  # arithmetic on sizes (``b, c = x.shape[:2]``): no tensor
                continue
            raise TracingError(f"node {n.name!r} ({n.target!r}) reads no traced tensor" + _hint(model))
        traced = [a for a in read if a.name in alias]
        if n.name in relayouts:
            alias[n.name] = "<input>"
            continue
        if n is softmax:
            alias[n.name] = ins[0]
            continue
        if params_read and len(traced) == 1 and alias[traced[0].name] == "<input>" and n.op == "call_function" \
                and n.target in _ADD | _SCALE | _SHIFT:
            # the input normalised by constants the model holds ((x - self.mean) / self.std): not a layer
            constants.update(_state_names(gm, model, params_read))
            alias[n.name] = "<input>"
            continue
        if len({a.name in last for a in traced if _rank(a) > 2}) > 1:
            raise TracingError(f"node {n.name!r} ({n.target!r}) combines a channels-last map with a channels-first "
                               "one" + _hint(model))
        on_last = bool(traced) and traced[0].name in last and _rank(traced[0]) > 2
        dims = permute_dims(n)
        if dims is not None:
            _check_permute(n, dims, on_last, model)
            alias[n.name] = ins[0]
            continue
        if params_read:
            node = _parameter_node(n, gm, names[n.name], ins, model, on_last, params_read)
        else:
            node = _node(n, gm, names[n.name], ins, model, on_last)
        if node is None:
            alias[n.name] = ins[0]
            continue
        node, *after = node if isinstance(node, tuple) else (node,)  # after: nodes reading it (a crop's flatten)
        if node.op not in ("add", "concat", "mul"):
            node = Node(**{**node.__dict__, "inputs": ins[:1]})
        if node.op in ("scale", "shift"):
            earlier = applied.setdefault(node.parameter_name(), node)
            if earlier is not node and earlier.inputs == node.inputs and earlier.op == node.op:
                alias[n.name] = earlier.name  # computed again on the same map (Fixup's ``x + self.bias1a``, twice)
                continue
            if earlier is not node:
                raise TracingError(f"node {n.name!r}: the parameter {node.parameter_name()} is applied in two places "
                                   f"(after {earlier.inputs[0]!r} and {node.inputs[0]!r}), which a layer table does "
                                   f"not express; give each place its own parameter" + _hint(model))
        for a in traced:
            if alias[a.name] == "<input>" and _shape(a) is not None:
                input_shapes.setdefault(tuple(_shape(a)[1:]), n.name)
        nodes += [node, *after]
        alias[n.name] = nodes[-1].name
    if not isinstance(output, fx.Node) or alias.get(output.name) != (nodes[-1].name if nodes else None):
        raise TracingError(f"{type(model).__name__}.forward must return one logits tensor, made by its last operation"
                           + _hint(model))
    # the input as the first layer reads it (the data keeps its own shape: data_shape)
    shape = input_layout(type(model).__name__, input_shapes, _hint(model)) or tuple(example_input.shape[1:])
    out_shape = _shape(output)
    try:  # the classes: the last axis, or a channels-first map's channels (a dense prediction's (n, C, H, W))
        try:
            table = LayerTable(type(model).__name__, shape, int(out_shape[-1]), tuple(nodes))
        except ConfigurationError:
            if len(out_shape) < 3:
                raise
            table = LayerTable(type(model).__name__, shape, int(out_shape[1]), tuple(nodes))
    except Exception as exc:
        raise TracingError(f"the traced graph of {type(model).__name__} is not a valid layer table: {exc}"
                           + _hint(model)) from None
    object.__setattr__(table, "config", {"architecture": None, "model": type(model).__qualname__, "width": 1.0,
                                         "num_classes": table.num_classes, "input_shape": shape, "traced": True,
                                         "data_shape": tuple(int(v) for v in example_input.shape[1:]),
                                         **({"input_constants": constants} if constants else {})})
    return table, gm


def _state_names(gm: fx.GraphModule, model: nn.Module, reads: list[fx.Node]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The entries of ``model``'s state that ``reads`` (parameters or buffers read directly, or views of them
    that fx folded into constants) are: ``{name: (shape, is a buffer)}``; constants of no state entry are left out.

    A folded view shares its tensor's memory, by which it is found.
    """
    buffers = dict(model.named_buffers())
    state = {**dict(model.named_parameters()), **{k: v for k, v in buffers.items()
                                                  if k.rpartition(".")[2] not in _non_persistent(model, k)}}
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for node in reads:
        target = attribute_of(node)
        try:
            tensor = gm.get_parameter(target) if target in dict(gm.named_parameters()) else gm.get_buffer(target)
        except AttributeError:
            tensor = getattr(gm, target, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        for name, held in state.items():
            if held.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                out[name] = (tuple(held.shape), name in buffers)
    return out


def _non_persistent(model: nn.Module, name: str) -> set[str]:
    """The non-persistent buffers (left out of the state) of the module holding buffer ``name``."""
    path = name.rpartition(".")[0]
    return set(model.get_submodule(path)._non_persistent_buffers_set) if path else \
        set(model._non_persistent_buffers_set)


#: Modules whose output holds their units on its last axis, whatever its rank (a Linear on tokens; a
#: recurrent layer's output sequence, the first item of what it returns).
UNITS_LAST_MODULES = (nn.Linear, nn.Embedding, nn.EmbeddingBag, nn.RNNBase)


def _hold_uncalled(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` every parameter and buffer of ``model`` under its state name.

    torch.fx keeps only what ``forward`` reads; a model's state also holds what it never calls
    (an unused pooler, T5's position bias where it is switched off), which the layout names.
    """
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        path, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(path)
        except AttributeError:  # a submodule never called: held as it is
            gm.add_submodule(path, model.get_submodule(path))
            continue
        if leaf in owner._parameters or leaf in owner._buffers:
            continue
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(leaf, tensor)
        else:
            owner.register_buffer(leaf, tensor)


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.setitem}


def writes_in_place(gm: fx.GraphModule) -> bool:
    """Whether some operation of ``gm`` overwrites a tensor it reads: a module built with ``inplace=True``
    (torchvision's ``nn.ReLU(inplace=True)``), a function called so (``F.relu(x, inplace=True)``), an in-place
    operator (``x[...] = ...``; fx records ``out += identity`` as an addition) or a method ending in ``_``
    (``x.relu_()``). Such an operation may overwrite the output of an earlier node after it was read."""
    import inspect

    for n in gm.graph.nodes:
        if n.op == "call_module" and getattr(gm.get_submodule(n.target), "inplace", False) is True:
            return True
        if n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_") \
                and not n.target.startswith("__"):
            return True
        if n.op == "call_function":
            if n.target in _IN_PLACE_OPERATORS or n.kwargs.get("inplace") is True:
                return True
            name = getattr(n.target, "__name__", "")
            if name.endswith("_") and not name.startswith("_"):
                return True
            try:
                bound = inspect.signature(n.target).bind(*n.args, **n.kwargs).arguments
            except (TypeError, ValueError):
                continue
            if bound.get("inplace") is True:
                return True
    return False


def in_projection(mha: nn.MultiheadAttention, args: Any, kwargs: Any) -> torch.Tensor:
    """The queries, keys and values an ``nn.MultiheadAttention`` computes from its inputs, side by side on the
    last axis (its input projection: ``in_proj_weight``'s three blocks, or its separate ``q/k/v_proj_weight``)."""
    names = ("query", "key", "value")
    inputs = [args[i] if len(args) > i else kwargs[names[i]] for i in range(3)]
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
    return torch.cat([F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases, strict=True)], dim=-1)


def module_outputs(gm: fx.GraphModule) -> dict[str, str]:
    """For each module that fx traced through (its operations inlined: a transformer block, an attention or MLP
    module), the node holding its output: the one node of its scope that a node outside it reads. Modules whose
    scope lets several nodes out (a tuple returned) are left out."""
    scope: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        for entry in (n.meta.get("nn_module_stack") or {}).values():
            path = entry[0] if isinstance(entry, tuple) else None
            if isinstance(path, str) and path:
                scope.setdefault(path, []).append(n)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    out: dict[str, str] = {}
    for path, nodes in scope.items():
        if path in called:
            continue  # a module called whole: hooked, or tapped at its node
        inside = {n.name for n in nodes}
        leaving = [n for n in nodes if any(u.name not in inside for u in n.users)]
        if len(leaving) == 1:
            out[path] = leaving[0].name
    return out


class TapRunner(nn.Module):
    """Runs a traced module and records the outputs of chosen nodes (the feature taps of a user model).

    It shares the traced module's submodules, parameters and buffers (same state names), so
    :func:`torch.func.functional_call` on it substitutes the traced module's weights. Where the module
    overwrites tensors in place (:func:`writes_in_place`: a BatchNorm's output by the
    ``nn.ReLU(inplace=True)`` after it), each tap is a copy taken when
    its node has run, so that it holds that node's output and not what a later operation made of it.
    """

    def __init__(self, gm: fx.GraphModule, model: nn.Module | None = None) -> None:
        super().__init__()
        if model is not None:
            _hold_uncalled(gm, model)
        self.__dict__["gm"] = gm
        self._modules = gm._modules
        self._parameters = gm._parameters
        self._buffers = gm._buffers
        fx_of = {v: k for k, v in table_names(gm).items()}
        # modules fx traced through (a transformer block): their output's node
        fx_of.update({path: name for path, name in module_outputs(gm).items() if path not in fx_of})
        self.__dict__["fx_of"] = fx_of
        self.__dict__["copy_taps"] = writes_in_place(gm)
        # tapped channels-first, as the table reads them: channels-last maps, and the outputs of layers acting
        # on the last axis of (n, tokens, features) or any other (n, ..., units) tensor
        #: ``<path>.in_proj`` for each nn.MultiheadAttention the graph calls: its heads' queries, keys and
        #: values side by side ``(..., 3 x embed_dim)`` (computed inside it, so no node's output)
        self.__dict__["in_projections"] = [f"{n.target}.in_proj" for n in gm.graph.nodes if n.op == "call_module"
                                           and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
        self.__dict__["channels_last"] = channels_last_nodes(gm) | {
            n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   UNITS_LAST_MODULES)}

    def forward(self, x: torch.Tensor, taps: dict[str, Any] | None = None) -> torch.Tensor:
        if taps is None:
            return self.gm(x)
        wanted = {self.fx_of.get(p, p): p for p in taps}
        channels_last, copy_taps = self.channels_last, self.copy_taps

        class _Tap(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in wanted:
                    value = out[0] if isinstance(out, tuple) else out  # a recurrent layer's: its output sequence
                    value = value.clone() if copy_taps else value  # before an in-place operation overwrites it
                    taps[wanted[n.name]] = value.movedim(-1, 1) if n.name in channels_last and value.dim() > 2 \
                        else value
                return out

            def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
                point = projections.get(str(target))
                if point is not None:
                    taps[point] = in_projection(self.module.get_submodule(target), args, kwargs)
                return super().call_module(target, args, kwargs)

        projections = {p.removesuffix(".in_proj"): p for p in taps if p in self.in_projections}
        return _Tap(self.gm).run(x)
