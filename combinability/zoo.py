"""The reference architectures of the paper, one layer table each, registered as a plugin.

Nothing here imports a framework: every backend builds these networks from their
:class:`~combinability.layers.LayerTable`.

The MLP and Tiny-10 also come with fewer symmetries (Lim et al., 2024, "The empirical
impact of neural parameter symmetries"), as the architectures ``mlp_wasym``,
``mlp_sigmaasym``, ``tiny10_wasym`` and ``tiny10_sigmaasym``, or as
``mlp_table(asymmetry="w" | "sigma")``: the same layers and sizes, with

* ``"w"`` (W-Asymmetric): every dense and conv layer freezes ``fan_in / 8`` (rounded, at
  least 1) entries of each unit's fan-in (the head: ``fan_in / 2``) at random values of
  standard deviation ``WASYM_GAIN / sqrt(fixed)``, so the frozen part of a unit's
  pre-activation has the variance of a standard initialisation;
* ``"sigma"`` (σ-Asymmetric): every ReLU becomes the FiGLU ``x * sigmoid(G x)``, ``G`` a frozen
  ``N(0, 1)`` matrix over the channels, as in the paper.

The frozen arrays are drawn from ``asymmetry_seed`` (stored in the nodes, so a checkpoint
rebuilds them); every model of one architecture shares them, as Lim et al.'s linear paths do.

This module is found through the ``combinability.plugins`` entry point, the same door a
third-party architecture uses.
"""

from __future__ import annotations

import numpy as np

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
    "ASYMMETRIES",
    "WASYM_FRACTION",
    "WASYM_HEAD_FRACTION",
    "WASYM_GAIN",
    "mlp_wasym_table",
    "mlp_sigmaasym_table",
    "tiny10_wasym_table",
    "tiny10_sigmaasym_table",
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


#: Kinds of asymmetry an MLP or Tiny-10 table may have (Lim et al., 2024).
ASYMMETRIES = ("none", "w", "sigma")
#: W-Asymmetric: frozen share of each unit's fan-in in hidden layers and in the head (Lim et al.'s MNIST
#: MLP freezes 64 of 512 hidden inputs and 256 of 512 head inputs).
WASYM_FRACTION = 1 / 8
WASYM_HEAD_FRACTION = 1 / 2
#: W-Asymmetric: the frozen values' standard deviation times sqrt(frozen entries per unit).
WASYM_GAIN = 1.0


def _check_asymmetry(asymmetry: str, seed: int) -> None:
    if asymmetry not in ASYMMETRIES:
        raise ConfigurationError(f"unknown asymmetry {asymmetry!r}; valid: {', '.join(map(repr, ASYMMETRIES))}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigurationError(f"asymmetry_seed must be an int >= 0, got {seed!r}")


def _frozen(asymmetry: str, fan_in: int, fraction: float, seed: int) -> dict:
    """Node keywords of a W-Asymmetric dense/conv layer (none for the other kinds)."""
    if asymmetry != "w":
        return {}
    fixed = min(fan_in, max(1, int(round(fan_in * fraction))))
    return {"fixed": fixed, "scale": WASYM_GAIN / fixed**0.5, "seed": seed}


def _activation(name: str, asymmetry: str, seed: int) -> Node:
    """A ReLU, or the σ-Asymmetric FiGLU gate."""
    return Node(name, "gate", scale=1.0, seed=seed) if asymmetry == "sigma" else Node(name, "relu")


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
               layer: str = "", asymmetry: str = "none", c_in: int = 1, asymmetry_seed: int = 0) -> list[Node]:
    """``conv -> norm -> relu``, the building block of the plain conv nets (``asymmetry``: see the module)."""
    frozen = _frozen(asymmetry, c_in * kernel * kernel, WASYM_FRACTION, asymmetry_seed)
    return [Node(name, "conv", inputs, units=units, kernel=kernel, stride=stride, padding=kernel // 2, bias=bias,
                 layer=layer, **frozen),
            Node(norm_name or name.replace("conv", "norm"), "norm", norm=norm),
            _activation(act, asymmetry, asymmetry_seed)]


def _suffix(asymmetry: str) -> str:
    return {"none": "", "w": "_wasym", "sigma": "_sigmaasym"}[asymmetry]


def mlp_table(*, width: float = 1, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
              asymmetry: str = "none", asymmetry_seed: int = 0) -> LayerTable:
    """Flatten, 3 hidden ``layers.i (512 x width) -> hidden_i (ReLU)``, a dense head ``layers.3``.

    ``asymmetry="w"`` or ``"sigma"`` makes the W- or σ-Asymmetric MLP of the same size (module
    docstring), named ``mlp_wasym`` or ``mlp_sigmaasym``.

    Examples
    --------
    >>> t = mlp_table(width=1 / 64, num_classes=3, input_shape=(16,), asymmetry="w")
    >>> [n.fixed for n in t.nodes if n.op == "dense"], t.spec().perm_names
    ([2, 1, 1, 4], ())
    >>> mlp_table(width=1 / 64, num_classes=3, input_shape=(16,)).spec().perm_names
    ('P_layers.0', 'P_layers.1', 'P_layers.2')
    """
    _check_asymmetry(asymmetry, asymmetry_seed)
    nodes = [Node("flatten", "flatten")]
    fan_in = int(np.prod(input_shape))
    for i in range(MLP_DEPTH):
        units = channels(MLP_HIDDEN, width)
        nodes += [Node(f"layers.{i}", "dense", units=units, **_frozen(asymmetry, fan_in, WASYM_FRACTION,
                                                                      asymmetry_seed)),
                  _activation(f"hidden_{i}", asymmetry, asymmetry_seed)]
        fan_in = units
    nodes.append(Node(f"layers.{MLP_DEPTH}", "dense", units=num_classes,
                      **_frozen(asymmetry, fan_in, WASYM_HEAD_FRACTION, asymmetry_seed)))
    return LayerTable("mlp" + _suffix(asymmetry), input_shape, num_classes, tuple(nodes))


def _plain_convnet(name: str, plan: list, input_shape: tuple[int, ...], num_classes: int, width: float,
                   norm: str = "layernorm", last_kernel: int | None = None, asymmetry: str = "none",
                   asymmetry_seed: int = 0) -> LayerTable:
    """``conv_i -> norm_i -> act_i`` per entry of ``plan`` (``(channels, stride)`` or ``"M"``), pool, head."""
    _check_asymmetry(asymmetry, asymmetry_seed)
    input_shape = _image(name, input_shape)
    nodes: list[Node] = []
    convs = [p for p in plan if p != "M"]
    i, c_in = 0, input_shape[0]
    for p in plan:
        if p == "M":
            nodes.append(Node(f"pool_{len(nodes)}", "maxpool", kernel=2, stride=2))
            continue
        c, stride = p
        kernel = last_kernel if (last_kernel is not None and i == len(convs) - 1) else 3
        nodes += _conv_unit(f"conv_{i}", f"act_{i}", channels(c, width), kernel=kernel, stride=stride, norm=norm,
                            asymmetry=asymmetry, c_in=c_in, asymmetry_seed=asymmetry_seed)
        i, c_in = i + 1, channels(c, width)
    nodes += [Node("pool", "avgpool"),
              Node("head", "dense", units=num_classes, **_frozen(asymmetry, c_in, WASYM_HEAD_FRACTION, asymmetry_seed))]
    return LayerTable(name, input_shape, num_classes, tuple(nodes))


def tiny10_table(*, width: float = 1, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
                 asymmetry: str = "none", asymmetry_seed: int = 0) -> LayerTable:
    """Tiny-10: 8 ``conv -> LayerNorm -> ReLU`` layers (the last 1x1), average pooling, head.

    ``asymmetry="w"`` or ``"sigma"``: the W- or σ-Asymmetric Tiny-10 (module docstring).
    """
    plan = list(zip(TINY10_CHANNELS, TINY10_STRIDES, strict=True))
    return _plain_convnet("tiny10" + _suffix(asymmetry if asymmetry in ASYMMETRIES else "none"), plan, input_shape,
                          num_classes, width, last_kernel=1, asymmetry=asymmetry, asymmetry_seed=asymmetry_seed)


def mlp_wasym_table(**kwargs) -> LayerTable:
    """:func:`mlp_table` with ``asymmetry="w"``."""
    return mlp_table(asymmetry="w", **kwargs)


def mlp_sigmaasym_table(**kwargs) -> LayerTable:
    """:func:`mlp_table` with ``asymmetry="sigma"``."""
    return mlp_table(asymmetry="sigma", **kwargs)


def tiny10_wasym_table(**kwargs) -> LayerTable:
    """:func:`tiny10_table` with ``asymmetry="w"``."""
    return tiny10_table(asymmetry="w", **kwargs)


def tiny10_sigmaasym_table(**kwargs) -> LayerTable:
    """:func:`tiny10_table` with ``asymmetry="sigma"``."""
    return tiny10_table(asymmetry="sigma", **kwargs)


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
    Architecture("mlp_wasym", "combinability.zoo:mlp_wasym_table",
                 description="the MLP, W-Asymmetric: frozen random entries in every unit's fan-in (no permutations)",
                 paper="Lim et al. (2024), The empirical impact of neural parameter symmetries"),
    Architecture("mlp_sigmaasym", "combinability.zoo:mlp_sigmaasym_table",
                 description="the MLP, sigma-Asymmetric: FiGLU x * sigmoid(G x), G frozen (no permutations)",
                 paper="Lim et al. (2024), The empirical impact of neural parameter symmetries"),
    Architecture("tiny10_wasym", "combinability.zoo:tiny10_wasym_table",
                 description="Tiny-10, W-Asymmetric: frozen random entries in every channel's fan-in",
                 paper="Lim et al. (2024), The empirical impact of neural parameter symmetries"),
    Architecture("tiny10_sigmaasym", "combinability.zoo:tiny10_sigmaasym_table",
                 description="Tiny-10, sigma-Asymmetric: FiGLU x * sigmoid(G x) over the channels, G frozen",
                 paper="Lim et al. (2024), The empirical impact of neural parameter symmetries"),
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
