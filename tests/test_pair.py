"""ModelPair: alignment methods by name, functional invariance of π(B), triples."""

import numpy as np
import pytest

import combinability as cb
from combinability.results import barriers


def _test_eval(pair, which):
    from combinability.evaluation import Evaluation
    from tests.reference_nets import numpy_evaluation

    data = cb.load_dataset("digits", "test")
    theta = {"a": pair.theta_a, "b": pair.theta_b, "c": pair.theta_c}[which]
    loss, acc = numpy_evaluation(pair.layout, theta, data)
    return Evaluation(loss, acc, np.zeros(0))


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_alignment_keeps_b_functionally_identical_and_lowers_the_barrier(digits_pair, method):
    naive = digits_pair.naive
    aligned = naive.align(method, seed=0, data="digits")
    assert aligned.permutation.method == method
    assert aligned.is_aligned and aligned.naive is naive
    assert not np.array_equal(aligned.theta_b, naive.theta_b)
    np.testing.assert_array_equal(_test_eval(aligned, "b").predictions, _test_eval(naive, "b").predictions)
    kw = dict(data="digits", splits=["test"], values=[0.5])
    assert (float(barriers(cb.sweep(aligned, cb.Linear(), **kw))["loss_barrier"].sel(split="test"))
            < float(barriers(cb.sweep(naive, cb.Linear(), **kw))["loss_barrier"].sel(split="test")))


def test_weight_and_activation_matching_mostly_agree(digits_pair):
    by_weight = digits_pair.naive.align("weight", seed=0)
    by_activation = digits_pair.naive.align("activation", data="digits")
    agree = np.mean([np.mean(by_weight.permutation[p] == by_activation.permutation[p])
                     for p in by_weight.permutation])
    assert agree > 5 / 128  # far above chance (1/128): the two methods find related matchings


def test_identity_alignment_is_a_no_op(digits_pair):
    same = digits_pair.naive.align("identity")
    np.testing.assert_array_equal(same.theta_b, digits_pair.naive.theta_b)


def test_triple_aligns_c_with_its_own_permutation(digits_triple):
    assert digits_triple.permutation_c is not None
    np.testing.assert_array_equal(_test_eval(digits_triple, "c").predictions,
                                  _test_eval(digits_triple.naive, "c").predictions)
    assert "ModelPair(architecture='mlp'" in repr(digits_triple) and "models=3" in repr(digits_triple)


def test_params_and_models_round_trip(digits_pair):
    be = digits_pair.backend_obj
    model_b = digits_pair.model("b")  # aligned B as a native model
    for name, value in digits_pair.params("b").items():
        np.testing.assert_array_equal(be.state(model_b)[name], value)
    with pytest.raises(cb.UnknownNameError, match="no model 'c'"):
        digits_pair.params("c")
