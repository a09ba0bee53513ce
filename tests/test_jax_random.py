"""Large jax draws: written chunk by chunk, uniform, independent across chunks, flat in memory."""

import numpy as np
import pytest
from scipy import stats

jax = pytest.importorskip("jax")

from combinability_jax.backend import DRAW_CHUNK, JaxRandom, chunked_uniform  # noqa: E402


def test_a_large_draw_is_uniform_and_its_chunks_independent():
    u = np.asarray(JaxRandom(5).uniform((2, DRAW_CHUNK + 7)))
    assert u.shape == (2, DRAW_CHUNK + 7) and u.dtype == np.float32
    assert 0.0 <= u.min() and u.max() < 1.0
    flat = u.ravel()
    assert stats.kstest(flat[::5], "uniform").pvalue > 1e-4
    first, second = flat[:DRAW_CHUNK], flat[DRAW_CHUNK:2 * DRAW_CHUNK]
    # independent chunks: their correlation is N(0, 1/n); equal keys would give 1
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / np.sqrt(DRAW_CHUNK)
    assert not np.array_equal(first, second)
    tail = flat[2 * DRAW_CHUNK:]  # the short last chunk
    assert tail.size == 14 and np.unique(tail).size == 14


def test_large_draws_repeat_with_the_seed_and_differ_between_draws():
    a, b = JaxRandom(1), JaxRandom(1)
    first = np.asarray(a.uniform(DRAW_CHUNK + 1))
    assert np.array_equal(first, np.asarray(b.uniform(DRAW_CHUNK + 1)))
    assert not np.array_equal(first, np.asarray(a.uniform(DRAW_CHUNK + 1)))
    assert not np.array_equal(first, np.asarray(JaxRandom(2).uniform(DRAW_CHUNK + 1)))


def test_small_draws_are_one_threefry_call():
    key = jax.random.PRNGKey(4)
    _, sub = jax.random.split(key)
    expected = np.asarray(jax.random.uniform(sub, (3, 5)))
    assert np.array_equal(np.asarray(JaxRandom(4).uniform((3, 5))), expected)


@pytest.mark.parametrize("chunks", [8, 64])
def test_chunked_draw_needs_one_chunk_beside_its_output(chunks):
    """XLA's own memory plan: scratch space does not grow with the draw (one call holds ~3x its output)."""
    size = chunks * DRAW_CHUNK + 3
    key = jax.random.PRNGKey(0)
    plan = chunked_uniform.lower(key, size, np.dtype("float32")).compile().memory_analysis()
    assert plan.output_size_in_bytes == 4 * size
    assert plan.temp_size_in_bytes <= 8 * 4 * DRAW_CHUNK
    whole = jax.jit(lambda k: jax.random.uniform(k, (size,))).lower(key).compile().memory_analysis()
    assert whole.temp_size_in_bytes >= 2 * 4 * size  # the single call this replaces
