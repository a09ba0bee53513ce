"""Normalisations of every shape users write in convolutional and MLP models, read as layer-table norm nodes.

A norm keeps a permutation of the channels it reads when its statistics treat every channel alike and its
learned parameters move with their channels:

* ``nn.LayerNorm(C)`` / ``nn.RMSNorm(C)`` / ``F.layer_norm`` / ``F.rms_norm`` over a vector's features or
  each position's channels of a channels-last map (``"layernorm"``, ``"rmsnorm"``), with a weight and bias,
  a weight alone (``bias=False``) or neither;
* ``nn.LayerNorm([C, H, W])`` / ``F.layer_norm(x, x.shape[1:])`` over each example's whole channels-first
  map (``"layernorm_map"``): the statistics are over every channel and position, and the ``(C, H, W)``
  weight and bias move along their first axis;
* ``F.group_norm`` and ``F.batch_norm`` (in eval mode, with running statistics) written with a module's own
  ``weight``, ``bias``, ``running_mean`` and ``running_var``, as the modules are;
* ``F.normalize(x, dim=1)``, the L2 normalisation of each position's channels (``"l2norm"``).

``nn.LocalResponseNorm`` divides each channel by its neighbours' energy, so the channels' order is part of
the function: it is refused by name, as is every other shape (a norm over the positions alone, with a
scale shared by the channels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from combinability.errors import TracingError
from combinability.layers import Node

__all__ = ["NORM_FUNCTIONS", "function_norm", "module_norm", "norm_owner"]

_RMS_NORM = getattr(F, "rms_norm", None)
#: The functions' argument names, in order.
_ARGS: dict[Any, tuple[str, ...]] = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    F.normalize: ("input", "p", "dim", "eps", "out"),
    F.local_response_norm: ("input", "size", "alpha", "beta", "k"),
    **({_RMS_NORM: ("input", "normalized_shape", "weight", "eps")} if _RMS_NORM is not None else {}),
}
#: The normalisation functions read here.
NORM_FUNCTIONS = frozenset(_ARGS)
_STATE_ARGS = ("weight", "bias", "running_mean", "running_var")
_COMPUTED = "a computed tensor"

_LRN = ("divides each channel by the energy of its `size` neighbouring channels, so the channels' order is part "
        "of the function: no permutation of them keeps it (but reversing them all), and a layer table cannot "
        "express it. Leave the channel space it reads in place (pass spec= built from cb.derive_spec of the "
        "model without it, that space's permutation removed), or normalise over all channels alike (GroupNorm, "
        "LayerNorm, F.normalize(x, dim=1))")


def _arguments(n: fx.Node) -> dict[str, Any]:
    return {**dict(zip(_ARGS[n.target], n.args, strict=False)), **n.kwargs}


def norm_owner(n: fx.Node, attribute_of: Callable[[Any], str | None]) -> tuple[str, str] | None:
    """``(module path, leaf)`` of the state entry naming a normalisation function's module: its ``weight``, or
    its ``running_mean`` (a BatchNorm without a scale); None for another node or one reading no state."""
    if n.op != "call_function" or n.target not in NORM_FUNCTIONS:
        return None
    args = _arguments(n)
    target = next((t for t in (attribute_of(args.get(k)) for k in _STATE_ARGS) if t is not None), None)
    if target is None:
        return None
    path, _, leaf = target.rpartition(".")
    return path, leaf


def _eps(value: Any, default: float) -> float:
    return default if value is None else float(value)


def _over(kind: str, normalized: tuple[int, ...], shape_in: tuple[int, ...] | None, last: bool, name: str,
          ins: tuple[str, ...], eps: float, affine: bool, bias: bool, what: str, where: str, hint: str) -> Node:
    """The node of a LayerNorm or RMSNorm over the trailing axes ``normalized`` of an input of ``shape_in``."""
    shape_in = tuple(shape_in or ())
    if len(shape_in) >= 2 and (last or len(shape_in) == 2) and normalized == shape_in[-1:]:
        return Node(name, "norm", ins, norm=kind, eps=eps, affine=affine, bias=bias)
    if kind == "layernorm" and not last and len(shape_in) > 2 and normalized == shape_in[1:]:
        return Node(name, "norm", ins, norm="layernorm_map", eps=eps, affine=affine, bias=bias)
    layout = "channels-last map" if last else "vector" if len(shape_in) == 2 else "channels-first map"
    if kind == "rmsnorm" and not last and len(shape_in) > 2 and normalized == shape_in[1:]:
        why = ("its channels would permute freely (the statistics are over all of them), but layer tables express "
               "RMSNorm over each position's channels only: normalise a channels-last map's channels "
               "(x.permute(0, 2, 3, 1)), or use LayerNorm over the whole map")
    elif last and len(normalized) > 1:
        why = ("a norm over the positions and channels of a channels-last map has its weight laid out (H, W, C); "
               "layer tables read a whole map's norm channels first: apply LayerNorm([C, H, W]) before the permute")
    elif len(shape_in) > 2 and not last:
        why = ("it normalises each channel over its positions (or some of them), with a scale and shift shared by "
               "every channel, which layer tables do not express; they follow a norm over each position's channels "
               "(on a channels-last map, as ConvNeXt), over the whole map (C, *positions), or per channel over the "
               "positions with one scale per channel (nn.GroupNorm(C, C), nn.InstanceNorm2d)")
    else:
        why = "layer tables follow it over the last axis of a vector or channels-last map"
    raise TracingError(f"{where}: {what} over {normalized} of a {layout} {shape_in}: {why}" + hint)


def module_norm(m: nn.Module, name: str, ins: tuple[str, ...], shape_in: tuple[int, ...] | None, last: bool,
                where: str, hint: str) -> Node | None:
    """The node of an ``nn.LayerNorm`` or ``nn.RMSNorm`` of any shape (a refusal saying why for the shapes
    without a table node), a refusal for ``nn.LocalResponseNorm``; None for other modules."""
    if isinstance(m, nn.LocalResponseNorm):
        raise TracingError(f"{where}: a LocalResponseNorm {_LRN}" + hint)
    rms = getattr(nn, "RMSNorm", None)
    if not isinstance(m, nn.LayerNorm) and not (rms is not None and isinstance(m, rms)):
        return None
    kind = "layernorm" if isinstance(m, nn.LayerNorm) else "rmsnorm"
    eps = _eps(m.eps, torch.finfo(torch.float32).eps)  # RMSNorm's eps=None: the dtype's (the library's: float32)
    return _over(kind, tuple(m.normalized_shape), shape_in, last, name, ins, eps, m.elementwise_affine,
                 getattr(m, "bias", None) is not None, f"{_a(type(m).__name__)}", where, hint)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'AEIOU' else 'a'} {word}"


def function_norm(n: fx.Node, name: str, ins: tuple[str, ...], shape_in: tuple[int, ...] | None, last: bool,
                  attribute_of: Callable[[Any], str | None], example_value: Callable[[Any], Any],
                  state: set[str], where: str, hint: str) -> Node:
    """The node of a normalisation function (:data:`NORM_FUNCTIONS`), its parameters and buffers a module's
    own ``weight``, ``bias``, ``running_mean`` and ``running_var`` (or none); a refusal saying why otherwise.

    ``state``: the names of the model's parameters and buffers.
    """
    target, args = n.target, _arguments(n)
    if target is F.local_response_norm:
        raise TracingError(f"{where}: F.local_response_norm {_LRN}" + hint)
    given = {k: args[k] for k in _STATE_ARGS if args.get(k) is not None}
    names = {k: attribute_of(v) for k, v in given.items()}
    owners = {v.rpartition(".")[0] for v in names.values() if v is not None}
    if given and (any(v is None for v in names.values()) or len(owners) != 1 or "" in owners
                  or any(v.rpartition(".")[2] != k for k, v in names.items())):
        raise TracingError(f"{where}: the tracer follows {target.__name__} with the parameters and buffers of one "
                           f"submodule, named as torch's norm modules name them (<module>.weight, <module>.bias, "
                           f"<module>.running_mean, <module>.running_var), which the layer table binds by those names; "
                           f"got {', '.join(f'{k}={v or _COMPUTED}' for k, v in names.items())} (a "
                           f"parameter of the model itself has no module: keep the norm's in a submodule)" + hint)
    owner = next(iter(owners), "")
    affine = "weight" in given
    if target is F.batch_norm:
        training = example_value(args.get("training", False))
        if training is not False or "running_mean" not in given or "running_var" not in given:
            raise TracingError(f"{where}: F.batch_norm normalises by the statistics of each batch here "
                               f"(training={args.get('training', False)!r}, running_mean "
                               f"{names.get('running_mean')}); the tracer follows it in eval mode, training=False "
                               f"with a module's running_mean and running_var" + hint)
        if affine != ("bias" in given):
            raise TracingError(f"{where}: F.batch_norm with a weight or a bias alone; the tracer follows both or "
                               "neither" + hint)
        if f"{owner}.num_batches_tracked" not in state:
            raise TracingError(f"{where}: F.batch_norm on the buffers of {owner!r}, which has no num_batches_tracked "
                               f"counter: the layer table of a BatchNorm holds torch's (subclass nn.BatchNorm2d, or "
                               f"register_buffer('num_batches_tracked', torch.tensor(0)))" + hint)
        return Node(name, "norm", ins, norm="batchnorm", eps=_eps(args.get("eps"), 1e-5), affine=affine)
    if target is F.group_norm:
        groups = example_value(args.get("num_groups"))
        if not isinstance(groups, int) or last or len(shape_in or ()) < 2 or affine != ("bias" in given):
            raise TracingError(f"{where}: the tracer follows F.group_norm on a channels-first map or vector with a "
                               f"number of groups it can read, and a weight and bias or neither (got num_groups "
                               f"{args.get('num_groups')!r} on {shape_in})" + hint)
        return Node(name, "norm", ins, norm="groupnorm", groups=groups, eps=_eps(args.get("eps"), 1e-5),
                    affine=affine)
    if target is F.normalize:
        p, dim = example_value(args.get("p", 2.0)), example_value(args.get("dim", 1))
        rank = len(shape_in or ())
        channel_axis = rank - 1 if last or rank == 2 else 1
        if p != 2 or not isinstance(dim, int) or rank < 2 or dim % rank != channel_axis or given:
            raise TracingError(f"{where}: F.normalize(p={p!r}, dim={dim!r}) of {shape_in}: the tracer follows the "
                               f"L2 normalisation of the channels (p=2, dim=1 on a channels-first map or vector, the "
                               f"last axis on a channels-last map), which every permutation of them keeps" + hint)
        return Node(name, "norm", ins, norm="l2norm", eps=_eps(args.get("eps"), 1e-12), affine=False)
    normalized = example_value(args.get("normalized_shape"))
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized or ())
    kind = "layernorm" if target is F.layer_norm else "rmsnorm"
    default = 1e-5 if kind == "layernorm" else torch.finfo(torch.float32).eps
    if kind == "layernorm" and "bias" in given and not affine:
        raise TracingError(f"{where}: F.layer_norm with a bias and no weight; the tracer follows a weight and "
                           "bias, a weight alone or neither" + hint)
    return _over(kind, normalized, shape_in, last, name, ins, _eps(args.get("eps"), default), affine,
                 "bias" in given, f"{target.__name__}", where, hint)
