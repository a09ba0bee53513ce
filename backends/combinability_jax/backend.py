"""The JAX backend: a thin adapter from flat vectors to flax (linen) modules.

Table models' state uses the table's reference names and axes (as torch's); so does a user's
``(module, variables)`` once traced (:mod:`combinability_jax.trace`; it takes its inputs in its own
layout, e.g. channels-last), else it is named by flax path (``"params/Dense_0/kernel"``). Flat vectors
become flax variables inside one jit-compiled function per prepared model, vmapped over
vectors; a short last batch is padded to a batch size already compiled (at most 2x its size).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from combinability.backend import Backend, vmap_on_accelerator
from combinability.combination import register_compiler
from combinability.data.base import input_dtype
from combinability.errors import ConfigurationError, IncompatibleModelsError, UnknownNameError
from combinability.evaluation import cross_entropy
from combinability.layers import LayerTable
from combinability.layout import FlatLayout, check_names
from combinability_jax.jaxpr_walk import logits_of
from combinability_jax.models import FlaxModel, TableNet, flatten_variables, unflatten_variables
from combinability_jax.nnx_bridge import from_nnx, is_nnx
from combinability_jax.trace import taps as trace_taps
from combinability_jax.trace import train_kwargs

__all__ = ["JaxBackend", "JaxRandom", "JaxPrepared", "chunked_uniform", "DRAW_CHUNK"]

register_compiler("jax.numpy", jax.jit)  # combinations of jax arrays in one fused pass (no temporaries)


DRAW_CHUNK = 1 << 20
"""Values per threefry call in a large draw (4 MiB of float32): see :func:`chunked_uniform`."""


@functools.partial(jax.jit, static_argnums=(1, 2))
def chunked_uniform(key: jax.Array, size: int, dtype: Any) -> jax.Array:
    """``size`` U[0, 1) values: chunk ``i`` of :data:`DRAW_CHUNK` is drawn from ``fold_in(key, i)``.

    One ``jax.random.uniform`` call over tens of millions of values holds about four times
    its output while threefry runs (its counters and both halves of its bits); a ResNet-20
    ×16 vector (66M values) then peaks at 1 GiB for a 264 MiB draw. Written chunk by chunk
    into one buffer, the peak is the output and a constant scratch space (threefry's on one
    chunk: 24 MiB in XLA's plan), and the draw is faster (2.5x on a CPU). The values depend
    only on ``key`` and ``size``, not on the device.
    """
    full, rest = divmod(size, DRAW_CHUNK)

    def chunk(i: Any, n: int) -> jax.Array:
        return jax.random.uniform(jax.random.fold_in(key, i), (n,), dtype=dtype)

    def write(i: Any, out: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(out, chunk(i, DRAW_CHUNK), (i * DRAW_CHUNK,))

    out = jax.lax.fori_loop(0, full, write, jnp.zeros(size, dtype))
    if rest:
        out = jax.lax.dynamic_update_slice(out, chunk(full, rest), (full * DRAW_CHUNK,))
    return out


class JaxRandom:
    """:class:`~combinability.backend.RandomSource` over a JAX PRNG key (split on every draw) on ``device``.

    A draw of more than :data:`DRAW_CHUNK` values goes through :func:`chunked_uniform`
    (its values differ from one ``jax.random.uniform`` call of the same key).
    """

    def __init__(self, seed: int, device: Any = None) -> None:
        self.key, self.device = jax.random.PRNGKey(int(seed)), device

    def uniform(self, shape: int | tuple[int, ...], dtype: Any = None) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        shape = (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
        dtype, size = jnp.dtype(dtype or jnp.float32), int(np.prod(shape, dtype=np.int64))
        with jax.default_device(self.device) if self.device is not None else contextlib.nullcontext():
            if size <= DRAW_CHUNK:
                out = jax.random.uniform(sub, shape, dtype=dtype)
            else:
                out = chunked_uniform(sub, size, dtype).reshape(shape)
        return out if self.device is None else jax.device_put(out, self.device)  # drawn there: no copy


def _precision(precision: str | None) -> contextlib.AbstractContextManager:
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


class _Program:
    """The pure functions of one flax model over one layout, jit-compiled once per model.

    Holds no arrays (the model's other variables and the flat vectors are arguments), so that
    the compiled functions can be kept for as long as the model lives and shared by every
    :class:`JaxPrepared` of it: a sweep, a study's next sweep, an analysis, without compiling
    the model again (a Tiny-10 forward pass takes about a second to compile on a CPU).
    """

    def __init__(self, model: FlaxModel, state: Mapping[str, Any], layout: FlatLayout, compute_dtype: str) -> None:
        # ``state``: the model's reference names (keys) and shapes (values)
        self.module, self.table, self.compute_dtype = model.module, model.table, compute_dtype
        self.user = model.table is not None and not isinstance(model.module, TableNet)
        module, library = model.module, isinstance(model.module, TableNet)  # (the program must not hold the model)
        self.kwargs = lambda train: {"train": train} if library else train_kwargs(module, train)
        self.names = model.table.flax_names() if model.table is not None else {k: k for k in state}
        self.entries = tuple((e.name, e.offset, e.stop, e.shape, jax.dtypes.canonicalize_dtype(e.dtype))
                             for e in layout.entries)
        self.mutable = [c for c in model.variables if c != "params"]
        self.forward = jax.jit(jax.vmap(self.apply, in_axes=(0, None, None)))
        self.forward_one = jax.jit(self.apply)
        # row i of (k, d) vectors: sliced inside the compiled function (eager slicing would copy it)
        self.forward_row = jax.jit(lambda flats, i, rest, x: self.apply(flats[i], rest, x))
        self.features = jax.jit(self.taps, static_argnums=3)
        self.value_and_grad = jax.jit(self.step, static_argnums=(5, 6))

    def variables(self, flat: jax.Array, rest: dict[str, jax.Array]) -> dict[str, Any]:
        views = {name: flat[a:b].reshape(shape).astype(dt) for name, a, b, shape, dt in self.entries}
        named = self.table.to_flax(views, xp=jnp) if self.table is not None else views
        return unflatten_variables({**rest, **{k: v for k, v in named.items() if not k.startswith("counters/")}})

    def lowered(self, variables: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        """Floating variables and input cast to the backend's compute type (a no-op for float32)."""
        if self.compute_dtype == "float32":
            return variables, x
        dt = jnp.dtype(self.compute_dtype)

        def cast(v: jax.Array) -> jax.Array:
            return v.astype(dt) if jnp.issubdtype(v.dtype, jnp.floating) else v

        return jax.tree_util.tree_map(cast, variables), cast(x)

    def apply(self, flat: jax.Array, rest: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        variables, x = self.lowered(self.variables(flat, rest), x)
        return logits_of(self.module.apply(variables, x, **self.kwargs(False))).astype(jnp.float32)

    def taps(self, flat: jax.Array, rest: dict[str, jax.Array], x: jax.Array, points: tuple[str, ...]) -> dict:
        variables, x = self.lowered(self.variables(flat, rest), x)
        if self.user:
            out = trace_taps(self.module, variables, x, points)
            return {p: jnp.moveaxis(v, -1, 1) if v.ndim >= 3 else v for p, v in out.items()}  # channels-first
        if self.table is not None:
            taps: dict[str, Any] = dict.fromkeys(points)
            self.module.apply(variables, x, taps=taps)
            return taps
        _, state = self.module.apply(variables, x, capture_intermediates=True, mutable=["intermediates"],
                                     **self.kwargs(False))
        found = {k.removesuffix("/__call__"): v[0] for k, v in flatten_variables(state["intermediates"]).items()}
        missing = [p for p in points if p not in found]
        if missing:
            raise UnknownNameError(f"unknown feature point(s) {missing}; this model's points are its submodules: "
                                   f"{sorted(found)[:40]}")
        # flax keeps units last (NHWC maps, (n, tokens, features)): channels-first, as features are read
        return {p: jnp.moveaxis(found[p], -1, 1) if found[p].ndim >= 3 else found[p] for p in points}

    def captured(self, flat: jax.Array, rest: dict[str, jax.Array], x: jax.Array) -> list[str]:
        """The names of the submodule outputs flax's ``capture_intermediates`` gives on ``x`` (their ``taps``)."""
        variables, x = self.lowered(self.variables(flat, rest), x)
        _, state = jax.eval_shape(lambda v, x: self.module.apply(v, x, capture_intermediates=True,
                                                                  mutable=["intermediates"], **self.kwargs(False)),
                                  variables, x)
        return [k.removesuffix("/__call__") for k, v in flatten_variables(state["intermediates"]).items()
                if k.endswith("/__call__") and k.count("/") > 0 and hasattr(v[0], "shape")]

    def step(self, flat: jax.Array, rest: dict, mask: jax.Array, x: jax.Array, y: jax.Array,
             loss: Callable[[Any, Any], Any], train: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        rngs = {"dropout": jax.random.fold_in(jax.random.key(0), _batch_digest(x))}

        def value(p: jax.Array) -> tuple[jax.Array, Any]:
            if not train:  # the inference-mode loss: running statistics, no dropout, nothing updated
                return loss(logits_of(self.module.apply(self.variables(p, rest), x, **self.kwargs(False))), y), {}
            logits, updates = self.module.apply(self.variables(p, rest), x, mutable=self.mutable, rngs=rngs,
                                                **self.kwargs(True))
            return loss(logits_of(logits), y), flatten_variables(updates)

        (val, updates), grad = jax.value_and_grad(value, has_aux=True)(flat)
        pieces = [updates[self.names[name]].reshape(-1).astype(flat.dtype) if self.names[name] in updates
                  else flat[a:b] for name, a, b, _, _ in self.entries]
        return val, grad * mask, jnp.concatenate(pieces) if pieces else flat


def _host(v: Any) -> np.ndarray:
    """A variable as a numpy array; a floating type numpy does not know (bfloat16) as float32."""
    a = np.array(jax.device_get(v))
    return a.astype(np.float32) if jnp.issubdtype(a.dtype, jnp.floating) and not np.issubdtype(a.dtype,
                                                                                                  np.floating) else a


def _batch_digest(x: jax.Array) -> jax.Array:
    """A uint32 digest of a batch's bits and positions: the key of a training step's dropout masks (a flax
    ``nn.Dropout``'s ``"dropout"`` rng, an NNX model's streams), so that a step is reproducible and
    different batches draw different masks."""
    flat = x.reshape(-1)
    bits = (jax.lax.bitcast_convert_type(flat.astype(jnp.float32), jnp.uint32)
            if jnp.issubdtype(flat.dtype, jnp.floating) else flat.astype(jnp.uint32))
    weights = jnp.arange(flat.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _state_shapes(model: FlaxModel) -> dict[str, tuple[int, ...]]:
    """The shapes of :meth:`JaxBackend.state`, without copying any array to the host."""
    flat = {k: np.broadcast_to(np.zeros((), np.dtype(v.dtype)), np.shape(v)) for k, v in model.flat().items()}
    state = model.table.from_flax(flat) if model.table is not None else flat
    return {k: tuple(np.shape(v)) for k, v in state.items()}


#: The compiled programs of each live model, by layout and compute type (see :class:`_Program`).
_PROGRAMS: weakref.WeakKeyDictionary[FlaxModel, dict[tuple, _Program]] = weakref.WeakKeyDictionary()


def _program(model: FlaxModel, state: Mapping[str, Any], layout: FlatLayout, compute_dtype: str) -> _Program:
    """``model``'s :class:`_Program` for ``layout`` and ``compute_dtype``: built once, then reused."""
    entries = tuple((e.name, e.offset, e.stop, tuple(e.shape), str(e.dtype)) for e in layout.entries)
    programs = _PROGRAMS.setdefault(model, {})
    key = (entries, compute_dtype)
    if key not in programs:
        programs[key] = _Program(model, state, layout, compute_dtype)
    return programs[key]


class JaxPrepared:
    """:class:`~combinability.backend.Prepared` for one flax model and layout.

    Takes one ``(d,)`` vector as it is (``one_vector``: an eager ``(1, d)`` view would be a copy).
    """

    one_vector = True

    def __init__(self, backend: JaxBackend, model: FlaxModel, layout: FlatLayout) -> None:
        shapes = _state_shapes(model)
        check_names(shapes, {e.name: e.shape for e in layout.entries}, f"the layout does not fit the {model!r}",
                    missing=False)
        self.backend, self.table, self.layout = backend, model.table, layout
        self.program = program = _program(model, shapes, layout, backend.compute_dtype)
        self.points = {n.name for n in model.table.nodes} if model.table is not None else None
        covered = {program.names[e.name] for e in layout.entries}
        self.rest = {k: v for k, v in flatten_variables(model.variables).items() if k not in covered}
        self._mask: jax.Array | None = None
        self._sizes: set[int] = set()
        self._vmap_on_cpu: bool | None = None  # see _vmapped

    @property
    def mask(self) -> jax.Array:
        """1 for the layout's trained entries (flax ``params``), 0 for others (statistics): made when
        first asked for (by training), not for every evaluation (a vector of the layout's size)."""
        if self._mask is None:
            layout = self.layout
            trained = [self.program.names[e.name].startswith("params/") for e in layout.entries]
            self._mask = self.backend.asarray(np.repeat(trained, [e.size for e in layout.entries]).astype(layout.dtype))
        return self._mask

    def _padded(self, x: jax.Array) -> jax.Array:
        """``x`` padded with zeros to a batch size already compiled, if one is at most twice its own."""
        n = x.shape[0]
        size = min((s for s in self._sizes if n <= s <= 2 * n), default=n)
        self._sizes.add(size)
        return jnp.pad(x, ((0, size - n),) + ((0, 0),) * (x.ndim - 1)) if size > n else x

    def forward(self, flats: jax.Array, x: jax.Array) -> jax.Array:
        with self.bind(flats) as forward:
            return forward(x)

    @contextlib.contextmanager
    def bind(self, flats: jax.Array) -> Iterator[Callable[[jax.Array], jax.Array]]:
        """``forward(x)`` of ``flats`` for many batches (:func:`combinability.backend.bound_forward`):
        vmapped over the vectors, or one vector after the other."""
        program = self.program

        def forward(x: jax.Array) -> jax.Array:
            with _precision(self.backend.precision):
                padded = self._padded(x)
                if flats.ndim == 1:  # one vector, as it is
                    out = program.forward_one(flats, self.rest, padded)[None]
                elif flats.shape[0] > 1 and self._vmapped(flats, padded):
                    out = program.forward(flats, self.rest, padded)
                else:  # one vector after the other (see JaxBackend's ``vectorize``); one vector never vmapped
                    out = jnp.stack([program.forward_row(flats, i, self.rest, padded) for i in range(flats.shape[0])])
            return out[:, :_kept_rows(out.shape[1], x.shape[0], padded.shape[0])]

        yield forward

    def _vmapped(self, flats: jax.Array, x: jax.Array) -> bool:
        """Whether several vectors run in one vmapped call: the backend's ``vectorize``, else (``None``)
        on an accelerator for models below ``VMAP_MAX_PARAMETERS``, or on the CPU when the forward
        pass has no convolution (decided once)."""
        if self.backend.vectorize is not None:
            return bool(self.backend.vectorize)
        if self.backend.platform != "cpu":
            return vmap_on_accelerator(flats.shape[1])
        if self._vmap_on_cpu is None:
            shape = jax.ShapeDtypeStruct  # traced from shapes: nothing is sliced or copied
            jaxpr = jax.make_jaxpr(self.program.apply)(shape(flats.shape[1:], flats.dtype), self.rest,
                                                       shape(x.shape, x.dtype))
            self._vmap_on_cpu = "conv_general_dilated" not in _primitives(jaxpr.jaxpr)
        return self._vmap_on_cpu

    def feature_candidates(self, flat: jax.Array, x: jax.Array) -> list[str]:
        """The points at which a transformation's units may be observed (:mod:`combinability.observation`): a
        traced model's table nodes, else every submodule whose output ``x`` gives (flax's intermediates)."""
        if self.points is not None:
            return list(self.table.feature_points())
        with _precision(self.backend.precision):
            return self.program.captured(flat, self.rest, x)

    def features(self, flat: jax.Array, x: jax.Array, points: Sequence[str]) -> dict[str, jax.Array]:
        missing = [p for p in points if self.points is not None and p not in self.points]
        if missing:
            raise UnknownNameError(f"unknown feature point(s) {missing}; this model's points are: "
                                   f"{list(self.table.feature_points())}")
        with _precision(self.backend.precision):
            padded = self._padded(x)
            out = self.program.features(flat, self.rest, padded, tuple(points))
        return {p: v[:_kept_rows(v.shape[0], x.shape[0], padded.shape[0])] for p, v in out.items()}

    def value_and_grad(self, flat: jax.Array, x: jax.Array, y: jax.Array, loss: Callable[[Any, Any], Any], *,
                       train: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        with _precision(self.backend.train_precision):
            return self.program.value_and_grad(flat, self.rest, self.mask, x, y, loss, train)


def _example(x: Any) -> jax.Array:
    """``example_input`` as the model will get inputs (:func:`~combinability.data.base.input_dtype`; int32
    for integers unless jax has x64 enabled)."""
    return jnp.asarray(x, jax.dtypes.canonicalize_dtype(input_dtype(x)))


def _kept_rows(rows: int, examples: int, padded: int) -> int:
    """The rows of an output on ``padded`` examples that belong to the first ``examples``.

    Outputs are example-major with a fixed number of rows per example: one for a classifier,
    a sequence's length for a model whose logits are ``(n * T, classes)``.
    """
    return rows // padded * examples


@jax.jit
def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """:func:`combinability.evaluation.cross_entropy` compiled (per shape)."""
    return cross_entropy(jnp, logits, y)


def _primitives(jaxpr: Any) -> set[str]:
    """The names of the primitives of ``jaxpr`` and of every jaxpr nested in it (jit, cond, scan...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


@jax.jit
def _resample(x: jax.Array, theta: jax.Array) -> jax.Array:
    """torch's ``grid_sample(x, affine_grid(theta), "bilinear", "zeros", align_corners=False)``."""
    n, c, h, w = x.shape
    xs = (2 * jnp.arange(w, dtype=x.dtype) + 1) / w - 1
    ys = (2 * jnp.arange(h, dtype=x.dtype) + 1) / h - 1
    t = theta.astype(x.dtype)[:, :, :, None, None]  # (n, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs[None, None, None, :] + t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2]  # (n, 2, h, w)
    ix, iy = ((grid[:, 0] + 1) * w - 1) / 2, ((grid[:, 1] + 1) * h - 1) / 2
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    flat = x.reshape(n, c, h * w)
    out = jnp.zeros_like(x)
    for dy, wy in ((0, 1 - (iy - y0)), (1, iy - y0)):
        for dx, wx in ((0, 1 - (ix - x0)), (1, ix - x0)):
            xi, yi = (x0 + dx).astype(jnp.int32), (y0 + dy).astype(jnp.int32)
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(n, 1, h * w)
            vals = jnp.take_along_axis(flat, jnp.broadcast_to(idx, (n, c, h * w)), axis=2).reshape(n, c, h, w)
            out = out + vals * jnp.where(inside, wx * wy, 0)[:, None]
    return out


class JaxBackend(Backend):
    """JAX/Flax implementation of :class:`~combinability.backend.Backend`.

    Parameters
    ----------
    device : jax.Device, optional
        Where models live and evaluations run; default ``jax.devices()[0]``.
    precision, train_precision : str or None
        ``jax.default_matmul_precision`` of forward passes and features (default ``"highest"``:
        exact float32 on GPUs that would use TF32), and of training steps (default None: jax's).
    compute_dtype : {"float32", "bfloat16", "float16"}
        Forward passes and feature taps with parameters and inputs cast to this type (float32
        logits); see :meth:`~combinability.backend.Backend.with_compute_dtype`.
    vectorize : bool, optional
        Run several parameter vectors in one call with :func:`jax.vmap` (``True``) or one after
        the other (``False``). ``None`` (default): on an accelerator, vmap for models below
        :data:`combinability.backend.VMAP_MAX_PARAMETERS` parameters and a loop for larger ones
        (:func:`combinability.backend.vmap_on_accelerator`); on the CPU, vmap unless
        the forward pass has a convolution, which XLA's CPU backend runs several times slower
        vmapped over kernels than one vector after the other (Tiny-10: 4.8-5.5x slower, ResNet-20:
        8x; an MLP runs about as fast either way, 0.9-1.4x).
    """

    name = "jax"
    extra = "jax"
    compute_dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, device: Any = None, *, precision: str | None = "highest",
                 train_precision: str | None = None, compute_dtype: str = "float32",
                 vectorize: bool | None = None) -> None:
        self._device = device if device is not None else jax.devices()[0]
        self.vectorize = vectorize
        self.precision, self.train_precision = precision, train_precision
        if compute_dtype not in self.compute_dtypes:
            raise ConfigurationError(f"JaxBackend cannot compute in {compute_dtype!r}; valid: "
                                     f"{', '.join(self.compute_dtypes)}")
        self.compute_dtype = compute_dtype

    def __repr__(self) -> str:
        dtype = f", compute_dtype={self.compute_dtype!r}" if self.compute_dtype != "float32" else ""
        return f"JaxBackend(device={self.device()!r}, precision={self.precision!r}, vectorize={self.vectorize}{dtype})"

    def devices(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for d in jax.devices() + ([] if jax.default_backend() == "cpu" else jax.devices("cpu")):
            names = [f"{d.platform}:{d.id}"] + ([f"cuda:{d.id}"] if d.platform == "gpu" else [])
            if d.id == 0:
                names += [d.platform] + (["cuda"] if d.platform == "gpu" else [])
            found.update({n: d for n in names if n not in found})
        return found

    def with_device(self, device: Any) -> JaxBackend:
        if device == self._device:
            return self
        return JaxBackend(device, precision=self.precision, train_precision=self.train_precision,
                          compute_dtype=self.compute_dtype, vectorize=self.vectorize)

    def _with_compute_dtype(self, dtype: str) -> JaxBackend:
        return JaxBackend(self._device, precision=self.precision, train_precision=self.train_precision,
                          compute_dtype=dtype, vectorize=self.vectorize)

    @property
    def platform(self) -> str:
        """The device's platform: ``"cpu"``, ``"gpu"``, ``"tpu"``."""
        return str(self._device.platform)

    def device(self) -> str:
        return f"{self._device.platform}:{self._device.id}"

    def xp(self) -> Any:
        return jnp

    def asarray(self, array: Any, dtype: Any = None) -> jax.Array:
        if not isinstance(array, jax.Array):
            array = np.asarray(array)
        out = jax.device_put(array, self._device)
        return out if dtype is None else out.astype(jax.dtypes.canonicalize_dtype(dtype))

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.array(jax.device_get(array))

    def random(self, seed: int) -> JaxRandom:
        return JaxRandom(seed, self._device)

    def synchronize(self) -> None:
        jax.device_put(0.0, self._device).block_until_ready()

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "jaxlib": jax.lib.__version__, "flax": flax.__version__}

    def _model(self, model: Any) -> FlaxModel:
        if is_nnx(model):  # its Params and BatchStats as linen variables (combinability_jax.nnx_bridge)
            model = from_nnx(model)
        if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], flax.linen.Module):
            model = FlaxModel(model[0], model[1])
        if not isinstance(model, FlaxModel):
            raise IncompatibleModelsError(f"the jax backend takes flax NNX modules, (flax linen module, variables) "
                                          f"tuples or FlaxModel objects, got {type(model).__name__}")
        return model

    def build(self, table: LayerTable, *, seed: int) -> FlaxModel:
        """A :class:`TableNet` with flax's default init, drawn from ``PRNGKey(seed)`` in one call.

        Kernels LeCun-normal (truncated normal, variance ``1 / fan_in``), biases 0, scales 1,
        running mean 0 and variance 1; no XLA compilation of ``module.init`` (slow on CPUs).
        """
        table.check_buildable()
        module = TableNet(table)
        shapes = flatten_variables(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                                  jnp.zeros((1, *table.input_shape), jnp.float32)))
        kernels = [k for k in shapes if k.endswith("/kernel")]
        z = np.asarray(jax.random.truncated_normal(jax.random.PRNGKey(int(seed)), -2.0, 2.0,
                                                   (sum(shapes[k].size for k in kernels),)))
        offsets = dict(zip(kernels, np.cumsum([0] + [shapes[k].size for k in kernels]), strict=False))
        values = {}
        for k, leaf in shapes.items():
            if k in offsets:  # 0.8796... is the standard deviation of a normal truncated to [-2, 2]
                std = np.sqrt(1.0 / np.prod(leaf.shape[:-1])) / 0.87962566103423978
                value = z[offsets[k]:offsets[k] + leaf.size].reshape(leaf.shape) * std
            else:
                value = np.full(leaf.shape, float(k.endswith(("/scale", "/var"))))
            values[k] = jax.device_put(value.astype(leaf.dtype), self._device)
        names = table.flax_names()
        counters = {names[k]: np.zeros((), np.int64) for k, (_, dt) in table.parameters().items() if dt == "int64"}
        return FlaxModel(module, unflatten_variables(values), table, counters)

    def table_of(self, model: Any) -> LayerTable | None:
        return model.table if isinstance(model, FlaxModel) else None

    def describe(self, model: Any, example_input: Any) -> LayerTable:
        """The table of a user's ``(module, variables)`` traced on ``example_input`` (a batch in its own layout)."""
        from combinability_jax.trace import describe

        if isinstance(model, FlaxModel) and model.table is not None:
            return model.table
        m = self._model(model)
        return describe(m.module, m.variables, _example(example_input))

    def symmetries(self, model: Any, example_input: Any) -> tuple[Any, list[Any]]:
        """Heads, neurons and residual stream of a user's flax transformer (:mod:`combinability_jax.trace_stream`).

        Parameters are named as :meth:`state` names them (``"params/blocks_0/attn/q/kernel"``); a table model's
        symmetries are its table's spec (no norms to fold).
        """
        from combinability_jax.trace_stream import stream_symmetries

        m = self._model(model)
        if m.table is not None:
            return m.table.spec(), []
        return stream_symmetries(m.module, m.variables, _example(example_input))

    def module_path(self, name: str) -> str:
        """A flax name's module: ``Dense_0`` of ``params/Dense_0/kernel`` (its collection and leaf
        dropped, so that a BatchNorm's ``batch_stats`` join its ``params``); dotted names as torch's."""
        if "/" not in name:
            return super().module_path(name)
        parts = name.split("/")
        return "/".join(parts[1:-1]) or name

    def adopt(self, model: Any, table: LayerTable) -> FlaxModel:
        """A user's ``(module, variables)`` or NNX module as a :class:`FlaxModel` of its traced ``table`` (the
        table's names)."""
        m = self._model(model)
        if m.table == table:
            return m
        names = table.flax_names()
        m = FlaxModel(m.module, m.variables, table, {names[k]: np.zeros((), np.int64) for k, (_, dt) in
                                                     table.parameters().items() if dt == "int64"})
        table.check_state(self.state(m), what=f"the variables of {type(m.module).__name__}")
        return m

    def state(self, model: Any) -> dict[str, np.ndarray]:
        """Reference names and axes for table models, ``"collection/path/leaf"`` flax names otherwise.

        bfloat16 variables (a numpy extension type, not a numpy float) are given as float32, exactly;
        :meth:`with_state` rounds them back."""
        model = self._model(model)
        flat = {k: _host(v) for k, v in model.flat().items()}
        return model.table.from_flax(flat) if model.table is not None else flat

    def own(self, model: Any) -> FlaxModel:
        """A user's NNX module or linen pair as a :class:`FlaxModel` (a library model as it is)."""
        return self._model(model)

    def native_state(self, model: Any) -> dict[str, np.ndarray]:
        """A user's module's variables by flax name (``"params/fc1/kernel"``) even when traced into a table,
        so that the file fits the user's own module; a library model's :meth:`state`."""
        model = self._model(model)
        if model.table is None or isinstance(model.module, TableNet):
            return self.state(model)
        return {k: _host(v) for k, v in flatten_variables(model.variables).items()}

    def trainable(self, model: Any) -> tuple[str, ...]:
        model = self._model(model)
        if model.table is not None:
            return tuple(k for k, v in model.table.flax_names().items() if v.startswith("params/"))
        return tuple(k for k in flatten_variables(model.variables) if k.startswith("params/"))

    def with_state(self, model: Any, params: Mapping[str, np.ndarray]) -> FlaxModel:
        """A new model holding ``params``; :class:`LayoutError` on missing, unknown or wrong-shaped names."""
        model = self._model(model)
        current = self.state(model)
        check_names({k: v.shape for k, v in current.items()}, {k: np.shape(v) for k, v in params.items()},
                  "params do not match the model")
        table = model.table
        named = table.to_flax({k: np.asarray(params[k]) for k in current}) if table is not None else dict(params)
        old = model.flat()
        counters = {k: np.array(v, np.int64) for k, v in named.items() if k in model.counters}
        variables = {k: jax.device_put(np.asarray(v, dtype=old[k].dtype), self._device) for k, v in named.items()
                     if k not in counters}
        return FlaxModel(model.module, unflatten_variables(variables), table, counters)

    def prepare(self, model: Any, layout: FlatLayout) -> JaxPrepared:
        return JaxPrepared(self, self._model(model), layout)

    def cross_entropy(self, logits: jax.Array, y: jax.Array) -> jax.Array:
        # the core's definition, compiled into one kernel: run eagerly it dispatched seven
        return _cross_entropy(logits, y)

    def augment(self, x: jax.Array, matrices: jax.Array) -> jax.Array:
        return _resample(x, matrices)
