"""Shifted copies and adds of image blocks: dst[..., i, j] <- src[..., i + di, j + dj], zero outside.

The building block of the convolutions' column matrices when they are built without
strided windows: the fused decoder layer (upsample_conv2d.py) and the strided encoder
convolutions' im2col/col2im (im2col.py). :func:`shift` is the reference (one 2-D slice
pair); :func:`shift_flat` computes the same values with one long 1-D slice pair per
row of the block, where NumPy's inner loop runs over the whole row instead of W
elements at a time (bench/NOTES.md). tests/test_shift.py checks the two agree bit for
bit; :func:`shift_for` is the dispatch (``FastPaths.shift_flat``, refimpl/execution.py).

The same for the one-step differences of the fused decoder block's method "difference"
(upsample_conv2d.py, eq. (2)): :func:`difference` and :func:`add_difference_transpose` are
the references (2-D slices), :func:`difference_flat` and :func:`add_difference_transpose_flat`
one 1-D slice pair over the whole array and a fix of the row or column the flat slices
wrapped across; :func:`difference_for` the dispatch (the same switch).
"""

from __future__ import annotations

from ..backend import array_module


def _shift_slices(d, size):
    """(dst, src) slices with dst[i] = src[i + d] for every i where 0 <= i + d < size."""
    return slice(max(0, -d), max(0, size - max(0, d))), slice(min(size, max(0, d)), size + min(0, d))


def shift(dst, src, di, dj, add=False):
    """dst[..., i, j] = src[..., i + di, j + dj] (``+=`` with add) where in range.

    dst, src: (..., H, W). Without ``add``, the rest of dst (the zero padding) is set to 0.
    """
    h, w = dst.shape[-2:]
    (rows_dst, rows_src), (cols_dst, cols_src) = _shift_slices(di, h), _shift_slices(dj, w)
    if add:
        dst[..., rows_dst, cols_dst] += src[..., rows_src, cols_src]
        return
    dst[..., rows_dst, cols_dst] = src[..., rows_src, cols_src]
    for outside in (slice(0, rows_dst.start), slice(rows_dst.stop, h)):
        dst[..., outside, :] = 0
    for outside in (slice(0, cols_dst.start), slice(cols_dst.stop, w)):
        dst[..., :, outside] = 0


def _flat_rows(a):
    """a: (R, ..., H, W) as an (R, M) view (a 2-D a as one row), or None if a row is not contiguous."""
    if a.ndim == 2:
        return a.reshape(1, -1) if a.flags.c_contiguous else None
    if a.ndim < 2 or a.shape[0] == 0 or not a[0].flags.c_contiguous:
        return None
    return a.reshape(a.shape[0], -1)  # a view: every row a[r] is contiguous


def shift_flat(dst, src, di, dj, add=False):
    """:func:`shift` for |di|, |dj| <= 1 as one 1-D slice pair per row; falls back to it otherwise.

    dst, src: (R, ..., H, W), each row dst[r], src[r] contiguous (a row is everything but the
    first axis; a 2-D array is one row); the rows themselves may lie anywhere, so a slice
    ``cols[:, i, j]`` of a larger array qualifies. In a flattened row, dst[..., i, j] <-
    src[..., i + di, j + dj] is dst_row[k] <- src_row[k + di W + dj], except where i + di or
    j + dj leaves [0, H) x [0, W) and the flat index wraps into the next image row or image.
    With ``add``, the src row and column that only such wrapped reads see (row 0 for di = 1,
    row H - 1 for di = -1, likewise columns) are set to 0 first, so every wrapped read adds 0:
    **src is overwritten there** (it must be scratch). Without ``add``, the dst rows and
    columns that wrapped reads wrote (the zero padding) are set to 0 afterwards.
    """
    a, b = _flat_rows(dst), _flat_rows(src)
    if a is None or b is None or a.shape != b.shape or max(abs(di), abs(dj)) > 1:
        return shift(dst, src, di, dj, add)
    h, w = dst.shape[-2:]
    if add:
        for d, index in ((di, (Ellipsis, 0 if di > 0 else h - 1, slice(None))),
                         (dj, (Ellipsis, slice(None), 0 if dj > 0 else w - 1))):
            if d:
                src[index] = 0
    off, size = di * w + dj, a.shape[1]
    if abs(off) < size:  # else every read wraps (a 1-pixel-high or -wide map): nothing to add or copy
        target, source = (a[:, :size - off], b[:, off:]) if off >= 0 else (a[:, -off:], b[:, :size + off])
        if add:
            target += source
        else:
            target[...] = source  # the |off| elements left unwritten lie in the row or column zeroed below
    if add:
        return
    if di:
        dst[..., h - 1 if di > 0 else 0, :] = 0
    if dj:
        dst[..., :, w - 1 if dj > 0 else 0] = 0


def shift_for(flat: bool):
    """The shift twin a layer uses: :func:`shift_flat` (the fast one) or :func:`shift` (the reference)."""
    return shift_flat if flat else shift


# ------------------------------------------------------------ one-step differences along rows or columns


def _along(axis, index):
    """The index tuple selecting ``index`` (an int or a slice) along ``axis`` (-2 rows, -1 columns) of (..., H, W)."""
    return (Ellipsis, index, slice(None)) if axis == -2 else (Ellipsis, index)


def difference(dst, src, axis):
    """dst = D src along ``axis`` (-2: rows, -1: columns): dst[i] = src[i] - src[i + 1], with src = 0 past the end
    (so dst[last] = src[last]). dst, src: (..., H, W), distinct arrays."""
    array_module(src).subtract(src[_along(axis, slice(None, -1))], src[_along(axis, slice(1, None))],
                               out=dst[_along(axis, slice(None, -1))])
    dst[_along(axis, -1)] = src[_along(axis, -1)]


def add_difference_transpose(dst, g, axis):
    """dst += D^T g along ``axis``, the transpose of :func:`difference`: (D^T g)[i] = g[i] - g[i - 1], g[-1] = 0.
    dst, g: (..., H, W), distinct arrays; g is left as it was."""
    dst += g
    dst[_along(axis, slice(1, None))] -= g[_along(axis, slice(None, -1))]


def _flat_pair(dst, src):
    """(dst, src) as 1-D views, or None unless both are C-contiguous and of one shape."""
    if dst.shape != src.shape or not (dst.flags.c_contiguous and src.flags.c_contiguous):
        return None
    return dst.reshape(-1), src.reshape(-1)


def difference_flat(dst, src, axis):
    """:func:`difference` as one 1-D subtraction over the whole array (offset 1 or W), then the last column or
    row, where the flat slices read across into the next image row or image, copied from src. Bit for bit the
    same; falls back to :func:`difference` unless both are C-contiguous."""
    flat = _flat_pair(dst, src)
    if flat is None:
        return difference(dst, src, axis)
    (a, b), off = flat, src.shape[-1] if axis == -2 else 1
    if off < b.size:
        array_module(b).subtract(b[:-off], b[off:], out=a[:-off])
    dst[_along(axis, -1)] = src[_along(axis, -1)]


def add_difference_transpose_flat(dst, g, axis):
    """:func:`add_difference_transpose` with the shifted subtraction as one 1-D slice pair; bit for bit the same.
    **g's last row or column is overwritten with 0** (g must be scratch): the reads that wrap across into the
    next image row or image subtract 0 then. Falls back to the reference unless both are C-contiguous."""
    flat = _flat_pair(dst, g)
    if flat is None:
        return add_difference_transpose(dst, g, axis)
    (a, b), off = flat, g.shape[-1] if axis == -2 else 1
    dst += g
    g[_along(axis, -1)] = 0
    if off < b.size:
        a[off:] -= b[:-off]


def difference_for(flat: bool):
    """(difference, add_difference_transpose): the flat twins (the fast ones) or the references."""
    return (difference_flat, add_difference_transpose_flat) if flat else (difference, add_difference_transpose)
