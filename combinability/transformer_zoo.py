"""The reference vision transformer as a registered architecture built by module factories.

``tinyvit`` is :class:`combinability_torch.transformers.TinyViT` on torch and its flax twin
on jax: patches -> tokens, a class token, learned positions, pre-LN blocks of multi-head
self-attention and a GELU feed-forward. It has no layer table: each backend builds it in
the framework's own terms (:attr:`Architecture.modules <combinability.architecture.Architecture>`)
and its symmetries (heads, feed-forward neurons, the residual stream) are traced from an
example input. So ``cb.train("tinyvit", "fashion_mnist", backend="jax", checkpoint=...)``
trains, saves and reuses it like the paper's networks.

Geometry (:func:`tiny_vit_kwargs`): the image is cut into a 4 x 4 grid of square patches
(28 x 28 -> 7 x 7 patches, 8 x 8 digits -> 2 x 2, 32 x 32 -> 8 x 8), ``d_model = 64 x width``
(rounded to a multiple of the 4 heads), 2 blocks, feed-forward of ``2 d_model`` units.

Nothing here imports a framework; this module registers through the plugin hook like
:mod:`combinability.zoo`.
"""

from __future__ import annotations

from typing import Any

from combinability.architecture import Architecture
from combinability.errors import ConfigurationError
from combinability.hookspecs import hookimpl
from combinability.training import TrainRecipe

__all__ = ["check_transformer_shape", "tiny_vit_kwargs", "TINYVIT_RECIPE", "TRANSFORMER_ARCHITECTURES", "GRID", "HEADS"]

#: Patches per side of the image.
GRID = 4
#: Attention heads per block.
HEADS = 4
#: ``d_model`` at width 1.
BASE_D_MODEL = 64

#: Adam with a short warm-up and cosine decay: a few epochs give a usable model on a CPU.
TINYVIT_RECIPE = TrainRecipe(epochs=3, lr=2e-3, optimizer="adam", weight_decay=0.0, batch_size=100,
                             schedule="warmup_cosine", warmup_epochs=0.2, warmup_start=1e-5)


def check_transformer_shape(d_model: int, heads: int, depth: int) -> None:
    """Refuse a transformer whose width does not split into ``heads`` heads, or of no blocks.

    Raises
    ------
    ConfigurationError
        (a ``ValueError``) saying which value is wrong.
    """
    if heads < 1 or d_model % heads:
        raise ConfigurationError(f"d_model={d_model} must be a positive multiple of heads={heads}")
    if depth < 1:
        raise ConfigurationError(f"depth must be >= 1, got {depth}")


def tiny_vit_kwargs(*, width: float, num_classes: int, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Constructor arguments of ``TinyViT`` (either backend) for a configuration.

    Parameters
    ----------
    width : float
        Multiplies ``d_model`` (64 at width 1; rounded to a multiple of the 4 heads, at least 4).
    num_classes : int
    input_shape : tuple of int
        ``(channels, height, width)`` of one image, square, with a side divisible by 4.

    Returns
    -------
    dict
        ``image_size, patch_size, channels, num_classes, d_model, heads, depth, mlp``.

    Raises
    ------
    ConfigurationError
        If the input is not a square image whose side divides into 4 patches, or ``width`` is not positive.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % GRID:
        raise ConfigurationError(f"tinyvit needs square images (channels, side, side) whose side is divisible by "
                                 f"{GRID} (a {GRID}x{GRID} grid of patches), got input_shape {shape}")
    if not width > 0:
        raise ConfigurationError(f"width must be positive, got {width!r}")
    d_model = max(HEADS, HEADS * round(BASE_D_MODEL * float(width) / HEADS))
    return {"image_size": shape[1], "patch_size": shape[1] // GRID, "channels": shape[0],
            "num_classes": int(num_classes), "d_model": d_model, "heads": HEADS, "depth": 2, "mlp": 2 * d_model}


TRANSFORMER_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("tinyvit", description="small vision transformer: 4x4 patches, class token, 2 pre-LN blocks, "
                                        "4 heads, d_model 64 x width (no layer table; traced)",
                 paper="Dosovitskiy et al. (2021); as in Theus et al. (2025), generalized LMC for transformers",
                 modules={"torch": "combinability_torch.transformers:tiny_vit",
                          "jax": "combinability_jax.transformers:tiny_vit"},
                 recipe=TINYVIT_RECIPE),
)


@hookimpl
def combinability_register_architectures() -> tuple[Architecture, ...]:
    return TRANSFORMER_ARCHITECTURES
