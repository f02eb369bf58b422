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
        axes, bshape = self._axes_and_shape(x)
        xp = array_module(x)
        gpu = kernels.on_gpu(x)  # CuPy: the elementwise chains below as fused kernels (refimpl/kernels.py)
        if self.training:
            count = x.size // self.num_features
            if count < 2:
                raise ValueError(f"BatchNorm in training mode needs >= 2 values per channel, got x of shape {tuple(x.shape)}")
            mean = x.mean(axis=axes, keepdims=True)
            centred = x - mean
            squares = centred * centred  # becomes y's buffer below (fewer fresh arrays: page faults)
            var = squares.mean(axis=axes, keepdims=True)
            if self.update_running:
                var_scale = 1.0 if self.running_var == "biased" else count / (count - 1)
                self._update_running(mean.reshape(-1), var.reshape(-1), var_scale, gpu)
        else:
            mean = self.buffers["running_mean"].reshape(bshape)
            var = self.buffers["running_var"].reshape(bshape)
            centred = None if gpu else x - mean
            squares = None
        weight, bias = self.params["weight"].reshape(bshape), self.params["bias"].reshape(bshape)
        if gpu:
            inv_std = kernels.batchnorm_inv_std(var, self.eps)
            x_hat, y = kernels.batchnorm_normalize(x, mean, inv_std, weight, bias)
        else:
            inv_std = 1.0 / (var + self.eps) ** 0.5
            x_hat = centred
            x_hat *= inv_std  # x_hat = (x - mean) inv_std, in centred's memory
            y = xp.multiply(x_hat, weight, out=squares)  # y = weight x_hat + bias
            y += bias
        self._cache = (x_hat, inv_std, axes, bshape, self.training) if cache else None
        return y

    def _update_running(self, mean, var, var_scale, gpu):
        """running = momentum * running + (1 - momentum) * batch; the variance stored is var * var_scale."""
        m, running_mean, running_var = self.momentum, self.buffers["running_mean"], self.buffers["running_var"]
        if gpu:
            kernels.batchnorm_running_update(running_mean, running_var, mean, var, momentum=m, var_scale=var_scale)
            return
        running_mean[...] = m * running_mean + (1 - m) * mean
        running_var[...] = m * running_var + (1 - m) * (var * var_scale)

    def backward(self, dy):
        x_hat, inv_std, axes, bshape, training = self._take_cache()
        sum_dy = dy.sum(axis=axes, keepdims=True)
        dy_x_hat = dy * x_hat  # its memory is reused below
        sum_dy_x_hat = dy_x_hat.sum(axis=axes, keepdims=True)
        self.grads["bias"] += sum_dy.reshape(-1)
        self.grads["weight"] += sum_dy_x_hat.reshape(-1)
        weight = self.params["weight"].reshape(bshape)
        m = x_hat.size // self.num_features
        if training and kernels.on_gpu(dy):  # the expression below as one kernel
            return kernels.batchnorm_backward(dy, x_hat, weight, inv_std, sum_dy, sum_dy_x_hat, m)
        scale = weight * inv_std  # dy/dx_hat * dx_hat/dx, per channel
        if not training:
            return dy * scale
        # d/dx of (x - mean) / sqrt(var + eps) with mean and var taken from the batch itself:
        # dx = w inv_std (dy - mean(dy) - x_hat mean(dy x_hat)), means over the m values of a channel
        dx = dy - sum_dy / m
        dx -= array_module(dy).multiply(x_hat, sum_dy_x_hat / m, out=dy_x_hat)
        dx *= scale
        return dx
