"""Weight matching: a 3x512 MLP and a ResNet-20-shaped parameter set at width x4.

Parameters are synthetic (B is a noisy permutation of A), built in ``setup``; the
timed call is the coordinate descent alone.
"""

import numpy as np

import combinability as cb


def mlp_problem(seed=0, sizes=(784, 512, 512, 512, 10)):
    rng = np.random.default_rng(seed)
    b = cb.SpecBuilder("torch")
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"layers.{i}.weight"] = rng.normal(0, n_in**-0.5, (n_out, n_in)).astype(np.float32)
        params[f"layers.{i}.bias"] = rng.normal(0, 0.1, n_out).astype(np.float32)
        b.dense(f"layers.{i}", f"P{i - 1}" if i else None, f"P{i}" if i < len(sizes) - 2 else None)
    return b.build(), params


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


def noisy_permuted_copy(spec, params, seed=1, noise=0.5):
    rng = np.random.default_rng(seed)
    perm = cb.random_permutation(spec, params, seed=rng)
    out = cb.apply_permutation(spec, perm, params)
    return {k: (v + noise * np.std(v) * rng.normal(size=v.shape)).astype(v.dtype) for k, v in out.items()}


class WeightMatching:
    params = ["mlp_3x512", "resnet20_x4"]
    param_names = ["model"]
    timeout = 300

    def setup(self, model):
        self.spec, self.a = mlp_problem() if model == "mlp_3x512" else resnet20_problem(width=4)
        self.b = noisy_permuted_copy(self.spec, self.a)

    def time_weight_matching(self, model):
        cb.weight_matching(self.spec, self.a, self.b, seed=0)

    def peakmem_weight_matching(self, model):
        cb.weight_matching(self.spec, self.a, self.b, seed=0)

    def track_sweeps(self, model):
        return cb.weight_matching(self.spec, self.a, self.b, seed=0).iterations
