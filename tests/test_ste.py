"""STE learned matching: planted permutations, the sampler option, bad input, resuming from a state file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

import combinability as cb
from combinability.align import AlignTask, align
from combinability.align.ste import LearningContext, ste
from combinability.permutation import apply_permutation, random_permutation
from tests.reference_nets import numpy_evaluation


def _planted(model, seed=3):
    """``model`` with its hidden units shuffled by a random permutation; returns (shuffled, undoing permutation)."""
    be = cb.get_backend("torch")
    pair = cb.ModelPair(model, model)
    perm = random_permutation(pair.spec, pair.params(0), seed=seed)
    shuffled = be.with_state(model, {**be.state(model), **apply_permutation(pair.spec, perm, pair.params(0))})
    return shuffled, {p: np.argsort(v) for p, v in perm.items()}


def test_ste_recovers_a_planted_permutation_from_the_identity(digits_models):
    a = digits_models[0]
    b, truth = _planted(a)
    pair = cb.ModelPair(a, b).align("ste", data="digits", epochs=1, init="identity", seed=0)
    for p, idx in truth.items():
        np.testing.assert_array_equal(pair.permutation[p], idx)
    np.testing.assert_array_equal(pair.theta_b, pair.theta_a)
    assert pair.permutation.method == "ste" and len(pair.permutation.history) == 2


def test_ste_lowers_the_midpoint_loss_of_weight_matching(digits_models):
    a, b, _ = digits_models
    train = cb.load_dataset("digits", "train")
    weight = cb.ModelPair(a, b).align("weight", seed=0)
    learned = cb.ModelPair(a, b).align("ste", data="digits", epochs=3, seed=0)
    mid = [numpy_evaluation(p.layout, (p.theta_a + p.theta_b) / 2, train)[0] for p in (weight, learned)]
    assert mid[1] < mid[0] - 0.005, mid
    # the learned B still computes B's function
    loss_b = numpy_evaluation(weight.layout, weight.naive.theta_b, train)[0]
    assert numpy_evaluation(learned.layout, learned.theta_b, train)[0] == pytest.approx(loss_b, rel=1e-6)


def test_the_sampler_decides_which_combinations_are_trained(digits_models):
    """With v = 0 (model A alone) the loss does not depend on B: nothing moves, and the objective is A's loss."""
    a, b, _ = digits_models
    train = cb.load_dataset("digits", "train")
    pair = cb.ModelPair(a, b).align("ste", data=train, epochs=2, seed=0, sampler=cb.Linear(lam=0.0),
                                    eval_examples=len(train))
    loss_a = numpy_evaluation(pair.layout, pair.theta_a, train)[0]
    np.testing.assert_allclose(pair.permutation.history, [loss_a] * 3, rtol=1e-5)
    weight = cb.ModelPair(a, b).align("weight", seed=0)
    for p in weight.permutation:
        np.testing.assert_array_equal(pair.permutation[p], weight.permutation[p])
    # an element-wise sampler by name trains too
    uni = cb.ModelPair(a, b).align("ste", data="digits", epochs=1, seed=0, sampler="uniform", eval_examples=200)
    assert uni.permutation.method == "ste" and np.isfinite(uni.permutation.objective)


def test_bad_input_is_refused_before_training(digits_models, monkeypatch):
    a, b, _ = digits_models
    pair = cb.ModelPair(a, b)
    train = cb.load_dataset("digits", "train")
    calls = []
    monkeypatch.setattr("combinability.align.ste.learn", lambda *args, **kw: calls.append(1))
    with pytest.raises(cb.ConfigurationError, match="'ste' learns from data: pass data="):
        pair.align("ste")
    with pytest.raises(cb.DatasetError, match="shape"):
        pair.align("ste", data=(np.zeros((10, 5), np.float32), np.zeros(10, np.int64)))
    with pytest.raises(cb.DatasetError, match="outside"):
        pair.align("ste", data=(train.x[:10], np.full(10, 12)))
    with pytest.raises(cb.ConfigurationError, match="Triangle sampler combines 3 models"):
        pair.align("ste", data="digits", sampler=cb.Triangle())
    with pytest.raises(cb.ConfigurationError, match="epochs must be an integer >= 1"):
        pair.align("ste", data="digits", epochs=0)
    with pytest.raises(cb.ConfigurationError, match="lr must be a positive number"):
        pair.align("ste", data="digits", lr=-1.0)
    with pytest.raises(cb.ConfigurationError, match="trains through the models"):
        align("ste", AlignTask(pair.spec, pair.params(0), pair.params(1)))
    assert not calls


def test_a_backend_without_gradients_is_refused(digits_models):
    a, b, _ = digits_models
    pair = cb.ModelPair(a, b)
    torch_be = pair.backend_obj

    class NoGrad:
        def __init__(self, inner):
            self.inner = inner

        def forward(self, flats, x):
            return self.inner.forward(flats, x)

    class Backend:
        name = "nograd"

        def __getattr__(self, item):
            return getattr(torch_be, item)

        def prepare(self, model, layout):
            return NoGrad(torch_be.prepare(model, layout))

    ctx = LearningContext(Backend(), a, pair.layout, "digits")
    with pytest.raises(cb.ConfigurationError, match="needs gradients, but the 'nograd' backend gives none"):
        ste(AlignTask(pair.spec, pair.params(0), pair.params(1)), context=ctx)


@dataclass(frozen=True)
class _Interrupting(cb.Linear):
    """Linear, but Ctrl-C at the given draw (the training loop draws once per step)."""

    calls: ClassVar[list[int]] = []
    stop_at: ClassVar[int] = 10**9

    def _draw(self, value, ctx):
        type(self).calls.append(1)
        if len(type(self).calls) == type(self).stop_at:
            raise KeyboardInterrupt
        return super()._draw(value, ctx)


def test_an_interrupted_run_resumes_from_its_state_file(digits_models, tmp_path):
    a, b, _ = digits_models
    pair = cb.ModelPair(a, b)
    options = dict(data="digits", epochs=2, seed=0, eval_examples=300, lr=3e-3)
    whole = pair.align("ste", sampler=cb.Linear(lam=0.5), **options)
    state = tmp_path / "ste.npz"
    _Interrupting.calls.clear()
    steps = -(-len(cb.load_dataset("digits", "train")) // 100)
    _Interrupting.stop_at = 1 + steps + 1 + 5  # the start's evaluation, epoch 1, its evaluation, step 5
    with pytest.raises(KeyboardInterrupt):
        pair.align("ste", sampler=_Interrupting(lam=0.5), state=state, **options)
    with np.load(state) as saved:
        assert saved["position"].tolist() == [1, 4]  # in epoch 2, 4 steps had finished
    _Interrupting.stop_at = 10**9
    _Interrupting.calls.clear()
    resumed = pair.align("ste", sampler=_Interrupting(lam=0.5), state=state, **options)
    assert len(_Interrupting.calls) == steps - 4 + 1  # only the rest of epoch 2, and its evaluation
    assert resumed.permutation.history == pytest.approx(whole.permutation.history, rel=1e-6)
    for p in whole.permutation:
        np.testing.assert_array_equal(resumed.permutation[p], whole.permutation[p])
    # a state file of another run is refused, naming what differs
    with pytest.raises(cb.ConfigurationError, match=r"another run \(it differs in: settings\)"):
        pair.align("ste", sampler=cb.Linear(lam=0.5), state=state, **{**options, "lr": 1e-2})
    (tmp_path / "bad.npz").write_bytes(b"not a state file")
    with pytest.raises(cb.CorruptFileError, match="cannot read the alignment state file"):
        pair.align("ste", state=tmp_path / "bad.npz", **options)
