"""UpsampleConv2d: nearest x2 upsample then a 3x3, stride-1, pad-1 conv, computed on the low-resolution input.

Equal to ``Sequential(Upsample(2), Conv2d(C, O, 3, stride=1, padding=1))`` (forward, dx,
weight and bias gradients; same parameter names and shapes, so state dicts are
interchangeable), without ever building the 2H x 2W image or its 4x larger im2col matrix.

Derivation, along one axis (the other is the same). The upsampled row is u[2i + a] = x[i],
a in {0, 1}; the conv is y[r] = sum_k w[k] u[r + k - 1], k = 0, 1, 2, with u = 0 outside
[0, 2H). Split the output by phase, r = 2i + p:

  p = 0: y[2i]     = w[0] u[2i-1] + w[1] u[2i] + w[2] u[2i+1] = w[0] x[i-1] + (w[1] + w[2]) x[i]
  p = 1: y[2i + 1] = w[0] u[2i] + w[1] u[2i+1] + w[2] u[2i+2] = (w[0] + w[1]) x[i] + w[2] x[i+1]

and x = 0 outside [0, H) (u's zero padding is x's). So phase p is a 2-tap correlation
of the low-resolution x with taps K_p[t] = sum_k TAPS[p, t, k] w[k], read at
x[i + p + t - 1], t = 0, 1:

  TAPS[0] = [[1, 0, 0],    (t = 0 reads x[i-1]: w[0])
             [0, 1, 1]]    (t = 1 reads x[i]:   w[1] + w[2])
  TAPS[1] = [[1, 1, 0],    (t = 0 reads x[i]:   w[0] + w[1])
             [0, 0, 1]]    (t = 1 reads x[i+1]: w[2])

In 2-D each output phase (p, q) is a 2x2 conv of x with the summed kernel
K[p, q, o, c, t, u] = sum_{k,l} TAPS[p, t, k] TAPS[q, u, l] w[o, c, k, l]           (1)
read at x[i + p + t - 1, j + q + u - 1], and y[n, o, 2i + p, 2j + q] is that phase. The
kernel gradient flows back through the same sums (the transpose of the linear map (1)):
dw[o, c, k, l] = sum_{p,q,t,u} TAPS[p, t, k] TAPS[q, u, l] dK[p, q, o, c, t, u].

Two ways to evaluate the four phases:

- ``"im2col"``: one low-resolution im2col with a 3x3 pad-1 window, cols (9C, N*H*W);
  the four 2x2 kernels are embedded in 3x3 zero kernels at offset (p, q) and stacked
  into one (4O, 9C) matrix: one GEMM gives all phases. Backward: the transposed GEMMs
  and a 3x3 col2im. GEMM work 36 O C N H W (over half of it multiplies zeros).
- ``"col2im"``: one GEMM (16O, C) @ (C, N*H*W) gives every (phase, tap) product Z; each
  phase is then the sum of its four taps' Z slices, shifted (a col2im on the output).
  Backward: an im2col of dy into the same (16O, N*H*W) layout and the transposed GEMMs.
  GEMM work 16 O C N H W, but a 16O-row column matrix instead of 9C rows.

``"auto"`` takes im2col only where its column matrix is less than half of col2im's
(9C < 8O): on every decoder block of the paper's model (C >= O) col2im was as fast or
faster (bench/README.md). The method, and whether col2im's shifts are flat slices
(``shift_flat``, bit for bit the same as :func:`~refimpl.layers.shift.shift`), come from
the run's resolved setting (``paths``, :class:`refimpl.execution.FastPaths`). The layer
as a whole is the fast twin of the plain pair, chosen by ``FastPaths.fused``
(refimpl/model.py): equal to it to rounding (tests/test_upsample_conv2d.py).

Large scratch arrays (the column matrices, the GEMM outputs) are kept between calls and
reused: fresh multi-megabyte arrays cost a page fault per 4 KiB page on first touch.
The column matrix kept for backward doubles as the output buffer of the backward GEMM
that replaces it, except where the two backward GEMMs run side by side in two threads
(``paths.parallel_grads``, refimpl/layers/grad_gemms.py): one reads the
columns while the other writes, so that one has a scratch array of its own. Returned arrays
(y, dx) are always freshly allocated.
"""

from __future__ import annotations

import numpy

from ..backend import array_module, to_device
from ..execution import UPSAMPLE_METHODS as METHODS
from ..execution import default_paths
from ..threads import elementwise_runner
from .grad_gemms import grad_gemms
from .init import init_weight_bias
from .layer import Layer
from .shift import shift, shift_for

# TAPS[p, t, k]: the 2-tap kernel of output phase p takes kernel tap k into its tap t (derivation above).
TAPS = numpy.array([[[1, 0, 0], [0, 1, 1]],
                    [[1, 1, 0], [0, 0, 1]]])
# Eq. (1) as one (9, 16) matrix: rows (k, l), columns (p, q, t, u), entries TAPS[p, t, k] TAPS[q, u, l].
PHASE_MAP = numpy.einsum("ptk,qul->klpqtu", TAPS, TAPS).reshape(9, 16)


def phase_kernels(weight):
    """weight: (O, C, 3, 3) -> K: (2, 2, O, C, 2, 2), the summed 2x2 kernel of each output phase, eq. (1)."""
    o, c = weight.shape[:2]
    phase_map = to_device(PHASE_MAP, array_module(weight), weight.dtype)
    return (weight.reshape(o * c, 9) @ phase_map).reshape(o, c, 2, 2, 2, 2).transpose(2, 3, 0, 1, 4, 5)


def phase_kernels_transpose(dk):
    """dK: (2, 2, O, C, 2, 2) -> dw: (O, C, 3, 3), the transpose of :func:`phase_kernels`."""
    o, c = dk.shape[2:4]
    phase_map = to_device(PHASE_MAP, array_module(dk), dk.dtype)
    return (dk.transpose(2, 3, 0, 1, 4, 5).reshape(o * c, 16) @ phase_map.T).reshape(o, c, 3, 3)


class UpsampleConv2d(Layer):
    """x: (N, C, H, W) -> y: (N, O, 2H, 2W); Upsample(2) then Conv2d(C, O, 3, stride=1, padding=1).

    ``method``: ``"im2col"``, ``"col2im"`` (see the module docstring; identical results up to
    rounding) or ``"auto"`` (im2col iff 9C < 8O, else col2im); default ``paths.upsample_method``.
    ``paths``: the resolved setting (default: the default setting's for ``xp``).
    """

    def __init__(self, in_channels, out_channels, *, rng, xp=numpy, dtype=numpy.float32, init="torch",
                 method=None, paths=None):
        super().__init__()
        self.paths = paths = paths or default_paths(xp)
        method = paths.upsample_method if method is None else method
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"UpsampleConv2d(in_channels={in_channels}, out_channels={out_channels}): "
                             "both must be >= 1")
        if method not in METHODS:
            raise ValueError(f"UpsampleConv2d method={method!r}: expected one of {', '.join(METHODS)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        if method == "auto":
            method = "im2col" if 9 * in_channels < 8 * out_channels else "col2im"
        self.method = method
        self.shift = shift_for(paths.shift_flat)  # col2im's shifted sums and copies
        # Same draw as Conv2d(in_channels, out_channels, 3): equal weights for equal generators.
        weight, bias = init_weight_bias(rng, (out_channels, in_channels, 3, 3), xp, dtype, init)
        self.params = {"weight": weight, "bias": bias}
        self.grads = {"weight": xp.zeros_like(weight), "bias": xp.zeros_like(bias)}

    def output_shape(self, x_shape):
        if len(x_shape) != 4 or x_shape[1] != self.in_channels:
            raise ValueError(f"UpsampleConv2d expected x of shape (N, C={self.in_channels}, H, W), got {tuple(x_shape)}")
        n, _, h, w = x_shape
        return (n, self.out_channels, 2 * h, 2 * w)

    def forward(self, x, cache=True):
        n, o, _, _ = self.output_shape(x.shape)
        xp = array_module(x)
        dtype = numpy.result_type(x.dtype, self.params["weight"].dtype)
        if self.method == "im2col":
            y, saved = self._forward_im2col(x, xp, dtype)
        else:
            y, saved = self._forward_col2im(x, xp, dtype)
        self._cache = (saved, x.shape) if cache else None
        return y

    def backward(self, dy):
        """As upsample then conv: dW, db as Conv2d's on the upsampled input; dx summed over each block."""
        saved, x_shape = self._take_cache()
        expected = self.output_shape(x_shape)
        if tuple(dy.shape) != expected:
            raise ValueError(f"UpsampleConv2d.backward expected dy of shape {expected}, got {tuple(dy.shape)}")
        if self.method == "im2col":
            return self._backward_im2col(dy, saved, x_shape)
        return self._backward_col2im(dy, saved, x_shape)

    # ------------------------------------------------------------ method "im2col"

    def _embedded_kernels(self):
        """(2, 2, O, C, 3, 3): phase (p, q)'s 2x2 kernel placed at offset (p, q) in a 3x3 window of x."""
        xp = array_module(self.params["weight"])
        k = phase_kernels(self.params["weight"])
        e = xp.zeros(k.shape[:4] + (3, 3), dtype=k.dtype)
        for p in (0, 1):
            for q in (0, 1):
                e[p, q, :, :, p : p + 2, q : q + 2] = k[p, q]
        return e

    def _forward_im2col(self, x, xp, dtype):
        n, c, h, w = x.shape
        o = self.out_channels
        # cols[c, a, b, n, i, j] = x[n, c, i + a - 1, j + b - 1]: a 3x3 pad-1 im2col of the low-res x
        cols = self._buffer("cols", (c, 3, 3, n, h, w), dtype, xp)
        xt = x.transpose(1, 0, 2, 3)
        for a in range(3):
            for b in range(3):
                shift(cols[:, a, b], xt, a - 1, b - 1)
        kernels = self._embedded_kernels().reshape(4 * o, 9 * c)
        z = self._buffer("z", (4 * o, n * h * w), dtype, xp)
        xp.matmul(kernels, cols.reshape(9 * c, n * h * w), out=z)
        # y[n, o, 2i + p, 2j + q] = z[(p, q, o), (n, i, j)] + bias[o]
        y = xp.empty((n, o, h, 2, w, 2), dtype=dtype)
        xp.add(z.reshape(2, 2, o, n, h, w).transpose(3, 2, 4, 0, 5, 1), self.params["bias"][:, None, None, None, None],
               out=y)
        return y.reshape(n, o, 2 * h, 2 * w), (cols, kernels)

    def _backward_im2col(self, dy, saved, x_shape):
        cols, kernels = saved
        xp = array_module(dy)
        n, c, h, w = x_shape
        o = self.out_channels
        cols = cols.reshape(9 * c, n * h * w)
        dz = self._buffer("z", (4 * o, n * h * w), cols.dtype, xp)
        dz.reshape(2, 2, o, n, h, w)[...] = dy.reshape(n, o, h, 2, w, 2).transpose(3, 5, 1, 0, 2, 4)
        self.grads["bias"] += dz.reshape(4, o, -1).sum(axis=(0, 2))
        dembedded, dcols = grad_gemms(self, dz, cols, kernels)  # dz @ cols.T, kernels.T @ dz
        dembedded = dembedded.reshape(2, 2, o, c, 3, 3)
        dk = xp.stack([xp.stack([dembedded[p, q, :, :, p : p + 2, q : q + 2] for q in (0, 1)]) for p in (0, 1)])
        self.grads["weight"] += phase_kernels_transpose(dk)
        dcols = dcols.reshape(c, 3, 3, n, h, w)
        # col2im, the transpose of the im2col above: dx[n, c, r, s] += dcols[c, a, b, n, r - a + 1, s - b + 1]
        dx = xp.empty((n, c, h, w), dtype=cols.dtype)
        dxt = dx.transpose(1, 0, 2, 3)
        dxt[...] = dcols[:, 1, 1]
        for a in range(3):
            for b in range(3):
                if (a, b) != (1, 1):
                    shift(dxt, dcols[:, a, b], 1 - a, 1 - b, add=True)
        return dx

    # ------------------------------------------------------------ method "col2im"

    def _stacked_kernels(self):
        """(16O, C): rows (p, q, t, u, o), the 2x2 kernel taps of every phase."""
        k = phase_kernels(self.params["weight"])  # (p, q, o, c, t, u)
        return k.transpose(0, 1, 4, 5, 2, 3).reshape(16 * self.out_channels, self.in_channels)

    def _forward_col2im(self, x, xp, dtype):
        n, c, h, w = x.shape
        o = self.out_channels
        xt = self._buffer("xt", (c, n * h * w), dtype, xp)
        xt.reshape(c, n, h, w)[...] = x.transpose(1, 0, 2, 3)
        kernels = self._stacked_kernels()
        # z[p, q, t, u, o, n, i, j] = sum_c K[p, q, o, c, t, u] x[n, c, i, j]
        z = self._buffer("z", (16 * o, n * h * w), dtype, xp)
        xp.matmul(kernels, xt, out=z)
        z = z.reshape(2, 2, 2, 2, o, n, h, w)
        # y[n, o, 2i + p, 2j + q] = bias[o] + sum_{t,u} z[p, q, t, u, o, n, i + p + t - 1, j + q + u - 1]
        y = xp.empty((n, o, h, 2, w, 2), dtype=dtype)
        for p in (0, 1):
            for q in (0, 1):
                # tap (t, u) = (1 - p, 1 - q) reads x[i, j] itself (no shift): sum the other taps into it
                acc = z[p, q, 1 - p, 1 - q]
                for t in (0, 1):
                    for u in (0, 1):
                        if (t, u) != (1 - p, 1 - q):
                            self.shift(acc, z[p, q, t, u], p + t - 1, q + u - 1, add=True)
                xp.add(acc.transpose(1, 0, 2, 3), self.params["bias"][:, None, None], out=y[:, :, :, p, :, q])
        return y.reshape(n, o, 2 * h, 2 * w), (xt, kernels)

    def _backward_col2im(self, dy, saved, x_shape):
        xt, kernels = saved
        xp = array_module(dy)
        n, c, h, w = x_shape
        o = self.out_channels
        self.grads["bias"] += dy.sum(axis=(0, 2, 3))
        dy6 = dy.reshape(n, o, h, 2, w, 2)
        # dz[p, q, t, u, o, n, r, s] = dy[n, o, 2(r - p - t + 1) + p, 2(s - q - u + 1) + q], 0 outside
        dz = self._buffer("z", (16 * o, n * h * w), xt.dtype, xp)
        dz8 = dz.reshape(2, 2, 2, 2, o, n, h, w)

        def phases(rows):  # the output rows' phases p in rows: each writes only its own dz8[p]
            for p in range(2)[rows]:
                for q in (0, 1):
                    unshifted = dz8[p, q, 1 - p, 1 - q]
                    unshifted[...] = dy6[:, :, :, p, :, q].transpose(1, 0, 2, 3)
                    for t in (0, 1):
                        for u in (0, 1):
                            if (t, u) != (1 - p, 1 - q):
                                self.shift(dz8[p, q, t, u], unshifted, 1 - p - t, 1 - q - u)
        elementwise_runner(self.paths, dz)(phases, 2)  # p = 0, 1 in order, or side by side (copies only)
        dk, dxt = grad_gemms(self, dz, xt, kernels)  # dz @ xt.T, kernels.T @ dz
        dk = dk.reshape(2, 2, 2, 2, o, c).transpose(0, 1, 4, 5, 2, 3)
        self.grads["weight"] += phase_kernels_transpose(dk)
        return dxt.reshape(c, n, h, w).transpose(1, 0, 2, 3).copy()
