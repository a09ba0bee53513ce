"""The reference architectures of the paper, one layer table each, registered as a plugin.

Nothing here imports a framework: every backend builds these networks from their
:class:`~combinability.layers.LayerTable`. This module is found through the
``combinability.plugins`` entry point, the same door a third-party architecture uses.
"""

from __future__ import annotations

from combinability.architecture import Architecture
from combinability.errors import ConfigurationError
from combinability.hookspecs import hookimpl
from combinability.layers import LayerTable, Node

__all__ = [
    "REFERENCE_ARCHITECTURES",
    "MLP_HIDDEN",
    "MLP_DEPTH",
    "TINY10_CHANNELS",
    "TINY10_STRIDES",
    "VGG16_CONFIG",
    "RESNET20_STAGES",
    "RESNET20_BLOCKS",
    "channels",
    "mlp_table",
    "tiny10_table",
    "resnet20_table",
    "vgg16_table",
    "VGG11_CONFIG",
    "resnet20_bn_table",
    "vgg11_bn_table",
]

#: MLP hidden units per layer, and hidden layers.
MLP_HIDDEN = 512
MLP_DEPTH = 3
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


def _image(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigurationError(f"{name} takes images: input_shape must be channels-first (c, h, w) with "
                                 f"positive sizes, got {tuple(input_shape)!r}")
    return input_shape


def _conv_unit(name: str, act: str, units: int, *, kernel: int = 3, stride: int = 1, bias: bool = True,
               norm: str = "layernorm", norm_name: str | None = None, inputs: tuple[str, ...] = (),
               layer: str = "") -> list[Node]:
    """``conv -> norm -> relu``, the building block of the plain conv nets."""
    return [Node(name, "conv", inputs, units=units, kernel=kernel, stride=stride, padding=kernel // 2, bias=bias,
                 layer=layer),
            Node(norm_name or name.replace("conv", "norm"), "norm", norm=norm),
            Node(act, "relu")]


def mlp_table(*, width: float = 1, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> LayerTable:
    """Flatten, 3 hidden ``layers.i (512 x width) -> hidden_i (ReLU)``, a dense head ``layers.3``."""
    nodes = [Node("flatten", "flatten")]
    for i in range(MLP_DEPTH):
        nodes += [Node(f"layers.{i}", "dense", units=channels(MLP_HIDDEN, width)), Node(f"hidden_{i}", "relu")]
    nodes.append(Node(f"layers.{MLP_DEPTH}", "dense", units=num_classes))
    return LayerTable("mlp", input_shape, num_classes, tuple(nodes))


def _plain_convnet(name: str, plan: list, input_shape: tuple[int, ...], num_classes: int, width: float,
                   norm: str = "layernorm", last_kernel: int | None = None) -> LayerTable:
    """``conv_i -> norm_i -> act_i`` per entry of ``plan`` (``(channels, stride)`` or ``"M"``), pool, head."""
    nodes: list[Node] = []
    convs = [p for p in plan if p != "M"]
    i = 0
    for p in plan:
        if p == "M":
            nodes.append(Node(f"pool_{len(nodes)}", "maxpool", kernel=2, stride=2))
            continue
        c, stride = p
        kernel = last_kernel if (last_kernel is not None and i == len(convs) - 1) else 3
        nodes += _conv_unit(f"conv_{i}", f"act_{i}", channels(c, width), kernel=kernel, stride=stride, norm=norm)
        i += 1
    nodes += [Node("pool", "avgpool"), Node("head", "dense", units=num_classes)]
    return LayerTable(name, _image(name, input_shape), num_classes, tuple(nodes))


def tiny10_table(*, width: float = 1, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> LayerTable:
    """Tiny-10: 8 ``conv -> LayerNorm -> ReLU`` layers (the last 1x1), average pooling, head."""
    plan = list(zip(TINY10_CHANNELS, TINY10_STRIDES, strict=True))
    return _plain_convnet("tiny10", plan, input_shape, num_classes, width, last_kernel=1)


def vgg16_table(*, width: float = 1, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> LayerTable:
    """VGG-16: 13 ``conv -> LayerNorm -> ReLU`` layers with 2x2 max pools, average pooling, head."""
    plan = ["M" if c == "M" else (c, 1) for c in VGG16_CONFIG]
    return _plain_convnet("vgg16", plan, input_shape, num_classes, width)


def basic_block(name: str, c_in: int, c_out: int, stride: int, *, norm: str = "layernorm",
                input_node: str) -> list[Node]:
    """A residual basic block ``out(norm2(conv2(inner(norm1(conv1 x)))) + shortcut(x))``.

    The shortcut is the identity, or ``shortcut_norm(shortcut_conv(x))`` (1x1, strided)
    when the stride or the number of channels changes. Convolutions have no bias.
    """
    nodes = [
        Node(f"{name}.conv1", "conv", (input_node,), units=c_out, kernel=3, stride=stride, padding=1, bias=False,
             layer=name),
        Node(f"{name}.norm1", "norm", norm=norm),
        Node(f"{name}.inner", "relu"),
        Node(f"{name}.conv2", "conv", units=c_out, kernel=3, stride=1, padding=1, bias=False, layer=name),
        Node(f"{name}.norm2", "norm", norm=norm),
    ]
    short = input_node
    if stride != 1 or c_in != c_out:
        nodes += [Node(f"{name}.shortcut_conv", "conv", (input_node,), units=c_out, kernel=1, stride=stride,
                       bias=False, layer=name),
                  Node(f"{name}.shortcut_norm", "norm", norm=norm)]
        short = f"{name}.shortcut_norm"
    nodes += [Node(f"{name}.add", "add", (f"{name}.norm2", short)), Node(f"{name}.out", "relu")]
    return nodes


def resnet20_table(*, width: float = 1, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
                   norm: str = "layernorm", name: str = "resnet20") -> LayerTable:
    """CIFAR ResNet-20: ``stem_conv -> stem_norm -> stem``, 3 stages x 3 basic blocks, pooling, head."""
    nodes = [Node("stem_conv", "conv", units=channels(RESNET20_STAGES[0], width), kernel=3, padding=1, bias=False,
                  layer="stem"),
             Node("stem_norm", "norm", norm=norm), Node("stem", "relu")]
    c_in, last = channels(RESNET20_STAGES[0], width), "stem"
    for s, base in enumerate(RESNET20_STAGES):
        c = channels(base, width)
        for b in range(RESNET20_BLOCKS):
            block = f"stage{s}_block{b}"
            nodes += basic_block(block, c_in, c, 2 if s > 0 and b == 0 else 1, norm=norm, input_node=last)
            c_in, last = c, f"{block}.out"
    nodes += [Node("pool", "avgpool"), Node("head", "dense", units=num_classes)]
    return LayerTable(name, _image(name, input_shape), num_classes, tuple(nodes))


REFERENCE_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("mlp", "combinability.zoo:mlp_table",
                 description="multi-layer perceptron, 3 hidden layers of 512 x width, ReLU",
                 paper="Git Re-Basin (Ainsworth et al., 2023), MNIST experiments"),
    Architecture("tiny10", "combinability.zoo:tiny10_table",
                 description="Tiny-10: 8 conv layers (16-16-32-32-32-64-64-64 x width) with LayerNorm",
                 paper="paper table A.1 (Kornblith et al., 2019)"),
    Architecture("resnet20", "combinability.zoo:resnet20_table",
                 description="ResNet-20 (3 stages x 3 basic blocks, 16-32-64 x width) with LayerNorm",
                 paper="He et al. (2016); LayerNorm as in the paper and Git Re-Basin"),
    Architecture("vgg16", "combinability.zoo:vgg16_table",
                 description="VGG-16 (13 conv layers, 64..512 x width) with LayerNorm",
                 paper="Simonyan & Zisserman (2015); LayerNorm as in Git Re-Basin"),
    Architecture("resnet20_bn", "combinability.zoo:resnet20_bn_table",
                 description="ResNet-20 (3 stages x 3 basic blocks, 16-32-64 x width) with BatchNorm",
                 paper="He et al. (2016); BatchNorm as in REPAIR (Jordan et al., 2023)"),
    Architecture("vgg11_bn", "combinability.zoo:vgg11_bn_table",
                 description="VGG-11 (8 conv layers, 64..512 x width) with BatchNorm, CIFAR-style head",
                 paper="Simonyan & Zisserman (2015); BatchNorm as in REPAIR (Jordan et al., 2023)"),
)


@hookimpl
def combinability_register_architectures() -> tuple[Architecture, ...]:
    return REFERENCE_ARCHITECTURES


#: VGG-11 conv channels (configuration "A" of Simonyan & Zisserman); ``"M"`` is a 2x2 max pool.
VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def resnet20_bn_table(*, width: float = 1, num_classes: int = 10,
                      input_shape: tuple[int, ...] = (3, 32, 32)) -> LayerTable:
    """CIFAR ResNet-20 with BatchNorm (the usual one): :func:`resnet20_table` with ``norm="batchnorm"``."""
    return resnet20_table(width=width, num_classes=num_classes, input_shape=input_shape, norm="batchnorm",
                          name="resnet20_bn")


def _vgg_plan(config: tuple) -> list:
    """A VGG configuration as a :func:`_plain_convnet` plan: ``(channels, stride 1)`` or ``"M"``."""
    return ["M" if c == "M" else (c, 1) for c in config]


def vgg11_bn_table(*, width: float = 1, num_classes: int = 10,
                   input_shape: tuple[int, ...] = (3, 32, 32)) -> LayerTable:
    """CIFAR-style VGG-11: 8 ``conv 3x3 -> BatchNorm -> ReLU`` layers with 2x2 max pools, average pooling, head."""
    return _plain_convnet("vgg11_bn", _vgg_plan(VGG11_CONFIG), input_shape, num_classes, width, norm="batchnorm")
