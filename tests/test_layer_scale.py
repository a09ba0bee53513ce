"""LayerScale in transformers (Touvron et al., CaiT and DeiT III; timm's ``ls1``/``ls2``, DINOv2): each
branch's output is scaled by a learned vector before it joins the residual stream, ``x + γ ⊙ (W h + b)``.
The scale folds into the layer it scales (``W ← diag γ W``, ``b ← γ ⊙ b``, ``γ ← 1``), so the stream keeps
its orthogonal maps instead of falling back to permutations.

References: the folded parameters computed by hand, the model run in float64 under a random transformation of
the derived spec after folding (it must keep the outputs), which weight matching must undo.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.kinds import Orthogonal
from tests.model_checks import assert_random_transformation_undone, randomised

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
D, HEADS = 8, 2


class LayerScale(nn.Module):
    """timm's: ``x * gamma``, or in place."""

    def __init__(self, dim: int, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj, self.proj_drop = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Dropout(0.1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.proj_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(D), Attention(), LayerScale(D, inplace)
        self.norm2, self.fc1, self.fc2, self.ls2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D), \
            LayerScale(D, inplace)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, D, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 4, D))
        self.block, self.norm, self.head = Block(inplace), nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.block(tokens)).mean(1))


X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("inplace", [False, True])
def test_a_layer_scale_folds_into_the_layer_it_scales_and_the_stream_rotates(inplace):
    model = randomised(ViT(inplace), 0)
    spec, folds = cb.derive_symmetries(model, X)
    stream = spec.axes_to_perm["patch.weight"][0]
    kind = spec.kind(stream)
    assert isinstance(kind, Orthogonal) and kind.fix_ones
    assert {"block.ls1.gamma", "block.ls2.gamma"} <= set(dict(kind.requires))
    state = _state(model)
    folded = cb.fold_norms(state, folds)
    gamma = state["block.ls1.gamma"]
    np.testing.assert_allclose(folded["block.attn.proj.weight"], gamma[:, None] * state["block.attn.proj.weight"])
    np.testing.assert_allclose(folded["block.attn.proj.bias"], gamma * state["block.attn.proj.bias"])
    np.testing.assert_array_equal(folded["block.ls2.gamma"], np.ones(D))
    assert_random_transformation_undone(model, spec, folded, X, "block.fc2.weight")


class GatedBranch(nn.Module):
    """A learned vector scaling an activation's output (no layer to fold it into): a gate, permutations only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(4, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.gamma = nn.Parameter(torch.ones(D))

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.gamma * F.gelu(self.fc(h)))


def test_a_vector_scaling_an_activation_is_no_layer_scale():
    model = randomised(GatedBranch(), 0)
    x = torch.randn(6, 4)
    spec, folds = cb.derive_symmetries(model, x)
    assert not folds and not any(isinstance(k, Orthogonal) for k in spec.kinds.values())
    assert_random_transformation_undone(model, spec, _state(model), x, "fc.weight")


def test_a_flax_layer_scale_folds_into_the_dense_it_scales_and_the_stream_rotates():
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    import flax.linen as fnn

    from tests.test_stream_trace_jax import _folded_map_undone, _model, _state

    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.Dense(2 * D, name="fc1")(fnn.LayerNorm(name="norm")(x))
            gamma = self.param("gamma", fnn.initializers.constant(1e-5), (D,))
            return x + gamma * fnn.Dense(D, name="fc2")(jax.nn.gelu(h))

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.Dense(D, name="embed")(x)
            h = Block(name="block_0")(h)
            return fnn.Dense(3, name="head")(fnn.LayerNorm(name="norm_f")(h).mean(1))

    x = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    module = Net()
    state = _state(module, x, 0)
    spec, folds = cb.derive_symmetries(_model(module, state), x)
    stream = spec.axes_to_perm["params/embed/kernel"][1]
    assert isinstance(spec.kind(stream), Orthogonal)
    assert "params/block_0/gamma" in dict(spec.kind(stream).requires)
    folded = cb.fold_norms(state, folds)
    gamma = state["params/block_0/gamma"]
    np.testing.assert_allclose(folded["params/block_0/fc2/kernel"], state["params/block_0/fc2/kernel"] * gamma)
    np.testing.assert_allclose(folded["params/block_0/fc2/bias"], state["params/block_0/fc2/bias"] * gamma)
    _folded_map_undone(module, state, folded, spec, x, "params/embed/kernel")
