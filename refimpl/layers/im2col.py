"""im2col / col2im: the column matrices that turn a convolution into one GEMM.

Layout: ``cols`` is ``(C * kh * kw, N * Ho * Wo)`` with rows ordered (c, i, j) like
an OIHW weight reshaped to ``(O, C * kh * kw)``, and columns ordered (n, ho, wo).
Both functions loop over the ``kh * kw`` kernel offsets and copy (or add) one
strided slice each: no index arrays, no ``add.at``. That is the reference, and what
NumPy runs; on CuPy the same gathers run as one fused kernel each (refimpl/kernels.py,
tested equal to this code), since there the ~20 small launches cost more than the work.
"""

from __future__ import annotations

from .. import kernels
from ..backend import array_module


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x, kernel, stride, padding):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo)."""
    xp = array_module(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    if kernels.enabled_for(x):
        return kernels.im2col(x, kernel, stride, padding, (ho, wo))
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            cols[:, i, j] = window.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(cols, x_shape, kernel, stride, padding):
    """cols: (C*kh*kw, N*Ho*Wo) -> dx: (N, C, H, W), summing overlapping windows (adjoint of im2col)."""
    xp = array_module(cols)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    if kernels.enabled_for(cols):
        return kernels.col2im(cols, x_shape, kernel, stride, padding, (ho, wo))
    cols = cols.reshape(c, kh, kw, n, ho, wo)
    dx = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return dx[:, :, ph : ph + h, pw : pw + w]
