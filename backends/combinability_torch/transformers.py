"""Reference transformers and mixtures of experts in plain torch: TinyViT, CharGPT, MoEMLP.

Built from torch's own blocks, as a user would write them: ``nn.MultiheadAttention``
(``batch_first=True``, packed ``in_proj_weight``), ``nn.Linear``, ``nn.LayerNorm`` or
``nn.RMSNorm``, exact GELU, learned positional embeddings, pre-LN residual blocks.
The flax twins in :mod:`combinability_jax.transformers` have the same parameters, and
convert to and from these state dicts.

State names (the same in every model)::

    patch.weight (d, c*p*p), patch.bias     TinyViT: patches -> tokens (a Conv2d(p, stride=p) as a Linear)
    tok.weight (vocab, d)                   CharGPT: token embedding
    cls (1, 1, d)                           TinyViT with pool="cls": the class token
    pos (1, tokens, d)                      learned positional embedding
    blocks.{i}.norm1.weight [.bias]         LayerNorm (weight and bias) or RMSNorm (weight)
    blocks.{i}.attn.in_proj_weight (3d, d)  rows [0:d] query, [d:2d] key, [2d:3d] value; head h owns
    blocks.{i}.attn.in_proj_bias (3d,)      rows h*dh:(h+1)*dh of each, dh = d / heads
    blocks.{i}.attn.out_proj.weight (d, d)  head h owns columns h*dh:(h+1)*dh
    blocks.{i}.norm2.weight [.bias]
    blocks.{i}.mlp.fc1.weight (m, d), .bias  feed-forward (or MoE: see MoEMLP)
    blocks.{i}.mlp.fc2.weight (d, m), .bias
    norm.weight [.bias]                     final norm
    head.weight (out, d), head.bias

MoE layout (:class:`MoEMLP`): ``gate.weight (E, d)`` (no bias), ``fc1.weight (E*H, d)`` and
``fc1.bias (E*H,)`` with expert ``e`` owning rows ``e*H:(e+1)*H``, ``fc2.weight (d_out, E*H)``
with expert ``e`` owning columns ``e*H:(e+1)*H``, and one shared ``fc2.bias (d_out,)`` (the
gate weights of a token sum to one, so a shared output bias is every expert's output bias).
Permuting experts is a block permutation of ``fc1`` rows / ``fc2`` columns together with the
``gate`` rows; permuting neurons inside an expert is a permutation within its block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from combinability.transformer_zoo import check_transformer_shape

__all__ = ["Block", "CharGPT", "FeedForward", "MoEMLP", "MoEMLPNet", "TinyViT", "make_norm", "patchify", "tiny_vit"]

#: Epsilon of every norm (torch's LayerNorm default; given explicitly to RMSNorm, whose default differs).
EPS = 1e-5


def make_norm(kind: str, d: int) -> nn.Module:
    """``nn.LayerNorm(d)`` for ``kind="layer"``, ``nn.RMSNorm(d)`` for ``kind="rms"`` (eps 1e-5 both)."""
    if kind == "layer":
        return nn.LayerNorm(d, eps=EPS)
    if kind == "rms":
        return nn.RMSNorm(d, eps=EPS)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(n, c, h, w)`` images -> ``(n, (h/p)*(w/p), c*p*p)`` patches, row-major, each flattened ``(c, p, p)``."""
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MoEMLP(nn.Module):
    """An MLP whose hidden layer is a mixture of ``experts`` experts of ``hidden`` units each.

    ``y = fc2(g ⊙ act(fc1(x)))`` where ``g`` repeats each expert's gate value over its
    ``hidden`` units: ``g = softmax(gate(x))`` over all experts (``dense=True``), or over the
    ``top_k`` largest gate logits with zeros elsewhere (sparse top-k routing, renormalised
    over the chosen experts). All experts are computed (small models; no dispatch), so the
    function, not the cost, is that of a sparse MoE.

    Parameters
    ----------
    d : int
        Input features.
    hidden : int
        Units per expert (H).
    experts : int
        Number of experts (E).
    top_k : int
        Experts per token when sparse (1 or 2 typically; at most ``experts``).
    dense : bool
        Soft gating of all experts instead of top-k.
    d_out : int, optional
        Output features (default ``d``).
    activation : {"gelu", "relu"}
    """

    def __init__(self, d: int, hidden: int, experts: int, top_k: int = 1, dense: bool = False,
                 d_out: int | None = None, activation: str = "gelu") -> None:
        super().__init__()
        if experts < 1 or hidden < 1:
            raise ValueError(f"experts and hidden must be >= 1, got experts={experts}, hidden={hidden}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..experts={experts}, got {top_k}")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.experts, self.hidden, self.top_k, self.dense, self.activation = experts, hidden, top_k, dense, activation
        self.gate = nn.Linear(d, experts, bias=False)
        self.fc1 = nn.Linear(d, experts * hidden)
        self.fc2 = nn.Linear(experts * hidden, d if d_out is None else d_out)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values ``(..., E)``: softmax over all experts, or over the top-k (zeros elsewhere)."""
        logits = self.gate(x)
        if self.dense:
            return logits.softmax(-1)
        top, idx = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        """Indices ``(..., top_k)`` of the experts each input is routed to, largest gate logit first."""
        return self.gate(x).topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        g = self.gates(x).repeat_interleave(self.hidden, dim=-1)
        return self.fc2(h * g)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, d: int, heads: int, mlp: int, norm: str = "layer", experts: int = 0, top_k: int = 1,
                 dense: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = make_norm(norm, d)
        self.mlp = MoEMLP(d, mlp, experts, top_k, dense) if experts else FeedForward(d, mlp)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer on ``(n, c, h, w)`` images.

    Patches ``p x p`` -> linear embedding -> [class token] + learned positional embedding ->
    ``depth`` pre-LN blocks -> final norm -> class token (``pool="cls"``) or mean of the
    tokens (``pool="mean"``) -> linear head. ``experts > 0`` makes every feed-forward block
    an :class:`MoEMLP` of ``experts`` experts of ``mlp`` units each.

    Defaults: 28x28 grey images, 7x7 patches (16 tokens), d_model 64, 4 heads, depth 2, mlp 128.
    For 8x8 digits use ``image_size=8, patch_size=2``.
    """

    def __init__(self, image_size: int = 28, patch_size: int = 7, channels: int = 1, num_classes: int = 10,
                 d_model: int = 64, heads: int = 4, depth: int = 2, mlp: int = 128, pool: str = "cls",
                 norm: str = "layer", experts: int = 0, top_k: int = 1, dense: bool = False) -> None:
        super().__init__()
        check_transformer_shape(d_model, heads, depth)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.patch_size, self.pool = patch_size, pool
        tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.patch = nn.Linear(channels * patch_size**2, d_model)
        if pool == "cls":
            self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d_model))
        self.blocks = nn.ModuleList([Block(d_model, heads, mlp, norm, experts, top_k, dense) for _ in range(depth)])
        self.norm = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(patchify(x, self.patch_size))
        if self.pool == "cls":
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))


class CharGPT(nn.Module):
    """A decoder-only character-level transformer (causal; untied input embedding and head).

    ``forward(tokens)`` takes ``(n, T)`` token ids (integers, or floats holding integers: the
    library's data cache stores inputs as float32, exact below 2**24) with ``T <= context``
    and returns next-token logits flattened to ``(n*T, vocab)``, example-major (row ``i*T + t``
    is example ``i``, position ``t``); with ``flatten=False``, ``(n, T, vocab)``. The targets
    of the flattened logits are ``y.reshape(-1)`` for targets ``y`` of shape ``(n, T)``.
    """

    def __init__(self, vocab: int, context: int = 64, d_model: int = 64, heads: int = 4, depth: int = 2,
                 mlp: int = 128, norm: str = "layer", flatten: bool = True) -> None:
        super().__init__()
        check_transformer_shape(d_model, heads, depth)
        if vocab < 2 or context < 1:
            raise ValueError(f"vocab must be >= 2 and context >= 1, got vocab={vocab}, context={context}")
        self.context, self.flatten = context, flatten
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, context, d_model))
        self.blocks = nn.ModuleList([Block(d_model, heads, mlp, norm) for _ in range(depth)])
        self.norm = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t = tokens.shape
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)  # True: may not attend
        h = self.tok(tokens.long()) + self.pos[:, :t]
        for block in self.blocks:
            h = block(h, mask)
        logits = self.head(self.norm(h))
        return logits.reshape(n * t, -1) if self.flatten else logits


class MoEMLPNet(nn.Module):
    """An MoE variant of the MLP classifier: flatten, then one :class:`MoEMLP` hidden layer to the classes."""

    def __init__(self, in_features: int = 784, hidden: int = 64, experts: int = 4, num_classes: int = 10,
                 top_k: int = 1, dense: bool = False) -> None:
        super().__init__()
        self.moe = MoEMLP(in_features, hidden, experts, top_k, dense, d_out=num_classes, activation="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x.flatten(1))


def tiny_vit(*, width: float = 1.0, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
             seed: int = 0) -> TinyViT:
    """The registered architecture ``tinyvit`` (:mod:`combinability.transformer_zoo`): a seeded :class:`TinyViT`.

    torch's default initialisation drawn from ``seed``; the global random state is untouched.
    """
    from combinability.transformer_zoo import tiny_vit_kwargs

    kwargs = tiny_vit_kwargs(width=width, num_classes=num_classes, input_shape=input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return TinyViT(**kwargs).eval()
