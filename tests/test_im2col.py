"""im2col / col2im: the stride-phase path against the window loop (the reference), bit for bit.

Geometries are drawn where the phase path applies (H = s Ho, every kernel offset within one
phase row or column) and where it does not; the paper's encoder convolutions must take it.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.gradcheck import check_layer_gradients
from refimpl.layers import Conv2d
from refimpl.layers.im2col import (_col2im_phases, _col2im_windows, _im2col_phases, _im2col_windows, _phase_offsets,
                                   col2im, conv_output_size, im2col)
from refimpl.model import paper_architecture
from refimpl.rng import generator

seeds = st.integers(0, 2**32 - 1)
DTYPES = [np.float32, np.float64]


@st.composite
def axes(draw, phases):
    """(kernel, stride, padding, size) of one axis. With ``phases``, one the phase path takes: size = s o,
    and the kernel offsets i - p span phase shifts in {-1, 0, 1}, i.e. p <= s and 2p < k <= 2p + s."""
    s = draw(st.integers(1, 3))
    if phases:
        p = draw(st.integers(0, min(s, 2)))
        k = draw(st.integers(2 * p + 1, min(2 * p + s, 6)))
        return k, s, p, s * draw(st.integers(1, 4))
    k, p = draw(st.integers(1, 5)), draw(st.integers(0, 2))
    smallest = max(1, k - 2 * p)  # the padded input holds one window
    return k, s, p, draw(st.integers(smallest, smallest + 3 * s))


@st.composite
def geometries(draw, phases=True):
    """(x_shape, kernel, stride, padding) for im2col."""
    (kh, sh, ph, h), (kw, sw, pw, w) = draw(axes(phases)), draw(axes(phases))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    geometry = (n, c, h, w), (kh, kw), (sh, sw), (ph, pw)
    assert not phases or _phase_offsets(*geometry) is not None
    return geometry


def bit_equal(a, b):
    np.testing.assert_array_equal(a, b)
    assert (np.signbit(a) == np.signbit(b)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@given(geometry=geometries(), seed=seeds)
def test_phase_path_equals_the_window_loop(dtype, geometry, seed):
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    bit_equal(_im2col_phases(x, kernel, stride, padding), _im2col_windows(x, kernel, stride, padding))
    bit_equal(im2col(x, kernel, stride, padding), _im2col_windows(x, kernel, stride, padding))
    ho, wo = (conv_output_size(*g) for g in zip(shape[2:], kernel, stride, padding))
    cols = rng.standard_normal((shape[1] * kernel[0] * kernel[1], shape[0] * ho * wo)).astype(dtype)
    want = _col2im_windows(cols, shape, kernel, stride, padding)
    bit_equal(_col2im_phases(cols.copy(), shape, kernel, stride, padding), want)
    bit_equal(col2im(cols.copy(), shape, kernel, stride, padding, overwrite_cols=True), want)


@given(geometry=geometries(phases=False), seed=seeds)
def test_public_functions_equal_the_loop_on_any_geometry(geometry, seed):
    """Where the phase path does not apply, im2col and col2im are the loop; where it does, its values."""
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    bit_equal(im2col(x, kernel, stride, padding), _im2col_windows(x, kernel, stride, padding))
    cols = im2col(rng.standard_normal(shape), kernel, stride, padding)
    want = _col2im_windows(cols, shape, kernel, stride, padding)
    kept = cols.copy()
    bit_equal(col2im(cols, shape, kernel, stride, padding), want)
    bit_equal(cols, kept)  # not overwritten unless allowed
    bit_equal(col2im(cols, shape, kernel, stride, padding, overwrite_cols=True), want)


@pytest.mark.parametrize("image_shape, expected", [((1, 64, 64), [True] * 4), ((3, 64, 64), [True] * 4),
                                                   ((1, 28, 28), [True, True, False])])  # 7 px: odd
def test_the_paper_encoder_convolutions_take_the_phase_path(image_shape, expected):
    shape, taken = image_shape, []
    for spec in paper_architecture(image_shape).encoder_convs:
        taken.append(_phase_offsets((2, *shape), (spec.kernel,) * 2, (spec.stride,) * 2, (spec.padding,) * 2)
                     is not None)
        out = conv_output_size(shape[1], spec.kernel, spec.stride, spec.padding)
        shape = (spec.channels, out, out)
    assert taken == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_without_input_grad_skips_dx_only(dtype):
    """input_grad=False: backward returns None, and the weight and bias gradients are unchanged."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8, 8)).astype(dtype)
    full = Conv2d(3, 5, 4, 2, 1, rng=generator(1), dtype=dtype)
    image = Conv2d(3, 5, 4, 2, 1, rng=generator(1), dtype=dtype, input_grad=False)
    dy = rng.standard_normal(full.output_shape(x.shape)).astype(dtype)
    full.forward(x)
    image.forward(x)
    assert full.backward(dy) is not None
    assert image.backward(dy) is None
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(image.grads[name], full.grads[name])


@given(geometry=geometries(), seed=seeds)
def test_conv_gradients_through_the_phase_path_match_finite_differences(geometry, seed):
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    layer = Conv2d(shape[1], 2, kernel, stride, padding, rng=generator(seed), dtype=np.float64)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(layer.output_shape(shape))
    assert set(check_layer_gradients(layer, x, dy, eps=1e-6, atol=1e-8, rtol=1e-6)) == {"x", "weight", "bias"}


@given(geometry=geometries(phases=False), seed=seeds)
def test_columns_written_into_a_given_buffer(geometry, seed):
    """buffer=: the same columns, in the buffer's own memory (a layer's kept scratch), on either path."""
    shape, kernel, stride, padding = geometry
    x = np.random.default_rng(seed).standard_normal(shape)
    want = _im2col_windows(x, kernel, stride, padding)
    buffer = np.full(want.shape, np.nan)
    got = im2col(x, kernel, stride, padding, buffer=buffer)
    bit_equal(got, want)
    assert np.shares_memory(got, buffer)


def test_a_buffer_of_the_wrong_shape_or_dtype_is_refused():
    x = np.zeros((2, 3, 8, 8))
    for bad in (np.empty((27, 31)), np.empty((27, 32), dtype=np.float32), np.empty((32, 27)).T):
        with pytest.raises(ValueError, match=r"im2col buffer: expected a C-contiguous float64 array of shape \(27, 32\)"):
            im2col(x, (3, 3), (2, 2), (1, 1), buffer=bad)
