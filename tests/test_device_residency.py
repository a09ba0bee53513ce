"""What crosses from the device to the host during a sweep, an evaluation and weight matching (torch).

On a GPU every tensor read on the host is a synchronisation and a copy. These tests run on
the CPU, where such reads cost nothing, so they count them instead: every ``Tensor.numpy()``,
``.item()``, ``.tolist()``, ``.cpu()``, ``float(tensor)`` and ``numpy.asarray(tensor)``
made while the library works, recorded by a :class:`torch.overrides.TorchFunctionMode`
(``tensor.to(device)`` is not counted: on the CPU it cannot tell a read from a move).
The issue's rule: draws, combinations and evaluations stay on the device, with no host
round-trip per batch. So the reads must not grow with the number of batches, and none may
be of a parameter-sized tensor (a coefficient vector or a combined model). Weight matching
on a device brings back each assembled cost matrix for its assignment, and nothing else.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

import combinability as cb
from combinability.data import load_dataset

torch = pytest.importorskip("torch")
from torch.overrides import TorchFunctionMode  # noqa: E402

#: Tensor methods that read a tensor's values on the host.
HOST_READS = {"numpy", "item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__"}


class HostReads(TorchFunctionMode):
    """Records the shape of every tensor read on the host (see :data:`HOST_READS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.shapes.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))

    def count(self) -> collections.Counter:
        return collections.Counter(name for name, _ in self.shapes)


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("digits", "test").subset(320)


def _sweep(pair, data, batch_size: int, samples: int = 3) -> HostReads:
    reads = HostReads()
    with reads:
        cb.sweep(pair, cb.Uniform(), data={"test": data}, splits=["test"], values=[0.25, 0.5],
                 samples=samples, seed=0, batch_size=batch_size)
    return reads


def test_a_sweep_reads_the_host_per_model_not_per_batch(digits_pair, test_split):
    one_batch = _sweep(digits_pair, test_split, batch_size=320)
    ten_batches = _sweep(digits_pair, test_split, batch_size=32)
    assert one_batch.shapes, "the recorder saw no host read at all: it is not hooked in"
    assert ten_batches.count() == one_batch.count()  # not one more read for nine more batches
    d = digits_pair.layout.size
    large = [s for s in one_batch.shapes + ten_batches.shapes if int(np.prod(s[1])) >= d]
    assert not large, f"parameter-sized tensors read on the host during a sweep: {large}"


def test_more_draws_add_a_fixed_number_of_reads_each(digits_pair, test_split):
    few = len(_sweep(digits_pair, test_split, batch_size=64, samples=2).shapes)
    more = len(_sweep(digits_pair, test_split, batch_size=64, samples=4).shapes)
    most = len(_sweep(digits_pair, test_split, batch_size=64, samples=6).shapes)
    assert more - few == most - more > 0  # the same reads for every evaluated model: its results


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_evaluating_several_vectors_reads_per_chunk_not_per_batch(digits_pair, test_split, vectorize):
    from combinability_torch.backend import TorchBackend

    from combinability.evaluation import Evaluator

    backend = TorchBackend("cpu", vectorize=vectorize)
    model = digits_pair.models[0]
    thetas = torch.stack([torch.tensor(digits_pair.theta_a), torch.tensor(digits_pair.theta_b)] * 2)
    counts = []
    for batch_size in (320, 40):
        evaluator = Evaluator(backend, model, digits_pair.layout, batch_size=batch_size, vectors=4)
        reads = HostReads()
        with reads:
            results = evaluator.evaluate(thetas, test_split)
        counts.append(reads.count())
        d = digits_pair.layout.size
        assert not [s for s in reads.shapes if int(np.prod(s[1])) >= d]
        assert results[0].loss == pytest.approx(results[2].loss, rel=1e-6)  # the same vector twice
    assert counts[0] == counts[1]


def test_matching_on_a_device_brings_back_only_the_cost_matrices(digits_pair):
    spec = digits_pair.spec
    a, b = digits_pair.params(0), digits_pair.params(1)
    sizes = set(spec.perm_sizes(a).values())
    reads = HostReads()
    with reads:
        found = cb.weight_matching(spec, a, b, seed=0, backend="torch")
    assert reads.shapes
    for name, shape in reads.shapes:
        assert len(shape) == 2 and shape[0] == shape[1] and shape[0] in sizes, (name, shape)
    on_host = cb.weight_matching(spec, a, b, seed=0)
    assert set(found) == set(on_host)
    for p in found:
        np.testing.assert_array_equal(found[p], on_host[p])


@pytest.fixture(scope="module")
def jax_pair():
    pytest.importorskip("jax")
    a, b = (cb.train("mlp", "digits", backend="jax", seed=s, epochs=1, width=0.25) for s in (0, 1))
    return cb.ModelPair(a, b, backend="jax")


def test_a_jax_sweep_reads_the_host_per_model_not_per_batch(jax_pair, test_split, monkeypatch):
    """The same rule on jax: its host reads (``jax.device_get``, ``float``, ``.item()``, ``.tolist()``)
    all go through an array's ``_value``, which the test records (``numpy.asarray`` of a jax array
    does not, and is not seen)."""
    import jax.numpy as jnp

    array_type = type(jnp.zeros(1))
    value = array_type.__dict__["_value"]
    shapes: list[tuple[int, ...]] = []
    monkeypatch.setattr(array_type, "_value", property(lambda self: (shapes.append(tuple(self.shape)),
                                                                     value.__get__(self))[1]))

    def reads(batch_size: int) -> list[tuple[int, ...]]:
        shapes.clear()
        cb.sweep(jax_pair, cb.Uniform(), data={"test": test_split}, splits=["test"], values=[0.25, 0.5],
                 samples=3, seed=0, batch_size=batch_size)
        return list(shapes)

    one_batch, ten_batches = reads(320), reads(32)
    assert one_batch, "the recorder saw no host read at all: it is not hooked in"
    assert len(ten_batches) == len(one_batch)
    d = jax_pair.layout.size
    assert not [s for s in one_batch + ten_batches if int(np.prod(s)) >= d]
