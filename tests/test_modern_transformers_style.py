"""Models written as transformers 4.5x and 5.x write them, traced without transformers installed.

What recent transformers versions do that torch.fx could not record: a ``forward`` wrapped by a
decorator taking ``(self, *args, **kwargs)`` around a signature with ``**kwargs``
(``@can_return_tuple``); attention masks built by ``torch.vmap`` in ``transformers.masking_utils``;
a key/value cache object made when ``config.use_cache`` is on; a constant mask sliced by a size read
off a traced shape; and a mixture of experts that loops over the experts hit, indexing its
``ModuleList`` by a number read off the routing. Version 5 adds functions called as module instances
kept outside the model (the kernels hub's ``apply_rotary_pos_emb``), a probe of the input
(``hasattr(x, "jax")``, then ``x.jax()`` in a ``try``) whose failure the model catches, and a
reshape of the attention's output to its own shape. References: the
models' own forward passes and planted permutations.
"""

from __future__ import annotations

import functools
import sys
import types

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

D, H, E, V = 8, 12, 4, 16


def can_return_tuple(forward):
    """transformers' decorator: a wrapper of ``(self, *args, **kwargs)``."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out if kwargs.get("return_dict", True) else (out,)
    return wrapper


@pytest.fixture
def masking_module():
    """A stand-in for a transformers model module whose mask builder needs concrete tensors (``torch.vmap``)."""
    module = types.ModuleType("transformers.models.fake_lm.modeling_fake_lm")

    def create_causal_mask(input_embeds, attention_mask=None):
        t = input_embeds.shape[1]
        rows = torch.arange(t)
        allowed = torch.vmap(lambda q: rows <= q)(rows)  # proxies cannot pass torch.vmap
        return torch.where(allowed, 0.0, float("-inf"))

    module.create_causal_mask = create_causal_mask
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


class Config:
    use_cache = True


class Cache:
    """A key/value cache object, as transformers' ``DynamicCache``: no value torch.fx can record."""

    def __init__(self) -> None:
        self.layers: list = []


class Experts(nn.Module):
    """Top-2 experts looped over as transformers 4.57's Mixtral loops: only those hit, ``self.experts[idx]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)) for _ in range(E)])

    def forward(self, x):
        b, t, d = x.shape
        x = x.reshape(-1, d)
        weights, selected = torch.topk(F.softmax(self.gate(x), dim=-1), 2, dim=-1)
        out = torch.zeros((b * t, d), dtype=x.dtype)
        mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for idx in hit:
            slot, rows = torch.where(mask[idx].squeeze(0))
            out.index_add_(0, rows, self.experts[idx](x[rows]) * weights[rows, slot, None])
        return out.reshape(b, t, d)


class TinyLM(nn.Module):
    def __init__(self, masks: types.ModuleType) -> None:
        super().__init__()
        self.config, self.masks = Config(), masks.__name__  # the model's module, as transformers' globals are
        self.embed, self.qkv, self.proj = nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.norm, self.moe, self.head = nn.LayerNorm(D), Experts(), nn.Linear(D, V)
        self.causal = torch.triu(torch.full((32, 32), float("-inf")), 1)  # a plain tensor, not a buffer

    @can_return_tuple
    def forward(self, input_ids, attention_mask=None, use_cache=None, return_dict=True, **kwargs):
        cache = Cache() if (use_cache if use_cache is not None else self.config.use_cache) else None
        h = self.embed(input_ids)
        b, t, _ = h.shape
        q, k, v = (z.view(b, t, 2, D // 2).transpose(1, 2) for z in self.qkv(h).split(D, dim=-1))
        mask = sys.modules[self.masks].create_causal_mask(h, attention_mask) + self.causal[: h.shape[1], : h.shape[1]]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, D)
        h = h + self.proj(attended)
        h = h + self.moe(self.norm(h))
        return {"logits": self.head(h), "past_key_values": cache}  # a ModelOutput, which carries the cache


def _ids(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, (n, t)))


def test_a_modern_transformers_style_lm_traces_aligns_and_keeps_its_function(masking_module):
    torch.manual_seed(0)
    a, b = TinyLM(masking_module).eval(), TinyLM(masking_module).eval()
    ids = _ids()
    pair = cb.ModelPair(a, b, example_input=ids).align("weight")
    assert a.config.use_cache is True  # put back after tracing
    assert pair.spec.kind("P_moe.experts.*.0").group == pair.spec.axes_to_perm["moe.gate.weight"][0]
    with torch.no_grad():
        np.testing.assert_allclose(pair.model_b(ids)["logits"].numpy(), b(ids)["logits"].numpy(), rtol=1e-5,
                                   atol=1e-5)
        assert not torch.allclose(pair.model_b.moe.gate.weight, b.moe.gate.weight)  # experts moved


def test_a_planted_expert_order_is_undone(masking_module):
    torch.manual_seed(1)
    a = TinyLM(masking_module).eval()
    b = TinyLM(masking_module).eval()
    b.load_state_dict(a.state_dict())
    sigma = [3, 1, 0, 2]
    with torch.no_grad():
        b.moe.gate.weight.copy_(a.moe.gate.weight[sigma])
        for e, s in enumerate(sigma):
            b.moe.experts[e].load_state_dict(a.moe.experts[s].state_dict())
    ids = _ids(seed=2)
    with torch.no_grad():
        np.testing.assert_allclose(b(ids)["logits"].numpy(), a(ids)["logits"].numpy(), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=ids).align("weight")
    np.testing.assert_array_equal(pair.permutation[pair.spec.axes_to_perm["moe.gate.weight"][0]], np.argsort(sigma))
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)


def test_an_index_read_off_a_tensors_values_is_refused():
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.table = torch.randn(D, D)

        def forward(self, x):
            return self.fc(x) + self.table[: x.argmax().item() if False else x.sum().long()]  # noqa: SIM210

    with pytest.raises(TracingError, match="values of a tensor as an index"):
        cb.derive_symmetries(Picky(), torch.ones(3, D))


class HubFunction(nn.Module):
    """A function called as a module instance the model does not hold (transformers 5's kernels hub)."""

    def forward(self, q, k, cos, sin):
        def rotate_half(x):
            return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


apply_rotary_pos_emb = HubFunction()  # module-level: no submodule of any model


def is_jax_jitting(x) -> bool:
    """transformers 5's probe for torchax tensors: an attribute a torch tensor lacks, called in a try."""
    if not hasattr(x, "jax"):
        return False
    try:
        return bool(x.jax())
    except Exception:  # noqa: BLE001 - as transformers does
        return False


class Version5LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.q, self.k, self.v = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o, self.up, self.down, self.head = nn.Linear(D, D), nn.Linear(D, H), nn.Linear(H, D), nn.Linear(D, V)
        angles = torch.outer(torch.arange(32.0), 1.0 / 100 ** (torch.arange(0, D // 2, 2) / (D // 2)))
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin(), persistent=False)

    def forward(self, input_ids):
        is_jax_jitting(input_ids)
        h = self.embed(input_ids)
        b, t, _ = h.shape
        q, k, v = (f(h).view(b, t, 2, D // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = apply_rotary_pos_emb(q, k, self.cos[:t], self.sin[:t])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.reshape(out.shape[0], -1, t, v.shape[-1])  # to its own shape, as version 5's SDPA wrapper does
        h = h + self.o(out.transpose(1, 2).reshape(b, t, D))
        return self.head(h + self.down(F.gelu(self.up(h))))


def test_a_version_5_style_lm_traces_through_hub_functions_and_caught_probes():
    torch.manual_seed(3)
    a = Version5LM().eval()
    spec, _ = cb.derive_symmetries(a, _ids())
    state = {k: v.numpy().astype(np.float64) for k, v in a.state_dict().items()}
    planted = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=5), state)
    assert not np.allclose(planted["q.weight"], state["q.weight"])
    b = Version5LM().eval()
    b.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in planted.items()})
    ids = _ids(seed=4)
    with torch.no_grad():  # the derived symmetry keeps the function: whole rotary heads move
        np.testing.assert_allclose(b(ids).numpy(), a(ids).numpy(), rtol=1e-5, atol=1e-5)
    pair = cb.ModelPair(a, b, example_input=ids).align("weight")
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)  # the planted map undone



class KeywordsLM(nn.Module):
    """A forward taking ``**kwargs`` and passing them on, undecorated (transformers 4.x's GraniteMoE)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(V, D), nn.Linear(D, H), nn.Linear(H, V)

    def inner(self, h, scale=1.0, **kwargs):
        return self.head(F.gelu(self.fc(h)) * scale)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(self.embed(input_ids), **kwargs)


def test_a_forward_taking_keywords_is_traced_with_them_at_their_defaults():
    torch.manual_seed(3)
    a = KeywordsLM().eval()
    spec, _ = cb.derive_symmetries(a, _ids())
    assert spec.axes_to_perm["fc.weight"][0] == spec.axes_to_perm["head.weight"][1]  # the hidden units found
    rng = np.random.default_rng(4)
    order = rng.permutation(H)
    b = KeywordsLM().eval()
    with torch.no_grad():  # a planted order of the hidden units, written out
        b.load_state_dict(a.state_dict())
        b.fc.weight.copy_(a.fc.weight[order])
        b.fc.bias.copy_(a.fc.bias[order])
        b.head.weight.copy_(a.head.weight[:, order])
    pair = cb.ModelPair(a, b, example_input=_ids()).align("weight")
    np.testing.assert_allclose(pair.theta_b, pair.theta_a, atol=1e-6)
