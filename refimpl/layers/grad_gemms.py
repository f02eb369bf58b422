"""A convolution's two backward GEMMs (Conv2d, UpsampleConv2d): the weight's gradient and the input columns'.

    (d @ cols.T, w.T @ d)    d: (R, M), cols: (K, M) the forward's columns, w: (R, K) -> (R, K), (K, M)

Conv2d: d = dy as (O, N*Ho*Wo), w = the weight as (O, C*kh*kw); UpsampleConv2d: d = dz, w =
its phase kernels (R = 4O, K = 9C with im2col; R = 16O, K = C with col2im, cols = xt).
:func:`grad_gemms` is the reference, one after the other; with ``paths.parallel_grads``
its twin :func:`grad_gemms_side_by_side` runs them at once in two threads.
"""

from __future__ import annotations

import numpy

from ..backend import array_module
from ..threads import side_by_side


def grad_gemms(layer, d, cols, w):
    """(d @ cols.T, w.T @ d), in order; the second into cols' own array where the dtypes agree (once the first is
    made, cols is spent). With ``layer.paths.parallel_grads``: :func:`grad_gemms_side_by_side`."""
    if layer.paths.parallel_grads:
        return grad_gemms_side_by_side(layer, d, cols, w)
    first = d @ cols.T
    if numpy.result_type(w.dtype, d.dtype) == cols.dtype:
        return first, array_module(cols).matmul(w.T, d, out=cols)
    return first, w.T @ d


def grad_gemms_side_by_side(layer, d, cols, w):
    """:func:`grad_gemms`' fast twin: d @ cols.T in a worker thread (:func:`refimpl.threads.side_by_side`) beside
    w.T @ d, each whole on the same BLAS threads as in order, so the same numbers bit for bit. The second goes into
    a scratch array of the layer's own ("dcols", cols' shape: refimpl/memory.py counts it), since the first reads
    cols meanwhile."""
    xp = array_module(cols)
    dcols = layer._buffer("dcols", cols.shape, numpy.result_type(w.dtype, d.dtype), xp)
    return side_by_side(lambda: d @ cols.T, lambda: xp.matmul(w.T, d, out=dcols))


def grouped_grad_gemms(layer, d, cols, w, groups):
    """:func:`grad_gemms` for G GEMM pairs over row groups of one d and w, each with its own columns.

        d: (R, M), cols: (G, K, M), w: (R, K), groups: G row slices of d and w (group g multiplies cols[g])
        -> dw: (R, K) with dw[rows_g] = d[rows_g] @ cols[g].T, dcols: (G, K, M) with dcols[g] = w[rows_g].T @ d[rows_g]

    UpsampleConv2d's "difference" method (one group per input variant). In order: every dw GEMM, then every dcols
    GEMM into cols' own array where the dtypes agree. With ``layer.paths.parallel_grads``:
    :func:`grouped_grad_gemms_side_by_side`."""
    if layer.paths.parallel_grads:
        return grouped_grad_gemms_side_by_side(layer, d, cols, w, groups)
    xp = array_module(cols)
    dtype = numpy.result_type(w.dtype, d.dtype)
    dw = _grouped_dw(xp, d, cols, groups)
    dcols = cols if dtype == cols.dtype else xp.empty(cols.shape, dtype=dtype)
    _grouped_dcols(xp, d, w, groups, dcols)
    return dw, dcols


def grouped_grad_gemms_side_by_side(layer, d, cols, w, groups):
    """:func:`grouped_grad_gemms`' fast twin: every dw GEMM in the worker thread beside every dcols GEMM here, each
    GEMM whole as in order (the same numbers bit for bit), dcols into the layer's "dcols" scratch (cols' shape)."""
    xp = array_module(cols)
    dcols = layer._buffer("dcols", cols.shape, numpy.result_type(w.dtype, d.dtype), xp)
    return side_by_side(lambda: _grouped_dw(xp, d, cols, groups), lambda: _grouped_dcols(xp, d, w, groups, dcols))


def _grouped_dw(xp, d, cols, groups):
    dw = xp.empty((d.shape[0], cols.shape[1]), dtype=numpy.result_type(d.dtype, cols.dtype))
    for g, rows in enumerate(groups):
        xp.matmul(d[rows], cols[g].T, out=dw[rows])
    return dw


def _grouped_dcols(xp, d, w, groups, dcols):
    for g, rows in enumerate(groups):
        xp.matmul(w[rows].T, d[rows], out=dcols[g])
    return dcols
