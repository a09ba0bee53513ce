"""Sweep overhead on models a user writes (issue 11, item 2): ``cb.sweep`` against a bare loop.

For each model — torch: a BatchNorm CNN with residual blocks and ``nn.ReLU(inplace=True)``
(``bncnn``; also swept with ``repair="reset"``: ``bncnn-reset``), a plain ``nn.Sequential`` MLP
(``mlp``), a LayerNorm MLP (``lnmlp``), a small ``nn.TransformerEncoder`` classifier
(``transformer``), a small causal language model on tokens (``lm``); flax: a linen CNN
(``linen``) and an NNX MLP (``nnx``) — two randomly initialised models (the cost of a forward
pass does not depend on training) make a ``cb.ModelPair(a, b, example_input=x)``, aligned by
weight matching. ``cb.sweep(pair, cb.Uniform(), values=[0.25], samples=16)`` (16 draws and the
two end models) is timed against the loop a researcher would write: the pair's flat vectors,
``torch.rand`` draws, ``θ_A + v ⊙ (θ_B − θ_A)``, views into the combined vector passed to
``torch.func.functional_call`` (jax: ``jax.random.uniform``, the vector unravelled inside one jitted
function), summed cross-entropy and correct count per batch of 1,000 (``bncnn-reset``: the bare
loop resets the BatchNorm statistics of each combined model on the repair data, as
``repair="reset"`` does). Interleaved (ABBA), best of ``repeats``.

Each line gives the throughput ratio (sweep / bare; ≥ 0.95 is the goal) and, for torch, the
share of wall time outside the model's forward calls in one more run of each (the bare loop's
``functional_call``; the sweep's module's forward — the traced module's ``GraphModule``).
Before the timing, the sweep's losses and accuracies on ``cb.Linear`` values ``[0, 0.3, 1]`` are
checked against the bare loop's to float32 rounding.

Run: ``.venv/bin/python benchmarks/measure_user_sweeps.py [model ...] [--repeats 4]
[--examples 3000]`` (all models when none is named).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import combinability as cb

DRAWS, S, BATCH = 16, 0.25, 1000


# ----------------------------------------------------------------------------- the user's torch models
class Block(nn.Module):
    """A residual block: two 3×3 convolutions with BatchNorm, ``ReLU(inplace=True)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + x)


class BNCNN(nn.Module):
    """A BatchNorm CNN with two residual blocks."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(Block(width), nn.MaxPool2d(2), Block(width))
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def sequential_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


class LNMLP(nn.Module):
    """An MLP with LayerNorm after each hidden layer."""

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(784, width), nn.LayerNorm(width)
        self.fc2, self.ln2 = nn.Linear(width, width), nn.LayerNorm(width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.ln1(self.fc1(x.flatten(1))))
        x = F.gelu(self.ln2(self.fc2(x)))
        return self.out(x)


class TransformerClassifier(nn.Module):
    """Tokens → embedding + positions → ``nn.TransformerEncoder`` → mean → classes."""

    def __init__(self, vocab: int = 64, length: int = 32, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


class CausalLM(nn.Module):
    """A small causal language model: logits ``(n, T, vocab)`` for every position."""

    def __init__(self, vocab: int = 64, length: int = 32, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x) + self.pos, mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


# ----------------------------------------------------------------------------- data and pairs
def images(examples: int) -> tuple[np.ndarray, np.ndarray]:
    test = cb.load_dataset("fashion_mnist", "test").subset(examples)
    return np.asarray(test.x, np.float32), np.asarray(test.y, np.int64)


def tokens(examples: int, lm: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (examples, 32)).astype(np.int64)
    y = np.roll(x, -1, axis=1) if lm else rng.integers(0, 10, examples).astype(np.int64)
    return x, y


def torch_case(name: str, examples: int) -> dict[str, Any]:
    builders: dict[str, Callable[[], nn.Module]] = {
        "bncnn": BNCNN, "bncnn-reset": BNCNN, "mlp": sequential_mlp, "lnmlp": LNMLP,
        "transformer": TransformerClassifier, "lm": CausalLM}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(builders[name]().eval())
    if name.startswith("bncnn"):  # random running statistics, as trained ones would be
        gen = torch.Generator().manual_seed(2)
        for m in models:
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=gen))
                    mod.running_var.copy_(1 + 0.2 * torch.rand(mod.num_features, generator=gen))
    x, y = tokens(examples, name == "lm") if name in ("transformer", "lm") else images(examples)
    pair = cb.ModelPair(*models, example_input=torch.as_tensor(x[:8])).align("weight")
    return {"name": name, "pair": pair, "model": models[0], "x": x, "y": y, "reset": name == "bncnn-reset"}


def _views(flat: torch.Tensor, layout: Any) -> dict[str, torch.Tensor]:
    return {e.name: flat[e.offset:e.stop].view(e.shape) for e in layout.entries}


def _reset_bn(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The combined model's BatchNorm statistics recomputed on ``x`` (train-mode passes, momentum None)."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for _, m in bns]
    stats = {}
    for n, m in bns:
        m.momentum = None
        stats[f"{n}.running_mean"] = torch.zeros(m.num_features)
        stats[f"{n}.running_var"] = torch.ones(m.num_features)
        stats[f"{n}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        m.train()
    try:
        with torch.no_grad():
            state = {**params, **stats}
            for i in range(0, len(x), BATCH):
                torch.func.functional_call(model, state, (x[i:i + BATCH],))
    finally:
        for (_, m), (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)
    return {**params, **{k: v for k, v in stats.items() if not k.endswith("num_batches_tracked")}}


def bare_torch(case: dict[str, Any], vectors: list[torch.Tensor] | None = None,
               clock: list[float] | None = None) -> list[tuple[float, float]]:
    """The loop a researcher would write; ``vectors``: evaluate these instead of drawing."""
    layout, model = case["pair"].layout, case["model"]
    ta, tb = (torch.from_numpy(np.asarray(t, np.float32)) for t in (case["pair"].theta_a, case["pair"].theta_b))
    x, y = torch.as_tensor(case["x"]), torch.as_tensor(case["y"])
    gen = torch.Generator().manual_seed(0)
    delta = tb - ta
    out = []
    if vectors is None:
        vectors = [ta, tb] + [None] * DRAWS
    with torch.inference_mode():
        for theta in vectors:
            if theta is None:
                v = (0.5 - S) + 2 * S * torch.rand(ta.shape, generator=gen)
                theta = ta + v * delta
            params = _views(theta, layout)
            if case["reset"]:
                params = _reset_bn(model, params, x)
            loss = correct = 0.0
            count = 0
            for i in range(0, len(x), BATCH):
                if clock is not None:
                    start = time.perf_counter()
                logits = torch.func.functional_call(model, params, (x[i:i + BATCH],))
                if clock is not None:
                    clock[0] += time.perf_counter() - start
                logits, target = logits.reshape(-1, logits.shape[-1]), y[i:i + BATCH].reshape(-1)
                loss += float(F.cross_entropy(logits, target, reduction="sum"))
                correct += float((logits.argmax(-1) == target).sum())
                count += target.numel()
            out.append((loss / count, correct / count))
    return out


def sweep_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(data=(case["x"], case["y"]), batch_size=BATCH)
    if case["reset"]:
        kwargs.update(repair="reset", repair_data=(case["x"], case["y"]))
    return kwargs


def check(case: dict[str, Any], bare: Callable[..., list[tuple[float, float]]]) -> float:
    """The largest relative difference of the sweep's losses (``cb.Linear`` at 0, 0.3, 1) from the bare loop's;
    raises if the accuracies differ by more than one example."""
    values = [0.0, 0.3, 1.0]
    ds = cb.sweep(case["pair"], cb.Linear(), values=values, **sweep_kwargs(case))
    loss = np.asarray(ds["loss"].values, np.float64).ravel()
    acc = np.asarray(ds["accuracy"].values, np.float64).ravel()
    pair = case["pair"]
    vecs = [np.asarray(pair.theta_a + v * (pair.theta_b - pair.theta_a), np.float32) for v in values]
    ref = bare(case, [torch.from_numpy(v) if case["backend"] == "torch" else v for v in vecs])
    ref_loss, ref_acc = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    if np.max(np.abs(acc - ref_acc)) > 1.5 / len(case["y"]):
        raise AssertionError(f"{case['name']}: accuracies differ: sweep {acc}, bare {ref_acc}")
    return float(np.max(np.abs(loss - ref_loss) / np.abs(ref_loss)))


def non_forward_share(case: dict[str, Any]) -> tuple[float, float]:
    """Shares of wall time outside the forward calls: the bare loop's, the sweep's (its ``GraphModule``'s)."""
    clock = [0.0]
    t0 = time.perf_counter()
    bare_torch(case, clock=clock)
    bare_share = 1 - clock[0] / (time.perf_counter() - t0)
    sweep_clock = [0.0]
    originals = {}

    def timed(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                sweep_clock[0] += time.perf_counter() - start
        return call

    from combinability_torch.trace import TapRunner

    for cls in (TapRunner, type(case["model"])):
        originals[cls] = cls.forward
        cls.forward = timed(cls.forward)
    try:
        t0 = time.perf_counter()
        cb.sweep(case["pair"], cb.Uniform(), values=[S], samples=DRAWS, seed=0, **sweep_kwargs(case))
        wall = time.perf_counter() - t0
    finally:
        for cls, f in originals.items():
            cls.forward = f
    return bare_share, 1 - sweep_clock[0] / wall


# ----------------------------------------------------------------------------- flax
def flax_case(name: str, examples: int) -> dict[str, Any]:
    import flax.linen as fnn
    import jax
    from flax import nnx

    x, y = images(examples)
    if name == "linen":
        x = x.transpose(0, 2, 3, 1)

        class LinenCNN(fnn.Module):
            @fnn.compact
            def __call__(self, h: Any) -> Any:
                h = fnn.relu(fnn.Conv(32, (3, 3))(h))
                h = fnn.relu(h + fnn.Conv(32, (3, 3))(h))
                h = fnn.max_pool(h, (2, 2), (2, 2))
                h = fnn.relu(fnn.Conv(32, (3, 3))(h))
                return fnn.Dense(10)(h.mean((1, 2)))

        net = LinenCNN()
        models = [(net, net.init(jax.random.PRNGKey(s), x[:1])) for s in (0, 1)]

        def apply(params: Any, xb: Any) -> Any:
            return net.apply({"params": params}, xb)
        trees = [m[1]["params"] for m in models]
    else:
        class NnxMLP(nnx.Module):
            def __init__(self, rngs: nnx.Rngs) -> None:
                self.l1 = nnx.Linear(784, 512, rngs=rngs)
                self.l2 = nnx.Linear(512, 512, rngs=rngs)
                self.l3 = nnx.Linear(512, 10, rngs=rngs)

            def __call__(self, h: Any) -> Any:
                h = h.reshape(h.shape[0], -1)
                return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(h)))))

        models = [NnxMLP(nnx.Rngs(s)) for s in (0, 1)]
        graphdef, _ = nnx.split(models[0])

        def apply(params: Any, xb: Any) -> Any:
            return nnx.merge(graphdef, params)(xb)
        trees = [nnx.split(m)[1] for m in models]
    pair = cb.ModelPair(*models, example_input=x[:8]).align("weight")
    return {"name": name, "pair": pair, "apply": apply, "tree": trees[0], "x": x, "y": y, "reset": False,
            "backend": "jax"}


def bare_jax(case: dict[str, Any], vectors: list[Any] | None = None) -> list[tuple[float, float]]:
    """The jax loop a researcher would write: the flat vector unravelled in one jitted function.

    The pair's flat vector is in the library's layout order; the loop reads it by the layout's
    entries into the parameter tree (``jax.tree_util`` paths), once, outside the timed loop.
    """
    import jax
    import jax.numpy as jnp

    stats = case.get("stats")
    pair = case["pair"]
    if stats is None:
        layout = pair.layout
        leaves, treedef = jax.tree_util.tree_flatten_with_path(case["tree"])
        names = [_jax_name(path) for path, _ in leaves]
        by_name = {e.name: e for e in layout.entries}
        order = [by_name[n] for n in names]

        @jax.jit
        def stats(theta: Any, xb: Any, yb: Any) -> tuple[Any, Any]:
            tree = jax.tree_util.tree_unflatten(treedef, [theta[e.offset:e.stop].reshape(e.shape) for e in order])
            logits = case["apply"](tree, xb)
            loss = jnp.sum(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, yb[:, None], 1)[:, 0])
            return loss, jnp.sum(jnp.argmax(logits, axis=1) == yb)
        case["stats"] = stats
    ta, tb = jnp.asarray(pair.theta_a, jnp.float32), jnp.asarray(pair.theta_b, jnp.float32)
    x, y = jnp.asarray(case["x"]), jnp.asarray(case["y"])
    key = jax.random.PRNGKey(0)
    delta = tb - ta
    if vectors is None:
        vectors = [ta, tb] + [None] * DRAWS
    out = []
    for theta in vectors:
        if theta is None:
            key, sub = jax.random.split(key)
            theta = ta + ((0.5 - S) + 2 * S * jax.random.uniform(sub, ta.shape)) * delta
        loss = correct = 0.0
        for i in range(0, len(x), BATCH):
            bl, bc = stats(jnp.asarray(theta), x[i:i + BATCH], y[i:i + BATCH])
            loss += float(bl)
            correct += float(bc)
        out.append((loss / len(x), correct / len(x)))
    return out


def _jax_name(path: Any) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))))
    return ".".join(parts)


# ----------------------------------------------------------------------------- timing
def compare(case: dict[str, Any], bare_run: Callable[[], Any], sweep_run: Callable[[], Any],
            repeats: int) -> tuple[float, float, float]:
    """Bare loop and sweep interleaved (ABBA), best of ``repeats``: (bare s, sweep s, ratio)."""
    bare: list[float] = []
    lib: list[float] = []
    pairs = ((bare_run, bare), (sweep_run, lib))
    for r in range(repeats):
        for run, times in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return min(bare), min(lib), min(bare) / min(lib)


def measure(name: str, repeats: int, examples: int) -> None:
    case = flax_case(name, examples) if name in ("linen", "nnx") else {**torch_case(name, examples),
                                                                        "backend": "torch"}
    bare = bare_jax if case["backend"] == "jax" else bare_torch
    diff = check(case, bare)
    sweep_run = functools.partial(cb.sweep, case["pair"], cb.Uniform(), values=[S], samples=DRAWS, seed=0,
                                  **sweep_kwargs(case))
    bare_run = functools.partial(bare, case)
    bare_run(), sweep_run()  # warm (jit, first allocations)
    tb, tl, ratio = compare(case, bare_run, sweep_run, repeats)
    line = (f"{name:<12} {len(case['y'])} examples: bare {tb:6.2f} s  sweep {tl:6.2f} s  ratio {ratio:.3f}"
            f"  (losses agree to {diff:.1e})")
    if case["backend"] == "torch":
        shares = non_forward_share(case)
        line += f"  outside forward: bare {100 * shares[0]:.1f} %  sweep {100 * shares[1]:.1f} %"
    print(line, flush=True)


MODELS = ["bncnn", "bncnn-reset", "mlp", "lnmlp", "transformer", "lm", "linen", "nnx"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", choices=[*MODELS, []], default=[])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--examples", type=int, default=3000)
    args = parser.parse_args()
    for model in args.models or MODELS:
        measure(model, args.repeats, args.examples)
