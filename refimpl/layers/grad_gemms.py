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
