"""The reference architectures for the JAX/Flax backend.

Each of :data:`MLP`, :data:`Tiny10`, :data:`ResNet20` and :data:`VGG16` is an
:class:`~combinability.architecture.ArchitectureImpl`: it builds a
:class:`~combinability_jax.models.FlaxModel` and describes its parameters (permutation
spec, layer of each parameter, activation points) in flax's names and axis order, e.g.
``"layers_0/kernel"`` of shape ``(in, out)``.

Every architecture is described by one table of its parametrised layers (flax name,
torch name, kind, layer index, input and output permutation); the spec, the layer
map and the conversion to and from the reference (torch) names and axes are all read
off that table, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import numpy as np

from combinability.errors import IncompatibleModelsError
from combinability.permutation import PermutationSpec
from combinability.specs import SpecBuilder
from combinability.zoo import MLP_HIDDEN, RESNET20_STAGES
from combinability_jax.models import (
    TINY10_CHANNELS,
    TINY10_STRIDES,
    VGG16_CONFIG,
    FlaxModel,
    MLPModule,
    ResNet20Module,
    Tiny10Module,
    VGG16Module,
    channels,
    init_variables,
)

__all__ = ["FlaxArchitecture", "LayerEntry", "MLP", "Tiny10", "ResNet20", "VGG16"]


@dataclass(frozen=True)
class LayerEntry:
    """One parametrised layer of an architecture.

    Attributes
    ----------
    flax : str
        Flax module path (``"stage0_block1/conv2"``).
    torch : str
        The reference (torch) module name (``"layers.0"``).
    kind : {"dense", "conv", "norm"}
    layer : int
        Layer index (forward order) of its parameters.
    p_in, p_out : str or None
        Permutations of the input and output units (``p_in`` is unused for norms).
    bias : bool
        Whether the layer has a bias.
    """

    flax: str
    torch: str
    kind: str
    layer: int
    p_in: str | None
    p_out: str | None
    bias: bool = True

    def leaves(self) -> list[tuple[str, str]]:
        """``(flax leaf, torch leaf)`` pairs of the layer's parameters."""
        first = ("scale", "weight") if self.kind == "norm" else ("kernel", "weight")
        return [first, ("bias", "bias")] if self.bias else [first]


def _to_torch_axes(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and kind == "dense":
        return np.ascontiguousarray(value.T)  # (in, out) -> (out, in)
    if leaf == "kernel" and kind == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
    return np.array(value, copy=True)


def _from_torch_axes(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and kind == "dense":
        return np.ascontiguousarray(value.T)
    if leaf == "kernel" and kind == "conv":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.array(value, copy=True)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise IncompatibleModelsError(
            f"{name} takes images: input_shape must be channels-first (c, h, w) with positive sizes, "
            f"got {tuple(input_shape)!r}"
        )
    return shape


def _nhwc(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*input_shape[1:], input_shape[0]) if len(input_shape) == 3 else tuple(input_shape)


class FlaxArchitecture:
    """Base of the flax implementations: subclasses give :meth:`module` and :meth:`table`.

    Parameters are named by their flax path joined with ``"/"``; the order of
    :meth:`combinability_jax.backend.JaxBackend.state` is the order in which
    ``Module.init`` creates them (forward call order).
    """

    #: Registry name of the architecture.
    name: str = ""

    # -- to be given by subclasses ---------------------------------------------------
    def module(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        """The flax module of this configuration."""
        raise NotImplementedError

    def table(self) -> tuple[LayerEntry, ...]:
        """Every parametrised layer, in forward order."""
        raise NotImplementedError

    def layer_names(self, *, width: float = 1, num_classes: int = 10,
                    input_shape: tuple[int, ...] = ()) -> list[str]:
        """Human-readable name of each layer index."""
        raise NotImplementedError

    def activation_points(self, *, width: float = 1, num_classes: int = 10,
                          input_shape: tuple[int, ...] = ()) -> dict[str, str]:
        """For each permutation, the sown intermediate (flax path) its units produce."""
        raise NotImplementedError

    # -- ArchitectureImpl --------------------------------------------------------------
    def build(self, *, width: float, num_classes: int, input_shape: tuple[int, ...], seed: int) -> FlaxModel:
        """A freshly initialised :class:`FlaxModel` (see :func:`~combinability_jax.models.init_variables`).

        Its parameter order (that of the backend's ``state``) is the forward order of
        :meth:`layers`: layer by layer, ``kernel`` before ``bias``, ``scale`` before ``bias``.
        """
        input_shape = tuple(int(s) for s in input_shape)
        if int(num_classes) < 1 or not input_shape or min(input_shape) < 1:
            raise IncompatibleModelsError(f"{self.name}: need num_classes >= 1 and a non-empty input_shape of "
                                          f"positive sizes, got {num_classes!r} and {input_shape!r}")
        module = self.module(width=width, num_classes=num_classes, input_shape=input_shape)
        variables = init_variables(module, (1, *_nhwc(input_shape)), seed)
        config = {"architecture": self.name, "width": width, "num_classes": int(num_classes),
                  "input_shape": list(input_shape)}
        order = self.layers(width=width, num_classes=num_classes, input_shape=input_shape)
        return FlaxModel.create(module, variables, config, order)

    def spec(self, *, width: float = 1, num_classes: int = 10,
             input_shape: tuple[int, ...] = ()) -> PermutationSpec:
        """The permutation spec in flax names and axes (it does not depend on the configuration)."""
        b = SpecBuilder("flax")
        for e in self.table():
            if e.kind == "dense":
                b.dense(e.flax, e.p_in, e.p_out, bias=e.bias)
            elif e.kind == "conv":
                b.conv(e.flax, e.p_in, e.p_out, bias=e.bias)
            else:
                b.norm(e.flax, e.p_out, bias=e.bias)
        return b.build()

    def layers(self, *, width: float = 1, num_classes: int = 10,
               input_shape: tuple[int, ...] = ()) -> dict[str, int]:
        """Layer index of every parameter name."""
        return {f"{e.flax}/{leaf}": e.layer for e in self.table() for leaf, _ in e.leaves()}

    def to_reference(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Flax names and axes to the torch implementation's (``"layers_0/kernel"`` -> ``"layers.0.weight"``)."""
        pairs = [(e, f, t) for e in self.table() for f, t in e.leaves()]
        self._check_names(params, [f"{e.flax}/{f}" for e, f, _ in pairs], "flax")
        return {f"{e.torch}.{t}": _to_torch_axes(e.kind, f, np.asarray(params[f"{e.flax}/{f}"]))
                for e, f, t in pairs}

    def from_reference(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Inverse of :meth:`to_reference`."""
        pairs = [(e, f, t) for e in self.table() for f, t in e.leaves()]
        self._check_names(params, [f"{e.torch}.{t}" for e, _, t in pairs], "reference (torch)")
        return {f"{e.flax}/{f}": _from_torch_axes(e.kind, f, np.asarray(params[f"{e.torch}.{t}"]))
                for e, f, t in pairs}

    def _check_names(self, params: Mapping[str, Any], expected: list[str], what: str) -> None:
        missing = [n for n in expected if n not in params]
        extra = [n for n in params if n not in set(expected)]
        if missing or extra:
            raise IncompatibleModelsError(
                f"{self.name}: the parameters do not have the {what} names of this architecture: "
                f"missing {missing[:8]}, unexpected {extra[:8]}; expected {expected[:6]}..."
            )

    def __repr__(self) -> str:
        return f"<flax architecture {self.name!r}>"


class MLPArchitecture(FlaxArchitecture):
    """Flatten, 3 hidden layers of ``512 * width`` ReLU units, dense head; permutations P0..P2."""

    name = "mlp"
    depth = 4

    def module(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return MLPModule(hidden=(channels(MLP_HIDDEN, width),) * (self.depth - 1), num_classes=int(num_classes))

    def table(self) -> tuple[LayerEntry, ...]:
        last = self.depth - 1
        return tuple(
            LayerEntry(f"layers_{i}", f"layers.{i}", "dense", i,
                       f"P{i - 1}" if i > 0 else None, f"P{i}" if i < last else None)
            for i in range(self.depth)
        )

    def layer_names(self, **config: Any) -> list[str]:
        return [f"hidden_{i}" for i in range(self.depth - 1)] + ["head"]

    def activation_points(self, **config: Any) -> dict[str, str]:
        return {f"P{i}": f"hidden_{i}" for i in range(self.depth - 1)}


def _conv_chain_table(n: int) -> tuple[LayerEntry, ...]:
    """``n`` Conv-LN layers (permutation ``P{i}`` each, layer ``i``) then a dense head (layer ``n``)."""
    out: list[LayerEntry] = []
    for i in range(n):
        p_in = f"P{i - 1}" if i > 0 else None
        out.append(LayerEntry(f"conv_{i}", f"conv_{i}", "conv", i, p_in, f"P{i}"))
        out.append(LayerEntry(f"norm_{i}", f"norm_{i}", "norm", i, None, f"P{i}"))
    out.append(LayerEntry("head", "head", "dense", n, f"P{n - 1}", None))
    return tuple(out)


def _conv_chain_names(n: int) -> list[str]:
    return [f"conv_{i}" for i in range(n)] + ["head"]


class Tiny10Architecture(FlaxArchitecture):
    """Tiny-10: 8 ``Conv-LN-ReLU`` layers (strides 2 at the 3rd and 6th), pooling, head; P0..P7."""

    name = "tiny10"

    def module(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        _image_shape(self.name, input_shape)
        return Tiny10Module(features=tuple(channels(c, width) for c in TINY10_CHANNELS),
                            strides=TINY10_STRIDES, num_classes=int(num_classes))

    def table(self) -> tuple[LayerEntry, ...]:
        return _conv_chain_table(len(TINY10_CHANNELS))

    def layer_names(self, **config: Any) -> list[str]:
        return _conv_chain_names(len(TINY10_CHANNELS))

    def activation_points(self, **config: Any) -> dict[str, str]:
        return {f"P{i}": f"act_{i}" for i in range(len(TINY10_CHANNELS))}


class ResNet20Architecture(FlaxArchitecture):
    """ResNet-20 with LayerNorm; one permutation per residual stage and one per block's inner channels."""

    name = "resnet20"
    stages = RESNET20_STAGES
    blocks = 3

    def module(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        _image_shape(self.name, input_shape)
        return ResNet20Module(stages=tuple(channels(c, width) for c in self.stages), num_classes=int(num_classes),
                              blocks_per_stage=self.blocks)

    def table(self) -> tuple[LayerEntry, ...]:
        out = [LayerEntry("stem_conv", "stem_conv", "conv", 0, None, "P_stage0", bias=False),
               LayerEntry("stem_norm", "stem_norm", "norm", 0, None, "P_stage0")]
        for s in range(len(self.stages)):
            for b in range(self.blocks):
                layer = 1 + s * self.blocks + b
                flax = torch = f"stage{s}_block{b}"
                p_in = f"P_stage{s - 1}" if s > 0 and b == 0 else f"P_stage{s}"
                p_mid, p_out = f"P_s{s}_b{b}_inner", f"P_stage{s}"
                out += [
                    LayerEntry(f"{flax}/conv1", f"{torch}.conv1", "conv", layer, p_in, p_mid, bias=False),
                    LayerEntry(f"{flax}/norm1", f"{torch}.norm1", "norm", layer, None, p_mid),
                    LayerEntry(f"{flax}/conv2", f"{torch}.conv2", "conv", layer, p_mid, p_out, bias=False),
                    LayerEntry(f"{flax}/norm2", f"{torch}.norm2", "norm", layer, None, p_out),
                ]
                if s > 0 and b == 0:
                    out += [
                        LayerEntry(f"{flax}/shortcut_conv", f"{torch}.shortcut_conv", "conv", layer, p_in, p_out,
                                   bias=False),
                        LayerEntry(f"{flax}/shortcut_norm", f"{torch}.shortcut_norm", "norm", layer, None, p_out),
                    ]
        out.append(LayerEntry("head", "head", "dense", 1 + len(self.stages) * self.blocks,
                              f"P_stage{len(self.stages) - 1}", None))
        return tuple(out)

    def layer_names(self, **config: Any) -> list[str]:
        blocks = [f"stage{s}_block{b}" for s in range(len(self.stages)) for b in range(self.blocks)]
        return ["stem", *blocks, "head"]

    def activation_points(self, **config: Any) -> dict[str, str]:
        """Stage permutations: the output of the stage's last block; inner ones: the block's first ReLU."""
        points = {}
        for s in range(len(self.stages)):
            points[f"P_stage{s}"] = f"stage{s}_block{self.blocks - 1}/out"
            for b in range(self.blocks):
                points[f"P_s{s}_b{b}_inner"] = f"stage{s}_block{b}/inner"
        return points


class VGG16Architecture(FlaxArchitecture):
    """VGG-16 with LayerNorm: 13 ``Conv-LN-ReLU`` layers, pooling, head; P0..P12."""

    name = "vgg16"

    @property
    def n_convs(self) -> int:
        return sum(1 for c in VGG16_CONFIG if c != "M")

    def module(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        _image_shape(self.name, input_shape)
        config = tuple(c if c == "M" else channels(int(c), width) for c in VGG16_CONFIG)
        return VGG16Module(config=config, num_classes=int(num_classes))

    def table(self) -> tuple[LayerEntry, ...]:
        return _conv_chain_table(self.n_convs)

    def layer_names(self, **config: Any) -> list[str]:
        return _conv_chain_names(self.n_convs)

    def activation_points(self, **config: Any) -> dict[str, str]:
        return {f"P{i}": f"act_{i}" for i in range(self.n_convs)}


MLP = MLPArchitecture()
Tiny10 = Tiny10Architecture()
ResNet20 = ResNet20Architecture()
VGG16 = VGG16Architecture()
