"""PyTorch modules of the reference architectures.

Numerically the same networks as the Flax implementations (``combinability_jax.models``):
LayerNorm over the channel axis at every spatial position (:class:`ChannelLayerNorm`),
ReLU, global average pooling and a dense head. Inputs are channels-first.

Parameter names mirror the Flax ones with ``/`` replaced by ``.`` (``conv_0.weight`` is
Flax's ``conv_0/kernel``), so that converting between the two is a renaming plus a
transpose. Every hidden activation whose units a permutation reorders is the output of
a dedicated :class:`torch.nn.ReLU` module (``hidden_0``, ``act_3``,
``stage1_block0.inner``, ...), so a forward hook on that module reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from combinability.zoo import RESNET20_BLOCKS, TINY10_CHANNELS, TINY10_STRIDES, VGG16_CONFIG, channels

__all__ = [
    "channels",
    "ChannelLayerNorm",
    "MLPNet",
    "Tiny10Net",
    "BasicBlock",
    "ResNet20Net",
    "VGG16Net",
    "TINY10_CHANNELS",
    "TINY10_STRIDES",
    "VGG16_CONFIG",
]




class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every position of an NCHW tensor (eps 1e-5).

    Parameters ``weight`` and ``bias`` have one entry per channel.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.num_channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def _gap(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class MLPNet(nn.Module):
    """Flatten, ``Dense -> ReLU`` hidden layers, a dense head: ``layers.0`` .. ``layers.{n}``.

    The hidden activations are the outputs of the ReLU modules ``hidden_0``, ``hidden_1``, ...
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        for i in range(len(hidden)):
            self.add_module(f"hidden_{i}", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = getattr(self, f"hidden_{i}")(x)
        return x


class Tiny10Net(nn.Module):
    """``conv_i -> norm_i -> act_i`` (ReLU) for every layer, global average pooling, ``head``.

    The last convolution is 1x1 without padding, the others 3x3 with padding 1.
    """

    def __init__(self, in_channels: int, features: Sequence[int], strides: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.num_convs = len(features)
        c_in = in_channels
        for i, (c, s) in enumerate(zip(features, strides, strict=True)):
            k, pad = (1, 0) if i == self.num_convs - 1 else (3, 1)
            self.add_module(f"conv_{i}", nn.Conv2d(c_in, c, k, stride=s, padding=pad))
            self.add_module(f"norm_{i}", ChannelLayerNorm(c))
            self.add_module(f"act_{i}", nn.ReLU())
            c_in = c
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_convs):
            x = getattr(self, f"act_{i}")(getattr(self, f"norm_{i}")(getattr(self, f"conv_{i}")(x)))
        return self.head(_gap(x))


class BasicBlock(nn.Module):
    """``out(norm2(conv2(inner(norm1(conv1 x)))) + shortcut(x))``, convolutions without bias.

    The shortcut is the identity, or ``shortcut_norm(shortcut_conv(x))`` (1x1, strided)
    when the stride or the number of channels changes. ``inner`` and ``out`` are ReLUs.
    """

    def __init__(self, c_in: int, inner: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride=stride, padding=1, bias=False)
        self.norm1 = ChannelLayerNorm(inner)
        self.inner = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, out, 3, stride=1, padding=1, bias=False)
        self.norm2 = ChannelLayerNorm(out)
        self.projection = stride != 1 or c_in != out
        if self.projection:
            self.shortcut_conv = nn.Conv2d(c_in, out, 1, stride=stride, padding=0, bias=False)
            self.shortcut_norm = ChannelLayerNorm(out)
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv2(self.inner(self.norm1(self.conv1(x)))))
        short = self.shortcut_norm(self.shortcut_conv(x)) if self.projection else x
        return self.out(h + short)


class ResNet20Net(nn.Module):
    """CIFAR ResNet-20 with LayerNorm: ``stem_conv -> stem_norm -> stem`` (ReLU), blocks
    ``stage{s}_block{b}`` (0-based), global average pooling, ``head``."""

    def __init__(self, in_channels: int, stages: Sequence[int], num_classes: int,
                 blocks_per_stage: int = RESNET20_BLOCKS) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, stages[0], 3, stride=1, padding=1, bias=False)
        self.stem_norm = ChannelLayerNorm(stages[0])
        self.stem = nn.ReLU()
        self.block_names: list[str] = []
        c_in = stages[0]
        for s, c in enumerate(stages):
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                name = f"stage{s}_block{b}"
                self.add_module(name, BasicBlock(c_in, c, c, stride))
                self.block_names.append(name)
                c_in = c
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.stem_norm(self.stem_conv(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.head(_gap(x))


class VGG16Net(nn.Module):
    """VGG-16 with LayerNorm: 13 ``conv_i -> norm_i -> act_i`` layers with 2x2 max pools
    (applied only while the image is at least 2x2), global average pooling, ``head``."""

    def __init__(self, in_channels: int, config: Sequence[int | str], num_classes: int) -> None:
        super().__init__()
        self.plan: list[int | str] = []  # conv index or "M"
        c_in, i = in_channels, 0
        for c in config:
            if c == "M":
                self.plan.append("M")
                continue
            self.add_module(f"conv_{i}", nn.Conv2d(c_in, int(c), 3, stride=1, padding=1))
            self.add_module(f"norm_{i}", ChannelLayerNorm(int(c)))
            self.add_module(f"act_{i}", nn.ReLU())
            self.plan.append(i)
            c_in, i = int(c), i + 1
        self.num_convs = i
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.plan:
            if step == "M":
                if min(x.shape[-2], x.shape[-1]) >= 2:
                    x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, f"act_{step}")(getattr(self, f"norm_{step}")(getattr(self, f"conv_{step}")(x)))
        return self.head(_gap(x))
