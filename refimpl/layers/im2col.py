"""im2col / col2im: the column matrices that turn a convolution into one GEMM.

Layout: ``cols`` is ``(C * kh * kw, N * Ho * Wo)`` with rows ordered (c, i, j) like
an OIHW weight reshaped to ``(O, C * kh * kw)``, and columns ordered (n, ho, wo).
The reference (``_im2col_windows``, ``_col2im_windows``) loops over the ``kh * kw`` kernel
offsets and copies (or adds) one strided slice each: no index arrays, no ``add.at``. Two
fast twins, each chosen by the run's resolved setting (:class:`refimpl.execution.FastPaths`,
passed in as ``paths``): on CuPy the same gathers run as one fused kernel each
(``cuda_kernels``: refimpl/kernels.py, tested equal to this code bit for bit), since there
the ~20 small launches cost more than the work; and the stride-phase path below
(``im2col_phases``).

Strided convolutions whose input splits evenly into stride phases (H = sh Ho, W = sw Wo,
every kernel offset within one phase row or column of its window: all of the paper's
encoder convolutions) take a faster path (``_im2col_phases``), tested equal bit for bit to the loop
(tests/test_im2col.py): x is split once into its sh x sw phases x[:, :, a::sh, b::sw]
(each (C, N, Ho, Wo)), and each kernel offset (i, j) is then phase ((i - ph) mod sh,
(j - pw) mod sw) shifted by ((i - ph) // sh, (j - pw) // sw) in {-1, 0, 1}: one long
flat copy (shift.shift_flat, or shift.shift without ``shift_flat``) instead of a strided
window gathered W_o elements at a time.
col2im sums the same way, into the phases, in the loop's order from zero, so every sum
is the loop's; it overwrites its columns (scratch), so it runs only where the caller
allows that (``overwrite_cols``).
"""

from __future__ import annotations

from .. import kernels
from ..backend import array_module
from ..execution import REFERENCE, default_paths
from ..threads import elementwise_runner
from .shift import shift_flat, shift_for


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _output_hw(x_shape, kernel, stride, padding):
    return tuple(conv_output_size(*geometry) for geometry in zip(x_shape[2:], kernel, stride, padding))


def im2col(x, kernel, stride, padding, buffer=None, paths=None):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo).

    ``buffer``: a C-contiguous array of that shape and x's dtype for the array-code twins to
    write the columns into (a layer's kept scratch); the columns are returned either way.
    ``paths``: the twins to take (a :class:`refimpl.execution.FastPaths`; default: the default setting's).
    """
    paths = paths or default_paths(array_module(x))
    if paths.cuda_kernels:
        return kernels.im2col(x, kernel, stride, padding, _output_hw(x.shape, kernel, stride, padding))
    if paths.im2col_phases and _phase_offsets(x.shape, kernel, stride, padding) is not None:
        return _im2col_phases(x, kernel, stride, padding, buffer, shift_for(paths.shift_flat), paths)
    return _im2col_windows(x, kernel, stride, padding, buffer)


def _columns(n, c, kernel, out_hw, dtype, xp, buffer):
    """The (C, kh, kw, N, Ho, Wo) array the columns are written into: ``buffer`` viewed so, or a new one."""
    shape = (c, *kernel, n, *out_hw)
    if buffer is None:
        return xp.empty(shape, dtype=dtype)
    flat = (c * kernel[0] * kernel[1], n * out_hw[0] * out_hw[1])
    if tuple(buffer.shape) != flat or buffer.dtype != dtype or not buffer.flags.c_contiguous:
        raise ValueError(f"im2col buffer: expected a C-contiguous {dtype} array of shape {flat}, got "
                         f"{buffer.dtype} {tuple(buffer.shape)}")
    return buffer.reshape(shape)


def _im2col_windows(x, kernel, stride, padding, buffer=None):
    """The reference im2col: one strided window of the padded x per kernel offset."""
    xp = array_module(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = _output_hw(x.shape, kernel, stride, padding)
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = _columns(n, c, kernel, (ho, wo), x.dtype, xp, buffer)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            cols[:, i, j] = window.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(cols, x_shape, kernel, stride, padding, overwrite_cols=False, paths=None):
    """cols: (C*kh*kw, N*Ho*Wo) -> dx: (N, C, H, W), summing overlapping windows (adjoint of im2col).

    ``overwrite_cols``: cols is scratch and may be overwritten, which lets the stride-phase
    path run (see the module docstring); the values returned are the same either way.
    ``paths``: as :func:`im2col`'s.
    """
    paths = paths or default_paths(array_module(cols))
    if paths.cuda_kernels:
        return kernels.col2im(cols, x_shape, kernel, stride, padding, _output_hw(x_shape, kernel, stride, padding))
    if paths.im2col_phases and overwrite_cols and _phase_offsets(x_shape, kernel, stride, padding) is not None:
        return _col2im_phases(cols, x_shape, kernel, stride, padding, shift_for(paths.shift_flat), paths)
    return _col2im_windows(cols, x_shape, kernel, stride, padding)


def _col2im_windows(cols, x_shape, kernel, stride, padding):
    """The reference col2im: each kernel offset's columns added into a strided window of the padded dx."""
    xp = array_module(cols)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    ho, wo = _output_hw(x_shape, kernel, stride, padding)
    cols = cols.reshape(c, kh, kw, n, ho, wo)
    dx = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return dx[:, :, ph : ph + h, pw : pw + w]


def _phase_offsets(x_shape, kernel, stride, padding):
    """[((i, a, di), ...), ((j, b, dj), ...)] for the stride-phase path, or None where it does not apply.

    Kernel row i reads x row sh p + i - ph = sh (p + di) + a, a = (i - ph) mod sh, di = (i - ph) // sh:
    row p + di of phase a. That is phase a shifted by di, zero outside exactly where x is padding, when
    every phase has Ho rows (H = sh Ho); shift_flat takes |di| <= 1. Likewise columns.
    """
    offsets = []
    for size, k, s, p in zip(x_shape[2:], kernel, stride, padding):
        out = conv_output_size(size, k, s, p)
        axis = [(i, (i - p) % s, (i - p) // s) for i in range(k)]
        if size != s * out or any(abs(d) > 1 for _, _, d in axis):
            return None
        offsets.append(axis)
    return offsets


def _im2col_phases(x, kernel, stride, padding, buffer=None, shift=shift_flat, paths=REFERENCE):
    """im2col through x's stride phases: x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo), equal to the loop's.
    ``shift``: :func:`~refimpl.layers.shift.shift_flat` or its reference twin. With ``paths.parallel_elementwise``
    (large arrays), the phases' copy over the batch's halves and the shifted copies over the kernel rows' halves
    side by side (:func:`refimpl.threads.elementwise_runner`; copies only: the same arrays)."""
    xp = array_module(x)
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    ho, wo = h // sh, w // sw
    rows, columns = _phase_offsets(x.shape, kernel, stride, padding)
    phases = xp.empty((sh, sw, c, n, ho, wo), dtype=x.dtype)  # phases[a, b, c, n, i, j] = x[n, c, sh i + a, sw j + b]

    def split(s):
        phases[:, :, :, s] = x[s].reshape(-1, c, ho, sh, wo, sw).transpose(3, 5, 1, 0, 2, 4)
    elementwise_runner(paths, x)(split, n)
    cols = _columns(n, c, kernel, (ho, wo), x.dtype, xp, buffer)

    def copies(part):  # each writes only its own cols[:, i, j]
        for i, a, di in rows[part]:
            for j, b, dj in columns:
                shift(cols[:, i, j], phases[a, b], di, dj)
    elementwise_runner(paths, cols)(copies, len(rows))
    return cols.reshape(c * kh * kw, n * ho * wo)


def _col2im_phases(cols, x_shape, kernel, stride, padding, shift=shift_flat, paths=REFERENCE):
    """col2im through dx's stride phases (cols is overwritten): the loop's sums, in the loop's order, from 0.
    ``shift``: as :func:`_im2col_phases`'s. With ``paths.parallel_elementwise`` (large arrays), the row phases a
    side by side, each summing its own phases[a] in the loop's order, then dx's copy over the batch's halves."""
    xp = array_module(cols)
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x_shape
    ho, wo = h // sh, w // sw
    rows, columns = _phase_offsets(x_shape, kernel, stride, padding)
    cols = cols.reshape(c, kh, kw, n, ho, wo)
    phases = xp.zeros((sh, sw, c, n, ho, wo), dtype=cols.dtype)

    def sums(part):  # the row phases a in part: each sum phases[a, b] only in this thread, in the loop's order
        for i, a, di in rows:
            if a in range(sh)[part]:
                for j, b, dj in columns:
                    shift(phases[a, b], cols[:, i, j], -di, -dj, add=True)  # the adjoint of im2col's shift
    elementwise_runner(paths, cols)(sums, sh)
    dx = xp.empty((n, c, ho, sh, wo, sw), dtype=cols.dtype)

    def gather(s):
        dx[s] = phases[:, :, :, s].transpose(3, 2, 4, 0, 5, 1)
    elementwise_runner(paths, dx)(gather, n)
    return dx.reshape(n, c, h, w)
