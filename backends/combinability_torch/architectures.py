"""PyTorch implementations of the reference architectures (:mod:`combinability.zoo`).

Each of :data:`MLP`, :data:`Tiny10`, :data:`ResNet20` and :data:`VGG16` is an
:class:`~combinability.architecture.ArchitectureImpl`: it builds the module, and
describes its permutation spec, its ordered layers and the activation point of every
permutation, for the configuration (``width``, ``num_classes``, ``input_shape``) given.
Torch names and axes *are* the reference convention, so :meth:`to_reference` and
:meth:`from_reference` copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from combinability.errors import ConfigurationError
from combinability.permutation import PermutationSpec
from combinability.specs import SpecBuilder
from combinability.zoo import MLP_HIDDEN, RESNET20_STAGES
from combinability_torch import models

__all__ = ["TorchArchitecture", "MLP", "Tiny10", "ResNet20", "VGG16"]


def _check_image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigurationError(
            f"{name} takes images: input_shape must be channels-first (c, h, w) with positive sizes, "
            f"got {tuple(input_shape)!r}"
        )
    return shape  # type: ignore[return-value]


class TorchArchitecture:
    """Shared machinery of the torch reference architectures.

    Subclasses implement :meth:`module` (construct the network with torch's default
    initialisation), :meth:`spec`, :meth:`layer_names`, :meth:`activation_points` and
    :meth:`layer_of` (layer index of one state name).
    """

    name = ""

    def module(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        raise NotImplementedError

    def layer_of(self, param: str, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    # -- ArchitectureImpl ----------------------------------------------------------
    def build(self, *, width: float, num_classes: int, input_shape: tuple[int, ...], seed: int) -> nn.Module:
        """A freshly initialised module on the CPU, seeded without touching torch's global RNG."""
        if int(num_classes) < 1:
            raise ConfigurationError(f"num_classes must be >= 1, got {num_classes!r}")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            return self.module(width=width, num_classes=int(num_classes), input_shape=tuple(input_shape))

    def state_names(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> list[str]:
        """The module's ``state_dict`` keys, in order (built on the meta device: no memory, no RNG)."""
        with torch.device("meta"):
            net = self.module(width=width, num_classes=int(num_classes), input_shape=tuple(input_shape))
        return list(net.state_dict())

    def layers(self, *, width: float, num_classes: int, input_shape: tuple[int, ...]) -> dict[str, int]:
        cfg = {"width": width, "num_classes": num_classes, "input_shape": tuple(input_shape)}
        return {n: self.layer_of(n, **cfg) for n in self.state_names(**cfg)}

    def to_reference(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v).copy() for k, v in params.items()}

    def from_reference(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v).copy() for k, v in params.items()}

    def __repr__(self) -> str:
        return f"<torch implementation of {self.name!r}>"


def _prefix_index(param: str, pattern: str) -> int | None:
    m = re.match(pattern, param)
    return int(m.group(1)) if m else None


# -- MLP ---------------------------------------------------------------------------------
class MLPImpl(TorchArchitecture):
    """Flatten, 3 hidden ``Dense(512 x width) -> ReLU``, a dense head. Permutations ``P0..P2``."""

    name = "mlp"
    base = MLP_HIDDEN
    depth = 3

    def module(self, *, width, num_classes, input_shape):
        hidden = [models.channels(self.base, width)] * self.depth
        return models.MLPNet(int(np.prod(input_shape)), hidden, num_classes)

    def spec(self, *, width, num_classes, input_shape) -> PermutationSpec:
        b = SpecBuilder("torch")
        for i in range(self.depth + 1):
            b.dense(f"layers.{i}", f"P{i - 1}" if i > 0 else None, f"P{i}" if i < self.depth else None)
        return b.build()

    def layer_of(self, param, **cfg) -> int:
        i = _prefix_index(param, r"layers\.(\d+)\.")
        if i is None:
            raise KeyError(param)
        return i

    def layer_names(self, *, width, num_classes, input_shape) -> list[str]:
        return [f"hidden_{i}" for i in range(self.depth)] + ["head"]

    def activation_points(self, *, width, num_classes, input_shape) -> dict[str, str]:
        return {f"P{i}": f"hidden_{i}" for i in range(self.depth)}


# -- plain conv nets (Tiny-10, VGG-16) ------------------------------------------------------------
class _PlainConvImpl(TorchArchitecture):
    num_convs = 0

    def spec(self, *, width, num_classes, input_shape) -> PermutationSpec:
        b = SpecBuilder("torch")
        for i in range(self.num_convs):
            b.conv(f"conv_{i}", f"P{i - 1}" if i else None, f"P{i}").norm(f"norm_{i}", f"P{i}")
        return b.dense("head", f"P{self.num_convs - 1}", None).build()

    def layer_of(self, param, **cfg) -> int:
        if param.startswith("head."):
            return self.num_convs
        i = _prefix_index(param, r"(?:conv|norm)_(\d+)\.")
        if i is None:
            raise KeyError(param)
        return i

    def layer_names(self, *, width, num_classes, input_shape) -> list[str]:
        return [f"conv_{i}" for i in range(self.num_convs)] + ["head"]

    def activation_points(self, *, width, num_classes, input_shape) -> dict[str, str]:
        return {f"P{i}": f"act_{i}" for i in range(self.num_convs)}


class Tiny10Impl(_PlainConvImpl):
    """Tiny-10: 8 ``Conv -> LayerNorm -> ReLU`` layers, pooling, head. Permutations ``P0..P7``."""

    name = "tiny10"
    num_convs = len(models.TINY10_CHANNELS)

    def module(self, *, width, num_classes, input_shape):
        c, _, _ = _check_image_shape(self.name, input_shape)
        feats = [models.channels(f, width) for f in models.TINY10_CHANNELS]
        return models.Tiny10Net(c, feats, models.TINY10_STRIDES, num_classes)


class VGG16Impl(_PlainConvImpl):
    """VGG-16: 13 ``Conv -> LayerNorm -> ReLU`` layers with max pools, pooling, head. ``P0..P12``."""

    name = "vgg16"
    num_convs = sum(1 for c in models.VGG16_CONFIG if c != "M")

    def module(self, *, width, num_classes, input_shape):
        c, _, _ = _check_image_shape(self.name, input_shape)
        config = [c_ if c_ == "M" else models.channels(int(c_), width) for c_ in models.VGG16_CONFIG]
        return models.VGG16Net(c, config, num_classes)


# -- ResNet-20 --------------------------------------------------------------------------------------
class ResNet20Impl(TorchArchitecture):
    """ResNet-20 with LayerNorm. One permutation per residual stream stage (``P_stage{s}``) and
    one per block's inner channels (``P_s{s}_b{b}_inner``)."""

    name = "resnet20"
    stages = RESNET20_STAGES
    blocks = models.RESNET20_BLOCKS

    def module(self, *, width, num_classes, input_shape):
        c, _, _ = _check_image_shape(self.name, input_shape)
        return models.ResNet20Net(c, [models.channels(s, width) for s in self.stages], num_classes, self.blocks)

    def spec(self, *, width, num_classes, input_shape) -> PermutationSpec:
        b = SpecBuilder("torch")
        b.conv("stem_conv", None, "P_stage0", bias=False).norm("stem_norm", "P_stage0")
        stream = "P_stage0"
        for s in range(len(self.stages)):
            for k in range(self.blocks):
                blk = f"stage{s}_block{k}"
                projection = s > 0 and k == 0  # stride 2: the block starts a new residual stream
                b.basic_block(
                    conv1=f"{blk}.conv1", norm1=f"{blk}.norm1", conv2=f"{blk}.conv2", norm2=f"{blk}.norm2",
                    p_in=stream, p_inner=f"P_s{s}_b{k}_inner", p_out=f"P_stage{s}",
                    shortcut_conv=f"{blk}.shortcut_conv" if projection else None,
                    shortcut_norm=f"{blk}.shortcut_norm" if projection else None,
                )
                stream = f"P_stage{s}"
        return b.dense("head", stream, None).build()

    def layer_of(self, param, **cfg) -> int:
        if param.startswith(("stem_conv.", "stem_norm.")):
            return 0
        if param.startswith("head."):
            return 1 + len(self.stages) * self.blocks
        m = re.match(r"stage(\d+)_block(\d+)\.", param)
        if m is None:
            raise KeyError(param)
        return 1 + int(m.group(1)) * self.blocks + int(m.group(2))

    def layer_names(self, *, width, num_classes, input_shape) -> list[str]:
        blocks = [f"stage{s}_block{k}" for s in range(len(self.stages)) for k in range(self.blocks)]
        return ["stem", *blocks, "head"]

    def activation_points(self, *, width, num_classes, input_shape) -> dict[str, str]:
        """Inner ReLU of every block; for a residual stream, the output of the stage's last block."""
        points = {}
        for s in range(len(self.stages)):
            points[f"P_stage{s}"] = f"stage{s}_block{self.blocks - 1}.out"
            for k in range(self.blocks):
                points[f"P_s{s}_b{k}_inner"] = f"stage{s}_block{k}.inner"
        return points


#: The reference architectures, as registered by :mod:`combinability.zoo`.
MLP = MLPImpl()
Tiny10 = Tiny10Impl()
ResNet20 = ResNet20Impl()
VGG16 = VGG16Impl()
