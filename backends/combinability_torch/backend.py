"""The PyTorch backend: a thin adapter from flat vectors to torch modules.

Models run *functionally* (:func:`torch.func.functional_call`) on views into one device
tensor holding the flat vector, so evaluating a combination never copies it parameter by
parameter. Several vectors run one after the other (the default on the CPU, measured
faster there, and on CUDA for large models) or together with :func:`torch.func.vmap` (the
default on CUDA below :data:`combinability.backend.VMAP_MAX_PARAMETERS` parameters).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from combinability.backend import Backend, vmap_on_accelerator
from combinability.data.base import input_dtype
from combinability.digests import in_numpy_memory
from combinability.errors import (
    ConfigurationError,
    IncompatibleModelsError,
    LayoutError,
    TracingError,
    UnknownNameError,
)
from combinability.layers import LayerTable
from combinability.layout import FlatLayout, check_names
from combinability_torch.compiled import compiled_call
from combinability_torch.models import TableNet
from combinability_torch.trace import (
    _ADD,
    TapRunner,
    classes_second,
    computed_weights,
    in_projection,
    logits_of,
    refuse_computed_weights,
    strip_output_softmax,
    tensor_aliases,
)

__all__ = ["TorchBackend", "TorchRandom", "TorchPrepared", "torch_dtype"]

_log = logging.getLogger("combinability.torch")


def torch_dtype(dtype: Any = None) -> torch.dtype:
    """A torch dtype from a torch dtype, a numpy dtype or its name (``None``: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name
    try:
        return getattr(torch, name)
    except AttributeError:
        raise TypeError(f"numpy dtype {name!r} has no torch equivalent") from None


class TorchRandom:
    """:class:`~combinability.backend.RandomSource` over a seeded :class:`torch.Generator` on a device."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed))

    def uniform(self, shape: int | tuple[int, ...], dtype: Any = None) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=torch_dtype(dtype))


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory where numpy allocated it, else a copy.

    A read-only array of the library's (a loaded dataset, a set's flat vectors) is shared
    as a writable one is, without torch's warning about non-writable arrays: nothing here
    writes into it, and copying a set's vectors would double the memory of a sweep's end
    models. Memory numpy did not allocate (``bytes``, a read-only file map) is copied.
    """
    if array.flags.writeable:
        return torch.from_numpy(array)
    if not in_numpy_memory(array):
        return torch.tensor(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def _views(flat: torch.Tensor, sizes: tuple[int, ...], entries: tuple[tuple[str, tuple[int, ...]], ...]
           ) -> dict[str, torch.Tensor]:
    """Views of ``flat`` (shape ``(..., d)``) as a layout's named arrays, shapes ``(..., *shape)``.

    The layout comes as plain tuples (:attr:`TorchPrepared._entries`): its cached properties take a
    lock on Python 3.11, which torch.compile cannot trace (a graph break).
    """
    chunks = torch.split(flat, sizes, dim=-1)
    lead = tuple(flat.shape[:-1])
    return {name: c.reshape((*lead, *shape)) for (name, shape), c in zip(entries, chunks, strict=True)}


def _swapped_in(model: nn.Module, tensors: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager | None:
    """The context in which :func:`torch.func.functional_call` runs ``model`` with ``tensors``
    (tied weights untied as it unties them), to hold open over many calls; ``None`` when this
    torch has no such context (the caller then uses ``functional_call`` per call)."""
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # pragma: no cover - a private helper of torch 2.x
        return None
    return _reparametrize_module(model, tensors, tie_weights=True, strict=False)


def _torch_module(model: Any) -> nn.Module:
    """``model`` itself, checked to be a ``torch.nn.Module``.

    Raises
    ------
    IncompatibleModelsError
        For anything else (a flax model given to the torch backend), naming the backend that fits.
    """
    if isinstance(model, nn.Module):
        return model
    kind = type(model).__module__.split(".")[0]
    hint = " (a flax model: use backend='jax')" if kind in ("flax", "jax") or any(
        c.__module__.startswith("flax.") for c in type(model).__mro__) else ""
    raise IncompatibleModelsError(f"the torch backend takes torch.nn.Module models, got {type(model).__name__}{hint}")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` (``OptimizedModule``), ``DataParallel`` or ``DistributedDataParallel``
    wrapper runs (fx cannot trace the wrappers, and their names carry ``_orig_mod.`` or ``module.``)."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tied tensor under its first name only (see :func:`tensor_aliases`)."""
    aliases = tensor_aliases(_torch_module(model))
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


def _untied(model: nn.Module, params: Mapping[str, Any]) -> Mapping[str, Any]:
    """``params`` under the model's own state names: a tied tensor's alias (a ``state_dict`` saved by
    torch lists it under every name; some files under a later one only) becomes its first name.

    Raises
    ------
    LayoutError
        If ``params`` gives a tied tensor two different values (the arrays of an untied model).
    """
    aliases = tensor_aliases(model)
    if not any(k in aliases for k in params):
        return params
    out = {k: v for k, v in params.items() if k not in aliases}
    for alias, name in aliases.items():
        if alias not in params:
            continue
        if name not in out:
            out[name] = params[alias]
        elif not np.array_equal(np.asarray(params[alias]), np.asarray(out[name])):
            raise LayoutError(f"{type(model).__name__} ties {alias} to {name} (one tensor), but the arrays given for "
                              "them differ: they come from a model where the two are separate; untie them in the "
                              "module to load such arrays")
    return out


def _refuse_hooked_weights(model: nn.Module) -> None:
    """A :class:`ConfigurationError` for a module with torch's older ``weight_norm`` / ``spectral_norm``
    hook, which torch cannot copy (its weight is a computed tensor, not a graph leaf)."""
    found = computed_weights(model)
    if found is not None and found[3]:
        raise ConfigurationError(
            f"module {found[0]!r} of {type(model).__name__} uses torch.nn.utils.weight_norm's (or spectral_norm's) "
            f"deprecated hook for its {', '.join(found[2])}, which torch cannot copy: remove it "
            f"(torch.nn.utils.remove_weight_norm(module), which keeps the function), or use "
            f"torch.nn.utils.parametrizations.weight_norm with a spec by hand")


def _reads_parameter(n: torch.fx.Node) -> bool:
    """Whether fx node ``n`` computes with a parameter or buffer read in place or through a transpose
    (``x @ self.w_q``, ``F.linear(x, self.w.t())``): a layer written out, whose output may hold units."""
    if n.op not in ("call_function", "call_method"):
        return False

    def direct(a: Any) -> bool:
        if not isinstance(a, torch.fx.Node):
            return False
        if a.op == "get_attr":
            return True
        moved = a.op in ("call_function", "call_method") and str(getattr(a.target, "__name__", a.target)) in (
            "t", "transpose", "permute", "getattr")
        return moved and isinstance(a.args[0], torch.fx.Node) and a.args[0].op == "get_attr"

    return any(direct(a) for a in [*n.args, *n.kwargs.values()])


def _hookable(model: nn.Module) -> list[str]:
    """The submodules of ``model`` whose forward runs and whose output a hook reads: not containers, nor the
    ``out_proj`` of an ``nn.MultiheadAttention`` (whose weights it reads without calling it)."""
    skipped = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in model.named_modules() if name and name not in skipped
            and not isinstance(m, nn.ModuleList | nn.ModuleDict | nn.Sequential)]


#: Sums as fx records them: the trace's functions, and the tensor methods.
_ADDS = _ADD | {"add", "add_", "__add__", "__iadd__"}


def _residual_sum(n: torch.fx.Node) -> bool:
    """Whether fx node ``n`` adds two computed tensors (``x + attn(x)``: a residual connection)."""
    return n.op in ("call_function", "call_method") and n.target in _ADDS and len(n.args) >= 2 and all(
        isinstance(a, torch.fx.Node) and a.op not in ("get_attr", "placeholder") for a in n.args[:2])


def _in_projection_points(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """``<path>.in_proj`` for each ``nn.MultiheadAttention`` of ``model``: the point of its heads' queries, keys
    and values (:func:`~combinability_torch.trace.in_projection`)."""
    return {f"{name}.in_proj": m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _units_second(module: nn.Module, out: Any) -> Any:
    """A hooked module's output with its units on axis 1, as features are read: a Linear's or an
    Embedding's ``(n, ..., units)`` moved to ``(n, units, ...)``; anything else as it is. A module that
    returns a tuple (``nn.MultiheadAttention``'s ``(output, weights)``, an RNN's ``(output, states)``)
    is read by its first entry."""
    from combinability_torch.trace import UNITS_LAST_MODULES

    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        out = out[0]  # the output: an RNN's sequence (not its final states), an attention's (not its weights)
    if isinstance(module, UNITS_LAST_MODULES) and isinstance(out, torch.Tensor) and out.dim() > 2:
        return out.movedim(-1, 1)
    return out


class TorchPrepared:
    """:class:`~combinability.backend.Prepared` for one torch module and layout."""

    def __init__(self, backend: TorchBackend, model: nn.Module, layout: FlatLayout) -> None:
        check_names({k: v.shape for k, v in _state_tensors(model).items()},
                    {e.name: e.shape for e in layout.entries}, f"the layout does not fit the {type(model).__name__}",
                    missing=False)
        _refuse_hooked_weights(model)
        self.backend, self.layout = backend, layout
        #: where the logits hold their classes (:func:`combinability_torch.trace.classes_second`), None if unknown
        self.classes_second: bool | None = None
        # the layout's weights are passed at each call: the copy holds zero-memory placeholders for them
        device = backend.torch_device
        placeholders = {id(p): nn.Parameter(torch.zeros((), dtype=p.dtype, device=device).expand(p.shape),
                                            requires_grad=False)
                        for name, p in model.named_parameters() if name in layout}
        self.model = copy.deepcopy(model, memo=placeholders).to(device).eval()
        if not isinstance(self.model, TableNet):
            from combinability_torch.trace import trace

            try:  # a traced user module taps any node's output; an untraceable one, its submodules'
                gm = trace(self.model)
                strip_output_softmax(gm)  # metrics read the logits, not (log-)probabilities
                self.model = TapRunner(gm, self.model).eval()
                self.classes_second = classes_second(gm)
            except TracingError:
                pass
        # tied tensors are passed under one name (the layout's); functional_call ties the aliases to it
        first = tensor_aliases(_torch_module(self.model))
        tied_in_layout = {first.get(e.name, e.name) for e in layout.entries}
        self.rest = {k: v for k, v in _state_tensors(self.model).items() if k not in tied_in_layout}
        self.buffers = {name for name, _ in self.model.named_buffers()}
        self._compiled_calls: dict[bool, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        self._sizes = tuple(int(size) for size in layout.sizes)
        self._entries = tuple((e.name, tuple(e.shape)) for e in layout.entries)

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return logits_of(functional_call(self.model, {**self.rest, **params}, (x,), kwargs, strict=False))

    def _inference(self) -> contextlib.ExitStack:
        """Inference mode, under autocast when the backend computes in a lower precision."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.backend.compute_dtype != "float32":
            stack.enter_context(torch.autocast(self.backend.torch_device.type,
                                               dtype=getattr(torch, self.backend.compute_dtype)))
        return stack

    def _flat_call(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits of one parameter vector ``flat`` (shape ``(d,)``) on ``x``: the function compiled."""
        return self._call(self._views(flat), x)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (shape ``(..., d)``) as this layout's named arrays (:func:`_views`)."""
        return _views(flat, self._sizes, self._entries)

    def _flat_calls(self, flats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits of several vectors ``flats`` (shape ``(k, d)``) on ``x``, vmapped."""
        return vmap(self._flat_call, in_dims=(0, None))(flats, x)

    def _compiled(self, batched: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """:meth:`_flat_call` (:meth:`_flat_calls` when ``batched``) through :func:`torch.compile`
        (:func:`combinability_torch.compiled.compiled_call`), made at the first call and kept."""
        if batched not in self._compiled_calls:
            structure = (type(self.model).__module__, type(self.model).__qualname__, self._entries,
                         tuple((k, tuple(v.shape), str(v.dtype)) for k, v in self.rest.items()))
            function = TorchPrepared._flat_calls if batched else TorchPrepared._flat_call
            self._compiled_calls[batched] = compiled_call(function, self, structure, self.backend.compile_options,
                                                          type(self.model).__name__)
        return self._compiled_calls[batched]

    def forward(self, flats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with self.bind(flats) as forward:
            return forward(x)

    @contextlib.contextmanager
    def bind(self, flats: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """``forward(x)`` of ``flats`` for many batches: views and inference mode set up once.

        Per batch that saves about 0.2 ms on the CPU (2 % of a sweep of the MLP on batches
        of 1,000); see :func:`combinability.backend.bound_forward`. One vector is swapped into
        the module once for all batches (``functional_call`` swaps it in and out at every call:
        another 0.15 ms a batch for the MLP).
        """
        with self._inference() as stack:
            if self.backend.compile_options is not None:  # views, the functional call and the model in one graph
                if self.backend.use_vmap(self.layout.size) and flats.shape[0] > 1:
                    batched = self._compiled(batched=True)

                    def run(x: torch.Tensor) -> torch.Tensor:
                        return batched(flats, x)
                else:
                    one = self._compiled(batched=False)

                    def run(x: torch.Tensor) -> torch.Tensor:
                        if flats.shape[0] == 1:  # no copy of its logits
                            return one(flats[0], x).unsqueeze(0)
                        return torch.stack([one(row, x) for row in flats])
            elif self.backend.use_vmap(self.layout.size) and flats.shape[0] > 1:
                batched = vmap(lambda p, xb: self._call(p, xb), in_dims=(0, None))
                params = self._views(flats)
                run = functools.partial(batched, params)
            elif flats.shape[0] == 1:  # one vector (a sweep's cell): no copy of its logits
                one = self._views(flats[0])
                swapped = _swapped_in(self.model, {**self.rest, **one})
                if swapped is not None:  # swapped in once for all batches, as functional_call does per call
                    stack.enter_context(swapped)

                    def run(x: torch.Tensor) -> torch.Tensor:
                        return logits_of(self.model(x)).unsqueeze(0)
                else:
                    def run(x: torch.Tensor) -> torch.Tensor:
                        return self._call(one, x).unsqueeze(0)
            else:
                rows = [self._views(row) for row in flats]

                def run(x: torch.Tensor) -> torch.Tensor:
                    return torch.stack([self._call(p, x) for p in rows])

            def forward(x: torch.Tensor) -> torch.Tensor:
                out = run(x)
                return out if out.dtype == torch.float32 else out.float()

            yield forward

    def feature_candidates(self, flat: torch.Tensor | None = None, x: torch.Tensor | None = None) -> list[str]:
        """The points at which a transformation's units may be observed (:mod:`combinability.observation`):
        a traced model's modules (those it calls, those it traced through, those whose parameters an
        operation reads), an untraced one's submodules."""
        if isinstance(self.model, TapRunner):
            graph = self.model.gm.graph
            called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
            readers = {n.name for n in graph.nodes if _reads_parameter(n)}  # x @ self.w_q, F.linear(x, self.w)
            sums = {n.name for n in graph.nodes if _residual_sum(n)}  # x + attn(x): the stream between blocks
            nodes = [p for p, node in self.model.fx_of.items() if p != node or p in called or node in readers | sums]
            # inside a module the graph calls whole (nn.TransformerEncoder): its submodules, read by hooks
            whole = [(path, self.model.gm.get_submodule(path)) for path in called]
            inside = [f"{path}.{name}" for path, m in whole for name in _hookable(m)]
            inside += [f"{path}.{name}" for path, m in whole for name in _in_projection_points(m)]
            return [*nodes, *self.model.in_projections, *(p for p in inside if p not in self.model.fx_of)]
        if isinstance(self.model, TableNet):
            return list(self.model.table.feature_points())
        return [*_hookable(self.model), *_in_projection_points(self.model)]

    def features(self, flat: torch.Tensor, x: torch.Tensor, points: Sequence[str]) -> dict[str, torch.Tensor]:
        params = self._views(flat)
        with self._inference():
            if isinstance(self.model, TapRunner):
                tapped = self.model.fx_of.keys() | set(self.model.in_projections)
                taps = dict.fromkeys(p for p in points if p in tapped)
                inside = [p for p in points if p not in tapped]
                if not inside:
                    self._call(params, x, taps=taps)
                    return taps
                # submodules of a module the graph keeps whole (torch's nn.TransformerEncoder, which
                # symbolic tracing cannot open): hooked, in the same forward pass as the taps
                hooked = self._hooked(params, x, inside, taps=taps or None, also=list(self.model.fx_of))
                return {p: taps[p] if p in taps else hooked[p] for p in points}
            if isinstance(self.model, TableNet):
                known = set(self.model.table.feature_points()) | {n.name for n in self.model.table.nodes}
                missing = [p for p in points if p not in known]
                if missing:
                    raise UnknownNameError(f"unknown feature point(s) {missing}; this model's points are: "
                                           f"{list(self.model.table.feature_points())}")
                taps: dict[str, Any] = dict.fromkeys(points)
                self._call(params, x, taps=taps)
                return taps
            return self._hooked(params, x, points)

    def _hooked(self, params: dict[str, torch.Tensor], x: torch.Tensor, points: Sequence[str],
                taps: dict[str, Any] | None = None, also: Sequence[str] = ()) -> dict[str, Any]:
        """The outputs of the submodules ``points`` (forward hooks); ``taps`` (a :class:`TapRunner`'s
        nodes) are filled in the same call, and ``also`` names them in the error of an unknown point."""
        modules = dict(self.model.named_modules())
        # a layer table's point for a module without parameters (an activation) is its fx name
        modules.update({k.replace(".", "_"): m for k, m in list(modules.items()) if k.replace(".", "_") not in modules})
        projections = _in_projection_points(self.model)
        missing = [p for p in points if (p not in modules and p not in projections) or p == ""]
        again = [p for p in missing if p.rstrip("0123456789").removesuffix("_") in modules and p[-1:].isdigit()]
        if again:  # fx numbers a module's second call: ``relu_1``
            raise UnknownNameError(f"feature point(s) {again}: the module runs more than once in a forward pass, so "
                                   "its output there is not one feature map; name a module that runs once")
        if missing:
            listed = [*also, *(n for n in modules if n and n not in also)]
            raise UnknownNameError(f"unknown feature point(s) {missing}; this model's points are "
                                   f"{'its nodes and submodules' if also else 'its submodules'}: {listed[:40]}")
        out: dict[str, Any] = {}
        twice: list[str] = []

        def keep(point: str, value: Any) -> None:
            if point in out:
                twice.append(point)
            # a copy: a later in-place operation (nn.ReLU(inplace=True), out += identity) may overwrite the output
            out[point] = value.clone() if isinstance(value, torch.Tensor) else value

        handles = [modules[p].register_forward_hook(lambda _m, _i, o, p=p: keep(p, _units_second(_m, o)))
                   for p in points if p not in projections]
        handles += [projections[p].register_forward_hook(
            lambda m, args, kwargs, _o, p=p: keep(p, in_projection(m, args, kwargs)), with_kwargs=True)
            for p in points if p in projections]
        # torch's fused "fast path" of nn.TransformerEncoderLayer / nn.MultiheadAttention in inference skips the
        # submodules' forward calls: off while hooks read them
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            self._call(params, x, **({} if taps is None else {"taps": taps}))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for h in handles:
                h.remove()
        if twice:
            raise UnknownNameError(f"feature point(s) {sorted(set(twice))}: the module runs more than once in a "
                                   "forward pass, so its output there is not one feature map; name a module that "
                                   "runs once")
        silent = [p for p in points if p not in out]
        if silent:
            raise UnknownNameError(f"feature point(s) {silent}: the module does not run in a forward pass (a "
                                   "container such as an nn.ModuleList); name a module inside it")
        return out

    def value_and_grad(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       loss: Callable[[Any, Any], Any], *,
                       train: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        leaf = flat.detach().clone().requires_grad_(True)
        flat = flat.detach().clone()  # (the caller's vector stays as it is: it may be a frozen model's memory)
        trained = self._views(leaf)
        buffers = self._views(flat)  # running statistics update in place, into the returned copy
        params = {k: (buffers[k] if k in self.buffers else v) for k, v in trained.items()}
        self.model.train(train)
        try:
            with contextlib.ExitStack() as stack:
                if train:  # dropout's masks from a digest of the batch: reproducible, new for every batch (as jax's)
                    cuda = [x.device] if x.device.type == "cuda" else []
                    stack.enter_context(torch.random.fork_rng(devices=cuda))
                    torch.manual_seed(_batch_digest(x))
                value = loss(self._call(params, x), y)
                (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        finally:
            self.model.eval()
        return value.detach(), torch.zeros_like(flat) if grad is None else grad, flat


def _batch_digest(x: torch.Tensor) -> int:
    """A digest of a batch's bits and positions (uint32): the seed of a training step's dropout masks, so
    that a step is reproducible whatever the global RNG and different batches draw different masks."""
    flat = x.detach().reshape(-1)
    bits = flat.float().view(torch.int32).long() if flat.is_floating_point() else flat.long()
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * 2654435761 + 1
    return int(torch.sum(bits * weights).item()) & 0xFFFFFFFF


class TorchBackend(Backend):
    """PyTorch implementation of :class:`~combinability.backend.Backend`.

    Parameters
    ----------
    device : str or torch.device, optional
        Where models live and evaluations run; CUDA when available, else the CPU.
    vectorize : bool, optional
        Run several parameter vectors at once with :func:`torch.func.vmap` (``True``) or one
        after the other (``False``). ``None`` (default): a loop on the CPU; on CUDA, vmap for
        models below :data:`combinability.backend.VMAP_MAX_PARAMETERS` parameters, a loop for
        larger ones (:func:`combinability.backend.vmap_on_accelerator`).
    compute_dtype : {"float32", "bfloat16", "float16"}
        Forward passes and feature taps under :func:`torch.autocast` to this type (float32
        parameters, float32 logits); see :meth:`~combinability.backend.Backend.with_compute_dtype`.
    compile : bool or mapping, default False
        Evaluate through :func:`torch.compile`: the parameter vector's views, the functional
        call and the model become one graph, whose element-wise passes (normalisations,
        activations, residual sums, autocast's casts) the compiler fuses. ``True`` compiles with
        torch's defaults; a mapping gives :func:`torch.compile`'s keyword arguments (``{"mode":
        "max-autotune"}``, ``{"backend": "aot_eager"}``). Each prepared model compiles at its
        first evaluation (seconds to a minute; again for a new batch shape) and pays off on long
        evaluations of large models on a GPU. Feature taps and gradients stay eager.
    """

    name = "torch"
    extra = "torch"
    compute_dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, device: str | torch.device | None = None, *, vectorize: bool | None = None,
                 compute_dtype: str = "float32", compile: bool | Mapping[str, Any] = False) -> None:  # noqa: A002
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.torch_device = torch.device(device)
        self.vectorize = vectorize
        if compute_dtype not in self.compute_dtypes:
            from combinability.errors import ConfigurationError

            raise ConfigurationError(f"TorchBackend cannot compute in {compute_dtype!r}; valid: "
                                     f"{', '.join(self.compute_dtypes)}")
        self.compute_dtype = compute_dtype
        if not isinstance(compile, bool | Mapping):
            from combinability.errors import ConfigurationError

            raise ConfigurationError(f"TorchBackend's compile is True, False or a mapping of torch.compile's keyword "
                                     f"arguments, not {type(compile).__name__} {compile!r}")
        #: :func:`torch.compile`'s keyword arguments for evaluations; ``None`` when they run eagerly.
        self.compile_options: dict[str, Any] | None = (dict(compile) if isinstance(compile, Mapping)
                                                       else {} if compile else None)

    def _settings(self) -> dict[str, Any]:
        """The keyword arguments that make a copy of this backend (device aside)."""
        compile_ = False if self.compile_options is None else (self.compile_options or True)
        return {"vectorize": self.vectorize, "compute_dtype": self.compute_dtype, "compile": compile_}

    def __repr__(self) -> str:
        dtype = f", compute_dtype={self.compute_dtype!r}" if self.compute_dtype != "float32" else ""
        compiled = f", compile={self._settings()['compile']!r}" if self.compile_options is not None else ""
        return f"TorchBackend(device={str(self.torch_device)!r}, vectorize={self.vectorize}{dtype}{compiled})"

    def devices(self) -> dict[str, Any]:
        found: dict[str, Any] = {"cpu": torch.device("cpu")}
        if torch.cuda.is_available():
            found["cuda"] = torch.device("cuda", torch.cuda.current_device())
            found.update({f"cuda:{i}": torch.device("cuda", i) for i in range(torch.cuda.device_count())})
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            found["mps"] = torch.device("mps")
        return found

    def with_device(self, device: torch.device) -> TorchBackend:
        if device == self.torch_device:
            return self
        return TorchBackend(device, **self._settings())

    def _with_compute_dtype(self, dtype: str) -> TorchBackend:
        return TorchBackend(self.torch_device, **{**self._settings(), "compute_dtype": dtype})

    def with_compile(self, compile: bool | Mapping[str, Any] = True) -> TorchBackend:  # noqa: A002
        """This backend with ``compile`` in place of its own (see the class's parameters)."""
        return TorchBackend(self.torch_device, **{**self._settings(), "compile": compile})

    def use_vmap(self, parameters: int) -> bool:
        """Whether vectors of ``parameters`` entries run vmapped (see ``vectorize``)."""
        if self.vectorize is not None:
            return bool(self.vectorize)
        return self.torch_device.type == "cuda" and vmap_on_accelerator(parameters)

    # -- device and arrays --------------------------------------------------------------
    def device(self) -> str:
        return str(self.torch_device)

    def xp(self) -> Any:
        import array_api_compat.torch as xp

        return xp

    def asarray(self, array: Any, dtype: Any = None) -> torch.Tensor:
        if not isinstance(array, torch.Tensor):
            array = np.asarray(array)
            array = _from_numpy(array)
        return array.to(self.torch_device, None if dtype is None else torch_dtype(dtype))

    def to_numpy(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            return array.detach().to("cpu").numpy().copy()
        return np.array(array)

    def random(self, seed: int) -> TorchRandom:
        return TorchRandom(seed, self.torch_device)

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    # -- models -------------------------------------------------------------------------
    def build(self, table: LayerTable, *, seed: int) -> nn.Module:
        """A freshly initialised :class:`TableNet` (torch's default init); the global RNG is untouched."""
        table.check_buildable()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            model = TableNet(table)
        return model.to(self.torch_device).eval()

    def own(self, model: Any) -> nn.Module:
        """``model`` itself (unwrapped from ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel``:
        the module they run, whose names its own state dict has), or a float32 copy of a model holding other
        floating-point tensors (bfloat16, float16, float64): the library feeds float32 inputs and computes in
        float32 (mixed precision by ``compute_dtype``), which such a model would refuse. Models made from the
        set hold float32."""
        model = _unwrapped(_torch_module(model))
        dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
        if dtypes <= {torch.float32}:
            return model
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes - {torch.float32}))
        _log.info("%s holds %s tensors: the library runs a float32 copy of it", type(model).__name__, names)
        _refuse_hooked_weights(model)  # torch cannot copy weight_norm's older hook
        return copy.deepcopy(model).float()

    def table_of(self, model: Any) -> LayerTable | None:
        return model.table if isinstance(model, TableNet) else None

    def describe(self, model: nn.Module, example_input: Any) -> LayerTable:
        """The layer table of a user's module, traced with torch.fx (see :mod:`combinability_torch.trace`)."""
        from combinability_torch.trace import describe

        model = _unwrapped(_torch_module(model))
        x = self.asarray(example_input, input_dtype(example_input)).to("cpu")
        refuse_computed_weights(model)  # before the copy: torch cannot copy weight_norm's older hook
        return describe(copy.deepcopy(model).to("cpu"), x)[0]

    def symmetries(self, model: nn.Module, example_input: Any) -> tuple[Any, list[Any]]:
        """Heads, neurons and residual stream of a user's transformer (:mod:`combinability_torch.trace_stream`).

        A model with weight norms (``torch.nn.utils.parametrizations.weight_norm``) is traced with each
        weight as computed (its layer table's spec, else its feature spaces), and the spec moves the
        gains and directions it stores instead (:func:`combinability_torch.trace.without_weight_norm`);
        the caller verifies it on the model itself.
        """
        from combinability_torch.trace import describe, without_weight_norm
        from combinability_torch.trace_stream import stream_symmetries

        model = _unwrapped(_torch_module(model))
        x = self.asarray(example_input, input_dtype(example_input)).to("cpu")
        plain, stored = without_weight_norm(model)
        if not stored:
            return stream_symmetries(copy.deepcopy(model).to("cpu").eval(), x)
        plain = plain.to("cpu").eval()
        try:
            return describe(copy.deepcopy(plain), x)[0].spec().stored_as(stored), []
        except TracingError as table_exc:
            spec, folds = stream_symmetries(plain, x)
            if folds:  # norms folded into weights the model stores as gains and directions
                raise TracingError(f"{type(model).__name__} holds weight norms and norms the stream tracer folds "
                                   f"into the layers reading them; remove the weight norms first "
                                   f"(torch.nn.utils.parametrize.remove_parametrizations); as a layer table: "
                                   f"{table_exc}") from None
            return spec.stored_as(stored), []

    def state(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The model's parameters and buffers as numpy arrays, a tied tensor once (:func:`tensor_aliases`)."""
        return {k: v.detach().to("cpu").numpy().copy() for k, v in _state_tensors(model).items()}

    def trainable(self, model: nn.Module) -> tuple[str, ...]:
        return tuple(name for name, p in _torch_module(model).named_parameters() if p.requires_grad)

    def with_state(self, model: nn.Module, params: Mapping[str, np.ndarray]) -> nn.Module:
        """A copy of ``model`` holding ``params``.

        Raises
        ------
        LayoutError
            If ``params`` misses a name of the model's state, has an unknown one, or a shape differs.
        """
        params = _untied(model, params)
        check_names({k: v.shape for k, v in _state_tensors(model).items()}, {k: np.shape(v) for k, v in params.items()},
                    "params do not match the model")
        _refuse_hooked_weights(model)
        new = copy.deepcopy(model)  # keeps tied tensors tied: each is written once, under its first name
        with torch.no_grad():
            for name, tensor in _state_tensors(new).items():
                tensor.copy_(torch.as_tensor(np.asarray(params[name])))
        return new

    def prepare(self, model: nn.Module, layout: FlatLayout) -> TorchPrepared:
        return TorchPrepared(self, model, layout)

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # log Σ exp − the label's logit: on the CPU twice as fast as F.cross_entropy over few classes
        # (whose log-softmax runs along the short class axis), the same to float32 rounding
        lead = logits.shape[:-1]
        logits = logits.float()
        labels = y.expand(lead).unsqueeze(-1)
        return torch.logsumexp(logits, dim=-1) - torch.gather(logits, -1, labels).squeeze(-1)

    def augment(self, x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(matrices.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
