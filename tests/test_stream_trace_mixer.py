"""MLP-Mixer as timm writes it: a patch-embedding conv, blocks whose token-mixing MLP runs on the features
transposed behind the tokens (``mlp_tokens(norm1(x).transpose(1, 2)).transpose(1, 2)``) and whose
channel-mixing MLP runs on the features, a LayerNorm and a head on the mean over tokens.

References: the model's own outputs in float64 before and after a random transformation of the traced
spec, permutations planted by hand (plain torch indexing) that weight and activation matching must
undo, and the module's own outputs for the features the library reads.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from tests.model_checks import assert_planted_permutation_undone, float64_outputs, randomised, tapped_features

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

DIM, TOKENS_HIDDEN, CHANNELS_HIDDEN, SIDE, PATCH = 8, 6, 12, 12, 4
TOKENS = (SIDE // PATCH) ** 2


class Mlp(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(features, hidden), nn.GELU(), nn.Dropout(0.0), \
            nn.Linear(hidden, features)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class MixerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(DIM), Mlp(TOKENS, TOKENS_HIDDEN)
        self.norm2, self.mlp_channels = nn.LayerNorm(DIM), Mlp(DIM, CHANNELS_HIDDEN)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.blocks = nn.Sequential(*[MixerBlock() for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


X = torch.randn(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def _planted(model: Mixer, seed: int) -> Mixer:
    """``model`` with its features, and each block's token-mixing and channel-mixing hidden units, permuted
    by hand: the same function, other weights."""
    rng = np.random.default_rng(seed)
    s = {k: v.clone() for k, v in model.state_dict().items()}
    d = torch.as_tensor(rng.permutation(DIM))
    for key in ("stem.weight", "stem.bias", "norm.weight", "norm.bias"):
        s[key] = s[key][d]
    s["head.weight"] = s["head.weight"][:, d]
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        t, c = torch.as_tensor(rng.permutation(TOKENS_HIDDEN)), torch.as_tensor(rng.permutation(CHANNELS_HIDDEN))
        for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp_channels.fc2.bias"):
            s[f"{b}.{key}"] = s[f"{b}.{key}"][d]
        s[f"{b}.mlp_tokens.fc1.weight"], s[f"{b}.mlp_tokens.fc1.bias"] = \
            s[f"{b}.mlp_tokens.fc1.weight"][t], s[f"{b}.mlp_tokens.fc1.bias"][t]
        s[f"{b}.mlp_tokens.fc2.weight"] = s[f"{b}.mlp_tokens.fc2.weight"][:, t]
        s[f"{b}.mlp_channels.fc1.weight"] = s[f"{b}.mlp_channels.fc1.weight"][c][:, d]
        s[f"{b}.mlp_channels.fc1.bias"] = s[f"{b}.mlp_channels.fc1.bias"][c]
        s[f"{b}.mlp_channels.fc2.weight"] = s[f"{b}.mlp_channels.fc2.weight"][d][:, c]
    out = Mixer().eval()
    out.load_state_dict(s)
    return out


def test_mixer_token_mixing_is_traced_and_a_transformation_keeps_the_function():
    model = randomised(Mixer(), 0)
    spec, _ = cb.derive_symmetries(model, X)
    axes = spec.axes_to_perm
    stream = axes["stem.weight"][0]
    assert axes["stem.weight"][1:] == (None, None, None) and axes["head.weight"] == (None, stream)
    assert spec.kind(stream) == cb.kinds.Neuron()  # a token-mixing MLP acts on each feature alike: permutations
    hidden = axes["blocks.1.mlp_tokens.fc1.weight"][0]
    assert axes["blocks.1.mlp_tokens.fc1.weight"] == (hidden, None)  # its input: the tokens, in place
    assert axes["blocks.1.mlp_tokens.fc2.weight"] == (None, hidden) and axes["blocks.1.mlp_tokens.fc2.bias"] == (None,)
    assert axes["blocks.1.norm1.weight"] == (stream,) == axes["blocks.1.mlp_channels.fc2.bias"]
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=2), state)
    assert not np.allclose(moved["blocks.1.mlp_tokens.fc1.weight"], state["blocks.1.mlp_tokens.fc1.weight"])
    np.testing.assert_allclose(float64_outputs(model, moved, X), float64_outputs(model, state, X), atol=1e-9)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_hand_planted_permutation_of_a_mixer_is_undone(method):
    a = randomised(Mixer(), 1)
    data = (torch.randn(40, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1)).numpy(), np.arange(40) % 5)
    assert_planted_permutation_undone(a, _planted(a, seed=3), X, data, method)


def test_features_of_a_token_mixing_layer_are_its_units_per_feature():
    a = randomised(Mixer(), 1)
    feats = tapped_features(a, randomised(Mixer(), 2), X, "blocks.0.mlp_tokens.fc1", batch_size=4)
    with torch.no_grad():
        want = a.blocks[0].mlp_tokens.fc1(a.blocks[0].norm1(a.stem(X).flatten(2).transpose(1, 2)).transpose(1, 2))
    assert feats.shape == (len(X) * DIM, TOKENS_HIDDEN)  # each (example, feature) an observation of the units
    np.testing.assert_allclose(feats, want.reshape(-1, TOKENS_HIDDEN).numpy(), rtol=1e-5, atol=1e-6)


class Bag(nn.Module):
    """Token ids embedded, one hidden layer on every token, the mean over tokens: as many tokens as units."""

    def __init__(self, vocab: int = 11, hidden: int = 5) -> None:
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(vocab, 4), nn.Linear(4, hidden), nn.Linear(hidden, 3)

    def forward(self, idx):
        return self.out(F.relu(self.fc(self.emb(idx))).mean(dim=1))


def test_features_of_a_layer_on_tokens_are_read_on_its_last_axis():
    """Before, a Linear's (n, tokens, units) output was read as channels-first, tokens as units: with as
    many tokens as units, silently."""
    torch.manual_seed(0)
    a, b = Bag().eval(), Bag().eval()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    feats = tapped_features(a, b, ids, "fc", batch_size=2)
    with torch.no_grad():
        want = a.fc(a.emb(ids)).reshape(-1, 5).numpy()  # (example, token) rows, units as columns
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)


def test_an_unfollowed_operation_on_transposed_features_is_refused_by_name():
    class Cumulative(Mixer):
        def forward(self, x):
            x = self.stem(x).flatten(2).transpose(1, 2)
            x = x + torch.cumsum(x.transpose(1, 2), dim=-1).transpose(1, 2)
            return self.head(x.mean(dim=1))

    with pytest.raises(TracingError, match="transposed behind the tokens"):
        cb.derive_symmetries(Cumulative().eval(), X)


# -- MLP-Mixer in flax (as the reference flax Mixer writes it: jnp.swapaxes) -------------------------------
def _flax_mixer():
    fnn = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")

    class MlpBlock(fnn.Module):
        hidden: int

        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(x.shape[-1], name="fc2")(fnn.gelu(fnn.Dense(self.hidden, name="fc1")(x)))

    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            y = jnp.swapaxes(fnn.LayerNorm()(x), 1, 2)
            x = x + jnp.swapaxes(MlpBlock(TOKENS_HIDDEN, name="token_mixing")(y), 1, 2)
            return x + MlpBlock(CHANNELS_HIDDEN, name="channel_mixing")(fnn.LayerNorm()(x))

    class FlaxMixer(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.Conv(DIM, (PATCH, PATCH), strides=(PATCH, PATCH), name="stem")(x)
            x = x.reshape(x.shape[0], -1, DIM)
            for _ in range(2):
                x = Block()(x)
            return fnn.Dense(5, name="head")(jnp.mean(fnn.LayerNorm(name="norm")(x), axis=1))

    return FlaxMixer()


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_flax_mixer_is_traced_and_its_planted_transformation_undone(method):
    from flax import traverse_util

    from tests.model_checks import flax_variables

    net = _flax_mixer()
    x = np.random.default_rng(0).normal(size=(4, SIDE, SIDE, 1)).astype(np.float32)
    variables = flax_variables(net, x, 0)
    spec, _ = cb.derive_symmetries((net, variables), x)
    hidden = spec.axes_to_perm["params/Block_0/token_mixing/fc1/kernel"][1]
    assert spec.axes_to_perm["params/Block_0/token_mixing/fc1/kernel"] == (None, hidden)  # flax: (in, out)
    assert spec.axes_to_perm["params/Block_0/token_mixing/fc2/kernel"] == (hidden, None)
    state = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    moved = traverse_util.unflatten_dict(cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3),
                                                              state), sep="/")
    np.testing.assert_allclose(np.asarray(net.apply(moved, x)), np.asarray(net.apply(variables, x)), rtol=1e-4,
                               atol=1e-5)
    data = (np.random.default_rng(1).normal(size=(40, SIDE, SIDE, 1)).astype(np.float32), np.arange(40) % 5)
    pair = cb.ModelPair((net, variables), (net, moved), example_input=x)
    aligned = pair.align(method, **({"data": data} if method == "activation" else {}))
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def test_flax_features_on_tokens_are_read_on_their_last_axis():
    net = _flax_mixer()
    x = np.random.default_rng(2).normal(size=(3, SIDE, SIDE, 1)).astype(np.float32)
    from tests.model_checks import flax_variables

    variables = flax_variables(net, x, 1)
    pair = cb.ModelPair((net, variables), (net, flax_variables(net, x, 2)), example_input=x)
    evaluator = cb.Evaluator(cb.get_backend(pair.backend), pair.model(0), pair.layout, batch_size=2)
    data = cb.ArrayDataset(x=x, y=np.zeros(len(x), np.int64), num_classes=2, name="probe", split="test")
    point = "Block_0/channel_mixing/fc1"
    feats = evaluator.features(pair.theta_a, data, [point])[point]
    _, state = net.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    want = np.asarray(state["intermediates"]["Block_0"]["channel_mixing"]["fc1"]["__call__"][0])
    assert want.shape == (3, TOKENS, CHANNELS_HIDDEN)
    np.testing.assert_allclose(feats, want.reshape(-1, CHANNELS_HIDDEN), rtol=1e-5, atol=1e-6)
