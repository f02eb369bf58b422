"""shift_flat (one 1-D slice pair per row) against shift (the 2-D slices it replaces)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refimpl.layers.shift import (add_difference_transpose, add_difference_transpose_flat, difference,
                                  difference_flat, shift, shift_flat)

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


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), h=st.integers(1, 5), w=st.integers(1, 5),
       axis=st.sampled_from([-2, -1]), contiguous=st.booleans(), seed=seeds)
def test_flat_differences_equal_the_sliced_ones(lead, h, w, axis, contiguous, seed):
    """D and D^T (method "difference" of upsample_conv2d.py): the flat twins bit for bit the references, over
    leading axes the flat slices cross; a non-contiguous array takes the reference's path. And D^T is D's adjoint."""
    rng = np.random.default_rng(seed)
    shape = (*lead, h, w)
    src, g, dst = (rng.standard_normal(shape) for _ in range(3))
    if not contiguous:
        src = np.repeat(src, 2, axis=-1)[..., ::2]
    want, got = np.empty(shape), np.full(shape, np.nan)
    difference(want, src, axis)
    difference_flat(got, src, axis)
    np.testing.assert_array_equal(got, want)
    n = shape[axis]  # the definition: src[i] - src[i + 1], 0 past the end
    padded = np.concatenate([src, np.zeros_like(np.take(src, [0], axis=axis))], axis=axis)
    np.testing.assert_array_equal(want, np.take(padded, range(n), axis=axis) - np.take(padded, range(1, n + 1),
                                                                                         axis=axis))
    want, got = dst.copy(), dst.copy()
    add_difference_transpose(want, g.copy(), axis)
    add_difference_transpose_flat(got, g.copy(), axis)
    np.testing.assert_array_equal(got, want)
    assert np.isclose(float((want - dst).ravel() @ src.ravel()), float(g.ravel() @ sliced_difference(src, axis).ravel()))


def sliced_difference(src, axis):
    out = np.empty(src.shape)
    difference(out, src, axis)
    return out
