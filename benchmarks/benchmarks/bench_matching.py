"""Weight matching: the library against Git Re-Basin's algorithm, on trained and perturbed pairs.

Pairs (built once, in ``setup_cache``):

* ``mlp_trained``: two 64-512-512-512-10 MLPs trained on scikit-learn's digits with Adam
  (seeds 0 and 1) — trained weights take many more sweeps than random ones, so this is
  the case that shows the matcher's speed;
* ``resnet20_x1``, ``resnet20_x4``: parameters shaped like ResNet-20 (LayerNorm) at width
  1 and 4, and a copy with its units permuted and strong noise added (3 standard
  deviations), which needs several sweeps.

Each is matched by the library (:func:`combinability.weight_matching`) and by the plain
reimplementation of the original algorithm (``benchmarks/reference_rebasin.py``), so
that one ``asv run`` gives both times; ``track_sweeps`` and ``track_objective`` record
the results.
"""

import sys
from pathlib import Path

import numpy as np

import combinability as cb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import measure_matching  # noqa: E402
import reference_rebasin  # noqa: E402


def resnet20_problem(width=4, seed=0, num_classes=10):
    """Parameters shaped like ResNet-20 (LayerNorm) at a width multiplier, torch convention."""
    rng = np.random.default_rng(seed)
    b = cb.SpecBuilder("torch")
    params = {}

    def conv(name, cin, cout, k=3):
        params[f"{name}.weight"] = rng.normal(0, (cin * k * k) ** -0.5, (cout, cin, k, k)).astype(np.float32)

    def norm(name, c):
        params[f"{name}.weight"] = rng.normal(1, 0.1, c).astype(np.float32)
        params[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)

    chans = [16 * width, 32 * width, 64 * width]
    conv("conv1", 3, chans[0])
    norm("norm1", chans[0])
    b.conv("conv1", None, "S0", bias=False).norm("norm1", "S0")
    cin = chans[0]
    for s, c in enumerate(chans):
        for k in range(3):
            pre = f"stage{s}.{k}"
            proj = cin != c
            conv(f"{pre}.conv1", cin, c)
            norm(f"{pre}.norm1", c)
            conv(f"{pre}.conv2", c, c)
            norm(f"{pre}.norm2", c)
            if proj:
                conv(f"{pre}.short", cin, c, k=1)
                norm(f"{pre}.short_norm", c)
            b.basic_block(conv1=f"{pre}.conv1", norm1=f"{pre}.norm1", conv2=f"{pre}.conv2", norm2=f"{pre}.norm2",
                          p_in=f"S{s - 1 if proj else s}", p_inner=f"I{s}_{k}", p_out=f"S{s}",
                          shortcut_conv=f"{pre}.short" if proj else None,
                          shortcut_norm=f"{pre}.short_norm" if proj else None)
            cin = c
    params["fc.weight"] = rng.normal(0, 0.1, (num_classes, chans[-1])).astype(np.float32)
    params["fc.bias"] = np.zeros(num_classes, np.float32)
    b.dense("fc", "S2", None)
    return b.build(), params


def noisy_permuted_copy(spec, params, seed=1, noise=3.0):
    """``params`` with its units randomly permuted and ``noise`` standard deviations of noise added."""
    rng = np.random.default_rng(seed)
    perm = cb.random_permutation(spec, params, seed=rng)
    out = cb.apply_permutation(spec, perm, params)
    return {k: (v + noise * np.std(v) * rng.normal(size=v.shape)).astype(v.dtype) for k, v in out.items()}


def trained_mlp_pair(epochs=10):
    """Two MLPs (3 x 512 hidden units) trained on digits, as ``(axes_to_perm, params_a, params_b)``."""
    models = [cb.train("mlp", "digits", seed=s, epochs=epochs) for s in (0, 1)]
    pair = cb.ModelPair(*models, architecture="mlp", backend="torch")
    return dict(pair.spec.axes_to_perm), pair.params(0), pair.params(1)


def problems():
    """Every pair: ``{name: (axes_to_perm, params_a, params_b)}`` (plain values, as setup_cache pickles them)."""
    out = {"mlp_trained": trained_mlp_pair()}
    for width in (1, 4):
        spec, a = resnet20_problem(width=width)
        out[f"resnet20_x{width}"] = (dict(spec.axes_to_perm), a, noisy_permuted_copy(spec, a))
    return out


#: The matchers timed: the reference, the library with numpy cost terms, and the library with its
#: cost terms on torch's and jax's default device (a GPU where there is one).
MATCHERS = ["library", "library-torch", "library-jax", "reference"]


def matching_backend(matcher):
    """The ``backend=`` of a library matcher (``None``: numpy); skips when that backend is missing."""
    if not matcher.startswith("library-"):
        return None
    name = matcher.split("-", 1)[1]
    try:
        cb.get_backend(name).xp()
    except Exception as exc:  # noqa: BLE001 - not installed: asv skips the combination
        raise NotImplementedError(f"{name} is not installed ({exc})") from None
    return name


def warm_up(matcher):
    """``matcher`` once on a small random MLP pair, untimed: what a process pays once (numba's
    compiled solver loaded from its cache, BLAS threads started, a framework's first kernels, a
    device's context) is not what a benchmark of one call should measure."""
    match(*measure_matching.warm_up_pair(), matcher)


def match(spec, a, b, matcher):
    """``(permutation, sweeps)`` of ``matcher`` on the pair."""
    if matcher == "reference":
        return reference_rebasin.weight_matching(0, spec, a, b)
    perm = cb.weight_matching(spec, a, b, seed=0, backend=matching_backend(matcher))
    return perm, perm.iterations


class WeightMatching:
    params = (["mlp_trained", "resnet20_x1", "resnet20_x4"], MATCHERS)
    param_names = ["model", "matcher"]
    timeout = 600

    def setup_cache(self):
        return problems()

    def setup(self, cache, model, matcher):
        axes, self.a, self.b = cache[model]
        self.spec = cb.PermutationSpec(axes)
        warm_up(matcher)
        if matching_backend(matcher):  # a framework's kernels for these shapes, compiled untimed
            self._match(matcher)

    def _match(self, matcher):
        return match(self.spec, self.a, self.b, matcher)

    def time_weight_matching(self, cache, model, matcher):
        self._match(matcher)

    def peakmem_weight_matching(self, cache, model, matcher):
        self._match(matcher)

    def track_sweeps(self, cache, model, matcher):
        return self._match(matcher)[1]

    track_sweeps.unit = "sweeps"

    def track_objective(self, cache, model, matcher):
        return reference_rebasin.objective(self.spec, self.a, self.b, self._match(matcher)[0])

    track_objective.unit = "objective"


class WeightMatchingRestarts:
    """The library with 3 restarts (4 runs, best kept) on the trained MLP pair."""

    timeout = 600

    def setup_cache(self):
        return trained_mlp_pair()

    def setup(self, cache):
        axes, self.a, self.b = cache
        self.spec = cb.PermutationSpec(axes)
        warm_up("library")

    def time_weight_matching_restarts(self, cache):
        cb.weight_matching(self.spec, self.a, self.b, seed=0, restarts=3)

    def track_objective_restarts(self, cache):
        return cb.weight_matching(self.spec, self.a, self.b, seed=0, restarts=3).objective

    track_objective_restarts.unit = "objective"


class WeightMatchingLarge:
    """ResNet-20 x16 (about 69M parameters), a noisy permuted copy: library against the reference."""

    params = (["library", "library-torch", "reference"],)
    param_names = ["matcher"]
    timeout = 1800
    number, repeat = 1, 1

    def setup_cache(self):
        spec, a = resnet20_problem(width=16)
        return dict(spec.axes_to_perm), a, noisy_permuted_copy(spec, a)

    def setup(self, cache, matcher):
        axes, self.a, self.b = cache
        self.spec = cb.PermutationSpec(axes)
        warm_up(matcher)

    def time_weight_matching_x16(self, cache, matcher):
        match(self.spec, self.a, self.b, matcher)


def _two_vits() -> list:
    """Two randomly initialised torch ViTs (d 256, 8 heads, depth 4, MLP 512), seeds 0 and 1."""
    try:
        import torch
        from combinability_torch.transformers import TinyViT
    except ImportError as exc:  # the torch backend is an optional install
        raise NotImplementedError(f"needs the torch backend: {exc}") from None
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(TinyViT(d_model=256, depth=4, heads=8, mlp=512))
    return models


class WeightMatchingTransformer:
    """Two randomly initialised ViTs (d 256, 8 heads, depth 4, MLP 512; 2.1M parameters), their
    symmetries traced by torch.fx: attention heads as blocks, FFN permutations and an orthogonal
    residual stream, matched by coordinate ascent (:mod:`combinability.kind_matching`); and with
    invertible maps inside heads (``symmetries="invertible"``), five sweeps."""

    timeout = 600

    def setup_cache(self):
        import torch

        pair = cb.ModelPair(*_two_vits(), example_input=torch.randn(4, 1, 28, 28))
        return pair.spec.to_json(), pair.invertible_spec().to_json(), pair.params(0), pair.params(1)

    def setup(self, cache):
        spec, invertible, self.a, self.b = cache
        self.spec = cb.PermutationSpec.from_json(spec)
        self.invertible = cb.PermutationSpec.from_json(invertible)
        warm_up("library")

    def time_weight_matching_vit(self, cache):
        cb.weight_matching(self.spec, self.a, self.b, seed=0)

    def track_sweeps_vit(self, cache):
        return cb.weight_matching(self.spec, self.a, self.b, seed=0).iterations

    track_sweeps_vit.unit = "sweeps"

    def time_weight_matching_vit_invertible_5_sweeps(self, cache):
        cb.weight_matching(self.invertible, self.a, self.b, seed=0, max_iter=5)


class ActivationMatchingTransformer:
    """Activation matching of the same two ViTs on 512 random images: the probe that finds where heads,
    neurons and the stream show (a few forward passes on the example input), the streamed moments of both
    models at those points, the head assignments and the stream's Procrustes solution."""

    timeout = 600

    def setup(self):
        models = _two_vits()
        rng = np.random.default_rng(0)
        self.data = (rng.normal(size=(512, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 512))
        self.pair = cb.ModelPair(*models, example_input=self.data[0][:4])

    def time_activation_matching_vit(self):
        self.pair.align("activation", data=self.data, examples=512)


def assignment_problem(kind, n=512, seed=0):
    """A maximisation cost like weight matching's, and the same cost after a sweep's change.

    ``gram``: inner products of units with noisy, permuted copies of them. ``hubs``: the
    same with units of very unequal norms, as in trained networks, where a few rows hold
    most column minima.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 64))
    b = (a + rng.normal(size=(n, 64)))[rng.permutation(n)]
    if kind == "hubs":
        a = a * rng.lognormal(sigma=1.0, size=(n, 1))
        b = b * rng.lognormal(sigma=1.0, size=(n, 1))
    cost = a @ b.T
    return cost, cost + 0.02 * np.abs(cost).mean() * rng.normal(size=(n, n))


class LinearAssignment:
    """One assignment of 512 or 1,024 units: cold (from an auction or the reductions), and warm
    from the last solve on a changed cost (library, numba), against scipy's solve (cold either way)."""

    params = (["gram", "hubs"], [512, 1024], ["library", "scipy"])
    param_names = ["cost", "units", "solver"]

    def setup(self, kind, n, solver):
        from combinability import assignment

        self.solve = assignment.min_assignment
        self.warm = assignment.compiled_warm_assignment()
        if solver == "library" and self.warm is None:
            raise NotImplementedError("numba is not installed")
        first, self.changed = assignment_problem(kind, n)
        self.loss, self.changed_loss = -first, -self.changed
        self.prices = np.empty(n)
        self.start = self.solve(self.loss, np.empty(n, np.int64), self.prices, True) if self.warm else None

    def time_cold(self, kind, n, solver):
        if solver == "scipy":
            reference_rebasin.linear_sum_assignment(self.loss)
        else:
            self.solve(self.loss, np.empty(n, np.int64), np.empty(n), True)

    def time_warm(self, kind, n, solver):
        if solver == "scipy":
            reference_rebasin.linear_sum_assignment(self.changed_loss)
        else:
            self.warm(self.changed_loss, self.start.copy(), self.prices.copy())
