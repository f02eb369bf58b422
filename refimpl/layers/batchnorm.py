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

``in_place`` (default True): the same operations in the same order, bit for bit, but
written into arrays the layer already holds (a training forward allocates two arrays
instead of five, a backward one instead of five); False runs the plain formulas, the
reference the in-place path is tested against (tests/test_batchnorm.py). Fresh arrays
cost a page fault per 4 KiB on first touch (bench/NOTES.md).
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
        self.in_place = True
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
        centred = squares = None
        if self.training:
            count = x.size // self.num_features
            if count < 2:
                raise ValueError(f"BatchNorm in training mode needs >= 2 values per channel, got x of shape {tuple(x.shape)}")
            mean = x.mean(axis=axes, keepdims=True)
            centred = x - mean
            squares = centred * centred
            var = squares.mean(axis=axes, keepdims=True)
            if self.update_running:
                self._update_running(mean.reshape(-1), var.reshape(-1), 1.0 if self.running_var == "biased"
                                     else count / (count - 1))
        else:
            mean = self.buffers["running_mean"].reshape(bshape)
            var = self.buffers["running_var"].reshape(bshape)
        weight, bias = self.params["weight"].reshape(bshape), self.params["bias"].reshape(bshape)
        if kernels.enabled_for(x):  # the three lines below as CUDA kernels (refimpl/kernels.py)
            inv_std = kernels.batchnorm_inv_std(var, self.eps)
            x_hat, y = kernels.batchnorm_normalize(x, mean, inv_std, weight, bias)
        else:
            inv_std = 1.0 / (var + self.eps) ** 0.5
            if self._in_place_for(x):
                x_hat, y = _normalize_in_place(x, mean, inv_std, weight, bias, centred, squares)
            else:
                x_hat = (x - mean if centred is None else centred) * inv_std
                y = x_hat * weight + bias
        self._cache = (x_hat, inv_std, axes, bshape, self.training) if cache else None
        return y

    def _in_place_for(self, *arrays):
        """The in-place path applies: asked for, and every array in the parameters' dtype (no promotion)."""
        dtype = self.params["weight"].dtype
        return self.in_place and all(a.dtype == dtype for a in arrays)

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
        x_hat, inv_std, axes, bshape, training = self._take_cache()
        sum_dy = dy.sum(axis=axes, keepdims=True)
        dy_x_hat = dy * x_hat
        sum_dy_x_hat = dy_x_hat.sum(axis=axes, keepdims=True)
        self.grads["bias"] += sum_dy.reshape(-1)
        self.grads["weight"] += sum_dy_x_hat.reshape(-1)
        scale = self.params["weight"].reshape(bshape) * inv_std  # dy/dx_hat * dx_hat/dx, per channel
        if not training:
            return dy * scale
        m = x_hat.size // self.num_features
        if kernels.enabled_for(dy):  # the line below as one CUDA kernel
            return kernels.batchnorm_backward(dy, x_hat, self.params["weight"].reshape(bshape), inv_std, sum_dy,
                                              sum_dy_x_hat, m)
        if not self._in_place_for(dy, x_hat):
            return (dy - sum_dy / m - x_hat * (sum_dy_x_hat / m)) * scale
        # The line above in dy * x_hat's array, with x_hat's (the cache is spent) for its last product.
        xp = array_module(dy)
        dx = xp.subtract(dy, sum_dy / m, out=dy_x_hat)
        dx -= xp.multiply(x_hat, sum_dy_x_hat / m, out=x_hat)
        dx *= scale
        return dx


def _normalize_in_place(x, mean, inv_std, weight, bias, centred, spare):
    """x_hat = (x - mean) * inv_std and y = x_hat * weight + bias, computed as the plain lines in
    BatchNorm.forward compute them, with x_hat in ``centred``'s array and y in ``spare``'s (the
    squares, spent once var is known) where the caller has them. x: (N, C[, H, W]) -> (x_hat, y)."""
    xp = array_module(x)
    x_hat = x - mean if centred is None else centred
    x_hat *= inv_std
    y = x_hat * weight if spare is None else xp.multiply(x_hat, weight, out=spare)
    y += bias
    return x_hat, y
