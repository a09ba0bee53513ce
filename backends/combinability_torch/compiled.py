"""Evaluations through :func:`torch.compile` (``TorchBackend(compile=...)``).

torch keeps the graphs it compiles per code object, and counts recompilations against
``torch._dynamo.config.recompile_limit`` (8) per code object, past which it runs the
function eagerly. Compiling one method for every model would so share one cache: the ninth
model would run eagerly. Here each model structure, layout and set of options has a code
object of its own (a copy of the method's), kept for the process: a model prepared again
(each sweep prepares its models) finds its compiled graphs, and other models do not count
against its limit.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

__all__ = ["compiled_call"]

_log = logging.getLogger("combinability")

#: One copy of a compiled method per (method, structure, options).
_CODE: dict[tuple[Hashable, ...], types.FunctionType] = {}


def _own_code(function: types.FunctionType) -> types.FunctionType:
    """``function`` with a copy of its code object (equal, not the same object)."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def compiled_call(method: types.FunctionType, owner: Any, structure: Hashable, options: Mapping[str, Any],
                  model: str) -> Callable[..., Any]:
    """``method`` bound to ``owner``, through :func:`torch.compile` with ``options``.

    Parameters
    ----------
    method : function
        An unbound method of ``owner``'s class; what it computes must depend on ``owner``
        only through what ``structure`` describes and through tensors.
    owner : object
    structure : hashable
        What tells models apart (their class, parameter names and shapes): equal structures
        share compiled graphs.
    options : mapping
        :func:`torch.compile`'s keyword arguments.
    model : str
        The model's name, for messages.
    """
    key = (method.__qualname__, structure, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _CODE:
        _CODE[key] = _own_code(method)
    return _CompileErrors(torch.compile(_CODE[key].__get__(owner), **options), model)


class _CompileErrors:
    """A compiled function whose compiler's own failures become a :class:`ConfigurationError`
    that says to evaluate without compiling (errors of the model itself pass as they are)."""

    def __init__(self, compiled: Callable[..., Any], model: str) -> None:
        self.compiled, self.model, self.first = compiled, model, True

    def __call__(self, *args: Any) -> Any:
        if not self.first:
            return self.compiled(*args)
        from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError

        _log.info("evaluating %s through torch.compile (its first evaluation of a batch shape compiles it: "
                  "seconds to a minute)", self.model)
        try:
            out = self.compiled(*args)
        except (BackendCompilerFailed, InternalTorchDynamoError) as exc:
            from combinability.errors import ConfigurationError

            raise ConfigurationError(f"torch.compile could not compile the evaluation of {self.model} "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); evaluate it "
                                     "without compiling: TorchBackend(compile=False), or drop --compile") from exc
        self.first = False
        return out
