"""The torch operations the stream tracer recognises, by kind, and readers of a node's shape.

:mod:`combinability_torch.trace_stream` and :mod:`combinability_torch.trace_attention` decide what
a node of a :mod:`torch.fx` graph does to the features of its input by its target: a module
class, a function or a method name, gathered here into sets (nonlinearities, operations that
pass features through, residual additions, token reductions, reshapes, products). The shape
readers look at the ``tensor_meta`` that :class:`torch.fx.passes.shape_prop.ShapeProp` records.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_NONLINEAR_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus,
                      nn.Softmax, nn.LogSoftmax, nn.ReLU6, nn.Hardtanh)


_NONLINEAR = {F.relu, F.gelu, F.silu, F.elu, F.softplus, F.leaky_relu, F.softmax, F.log_softmax, torch.log_softmax,
              "log_softmax", F.tanh, F.sigmoid,
              torch.relu, torch.tanh, torch.sigmoid, torch.softmax, "relu", "tanh", "sigmoid", "softmax",
              # element-wise functions an activation is written with (GPT-2's gelu_new: x ** 3, tanh; erf, exp)
              torch.pow, "pow", operator.pow, torch.erf, "erf", torch.exp, "exp", torch.square, "square", torch.rsqrt,
              "rsqrt", torch.sqrt, "sqrt",
              # bounds (GPT-OSS's experts clamp their gate and up units)
              torch.clamp, "clamp", torch.clip, "clip", torch.clamp_min, "clamp_min", torch.clamp_max, "clamp_max",
              torch.abs, "abs"}


_PASS_MODULES = (nn.Dropout, nn.Identity)


_PASS = {"contiguous", "clone", "detach", "float", "expand", "to", "type", "type_as", "half", "bfloat16", F.dropout,
         operator.mul, operator.truediv,
         torch.mul, "bool", operator.invert, torch.logical_not, "logical_not"}  # (a mask, negated)


_ADD = {operator.add, operator.iadd, torch.add}


_TOKEN_OPS = {"mean", torch.mean, "sum", torch.sum}


_SHAPE_OPS = {"view", "reshape", "flatten", "transpose", "permute", "unsqueeze", "squeeze", torch.flatten,
              torch.reshape, torch.transpose}


_FLATTEN = {"flatten", torch.flatten}


_STATISTICS = {"var", torch.var, "std", torch.std, "norm", torch.norm}


#: Tensor methods making a constant of the tensor's dtype and device (an RNN's zero initial state).
_NEW_CONSTANTS = {"new_zeros", "new_ones", "new_full", "new_empty"} | {
    getattr(torch.Tensor, name) for name in ("new_zeros", "new_ones", "new_full", "new_empty")}


def _hint(model: nn.Module) -> str:
    return (f"; pass spec= (a combinability.PermutationSpec, with kinds for heads and the residual stream) by hand "
            f"to cb.ModelPair for this {type(model).__name__}")


def _last(shape: Any) -> int | None:
    meta = getattr(shape, "meta", {}).get("tensor_meta")
    return int(meta.shape[-1]) if meta is not None and hasattr(meta, "shape") and len(meta.shape) else None


def _ndim(n: Any) -> int | None:
    meta = getattr(n, "meta", {}).get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _dim_is_last(n: fx.Node, position: int, default: int | None = None) -> bool:
    """Whether the ``dim`` argument (keyword, or positional at ``position``; ``default`` where the
    call omits it, as ``topk``'s last axis) is the last axis."""
    dim = n.kwargs.get("dim", n.args[position] if len(n.args) > position else default)
    return dim == -1 or (dim is not None and dim == (_ndim(n.args[0]) or 0) - 1)


def _keeps_last(n: fx.Node) -> bool:
    """A token-level op: pooling over, or indexing of, axes other than the last."""
    if n.target is operator.getitem:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return Ellipsis not in idx or idx[-1] is Ellipsis
    if n.target in _TOKEN_OPS:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = dim if isinstance(dim, tuple | list) else (dim,)
        nd = _ndim(n.args[0]) or 0
        return dim is not None and all(d not in (-1, nd - 1) for d in dims)
    if n.target in ("transpose", torch.transpose):
        nd = _ndim(n.args[0]) or 0
        return all(d not in (-1, nd - 1) for d in n.args[1:3])
    return True  # reshapes that keep the last axis' size (checked by the caller; verified by function)


_MATMUL = {operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm"}


#: A query scaled by a number (timm's ``q * self.scale``) stays per-head features.
_SCALING = {operator.mul, operator.truediv, torch.mul, "mul", "div"}


def _permute_keeps_last(n: fx.Node) -> bool:
    """``x.permute(...)`` (or ``torch.permute``) that leaves the last axis last (GPT-2's heads: ``(0, 2, 1, 3)``)."""
    if n.target not in ("permute", torch.permute):
        return False
    dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], tuple | list) else n.args[1:]
    nd = _ndim(n.args[0]) or 0
    return bool(dims) and all(isinstance(d, int) for d in dims) and len(dims) == nd and dims[-1] % nd == nd - 1


def _shape_of(n: fx.Node) -> tuple[int, ...] | None:
    meta = getattr(n, "meta", {}).get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


#: Comparisons of features with a number: a mask of the features' own units.
_COMPARISONS = {operator.gt, operator.lt, operator.ge, operator.le, torch.gt, torch.lt, torch.ge, torch.le, "gt", "lt",
                "ge", "le"}


#: A parameter in another dtype (or memory layout): still the parameter, as layers read it.
_PARAMETER_CASTS = {"type", "float", "double", "half", "bfloat16", "to", "contiguous"}


#: Operations whose output, where each tensor they read is one value along the last axis, is one value there too.
_KEEPS_UNIFORM_LAST = {"float", "to", "type", "type_as", "half", "bfloat16", "double", "long", "int", "bool",
                       "contiguous", "clone", "detach", operator.mul, operator.truediv, operator.add, operator.sub,
                       operator.invert, operator.neg, torch.mul, torch.div, torch.add, torch.sub, "mul", "div", "add",
                       "sub", "neg", torch.clamp, "clamp", torch.clamp_min, "clamp_min", torch.clip, "clip",
                       torch.logical_not, "logical_not", operator.ne, operator.eq, torch.ne, torch.eq, "ne", "eq",
                       torch.where}
#: Broadcasts of a tensor to another's shape: one value along the last axis stays one value there.
_BROADCASTS = {"expand", "expand_as", torch.broadcast_to, "broadcast_to"}


def _uniform_last(n: Any, depth: int = 0) -> bool:
    """Whether ``n`` holds one value along its last axis whatever the input: a size-1 last axis, a broadcast of
    one (sentence-transformers' ``mask.unsqueeze(-1).expand(h.size())``), casts and arithmetic of such tensors and
    numbers, and sums or means of them over other axes. A mask or weight per token scales every feature alike."""
    if not isinstance(n, fx.Node):
        return True  # a number
    if _last(n) in (None, 1):
        return True  # a number, a 0-d tensor or a size-1 last axis
    if depth > 32 or n.op not in ("call_function", "call_method"):
        return False
    tensors = [a for a in n.all_input_nodes if a.meta.get("tensor_meta") is not None]
    if n.target in _BROADCASTS:
        return bool(n.args) and _uniform_last(n.args[0], depth + 1)
    if n.target in _TOKEN_OPS:
        return _keeps_last(n) and bool(n.args) and _uniform_last(n.args[0], depth + 1)
    if n.target in ("repeat", "tile", torch.tile):
        reps = n.args[1:] if n.target == "repeat" else n.args[1:2]
        reps = reps[0] if len(reps) == 1 and isinstance(reps[0], tuple | list) else reps
        return bool(reps) and isinstance(reps[-1], int) and _uniform_last(n.args[0], depth + 1)
    return n.target in _KEEPS_UNIFORM_LAST and bool(tensors) and all(_uniform_last(a, depth + 1) for a in tensors)
