"""Transformers built from torch's own ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer``
(a ViT, a causal language model with a generated mask), and ``nn.EmbeddingBag``.

The tracer records the encoder's ``forward`` (its attention, feed-forward layers and norms)
instead of stopping at the module. References: the model's own outputs in float64 before and
after a random transformation of every traced kind (norms folded), a planted transformation
that weight matching must undo, and torch's cross-entropy of the models' logits at both ends
of a sweep.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import combinability as cb
from combinability.errors import TracingError
from combinability.kinds import Blocks, Orthogonal
from tests.model_checks import (
    assert_random_transformation_undone,
    language_pair_sweep_ends_match_torch,
    randomised,
    tapped_features,
)

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

DIM, HEADS, PATCH, SIDE = 16, 4, 4, 12
X = torch.randn(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


class EncoderViT(nn.Module):
    """A ViT as a user writes it with torch's encoder: a patch convolution, a class token, an encoder."""

    def __init__(self, norm_first: bool, activation: str, batch_first: bool, final_norm: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (SIDE // PATCH) ** 2, DIM))
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        with warnings.catch_warnings():  # torch's note that a pre-norm encoder takes no nested tensors
            warnings.simplefilter("ignore", UserWarning)
            self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(DIM) if final_norm else None)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        if not self.batch_first:
            return self.head(self.encoder(tokens.transpose(0, 1))[0])
        return self.head(self.encoder(tokens)[:, 0])


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("norm_first", "activation", "batch_first"),
                         [(True, "gelu", True), (False, "relu", True), (True, "relu", False), (False, "gelu", False)])
def test_an_encoder_vit_is_traced_into_heads_neurons_and_a_stream_that_keep_its_function(
        norm_first, activation, batch_first):
    model = randomised(EncoderViT(norm_first, activation, batch_first), 0)
    spec, folds = cb.derive_symmetries(model, X)
    stream = spec.axes_to_perm["patch.weight"][0]
    assert spec.axes_to_perm["cls_token"] == (None, None, stream) == spec.axes_to_perm["pos_embed"]
    rows, cols = spec.axes_to_perm["encoder.layers.1.self_attn.in_proj_weight"]
    qk, vo = spec.kind(rows[0]), spec.kind(rows[2])
    assert rows[0] == rows[1] != rows[2] and cols == stream
    assert isinstance(qk, Blocks) and (qk.blocks, qk.size) == (HEADS, DIM // HEADS) and vo.group == qk.group
    assert spec.axes_to_perm["encoder.layers.1.self_attn.out_proj.weight"] == (stream, rows[2])
    hidden = spec.axes_to_perm["encoder.layers.0.linear1.weight"][0]
    assert spec.axes_to_perm["encoder.layers.0.linear1.weight"] == (hidden, stream)
    assert spec.axes_to_perm["encoder.layers.0.linear2.weight"] == (stream, hidden)
    # a pre-norm stream rotates (the norms' scales and shifts folded into the layers they feed); after a
    # post-norm it only permutes, the norms' parameters with it
    assert isinstance(spec.kind(stream), Orthogonal) == norm_first
    norm_axes = (None,) if norm_first else (stream,)
    assert spec.axes_to_perm["encoder.norm.weight"] == norm_axes == spec.axes_to_perm["encoder.layers.0.norm2.bias"]
    assert_random_transformation_undone(model, spec, cb.fold_norms(_state(model), folds), X, "patch.weight")


def test_an_encoder_vit_pair_aligns_and_sweeps_as_torch_scores_it():
    models = [randomised(EncoderViT(True, "gelu", True), s) for s in (1, 2)]
    y = np.arange(len(X)) % 5
    pair = cb.ModelPair(*models, example_input=X).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(X.numpy(), y), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(X), torch.as_tensor(y)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


VOCAB, SEQ = 20, 8


class EncoderGPT(nn.Module):
    """A causal language model on torch's encoder: the mask made in ``forward`` for the input's length."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(1, SEQ, DIM))
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True, norm_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(DIM))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.lm_head(self.encoder(self.tok(tokens) + self.pos[:, :t], mask=mask, is_causal=True))


TOKENS = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))


def test_a_causal_encoder_language_model_keeps_its_function_and_sweeps_as_torch_scores_it():
    model = randomised(EncoderGPT(), 0)
    spec, folds = cb.derive_symmetries(model, TOKENS)
    stream = spec.axes_to_perm["tok.weight"][1]
    assert spec.axes_to_perm["lm_head.weight"] == (None, stream)
    assert_random_transformation_undone(model, spec, cb.fold_norms(_state(model), folds), TOKENS, "tok.weight")
    language_pair_sweep_ends_match_torch([randomised(EncoderGPT(), s) for s in (1, 2)], TOKENS, VOCAB, SEQ)


class BufferMaskGPT(EncoderGPT):
    """The causal mask kept as a (boolean) buffer, sliced to the input's length."""

    def __init__(self, is_causal: bool | None) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.register_buffer("causal", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1))

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.encoder(self.tok(tokens) + self.pos[:, :t], mask=self.causal[:t, :t], is_causal=self.is_causal)
        return self.lm_head(x)


def test_a_mask_buffer_is_followed_with_is_causal_and_refused_by_name_without():
    model = randomised(BufferMaskGPT(is_causal=True), 0)
    spec, folds = cb.derive_symmetries(model, TOKENS)
    assert_random_transformation_undone(model, spec, cb.fold_norms(_state(model), folds), TOKENS, "tok.weight")
    # without the hint, torch compares the buffer's values with a causal mask: a branch on values
    with pytest.raises(TracingError, match="branches on the values of a tensor"):
        cb.derive_symmetries(randomised(BufferMaskGPT(is_causal=None), 0), TOKENS)


class Bag(nn.Module):
    """A fastText-style classifier: a mean of token embeddings (``nn.EmbeddingBag``), then two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, mode="mean")
        self.hidden, self.out = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, 3)

    def forward(self, tokens):
        return self.out(F.relu(self.hidden(self.bag(tokens))))


def test_an_embedding_bag_is_a_layer_whose_features_permute():
    model = randomised(Bag(), 0)
    spec, folds = cb.derive_symmetries(model, TOKENS)
    features = spec.axes_to_perm["bag.weight"][1]
    assert spec.axes_to_perm["bag.weight"] == (None, features)
    assert spec.axes_to_perm["hidden.weight"][1] == features
    assert_random_transformation_undone(model, spec, cb.fold_norms(_state(model), folds), TOKENS, "bag.weight")


def test_calibration_of_a_language_model_pair_scores_every_position_as_torch():
    from combinability.analysis.calibration import calibrate

    models = [randomised(EncoderGPT(), s) for s in (1, 2)]
    g = torch.Generator().manual_seed(5)
    tokens, targets = (torch.randint(0, VOCAB, (6, SEQ), generator=g) for _ in range(2))
    held = tuple(torch.randint(0, VOCAB, (4, SEQ), generator=g).numpy() for _ in range(2))
    pair = cb.ModelPair(*models, example_input=TOKENS)
    ds = calibrate(pair, (tokens.numpy(), targets.numpy()), lambdas=[0.0, 1.0], calibration_data=held, naive=False)
    for lam, model in zip((0.0, 1.0), models, strict=True):
        with torch.no_grad():
            logits = model(tokens).double().reshape(-1, VOCAB)
        want = F.cross_entropy(logits, targets.reshape(-1)).item()
        assert float(ds["loss"].sel(lam=lam).isel(alignment=0)) == pytest.approx(want, rel=1e-5)


def test_features_inside_the_encoder_are_read_and_its_neurons_perturbed():
    from combinability.experiments import alignment_robustness

    a, b = randomised(EncoderGPT(), 1), randomised(EncoderGPT(), 2)
    seen = {}
    hook = a.encoder.layers[1].linear1.register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    with torch.no_grad():
        a(TOKENS)
    hook.remove()
    feats = tapped_features(a, b, TOKENS, "encoder.layers.1.linear1")  # one row per (example, position)
    np.testing.assert_allclose(feats, seen["out"].reshape(-1, 2 * DIM).numpy(), rtol=1e-5, atol=1e-6)
    pair = cb.ModelPair(a, b, example_input=TOKENS).align("weight")
    g = torch.Generator().manual_seed(6)
    data = tuple(torch.randint(0, VOCAB, (8, SEQ), generator=g).numpy() for _ in range(2))
    ds = alignment_robustness(pair, cb.ArrayDataset(x=data[0], y=data[1], num_classes=VOCAB, name="t", split="test"),
                              steps=2, examples=8, lambdas=(0.5,))
    # the MLP neurons; the stream rotates (the final norm's shift stays in it, before the bias-free head), and
    # rotations are not re-matched pair by pair
    assert set(ds["permutation"].values) == {"P_encoder.layers.0.linear1", "P_encoder.layers.1.linear1"}
    assert np.isfinite(ds["loss_barrier"].values).all()


def _features_of(model, state: dict[str, np.ndarray], point: str, x) -> np.ndarray:
    """``point``'s output (a submodule's) of ``model`` run in float64 with ``state``, one row per example."""
    import copy

    m = copy.deepcopy(model).double()
    m.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    seen = {}
    hook = m.get_submodule(point).register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    with torch.no_grad():
        m(torch.as_tensor(x))
    hook.remove()
    return seen["out"].reshape(len(x), -1).numpy()


def test_llfc_of_an_encoder_pair_reads_its_neurons_and_blocks_as_torch_computes_them():
    a, b = randomised(EncoderGPT(), 1), randomised(EncoderGPT(), 2)
    pair = cb.ModelPair(a, b, example_input=TOKENS)
    g = torch.Generator().manual_seed(7)
    x, y = (torch.randint(0, VOCAB, (6, SEQ), generator=g).numpy() for _ in range(2))
    ds = cb.llfc(pair, (x, y), values=[0.5])
    # the layers opening its neuron spaces, the MLPs' hidden units (the stream rotates: no neurons of its own)
    assert list(ds["point"].values) == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    ds = cb.llfc(pair, (x, y), values=[0.5], points=["encoder.layers.0", "encoder.layers.1.linear1"])
    states = [pair.layout.unflatten(pair.theta(k)) for k in (0, 1)]
    mid = {k: 0.5 * states[0][k].astype(np.float64) + 0.5 * states[1][k] for k in states[0]}
    for point in ("encoder.layers.0", "encoder.layers.1.linear1"):  # a block's output: the residual stream
        fa, fb, f = (_features_of(a, s, point, x) for s in (*states, mid))
        g_mix = 0.5 * fa + 0.5 * fb
        want = np.mean(np.sum(f * g_mix, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(g_mix, axis=1)))
        assert float(ds["cosine"].sel(point=point).item()) == pytest.approx(want, rel=1e-4)
        assert float(ds["coefficient"].sel(point=point).item()) == 0.5
    with pytest.raises(cb.UnknownNameError, match="unknown feature point"):
        cb.llfc(pair, (x, y), values=[0.5], points=["encoder.layers.7"])
    with pytest.raises(cb.UnknownNameError, match="does not run in a forward pass"):
        cb.llfc(pair, (x, y), values=[0.5], points=["encoder.layers"])  # a ModuleList
    with pytest.raises(cb.ConfigurationError, match="depth in a chain of layers"):
        cb.lewc(pair, (x, y), lambdas=[0.5])


def test_a_point_without_a_layer_table_takes_the_mean_coefficient_of_its_modules_parameters():
    from combinability.analysis.llfc import point_coefficients

    pair = cb.ModelPair(randomised(EncoderGPT(), 1), randomised(EncoderGPT(), 2), example_input=TOKENS)
    v = np.random.default_rng(0).uniform(size=pair.layout.size)
    points = ["encoder.layers.0.linear1", "encoder.layers.1"]
    got = point_coefficients(pair, points)(v)
    for point, alpha in zip(points, got, strict=True):
        names = [k for k in pair.layout.names if k.startswith(point + ".")]
        parts = np.concatenate([v[pair.layout.slice(k)] for k in names])
        assert alpha == pytest.approx(parts.mean(), rel=1e-12)
    assert set(point_coefficients(pair, points)(0.3)) == {0.3}
    with pytest.raises(cb.ConfigurationError, match="hold no parameters"):
        point_coefficients(pair, ["getitem"])


def test_the_layers_of_a_model_without_a_table_are_its_modules():
    a, b = randomised(EncoderGPT(), 1), randomised(EncoderGPT(), 2)
    pair = cb.ModelPair(a, b, example_input=TOKENS)
    names = pair.layer_names
    assert {"tok", "encoder.layers.0.linear1", "encoder.layers.1.self_attn", "lm_head"} <= set(names)
    assert len(names) == len(set(names)) == pair.layout.num_layers
    # one layer interpolated (weight and bias together), the rest A's: torch's loss of that model
    ds = cb.layerwise_barriers(pair, (TOKENS.numpy(), TOKENS.numpy()), lambdas=[0.0, 0.5, 1.0],
                               layers=["encoder.layers.0.linear1"], modes=("single",), curvature=False)
    states = [pair.layout.unflatten(pair.theta(k)) for k in (0, 1)]
    mixed = {k: 0.5 * states[0][k] + 0.5 * states[1][k] if k.startswith("encoder.layers.0.linear1.") else v
             for k, v in states[0].items()}
    logits = _float64_logits(a, mixed, TOKENS)
    want = F.cross_entropy(torch.as_tensor(logits).reshape(-1, VOCAB), TOKENS.reshape(-1)).item()
    got = float(ds["loss"].sel(mode="single", layer="encoder.layers.0.linear1", lam=0.5))
    assert got == pytest.approx(want, rel=1e-4)


def _float64_logits(model, state: dict[str, np.ndarray], x) -> np.ndarray:
    import copy

    m = copy.deepcopy(model).double()
    m.load_state_dict({k: torch.as_tensor(v).double() for k, v in state.items()}, strict=False)
    with torch.no_grad():
        return m(torch.as_tensor(x)).numpy()


def test_compare_aligners_skips_by_default_what_cannot_align_a_transformer_and_refuses_it_by_name():
    import json

    from combinability.experiments import compare_aligners

    pair = cb.ModelPair(randomised(EncoderGPT(), 1), randomised(EncoderGPT(), 2), example_input=TOKENS)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, VOCAB, (8, SEQ), generator=g).numpy() for _ in range(2))
    data = {"test": (x, y), "train": (x, y)}
    ds = compare_aligners(pair, data, samplers=("linear",), samples=1, values_per_sampler=3,
                          learned_options={"batch_size": 4})
    skipped = json.loads(ds.attrs["skipped"])
    assert set(skipped) == {"activation", "sinkhorn", "cycle"}  # neuron permutations only: heads, packed rows
    assert all("Blocks (attention heads" in why for why in skipped.values())
    assert list(ds["aligner"].values) == ["identity", "weight", "ste", "ste_elementwise"]
    assert list(ds["merge_method"].values) == ["mergemany", "hierarchical", "reference"]
    assert np.isfinite(ds["loss_barrier"].values).all()
    with pytest.raises(cb.ConfigurationError, match="compare_aligners: aligner 'activation' aligns neuron"):
        compare_aligners(pair, data, methods=("weight", "activation"), many_methods=())


def test_the_layerwise_figure_of_a_transformers_modules_stacks_its_panels_and_names_every_module(tmp_path):
    from combinability.plots.layerwise import plot_layerwise_barriers

    pair = cb.ModelPair(randomised(EncoderGPT(), 1), randomised(EncoderGPT(), 2), example_input=TOKENS)
    ds = cb.layerwise_barriers(pair, (TOKENS.numpy(), TOKENS.numpy()), lambdas=[0.0, 0.5, 1.0], curvature=False)
    fig = plot_layerwise_barriers(ds, tmp_path / "layerwise.png")
    assert (tmp_path / "layerwise.png").stat().st_size > 0
    axes = fig.get_axes()
    assert len(axes) == 2 and axes[0].get_position().y0 > axes[1].get_position().y1  # one above the other
    assert [t.get_text() for t in axes[1].get_xticklabels()] == pair.layer_names
    assert fig.get_size_inches()[0] <= 14.0
