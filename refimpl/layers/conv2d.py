"""Conv2d: cross-correlation, NCHW activations, OIHW weights (PyTorch layouts).

y[n, o, p, q] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * xpad[n, c, p*sh + i, q*sw + j]

Computed as one GEMM over an im2col matrix; the backward pass is the transposed GEMMs
and col2im (refimpl/layers/im2col.py; which of their twins, ``paths``, is the run's resolved
setting, :class:`refimpl.execution.FastPaths`); with ``paths.parallel_grads`` the two
transposed GEMMs run side by side in two threads (refimpl/layers/grad_gemms.py).
``input_grad = False`` (set on the encoder's first convolution, whose input is the image)
skips dx: backward then returns None, as PyTorch's autograd skips the gradient of an input
that does not require one.
"""

from __future__ import annotations

import numpy

from ..backend import array_module
from ..execution import default_paths
from .grad_gemms import grad_gemms
from .im2col import col2im, conv_output_size, im2col
from .init import init_weight_bias
from .layer import Layer


def _pair(value, name):
    try:
        pair = (value, value) if isinstance(value, (int, numpy.integer)) else tuple(value)
        ok = len(pair) == 2 and all(int(v) == v for v in pair)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Conv2d {name}={value!r}: expected an int or a pair of ints")
    return int(pair[0]), int(pair[1])


class Conv2d(Layer):
    """x: (N, C_in, H, W) -> y: (N, C_out, Ho, Wo), Ho = (H + 2*ph - kh) // sh + 1.

    ``input_grad``: whether backward computes dx (default) or returns None. ``paths``: im2col's and
    col2im's twins (default: the default setting's for ``xp``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *, rng, xp=numpy,
                 dtype=numpy.float32, init="torch", input_grad=True, paths=None):
        super().__init__()
        self.input_grad = input_grad
        self.paths = paths or default_paths(xp)
        self.kernel = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"Conv2d(in_channels={in_channels}, out_channels={out_channels}, kernel_size={self.kernel}, "
                f"stride={self.stride}, padding={self.padding}): channels, kernel and stride must be >= 1, padding >= 0"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        weight, bias = init_weight_bias(rng, (out_channels, in_channels, *self.kernel), xp, dtype, init)
        self.params = {"weight": weight, "bias": bias}
        self.grads = {"weight": xp.zeros_like(weight), "bias": xp.zeros_like(bias)}

    def output_shape(self, x_shape):
        """The output shape for input shape ``x_shape``; ValueError naming every dimension if invalid."""
        if len(x_shape) != 4 or x_shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expected x of shape (N, C={self.in_channels}, H, W), got {tuple(x_shape)}")
        n, _, h, w = x_shape
        ho = conv_output_size(h, self.kernel[0], self.stride[0], self.padding[0])
        wo = conv_output_size(w, self.kernel[1], self.stride[1], self.padding[1])
        if ho < 1 or wo < 1:
            raise ValueError(
                f"Conv2d input (N={n}, C={x_shape[1]}, H={h}, W={w}) with padding {self.padding} is smaller "
                f"than the kernel {self.kernel} (stride {self.stride})"
            )
        return (n, self.out_channels, ho, wo)

    def forward(self, x, cache=True):
        n, o, ho, wo = self.output_shape(x.shape)
        xp, (kh, kw) = array_module(x), self.kernel
        # columns and GEMM output in kept scratch arrays (Layer._buffer); cols lives on in the cache.
        # CUDA's im2col kernel returns its own array (CuPy's pool makes that cheap): no buffer there.
        cols_buffer = None if self.paths.cuda_kernels else self._buffer("cols", (x.shape[1] * kh * kw, n * ho * wo),
                                                                          x.dtype, xp)
        cols = im2col(x, self.kernel, self.stride, self.padding, buffer=cols_buffer, paths=self.paths)
        w2 = self.params["weight"].reshape(o, -1)
        y = xp.matmul(w2, cols, out=self._buffer("y", (o, n * ho * wo), numpy.result_type(w2.dtype, cols.dtype), xp))
        y += self.params["bias"][:, None]
        self._cache = (cols, x.shape) if cache else None
        return y.reshape(o, n, ho, wo).transpose(1, 0, 2, 3).copy()

    def backward(self, dy):
        """dW = dy (*) x (correlation over batch and positions), db = sum(dy), dx = dy convolved back with W
        (None without ``input_grad``)."""
        cols, x_shape = self._take_cache()
        o = self.out_channels
        dy2 = dy.transpose(1, 0, 2, 3).reshape(o, -1)  # (O, N*Ho*Wo)
        self.grads["bias"] += dy2.sum(axis=1)
        if not self.input_grad:
            self.grads["weight"] += (dy2 @ cols.T).reshape(self.grads["weight"].shape)
            return None
        w2 = self.params["weight"].reshape(o, -1)  # (O, C*kh*kw)
        dw, dcols = grad_gemms(self, dy2, cols, w2)  # dy2 @ cols.T, w2.T @ dy2 (into cols, or side by side)
        self.grads["weight"] += dw.reshape(self.grads["weight"].shape)
        return col2im(dcols, x_shape, self.kernel, self.stride, self.padding, overwrite_cols=True,  # dcols: ours
                      paths=self.paths)
