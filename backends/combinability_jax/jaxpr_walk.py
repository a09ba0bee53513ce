"""Flattening a flax model's jaxpr into a list of primitive operations (shared by the jax tracers).

:class:`JaxprWalker` numbers every array of the traced computation, inlines nested calls
(``pjit``, custom derivatives, remat), and records each remaining primitive as
``(primitive, params, input ids, output ids, scope)``, where the scope is the innermost
flax module (``C=`` / ``L=`` marks in the name stack, set by the tracers' method
interceptors). The layer-table tracer (:mod:`combinability_jax.trace`) and the stream tracer
(:mod:`combinability_jax.trace_stream`) read these operations differently.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.extend.core import Literal

from combinability import model_outputs
from combinability.data.base import input_fault, integer_hint
from combinability.errors import ExampleInputError, StackedLayersError, TracingError
from combinability_jax.nnx_bridge import intercepting

__all__ = ["JaxprWalker", "INLINE", "logits_of"]

#: Call primitives whose body is walked as if written inline.
INLINE = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "remat", "remat2", "checkpoint"}  # remat2: nn.remat's (gradient checkpointing) in jax 0.4-0.11


def logits_of(out: Any) -> Any:
    """A flax model's logits (:func:`combinability.model_outputs.logits_of`): the model's output
    itself, the first of a tuple, the ``"logits"`` of a dict or output object."""
    return model_outputs.logits_of(out, lambda v: isinstance(v, jax.Array))


class ScanStep:
    """A pseudo-primitive linking a ``scan``'s body, walked once, to its operands and results.

    ``scan_carry_in`` gives the body its carry (the initial carry's value in the first step,
    the last step's afterwards), ``scan_slice`` one step's slice of a scanned operand (the
    first axis dropped), ``scan_carry_out`` the final carry (the body's carry out, which is
    also the next step's carry in), ``scan_stack`` the scanned results (a new first axis).
    Only the stream tracer reads them; anything executing the operations refuses them.
    """

    multiple_results = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SCAN_CARRY_IN, SCAN_SLICE, SCAN_CARRY_OUT, SCAN_STACK = (ScanStep(n) for n in (
    "scan_carry_in", "scan_slice", "scan_carry_out", "scan_stack"))


def mode_hint(exc: Exception, flags: dict) -> str:
    """A note for a flax model that fails when the library calls it, in inference mode, as
    ``module.apply(variables, x, **flags)``: one that still draws dropout masks or updates its batch
    statistics (its mode is a module field, or an argument of another name), or one that needs another
    argument; ``""`` for any other failure."""
    from combinability_jax.trace import TRAIN_FLAGS

    text, kind = str(exc), type(exc).__name__
    called = f"module.apply(variables, x{''.join(f', {k}={v}' for k, v in flags.items())})"
    names = ", ".join(TRAIN_FLAGS)
    if kind == "InvalidRngError" or "needs PRNG" in text:
        what = "draws random numbers (dropout)"
    elif kind == "ModifyScopeVariableError" or "is immutable" in text:
        what = "updates variables (BatchNorm's batch statistics)"
    elif kind == "ScopeCollectionNotFound" or "collection is empty" in text:
        return ("; pass the whole variables dict as module.init returns it ({'params': ..., 'batch_stats': ...}), "
                "not variables['params'] nor one collection alone")
    elif isinstance(exc, TypeError) and "required positional argument" in text:
        return (f"; the library calls {called}: give __call__'s other arguments defaults, or pass a module that "
                "supplies them (functools.partial of __call__ in a wrapper module)")
    else:
        return ""
    return (f"; the library runs the model in inference mode as {called} (it sets the __call__ arguments {names} "
            f"where __call__ takes them), and this model still {what}: a model whose mode is a field "
            "(deterministic: bool = False, train: bool = True) or an argument of another name must be passed built "
            "in inference mode (Model(deterministic=True), Model(train=False))")


class JaxprWalker:
    """Numbered arrays (``shape``, ``const``) and the flat list of operations (``ops``) of a jaxpr."""

    ops: list[tuple[Any, dict, list[int], list[int], str]]
    shape: dict[int, tuple[int, ...]]
    dtype: dict[int, Any]
    const: dict[int, Any]

    name: str

    def _walk(self, module: nn.Module, variables: Any, x: Any, intercept: Any, train_kwargs: dict) -> None:
        """Trace ``module.apply(variables, x)`` (methods seen by ``intercept``) into inputs, src, ops and out."""
        self.ops, self.shape, self.dtype, self.const = [], {}, {}, {}
        try:
            with nn.intercept_methods(intercept), intercepting(intercept):
                closed = jax.make_jaxpr(lambda v, a: logits_of(module.apply(v, a, **train_kwargs)))(variables, x)
        except TracingError:
            raise
        except Exception as exc:
            fault = input_fault(exc, np.asarray(x), "example_input")
            where = f"running {self.name}.apply on example_input of shape {tuple(np.shape(x))}"
            raise ExampleInputError(f"{where}: {fault}" if fault else
                                    f"{where} failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                                    f"{integer_hint(x)}{mode_hint(exc, train_kwargs)}") from None
        self.inputs = [self._new(v.aval.shape, dtype=v.aval.dtype) for v in closed.jaxpr.invars]
        self.src = {i: "/".join(str(getattr(k, "key", k)) for k in path) for i, (path, _) in
                    zip(self.inputs, jax.tree_util.tree_flatten_with_path(variables)[0], strict=False)}
        self.out = self._inline(closed.jaxpr, closed.consts, self.inputs, "C=")

    def _new(self, shape: tuple[int, ...], value: Any = None, dtype: Any = None) -> int:
        i = len(self.shape)
        self.shape[i] = tuple(int(s) for s in shape)
        if dtype is None and value is not None:  # a constant: its own type (a PRNG key's too), a Python number's
            dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
        self.dtype[i] = dtype
        if value is not None:
            self.const[i] = value
        return i

    def _scope(self, marks: list[str], scope: str) -> str:
        """The module an operation belongs to: the innermost marked one, else the caller's."""
        return next((s for s in reversed(marks) if s[:2] in ("L=", "C=")), scope)

    def _inline(self, jaxpr: Any, consts: Any, args: list[int], scope: str) -> list[int]:
        env = dict(zip(jaxpr.constvars, [self._new(np.shape(c), c) for c in consts], strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))

        def read(a: Any) -> int:
            return self._new(np.shape(a.val), a.val) if isinstance(a, Literal) else env[a]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            here = self._scope(str(eqn.source_info.name_stack).split("/"), scope)
            sub = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params), None)
            if eqn.primitive.name in INLINE and sub is not None:
                outs = self._inline(getattr(sub, "jaxpr", sub), getattr(sub, "consts", ()), ins, here)
            elif eqn.primitive.name == "scan":
                outs = self._scan(eqn, ins, here)
            else:
                outs = [self._new(v.aval.shape, dtype=v.aval.dtype) for v in eqn.outvars]
                self.ops.append((eqn.primitive, eqn.params, ins, outs, here))
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(a) for a in jaxpr.outvars]

    def _scan(self, eqn: Any, ins: list[int], scope: str) -> list[int]:
        """A ``scan`` (a recurrent layer's loop): its body walked once, between :class:`ScanStep` operations."""
        p = eqn.params
        body, consts, carries = p["jaxpr"], p["num_consts"], p["num_carry"]
        stacked = sorted({self.src[i] for i in ins[consts + carries:] if i in self.src})
        if stacked:  # a step's slice of a parameter: layers stacked on a first axis, one applied per step
            raise StackedLayersError(f"{self.name} applies layers stacked by a scan (nn.scan, nnx.scan): the "
                                     f"parameters {stacked[:4]}{' ...' if len(stacked) > 4 else ''} are sliced, "
                                     "one layer a step; the tracers follow layers one by one: unroll them into a "
                                     "loop over blocks (each block its own parameters), or pass spec= (a "
                                     "combinability.PermutationSpec) by hand")
        carry_in, sliced = [], []
        for i in ins[consts:consts + carries]:
            carry_in.append(self._new(self.shape[i]))
            self.ops.append((SCAN_CARRY_IN, {}, [i], [carry_in[-1]], scope))
        for i in ins[consts + carries:]:
            sliced.append(self._new(self.shape[i][1:]))
            self.ops.append((SCAN_SLICE, {}, [i], [sliced[-1]], scope))
        results = self._inline(body.jaxpr, body.consts, [*ins[:consts], *carry_in, *sliced], scope)
        outs = []
        for i, r in zip(carry_in, results[:carries], strict=True):
            outs.append(self._new(self.shape[r]))
            self.ops.append((SCAN_CARRY_OUT, {}, [i, r], [outs[-1]], scope))
        for r in results[carries:]:
            outs.append(self._new((int(p["length"]), *self.shape[r])))
            self.ops.append((SCAN_STACK, {}, [r], [outs[-1]], scope))
        return outs
