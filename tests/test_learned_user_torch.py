"""Learned aligners (STE, Sinkhorn, learned maps) on torch models a user writes, against references written here.

The references: B's state dict permuted by hand (``np.take`` along each axis the spec names) and
run in float64 computes B's function; the loss an aligner reports (its ``history``) is the
inference-mode midpoint loss formed in numpy and run through the user's own module, with
``F.cross_entropy(..., ignore_index=-100)``; a seed fixes the result, dropout included; a run
resumed from its ``state=`` file gives the uninterrupted run's result.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
sklearn_datasets = pytest.importorskip("sklearn.datasets")

import combinability as cb  # noqa: E402

N = 240


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = sklearn_datasets.load_digits()
    idx = np.random.default_rng(0).permutation(len(d.target))[:N]
    return (d.data[idx] / 16.0).astype(np.float32), d.target[idx].astype(np.int64)


def _fit(make, x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 2, lr: float = 1e-2) -> nn.Module:
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.tensor(x), torch.tensor(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed)).split(32):
            opt.zero_grad()
            out = model(xt[idx])
            F.cross_entropy(out.reshape(-1, out.shape[-1]), yt[idx].reshape(-1), ignore_index=-100).backward()
            opt.step()
    return model.eval()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def _by_hand(spec, perm, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state`` with every axis the spec names taken in the permutation's order (float64)."""
    out = {}
    for name, value in state.items():
        arr = np.asarray(value, np.float64)
        for axis, p in enumerate(spec.axes_to_perm.get(name, ())):
            if p is not None:
                arr = np.take(arr, np.asarray(perm[p]), axis=axis)
        out[name] = arr
    return out


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def _run(model: nn.Module, state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The user's module holding ``state``, in float64 and eval mode."""
    m = copy.deepcopy(model).double().eval()
    own = m.state_dict()
    m.load_state_dict({k: torch.tensor(state[k]).to(own[k].dtype) for k in own})
    with torch.no_grad():
        return m(torch.tensor(x).double() if x.dtype.kind == "f" else torch.tensor(x)).numpy()


def _loss(logits: np.ndarray, y: np.ndarray) -> float:
    return float(F.cross_entropy(torch.tensor(logits).reshape(-1, logits.shape[-1]), torch.tensor(y).reshape(-1),
                                 ignore_index=-100))


def _midpoint(sa: dict[str, np.ndarray], sb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (sa[k] + sb[k]) / 2 if "num_batches" not in k else sa[k] for k in sa}


@pytest.fixture(scope="module")
def bn_pair(digits):
    x, y = digits
    return _fit(_mlp, x, y, 0), _fit(_mlp, x, y, 1)


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_symmetry_and_reported_midpoint_loss(bn_pair, digits, method):
    """B permuted by hand computes B's function; the reported loss is the eval-mode midpoint loss computed here,
    although the data (101 examples in batches of 50) ends in a batch of one, which BatchNorm cannot train on."""
    a, b = bn_pair
    x, y = digits[0][:101], digits[1][:101]
    pair = cb.ModelPair(a, b, example_input=x[:8]).align(method, data=(x, y), epochs=2, batch_size=50,
                                                         eval_examples=101, seed=0)
    perm = pair.permutation
    sa, sb = _state(a), _state(b)
    hand = _by_hand(pair.spec, perm, sb)
    np.testing.assert_allclose(_run(b, hand, digits[0]), _run(b, sb, digits[0]), atol=1e-12)
    own = _loss(_run(a, _midpoint(sa, hand), x), y)
    assert perm.objective == pytest.approx(own, rel=1e-5)
    assert min(perm.history) == perm.objective and len(perm.history) == 3


def test_a_seed_fixes_the_result_with_dropout(bn_pair, digits):
    a, b = bn_pair
    x, y = digits
    torch.manual_seed(123)
    runs = []
    for _ in range(2):
        pair = cb.ModelPair(a, b, example_input=x[:8]).align("ste", data=(x, y), epochs=2, batch_size=40, lr=0.05,
                                                             seed=3)
        runs.append(pair.permutation)
        torch.rand(7)  # the global RNG moves between the runs
    assert runs[0].history == runs[1].history
    for p in runs[0]:
        np.testing.assert_array_equal(runs[0][p], runs[1][p])


def test_a_planted_permutation_is_undone(bn_pair, digits):
    a = bn_pair[0]
    x, y = digits
    pair = cb.ModelPair(a, a, example_input=x[:8])
    rng = np.random.default_rng(5)
    planted = {p: rng.permutation(n) for p, n in pair.spec.perm_sizes(pair.params(0)).items()}
    sa = _state(a)
    shuffled = copy.deepcopy(a)
    shuffled.load_state_dict({k: torch.tensor(v).to(shuffled.state_dict()[k].dtype)
                              for k, v in _by_hand(pair.spec, planted, sa).items()})
    shuffled_pair = cb.ModelPair(a, shuffled, example_input=x[:8])
    for method, init in (("ste", "identity"), ("sinkhorn", "weight")):
        got = shuffled_pair.align(method, data=(x, y), epochs=1, init=init, seed=0).permutation
        for p, idx in planted.items():
            np.testing.assert_array_equal(np.asarray(idx)[got[p]], np.arange(len(idx)))
        assert got.objective == pytest.approx(_loss(_run(a, sa, x), y), rel=1e-5)  # the midpoint is A itself
    # Sinkhorn from the identity, softly started, moves towards it (most units, not all, in so few steps)
    soft = shuffled_pair.align("sinkhorn", data=(x, y), epochs=1, init="identity", init_scale=1.0, seed=0).permutation
    assert soft.history[-1] < soft.history[0] - 0.1


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_a_resumed_run_gives_the_uninterrupted_result(bn_pair, digits, tmp_path, monkeypatch, method):
    a, b = bn_pair
    x, y = digits
    pair = cb.ModelPair(a, b, example_input=x[:8])
    kw = {"data": (x, y), "batch_size": 40, "seed": 1, **({"lr": 0.05} if method == "ste" else {})}
    whole = pair.align(method, epochs=2, **kw).permutation
    path = tmp_path / "state.npz"
    pair.align(method, epochs=1, state=path, **kw)  # one epoch, then continued to two
    assert pair.align(method, epochs=2, state=path, **kw).permutation.history == whole.history
    # stopped by Ctrl-C in the middle of the second epoch, then run again
    path.unlink()
    import combinability.align.ste as ste_module

    real, calls = ste_module._Run.step, []

    def stopping(self, *args):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(ste_module._Run, "step", stopping)
    with pytest.raises(KeyboardInterrupt):
        pair.align(method, epochs=2, state=path, **kw)
    monkeypatch.setattr(ste_module._Run, "step", real)
    again = pair.align(method, epochs=2, state=path, **kw).permutation
    assert again.history == whole.history
    for p in whole:
        np.testing.assert_array_equal(again[p], whole[p])


# -- a transformer encoder classifier and a causal language model --------------------------------------------
V, T = 11, 6


class _Encoder(nn.Module):
    def __init__(self, classes: int, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.emb, self.pos = nn.Embedding(V, 16), nn.Parameter(torch.randn(T, 16) * 0.1)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, classes)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))
        return self.head(self.norm(self.encoder(h).mean(1)))


def _tokens(causal: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(1, V, (96, T)).astype(np.int64)
    if not causal:
        return x, (x[:, 0] + x[:, 1]) % 4
    y = np.roll(x, -1, axis=1)
    for i, length in enumerate(rng.integers(2, T + 1, len(x))):  # right padding, its targets not scored
        x[i, length:] = 0
        y[i, length - 1 :] = -100
    return x, y


@pytest.mark.parametrize("causal", [False, True])
def test_transformers_learned_maps_and_ste(causal, tmp_path):
    x, y = _tokens(causal)
    classes = V if causal else 4
    a, b = (_fit(lambda: _Encoder(classes, causal), x, y, s, lr=3e-3) for s in (0, 1))
    pair = cb.ModelPair(a, b, example_input=x[:8])
    kw = {"data": (x, y), "epochs": 2, "batch_size": 32, "seed": 0, "lr": 0.01}
    for method in ("maps", "ste"):
        got = pair.align(method, **kw)
        sa, sb = _state(got.model_a), _state(got.model_b)  # (norms folded: same functions)
        np.testing.assert_allclose(_run(b, sb, x), _run(b, _state(b), x), atol=2e-5)
        assert got.permutation.objective == pytest.approx(_loss(_run(a, _midpoint(sa, sb), x), y), rel=1e-5)
    path = tmp_path / "maps.npz"
    whole = pair.align("maps", **kw).permutation
    pair.align("maps", state=path, **{**kw, "epochs": 1})
    assert pair.align("maps", state=path, **kw).permutation.history == whole.history
    bad = y.copy()
    bad.reshape(len(bad), -1)[-1, 0] = classes  # outside the logits' classes, far from the checked examples
    with pytest.raises(cb.DatasetError, match=f"outside \\[0, {classes}\\)"):
        pair.align("ste", data=(x, bad), epochs=1)


def test_bad_input_is_refused_before_training(bn_pair, digits, monkeypatch):
    a, b = bn_pair
    x, y = digits
    monkeypatch.setattr("combinability.align.ste.learn", lambda *args, **kw: pytest.fail("trained"))
    pair = cb.ModelPair(a, b, example_input=x[:8])
    with pytest.raises(cb.ConfigurationError, match="learns from data"):
        pair.align("sinkhorn")
    with pytest.raises(cb.DatasetError, match="shape"):
        pair.align("ste", data=(x[:, :32], y))
    with pytest.raises(cb.DatasetError, match="outside"):
        pair.align("sinkhorn", data=(x, np.where(np.arange(len(y)) == 200, 10, y)))
    with pytest.raises(cb.ConfigurationError, match="combines 3 models"):
        pair.align("ste", data=(x, y), sampler=cb.Triangle())
    with pytest.raises(cb.ConfigurationError, match="model_c="):
        cb.ModelPair(a, b, a, example_input=x[:8])
