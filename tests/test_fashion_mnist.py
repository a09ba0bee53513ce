"""Real data, real models: two MLPs on Fashion-MNIST, their naive and weight-matched midpoints."""

import pytest

import combinability as cb
from combinability.results import barriers


def _available() -> bool:
    try:
        cb.load_dataset("fashion_mnist", "test")
    except cb.DatasetNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _available(), reason="Fashion-MNIST files not found "
                                                         "(apt-get install dataset-fashion-mnist)")


def test_two_mlps_reach_85_percent_and_align_to_a_low_barrier():
    models = [cb.train("mlp", "fashion_mnist", seed=s, epochs=2) for s in (0, 1)]
    pair = cb.ModelPair(*models).align("weight", seed=0)
    kw = dict(data="fashion_mnist", splits=["test"], values=[0.0, 0.5, 1.0])
    naive = cb.sweep(pair.naive, cb.Linear(), **kw)
    aligned = cb.sweep(pair, cb.Linear(), **kw)
    acc_a = float(naive["accuracy_a"].sel(split="test"))
    acc_b = float(naive["accuracy_b"].sel(split="test"))
    assert acc_a >= 0.85 and acc_b >= 0.85, (acc_a, acc_b)
    naive_barrier = float(barriers(naive)["loss_barrier"].sel(split="test"))
    aligned_barrier = float(barriers(aligned)["loss_barrier"].sel(split="test"))
    print(f"accuracy A {acc_a:.4f}, B {acc_b:.4f}; midpoint loss barrier naive {naive_barrier:.4f}, "
          f"aligned {aligned_barrier:.4f}")
    assert aligned_barrier < 0.5 * naive_barrier
