"""The reference architectures of the paper, registered as a plugin.

Each is an :class:`~combinability.architecture.Architecture` naming its torch and
jax implementations by ``"module:attribute"``; nothing here imports a framework.
This module is itself found through the ``combinability.plugins`` entry point, the
same door a third-party architecture uses.
"""

from __future__ import annotations

from combinability.architecture import Architecture
from combinability.hookspecs import hookimpl

__all__ = [
    "REFERENCE_ARCHITECTURES",
    "MLP_HIDDEN",
    "TINY10_CHANNELS",
    "TINY10_STRIDES",
    "VGG16_CONFIG",
    "RESNET20_STAGES",
    "RESNET20_BLOCKS",
    "channels",
]

# Shape constants shared by every backend's implementation (before the width multiplier).
#: MLP hidden units per layer (3 hidden layers).
MLP_HIDDEN = 512
#: Tiny-10 conv channels and strides (paper table A.1; strides as in Kornblith et al., 2019).
TINY10_CHANNELS = (16, 16, 32, 32, 32, 64, 64, 64)
TINY10_STRIDES = (1, 1, 2, 1, 1, 2, 1, 1)
#: VGG-16 conv channels; ``"M"`` is a 2x2 max pool, skipped once the image is smaller than 2x2.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
#: ResNet-20 stage widths and blocks per stage.
RESNET20_STAGES = (16, 32, 64)
RESNET20_BLOCKS = 3


def channels(base: int, width: float) -> int:
    """``max(1, round(base * width))``: the width-scaled number of units."""
    return max(1, int(round(base * width)))



def _impls(cls: str) -> dict[str, str]:
    return {
        "torch": f"combinability_torch.architectures:{cls}",
        "jax": f"combinability_jax.architectures:{cls}",
    }


REFERENCE_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "mlp",
        _impls("MLP"),
        description="multi-layer perceptron, 3 hidden layers of 512 x width, ReLU",
        paper="Git Re-Basin (Ainsworth et al., 2023), MNIST experiments",
    ),
    Architecture(
        "tiny10",
        _impls("Tiny10"),
        description="Tiny-10: 8 conv layers (16-16-32-32-32-64-64-64 x width) with LayerNorm",
        paper="paper table A.1 (Kornblith et al., 2019)",
    ),
    Architecture(
        "resnet20",
        _impls("ResNet20"),
        description="ResNet-20 (3 stages x 3 basic blocks, 16-32-64 x width) with LayerNorm",
        paper="He et al. (2016); LayerNorm as in the paper and Git Re-Basin",
    ),
    Architecture(
        "vgg16",
        _impls("VGG16"),
        description="VGG-16 (13 conv layers, 64..512 x width) with LayerNorm",
        paper="Simonyan & Zisserman (2015); LayerNorm as in Git Re-Basin",
    ),
)


@hookimpl
def combinability_register_architectures() -> tuple[Architecture, ...]:
    return REFERENCE_ARCHITECTURES
