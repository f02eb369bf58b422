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

Nine products instead of sixteen. Along one axis write a = w[0], b = w[1] + w[2] and
d = w[1]; then (x = 0 outside [0, H))

  p = 0: y[2i]     = a x[i-1] + b x[i]
  p = 1: y[2i + 1] = (w[0] + w[1]) x[i] + w[2] x[i+1] = a x[i] + b x[i+1] + d (x[i] - x[i+1])

since a x[i] + b x[i+1] + d (x[i] - x[i+1]) = (w[0] + w[1]) x[i] + (w[1] + w[2] - w[1]) x[i+1].
So with the difference (D x)[i] = x[i] - x[i+1] (x[H] = 0) and the three products
P_a = a x, P_b = b x, P_d = d (D x), every read zero outside [0, H):

  y0[i] = P_a[i-1] + P_b[i],    y1[i] = P_a[i] + P_b[i+1] + P_d[i] = y0[i+1] + P_d[i]         (2)

(the last form for i < H - 1; y1[H-1] = P_a[H-1] + P_d[H-1]). Tap by tap, phase p's tap k is
sum_rho DIFF_TAPS[rho, k] (the rho term of (2)) with row factors (over k = 0, 1, 2)

  DIFF_TAPS = [[1, 0, 0],    (rho = a: w[0])
               [0, 1, 1],    (rho = b: w[1] + w[2])
               [0, 1, 0]]    (rho = d: w[1], read on D x)

an identity of linear maps for each k, so in 2-D, rows then columns, the nine products
P_{rho,kappa} = K_{rho,kappa} V_{rho,kappa} with

K_{rho,kappa}[o, c] = sum_{k,l} DIFF_TAPS[rho, k] DIFF_TAPS[kappa, l] w[o, c, k, l]              (3)

and the input variant V = x for rho, kappa in {a, b} (4 products), D_row x for rho = d
(kappa = a, b), D_col x for kappa = d (rho = a, b), D_row D_col x for (d, d) give every
phase by rule (2) along rows, then along columns. (3) is one (9, 9) matrix, DIFF_MAP (its
columns the products in PRODUCTS' order, grouped by variant); dw flows back through its
transpose as through PHASE_MAP. Backward, per axis, the adjoint of (2):

  dP_a[i] = dy0[i+1] + dy1[i],  dP_b[i] = dy0[i] + dy1[i-1] = dP_a[i-1] (i >= 1; dP_b[0] = dy0[0]),  dP_d = dy1

and dx = dV_x + D_row^T dV_row + D_col^T dV_col + D_col^T D_row^T dV_rowcol, with
(D^T g)[i] = g[i] - g[i-1] (g[-1] = 0).

Three ways to evaluate the four phases:

- ``"im2col"``: one low-resolution im2col with a 3x3 pad-1 window, cols (9C, N*H*W);
  the four 2x2 kernels are embedded in 3x3 zero kernels at offset (p, q) and stacked
  into one (4O, 9C) matrix: one GEMM gives all phases. Backward: the transposed GEMMs
  and a 3x3 col2im. GEMM work 36 O C N H W (over half of it multiplies zeros).
- ``"col2im"``: one GEMM (16O, C) @ (C, N*H*W) gives every (phase, tap) product Z; each
  phase is then the sum of its four taps' Z slices, shifted (a col2im on the output).
  Backward: an im2col of dy into the same (16O, N*H*W) layout and the transposed GEMMs.
  GEMM work 16 O C N H W, but a 16O-row column matrix instead of 9C rows.
- ``"difference"``: the three differences of x (3 C N H W subtractions), four GEMMs (one
  per variant, row blocks of one (9O, N*H*W) output: 4O, 2O, 2O, O rows), then rule (2)
  along rows (two shifted adds per column type, the second written as y0[i+1] + P_d)
  and along columns (two per row phase, each phase written to y as it is done): ten
  shifted adds against col2im's twelve. Backward: dy's phases into the nine blocks by the
  adjoint (copies, five adds), the transposed GEMMs per variant, and the transposed
  differences. GEMM work 9 O C N H W.

``"auto"`` (:func:`auto_method`) takes im2col only where its column matrix is less than
half of col2im's (9C < 8O): on every decoder block of the paper's model (C >= O) col2im
was as fast or faster (bench/README.md). Of the other two it takes ``"difference"`` from
O >= 16 output channels on (every block of the paper's decoder but the last, 32 -> 1 or
3: 0.8-0.9x col2im's time there), col2im below (bench/NOTES.md, 2026-12-07 evening: the
differences of x and of dx cost more than the 7 O C N H W multiply-adds saved when O is
small). The method, and whether the shifts and differences are flat slices (``shift_flat``,
bit for bit the same as :func:`~refimpl.layers.shift.shift` and
:func:`~refimpl.layers.shift.difference`), come from
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
from .grad_gemms import grad_gemms, grouped_grad_gemms
from .init import init_weight_bias
from .layer import Layer
from .shift import difference_for, shift, shift_for

# TAPS[p, t, k]: the 2-tap kernel of output phase p takes kernel tap k into its tap t (derivation above).
TAPS = numpy.array([[[1, 0, 0], [0, 1, 1]],
                    [[1, 1, 0], [0, 0, 1]]])
# Eq. (1) as one (9, 16) matrix: rows (k, l), columns (p, q, t, u), entries TAPS[p, t, k] TAPS[q, u, l].
PHASE_MAP = numpy.einsum("ptk,qul->klpqtu", TAPS, TAPS).reshape(9, 16)

# DIFF_TAPS[rho, k], rho = a, b, d: the row (or column) factor of each product of method "difference" (eq. (2)).
A, B, D = 0, 1, 2
DIFF_TAPS = numpy.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]])
# The nine products (rho, kappa), grouped by the input variant they multiply: x, D_row x, D_col x, D_row D_col x.
PRODUCTS = ((A, A), (A, B), (B, A), (B, B), (D, A), (D, B), (A, D), (B, D), (D, D))
VARIANT_PRODUCTS = (slice(0, 4), slice(4, 6), slice(6, 8), slice(8, 9))  # PRODUCTS of each variant
PRODUCT_INDEX = {rk: i for i, rk in enumerate(PRODUCTS)}
# Eq. (3) as one (9, 9) matrix: rows (k, l), columns the products, entries DIFF_TAPS[rho, k] DIFF_TAPS[kappa, l].
DIFF_MAP = numpy.stack([numpy.outer(DIFF_TAPS[r], DIFF_TAPS[k]).reshape(9) for r, k in PRODUCTS], axis=1)


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


def difference_kernels(weight):
    """weight: (O, C, 3, 3) -> K: (9, O, C), the nine products' kernels in PRODUCTS' order, eq. (3)."""
    o, c = weight.shape[:2]
    diff_map = to_device(DIFF_MAP, array_module(weight), weight.dtype)
    return (weight.reshape(o * c, 9) @ diff_map).T.reshape(9, o, c)


def difference_kernels_transpose(dk):
    """dK: (9, O, C) -> dw: (O, C, 3, 3), the transpose of :func:`difference_kernels`."""
    o, c = dk.shape[1:]
    diff_map = to_device(DIFF_MAP, array_module(dk), dk.dtype)
    return (dk.reshape(9, o * c).T @ diff_map.T).reshape(o, c, 3, 3)


# auto: "difference" from this many output channels on (where im2col is not taken). Measured (bench/NOTES.md,
# 2026-12-07 evening, batch 64, float32, one BLAS thread, forward + backward against col2im): O = 32, 64: 0.79-0.89x;
# O = 16: 0.91-0.96x; O = 8: 1.07-1.19x; O = 3: 1.4-2.1x (the differences of x and of dx cost more than the rows saved).
DIFFERENCE_MIN_OUT = 16


def auto_method(in_channels, out_channels):
    """``method="auto"``: im2col iff 9C < 8O, else difference iff O >= DIFFERENCE_MIN_OUT, else col2im."""
    if 9 * in_channels < 8 * out_channels:
        return "im2col"
    return "difference" if out_channels >= DIFFERENCE_MIN_OUT else "col2im"


class UpsampleConv2d(Layer):
    """x: (N, C, H, W) -> y: (N, O, 2H, 2W); Upsample(2) then Conv2d(C, O, 3, stride=1, padding=1).

    ``method``: ``"im2col"``, ``"col2im"``, ``"difference"`` (see the module docstring; identical
    results up to rounding) or ``"auto"`` (:func:`auto_method`); default ``paths.upsample_method``.
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
        self.method = auto_method(in_channels, out_channels) if method == "auto" else method
        self.shift = shift_for(paths.shift_flat)  # col2im's and difference's shifted sums and copies
        self.difference, self.add_difference_transpose = difference_for(paths.shift_flat)  # difference's D, D^T
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
        forward = {"im2col": self._forward_im2col, "col2im": self._forward_col2im,
                   "difference": self._forward_difference}[self.method]
        y, saved = forward(x, xp, dtype)
        self._cache = (saved, x.shape) if cache else None
        return y

    def backward(self, dy):
        """As upsample then conv: dW, db as Conv2d's on the upsampled input; dx summed over each block."""
        saved, x_shape = self._take_cache()
        expected = self.output_shape(x_shape)
        if tuple(dy.shape) != expected:
            raise ValueError(f"UpsampleConv2d.backward expected dy of shape {expected}, got {tuple(dy.shape)}")
        backward = {"im2col": self._backward_im2col, "col2im": self._backward_col2im,
                    "difference": self._backward_difference}[self.method]
        return backward(dy, saved, x_shape)

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

    # ------------------------------------------------------------ method "difference"

    def _forward_difference(self, x, xp, dtype):
        n, c, h, w = x.shape
        o = self.out_channels
        # the input variants V[v, c, n, i, j]: x, D_row x, D_col x, D_row D_col x
        variants = self._buffer("variants", (4, c, n * h * w), dtype, xp)
        v = variants.reshape(4, c, n, h, w)
        v[0] = x.transpose(1, 0, 2, 3)
        self.difference(v[1], v[0], -2)
        self.difference(v[2], v[0], -1)
        self.difference(v[3], v[2], -2)
        kernels = difference_kernels(self.params["weight"]).reshape(9 * o, c)
        # z[PRODUCT_INDEX[rho, kappa], o, n, i, j] = P_{rho,kappa}: one GEMM per variant into its rows
        z = self._buffer("z", (9 * o, n * h * w), dtype, xp)
        for g, products in enumerate(VARIANT_PRODUCTS):
            rows = slice(products.start * o, products.stop * o)
            xp.matmul(kernels[rows], variants[g], out=z[rows])
        z = z.reshape(9, o, n, h, w)

        def block(rho, kappa):
            return z[PRODUCT_INDEX[rho, kappa]]

        # eq. (2) along rows, for each column type kappa: Q_0 into P_{b,kappa}'s block, Q_1 into P_{d,kappa}'s
        for kappa in (A, B, D):
            pa, pb, pd = block(A, kappa), block(B, kappa), block(D, kappa)
            pd[..., h - 1, :] += pa[..., h - 1, :]  # Q_1[H-1] = P_a[H-1] + P_d[H-1]
            self.shift(pb, pa, -1, 0, add=True)  # Q_0[i] = P_b[i] + P_a[i-1] (pa is spent: shift_flat may zero its row)
            shift(pd, pb, 1, 0, add=True)  # Q_1[i] = P_d[i] + Q_0[i+1]; the plain shift: it leaves Q_0 whole
        # eq. (2) along columns, for each row phase p: y[n, o, 2i + p, 2j + q] = Y_{p,q}[o, n, i, j] + bias[o]
        y = xp.empty((n, o, h, 2, w, 2), dtype=dtype)
        bias = self.params["bias"][:, None, None]
        for p, rho in ((0, B), (1, D)):
            qa, qb, qd = block(rho, A), block(rho, B), block(rho, D)
            qd[..., w - 1] += qa[..., w - 1]  # Y_1[W-1] = Q_a[W-1] + Q_d[W-1]
            self.shift(qb, qa, 0, -1, add=True)  # Y_0[j] = Q_b[j] + Q_a[j-1]
            xp.add(qb.transpose(1, 0, 2, 3), bias, out=y[:, :, :, p, :, 0])
            self.shift(qd, qb, 0, 1, add=True)  # Y_1[j] = Q_d[j] + Y_0[j+1] (Y_0 is written: its column may go)
            xp.add(qd.transpose(1, 0, 2, 3), bias, out=y[:, :, :, p, :, 1])
        return y.reshape(n, o, 2 * h, 2 * w), (variants, kernels)

    def _backward_difference(self, dy, saved, x_shape):
        variants, kernels = saved
        xp = array_module(dy)
        n, c, h, w = x_shape
        o = self.out_channels
        self.grads["bias"] += dy.sum(axis=(0, 2, 3))
        dy6 = dy.reshape(n, o, h, 2, w, 2)
        dz = self._buffer("z", (9 * o, n * h * w), variants.dtype, xp)
        dz5 = dz.reshape(9, o, n, h, w)

        def block(rho, kappa):
            return dz5[PRODUCT_INDEX[rho, kappa]]

        # the adjoint of (2) along columns, for each row phase p: dQ_{p,kappa} into block (b or d, kappa)
        for p, rho in ((0, B), (1, D)):
            ga, gb, gd = block(rho, A), block(rho, B), block(rho, D)
            gb[...] = dy6[:, :, :, p, :, 0].transpose(1, 0, 2, 3)  # dY_0
            gd[...] = dy6[:, :, :, p, :, 1].transpose(1, 0, 2, 3)  # dQ_d = dY_1
            self.shift(ga, gb, 0, 1)  # dQ_a[j] = dY_0[j+1] ...
            ga += gd  # ... + dY_1[j]
            self.shift(gb, ga, 0, -1)  # dQ_b[j] = dY_0[j] + dY_1[j-1] = dQ_a[j-1] (j >= 1) ...
            gb[..., 0] = dy6[:, :, :, p, 0, 0].transpose(1, 0, 2)  # ... and dQ_b[0] = dY_0[0]
        # and along rows, for each column type kappa: dP_{rho,kappa} from dQ_0 (in block (b, kappa)), dQ_1 (in (d, kappa))
        for kappa in (A, B, D):
            ga, gb, gd = block(A, kappa), block(B, kappa), block(D, kappa)
            self.shift(ga, gb, 1, 0)  # dP_a[i] = dQ_0[i+1] ...
            ga += gd  # ... + dQ_1[i]
            first = gb[..., 0, :].copy()  # dP_b[0] = dQ_0[0] ...
            self.shift(gb, ga, -1, 0)  # ... and dP_b[i] = dQ_0[i] + dQ_1[i-1] = dP_a[i-1]; dP_d = dQ_1 already
            gb[..., 0, :] = first
        groups = [slice(products.start * o, products.stop * o) for products in VARIANT_PRODUCTS]
        dk, dv = grouped_grad_gemms(self, dz, variants, kernels, groups)  # dz_g @ V_g.T, K_g.T @ dz_g
        self.grads["weight"] += difference_kernels_transpose(dk.reshape(9, o, c))
        dv = dv.reshape(4, c, n, h, w)
        # dv's variants are scratch, each spent once added (the flat twin zeroes its last row or column)
        self.add_difference_transpose(dv[1], dv[3], -1)  # d(D_row x) + D_col^T d(D_row D_col x)
        self.add_difference_transpose(dv[0], dv[2], -1)  # dx + D_col^T d(D_col x)
        self.add_difference_transpose(dv[0], dv[1], -2)  # + D_row^T (the line above)
        return dv[0].transpose(1, 0, 2, 3).copy()
