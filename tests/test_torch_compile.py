"""``TorchBackend(compile=...)``: evaluations through torch.compile give the eager numbers.

The compiler here is ``aot_eager`` (dynamo's graph capture and AOT autograd, no code
generation, so no C compiler and seconds, not a minute); the default inductor backend is
measured in ``benchmarks/device/profile_torch_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from combinability_torch.backend import TorchBackend

import combinability as cb
from combinability.data import load_dataset
from combinability.errors import ConfigurationError
from combinability.models import build_model

AOT = {"backend": "aot_eager", "fullgraph": True}  # fullgraph: a graph break fails the test
LIMIT = 300


def _numpy_mlp_loss(state: dict[str, np.ndarray], v: float, other: dict[str, np.ndarray],
                    x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of ``(1 - v) * state + v * other`` by a plain numpy forward pass of the MLP."""
    h = x.reshape(len(x), -1).astype(np.float64)
    n = len([k for k in state if k.endswith(".weight")])
    for i in range(n):
        w, b = ((1 - v) * state[f"layers.{i}.{p}"].astype(np.float64) + v * other[f"layers.{i}.{p}"]
                for p in ("weight", "bias"))
        h = h @ w.T + b
        if i < n - 1:
            h = np.maximum(h, 0)
    logp = h - h.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def test_a_compiled_sweep_gives_the_numpy_reference_losses(digits_models):
    a, b, _ = digits_models
    be = TorchBackend("cpu", compile=AOT)
    values = [0.0, 0.5, 1.0]
    got = cb.sweep(cb.ModelPair(a, b, architecture="mlp", backend=be), cb.Linear(), values=values, data="digits",
                   splits=["test"], limit=LIMIT)
    test = load_dataset("digits", "test").subset(LIMIT)
    sa, sb = be.state(a), be.state(b)
    for v in values:
        want = _numpy_mlp_loss(sa, v, sb, test.x, test.y)
        np.testing.assert_allclose(float(got["loss"].sel(lam=v).item()), want, rtol=2e-5)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_compiled_logits_of_several_vectors_are_the_eager_ones(vectorize):
    """Tiny-10 (convolutions, LayerNorms, in-place ReLUs when eager): three vectors, two batch shapes."""
    model = build_model("tiny10", backend="torch", width=0.25, input_shape=(1, 28, 28), seed=0)
    eager = TorchBackend("cpu", vectorize=vectorize)
    state = eager.state(model)
    layout = cb.FlatLayout.from_arrays(state)
    base = layout.flatten(state)
    flats = torch.from_numpy(np.stack([base, 0.9 * base, base + 0.01]).astype(np.float32))
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(24, 1, 28, 28)).astype(np.float32))
    # independent of the prepared path: the module itself, each vector loaded into a copy of it
    want = torch.stack([eager.with_state(model, layout.unflatten(f.numpy()))(x) for f in flats])
    prepared = TorchBackend("cpu", vectorize=vectorize, compile=AOT).prepare(model, layout)
    torch.testing.assert_close(prepared.forward(flats, x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prepared.forward(flats[:1], x[:7]), want[:1, :7], rtol=1e-5, atol=1e-5)


def test_each_prepared_model_compiles_on_its_own():
    """Past torch's recompile limit a shared compiled function would fall back to eager; here it must not."""
    import torch._dynamo.config as dynamo_config

    be = TorchBackend("cpu", compile=AOT)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 1, 28, 28)).astype(np.float32))
    with dynamo_config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):  # 8: torch's default
        _models_past_the_limit(be, x)


def _models_past_the_limit(be: TorchBackend, x: torch.Tensor) -> None:
    for i in range(10):  # ten architectures, each compiled once, past the limit of 8
        model = build_model("mlp", backend="torch", width=0.02 * (i + 1), input_shape=(1, 28, 28), seed=i)
        state = be.state(model)
        layout = cb.FlatLayout.from_arrays(state)
        out = be.prepare(model, layout).forward(torch.from_numpy(layout.flatten(state)[None]), x)
        with torch.no_grad():
            torch.testing.assert_close(out[0], model(x), rtol=1e-5, atol=1e-6)


def test_compile_travels_with_the_backend_and_bad_values_are_refused():
    be = TorchBackend("cpu").with_compile(AOT)
    assert be.compile_options == AOT
    assert be.with_compute_dtype("bfloat16").compile_options == AOT
    assert be.with_device(torch.device("meta")).compile_options == AOT
    assert "compile={'backend': 'aot_eager', 'fullgraph': True}" in repr(be)
    assert TorchBackend("cpu", compile=True).compile_options == {}
    assert be.with_compile(False).compile_options is None
    assert "compile" not in repr(be.with_compile(False))
    with pytest.raises(ConfigurationError, match="True, False or a mapping"):
        TorchBackend("cpu", compile="max-autotune")
    # jax evaluations are always jit-compiled: asking changes nothing
    jax_backend = cb.plugins.get_backend("jax")
    assert jax_backend.with_compile() is jax_backend


def test_the_cli_flag_compiles_the_command_s_backend(monkeypatch):
    from combinability.cli import _device, build_parser

    args = build_parser().parse_args(["sweep", "--backend", "torch", "--device", "cpu", "--compile",
                                      "a.pt", "b.pt"])
    before = cb.plugins.get_backend("torch")
    with _device(args):
        inside = cb.plugins.get_backend("torch")
        assert inside.compile_options == {} and inside.device() == "cpu"
    assert cb.plugins.get_backend("torch") is before


def test_a_compiler_that_fails_is_reported_with_what_to_do_instead():
    def broken_compiler(graph, example_inputs):
        raise RuntimeError("no code generator here")

    model = build_model("mlp", backend="torch", width=0.02, input_shape=(1, 28, 28), seed=0)
    be = TorchBackend("cpu", compile={"backend": broken_compiler})
    state = be.state(model)
    layout = cb.FlatLayout.from_arrays(state)
    flat = torch.from_numpy(layout.flatten(state)[None])
    with pytest.raises(ConfigurationError, match=r"could not compile the evaluation of .*compile=False"):
        be.prepare(model, layout).forward(flat, torch.zeros(3, 1, 28, 28))


def test_a_user_module_with_batchnorm_compiles_in_one_graph():
    """A module of the user's own (traced by torch.fx for its feature points), running statistics as buffers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 26 * 26, 10)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    be = TorchBackend("cpu", compile=AOT)
    state = be.state(model)
    layout = cb.FlatLayout.from_arrays(state)
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(4, 1, 28, 28)).astype(np.float32))
    flat = torch.from_numpy(layout.flatten(state)[None].astype(np.float32))
    out = be.prepare(model, layout).forward(flat, x)
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_a_model_prepared_again_reuses_its_compiled_graph(vectorize):
    """Each sweep prepares its models anew: the second must not compile again (seconds to a minute
    on a GPU), while another architecture compiles its own."""
    compilations = []

    def counting(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    be = TorchBackend("cpu", vectorize=vectorize, compile={"backend": counting, "fullgraph": True})
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(6, 1, 28, 28)).astype(np.float32))
    for width, expected in ((0.03, 1), (0.03, 1), (0.05, 2)):
        model = build_model("mlp", backend="torch", width=width, input_shape=(1, 28, 28), seed=0)
        state = be.state(model)
        layout = cb.FlatLayout.from_arrays(state)
        flats = torch.from_numpy(np.stack([layout.flatten(state)] * 2).astype(np.float32))
        out = be.prepare(model, layout).forward(flats, x)
        with torch.no_grad():
            torch.testing.assert_close(out[1], model(x), rtol=1e-5, atol=1e-6)
        assert len(compilations) == expected
