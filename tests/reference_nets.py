"""Plain numpy reference networks and their permutation specs, for tests.

These forward passes are written independently of any backend: they are the
reference the library's permutations and backends are checked against.
"""

from __future__ import annotations

import zlib

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from combinability.specs import SpecBuilder


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def layer_norm_channels(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the channel axis (axis 1) at every position of an NCHW tensor."""
    mu = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[None, :, None, None] + b[None, :, None, None]


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1, pad: int = 1) -> np.ndarray:
    """NCHW cross-correlation with an (out, in, kh, kw) kernel, like torch's conv2d."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.einsum("nchwij,ocij->nohw", win, w)
    return out if b is None else out + b[None, :, None, None]


def conv2d_general(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]], dilation: tuple[int, int],
                   groups: int) -> np.ndarray:
    """NCHW cross-correlation with an ``(out, in / groups, kh, kw)`` kernel: strides, per-side
    padding ``((top, bottom), (left, right))``, dilation and feature groups, one kernel offset at a time."""
    x = np.pad(x, ((0, 0), (0, 0), *padding))
    (sh, sw), (dh, dw), (kh, kw) = stride, dilation, w.shape[2:]
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    c_group, o_group = w.shape[1], w.shape[0] // groups
    out = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for g in range(groups):
        xs, ws = x[:, g * c_group:(g + 1) * c_group], w[g * o_group:(g + 1) * o_group]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                out[:, g * o_group:(g + 1) * o_group] += np.einsum("ncyx,oc->noyx", patch, ws[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


# -- MLP --------------------------------------------------------------------------
def mlp_params(rng: np.random.Generator, sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"layers.{i}.weight"] = rng.normal(0, 1 / np.sqrt(fan_in), (fan_out, fan_in))
        params[f"layers.{i}.bias"] = rng.normal(0, 0.1, fan_out)
    return params


def mlp_spec(n_layers: int):
    b = SpecBuilder("torch")
    for i in range(n_layers):
        b.dense(f"layers.{i}", f"P{i - 1}" if i > 0 else None, f"P{i}" if i < n_layers - 1 else None)
    return b.build()


def mlp_forward(params: dict[str, np.ndarray], x: np.ndarray, n_layers: int) -> np.ndarray:
    for i in range(n_layers):
        x = x @ params[f"layers.{i}.weight"].T + params[f"layers.{i}.bias"]
        if i < n_layers - 1:
            x = relu(x)
    return x


# -- plain conv net -------------------------------------------------------------------
def convnet_params(rng: np.random.Generator, channels=(3, 6, 5), classes: int = 4) -> dict[str, np.ndarray]:
    p = {}
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        p[f"conv{i}.weight"] = rng.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 3, 3))
        p[f"conv{i}.bias"] = rng.normal(0, 0.1, cout)
        p[f"norm{i}.weight"] = rng.normal(1, 0.1, cout)
        p[f"norm{i}.bias"] = rng.normal(0, 0.1, cout)
    p["head.weight"] = rng.normal(0, 0.3, (classes, channels[-1]))
    p["head.bias"] = rng.normal(0, 0.1, classes)
    return p


def convnet_spec(n_conv: int = 2):
    b = SpecBuilder("torch")
    for i in range(n_conv):
        b.conv(f"conv{i}", f"C{i - 1}" if i else None, f"C{i}").norm(f"norm{i}", f"C{i}")
    return b.dense("head", f"C{n_conv - 1}", None).build()


def convnet_forward(p: dict[str, np.ndarray], x: np.ndarray, n_conv: int = 2) -> np.ndarray:
    for i in range(n_conv):
        x = relu(layer_norm_channels(conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"]),
                                     p[f"norm{i}.weight"], p[f"norm{i}.bias"]))
    return x.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]


# -- residual net: stem, an identity block, a projection block, head --------------------------
def resnet_params(rng: np.random.Generator, c_in: int = 3, c1: int = 6, c2: int = 8, classes: int = 4):
    def conv(cout, cin, k=3):
        return rng.normal(0, 1 / np.sqrt(cin * k * k), (cout, cin, k, k))

    def norm(name, c):
        p[f"{name}.weight"] = rng.normal(1, 0.1, c)
        p[f"{name}.bias"] = rng.normal(0, 0.1, c)

    p: dict[str, np.ndarray] = {"stem.weight": conv(c1, c_in)}
    norm("stem_norm", c1)
    p["b1.conv1.weight"] = conv(c1, c1)
    norm("b1.norm1", c1)
    p["b1.conv2.weight"] = conv(c1, c1)
    norm("b1.norm2", c1)
    p["b2.conv1.weight"] = conv(c2, c1)
    norm("b2.norm1", c2)
    p["b2.conv2.weight"] = conv(c2, c2)
    norm("b2.norm2", c2)
    p["b2.short.weight"] = conv(c2, c1, 1)
    norm("b2.short_norm", c2)
    p["head.weight"] = rng.normal(0, 0.3, (classes, c2))
    p["head.bias"] = rng.normal(0, 0.1, classes)
    return p


def resnet_spec():
    b = SpecBuilder("torch")
    b.conv("stem", None, "S1", bias=False).norm("stem_norm", "S1")
    b.basic_block(conv1="b1.conv1", norm1="b1.norm1", conv2="b1.conv2", norm2="b1.norm2",
                  p_in="S1", p_inner="I1", p_out="S1")
    b.basic_block(conv1="b2.conv1", norm1="b2.norm1", conv2="b2.conv2", norm2="b2.norm2",
                  p_in="S1", p_inner="I2", p_out="S2", shortcut_conv="b2.short", shortcut_norm="b2.short_norm")
    return b.dense("head", "S2", None).build()


def resnet_forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    def ln(x, name):
        return layer_norm_channels(x, p[f"{name}.weight"], p[f"{name}.bias"])

    x = relu(ln(conv2d(x, p["stem.weight"]), "stem_norm"))
    h = relu(ln(conv2d(x, p["b1.conv1.weight"]), "b1.norm1"))
    x = relu(ln(conv2d(h, p["b1.conv2.weight"]), "b1.norm2") + x)
    h = relu(ln(conv2d(x, p["b2.conv1.weight"], stride=2), "b2.norm1"))
    short = ln(conv2d(x, p["b2.short.weight"], stride=2, pad=0), "b2.short_norm")
    x = relu(ln(conv2d(h, p["b2.conv2.weight"]), "b2.norm2") + short)
    return x.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]


# -- the library's reference architectures, written out by hand ------------------------------
def max_pool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


# -- asymmetric networks (Lim et al., 2024), from the recipe documented in layers.py and zoo.py ------
def frozen_entries(name: str, shape: tuple[int, ...], fraction: float, seed: int = 0):
    """(mask, values) of a W-Asymmetric weight: ``round(fan_in * fraction)`` (>= 1) frozen entries per unit."""
    units, fan_in = shape[0], int(np.prod(shape[1:]))
    fixed = min(fan_in, max(1, round(fan_in * fraction)))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    u = rng.random((units, fan_in))
    draws = rng.standard_normal((units, fixed)) / np.sqrt(fixed)
    mask = np.zeros((units, fan_in), bool)
    values = np.zeros((units, fan_in))
    for i in range(units):
        cols = sorted(np.argsort(u[i], kind="stable")[:fixed])
        mask[i, cols] = True
        values[i, cols] = draws[i]
    return mask.reshape(shape), values.astype(np.float32).astype(np.float64).reshape(shape)


def with_frozen(p: dict[str, np.ndarray], layers: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """``p`` with the frozen entries of the named layers (name -> frozen fraction) in place."""
    p = dict(p)
    for layer, fraction in layers.items():
        w = p[f"{layer}.weight"]
        mask, values = frozen_entries(layer, w.shape, fraction, seed)
        p[f"{layer}.weight"] = np.where(mask, values, w)
    return p


def figlu(x: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """σ-Asymmetric gate ``x * sigmoid(G x)`` over axis 1, ``G ~ N(0, 1)`` drawn for the node ``name``."""
    c = x.shape[1]
    g = np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal((c, c)).astype(np.float32)
    mixed = np.einsum("oc,nc...->no...", g.astype(np.float64), x)
    return x / (1.0 + np.exp(-mixed))


def asym_forward(name: str, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of ``mlp_wasym``, ``mlp_sigmaasym``, ``tiny10_wasym`` or ``tiny10_sigmaasym`` in numpy."""
    base, kind = name.rsplit("_", 1)
    if base == "mlp":
        if kind == "wasym":
            p = with_frozen(p, {"layers.0": 1 / 8, "layers.1": 1 / 8, "layers.2": 1 / 8, "layers.3": 1 / 2})
        h = x.reshape(len(x), -1)
        for i in range(4):
            h = h @ p[f"layers.{i}.weight"].T + p[f"layers.{i}.bias"]
            if i < 3:
                h = figlu(h, f"hidden_{i}") if kind == "sigmaasym" else relu(h)
        return h
    if kind == "wasym":
        p = with_frozen(p, {**{f"conv_{i}": 1 / 8 for i in range(8)}, "head": 1 / 2})
    for i, s in enumerate((1, 1, 2, 1, 1, 2, 1, 1)):
        h = conv2d(x, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"], stride=s, pad=0 if i == 7 else 1)
        h = layer_norm_channels(h, p[f"norm_{i}.weight"], p[f"norm_{i}.bias"])
        x = figlu(h, f"act_{i}") if kind == "sigmaasym" else relu(h)
    return x.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]


def zoo_forward(name: str, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of the library's ``mlp``, ``tiny10``, ``vgg16``, ``resnet20`` (LayerNorm), ``resnet20_bn`` or
    ``vgg11_bn`` (BatchNorm, inference mode), and of the asymmetric ``mlp_*asym`` and ``tiny10_*asym`` in numpy."""
    if name.endswith("asym"):
        return asym_forward(name, p, x)
    batchnorm = name.endswith("_bn")
    name = name.removesuffix("_bn")

    def ln(h, norm):
        if batchnorm:
            scale = p[f"{norm}.weight"] / np.sqrt(p[f"{norm}.running_var"] + 1e-5)
            return (h - p[f"{norm}.running_mean"][None, :, None, None]) * scale[None, :, None, None] \
                + p[f"{norm}.bias"][None, :, None, None]
        return layer_norm_channels(h, p[f"{norm}.weight"], p[f"{norm}.bias"])

    def head(h):
        return h.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]

    if name == "mlp":
        return mlp_forward(p, x.reshape(len(x), -1), 4)
    if name == "tiny10":
        strides = (1, 1, 2, 1, 1, 2, 1, 1)
        for i, s in enumerate(strides):
            last = i == len(strides) - 1
            x = relu(ln(conv2d(x, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"], stride=s, pad=0 if last else 1),
                        f"norm_{i}"))
        return head(x)
    if name in ("vgg16", "vgg11"):
        plan = ((64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
                if name == "vgg16" else (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"))
        i = 0
        for step in plan:
            if step == "M":
                x = max_pool2(x) if min(x.shape[2:]) >= 2 else x
                continue
            x = relu(ln(conv2d(x, p[f"conv_{i}.weight"], p[f"conv_{i}.bias"]), f"norm_{i}"))
            i += 1
        return head(x)
    if name == "resnet20":
        x = relu(ln(conv2d(x, p["stem_conv.weight"]), "stem_norm"))
        for s in range(3):
            for b in range(3):
                blk = f"stage{s}_block{b}"
                stride = 2 if s > 0 and b == 0 else 1
                h = relu(ln(conv2d(x, p[f"{blk}.conv1.weight"], stride=stride), f"{blk}.norm1"))
                h = ln(conv2d(h, p[f"{blk}.conv2.weight"]), f"{blk}.norm2")
                if f"{blk}.shortcut_conv.weight" in p:
                    x = ln(conv2d(x, p[f"{blk}.shortcut_conv.weight"], stride=stride, pad=0), f"{blk}.shortcut_norm")
                x = relu(h + x)
        return head(x)
    raise KeyError(name)


def numpy_evaluation(layout, theta: np.ndarray, data, architecture: str = "mlp") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a flat vector of a zoo model, computed in plain numpy."""
    params = {k: v.astype(np.float64) for k, v in layout.unflatten(theta).items()}
    z = zoo_forward(architecture, params, data.x.astype(np.float64))
    z = z - z.max(axis=1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), data.y])
    return float(loss), float(np.mean(z.argmax(axis=1) == data.y))
