"""BatchNorm over the channel axis, for linear features (N, C) and conv maps (N, C, H, W).

Training mode normalises with the batch statistics over every axis but C (Ioffe & Szegedy,
2015, Algorithm 1; m values per channel):

    mean = 1/m sum x                  var = 1/m sum (x - mean)^2   (biased)
    x_hat = (x - mean) / sqrt(var + eps)                y = weight * x_hat + bias

Eval mode uses the running statistics instead. The backward (their Section 3, with
dL/dvar and dL/dmean folded into dL/dx): dbias = sum dy, dweight = sum dy x_hat,
dx_hat = dy weight, dx = (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat)) / sqrt(var + eps)
(training) or dx_hat / sqrt(var + eps) (eval: the running statistics are constants).

Running statistics follow Keras's convention, which the paper's "momentum 0.8" is
written in: running = momentum * running + (1 - momentum) * batch. (PyTorch's
``momentum`` is the other weight: Keras 0.8 == PyTorch 0.2.) Which variance the
running estimate stores is a choice: ``running_var="biased"`` (default; Keras stores
the biased batch variance) or ``"unbiased"`` (PyTorch stores var * m / (m - 1),
m = elements per channel). ``eps`` defaults to Keras's 1e-3 (PyTorch's is 1e-5).
``update_running`` lets a caller run a training-mode pass that leaves the running
statistics untouched (interpretation (h) of Algorithm 1: the E1 decoder pass).

Three twins compute the layer; the run's resolved setting picks one at build
(``paths``, :class:`refimpl.execution.FastPaths`), the dispatch is :meth:`BatchNorm._twin`:

- ``_forward_plain`` / ``_backward_plain``: the formulas above, one line per equation (the
  reference; ``--reference`` or ``--no-fast-batchnorm``).
- ``_forward_fast`` / ``_backward_fast`` (``fast_batchnorm``, the default, where x, dy and the
  parameters share a dtype): the same quantities in fewer passes over the maps. var =
  sum(centred * centred) / m is one dot product per channel (``einsum``) instead of a
  squares array and a mean; y = centred * (weight * inv_std) + bias folds the per-channel
  factors before touching the map, and the backward works from the cached ``centred``
  (x_hat = centred * inv_std is never stored), with sum(dy x_hat) = inv_std sum(dy centred)
  as a dot product too. A training forward makes 3 passes, a reduction and a dot product
  instead of 5 passes and two reductions; a backward 4 passes, a reduction and a dot product
  instead of 5 and two (bench/NOTES.md). The sums are associated differently, so the results
  equal the plain twin's to rounding, not bit for bit: tests/test_layers_gradcheck.py holds
  them to 1e-12 (float64) and 1e-5 (float32) relative to each output's largest value or,
  where an output is a cancelling sum (dx for two values per channel), to the inputs' O(1) scale.
- ``_forward_cuda`` / ``_backward_cuda`` (``cuda_kernels``, CuPy): the plain twin's
  statistics, and its elementwise lines as CUDA kernels (refimpl/kernels.py; to rounding,
  tests/test_kernels.py).
"""

from __future__ import annotations

import numpy

from .. import kernels
from ..backend import array_module
from ..execution import default_paths
from ..threads import elementwise_runner
from .layer import Layer

RUNNING_VARS = ("biased", "unbiased")


class BatchNorm(Layer):
    """x: (N, C) or (N, C, H, W) -> y: same shape. ``paths``: the twins to take (default: the default
    setting's for ``xp``)."""

    def __init__(self, num_features, momentum=0.8, eps=1e-3, running_var="biased", *, xp=numpy, dtype=numpy.float32,
                 paths=None):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"BatchNorm num_features={num_features}: expected >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm momentum={momentum}: expected a value in [0, 1] (Keras convention)")
        if eps <= 0:
            raise ValueError(f"BatchNorm eps={eps}: expected > 0")
        if running_var not in RUNNING_VARS:
            raise ValueError(f"BatchNorm running_var={running_var!r}: expected one of {', '.join(RUNNING_VARS)}")
        self.num_features, self.momentum, self.eps, self.running_var = num_features, momentum, eps, running_var
        self.update_running = True
        self.paths = paths or default_paths(xp)
        self.params = {"weight": xp.ones(num_features, dtype=dtype), "bias": xp.zeros(num_features, dtype=dtype)}
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.buffers = {"running_mean": xp.zeros(num_features, dtype=dtype),
                        "running_var": xp.ones(num_features, dtype=dtype)}

    def _axes_and_shape(self, x):
        if x.ndim not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm expected x of shape (N, C={self.num_features}) or (N, C={self.num_features}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if x.ndim == 2:
            return (0,), (1, self.num_features)
        return (0, 2, 3), (1, self.num_features, 1, 1)

    def _twin(self, x) -> str:
        """Which twin computes this layer on x: "cuda", "fast" or "plain" (the reference)."""
        if self.paths.cuda_kernels:
            return "cuda"
        if self.paths.fast_batchnorm and x.dtype == self.params["weight"].dtype:
            return "fast"
        return "plain"

    def forward(self, x, cache=True):
        """Training: y = weight (x - mean) / sqrt(var + eps) + bias, mean and (biased) var of the batch per
        channel, and the running statistics updated; eval: the same with the running statistics."""
        axes, bshape = self._axes_and_shape(x)
        twin = self._twin(x)
        forward = {"plain": self._forward_plain, "fast": self._forward_fast, "cuda": self._forward_cuda}[twin]
        y, saved = forward(x, axes, bshape, cache)
        self._cache = (twin, saved, axes, bshape, self.training) if cache else None
        return y

    def backward(self, dy):
        """dL/dx from dy, and dL/dweight, dL/dbias added to ``grads``: by the twin that ran the forward."""
        twin, saved, axes, bshape, training = self._take_cache()
        if twin == "fast" and dy.dtype != saved[0].dtype:  # the fast sums need one dtype: the plain ones
            twin, saved = "plain", (saved[0] * saved[1], saved[1])  # x_hat = centred * inv_std
        backward = {"plain": self._backward_plain, "fast": self._backward_fast, "cuda": self._backward_cuda}[twin]
        return backward(dy, *saved, axes, bshape, training)

    # ------------------------------------------------------------ the statistics

    def _statistics(self, x, axes, bshape):
        """(mean, var), each (1, C[, 1, 1]): the batch's (training; the running ones updated) or the running ones."""
        if not self.training:
            return self._running(bshape)
        count = self._count(x)
        mean = x.mean(axis=axes, keepdims=True)  # mean = 1/m sum x
        var = array_module(x).square(x - mean).mean(axis=axes, keepdims=True)  # var = 1/m sum (x - mean)^2
        self._record(mean, var, count)
        return mean, var

    def _running(self, bshape):
        return self.buffers["running_mean"].reshape(bshape), self.buffers["running_var"].reshape(bshape)

    def _count(self, x) -> int:
        """m, the values per channel (training needs two)."""
        count = x.size // self.num_features
        if count < 2:
            raise ValueError(f"BatchNorm in training mode needs >= 2 values per channel, got x of shape "
                             f"{tuple(x.shape)}")
        return count

    def _record(self, mean, var, count: int) -> None:
        """The running statistics updated with the batch's (unless ``update_running`` is off)."""
        if self.update_running:
            self._update_running(mean.reshape(-1), var.reshape(-1), 1.0 if self.running_var == "biased"
                                 else count / (count - 1))

    def _update_running(self, mean, var, var_scale):
        """running = momentum * running + (1 - momentum) * batch; the variance stored is var * var_scale."""
        m, running_mean, running_var = self.momentum, self.buffers["running_mean"], self.buffers["running_var"]
        if self.paths.cuda_kernels:  # the two lines below as one CUDA kernel
            kernels.batchnorm_running_update(running_mean, running_var, mean, var, momentum=m, var_scale=var_scale)
            return
        running_mean[...] = m * running_mean + (1 - m) * mean
        running_var[...] = m * running_var + (1 - m) * (var * var_scale)

    def _affine(self, bshape):
        return self.params["weight"].reshape(bshape), self.params["bias"].reshape(bshape)

    # ------------------------------------------------------------ the plain twin: the reference

    def _forward_plain(self, x, axes, bshape, cache):
        """Ioffe & Szegedy's Algorithm 1, one line per equation. -> y, (x_hat, inv_std)"""
        weight, bias = self._affine(bshape)
        mean, var = self._statistics(x, axes, bshape)
        inv_std = 1 / array_module(x).sqrt(var + self.eps)
        x_hat = (x - mean) * inv_std  # x_hat = (x - mean) / sqrt(var + eps)
        y = weight * x_hat + bias  # y = weight x_hat + bias
        return y, (x_hat, inv_std)

    def _backward_plain(self, dy, x_hat, inv_std, axes, bshape, training):
        """The gradients of :meth:`_forward_plain`, one line per equation, dL/dvar and dL/dmean folded into dx."""
        weight, _ = self._affine(bshape)
        self.grads["bias"] += dy.sum(axis=axes)  # dL/dbias = sum dy
        self.grads["weight"] += (dy * x_hat).sum(axis=axes)  # dL/dweight = sum dy x_hat
        dx_hat = dy * weight  # dL/dx_hat
        if not training:
            return dx_hat * inv_std  # the running statistics are constants
        return (dx_hat - dx_hat.mean(axis=axes, keepdims=True)
                - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True)) * inv_std  # dL/dx

    # ------------------------------------------------------------ the fast twin

    def _forward_fast(self, x, axes, bshape, cache):
        """The plain twin's y in fewer passes (module docstring); keeps centred = x - mean. -> y, (centred, inv_std)"""
        weight, bias = self._affine(bshape)
        xp, each = array_module(x), elementwise_runner(self.paths, x)  # each line whole, or over two halves
        centred = xp.empty_like(x)
        if self.training:
            count = self._count(x)
            mean = x.mean(axis=axes, keepdims=True)
            each(lambda s: xp.subtract(x[s], mean, out=centred[s]), len(x))  # centred = x - mean
            var = (_channel_dot(centred, centred) / count).reshape(bshape)  # sum(centred^2): no squares array
            self._record(mean, var, count)
        else:
            mean, var = self._running(bshape)
            each(lambda s: xp.subtract(x[s], mean, out=centred[s]), len(x))
        inv_std = 1.0 / (var + self.eps) ** 0.5
        factor = weight * inv_std  # the per-channel factors folded before touching the map
        y = xp.empty_like(centred) if cache else centred  # centred is not kept: y in its array

        def affine(s):  # y = centred * factor + bias
            part = xp.multiply(centred[s], factor, out=y[s])
            part += bias
        each(affine, len(x))
        return y, (centred, inv_std)

    def _backward_fast(self, dy, centred, inv_std, axes, bshape, training):
        """The plain twin's gradients from centred: sum(dy x_hat) = inv_std sum(dy centred), factors folded."""
        sum_dy = dy.sum(axis=axes, keepdims=True)
        sum_dy_x_hat = _channel_dot(dy, centred).reshape(bshape) * inv_std  # one dot product per channel
        self.grads["bias"] += sum_dy.reshape(-1)
        self.grads["weight"] += sum_dy_x_hat.reshape(-1)
        scale = self._affine(bshape)[0] * inv_std  # dy/dx_hat * dx_hat/dx, per channel
        xp, each = array_module(dy), elementwise_runner(self.paths, dy)  # each line whole, or over two halves
        dx = xp.empty_like(dy)
        if not training:
            each(lambda s: xp.multiply(dy[s], scale, out=dx[s]), len(dy))  # dx = dy * scale
            return dx
        m = dy.size // self.num_features
        x_hat_factor = inv_std * (sum_dy_x_hat / m) * scale  # per channel
        mean_term = (sum_dy / m) * scale

        def lines(s):
            part, term = xp.multiply(dy[s], scale, out=dx[s]), centred[s]  # dx = dy * scale
            term *= x_hat_factor  # x_hat's term, in centred's own array: the cache is spent
            part -= term
            part -= mean_term
        each(lines, len(dy))
        return dx

    # ------------------------------------------------------------ the CUDA-kernel twin

    def _forward_cuda(self, x, axes, bshape, cache):
        """The plain twin with its elementwise lines as CUDA kernels. -> y, (x_hat, inv_std)"""
        weight, bias = self._affine(bshape)
        mean, var = self._statistics(x, axes, bshape)
        inv_std = kernels.batchnorm_inv_std(var, self.eps)
        x_hat, y = kernels.batchnorm_normalize(x, mean, inv_std, weight, bias)
        return y, (x_hat, inv_std)

    def _backward_cuda(self, dy, x_hat, inv_std, axes, bshape, training):
        """The plain twin's gradients from the per-channel sums, dx as one CUDA kernel."""
        weight, _ = self._affine(bshape)
        sum_dy = dy.sum(axis=axes, keepdims=True)
        sum_dy_x_hat = (dy * x_hat).sum(axis=axes, keepdims=True)
        self.grads["bias"] += sum_dy.reshape(-1)
        self.grads["weight"] += sum_dy_x_hat.reshape(-1)
        if not training:
            return dy * (weight * inv_std)
        return kernels.batchnorm_backward(dy, x_hat, weight, inv_std, sum_dy, sum_dy_x_hat,
                                          dy.size // self.num_features)


def _channel_dot(a, b):
    """sum(a * b) over every axis but the channel axis 1, in one pass: a, b: (N, C) or (N, C, H, W) -> (C,)."""
    xp = array_module(a)
    n, c = a.shape[:2]
    return xp.einsum("ncs,ncs->c", a.reshape(n, c, -1), b.reshape(n, c, -1))
