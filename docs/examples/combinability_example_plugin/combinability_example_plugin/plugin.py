"""The plugin module named by this package's entry point.

It registers one of each extension kind, all framework-free:

* an architecture, ``tiny_mlp``: one layer table, built by every backend's generic builder;
* an aligner, ``shuffle``: a random permutation (a baseline no better than chance);
* a repair, ``shrink``: pulls every combined vector 1 % towards model A;
* a metric, ``margin``: the mean logit margin of the true class over the best other class.
"""

from __future__ import annotations

import numpy as np

from combinability import LayerTable, LogitMetric, Node, hookimpl
from combinability.hookspecs import Registration
from combinability.permutation import random_permutation


def tiny_mlp_table(*, width: float, num_classes: int, input_shape: tuple[int, ...]) -> LayerTable:
    """Flatten, two hidden ``Dense(32 x width) -> ReLU`` layers, a dense head."""
    hidden = max(1, round(32 * width))
    nodes = (Node("flatten", "flatten"), Node("fc1", "dense", units=hidden), Node("act1", "relu"),
             Node("fc2", "dense", units=hidden), Node("act2", "relu"), Node("out", "dense", units=num_classes))
    return LayerTable("tiny_mlp", input_shape, num_classes, nodes)


def shuffle(task, **_):
    """A uniformly random permutation of every hidden layer, seeded by ``task.seed``."""
    return random_permutation(task.spec, task.other, seed=task.seed)


def shrink(theta, context):
    """``theta + 0.01 (θ_A - theta)``."""
    return theta + 0.01 * (context.ends[0] - theta)


def _margin(xp, logits, y):
    classes = xp.arange(logits.shape[-1])
    is_true = xp.reshape(y, (1, -1, 1)) == classes
    true = xp.sum(xp.where(is_true, logits, 0.0), axis=-1)
    other = xp.max(xp.where(is_true, -np.inf, logits), axis=-1)
    return true - other


margin = LogitMetric("margin", _margin, "mean logit margin of the true class")


@hookimpl
def combinability_register_architectures():
    from combinability import Architecture

    return [Architecture("tiny_mlp", "combinability_example_plugin.plugin:tiny_mlp_table",
                         description="example plugin: MLP with two hidden layers of 32 x width units")]


@hookimpl
def combinability_register_aligners():
    return [Registration("shuffle", "combinability_example_plugin.plugin:shuffle",
                         "example plugin: a random permutation (a chance baseline)")]


@hookimpl
def combinability_register_repairs():
    return [Registration("shrink", "combinability_example_plugin.plugin:shrink",
                         "example plugin: pull combinations 1 % towards model A")]


@hookimpl
def combinability_register_metrics():
    return [Registration("margin", "combinability_example_plugin.plugin:margin",
                         "example plugin: mean logit margin of the true class")]
