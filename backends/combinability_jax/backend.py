"""The JAX/Flax backend: flax.linen models, jit-compiled evaluation and optax training.

The native model is a :class:`~combinability_jax.models.FlaxModel`. Parameters cross
the boundary as numpy arrays named by their flax path (``"layers_0/kernel"``), in the
model's ``order`` (for the reference architectures: forward order, layer by layer).
Datasets are channels-first numpy arrays; this backend transposes images to NHWC on
the device.

Evaluation unflattens the flat parameter vectors *inside* the compiled function (the
layout is static: slices and reshapes) and maps over several vectors at once with
:func:`jax.vmap`. Batches are padded to one shape (padding masked out), so each model,
layout, batch size and number of vectors compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict

from combinability.backend import Backend, Evaluation
from combinability.errors import (
    CorruptFileError,
    DatasetError,
    IncompatibleModelsError,
    LayoutError,
    NonFiniteWeightsError,
    PluginError,
    UnknownNameError,
)
from combinability_jax.checkpoint import read_checkpoint, write_checkpoint
from combinability_jax.models import FlaxModel, flatten_variables, unflatten_variables

if TYPE_CHECKING:
    from combinability.architecture import Architecture
    from combinability.data.base import ArrayDataset
    from combinability.layout import FlatLayout
    from combinability.training import TrainRecipe

__all__ = ["JaxBackend", "JaxRandom"]


class JaxRandom:
    """A :class:`~combinability.backend.RandomSource` over a JAX PRNG key, split on every draw.

    Parameters
    ----------
    seed : int
    device : jax.Device, optional
        Where the draws are placed (default: jax's default device).
    """

    def __init__(self, seed: int, device: Any = None) -> None:
        self.key = jax.random.PRNGKey(int(seed))
        self.device = device

    def uniform(self, shape: int | tuple[int, ...], dtype: Any = None) -> jax.Array:
        """Independent U[0, 1) draws of ``shape`` (float32 unless ``dtype`` is given)."""
        self.key, sub = jax.random.split(self.key)
        shape = (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
        out = jax.random.uniform(sub, shape, dtype=jnp.dtype(dtype or jnp.float32))
        return out if self.device is None else jax.device_put(out, self.device)


def _to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def _padded_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


class JaxBackend(Backend):
    """JAX/Flax implementation of :class:`combinability.Backend`.

    Parameters
    ----------
    device : jax.Device, optional
        Device of evaluations and training; default: ``jax.devices()[0]`` (a GPU when
        jax sees one).
    precision : str or None, default "highest"
        ``jax.default_matmul_precision`` of evaluation and activations (``"highest"``
        keeps float32 matmuls and convolutions exact on GPUs that would otherwise use
        TF32); ``None`` uses jax's default.
    train_precision : str or None, default None
        The same for training (jax's default: fastest).
    vectors_per_call : int, default 8
        Parameter vectors evaluated together by one :func:`jax.vmap` call.
    """

    name = "jax"
    extra = "jax"

    def __init__(self, *, device: Any = None, precision: str | None = "highest",
                 train_precision: str | None = None, vectors_per_call: int = 8) -> None:
        self._device = device if device is not None else jax.devices()[0]
        self.precision = precision
        self.train_precision = train_precision
        self.vectors_per_call = max(1, int(vectors_per_call))
        self._compiled: OrderedDict[Any, Callable] = OrderedDict()
        self._data_cache: OrderedDict[Any, Any] = OrderedDict()

    def __repr__(self) -> str:
        return f"JaxBackend(device={self.device()!r})"

    # -- device and arrays ---------------------------------------------------------------
    def device(self) -> str:
        return f"{self._device.platform}:{self._device.id}"

    def xp(self) -> Any:
        return jnp

    def asarray(self, array: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(array), self._device)

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(jax.device_get(array))

    def random(self, seed: int) -> JaxRandom:
        return JaxRandom(seed, self._device)

    def synchronize(self) -> None:
        jax.effects_barrier()
        jax.device_put(0.0, self._device).block_until_ready()

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "optax": optax.__version__}

    # -- models -----------------------------------------------------------------------------
    def _implementation(self, architecture: Architecture | str) -> tuple[str, Any]:
        if isinstance(architecture, str):
            from combinability.plugins import get_architecture

            architecture = get_architecture(architecture)
        return architecture.name, architecture.implementation(self.name)

    def build(self, architecture: Architecture | str, *, width: float, num_classes: int,
              input_shape: tuple[int, ...], seed: int) -> FlaxModel:
        name, impl = self._implementation(architecture)
        model = impl.build(width=width, num_classes=num_classes, input_shape=tuple(input_shape), seed=seed)
        if not isinstance(model, FlaxModel):
            raise PluginError(f"the jax implementation of {name!r} built a {type(model).__name__}, "
                              "not a combinability_jax.models.FlaxModel")
        return dataclasses.replace(model, config={**model.config, "architecture": name})

    @staticmethod
    def _check_model(model: Any) -> FlaxModel:
        if not isinstance(model, FlaxModel):
            raise IncompatibleModelsError(f"the jax backend works on FlaxModel objects, got {type(model).__name__}")
        return model

    def state(self, model: FlaxModel) -> dict[str, np.ndarray]:
        """Every variable as a numpy array, named by its flax path, in ``model.order``."""
        flat = flatten_variables(self._check_model(model).variables)
        return {name: np.array(jax.device_get(flat[name])) for name in model.order}

    def with_state(self, model: FlaxModel, params: Mapping[str, np.ndarray]) -> FlaxModel:
        """A new model holding ``params`` (cast to the model's dtypes).

        Raises
        ------
        LayoutError
            If a name is missing or unexpected, or a shape differs.
        """
        flat = flatten_variables(self._check_model(model).variables)
        missing = [n for n in model.order if n not in params]
        extra = [n for n in params if n not in flat]
        if missing or extra:
            raise LayoutError(f"parameters do not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
        new = {}
        for name in model.order:
            value = np.asarray(params[name])
            if value.shape != tuple(flat[name].shape):
                raise LayoutError(f"parameter {name!r} has shape {value.shape}, the model expects "
                                  f"{tuple(flat[name].shape)}")
            new[name] = jax.device_put(value.astype(flat[name].dtype), self._device)
        variables = unflatten_variables(new, tuple(model.variables))
        return dataclasses.replace(model, variables=variables)

    # -- compiled functions (cached per static configuration) ----------------------------
    def _cached(self, key: Any, make: Callable[[], Callable]) -> Callable:
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = make()
            while len(self._compiled) > 32:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return fn

    def _device_batches(self, data: ArrayDataset, batch_size: int) -> list[tuple[Any, Any, Any, int]]:
        """``(x, y, mask, valid)`` per batch on the device, padded to ``batch_size`` (cached for 2 datasets)."""
        key = (id(data.x), id(data.y), batch_size)
        hit = self._data_cache.get(key)
        if hit is not None and hit[0] is data.x and hit[1] is data.y:
            self._data_cache.move_to_end(key)
            return hit[2]
        x = np.asarray(data.x, dtype=np.float32)
        y = np.asarray(data.y, dtype=np.int32)
        batches = []
        for start, stop in _padded_batches(len(y), batch_size):
            xb, yb = x[start:stop], y[start:stop]
            valid = stop - start
            mask = np.zeros(batch_size, np.float32)
            mask[:valid] = 1.0
            if valid < batch_size:
                xb = np.concatenate([xb, np.zeros((batch_size - valid, *x.shape[1:]), np.float32)])
                yb = np.concatenate([yb, np.zeros(batch_size - valid, np.int32)])
            batches.append(tuple(jax.device_put(a, self._device) for a in (xb, yb, mask)) + (valid,))
        self._data_cache[key] = (data.x, data.y, batches)
        while len(self._data_cache) > 2:
            self._data_cache.popitem(last=False)
        return batches

    @staticmethod
    def _check_data(model: FlaxModel, data: ArrayDataset, what: str = "evaluate") -> None:
        expected = tuple(model.config.get("input_shape", data.input_shape))
        if tuple(data.input_shape) != expected:
            raise IncompatibleModelsError(
                f"the model takes inputs of shape {expected} (channels-first), the dataset "
                f"{data.name or ''!s} has {data.input_shape}"
            )
        if len(data) == 0:
            raise DatasetError(f"cannot {what} on an empty dataset")

    def _flat_matrix(self, flats: Any, layout: FlatLayout) -> jax.Array:
        if isinstance(flats, list | tuple):
            rows = [r if isinstance(r, jax.Array) else np.asarray(r, dtype=layout.dtype) for r in flats]
            if any(r.ndim != 1 for r in rows):
                raise LayoutError("a sequence of flat vectors must hold 1-d arrays")
            mat = jnp.stack([jnp.asarray(r) for r in rows]) if rows else jnp.zeros((0, layout.size))
        else:
            mat = flats if isinstance(flats, jax.Array) else np.asarray(flats, dtype=layout.dtype)
            if mat.ndim == 1:
                mat = mat[None, :]
        if mat.ndim != 2 or mat.shape[1] != layout.size:
            raise LayoutError(f"flat vectors have shape {tuple(mat.shape)}; the layout expects (d,) or (k, d) "
                              f"with d = {layout.size}")
        return jax.device_put(jnp.asarray(mat, dtype=layout.dtype), self._device)

    def _rest_of_state(self, model: FlaxModel, layout: FlatLayout) -> dict[str, jax.Array]:
        """The model's arrays the layout does not hold; checks that the layout fits the model."""
        flat = flatten_variables(model.variables)
        for e in layout.entries:
            if e.name not in flat:
                raise LayoutError(f"layout entry {e.name!r} is not a variable of the model; "
                                  f"the model has {list(model.order)[:8]}...")
            if tuple(flat[e.name].shape) != e.shape:
                raise LayoutError(f"layout entry {e.name!r} has shape {e.shape}, the model's is "
                                  f"{tuple(flat[e.name].shape)}")
        return {k: v for k, v in flat.items() if k not in layout}

    def _eval_fn(self, model: FlaxModel, layout: FlatLayout) -> Callable:
        module, collections = model.module, tuple(model.variables)
        entries = tuple((e.name, e.offset, e.stop, e.shape, np.dtype(e.dtype)) for e in layout.entries)

        def make() -> Callable:
            def one(vec, rest, x, y, mask):
                flat = dict(rest)
                for name, start, stop, shape, dtype in entries:
                    flat[name] = vec[start:stop].reshape(shape).astype(dtype)
                logits = module.apply(unflatten_variables(flat, collections), x).astype(jnp.float32)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                return jnp.sum(ce * mask), jnp.sum((pred == y) * mask), pred

            @jax.jit
            def run(vecs, rest, x, y, mask):
                return jax.vmap(one, in_axes=(0, None, None, None, None))(vecs, rest, _to_nhwc(x), y, mask)

            return run

        return self._cached(("evaluate", module, entries, collections), make)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model: FlaxModel, layout: FlatLayout, flats: Any, data: ArrayDataset, *,
                 batch_size: int = 1000) -> list[Evaluation]:
        model = self._check_model(model)
        self._check_data(model, data)
        rest = self._rest_of_state(model, layout)
        vectors = self._flat_matrix(flats, layout)
        n = len(data)
        batches = self._device_batches(data, max(1, min(int(batch_size), n)))
        run = self._eval_fn(model, layout)
        results: list[Evaluation] = []
        with jax.default_matmul_precision(self.precision) if self.precision else _null():
            for start in range(0, vectors.shape[0], self.vectors_per_call):
                group = vectors[start:start + self.vectors_per_call]
                outs = [run(group, rest, xb, yb, mb) for xb, yb, mb, _ in batches]
                loss = np.sum([np.asarray(o[0], np.float64) for o in outs], axis=0)
                correct = np.sum([np.asarray(o[1], np.float64) for o in outs], axis=0)
                preds = np.concatenate([np.asarray(o[2])[:, :valid] for o, (*_, valid) in zip(outs, batches,
                                                                                              strict=True)], axis=1)
                results += [Evaluation(float(loss[i] / n), float(correct[i] / n), preds[i].astype(np.int64))
                            for i in range(group.shape[0])]
        return results

    def logits(self, model: FlaxModel, x: np.ndarray) -> np.ndarray:
        """Logits of channels-first inputs ``x`` under ``model``'s own weights (a convenience)."""
        model = self._check_model(model)
        fn = self._cached(("logits", model.module), lambda: jax.jit(
            lambda v, x: model.module.apply(v, _to_nhwc(x))))
        with jax.default_matmul_precision(self.precision) if self.precision else _null():
            return np.asarray(fn(model.variables, jax.device_put(np.asarray(x, np.float32), self._device)))

    def activations(self, model: FlaxModel, data: ArrayDataset, points: Sequence[str], *,
                    batch_size: int = 1000) -> dict[str, np.ndarray]:
        """Post-activation values sown at ``points`` (flax paths such as ``"hidden_0"`` or
        ``"stage1_block0/inner"``), shape ``(n, units)``; images give ``(n * h * w, channels)``.

        Raises
        ------
        UnknownNameError
            If a point is not sown by the model; the message lists the valid points.
        """
        model = self._check_model(model)
        self._check_data(model, data)
        points = tuple(points)
        module = model.module

        def sown(x):
            _, state = module.apply(model.variables, _to_nhwc(x), mutable=["intermediates"])
            return {k: v[0] for k, v in flatten_dict(state["intermediates"], sep="/").items()}

        valid = jax.eval_shape(sown, jax.ShapeDtypeStruct((1, *data.input_shape), jnp.float32))
        unknown = [p for p in points if p not in valid]
        if unknown:
            raise UnknownNameError(f"unknown activation point(s) {unknown}; this model has: {', '.join(valid)}")

        def make() -> Callable:
            @jax.jit
            def run(variables, x):
                _, state = module.apply(variables, _to_nhwc(x), mutable=["intermediates"])
                flat = flatten_dict(state["intermediates"], sep="/")
                return {p: flat[p][0] for p in points}

            return run

        run = self._cached(("activations", module, points), make)
        batches = self._device_batches(data, max(1, min(int(batch_size), len(data))))
        chunks: dict[str, list[np.ndarray]] = {p: [] for p in points}
        with jax.default_matmul_precision(self.precision) if self.precision else _null():
            for xb, _, _, n_valid in batches:
                out = run(model.variables, xb)
                for p in points:
                    a = np.asarray(out[p])[:n_valid]
                    chunks[p].append(a.reshape(-1, a.shape[-1]))
        return {p: np.concatenate(chunks[p]).astype(np.float32, copy=False) for p in points}

    # -- training ----------------------------------------------------------------------------
    def _train_fn(self, model: FlaxModel, recipe: TrainRecipe, augmented: bool
                  ) -> tuple[optax.GradientTransformation, Callable]:
        module = model.module
        key = ("train", module, recipe.optimizer, recipe.momentum, recipe.weight_decay, augmented)

        def make_tx(learning_rate):
            parts = [optax.add_decayed_weights(recipe.weight_decay)] if recipe.weight_decay else []
            if recipe.optimizer == "adam":
                parts.append(optax.adam(learning_rate))
            else:
                parts.append(optax.sgd(learning_rate, momentum=recipe.momentum or None))
            return optax.chain(*parts)

        tx = optax.inject_hyperparams(make_tx)(learning_rate=recipe.lr)

        def make() -> Callable:
            augment = _augmenter() if augmented else None

            @jax.jit
            def epoch(params, opt_state, others, x_all, y_all, idx, mask, lrs, keys):
                def step(carry, inp):
                    params, opt_state = carry
                    ids, m, lr, k = inp
                    xb, yb = x_all[ids], y_all[ids]
                    if augment is not None:
                        xb = augment(xb, k)

                    def loss_fn(p):
                        logits = module.apply({"params": p, **others}, xb)
                        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
                        return jnp.sum(ce * m) / jnp.sum(m)

                    loss, grads = jax.value_and_grad(loss_fn)(params)
                    opt_state.hyperparams["learning_rate"] = lr  # the recipe's rate of this step
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), loss

                (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, mask, lrs, keys))
                return params, opt_state, losses

            return epoch

        return tx, self._cached(key, make)

    def train(self, model: FlaxModel, data: ArrayDataset, recipe: TrainRecipe, *, seed: int,
              progress: bool = False) -> FlaxModel:
        """Train with the recipe's optimizer and per-step learning rate; returns a new model.

        Every epoch visits the examples in an order drawn from ``numpy.random.default_rng(seed)``
        in batches of ``recipe.batch_size`` (the last one smaller, as padding masked out of
        the loss). SGD is ``add_decayed_weights -> sgd(momentum)`` (torch's SGD with weight
        decay), Adam is ``add_decayed_weights -> adam``; the rate of step ``t`` is
        ``recipe.learning_rate(t, steps_per_epoch)``, fed to ``optax.inject_hyperparams``.
        Augmentation (``recipe.augment``, images only) uses :mod:`combinability_jax.augment`
        with keys split from ``PRNGKey(seed)``.

        Raises
        ------
        NonFiniteWeightsError
            If an epoch's mean loss is NaN or infinite.
        DatasetError
            If ``data`` is empty.
        """
        model = self._check_model(model)
        self._check_data(model, data, "train")
        n = len(data)
        bs = max(1, min(int(recipe.batch_size), n))
        steps = math.ceil(n / bs)
        if recipe.epochs == 0:
            return model
        tx, epoch_fn = self._train_fn(model, recipe, bool(recipe.augment and data.is_image))
        params = model.variables["params"]
        others = {k: v for k, v in model.variables.items() if k != "params"}
        opt_state = tx.init(params)
        x_all = jax.device_put(np.asarray(data.x, np.float32), self._device)
        x_all = jax.jit(_to_nhwc)(x_all)
        y_all = jax.device_put(np.asarray(data.y, np.int32), self._device)
        rng = np.random.default_rng(seed)
        key = jax.random.PRNGKey(int(seed))
        mask = np.ones((steps, bs), np.float32)
        mask.reshape(-1)[n:] = 0.0
        bar = _progress(recipe.epochs, progress)
        with jax.default_matmul_precision(self.train_precision) if self.train_precision else _null():
            for ep in range(recipe.epochs):
                order = np.zeros(steps * bs, np.int32)
                order[:n] = rng.permutation(n)
                lrs = np.array([recipe.learning_rate(ep * steps + t, steps) for t in range(steps)], np.float32)
                keys = jax.random.split(jax.random.fold_in(key, ep), steps)
                params, opt_state, losses = epoch_fn(params, opt_state, others, x_all, y_all,
                                                     order.reshape(steps, bs), mask, lrs, keys)
                mean_loss = float(jnp.mean(losses))
                if not math.isfinite(mean_loss):
                    raise NonFiniteWeightsError(
                        f"training diverged in epoch {ep + 1}: the mean loss is {mean_loss}; "
                        f"lower the learning rate (now {recipe.lr})"
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
        if bar is not None:
            bar.close()
        return dataclasses.replace(model, variables={**model.variables, "params": params})

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, model: FlaxModel, path: str | Path, metadata: Mapping[str, Any]) -> None:
        """Write ``model`` and ``metadata`` to ``path`` (see :mod:`combinability_jax.checkpoint`)."""
        model = self._check_model(model)
        config = dict(model.config)
        header = {"backend": self.name, "architecture": config.get("architecture", ""), "config": config,
                  "metadata": dict(metadata)}
        write_checkpoint(path, header, self.state(model))

    def load(self, path: str | Path, architecture: Architecture | str | None = None
             ) -> tuple[FlaxModel, dict[str, Any]]:
        """Read a checkpoint written by :meth:`save`.

        Parameters
        ----------
        path : str or Path
        architecture : Architecture or str, optional
            Used to rebuild the model; default: looked up by the name the file records.

        Raises
        ------
        CorruptFileError
            If the file is not a readable jax checkpoint or its arrays do not fit its architecture.
        IncompatibleVersionError
            If it was written in another checkpoint format version.
        IncompatibleModelsError
            If the file was written by another backend, or ``architecture`` is not the one it records.
        """
        header, arrays = read_checkpoint(path, backend=self.name)
        config = header.get("config")
        needed = ("width", "num_classes", "input_shape")
        if not isinstance(config, dict) or any(k not in config for k in needed):
            raise CorruptFileError(f"{str(path)!r}: the checkpoint's config lacks one of {needed}")
        recorded = header.get("architecture") or config.get("architecture")
        if architecture is None:
            architecture = recorded
        name = architecture if isinstance(architecture, str) else architecture.name
        if recorded and name != recorded:
            raise IncompatibleModelsError(f"{str(path)!r} holds a {recorded!r} model, not a {name!r}")
        model = self.build(architecture, width=config["width"], num_classes=config["num_classes"],
                           input_shape=tuple(config["input_shape"]), seed=0)
        try:
            model = self.with_state(model, arrays)
        except LayoutError as exc:
            raise CorruptFileError(f"{str(path)!r}: its arrays do not fit a {name!r} model: {exc}") from exc
        return model, dict(header.get("metadata") or {})


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train (jax)", unit="epoch")


def _augmenter() -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``augment_batch(x_nhwc, key) -> x_nhwc`` from :mod:`combinability_jax.augment` (imported lazily)."""
    from combinability_jax.augment import augment_batch

    return augment_batch
