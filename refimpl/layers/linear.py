"""Linear: y = x W^T + b, weight (out_features, in_features) as in PyTorch."""

from __future__ import annotations

import numpy

from .init import init_weight_bias
from .layer import Layer


class Linear(Layer):
    """x: (N, in_features) -> y: (N, out_features)."""

    def __init__(self, in_features, out_features, *, rng, xp=numpy, dtype=numpy.float32, init="torch"):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear(in_features={in_features}, out_features={out_features}): both must be >= 1")
        self.in_features, self.out_features = in_features, out_features
        weight, bias = init_weight_bias(rng, (out_features, in_features), xp, dtype, init)
        self.params = {"weight": weight, "bias": bias}
        self.grads = {"weight": xp.zeros_like(weight), "bias": xp.zeros_like(bias)}

    def forward(self, x, cache=True):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expected x of shape (N, in_features={self.in_features}), got {tuple(x.shape)}")
        self._cache = x if cache else None
        return x @ self.params["weight"].T + self.params["bias"]

    def backward(self, dy):
        """dW = dy^T x, db = sum_n dy, dx = dy W."""
        x = self._take_cache()
        self.grads["weight"] += dy.T @ x
        self.grads["bias"] += dy.sum(axis=0)
        return dy @ self.params["weight"]
