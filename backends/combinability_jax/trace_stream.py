"""Symmetries of a user's flax transformer, found by tracing the spaces of its arrays' axes.

:func:`jax.make_jaxpr` of ``module.apply`` gives the dataflow (jitted and custom-derivative calls inlined, as in
:mod:`combinability_jax.trace`). Every axis of every array gets a *label*: a space (a union-find class),
``FIXED`` (batch and token axes, the input's, the output's) or ``ANY`` (a broadcast axis). A parameter opens one
space per axis; ``dot_general`` merges the axes it contracts or batches (so ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Embed``'s gather and raw ``x @ W`` all bind their kernels), element-wise operations merge axis by axis,
slices, pooling, token indexing and reshapes keep or fix axes; a layer's features cut along the last axis by
``jnp.split`` or by slices that tile them (nanoGPT's fused ``c_attn``) are packed parts, a space each.
Element-wise nonlinearities, products of two
varying arrays, reductions over features and products of two activations (attention scores and mixing) mark their
spaces *nonlinear*: permutations only.

``nn.LayerNorm`` and ``nn.RMSNorm`` over the last axis are read whole: their output keeps the input's space, their
scale and bias bind it, and the layers reading their output (through token pooling and indexing) are the readers
:func:`combinability.fold_norms` folds them into. A space no nonlinearity touches whose norms all fold — a residual
stream — is an :class:`~combinability.kinds.Orthogonal` map (``fix_ones`` when a LayerNorm centres it).

Heads: a reshape splitting a space ``(h·dh) -> (h, dh)`` gives a head axis and a within-head axis; spaces whose
within-head axes are contracted together (query and key) are one :class:`~combinability.kinds.Blocks` name, and
every split space whose head axis meets theirs (value, through the attention weights) moves with the same group,
as the torch tracer's ``qk``/``vo`` heads. A within-head axis that something fixes (rotary tables, slices of
head_dim) leaves its heads moving whole (rigid: ``Repeat`` of the head order); key/value heads repeated over the
query heads (``jnp.repeat``, grouped-query attention) make the query heads blocks of the key/value heads' order.
``flax.linen.MultiHeadDotProductAttention`` keeps heads on an axis of
their own (kernels ``(d, heads, dh)`` and ``(heads, dh, d)``): there the head axis is a plain permutation and the
within-head axes of query/key and of value/output are plain permutations *shared by all heads* (one name per
axis); :func:`combinability.derive_symmetries` makes them per head (:func:`combinability.module_stacks.merge_blocks`).
Experts: a gate value repeated over each expert's units (``jnp.repeat`` of top-k or softmax
gates: a reshape merging ``(E, units)``) makes the units ``Blocks`` with the gate's space as group; ``top_k`` and
``argmax`` indices turned back into one-hot gates (``jax.nn.one_hot``) keep the gate's space. A gate value taken by
number (``gates[:, e:e + 1]``) weighs the module of that number: the gate's experts, held as separate submodules,
are stacked as blocks of its space (:mod:`combinability.module_stacks`).

The union-find of spaces and the spec built from the traced facts are shared with the torch tracer:
:mod:`combinability.feature_spaces`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from combinability.errors import PermutationSpecError, TracingError
from combinability.feature_spaces import ANY, FIXED, FeatureSpaces, Norm, ReshapeGroups, spec_from_spaces
from combinability.folding import NormFold, Reader
from combinability.module_stacks import module_of, sibling_modules, stack_experts
from combinability.permutation import PermutationSpec
from combinability_jax.jaxpr_walk import JaxprWalker
from combinability_jax.nnx_bridge import call_path
from combinability_jax.trace import train_kwargs

__all__ = ["stream_symmetries"]

_LINEAR_UNARY = {"neg", "convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision"}
_ADDITIVE = {"add", "add_any", "sub"}
_SCALING = {"mul", "div"}
_ELEMENTWISE = {"max", "min", "exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "erf", "erfc", "erf_inv",
                "integer_pow", "pow", "sqrt", "rsqrt", "cbrt", "abs", "sign", "square", "select_n", "clamp", "gt",
                "ge", "lt", "le", "eq", "ne", "and", "or", "not", "xor", "floor", "ceil", "round", "is_finite",
                "sin", "cos", "tan", "atan2", "nextafter", "rem"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
_NORMS = (nn.LayerNorm, nn.RMSNorm)
_RANDOM = {"random_seed", "random_split", "random_bits", "random_wrap", "random_unwrap", "random_fold_in",
           "threefry2x32"}
_KEEPS_VALUES = {"broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "copy", "copy_p", "expand_dims"}


@dataclass
class _Norm:
    path: str
    module: nn.Module
    src: int
    out: int | None = None


class _StreamTrace(JaxprWalker):
    """The jaxpr of ``module.apply(variables, x)`` as flat equations, and every array's axis labels."""

    def __init__(self, module: nn.Module, variables: Any, x: Any) -> None:
        self.name = type(module).__name__
        self.hint = (f"; pass spec= (a combinability.PermutationSpec, with kinds for heads and the residual stream) "
                     f"by hand to cb.ModelPair for this {self.name}")
        self.leaves: dict[str, nn.Module] = {}
        self._walk(module, variables, x, self._intercept, train_kwargs(module, False))
        self.param_shapes = {p: self.shape[i] for i, p in self.src.items()}
        self.sp = FeatureSpaces()
        self.labels: dict[int, list[int | None]] = {self.inputs[-1]: [FIXED] * len(self.shape[self.inputs[-1]])}
        self.dep: dict[int, str] = {self.inputs[-1]: "act"}
        self.binds: dict[str, list[int | None]] = {}
        self.origin: dict[int, tuple[str, bool]] = {}  # id -> (parameter, reshaped)
        self.index_of: dict[int, int] = {}  # indices into a space (top_k, argmax)
        self.iota_axis: dict[int, int] = {}
        self.groups = ReshapeGroups(self.sp, self.hint)  # heads and experts seen through reshapes
        self.norms: dict[str, _Norm] = {}
        self.selecting: dict[int, str] = {}  # a space one unit of which is taken by number -> where (expert gates)
        self.packed: dict[int, tuple[int, ...]] = {}  # a layer's output space split into parts -> the parts' spaces
        self.sliced: dict[int, list[tuple[int, int, int]]] = {}  # a layer's output space -> (start, stop, part)
        self.layer_scales: list[tuple[str, int, Reader]] = []  # (γ, its space, the Dense it scales)
        self.producer = {o: k for k, op in enumerate(self.ops) for o in op[3]}
        self.uses: dict[int, int] = {}
        for op in self.ops:
            for i in op[2]:
                self.uses[i] = self.uses.get(i, 0) + 1
        self.rms_of, self.rms_statistics = self._rms_normalised()  # RMSNorms written out
        self.rms_norms: list[tuple[str, int, int]] = []  # (weight, its space, the scaled output)
        last = {op[4]: k for k, op in enumerate(self.ops)}
        for k, (prim, params, ins, outs, scope) in enumerate(self.ops):
            if scope.startswith("L="):
                self._norm_op(scope[2:], ins, outs, last[scope] == k)
            else:
                self._op(prim, params, ins, outs, scope[2:].replace(".", "/"))
        for o in self.out:
            for s in self._lab(o):
                self.sp.union(s, FIXED)

    # -- tracing -------------------------------------------------------------------------------------------------

    def _intercept(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        m, path = context.module, ".".join(call_path(context))  # "/" splits jax's name stack
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        leaf = isinstance(m, _NORMS)
        if leaf and path in self.leaves:
            raise TracingError(f"module {path!r} ({type(m).__name__}) is called twice: shared weights, or layers "
                               "stacked by nn.scan/nnx.scan (one array per parameter for all layers), which are "
                               "not traced: unroll them into a loop over blocks" + self.hint)
        if leaf:
            self.leaves[path] = m
        with jax.named_scope(("L=" if leaf else "C=") + path):
            return next_fun(*args, **kwargs)

    def _scope(self, marks: list[str], scope: str) -> str:
        """Inside a norm, the norm (whose operations are read whole); else the innermost module."""
        return next((s for s in marks if s[:2] == "L="), super()._scope(marks, scope))

    def _lab(self, i: int) -> list[int | None]:
        """The labels of array ``i`` (a parameter opens a space per axis on first use; constants are fixed)."""
        if i not in self.labels:
            shape = self.shape[i]
            if i in self.src:
                p = self.src[i]
                stem = p.removeprefix("params/")
                stem = stem.rsplit("/", 1)[0] if stem.endswith(("/kernel", "/embedding")) else stem
                self.labels[i] = [ANY if n == 1 else self.sp.new(stem if a == len(shape) - 1 else f"{stem}:{a}", n)
                                  for a, n in enumerate(shape)]
                self.binds[p] = list(self.labels[i])
                self.dep[i], self.origin[i] = "param", (p, False)
            else:
                self.labels[i] = [ANY if n == 1 else FIXED for n in shape]
                self.dep[i] = "const"
        return self.labels[i]

    def _where(self, prim: Any, path: str) -> str:
        return f"operation {prim.name!r} in {f'module {path!r}' if path else f'the top-level {self.name}'}"

    def _norm_op(self, path: str, ins: list[int], outs: list[int], last: bool) -> None:
        m = self.leaves[path]
        rec = self.norms.get(path)
        if rec is None:
            src = next((i for i in ins if self.dep.get(i) in ("act", "param") and i not in self.src), None)
            if src is None:
                raise TracingError(f"module {path!r} ({type(m).__name__}) normalises no activation" + self.hint)
            nd = len(self.shape[src])
            axes = [tuple(int(a) % nd for a in np.atleast_1d(getattr(m, attr, -1)))
                    for attr in ("reduction_axes", "feature_axes")]
            if axes != [(nd - 1,), (nd - 1,)]:
                raise TracingError(f"module {path!r} ({type(m).__name__}): a norm must normalise and scale the last "
                                   f"axis only" + self.hint)
            rec = self.norms[path] = _Norm(path.replace(".", "/"), m, src)
        for o in outs:
            self.dep[o] = "act"
        if last:
            rec.out = outs[0]
            self.labels[outs[0]] = list(self._lab(rec.src))

    def _op(self, prim: Any, p: dict, ins: list[int], outs: list[int], path: str) -> None:
        n, sp = prim.name, self.sp
        labs = [self._lab(i) for i in ins]
        deps = [self.dep[i] for i in ins]
        dep = "act" if "act" in deps else "param" if "param" in deps else "const"
        for o in outs:
            self.dep[o] = dep
        shape = self.shape[outs[0]] if outs else ()
        where = self._where(prim, path)
        indexed = [i for i in ins if i in self.index_of]
        if indexed and n not in _KEEPS_VALUES and n not in ("eq", "ne"):
            raise TracingError(f"{where} uses indices into a feature axis (from top_k or argmax); the tracer follows "
                               "them only into one-hot gates (jax.nn.one_hot)" + self.hint)
        if n in _KEEPS_VALUES and indexed:
            self.index_of[outs[0]] = self.index_of[indexed[0]]
        if n in ("convert_element_type", "copy", "copy_p") and ins[0] in self.origin:
            self.origin[outs[0]] = self.origin[ins[0]]
        elif n in ("reshape", "broadcast_in_dim") and ins and ins[0] in self.origin:
            self.origin[outs[0]] = (self.origin[ins[0]][0], True)
        if outs and outs[0] in self.rms_statistics:  # rsqrt(mean(x ** 2) + eps): a number per token
            self.labels[outs[0]] = [ANY if d == 1 else FIXED for d in shape]
            return
        if outs and outs[0] in self.rms_of:  # x / rms(x): every orthogonal map of x's features keeps it
            self.labels[outs[0]] = list(self._lab(self.rms_of[outs[0]]))
            return
        if n == "mul" and self._rms_scale(ins, deps, labs, outs[0]):
            return
        if n in _RANDOM:  # keys for a cell's initial carry (flax's nn.RNN): constants of no feature
            for o in outs:
                self.labels[o], self.dep[o] = [ANY if s == 1 else FIXED for s in self.shape[o]], "const"
        elif n == "scan_carry_in":  # a carry: the initial one's axes, each a space the body's uses join
            self.labels[outs[0]] = [s if s is not ANY else (ANY if d == 1 else sp.new(f"{path}:carry"))
                                    for s, d in zip(labs[0], shape, strict=True)]
            self.dep[outs[0]] = "act"  # it is the last step's result: varying
        elif n == "scan_slice":  # one step of a scanned array: its first axis (the steps) dropped
            self.labels[outs[0]] = list(labs[0][1:])
        elif n == "scan_carry_out":  # the body's carry out is the next step's carry in
            self.labels[outs[0]] = [sp.union(a, b) for a, b in zip(labs[0], labs[1], strict=True)]
        elif n == "scan_stack":  # the steps' results along a new first axis, the steps in place
            self.labels[outs[0]] = [FIXED, *labs[0]]
        elif n == "iota":
            self.labels[outs[0]] = [ANY if s == 1 else FIXED for s in shape]
            self.iota_axis[outs[0]] = int(p["dimension"])
            self.dep[outs[0]] = "const"
        elif n in _LINEAR_UNARY or n in _ADDITIVE | _SCALING | _ELEMENTWISE:
            self._elementwise(n, ins, labs, deps, outs[0], where)
        elif n == "broadcast_in_dim":
            out: list[int | None] = [ANY] * len(shape)
            for a, d in enumerate(p["broadcast_dimensions"]):
                out[d] = ANY if self.shape[ins[0]][a] == 1 and shape[d] != 1 else labs[0][a]
            self.labels[outs[0]] = out
            if ins[0] in self.iota_axis:
                self.iota_axis[outs[0]] = p["broadcast_dimensions"][self.iota_axis[ins[0]]]
        elif n == "tile":  # copies along axes (Scenic's ``jnp.tile(cls, [n, 1, 1])``): an axis of one is broadcast
            self.labels[outs[0]] = [s if r == 1 else ANY if d == 1 else sp.union(s, FIXED)
                                    for s, r, d in zip(labs[0], p["reps"], self.shape[ins[0]], strict=True)]
        elif n == "reshape":
            if p.get("dimensions") is not None:
                raise TracingError(f"{where}: reshapes that transpose are not followed" + self.hint)
            self.labels[outs[0]] = self.groups.reshape(self.shape[ins[0]], labs[0], shape, where, path or self.name)
        elif n == "squeeze":
            drop = {int(d) % len(labs[0]) for d in p["dimensions"]}
            self.labels[outs[0]] = [s for a, s in enumerate(labs[0]) if a not in drop]
        elif n == "transpose":
            self.labels[outs[0]] = [labs[0][a] for a in p["permutation"]]
            if ins[0] in self.iota_axis:
                self.iota_axis[outs[0]] = list(p["permutation"]).index(self.iota_axis[ins[0]])
        elif n == "slice" and self._picks_gate_value(p, labs[0], ins[0]):
            axis = self._picks_gate_value(p, labs[0], ins[0]) - 1
            self.selecting.setdefault(self.sp.find(labs[0][axis]), where)
            self.labels[outs[0]] = [FIXED if a == axis else s for a, s in enumerate(labs[0])]
        elif n == "split" and self._layer_output(labs[0], ins[0], int(p["axis"])):
            self._split(labs[0], [int(v) for v in p["sizes"]], outs, path)
        elif n == "slice" and self._slices_features(p, labs[0], ins[0]):
            self._slice(p, labs[0], outs[0], path)
        elif n == "split":  # parts of an axis that is not a layer's whole output (a rotary's halves of each head's
            axis = int(p["axis"]) % len(labs[0])  # units, ``jnp.split(x, 2, axis=-1)``): kept in place, as slices
            for o in outs:
                self.labels[o] = [sp.union(s, FIXED) if a == axis else s for a, s in enumerate(labs[0])]
        elif n in ("slice", "dynamic_slice", "pad", "rev"):
            src = self.shape[ins[0]]
            if n == "slice":
                kept = [a for a in range(len(src)) if p["start_indices"][a] == 0 and p["limit_indices"][a] == src[a]
                        and (p["strides"] is None or p["strides"][a] == 1)]
            elif n == "dynamic_slice":
                kept = [a for a in range(len(src)) if p["slice_sizes"][a] == src[a]]
            elif n == "pad":
                kept = [a for a, c in enumerate(p["padding_config"]) if tuple(c) == (0, 0, 0)]
            else:
                kept = [a for a in range(len(src)) if a not in p["dimensions"]]
            self.labels[outs[0]] = [s if a in kept else sp.union(s, FIXED) for a, s in enumerate(labs[0])]
        elif n == "concatenate":
            d = int(p["dimension"])
            if any(s is not ANY and not sp.is_fixed(s) for lab in labs for s in lab[d:d + 1]):
                raise TracingError(f"{where}: concatenating features (a feature axis){self.hint}")
            out = list(labs[0])
            for lab in labs[1:]:
                out = [sp.union(a, b) for a, b in zip(out, lab, strict=True)]
            out[d] = FIXED
            self.labels[outs[0]] = out
        elif n == "stack":  # arrays side by side along a new axis, which tells them apart (not a feature)
            out = list(labs[0])
            for lab in labs[1:]:
                out = [sp.union(a, b) for a, b in zip(out, lab, strict=True)]
            self.labels[outs[0]] = out[:int(p["axis"])] + [FIXED] + out[int(p["axis"]):]
        elif n in _REDUCE:
            axes = {int(a) for a in p["axes"]}
            sp.mark([labs[0][a] for a in axes])
            self.labels[outs[0]] = [s for a, s in enumerate(labs[0]) if a not in axes]
            feature = [labs[0][a] for a in axes if labs[0][a] is not ANY and not sp.is_fixed(labs[0][a])]
            if n in ("argmax", "argmin") and feature:
                self.index_of[outs[0]] = feature[0]
        elif n == "top_k":
            axis = int(p.get("axis", -1)) % len(labs[0])
            sp.mark([labs[0][axis]])
            for o in outs:
                self.labels[o] = [FIXED if a == axis else s for a, s in enumerate(labs[0])]
            if labs[0][axis] is not ANY and not sp.is_fixed(labs[0][axis]):
                self.index_of[outs[1]] = labs[0][axis]
        elif n == "dot_general":
            self.labels[outs[0]] = self._dot(p, ins, labs, deps)
        elif n == "conv_general_dilated":
            self.labels[outs[0]] = self._conv(p, labs, len(shape), where)
        elif n == "gather":
            self.labels[outs[0]] = self._gather(p, ins, labs, shape)
        elif dep == "const":  # of constants only (an rng's counter updated in place): a constant of no feature
            for o in outs:
                self.labels[o] = [ANY if s == 1 else FIXED for s in self.shape[o]]
        else:
            raise TracingError(f"{where}: the stream tracer cannot follow this operation on features" + self.hint)

    def _layer_output(self, lab: list[int | None], i: int, axis: int) -> bool:
        """Whether ``axis`` of array ``i`` is the last, a space of varying features that only one module's
        parameters bind so far (a layer's output, its bias added: nanoGPT's fused ``c_attn``)."""
        s = lab[-1] if lab else None
        if axis % len(lab) != len(lab) - 1 or s is ANY or self.sp.is_fixed(s) or self.dep.get(i) != "act":
            return False
        root = self.sp.find(s)
        bound = {p.rsplit("/", 1)[0] for p, labels in self.binds.items()
                 if any(t is not ANY and self.sp.find(t) == root for t in labels)}
        return len(bound) == 1

    def _split(self, lab: list[int | None], sizes: list[int], outs: list[int], path: str) -> None:
        """``jnp.split`` of a layer's features into parts (a fused query/key/value): a space per part."""
        root = self.sp.find(lab[-1])
        parts = self.packed.get(root)
        if parts is None or [self.sp.size[s] for s in parts] != sizes:
            if parts is not None or root in self.sliced:
                raise TracingError(f"a layer's features split two ways in {path or self.name}{self.hint}")
            parts = self.packed[root] = self._parts(root, sizes)
        for o, part in zip(outs, parts, strict=True):
            self.labels[o] = [*lab[:-1], part]

    def _parts(self, root: int, sizes: list[int]) -> tuple[int, ...]:
        """New spaces for parts of ``root``'s features (nonlinear where it is)."""
        stem = self.sp.opener[root]
        names = ("q", "k", "v") if len(sizes) == 3 else tuple(str(k) for k in range(len(sizes)))
        parts = tuple(self.sp.new(f"{stem}.{names[k]}", size) for k, size in enumerate(sizes))
        if self.sp.is_nonlinear(root):
            self.sp.mark(parts)
        return parts

    def _slices_features(self, p: dict, lab: list[int | None], i: int) -> bool:
        """Whether a slice takes a contiguous range of a layer's features (the last axis), every other axis whole
        (``qkv[..., :d]``)."""
        src = self.shape[i]
        whole = all(p["start_indices"][a] == 0 and p["limit_indices"][a] == src[a] for a in range(len(src) - 1))
        return whole and (p["strides"] is None or p["strides"][-1] == 1) and self._layer_output(lab, i, -1) and \
            self.sp.find(lab[-1]) not in self.packed

    def _slice(self, p: dict, lab: list[int | None], out: int, path: str) -> None:
        """A part of a layer's features taken by a slice; the parts are packed once they tile the features
        (:meth:`spec`), and fixed if they do not."""
        root = self.sp.find(lab[-1])
        start, stop = int(p["start_indices"][-1]), int(p["limit_indices"][-1])
        taken = self.sliced.setdefault(root, [])
        part = next((s for a, b, s in taken if (a, b) == (start, stop)), None)
        if part is None:
            part = self._parts(root, [stop - start])[0]
            taken.append((start, stop, part))
        self.labels[out] = [*lab[:-1], part]

    def _packed_parts(self) -> dict[int, tuple[int, ...]]:
        """Each split or sliced layer's output space (by class) -> its parts' spaces in order; slices that do not
        tile their features (a partial rotary's ``q[..., :r]`` alone) fix the features and the slices."""
        packed = {self.sp.find(s): parts for s, parts in self.packed.items()}
        for root, taken in self.sliced.items():
            taken = sorted(taken)
            stops = [0] + [b for _, b, _ in taken]
            if [a for a, _, _ in taken] == stops[:-1] and stops[-1] == self.sp.size[root]:
                packed[self.sp.find(root)] = tuple(s for _, _, s in taken)
                names = ("q", "k", "v") if len(taken) == 3 else tuple(str(k) for k in range(len(taken)))
                for (_, _, s), name in zip(taken, names, strict=True):  # named as a split's parts
                    self.sp.opener[s] = f"{self.sp.opener[root]}.{name}"
            else:
                self.sp.fix([root, *(s for _, _, s in taken)])
        return packed

    def _picks_gate_value(self, p: dict, lab: list[int | None], i: int) -> int:
        """1 + the axis of a slice taking one unit of a space, all other axes whole (``gates[:, e:e + 1]``, the gate
        value of expert ``e``); 0 when it is another slice."""
        src = self.shape[i]
        cut = [a for a in range(len(src)) if not (p["start_indices"][a] == 0 and p["limit_indices"][a] == src[a])]
        if len(cut) != 1 or (p["strides"] is not None and p["strides"][cut[0]] != 1):
            return 0
        a = cut[0]
        s = lab[a]
        one = p["limit_indices"][a] - p["start_indices"][a] == 1
        return a + 1 if one and s is not ANY and not self.sp.is_fixed(s) and self.dep[i] == "act" else 0

    def _conv(self, p: dict, labs: list[list[int | None]], rank: int, where: str) -> list[int | None]:
        """A convolution (a patch embedding): its input channels and the kernel's meet; the kernel's
        output channels open the output's; positions are mixed, so every spatial axis is fixed."""
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            raise TracingError(f"{where}: grouped convolutions are not followed by the stream tracer" + self.hint)
        lhs, rhs, out_spec = p["dimension_numbers"]
        x, kernel = labs
        self.sp.union(x[lhs[1]], kernel[rhs[1]])
        self.sp.fix([x[a] for a in lhs[2:]] + [kernel[a] for a in rhs[2:]])
        out: list[int | None] = [FIXED] * rank
        out[out_spec[0]], out[out_spec[1]] = x[lhs[0]], kernel[rhs[0]]
        return out

    def _elementwise(self, n: str, ins: list[int], labs: list[list[int | None]], deps: list[str], out: int,
                     where: str) -> None:
        sp, shape = self.sp, self.shape[out]
        operands = [(i, lab, d) for i, lab, d in zip(ins, labs, deps, strict=True) if len(self.shape[i])]
        if any(len(self.shape[i]) != len(shape) for i, _, _ in operands):
            raise TracingError(f"{where}: operands of different ranks" + self.hint)
        onehot = n in ("eq", "ne") and self._one_hot(ins, out)
        if any(i in self.index_of for i in ins) and not onehot:
            raise TracingError(f"{where} compares indices into a feature axis (from top_k or argmax) with something "
                               "other than an iota (jax.nn.one_hot)" + self.hint)
        result: list[int | None] = [ANY] * len(shape)
        for i, lab, _ in operands:
            for a, s in enumerate(lab):
                if self.shape[i][a] == shape[a] and not (onehot and a == onehot[0]):
                    result[a] = sp.union(result[a], s)
        if onehot:
            result[onehot[0]] = onehot[1]
        self.labels[out] = result
        if self.dep[out] == "const":
            return
        varying = [d for i, lab, d in operands if d != "const" or any(s is not ANY for s in lab)]
        if n in _LINEAR_UNARY:
            return
        if n in _ADDITIVE and not any(d == "const" for d in deps):
            return
        if n in _SCALING and len(varying) < 2 and (n == "mul" or (operands and operands[0][2] != "const")):
            return
        if n == "mul" and self._layer_scale(ins, deps, result):
            return  # a LayerScale: folds into the Dense it scales
        sp.mark(result)

    def _uncast(self, i: int) -> int:
        """Array ``i`` before the casts (``convert_element_type``) that made it."""
        while (k := self.producer.get(i)) is not None and self.ops[k][0].name in ("convert_element_type", "copy",
                                                                                   "copy_p"):
            i = self.ops[k][2][0]
        return i

    def _rms_normalised(self) -> tuple[dict[int, int], set[int]]:
        """RMSNorms written out (``x * lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps)``): each
        normalised output -> ``x``, and the arrays of their statistics (numbers per token)."""
        out: dict[int, int] = {}
        stats: set[int] = set()
        for prim, _, ins, outs, _ in self.ops:
            if prim.name != "mul" or len(ins) != 2:
                continue
            for x, h in (ins, ins[::-1]):
                chain = self._rms_statistic(h, x)
                if chain is not None:
                    out[outs[0]] = x
                    stats |= chain
                    break
        return out, stats

    def _rms_statistic(self, h: int, x: int) -> set[int] | None:
        """The arrays of ``rsqrt(mean(x ** 2, last axis, keepdims) + eps)`` ending at ``h``, or None."""
        chain: list[int] = []

        def made(i: int, *names: str) -> tuple[Any, dict, list[int]] | None:
            k = self.producer.get(i)
            if k is None or self.ops[k][0].name not in names:
                return None
            chain.append(i)
            return self.ops[k][0], self.ops[k][1], self.ops[k][2]

        op = made(h, "rsqrt")
        op = op and made(op[2][0], "add")
        if not op or len(op[2]) != 2 or not any(i in self.const for i in op[2]):
            return None
        i = next(i for i in op[2] if i not in self.const)
        op = made(i, "div", "mul")  # the sum over the features divided by their number (the mean)
        if not op or len(op[2]) != 2 or op[2][1] not in self.const:
            return None
        i = op[2][0]
        while (op := made(i, "broadcast_in_dim", "reshape", "expand_dims")) is not None:  # keepdims
            i = op[2][0]
        op = made(i, "reduce_sum")
        if not op or tuple(op[1]["axes"]) != (len(self.shape[op[2][0]]) - 1,):
            return None
        squared = op[2][0]
        op = made(squared, "square", "integer_pow", "mul", "pow")
        if not op:
            return None
        name, params, args = op
        if (name.name == "integer_pow" and params["y"] != 2) or (name.name == "mul" and args[0] != args[1]) or \
                (name.name == "pow" and not (args[1] in self.const and float(self.const[args[1]]) == 2.0)):
            return None
        return set(chain) if self._uncast(args[0]) == self._uncast(x) else None

    def _rms_scale(self, ins: list[int], deps: list[str], labs: list[list[int | None]], out: int) -> bool:
        """Record and say whether a product scales an RMSNorm's normalised output (through casts) by a learned
        vector of its features: the norm's weight, folded into the layers reading it."""
        if len(ins) != 2 or sorted(deps) != ["act", "param"]:
            return False
        w, h = (ins[0], ins[1]) if deps[0] == "param" else (ins[1], ins[0])
        weight = self.origin.get(w, (None, False))[0]
        if weight is None or len(self.param_shapes[weight]) != 1 or self._uncast(h) not in self.rms_of:
            return False
        s = self.sp.union(labs[ins.index(w)][-1], labs[ins.index(h)][-1])
        if s is ANY or self.sp.is_fixed(s):
            return False
        self.labels[out] = [*labs[ins.index(h)][:-1], s]
        self.rms_norms.append((weight, s, out))
        return True

    def _layer_scale(self, ins: list[int], deps: list[str], result: list[int | None]) -> bool:
        """Record and say whether a product is a learned vector ``γ`` of features times a Dense layer's output
        read by nothing else (a transformer's LayerScale, ``x + γ * Dense(h)``)."""
        if len(ins) != 2 or sorted(deps) != ["act", "param"]:
            return False
        g, h = (ins[0], ins[1]) if deps[0] == "param" else (ins[1], ins[0])
        gamma = self.origin.get(g, (None, False))[0]
        if gamma is None or len(self.param_shapes[gamma]) != 1 or self.uses.get(h, 0) != 1:
            return False
        bias = None
        k = self.producer.get(h)
        if k is not None and self.ops[k][0].name in ("add", "add_any"):  # the Dense's bias, added
            ops_in = self.ops[k][2]
            biases = [i for i in ops_in if self.origin.get(i, (None, False))[0] is not None]
            rest = [i for i in ops_in if i not in biases]
            if len(biases) != 1 or len(rest) != 1 or len(self.param_shapes[self.origin[biases[0]][0]]) != 1 or \
                    self.uses.get(rest[0], 0) != 1:
                return False
            bias, k = self.origin[biases[0]][0], self.producer.get(rest[0])
        if k is None or self.ops[k][0].name != "dot_general":
            return False
        _, p, dot_in, _, _ = self.ops[k]
        kernels = [i for i in dot_in if i in self.origin and not self.origin[i][1]]
        if len(kernels) != 1 or len(self.param_shapes[self.origin[kernels[0]][0]]) != 2:
            return False
        (lc, rc), _ = p["dimension_numbers"]
        side = dot_in.index(kernels[0])
        if list((lc, rc)[side]) != [0] or side != 1:  # x @ kernel (in, out): the output's units are axis 1
            return False
        s = result[-1]
        if s is ANY or self.sp.is_fixed(s):
            return False
        self.layer_scales.append((gamma, s, Reader(self.origin[kernels[0]][0], 1, bias)))
        return True

    def _one_hot(self, ins: list[int], out: int) -> tuple[int, int] | None:
        """``(axis, space)`` when ``eq`` compares indices into a space with an iota along ``axis`` (a one-hot)."""
        idx = [i for i in ins if i in self.index_of]
        iota = [i for i in ins if i in self.iota_axis]
        if len(idx) != 1 or len(iota) != 1:
            return None
        s, axis = self.index_of[idx[0]], self.iota_axis[iota[0]]
        if self.sp.size[s] != self.shape[out][axis] or self.shape[idx[0]][axis] != 1:
            return None
        self.sp.mark([s])
        return axis, s

    def _dot(self, p: dict, ins: list[int], labs: list[list[int | None]], deps: list[str]) -> list[int | None]:
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        sp, (left, right) = self.sp, labs
        if deps[0] == deps[1] == "act":  # attention: scores and mixing by activations, permutations only
            if lc and all(self.shape[ins[0]][a] == 1 for a in lc):  # weights over a single key mix the values
                raise TracingError(f"{self.name}: attention over a single position on example_input; the check "
                                   "of the derived symmetries needs attention at work: pass example_input with two "
                                   "or more tokens (more tokens than heads is best)" + self.hint)
            sp.mark(left + right)
        for a, b in zip(lc, rc, strict=True):
            sp.union(left[a], right[b])
        out = [sp.union(left[a], right[b]) for a, b in zip(lb, rb, strict=True)]
        out += [s for a, s in enumerate(left) if a not in (*lc, *lb)]
        return out + [s for a, s in enumerate(right) if a not in (*rc, *rb)]

    def _gather(self, p: dict, ins: list[int], labs: list[list[int | None]], shape: tuple) -> list[int | None]:
        dn, src = p["dimension_numbers"], self.shape[ins[0]]
        out: list[int | None] = [FIXED] * len(shape)
        dropped = {*dn.collapsed_slice_dims, *getattr(dn, "operand_batching_dims", ())}
        kept = [a for a in range(len(src)) if a not in dropped]
        for a in range(len(src)):
            whole = p["slice_sizes"][a] == src[a] and a not in dn.start_index_map
            label = labs[0][a] if whole else self.sp.union(labs[0][a], FIXED)
            if a in kept:
                out[dn.offset_dims[kept.index(a)]] = label
        for s in labs[1]:
            self.sp.union(s, FIXED)
        return out

    # -- the spec ------------------------------------------------------------------------------------------------

    def readers(self, rec: _Norm) -> list[Reader] | None:
        """The layers reading a norm's output (through pooling, token indexing and casts); None if one is not."""
        return self.readers_of(rec.out)

    def readers_of(self, out: int) -> list[Reader] | None:
        """The layers reading array ``out`` (a norm's output), through pooling, token indexing and casts; None if
        one is not a layer."""
        users: dict[int, list[int]] = {}
        for k, op in enumerate(self.ops):
            for i in op[2]:
                users.setdefault(i, []).append(k)
        found: list[Reader] = []
        todo = [(out, len(self.shape[out]) - 1, 1.0)]
        while todo:
            i, axis, factor = todo.pop()
            if i in self.out or not users.get(i):
                return None
            for k in users[i]:
                prim, p, ins, outs, scope = self.ops[k]
                n, o = prim.name, outs[0]
                if scope.startswith("L="):
                    return None
                if n in ("convert_element_type", "copy", "copy_p"):
                    todo.append((o, axis, factor))
                elif n == "reduce_sum" and axis not in p["axes"]:
                    todo.append((o, axis - sum(a < axis for a in p["axes"]),
                                 factor * math.prod(self.shape[i][a] for a in p["axes"])))
                elif n == "squeeze" and axis not in {d % len(self.shape[i]) for d in p["dimensions"]}:
                    todo.append((o, axis - sum(d % len(self.shape[i]) < axis for d in p["dimensions"]), factor))
                elif n == "slice" and p["start_indices"][axis] == 0 and p["limit_indices"][axis] == self.shape[i][axis]:
                    todo.append((o, axis, factor))
                elif n == "transpose":
                    todo.append((o, list(p["permutation"]).index(axis), factor))
                elif n in ("mul", "div") and len(ins) == 2 and ins[0] == i and ins[1] in self.const and \
                        not np.shape(self.const[ins[1]]):
                    c = float(self.const[ins[1]])
                    todo.append((o, axis, factor * c if n == "mul" else factor / c))
                elif n == "mul" and len(ins) == 2 and ins[1] == i and ins[0] in self.const and \
                        not np.shape(self.const[ins[0]]):
                    todo.append((o, axis, factor * float(self.const[ins[0]])))
                elif n == "dot_general":
                    reader = self._reader(k, i, axis, factor, users)
                    if reader is None:
                        return None
                    found.append(reader)
                else:
                    return None
        return found

    def _reader(self, k: int, i: int, axis: int, factor: float, users: dict[int, list[int]]) -> Reader | None:
        _, p, ins, outs, _ = self.ops[k]
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        side = 0 if ins[0] == i else 1
        mine, other = ((lc, rc), (rc, lc))[side], ins[1 - side]
        if ins[0] == ins[1] or not np.isclose(factor, 1.0) or list(mine[0]) != [axis] or (lb, rb)[side]:
            return None
        if other not in self.origin or self.origin[other][1]:
            return None
        kernel, kaxis = self.origin[other][0], int(mine[1][0])
        free = tuple(n for a, n in enumerate(self.param_shapes[kernel]) if a != kaxis)
        bias = None
        for u in users.get(outs[0], []):
            prim, _, uins, _, _ = self.ops[u]
            if prim.name in ("add", "add_any"):
                b = next((j for j in uins if j != outs[0] and j in self.origin), None)
                if b is not None and self.param_shapes[self.origin[b][0]] == free:
                    bias = self.origin[b][0]
        return Reader(kernel, kaxis, bias)

    def spec(self) -> tuple[PermutationSpec, list[NormFold]]:
        """The traced facts handed to :func:`~combinability.feature_spaces.spec_from_spaces`."""
        norms = []
        for rec in self.norms.values():
            s, prefix = self._lab(rec.src)[-1], "params/" + rec.path
            scale, shift = (f"{prefix}/{leaf}" if used and f"{prefix}/{leaf}" in self.param_shapes else None
                            for leaf, used in (("scale", getattr(rec.module, "use_scale", True)),
                                               ("bias", isinstance(rec.module, nn.LayerNorm) and rec.module.use_bias)))
            self.binds.update({p: [s] for p in (scale, shift) if p})
            readers = None if s is ANY or self.sp.is_fixed(s) else self.readers(rec)
            norms.append(Norm(s, scale, shift, isinstance(rec.module, nn.LayerNorm),
                              None if readers is None else tuple(readers)))
        norms += [Norm(s, gamma, None, False, (), writers=(writer,)) for gamma, s, writer in self.layer_scales]
        for weight, s, out in self.rms_norms:  # written out: read whole, as nn.RMSNorm
            readers = self.readers_of(out)
            norms.append(Norm(s, weight, None, False, None if readers is None else tuple(readers)))
        binds = {p: self.binds.get(p, [ANY] * len(shape)) for p, shape in self.param_shapes.items()}
        packed = self._packed_parts()
        find = self.sp.find
        binds = {p: [packed.get(find(e), e) if e is not ANY and not self.sp.is_fixed(e) else e for e in entries]
                 for p, entries in binds.items()}  # a layer whose output is split: its units are packed parts
        routed = self._routed(binds)
        spec, folds = spec_from_spaces(self.sp, binds, norms, self.groups.heads(), self.groups.experts(), self.hint)
        shapes = {p: np.zeros(shape, np.int8) for p, shape in self.param_shapes.items()}
        for (param, axis), experts in routed.items():
            group = spec.axes_to_perm[param][axis]
            if isinstance(group, str) and group not in spec.kinds:
                spec = stack_experts(spec, group, experts, shapes)
        return spec, folds

    def _routed(self, binds: dict[str, list[int | None]]) -> dict[tuple[str, int], list[str]]:
        """For each space whose units weigh modules by number (dense gating over experts held as separate modules):
        ``(gate parameter, axis) -> the experts`` (:func:`~combinability.module_stacks.sibling_modules`). A space
        whose experts are not found stays fixed, as a space cut by a slice is."""
        found: dict[tuple[str, int], list[str]] = {}
        find = self.sp.find
        for s, where in self.selecting.items():
            bound = [(p, a) for p, labels in binds.items() for a, t in enumerate(labels)
                     if t is not ANY and find(t) == find(s)]
            modules = {module_of(p) for p, _ in bound}
            experts = None
            if len(modules) == 1 and not self.sp.is_fixed(s):
                try:
                    experts = sibling_modules(self.param_shapes, modules.pop(), self.sp.size[s] or 0)
                except PermutationSpecError as exc:
                    raise TracingError(f"{where}: {exc}{self.hint}") from None
            if experts is None:
                self.sp.fix([s])
            else:
                found[next((p, a) for p, a in bound if p.endswith("/kernel")) if any(
                    p.endswith("/kernel") for p, _ in bound) else bound[0]] = experts
        return found


def stream_symmetries(module: nn.Module, variables: Any, x: Any) -> tuple[PermutationSpec, list[NormFold]]:
    """The symmetry spec (heads, FFN neurons and experts, residual stream) and the norm folds of a flax module.

    Parameters
    ----------
    module : flax.linen.Module
        The user's module, in inference mode (the flags of
        :data:`~combinability_jax.trace.TRAIN_FLAGS` that its ``__call__`` takes).
    variables : mapping
        Its variables; parameters are named as the jax backend's ``state`` names them
        (``"params/blocks_0/attn/q/kernel"``), axes in flax order (a Dense kernel is ``(in, out)``).
    x : array
        A batch of inputs in the module's own layout.

    Returns
    -------
    (PermutationSpec, list of NormFold)
        The spec and the norms to fold before its orthogonal maps apply.

    Raises
    ------
    TracingError
        Naming the operation (and module) the tracer cannot follow, and saying to pass ``spec=`` by hand.
    """
    return _StreamTrace(module, variables, jnp.asarray(x)).spec()
