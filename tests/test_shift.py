"""shift_flat (one 1-D slice pair per row) against shift (the 2-D slices it replaces)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refimpl.layers.shift import shift, shift_flat

seeds = st.integers(0, 2**32 - 1)


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), h=st.integers(1, 5), w=st.integers(1, 5),
       di=st.integers(-1, 1), dj=st.integers(-1, 1), add=st.booleans(), seed=seeds)
def test_flat_shift_equals_the_sliced_shift(lead, h, w, di, dj, add, seed):
    """Shifted adds and zero-padded copies, over leading axes (images, channels) whose flattened rows
    the 1-D slices cross; a non-contiguous dst takes the sliced path with the same values."""
    rng = np.random.default_rng(seed)
    shape = (*lead, h, w)
    dst, src = rng.standard_normal(shape), rng.standard_normal(shape)
    want, got = dst.copy(), dst.copy()
    shift(want, src.copy(), di, dj, add=add)
    shift_flat(got, src.copy(), di, dj, add=add)
    np.testing.assert_array_equal(got, want)
    if w > 1:
        strided = np.repeat(dst, 2, axis=-1)[..., ::2]
        shift_flat(strided, src.copy(), di, dj, add=add)
        np.testing.assert_array_equal(strided, want)


@given(rows=st.integers(1, 4), n=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5),
       di=st.integers(-1, 1), dj=st.integers(-1, 1), add=st.booleans(), seed=seeds)
def test_flat_shift_on_rows_of_a_larger_array(rows, n, h, w, di, dj, add, seed):
    """Rows that are contiguous blocks spaced apart (a slice cols[:, i, j] of im2col's columns):
    the flat path, the same values as shift, and nothing outside the slice touched."""
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((rows, 3, n, h, w))
    src = rng.standard_normal((rows, 3, n, h, w))
    want = big.copy()
    shift(want[:, 1], src[:, 2].copy(), di, dj, add=add)
    got = big.copy()
    shift_flat(got[:, 1], src[:, 2], di, dj, add=add)
    np.testing.assert_array_equal(got, want)


def test_flat_shift_with_add_overwrites_only_the_wrapped_source_row_and_column():
    src = np.arange(1.0, 2 * 3 * 4 + 1).reshape(2, 3, 4)
    dst = np.zeros_like(src)
    shift_flat(dst, src, 1, -1, add=True)
    assert (src[:, 0, :] == 0).all() and (src[:, :, 3] == 0).all()
    untouched = np.arange(1.0, 2 * 3 * 4 + 1).reshape(2, 3, 4)[:, 1:, :3]
    np.testing.assert_array_equal(src[:, 1:, :3], untouched)
