"""The PyTorch backend: build, evaluate, probe, train, save and load torch models.

Evaluation runs the model *functionally* (:func:`torch.func.functional_call`) on views
into one device tensor holding the flat parameter vector, so evaluating a combination
never copies it parameter by parameter. Several vectors are evaluated one after the
other (``vectorize=False``, the default on the CPU, where it is faster for small
models) or together with :func:`torch.func.vmap` (the default on CUDA).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from combinability.backend import Backend, Evaluation
from combinability.errors import (
    ConfigurationError,
    CorruptFileError,
    DatasetError,
    IncompatibleModelsError,
    LayoutError,
    NonFiniteWeightsError,
    UnknownNameError,
)
from combinability_torch.checkpoint import read_checkpoint, write_checkpoint

if TYPE_CHECKING:
    from combinability.architecture import Architecture
    from combinability.data.base import ArrayDataset
    from combinability.layout import FlatLayout
    from combinability.training import TrainRecipe

__all__ = ["TorchBackend", "TorchRandom", "torch_dtype"]


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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TorchBackend(Backend):
    """PyTorch implementation of :class:`~combinability.backend.Backend`.

    Parameters
    ----------
    device : str or torch.device, optional
        Where models live and evaluations run; CUDA when available, else the CPU.
    vectorize : bool, optional
        Evaluate several parameter vectors at once with :func:`torch.func.vmap`
        (``True``) or one after the other (``False``). ``None`` (default): vmap on CUDA,
        a loop on the CPU (measured faster there for the MLP).
    vmap_chunk : int
        Vectors evaluated together by one vmapped call.
    cache_size : int
        Datasets whose device copies are kept (keyed by the dataset object).
    """

    name = "torch"
    extra = "torch"

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        vectorize: bool | None = None,
        vmap_chunk: int = 16,
        cache_size: int = 4,
    ) -> None:
        self._device = torch.device(device) if device is not None else _default_device()
        self.vectorize = vectorize
        self.vmap_chunk = max(1, int(vmap_chunk))
        self.cache_size = max(1, int(cache_size))
        self._data_cache: OrderedDict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = OrderedDict()

    def __repr__(self) -> str:
        return f"TorchBackend(device={str(self._device)!r}, vectorize={self.vectorize})"

    # -- device and arrays --------------------------------------------------------------
    def device(self) -> str:
        return str(self._device)

    def xp(self) -> Any:
        import array_api_compat.torch as xp

        return xp

    def asarray(self, array: Any) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array.to(self._device)
        return torch.as_tensor(np.asarray(array), device=self._device)

    def to_numpy(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            return array.detach().to("cpu").numpy().copy()
        return np.array(array)

    def random(self, seed: int) -> TorchRandom:
        return TorchRandom(seed, self._device)

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    # -- models -------------------------------------------------------------------------
    def build(
        self,
        architecture: Architecture | str,
        *,
        width: float,
        num_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
    ) -> nn.Module:
        """A freshly initialised model on :meth:`device`; torch's global RNG is left untouched.

        The model remembers its configuration in ``model.combinability_config``.
        """
        architecture = _resolve_architecture(architecture)
        impl = architecture.implementation(self.name)
        input_shape = tuple(int(s) for s in input_shape)
        model = impl.build(width=width, num_classes=int(num_classes), input_shape=input_shape, seed=int(seed))
        model = model.to(self._device)
        model.combinability_config = {
            "architecture": architecture.name,
            "width": width,
            "num_classes": int(num_classes),
            "input_shape": input_shape,
        }
        return model

    def state(self, model: nn.Module) -> dict[str, np.ndarray]:
        return {k: v.detach().to("cpu").numpy().copy() for k, v in model.state_dict().items()}

    def with_state(self, model: nn.Module, params: Mapping[str, np.ndarray]) -> nn.Module:
        """A copy of ``model`` holding ``params`` (``model`` itself is not changed).

        Raises
        ------
        LayoutError
            If ``params`` misses a name of the model's state, has an unknown one, or a shape differs.
        """
        current = model.state_dict()
        _check_names(current, {k: tuple(np.shape(v)) for k, v in params.items()}, what="params")
        new = copy.deepcopy(model)
        with torch.no_grad():
            for name, tensor in new.state_dict().items():
                tensor.copy_(torch.as_tensor(np.asarray(params[name])))
        return new

    # -- evaluation ---------------------------------------------------------------------
    def _device_data(self, data: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """``data.x`` (float32) and ``data.y`` (int64) on the device, cached per dataset object."""
        key = id(data)
        hit = self._data_cache.get(key)
        if hit is not None and hit[0]() is data:
            self._data_cache.move_to_end(key)
            return hit[1], hit[2]
        x = np.ascontiguousarray(data.x, dtype=np.float32)
        y = np.ascontiguousarray(data.y, dtype=np.int64)
        xt = (torch.from_numpy(x) if x.flags.writeable else torch.tensor(x)).to(self._device)
        yt = (torch.from_numpy(y) if y.flags.writeable else torch.tensor(y)).to(self._device)
        cache = self._data_cache
        ref = weakref.ref(data, lambda _, key=key, cache=cache: cache.pop(key, None))
        cache[key] = (ref, xt, yt)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return xt, yt

    def _stack_flats(self, flats: Any, layout: FlatLayout) -> torch.Tensor:
        """The parameter vectors as one ``(k, d)`` device tensor of the layout's dtype."""
        dtype = torch_dtype(layout.dtype)
        if isinstance(flats, torch.Tensor):
            t = flats.to(self._device, dtype)
        elif isinstance(flats, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(flats)).to(self._device, dtype)
        elif isinstance(flats, Sequence) and len(flats) > 0:
            t = torch.stack([self.asarray(f).to(self._device, dtype) for f in flats])
        else:
            raise LayoutError(
                f"flats must be an array of shape (d,) or (k, d) or a non-empty sequence, got {flats!r:.80}"
            )
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != layout.size:
            raise LayoutError(
                f"parameter vectors have shape {tuple(t.shape)}; the layout expects (d,) or (k, d) "
                f"with d = {layout.size}"
            )
        return t

    @staticmethod
    def _unflatten(flat: torch.Tensor, layout: FlatLayout) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (shape ``(..., d)``) as the layout's named arrays, shapes ``(..., *shape)``."""
        chunks = torch.split(flat, [e.size for e in layout.entries], dim=-1)
        lead = tuple(flat.shape[:-1])
        out = {}
        for e, chunk in zip(layout.entries, chunks, strict=True):
            t = chunk.reshape(*lead, *e.shape)
            dtype = torch_dtype(e.dtype)
            out[e.name] = t if t.dtype == dtype else t.to(dtype)
        return out

    def _use_vmap(self, vectorize: bool | None) -> bool:
        if vectorize is None:
            vectorize = self.vectorize
        return self._device.type == "cuda" if vectorize is None else bool(vectorize)

    def evaluate(
        self,
        model: nn.Module,
        layout: FlatLayout,
        flats: Any,
        data: ArrayDataset,
        *,
        batch_size: int = 1000,
        vectorize: bool | None = None,
    ) -> list[Evaluation]:
        """Loss (mean cross-entropy), accuracy and predictions of each parameter vector.

        ``vectorize`` overrides the backend's choice between a loop and :func:`torch.func.vmap`.
        See :meth:`combinability.backend.Backend.evaluate`.
        """
        n = len(data)
        if n == 0:
            raise DatasetError("cannot evaluate on an empty dataset")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        _check_names(model.state_dict(), {e.name: e.shape for e in layout.entries}, what="layout", subset=True)
        stacked = self._stack_flats(flats, layout)
        x, y = self._device_data(data)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                if self._use_vmap(vectorize):
                    losses, preds = self._evaluate_vmap(model, layout, stacked, x, y, batch_size)
                else:
                    losses, preds = self._evaluate_loop(model, layout, stacked, x, y, batch_size)
                losses_np = losses.to("cpu").numpy()
                preds_np = preds.to("cpu").numpy().astype(np.int64)
        finally:
            model.train(was_training)
        labels = np.asarray(data.y)
        return [
            Evaluation(loss=float(losses_np[i]) / n, accuracy=float(np.mean(preds_np[i] == labels)),
                       predictions=preds_np[i])
            for i in range(len(losses_np))
        ]

    def _evaluate_loop(self, model, layout, stacked, x, y, batch_size):
        losses, preds = [], []
        for row in stacked:
            params = self._unflatten(row, layout)
            total = torch.zeros((), dtype=torch.float64, device=self._device)
            pred = []
            for s in range(0, len(y), batch_size):
                logits = functional_call(model, params, (x[s : s + batch_size],))
                total += F.cross_entropy(logits.float(), y[s : s + batch_size], reduction="sum").double()
                pred.append(logits.argmax(dim=1))
            losses.append(total)
            preds.append(torch.cat(pred))
        return torch.stack(losses), torch.stack(preds)

    def _evaluate_vmap(self, model, layout, stacked, x, y, batch_size):
        def forward(params, xb):
            return functional_call(model, params, (xb,))

        batched = vmap(forward, in_dims=(0, None))
        losses, preds = [], []
        for c in range(0, stacked.shape[0], self.vmap_chunk):
            params = self._unflatten(stacked[c : c + self.vmap_chunk], layout)
            k = stacked[c : c + self.vmap_chunk].shape[0]
            total = torch.zeros(k, dtype=torch.float64, device=self._device)
            pred = []
            for s in range(0, len(y), batch_size):
                yb = y[s : s + batch_size]
                logits = batched(params, x[s : s + batch_size])  # (k, b, classes)
                per = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yb.repeat(k), reduction="none")
                total += per.view(k, -1).sum(dim=1).double()
                pred.append(logits.argmax(dim=2))
            losses.append(total)
            preds.append(torch.cat(pred, dim=1))
        return torch.cat(losses), torch.cat(preds)

    def activations(
        self,
        model: nn.Module,
        data: ArrayDataset,
        points: Sequence[str],
        *,
        batch_size: int = 1000,
    ) -> dict[str, np.ndarray]:
        """Outputs of the submodules named ``points`` (e.g. ``"hidden_0"``, ``"stage1_block0.inner"``).

        Dense outputs come back as ``(n, units)``; convolutional ``(n, c, h, w)`` outputs as
        ``(n * h * w, c)`` (example-major, then row-major positions).

        Raises
        ------
        UnknownNameError
            If a point is not a submodule of ``model``; the message lists the valid ones.
        """
        modules = dict(model.named_modules())
        unknown = [p for p in points if p not in modules or p == ""]
        if unknown:
            valid = [n for n, m in modules.items() if n and not list(m.children())]
            raise UnknownNameError(f"unknown activation point(s) {unknown}; this model's points are: {valid}")
        x, _ = self._device_data(data)
        collected: dict[str, list[torch.Tensor]] = {p: [] for p in points}

        def hook_for(point: str):
            def hook(_module, _inputs, output):
                out = output.detach()
                if out.ndim == 4:
                    out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
                elif out.ndim != 2:
                    out = out.reshape(out.shape[0], -1)
                collected[point].append(out.to("cpu", torch.float32))

            return hook

        handles = [modules[p].register_forward_hook(hook_for(p)) for p in dict.fromkeys(points)]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(x), batch_size):
                    model(x[s : s + batch_size])
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return {p: torch.cat(collected[p]).numpy() for p in points}

    # -- training ------------------------------------------------------------------------
    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        recipe: TrainRecipe,
        *,
        seed: int,
        progress: bool = False,
    ) -> nn.Module:
        """Train ``model`` in place with ``recipe`` and return it.

        The batch order (and the augmentation's random numbers) come from ``seed``;
        on the CPU the same seed gives bitwise the same weights.

        Raises
        ------
        NonFiniteWeightsError
            If the training loss becomes NaN or infinite (lower the learning rate).
        """
        from tqdm.auto import tqdm

        n = len(data)
        if n == 0:
            raise DatasetError("cannot train on an empty dataset")
        x, y = self._device_data(data)
        opt = _optimizer(recipe, [p for p in model.parameters() if p.requires_grad], self._device)
        rng = np.random.default_rng(seed)
        augment = None
        generator = None
        if recipe.augment and data.is_image:
            from combinability_torch.augment import augment_batch as augment

            generator = torch.Generator(device=self._device)
            generator.manual_seed(int(rng.integers(2**62)))
        bs = int(recipe.batch_size)
        steps_per_epoch = math.ceil(n / bs)
        name = getattr(model, "combinability_config", {}).get("architecture", type(model).__name__)
        step = 0
        model.train()
        with tqdm(total=recipe.epochs * steps_per_epoch, disable=not progress, desc=f"train {name}",
                  unit="step", leave=False) as bar:
            for epoch in range(recipe.epochs):
                order = torch.from_numpy(rng.permutation(n)).to(self._device)
                running = torch.zeros((), dtype=torch.float64, device=self._device)
                for b in range(steps_per_epoch):
                    idx = order[b * bs : (b + 1) * bs]
                    xb, yb = x[idx], y[idx]
                    if augment is not None:
                        xb = augment(xb, generator)
                    lr = recipe.learning_rate(step, steps_per_epoch)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    loss = F.cross_entropy(model(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    running += loss.detach().double()
                    step += 1
                    bar.update(1)
                mean_loss = float(running) / steps_per_epoch
                if not math.isfinite(mean_loss):
                    raise NonFiniteWeightsError(
                        f"training diverged in epoch {epoch + 1}: the mean loss is {mean_loss}; "
                        f"lower the learning rate (now {recipe.lr})"
                    )
                bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}")
        model.eval()
        return model

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, model: nn.Module, path: str | Path, metadata: Mapping[str, Any]) -> None:
        """Write ``model`` and ``metadata`` to ``path`` (see :mod:`combinability_torch.checkpoint`)."""
        config = getattr(model, "combinability_config", None)
        if not config:
            raise IncompatibleModelsError(
                f"{type(model).__name__} has no combinability_config; build models with TorchBackend.build "
                "(or set model.combinability_config = {'architecture', 'width', 'num_classes', 'input_shape'})"
            )
        write_checkpoint(
            path,
            architecture=config["architecture"],
            config={k: config[k] for k in ("width", "num_classes", "input_shape")},
            state=model.state_dict(),
            metadata=metadata,
            backend=self.name,
        )

    def load(self, path: str | Path, architecture: Architecture | str | None = None) -> tuple[nn.Module, dict]:
        """Read a checkpoint written by :meth:`save`: ``(model on the device, metadata)``.

        The architecture is resolved by the name stored in the file unless given.

        Raises
        ------
        CorruptFileError, IncompatibleVersionError
            If the file is not a readable version-1 checkpoint.
        IncompatibleModelsError
            If it was written by another backend or holds another architecture than ``architecture``.
        """
        payload = read_checkpoint(path)
        if payload["backend"] != self.name:
            raise IncompatibleModelsError(
                f"{path} was written by the {payload['backend']!r} backend; load it with that backend"
            )
        stored = payload["architecture"]
        arch = _resolve_architecture(stored if architecture is None else architecture)
        if arch.name != stored:
            raise IncompatibleModelsError(f"{path} holds a {stored!r} model, not {arch.name!r}")
        cfg = payload["config"]
        model = self.build(arch, width=cfg["width"], num_classes=cfg["num_classes"],
                           input_shape=tuple(cfg["input_shape"]), seed=0)
        state = payload["state"]
        try:
            _check_names(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, what="checkpoint state")
        except LayoutError as exc:
            raise CorruptFileError(f"{path}: {exc}") from None
        model.load_state_dict(state, strict=True)
        return model, dict(payload["metadata"])


def _optimizer(recipe: TrainRecipe, params: list[torch.Tensor], device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum or Adam; the fused kernels where the device has them (faster, same update)."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               fused=fused or None)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused or None)


def _resolve_architecture(architecture: Architecture | str) -> Architecture:
    if isinstance(architecture, str):
        from combinability.plugins import get_architecture

        return get_architecture(architecture)
    return architecture


def _check_names(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    subset: bool = False,
) -> None:
    """Raise :class:`LayoutError` unless ``shapes`` names the model's state arrays with their shapes."""
    missing = [] if subset else [k for k in state if k not in shapes]
    unexpected = [k for k in shapes if k not in state]
    wrong = [f"{k}: {tuple(shapes[k])} (model: {tuple(state[k].shape)})"
             for k in shapes if k in state and tuple(shapes[k]) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unknown names {unexpected} (the model has {list(state)[:12]})")
        if wrong:
            parts.append(f"wrong shapes {wrong}")
        raise LayoutError(f"{what} do not match the model: " + "; ".join(parts))
