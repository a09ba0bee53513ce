"""Flax (linen) modules of the reference architectures.

Numerically the same networks as the torch implementations (``/work/notes``'s
architecture sheet): LayerNorm over the channel axis at every position
(``nn.LayerNorm(epsilon=1e-5)`` on NHWC), convolutions with torch's explicit
symmetric padding, ReLU, global average pooling and a dense head.

Inputs are NHWC for images and ``(n, f)`` for vectors. Every module *sows* its
post-ReLU hidden activations into the ``"intermediates"`` collection (names listed by
each architecture's ``activation_points``); :class:`MLPModule` flattens images in
channels-first order so that its first kernel lines up with torch's ``nn.Flatten``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from combinability.zoo import TINY10_CHANNELS, TINY10_STRIDES, VGG16_CONFIG, channels

__all__ = [
    "FlaxModel",
    "flatten_variables",
    "unflatten_variables",
    "init_variables",
    "channels",
    "MLPModule",
    "Tiny10Module",
    "BasicBlock",
    "ResNet20Module",
    "VGG16Module",
    "TINY10_CHANNELS",
    "TINY10_STRIDES",
    "VGG16_CONFIG",
]



@dataclass(frozen=True, eq=False)
class FlaxModel:
    """The JAX backend's native model: a flax module, its variables and its configuration.

    Attributes
    ----------
    module : flax.linen.Module
    variables : dict
        ``{"params": nested dict of jax arrays, ...}`` as returned by ``module.init``.
    config : dict
        ``{"architecture", "width", "num_classes", "input_shape"}`` (input shape channels-first).
    order : tuple of str
        Flat parameter names in the order the backend's ``state`` gives them. For the
        reference architectures this is the forward order of their ``layers()`` (layer by
        layer, ``kernel`` before ``bias``, ``scale`` before ``bias``); names not listed there
        follow in :func:`flatten_variables` order. Kept here because jax transformations
        re-sort dict keys.
    """

    module: nn.Module
    variables: Mapping[str, Any]
    config: Mapping[str, Any]
    order: tuple[str, ...]

    @classmethod
    def create(cls, module: nn.Module, variables: Mapping[str, Any], config: Mapping[str, Any],
               order: Sequence[str] = ()) -> FlaxModel:
        """A model whose parameter order is ``order`` (names it lacks follow in ``variables``' order)."""
        names = list(flatten_variables(variables))
        known = set(names)
        first = [n for n in order if n in known]
        chosen = set(first)
        return cls(module, variables, dict(config), (*first, *[n for n in names if n not in chosen]))

    @property
    def combinability_config(self) -> dict[str, Any]:
        """The configuration (same attribute name as on the torch backend's models)."""
        return dict(self.config)

    @property
    def params(self) -> Any:
        """The nested ``"params"`` collection."""
        return self.variables["params"]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Logits of NHWC images or ``(n, f)`` vectors."""
        return self.module.apply(self.variables, x)

    def __repr__(self) -> str:
        return f"FlaxModel({type(self.module).__name__}, {len(self.order)} arrays, config={dict(self.config)})"


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{name: array}`` of every collection, in traversal (insertion) order.

    ``"params"`` come first, named by their module path joined with ``"/"``
    (``"layers_0/kernel"``); any other collection follows with its name as the first
    path component (``"batch_stats/norm/mean"``).
    """
    out: dict[str, Any] = {}
    names = ["params", *[c for c in variables if c != "params"]] if "params" in variables else list(variables)
    for collection in names:
        flat = flatten_dict(dict(variables[collection]), sep="/")
        prefix = "" if collection == "params" else f"{collection}/"
        out.update({prefix + k: v for k, v in flat.items()})
    return out


def unflatten_variables(flat: Mapping[str, Any], collections: Sequence[str] = ("params",)) -> dict[str, Any]:
    """Inverse of :func:`flatten_variables`; ``collections`` are those other than ``"params"`` to recognise."""
    groups: dict[str, dict[str, Any]] = {"params": {}}
    for name, value in flat.items():
        head, _, rest = name.partition("/")
        if head in collections and head != "params" and rest:
            groups.setdefault(head, {})[rest] = value
        else:
            groups["params"][name] = value
    return {c: unflatten_dict(g, sep="/") for c, g in groups.items()}


#: The inverse of the standard deviation of a standard normal truncated to [-2, 2] (as in flax).
_TRUNCATED_STD = 0.87962566103423978


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2
    return z


def init_variables(module: nn.Module, example: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Initial variables of ``module`` for inputs of shape ``example`` (one batch, NHWC), on the host.

    Flax's default initialisers, drawn with numpy (PCG64 seeded with ``seed``) rather than
    compiled by XLA, which makes building a model free of compilation: kernels are
    LeCun-normal (normal truncated to two standard deviations, variance ``1 / fan_in``),
    biases 0 and LayerNorm scales 1. Modules with other parameters are
    initialised by ``jax.jit(module.init)`` with ``PRNGKey(seed)``.
    """
    abstract = jax.eval_shape(module.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                              jax.ShapeDtypeStruct(example, jnp.float32))
    abstract = {k: v for k, v in abstract.items() if k != "intermediates"}
    flat = flatten_variables(abstract)
    leaves = {name.rsplit("/", 1)[-1] for name in flat}
    if set(abstract) != {"params"} or not leaves <= {"kernel", "bias", "scale"}:
        variables = jax.jit(module.init)(jax.random.PRNGKey(int(seed)), jnp.zeros(example, jnp.float32))
        return {k: v for k, v in variables.items() if k != "intermediates"}
    rng = np.random.default_rng(int(seed))
    values = {}
    for name, leaf in flat.items():
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        kind = name.rsplit("/", 1)[-1]
        if kind == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = _truncated_normal(rng, shape) * (np.sqrt(1.0 / max(1, fan_in)) / _TRUNCATED_STD)
        else:
            value = np.ones(shape) if kind == "scale" else np.zeros(shape)
        values[name] = jnp.asarray(value.astype(dtype))
    return unflatten_variables(values)



def _layer_norm(name: str) -> nn.LayerNorm:
    # torch's F.layer_norm computes the biased variance as mean((x - mean)^2)
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, stride: int, pad: int, name: str, bias: bool = True) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=bias, name=name)


def _global_average_pool(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(x, axis=(1, 2))


class MLPModule(nn.Module):
    """Flatten, three ``Dense -> ReLU`` hidden layers, a dense head (``layers_0`` .. ``layers_3``)."""

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if x.ndim == 4:  # NHWC -> NCHW before flattening, as torch does
            x = jnp.transpose(x, (0, 3, 1, 2))
        x = x.reshape((x.shape[0], -1))
        for i, units in enumerate(self.hidden):
            x = nn.relu(nn.Dense(units, name=f"layers_{i}")(x))
            self.sow("intermediates", f"hidden_{i}", x)
        return nn.Dense(self.num_classes, name=f"layers_{len(self.hidden)}")(x)


class Tiny10Module(nn.Module):
    """Eight ``Conv -> LayerNorm -> ReLU`` layers, global average pooling, a dense head."""

    features: Sequence[int]
    strides: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        last = len(self.features) - 1
        for i, (c, s) in enumerate(zip(self.features, self.strides, strict=True)):
            k, pad = (1, 0) if i == last else (3, 1)
            x = _conv(c, k, s, pad, f"conv_{i}")(x)
            x = nn.relu(_layer_norm(f"norm_{i}")(x))
            self.sow("intermediates", f"act_{i}", x)
        return nn.Dense(self.num_classes, name="head")(_global_average_pool(x))


class BasicBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1 x)))) + shortcut(x))``, convolutions without bias."""

    inner: int
    out: int
    stride: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.relu(_layer_norm("norm1")(_conv(self.inner, 3, self.stride, 1, "conv1", bias=False)(x)))
        self.sow("intermediates", "inner", h)
        h = _layer_norm("norm2")(_conv(self.out, 3, 1, 1, "conv2", bias=False)(h))
        if self.stride != 1 or x.shape[-1] != self.out:
            x = _layer_norm("shortcut_norm")(_conv(self.out, 1, self.stride, 0, "shortcut_conv", bias=False)(x))
        h = nn.relu(h + x)
        self.sow("intermediates", "out", h)
        return h


class ResNet20Module(nn.Module):
    """CIFAR ResNet-20 with LayerNorm: stem, 3 stages x 3 basic blocks, pooling, head.

    Blocks are named ``stage{s}_block{b}`` (0-based).
    """

    stages: Sequence[int]
    num_classes: int
    blocks_per_stage: int = 3

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _conv(self.stages[0], 3, 1, 1, "stem_conv", bias=False)(x)
        x = nn.relu(_layer_norm("stem_norm")(x))
        self.sow("intermediates", "stem", x)
        for s, c in enumerate(self.stages):
            for b in range(self.blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(c, c, stride, name=f"stage{s}_block{b}")(x)
        return nn.Dense(self.num_classes, name="head")(_global_average_pool(x))


class VGG16Module(nn.Module):
    """VGG-16 with LayerNorm: 13 ``Conv -> LayerNorm -> ReLU``, max pools while the image is >= 2x2."""

    config: Sequence[int | str]
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        i = 0
        for c in self.config:
            if c == "M":
                if min(x.shape[1], x.shape[2]) >= 2:
                    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
                continue
            x = _conv(int(c), 3, 1, 1, f"conv_{i}")(x)
            x = nn.relu(_layer_norm(f"norm_{i}")(x))
            self.sow("intermediates", f"act_{i}", x)
            i += 1
        return nn.Dense(self.num_classes, name="head")(_global_average_pool(x))
