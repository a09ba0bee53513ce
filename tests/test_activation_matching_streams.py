"""Activation matching reads a CNN's residual stream at every activation output it has.

References: the stream's points listed by hand from ResNet-20's structure; a permutation planted into a copy
of a model (by the spec's own random permutation, checked to keep the outputs) that activation matching
must undo exactly, although the last block's output alone leaves some of the stream's channels dead.
"""

from __future__ import annotations

import numpy as np
import pytest

import combinability as cb
from combinability.zoo import resnet20_table

torch = pytest.importorskip("torch")


def test_a_resnets_streams_are_observed_at_the_stem_and_every_block_output():
    table = resnet20_table(width=1, input_shape=(1, 8, 8))
    observed = table.activation_observations()
    assert observed == {
        "P_stem_conv": ("stem", "stage0_block0.out", "stage0_block1.out", "stage0_block2.out"),
        "P_stage1_block0.conv2": ("stage1_block0.out", "stage1_block1.out", "stage1_block2.out"),
        "P_stage2_block0.conv2": ("stage2_block0.out", "stage2_block1.out", "stage2_block2.out"),
    }
    points = table.activation_points()  # the single point of each: the stream's last
    assert all(points[p] == pts[-1] for p, pts in observed.items())


def test_channels_dead_at_the_last_block_are_told_apart_by_the_earlier_ones(monkeypatch):
    """The stem stream's channels 0-3 are made dead at the last block of stage 0 (a large negative bias there,
    where only they are read after it by nothing but the next stage): read there alone they tie; the
    stem's and the earlier blocks' outputs still see them."""
    from combinability.models import build_model

    a = build_model("resnet20", width=1, input_shape=(1, 8, 8), seed=0).eval()
    pair0 = cb.ModelPair(a, a)
    spec = pair0.spec
    state = {k: v.astype(np.float64) for k, v in pair0.params(0).items()}
    last = "stage0_block2.norm2.bias"  # the block's residual branch output, added to the stream then ReLU'd
    state[last][:4] = -50.0
    planted = cb.apply_permutation(spec, cb.random_permutation(spec, state, seed=3), state)
    b = build_model("resnet20", width=1, input_shape=(1, 8, 8), seed=1).eval()
    a_state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()}
    b_state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in planted.items()}
    a.load_state_dict({**a.state_dict(), **a_state})
    b.load_state_dict({**b.state_dict(), **b_state})
    x = np.random.default_rng(0).normal(size=(256, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(b(torch.as_tensor(x)).numpy(), a(torch.as_tensor(x)).numpy(), atol=1e-4)
    data = (x, np.zeros(len(x), np.int64))
    aligned = cb.ModelPair(a, b).align("activation", data=data)
    got_a, got_b = aligned.params(0), aligned.params(1)
    assert max(float(np.abs(got_a[k] - got_b[k]).max()) for k in got_a) < 1e-5
    # read at the last block's output alone (as before), the four dead channels are ties: not all undone
    from combinability.layers import LayerTable

    monkeypatch.setattr(LayerTable, "activation_observations", lambda self: {})
    alone = cb.ModelPair(a, b).align("activation", data=data)
    assert not np.array_equal(alone.permutation["P_stem_conv"], aligned.permutation["P_stem_conv"])
