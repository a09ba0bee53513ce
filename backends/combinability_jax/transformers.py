"""Reference transformers and mixtures of experts in flax linen: TinyViT, CharGPT, MoEMLP.

The twins of :mod:`combinability_torch.transformers`: same architecture, same parameter
shapes up to the kernel layout, same outputs from the same weights. Attention is written
with four explicit ``Dense`` layers ``q``, ``k``, ``v``, ``out`` (kernels ``(d, d)``; head
``h`` owns columns ``h*dh:(h+1)*dh`` of the ``q``/``k``/``v`` kernels and rows
``h*dh:(h+1)*dh`` of the ``out`` kernel), so that converting weights is a transpose.

Mapping torch state name -> flax ``params`` path (:func:`torch_to_flax`, :func:`flax_to_torch`)::

    blocks.{i}.X                     blocks_{i}/X
    *.weight of a Linear (out, in)   */kernel (in, out)             (transposed)
    *.bias                           */bias
    norm1|norm2|norm .weight         norm1|norm2|norm/scale          (LayerNorm or RMSNorm)
    tok.weight (vocab, d)            tok/embedding (vocab, d)
    attn.in_proj_weight (3d, d)      attn/q|k|v/kernel = rows [0:d] | [d:2d] | [2d:3d], transposed
    attn.in_proj_bias (3d,)          attn/q|k|v/bias
    attn.out_proj.weight, .bias      attn/out/kernel (transposed), attn/out/bias
    cls, pos                         cls, pos                        (unchanged)

MoE (:class:`MoEMLP`): ``gate/kernel (d, E)``, ``fc1/kernel (d, E*H)`` (expert ``e`` owns
columns ``e*H:(e+1)*H``), ``fc1/bias (E*H,)``, ``fc2/kernel (E*H, d_out)`` (expert ``e`` owns
rows ``e*H:(e+1)*H``), ``fc2/bias (d_out,)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from combinability.transformer_zoo import check_transformer_shape

__all__ = ["Attention", "Block", "CharGPT", "FeedForward", "MoEMLP", "MoEMLPNet", "TinyViT",
           "flax_to_torch", "patchify", "tiny_vit", "torch_to_flax"]

EPS = 1e-5
_gelu = partial(jax.nn.gelu, approximate=False)  # torch's default GELU
_NORMS = ("norm1", "norm2", "norm")


def _norm(kind: str, name: str) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(epsilon=EPS, use_fast_variance=False, name=name)
    if kind == "rms":
        return nn.RMSNorm(epsilon=EPS, name=name)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``(n, c, h, w)`` images -> ``(n, (h/p)*(w/p), c*p*p)`` patches, row-major, each flattened ``(c, p, p)``."""
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    x = x.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``q``, ``k``, ``v``, ``out`` Dense layers (torch's maths)."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
        n, t, d = x.shape
        dh = d // self.heads
        q, k, v = (nn.Dense(d, name=name)(x).reshape(n, t, self.heads, dh) for name in "qkv")
        scores = jnp.einsum("nqhc,nkhc->nhqk", q, k) / np.sqrt(dh)
        if causal:
            scores = jnp.where(jnp.tril(jnp.ones((t, t), dtype=bool)), scores, -jnp.inf)
        out = jnp.einsum("nhqk,nkhc->nqhc", jax.nn.softmax(scores, axis=-1), v).reshape(n, t, d)
        return nn.Dense(d, name="out")(out)


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.d_model, name="fc2")(_gelu(nn.Dense(self.hidden, name="fc1")(x)))


class MoEMLP(nn.Module):
    """Mixture of ``experts`` experts of ``hidden`` units: ``fc2(g ⊙ act(fc1(x)))`` (see the torch twin).

    ``g`` repeats each expert's gate value over its units: softmax of the gate logits over all
    experts (``dense=True``) or over the ``top_k`` largest (zeros elsewhere).
    """

    d_out: int
    hidden: int
    experts: int
    top_k: int = 1
    dense: bool = False
    activation: str = "gelu"

    def gates(self, logits: jax.Array) -> jax.Array:
        """Gate values ``(..., E)`` from gate logits ``(..., E)``."""
        if self.dense:
            return jax.nn.softmax(logits, axis=-1)
        top, idx = jax.lax.top_k(logits, self.top_k)
        return jnp.sum(jax.nn.one_hot(idx, self.experts, dtype=logits.dtype) * jax.nn.softmax(top, -1)[..., None],
                       axis=-2)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in 1..experts={self.experts}, got {self.top_k}")
        logits = nn.Dense(self.experts, use_bias=False, name="gate")(x)
        h = nn.Dense(self.experts * self.hidden, name="fc1")(x)
        h = _gelu(h) if self.activation == "gelu" else jax.nn.relu(h)
        g = jnp.repeat(self.gates(logits), self.hidden, axis=-1)
        return nn.Dense(self.d_out, name="fc2")(h * g)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    d_model: int
    heads: int
    mlp: int
    norm: str = "layer"
    experts: int = 0
    top_k: int = 1
    dense: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
        x = x + Attention(self.d_model, self.heads, name="attn")(_norm(self.norm, "norm1")(x), causal)
        mlp = (MoEMLP(self.d_model, self.mlp, self.experts, self.top_k, self.dense, name="mlp") if self.experts
               else FeedForward(self.d_model, self.mlp, name="mlp"))
        return x + mlp(_norm(self.norm, "norm2")(x))


_pos_init = nn.initializers.normal(0.02)


class TinyViT(nn.Module):
    """A small vision transformer on channels-first ``(n, c, h, w)`` images (see the torch twin)."""

    image_size: int = 28
    patch_size: int = 7
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    heads: int = 4
    depth: int = 2
    mlp: int = 128
    pool: str = "cls"
    norm: str = "layer"
    experts: int = 0
    top_k: int = 1
    dense: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_transformer_shape(self.d_model, self.heads, self.depth)
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        h = nn.Dense(self.d_model, name="patch")(patchify(x, self.patch_size))
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.d_model))
            h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, self.d_model)), h], axis=1)
        h = h + self.param("pos", _pos_init, (1, h.shape[1], self.d_model))
        for i in range(self.depth):
            h = Block(self.d_model, self.heads, self.mlp, self.norm, self.experts, self.top_k, self.dense,
                      name=f"blocks_{i}")(h)
        h = _norm(self.norm, "norm")(h)
        return nn.Dense(self.num_classes, name="head")(h[:, 0] if self.pool == "cls" else h.mean(axis=1))


class CharGPT(nn.Module):
    """A decoder-only character-level transformer; logits ``(n*T, vocab)`` (``flatten=False``: ``(n, T, vocab)``)."""

    vocab: int
    context: int = 64
    d_model: int = 64
    heads: int = 4
    depth: int = 2
    mlp: int = 128
    norm: str = "layer"
    flatten: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        check_transformer_shape(self.d_model, self.heads, self.depth)
        n, t = tokens.shape
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        h = nn.Embed(self.vocab, self.d_model, name="tok")(tokens.astype(jnp.int32))
        h = h + self.param("pos", _pos_init, (1, self.context, self.d_model))[:, :t]
        for i in range(self.depth):
            h = Block(self.d_model, self.heads, self.mlp, self.norm, name=f"blocks_{i}")(h, causal=True)
        logits = nn.Dense(self.vocab, name="head")(_norm(self.norm, "norm")(h))
        return logits.reshape(n * t, -1) if self.flatten else logits


class MoEMLPNet(nn.Module):
    """An MoE variant of the MLP classifier: flatten, then one :class:`MoEMLP` hidden layer to the classes."""

    hidden: int = 64
    experts: int = 4
    num_classes: int = 10
    top_k: int = 1
    dense: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        moe = MoEMLP(self.num_classes, self.hidden, self.experts, self.top_k, self.dense, "relu", name="moe")
        return moe(x.reshape(x.shape[0], -1))


def torch_to_flax(state: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables ``{"params": ...}`` from a torch state dict of these models (arrays as numpy).

    Accepts torch tensors or numpy arrays (anything ``numpy.asarray`` takes); see the module
    docstring for the mapping.
    """
    params: dict[str, Any] = {}

    def put(path: list[str], value: np.ndarray) -> None:
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(value)

    for name, value in state.items():
        a = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        parts = name.split(".")
        path = [f"{p}_{parts[i + 1]}" if p == "blocks" else p for i, p in enumerate(parts[:-1])
                if not (i > 0 and parts[i - 1] == "blocks")]
        leaf = parts[-1]
        if leaf in ("in_proj_weight", "in_proj_bias"):
            for j, qkv in enumerate("qkv"):
                chunk = a[j * (a.shape[0] // 3):(j + 1) * (a.shape[0] // 3)]
                put([*path, qkv, "kernel" if leaf == "in_proj_weight" else "bias"],
                    chunk.T if leaf == "in_proj_weight" else chunk)
            continue
        if path and path[-1] == "out_proj":
            path[-1] = "out"
        if leaf == "weight" and path and path[-1] in _NORMS:
            put([*path, "scale"], a)
        elif leaf == "weight" and path == ["tok"]:
            put([*path, "embedding"], a)
        elif leaf == "weight":
            put([*path, "kernel"], a.T)
        else:
            put([*path, leaf], a)
    return {"params": params}


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torch state dict (numpy arrays; wrap with ``torch.from_numpy``) from flax variables: inverse of
    :func:`torch_to_flax`."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(dict(variables["params"]) if "params" in variables else dict(variables))
    state: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, ...], dict[tuple[str, str], np.ndarray]] = {}
    for path, value in flat.items():
        a = np.asarray(value)
        *mods, leaf = path
        names = [m.replace("blocks_", "blocks.") if m.startswith("blocks_") else m for m in mods]
        if len(mods) >= 2 and mods[-2] == "attn" and mods[-1] in ("q", "k", "v"):
            qkv.setdefault(tuple(names[:-1]), {})[(mods[-1], leaf)] = a
            continue
        if names and names[-1] == "out" and len(mods) >= 2 and mods[-2] == "attn":
            names[-1] = "out_proj"
        prefix = ".".join(names)
        key = {"scale": "weight", "embedding": "weight", "kernel": "weight"}.get(leaf, leaf)
        state[f"{prefix}.{key}" if prefix else key] = np.ascontiguousarray(a.T if leaf == "kernel" else a)
    for attn, parts in qkv.items():
        prefix = ".".join(attn)
        state[f"{prefix}.in_proj_weight"] = np.concatenate([parts[(p, "kernel")].T for p in "qkv"])
        state[f"{prefix}.in_proj_bias"] = np.concatenate([parts[(p, "bias")] for p in "qkv"])
    return state


def tiny_vit(*, width: float = 1.0, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
             seed: int = 0) -> tuple[TinyViT, dict[str, Any]]:
    """The registered architecture ``tinyvit`` (:mod:`combinability.transformer_zoo`): ``(TinyViT, variables)``.

    flax's default initialisation from ``PRNGKey(seed)``.
    """
    from combinability.transformer_zoo import tiny_vit_kwargs

    module = TinyViT(**tiny_vit_kwargs(width=width, num_classes=num_classes, input_shape=input_shape))
    variables = module.init(jax.random.PRNGKey(int(seed)), jnp.zeros((1, *input_shape), jnp.float32))
    return module, jax.device_get(variables)
