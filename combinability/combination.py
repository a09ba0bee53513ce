"""Element-wise combinations of flat parameter vectors (array-API).

With ``v`` the weight of model B (see :mod:`combinability.samplers`)::

    combine(a, b, v)              = (1 − v) ⊙ a + v ⊙ b
    combine3(a, b, c, v_b, v_c)   = (1 − v_b − v_c) ⊙ a + v_b ⊙ b + v_c ⊙ c

The formulas are evaluated exactly as written, so ``v = 0`` returns ``a`` and ``v = 1``
returns ``b`` (up to the sign of zero: ``-0.0`` may come back as ``+0.0``).
Coefficients may be scalars or vectors of the same shape as the parameters. The code
runs on numpy, torch and jax arrays; mutable arrays (numpy, torch) are filled in
blocks so that no full-size temporary is allocated. Immutable arrays (jax) get a new
array from the formula compiled by their framework when its backend registered a
compiler (:func:`register_compiler`; the jax backend registers ``jax.jit``): one fused
pass, where evaluated operation by operation each would hold a full-size temporary
(a ResNet-20 x16 combination: 1 output instead of 3 intermediates of 264 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat

from combinability.errors import IncompatibleModelsError, LayoutError

__all__ = ["combine", "combine3", "combine_into", "combine3_into", "register_compiler"]

# Elements per block on the CPU: the few temporaries of a block stay in the L2/L3 caches while
# each block costs few array calls (a 932k-parameter combination: torch 1.0 ms at 2**15, 0.46 ms
# at 2**17; numpy 0.65 and 0.49 ms).
_NUMPY_BLOCK = 1 << 17
_DEVICE_BLOCK = 1 << 24  # elsewhere, blocks only bound the temporaries' memory


def _namespace(*arrays: Any) -> Any:
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        raise IncompatibleModelsError(f"cannot combine arrays of different libraries: {exc}") from None


def _check(thetas: tuple[Any, ...], coefficients: tuple[Any, ...], labels: tuple[str, ...]) -> tuple[int, ...]:
    """Common shape of ``thetas``; every coefficient must be a scalar or have that shape."""
    shape = tuple(thetas[0].shape)
    for name, theta in zip("bc", thetas[1:], strict=False):
        if tuple(theta.shape) != shape:
            raise IncompatibleModelsError(
                f"theta_{name} has shape {tuple(theta.shape)}, theta_a has shape {shape}"
            )
    for label, v in zip(labels, coefficients, strict=True):
        vshape = tuple(getattr(v, "shape", ()))
        if vshape not in ((), shape):
            raise LayoutError(f"coefficient {label} has shape {vshape}; expected a scalar or shape {shape}")
    return shape


def _is_vector(v: Any) -> bool:
    return len(getattr(v, "shape", ())) > 0


def _mutable(out: Any) -> bool:
    return not array_api_compat.is_jax_array(out)


#: Compilers of the formulas for immutable arrays, by array namespace name (``"jax.numpy"``).
_COMPILERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {}
_COMPILED: dict[tuple[str, Callable[..., Any]], Callable[..., Any]] = {}


def register_compiler(namespace: str, compiler: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Compile the combination formulas with ``compiler`` for immutable arrays of ``namespace``.

    Parameters
    ----------
    namespace : str
        The ``__name__`` of the arrays' array-API namespace, e.g. ``"jax.numpy"``.
    compiler : callable
        Takes a pure function of arrays and scalars, returns an equivalent compiled one
        (``jax.jit``).
    """
    _COMPILERS[namespace] = compiler
    for key in [k for k in _COMPILED if k[0] == namespace]:
        del _COMPILED[key]


def _immutable_formula(xp: Any, formula: Callable[..., Any]) -> Callable[..., Any]:
    """``formula`` compiled for ``xp``'s arrays when a compiler is registered, else as written."""
    name = getattr(xp, "__name__", "")
    if name not in _COMPILERS:
        return formula
    key = (name, formula)
    if key not in _COMPILED:
        _COMPILED[key] = _COMPILERS[name](formula)
    return _COMPILED[key]


def _blocks(xp: Any, size: int, out: Any = None) -> tuple[range, int]:
    """Block starts and size: cache-sized on the CPU (numpy, or torch/jax arrays in host memory)."""
    on_cpu = array_api_compat.is_numpy_namespace(xp)
    if not on_cpu and out is not None:
        on_cpu = str(array_api_compat.device(out)).lower().startswith(("cpu", "tfrt_cpu"))
    block = _NUMPY_BLOCK if on_cpu else _DEVICE_BLOCK
    return range(0, size, block), block


def _formula2(a: Any, b: Any, v: Any) -> Any:
    return (1 - v) * a + v * b


def _formula3(a: Any, b: Any, c: Any, v_b: Any, v_c: Any) -> Any:
    return (1 - v_b - v_c) * a + v_b * b + v_c * c


def _fill(out: Any, formula: Any, arrays: tuple[Any, ...], coefficients: tuple[Any, ...]) -> Any:
    """``out[...] = formula(*arrays, *coefficients)``, block by block (1-D) or at once."""
    xp = array_api_compat.array_namespace(out)
    if len(out.shape) != 1:
        out[...] = formula(*arrays, *coefficients)
        return out
    starts, block = _blocks(xp, out.shape[0], out)
    for start in starts:
        sl = slice(start, start + block)
        out[sl] = formula(*(x[sl] for x in arrays), *(v[sl] if _is_vector(v) else v for v in coefficients))
    return out


def _empty_like_result(xp: Any, formula: Any, arrays: tuple[Any, ...], coefficients: tuple[Any, ...]) -> Any:
    """An uninitialised array with the shape, dtype and device ``formula`` would produce."""
    head = formula(*(x[:0] for x in arrays), *(v[:0] if _is_vector(v) else v for v in coefficients))
    return xp.empty(tuple(arrays[0].shape), dtype=head.dtype, device=array_api_compat.device(arrays[0]))


def combine(theta_a: Any, theta_b: Any, v: Any) -> Any:
    """The element-wise combination ``(1 − v) ⊙ θ_A + v ⊙ θ_B``.

    Parameters
    ----------
    theta_a, theta_b : arrays of the same shape (numpy, torch, jax, ...)
        Flat parameter vectors of models A and B.
    v : float or array of the same shape
        Weight of model B: 0 gives ``theta_a``, 1 gives ``theta_b`` exactly.

    Returns
    -------
    array
        A new array of the inputs' namespace and (promoted) dtype.

    Raises
    ------
    IncompatibleModelsError
        If the two vectors differ in shape or come from different array libraries.
    LayoutError
        If ``v`` is neither a scalar nor of the vectors' shape.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.array([0.0, 1.0, 2.0]), np.array([4.0, 5.0, 6.0])
    >>> combine(a, b, 0.25).tolist()
    [1.0, 2.0, 3.0]
    >>> combine(a, b, np.array([0.0, 1.0, 0.5])).tolist()
    [0.0, 5.0, 4.0]
    """
    _check((theta_a, theta_b), (v,), ("v",))
    xp = _namespace(theta_a, theta_b, v)
    arrays, coefficients = (theta_a, theta_b), (v,)
    if not _mutable(theta_a):
        return _immutable_formula(xp, _formula2)(theta_a, theta_b, v)
    return _fill(_empty_like_result(xp, _formula2, arrays, coefficients), _formula2, arrays, coefficients)


def combine_into(out: Any, theta_a: Any, theta_b: Any, v: Any) -> Any:
    """:func:`combine` written into ``out``, without full-size temporaries.

    ``out`` may be ``theta_a`` or ``theta_b`` themselves (each element is read before it
    is written). Immutable arrays (jax) cannot be written: a new array is returned
    and ``out`` is left as it was, so always use the return value.

    Returns
    -------
    array
        ``out`` (or a new array for immutable inputs).
    """
    _check((theta_a, theta_b), (v,), ("v",))
    _namespace(out, theta_a, theta_b, v)
    if tuple(out.shape) != tuple(theta_a.shape):
        raise LayoutError(f"out has shape {tuple(out.shape)}, the parameters have shape {tuple(theta_a.shape)}")
    if not _mutable(out):
        return combine(theta_a, theta_b, v)
    return _fill(out, _formula2, (theta_a, theta_b), (v,))


def combine3(theta_a: Any, theta_b: Any, theta_c: Any, v_b: Any, v_c: Any) -> Any:
    """The three-model combination ``(1 − v_b − v_c) ⊙ θ_A + v_b ⊙ θ_B + v_c ⊙ θ_C`` (paper §5.4).

    ``(v_b, v_c) = (0, 0)``, ``(1, 0)`` and ``(0, 1)`` give exactly ``θ_A``, ``θ_B`` and ``θ_C``.

    Examples
    --------
    >>> import numpy as np
    >>> a, b, c = np.zeros(2), np.ones(2), np.full(2, 4.0)
    >>> combine3(a, b, c, 0.5, 0.25).tolist()
    [1.5, 1.5]
    """
    _check((theta_a, theta_b, theta_c), (v_b, v_c), ("v_b", "v_c"))
    xp = _namespace(theta_a, theta_b, theta_c, v_b, v_c)
    arrays, coefficients = (theta_a, theta_b, theta_c), (v_b, v_c)
    if not _mutable(theta_a):
        return _immutable_formula(xp, _formula3)(*arrays, *coefficients)
    return _fill(_empty_like_result(xp, _formula3, arrays, coefficients), _formula3, arrays, coefficients)


def combine3_into(out: Any, theta_a: Any, theta_b: Any, theta_c: Any, v_b: Any, v_c: Any) -> Any:
    """:func:`combine3` written into ``out`` (see :func:`combine_into`)."""
    _check((theta_a, theta_b, theta_c), (v_b, v_c), ("v_b", "v_c"))
    _namespace(out, theta_a, theta_b, theta_c, v_b, v_c)
    if tuple(out.shape) != tuple(theta_a.shape):
        raise LayoutError(f"out has shape {tuple(out.shape)}, the parameters have shape {tuple(theta_a.shape)}")
    if not _mutable(out):
        return combine3(theta_a, theta_b, theta_c, v_b, v_c)
    return _fill(out, _formula3, (theta_a, theta_b, theta_c), (v_b, v_c))
