import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from combinability import FlatLayout, LayoutError

shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple), min_size=1, max_size=6)


@settings(max_examples=50, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_exact(shapes, seed):
    rng = np.random.default_rng(seed)
    dtypes = [np.float32, np.float64, np.float16]
    params = {f"p{i}": rng.normal(size=s).astype(dtypes[i % 3]) for i, s in enumerate(shapes)}
    layout = FlatLayout.from_arrays(params)
    flat = layout.flatten(params)
    assert flat.shape == (sum(int(np.prod(s)) for s in shapes),)
    back = layout.unflatten(flat)
    assert list(back) == list(params)
    for name in params:
        assert back[name].dtype == params[name].dtype
        np.testing.assert_array_equal(back[name], params[name])
    # offsets are contiguous and in order
    expected = 0
    for e in layout.entries:
        assert e.offset == expected
        expected += int(np.prod(e.shape))


def test_layers_and_slices():
    params = {"a.w": np.ones((2, 3)), "a.b": np.zeros(2), "b.w": np.full((1, 2), 7.0)}
    layout = FlatLayout.from_arrays(params, layers={"a.w": 0, "a.b": 0, "b.w": 1})
    np.testing.assert_array_equal(layout.layer_index(), [0] * 8 + [1] * 2)
    assert layout.num_layers == 2
    flat = layout.flatten(params)
    np.testing.assert_array_equal(flat[layout.slice("b.w")], [7.0, 7.0])
    assert FlatLayout.from_records(layout.to_records()) == layout


def test_errors_name_the_problem():
    layout = FlatLayout.from_arrays({"w": np.ones((2, 3), np.float32)})
    with pytest.raises(LayoutError, match="missing"):
        layout.flatten({})
    with pytest.raises(LayoutError, match=r"shape \(3, 2\).*\(2, 3\)"):
        layout.flatten({"w": np.ones((3, 2))})
    with pytest.raises(LayoutError, match=r"expects \(6,\)"):
        layout.unflatten(np.ones(5))
    with pytest.raises(LayoutError, match="known names: w"):
        layout["nope"]
    with pytest.raises(LayoutError, match="w: \\(2, 3\\) vs \\(3, 2\\)"):
        layout.check_compatible(FlatLayout.from_arrays({"w": np.ones((3, 2))}))


def test_flat_vectors_are_64_byte_aligned_and_only_their_own_memory_is_recognised():
    from combinability.layout import aligned_empty, owns_memory

    layout = FlatLayout.from_arrays({"w": np.zeros((3, 5), np.float32), "b": np.zeros(3, np.float32)})
    flats = [layout.flatten({"w": np.full((3, 5), k), "b": np.arange(3)}) for k in range(16)]
    assert all(f.ctypes.data % 64 == 0 for f in flats)  # numpy's own 16-byte alignment would miss some
    assert flats[2][layout.slice("w")].tolist() == [2.0] * 15  # the values land where they belong
    assert all(owns_memory(f) for f in flats)
    assert aligned_empty(7, np.float64).ctypes.data % 64 == 0 and aligned_empty(7, np.float64).dtype == np.float64
    plain = np.zeros(32, np.float32)
    assert not owns_memory(plain) and not owns_memory(plain[4:]) and not owns_memory(plain.reshape(4, 8))
