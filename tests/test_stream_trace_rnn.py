"""Recurrent networks: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` in the feature-space tracer.

A permutation of a recurrent layer's hidden units moves each gate's rows of ``weight_ih``,
``weight_hh`` and the biases alike (rows ``gate * hidden + unit``: ``Repeat(name, gates,
interleaved=True)``) and the columns of ``weight_hh``; the next layer reads the units.

References: the model's own outputs in float64 before and after a random transformation of the
traced spec; a permutation planted by hand (plain torch indexing of each gate's rows) that weight
and activation matching must undo; torch's cross-entropy of each model's logits at the ends of a
sweep.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.errors import ConfigurationError, TracingError
from combinability.permutation import Repeat
from tests.model_checks import (
    assert_planted_permutation_undone,
    assert_random_transformation_undone,
    float64_outputs,
    randomised,
)

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

VOCAB, EMB, HIDDEN, CLASSES, T = 20, 8, 6, 4, 7
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class TextRNN(nn.Module):
    """A text classifier: embedded tokens, a recurrent layer stack, a linear layer on the last step's
    output (``use="output"``) or on the last layer's final hidden state (``use="state"``)."""

    def __init__(self, kind: str = "LSTM", layers: int = 2, use: str = "output", batch_first: bool = True) -> None:
        super().__init__()
        self.kind, self.use, self.batch_first = kind, use, batch_first
        self.emb = nn.Embedding(VOCAB, EMB)
        self.rnn = getattr(nn, kind)(EMB, HIDDEN, num_layers=layers, batch_first=batch_first)
        self.fc = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        x = self.emb(ids)
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if self.use == "output":
            return self.fc(out[:, -1] if self.batch_first else out[-1])
        h = state[0] if self.kind == "LSTM" else state
        return self.fc(h[-1])


IDS = torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(0))


def _planted(model: TextRNN, seed: int) -> TextRNN:
    """``model`` with each layer's hidden units permuted by hand, gate by gate: the same function."""
    rng = np.random.default_rng(seed)
    gates = GATES[model.kind]
    s = {k: v.clone() for k, v in model.state_dict().items()}
    below = None
    for k in range(model.rnn.num_layers):
        p = torch.as_tensor(rng.permutation(HIDDEN))
        rows = torch.cat([g * HIDDEN + p for g in range(gates)])  # each gate's rows moved alike
        for name in (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"):
            s[f"rnn.{name}"] = s[f"rnn.{name}"][rows]
        s[f"rnn.weight_hh_l{k}"] = s[f"rnn.weight_hh_l{k}"][:, p]
        if below is not None:
            s[f"rnn.weight_ih_l{k}"] = s[f"rnn.weight_ih_l{k}"][:, below]
        below = p
    s["fc.weight"] = s["fc.weight"][:, below]
    out = TextRNN(model.kind, model.rnn.num_layers, model.use, model.batch_first).eval()
    out.load_state_dict(s)
    return out


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("use", ["output", "state"])
def test_recurrent_layers_are_traced_and_a_transformation_keeps_the_function(kind, use):
    model = randomised(TextRNN(kind, 2, use), 0)
    spec, _ = cb.derive_symmetries(model, IDS)
    axes = spec.axes_to_perm
    low, top = axes["rnn.weight_hh_l0"][1], axes["rnn.weight_hh_l1"][1]
    rows = (lambda name: Repeat(name, GATES[kind], interleaved=True) if GATES[kind] > 1 else name)  # noqa: E731
    assert axes["rnn.weight_hh_l0"] == (rows(low), low) and axes["rnn.bias_ih_l0"] == (rows(low),)
    assert axes["rnn.weight_ih_l1"] == (rows(top), low) and axes["fc.weight"] == (None, top)
    assert axes["rnn.weight_ih_l0"][1] == axes["emb.weight"][1]  # the embedding's space
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=2), state)
    assert not np.allclose(moved["rnn.weight_hh_l1"], state["rnn.weight_hh_l1"])
    np.testing.assert_allclose(float64_outputs(model, moved, IDS), float64_outputs(model, state, IDS), atol=1e-9)


@pytest.mark.parametrize("kind,layers,batch_first", [("LSTM", 2, True), ("GRU", 1, False), ("RNN", 2, True)])
def test_a_hand_planted_permutation_of_a_recurrent_net_is_undone_by_weight_matching(kind, layers, batch_first):
    a = randomised(TextRNN(kind, layers, batch_first=batch_first), 1)
    assert_planted_permutation_undone(a, _planted(a, seed=3), IDS, (), "weight")


def test_activation_matching_reads_the_output_sequence_of_a_one_layer_lstm():
    a = randomised(TextRNN("LSTM", 1), 1)
    b = _planted(a, seed=4)
    data = (torch.randint(0, VOCAB, (32, T), generator=torch.Generator().manual_seed(5)).numpy(), np.arange(32) % 4)
    pair = cb.ModelPair(a, b, example_input=IDS)
    aligned = pair.align("activation", data=data, symmetries="permutation")  # the embedding permuted, not rotated
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def test_activation_matching_refuses_a_lower_layer_it_cannot_observe():
    pair = cb.ModelPair(randomised(TextRNN("LSTM", 2), 1), randomised(TextRNN("LSTM", 2), 2), example_input=IDS)
    data = (IDS.numpy(), np.arange(len(IDS)) % 4)
    with pytest.raises(ConfigurationError, match=r"'rnn.hidden_l0' have none.*'weight' or 'ste'"):
        pair.align("activation", data=data, symmetries="permutation")


def test_a_recurrent_pair_sweeps_as_torch_scores_it():
    models = [randomised(TextRNN("GRU", 2, "state"), s) for s in (6, 7)]
    y = np.arange(len(IDS)) % CLASSES
    pair = cb.ModelPair(*models, example_input=IDS).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(IDS.numpy(), y), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.cross_entropy(m(IDS), torch.as_tensor(y)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


class Stacked(TextRNN):
    def forward(self, ids):
        _, (h, _) = self.rnn(self.emb(ids))
        return self.fc(h.mean(dim=0))  # every layer's states at once


class Projected(TextRNN):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(EMB, 2 * HIDDEN, batch_first=True, proj_size=HIDDEN)


class Started(TextRNN):
    def forward(self, ids):
        h0 = torch.zeros(2, ids.shape[0], HIDDEN)  # as many tutorials write it: the default, made explicit
        out, _ = self.rnn(self.emb(ids), (h0, h0))
        return self.fc(out[:, -1])


class LearnedStart(TextRNN):
    def __init__(self) -> None:
        super().__init__()
        self.h0 = nn.Parameter(torch.randn(2, 1, HIDDEN))

    def forward(self, ids):
        h0 = self.h0.expand(-1, ids.shape[0], -1).contiguous()
        out, _ = self.rnn(self.emb(ids), (h0, h0))
        return self.fc(out[:, -1])


def test_zero_initial_states_are_followed():
    model = randomised(Started(), 0)
    spec, _ = cb.derive_symmetries(model, IDS)
    assert spec.axes_to_perm["fc.weight"][1] == spec.axes_to_perm["rnn.weight_hh_l1"][1] is not None


@pytest.mark.parametrize("cls,message", [(Stacked, "final states of one layer"), (Projected, "without projections"),
                                         (LearnedStart, "initial states made from features or parameters")])
def test_unfollowed_recurrent_uses_are_refused_by_name(cls, message):
    with pytest.raises(TracingError, match=message):
        cb.derive_symmetries(cls().eval(), IDS)


class BiLSTM(nn.Module):
    """A bidirectional two-layer LSTM: each layer reads both directions' units of the one below, packed;
    the classifier reads the mean of the output sequence, or both last final states concatenated."""

    def __init__(self, use: str = "output") -> None:
        super().__init__()
        self.use, self.emb = use, nn.Embedding(VOCAB, EMB)
        self.rnn = nn.LSTM(EMB, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, ids):
        out, (h, _) = self.rnn(self.emb(ids))
        return self.fc(out.mean(dim=1) if self.use == "output" else torch.cat((h[-2], h[-1]), dim=1))


@pytest.mark.parametrize("use", ["output", "state"])
def test_a_bidirectional_lstm_packs_both_directions_and_keeps_the_function(use):
    model = randomised(BiLSTM(use), 0)
    spec, _ = cb.derive_symmetries(model, IDS)
    axes = spec.axes_to_perm
    below = ("rnn.hidden_l0", "rnn.hidden_l0_reverse")
    assert axes["rnn.weight_ih_l1"] == (Repeat("rnn.hidden_l1", 4, interleaved=True), below)
    assert axes["rnn.weight_ih_l1_reverse"] == (Repeat("rnn.hidden_l1_reverse", 4, interleaved=True), below)
    assert axes["rnn.weight_hh_l0_reverse"][1] == "rnn.hidden_l0_reverse"
    assert axes["fc.weight"] == (None, ("rnn.hidden_l1", "rnn.hidden_l1_reverse"))
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert_random_transformation_undone(model, spec, state, IDS, "rnn.weight_ih_l1_reverse", seed=5)


class TwoBranches(nn.Module):
    """Token features from two branches joined along the features, normalised, pooled and read by a layer."""

    def __init__(self, join: str = "linear") -> None:
        super().__init__()
        self.join, self.emb = join, nn.Embedding(VOCAB, EMB)
        self.a, self.b = nn.Linear(EMB, 6), nn.Linear(EMB, 5)
        self.norm, self.fc, self.out = nn.LayerNorm(11), nn.Linear(11, 7), nn.Linear(7, CLASSES)

    def forward(self, ids):
        x = self.emb(ids)
        h = self.norm(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))
        if self.join == "cumsum":
            h = torch.cumsum(h, dim=-1)
        return self.out(F.relu(self.fc(h.mean(dim=1))))


def test_features_joined_along_the_last_axis_are_packed_segments():
    model = randomised(TwoBranches(), 0)
    spec, _ = cb.derive_symmetries(model, IDS)
    axes = spec.axes_to_perm
    assert axes["norm.weight"] == (("P_a", "P_b"),) and axes["fc.weight"] == ("P_fc", ("P_a", "P_b"))
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    moved = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=1), state)
    np.testing.assert_allclose(float64_outputs(model, moved, IDS), float64_outputs(model, state, IDS), atol=1e-9)
    with pytest.raises(TracingError, match="on packed features"):
        cb.derive_symmetries(TwoBranches("cumsum").eval(), IDS)


class WordLanguageModel(nn.Module):
    """PyTorch's word_language_model example (LSTM): time-major ids, ``forward(input, hidden)`` returning
    log-probabilities and the new hidden state, ``init_hidden`` made with ``weight.new_zeros``."""

    def __init__(self, ntoken: int = VOCAB, ninp: int = EMB, nhid: int = HIDDEN, nlayers: int = 2) -> None:
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop, self.encoder = nn.Dropout(0.5), nn.Embedding(ntoken, ninp)
        self.rnn, self.decoder = nn.LSTM(ninp, nhid, nlayers, dropout=0.5), nn.Linear(nhid, ntoken)

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid)


class BatchMajorLanguageModel(WordLanguageModel):
    """The example wrapped as the library calls a model: ``model(x)`` on ``(batch, time)`` ids, the
    log-probabilities of every position returned batch-major, from a zero initial state."""

    def forward(self, ids):
        t, n = ids.shape[1], ids.shape[0]
        logp, _ = super().forward(ids.t(), self.init_hidden(n))
        return logp.view(t, n, self.ntoken).transpose(0, 1)


def test_a_forward_that_needs_a_hidden_state_is_refused_saying_what_to_do():
    with pytest.raises(TracingError, match=r"forward requires 'hidden' besides its input.*wrap the model"):
        cb.derive_symmetries(WordLanguageModel().eval(), IDS)


def test_the_word_language_model_wrapped_is_traced_and_sweeps_as_torch_scores_it():
    models = [randomised(BatchMajorLanguageModel(), s) for s in (1, 2)]
    spec, _ = cb.derive_symmetries(models[0], IDS)
    assert spec.axes_to_perm["decoder.weight"] == (None, "P_rnn")  # the log-softmax keeps the vocabulary in place
    targets = torch.randint(0, VOCAB, IDS.shape, generator=torch.Generator().manual_seed(8))
    pair = cb.ModelPair(*models, example_input=IDS).align("weight")
    ds = cb.sweep(pair, cb.Linear(), data=(IDS.numpy(), targets.numpy()), values=[0.0, 1.0], splits=["test"])
    with torch.no_grad():
        for m, lam in zip(models, (0.0, 1.0), strict=True):
            want = F.nll_loss(m(IDS).reshape(-1, VOCAB), targets.reshape(-1)).item()
            assert float(ds["loss"].sel(split="test", lam=lam).isel(sample=0)) == pytest.approx(want, rel=1e-5)


# -- flax: nn.RNN over a cell (a scan, its body traced once) ---------------------------------------------------
def _flax_text_rnn(cell: str, layers: int):
    fnn = pytest.importorskip("flax.linen")

    class FlaxTextRNN(fnn.Module):
        @fnn.compact
        def __call__(self, ids):
            h = fnn.Embed(VOCAB, EMB)(ids)
            for _ in range(layers):
                h = fnn.RNN(getattr(fnn, cell)(HIDDEN))(h)
            return fnn.Dense(CLASSES)(h[:, -1])

    return FlaxTextRNN()


@pytest.mark.parametrize("cell,layers", [("LSTMCell", 1), ("GRUCell", 2), ("SimpleCell", 1)])
def test_a_flax_recurrent_net_is_traced_and_a_planted_transformation_undone(cell, layers):
    from flax import traverse_util

    from tests.model_checks import flax_variables

    net = _flax_text_rnn(cell, layers)
    ids = IDS.numpy().astype(np.int32)
    variables = flax_variables(net, ids, 0)
    spec, _ = cb.derive_symmetries((net, variables), ids)  # verified: a random transformation keeps the outputs
    state = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    hidden = spec.axes_to_perm["params/Dense_0/kernel"][0]
    assert hidden is not None and spec.axes_to_perm["params/Dense_0/kernel"][1] is None
    recurrent = [k for k in state if k.startswith(f"params/{cell}_{layers - 1}/h") and k.endswith("kernel")]
    assert recurrent and all(spec.axes_to_perm[k] == (hidden, hidden) for k in recurrent)
    moved = traverse_util.unflatten_dict(cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3),
                                                              state), sep="/")
    np.testing.assert_allclose(np.asarray(net.apply(moved, ids)), np.asarray(net.apply(variables, ids)), rtol=1e-4,
                               atol=1e-5)
    aligned = cb.ModelPair((net, variables), (net, moved), example_input=ids).align("weight")
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)
