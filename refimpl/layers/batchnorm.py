"""BatchNorm over the channel axis, for linear features (N, C) and conv maps (N, C, H, W).

Training mode normalises with the batch statistics over every axis but C:
mean = mean(x), var = mean((x - mean)^2) (biased), x_hat = (x - mean) / sqrt(var + eps),
y = weight * x_hat + bias. Eval mode uses the running statistics instead.

Running statistics follow Keras's convention, which the paper's "momentum 0.8" is
written in: running = momentum * running + (1 - momentum) * batch. (PyTorch's
``momentum`` is the other weight: Keras 0.8 == PyTorch 0.2.) Which variance the
running estimate stores is a choice: ``running_var="biased"`` (default; Keras stores
the biased batch variance) or ``"unbiased"`` (PyTorch stores var * m / (m - 1),
m = elements per channel). ``eps`` defaults to Keras's 1e-3 (PyTorch's is 1e-5).
``update_running`` lets a caller run a training-mode pass that leaves the running
statistics untouched (interpretation (h) of Algorithm 1: the E1 decoder pass).

``fast`` (default True): the same quantities in fewer passes over the maps, where x, dy
and the parameters share a dtype. var = sum(centred * centred) / m is one dot product per
channel (``einsum``) instead of a squares array and a mean; y = centred * (weight * inv_std)
+ bias folds the per-channel factors before touching the map, and the backward works from
the cached ``centred`` (x_hat = centred * inv_std is never stored), with sum(dy x_hat) =
inv_std sum(dy centred) as a dot product too. A training forward makes 3 passes, a reduction
and a dot product instead of 5 passes and two reductions; a backward 4 passes, a reduction
and a dot product instead of 5 and two (bench/NOTES.md). The sums are
associated differently, so the results equal the plain formulas (``fast = False``, the
reference) to rounding, not bit for bit: tests/test_layers_gradcheck.py holds them to 1e-12
(float64) and 1e-5 (float32) relative to each output's largest value or, where an output is
a cancelling sum (dx for two values per channel), to the inputs' O(1) scale.
"""

from __future__ import annotations

import numpy

from .. import kernels
from ..backend import array_module
from .layer import Layer

RUNNING_VARS = ("biased", "unbiased")


class BatchNorm(Layer):
    """x: (N, C) or (N, C, H, W) -> y: same shape."""

    def __init__(self, num_features, momentum=0.8, eps=1e-3, running_var="biased", *, xp=numpy, dtype=numpy.float32):
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
        self.fast = True
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

    def forward(self, x, cache=True):
        """Training: y = weight (x - mean) / sqrt(var + eps) + bias, mean and (biased) var of the batch per
        channel, and the running statistics updated; eval: the same with the running statistics."""
        axes, bshape = self._axes_and_shape(x)
        fast = self._fast_for(x)
        centred = None
        if self.training:
            count = x.size // self.num_features
            if count < 2:
                raise ValueError(f"BatchNorm in training mode needs >= 2 values per channel, got x of shape {tuple(x.shape)}")
            mean = x.mean(axis=axes, keepdims=True)
            centred = x - mean
            if fast:  # sum(centred^2) per channel as one dot product: no squares array
                var = (_channel_dot(centred, centred) / count).reshape(bshape)
            else:
                var = (centred * centred).mean(axis=axes, keepdims=True)
            if self.update_running:
                self._update_running(mean.reshape(-1), var.reshape(-1), 1.0 if self.running_var == "biased"
                                     else count / (count - 1))
        else:
            mean = self.buffers["running_mean"].reshape(bshape)
            var = self.buffers["running_var"].reshape(bshape)
        weight, bias = self.params["weight"].reshape(bshape), self.params["bias"].reshape(bshape)
        if kernels.enabled_for(x):  # the plain lines below as CUDA kernels (refimpl/kernels.py)
            inv_std = kernels.batchnorm_inv_std(var, self.eps)
            x_hat, y = kernels.batchnorm_normalize(x, mean, inv_std, weight, bias)
            saved = x_hat
        else:
            inv_std = 1.0 / (var + self.eps) ** 0.5
            centred = x - mean if centred is None else centred
            if fast:  # y from centred with the per-channel factors folded; backward keeps centred, not x_hat
                factor = weight * inv_std
                y = centred * factor if cache else array_module(x).multiply(centred, factor, out=centred)  # not kept
                y += bias
                saved = centred
            else:
                x_hat = centred * inv_std
                y = x_hat * weight + bias
                saved = x_hat
        self._cache = (saved, fast, inv_std, axes, bshape, self.training) if cache else None
        return y

    def _fast_for(self, *arrays):
        """The fast path applies: asked for, not on CUDA kernels, every array in the parameters' dtype."""
        dtype = self.params["weight"].dtype
        return self.fast and not kernels.enabled_for(arrays[0]) and all(a.dtype == dtype for a in arrays)

    def _update_running(self, mean, var, var_scale):
        """running = momentum * running + (1 - momentum) * batch; the variance stored is var * var_scale."""
        m, running_mean, running_var = self.momentum, self.buffers["running_mean"], self.buffers["running_var"]
        if kernels.enabled_for(mean):  # the two lines below as one CUDA kernel
            kernels.batchnorm_running_update(running_mean, running_var, mean, var, momentum=m, var_scale=var_scale)
            return
        running_mean[...] = m * running_mean + (1 - m) * mean
        running_var[...] = m * running_var + (1 - m) * (var * var_scale)

    def backward(self, dy):
        """db = sum(dy), dw = sum(dy x_hat) per channel; training: dx = w inv_std (dy - mean(dy) - x_hat
        mean(dy x_hat)), the means over a channel's m values (mean and var depend on x); eval: dx = w inv_std dy."""
        saved, fast_forward, inv_std, axes, bshape, training = self._take_cache()
        centred, x_hat = (saved, None) if fast_forward else (None, saved)
        fast = fast_forward and self._fast_for(dy)
        sum_dy = dy.sum(axis=axes, keepdims=True)
        if fast:  # sum(dy x_hat) = inv_std sum(dy centred), one dot product per channel
            sum_dy_x_hat = _channel_dot(dy, centred).reshape(bshape) * inv_std
        else:
            x_hat = centred * inv_std if x_hat is None else x_hat
            sum_dy_x_hat = (dy * x_hat).sum(axis=axes, keepdims=True)
        self.grads["bias"] += sum_dy.reshape(-1)
        self.grads["weight"] += sum_dy_x_hat.reshape(-1)
        scale = self.params["weight"].reshape(bshape) * inv_std  # dy/dx_hat * dx_hat/dx, per channel
        if not training:
            return dy * scale
        m = dy.size // self.num_features
        if fast:  # the last line with x_hat = centred inv_std and the per-channel factors folded
            dx = dy * scale
            centred *= inv_std * (sum_dy_x_hat / m) * scale  # in centred's own array: the cache is spent
            dx -= centred
            dx -= (sum_dy / m) * scale
            return dx
        if kernels.enabled_for(dy):  # the line below as one CUDA kernel
            return kernels.batchnorm_backward(dy, x_hat, self.params["weight"].reshape(bshape), inv_std, sum_dy,
                                              sum_dy_x_hat, m)
        return (dy - sum_dy / m - x_hat * (sum_dy_x_hat / m)) * scale


def _channel_dot(a, b):
    """sum(a * b) over every axis but the channel axis 1, in one pass: a, b: (N, C) or (N, C, H, W) -> (C,)."""
    xp = array_module(a)
    n, c = a.shape[:2]
    return xp.einsum("ncs,ncs->c", a.reshape(n, c, -1), b.reshape(n, c, -1))
