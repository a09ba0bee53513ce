"""A forward pass that runs out of memory is retried on half as many examples, and the scores are the same.

The model raises the error torch raises (``torch.OutOfMemoryError``, or its CPU allocator's failure)
from a forward hook whenever a call takes more than a few examples. References: torch's own
cross-entropy and accuracy of the model on the whole data, and the permutation activation matching
finds on the same model without the limit.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.evaluation import out_of_memory

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

LIMIT = 16  # examples a forward call may take


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


def _limited(model: nn.Module, error: type[Exception] = torch.OutOfMemoryError) -> nn.Module:
    """``model``, whose first layer raises ``error`` as torch words it for calls of more than LIMIT examples."""

    def hook(module, inputs, output):
        if inputs[0].shape[0] > LIMIT:
            if error is torch.OutOfMemoryError:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 4000000000000 bytes. Error code 12")

    model[0].register_forward_hook(hook)
    return model


def _data(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    test = cb.load_dataset("digits", "test")
    return test.x[:n].reshape(n, -1), test.y[:n]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_a_sweep_whose_batches_run_out_of_memory_scores_as_torch_does(error):
    a, b = _limited(_mlp(0), error), _limited(_mlp(1), error)
    x, y = _data()
    pair = cb.ModelPair(a, b, example_input=torch.tensor(x[:4]))
    with pytest.warns(cb.SmallerBatchWarning, match="ran out of memory") as record:
        ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0], splits=["test"], batch_size=64)
    assert [str(w.message).split("evaluating ")[1][:14] for w in record] == ["32 at a time f", "16 at a time f"]
    with torch.no_grad():
        for model, lam in zip((a, b), (0.0, 1.0), strict=True):
            logits = torch.cat([model(torch.tensor(x[s : s + LIMIT])) for s in range(0, len(x), LIMIT)])
            cell = ds.sel(split="test", lam=lam).isel(sample=0)
            assert float(cell["loss"]) == pytest.approx(F.cross_entropy(logits, torch.tensor(y)).item(), rel=1e-5)
            assert float(cell["accuracy"]) == pytest.approx((logits.argmax(1).numpy() == y).mean())


def test_activation_matching_reads_its_features_in_smaller_batches():
    """B is A with its hidden units permuted by hand: matching must undo the planted permutation."""
    x, y = _data(200)
    a, b = _mlp(0), _mlp(0)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, j in ((0, 2), (2, 4)):
            p = torch.tensor(rng.permutation(32))
            b[i].weight.copy_(b[i].weight[p])
            b[i].bias.copy_(b[i].bias[p])
            b[j].weight.copy_(b[j].weight[:, p])
    pair = cb.ModelPair(_limited(a), _limited(b), example_input=torch.tensor(x[:4]))
    assert not np.allclose(pair.theta_b, pair.theta_a)
    with pytest.warns(cb.SmallerBatchWarning):
        aligned = pair.align("activation", data=(x, y), batch_size=100)
    np.testing.assert_allclose(aligned.theta_b, aligned.theta_a, atol=1e-6)


def test_a_model_that_cannot_take_one_example_raises_its_own_error():
    a = _mlp(0)

    def hook(module, inputs, output):
        if inputs[0].shape[0] != 3:  # but the example input's 3, while tracing
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    a[0].register_forward_hook(hook)
    x, y = _data(20)
    pair = cb.ModelPair(a, _mlp(1), example_input=torch.tensor(x[:3]))
    with pytest.raises(torch.OutOfMemoryError, match="80.00 GiB"), pytest.warns(cb.SmallerBatchWarning):
        cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0], splits=["test"], batch_size=8)


def test_which_errors_are_out_of_memory():
    assert out_of_memory(MemoryError())
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 bytes"))
    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB."))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x5)"))
    assert not out_of_memory(ValueError("out of memory"))  # not an error frameworks raise for it


def test_a_flax_models_batches_run_out_of_memory_as_xla_says_it():
    pytest.importorskip("flax")
    import flax.linen as fnn
    import jax

    class Limited(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            if x.shape[0] > LIMIT:  # shapes are static under jit: XLA's words for an allocation that failed
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4000000000000 bytes.")
            return fnn.Dense(10)(fnn.tanh(fnn.Dense(32)(x)))

    x, y = _data()
    net = Limited()
    variables = [net.init(jax.random.PRNGKey(s), x[:4]) for s in (0, 1)]
    pair = cb.ModelPair(*((net, v) for v in variables), example_input=x[:4])
    with pytest.warns(cb.SmallerBatchWarning, match="JaxRuntimeError"):
        ds = cb.sweep(pair, cb.Linear(), data=(x, y), values=[0.0, 1.0], splits=["test"], batch_size=50)
    for lam, v in zip((0.0, 1.0), variables, strict=True):
        z = np.concatenate([np.asarray(net.apply(v, x[s : s + LIMIT]), np.float64) for s in range(0, len(x), LIMIT)])
        top = z.max(1, keepdims=True)
        ce = np.log(np.exp(z - top).sum(1)) + top[:, 0] - z[np.arange(len(z)), y]
        assert float(ds["loss"].sel(split="test", lam=lam).item()) == pytest.approx(ce.mean(), rel=1e-5)
