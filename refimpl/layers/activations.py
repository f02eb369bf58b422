"""Elementwise activations: LeakyReLU (the paper's leakiness 0.02) and a stable Sigmoid."""

from __future__ import annotations

from ..backend import array_module
from .layer import Layer


class LeakyReLU(Layer):
    """y = x for x > 0, slope * x otherwise; 0 <= slope <= 1. x: any shape.

    At x == 0 exactly the derivative is taken as ``slope`` (as PyTorch does). Both passes
    multiply by scale = 1[x > 0] (1 - slope) + slope, which is exactly 1 or exactly
    slope in floating point for 0 <= slope <= 1 (so y is exactly x or slope * x);
    arithmetic on the mask is several times faster than ``where`` in NumPy.
    """

    def __init__(self, slope=0.02):
        super().__init__()
        if not 0 <= slope <= 1:
            raise ValueError(f"LeakyReLU slope={slope!r}: expected a value in [0, 1]")
        self.slope = slope

    def _scale(self, positive, dtype):
        scale = positive.astype(dtype)
        scale *= dtype.type(1 - self.slope)
        scale += dtype.type(self.slope)
        return scale

    def forward(self, x, cache=True):
        positive = x > 0
        self._cache = positive if cache else None
        return x * self._scale(positive, x.dtype)

    def backward(self, dy):
        """dx = dy * (1 if x > 0 else slope)."""
        return dy * self._scale(self._take_cache(), dy.dtype)


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp(min(x, 0)) / (1 + exp(-|x|)).

    For x >= 0 that is 1 / (1 + exp(-x)); for x < 0, exp(x) / (1 + exp(x)); no
    exponent is ever positive, and no ``where`` is needed.
    """
    xp = array_module(x)
    return xp.exp(xp.minimum(x, 0)) / (1 + xp.exp(-xp.abs(x)))


class Sigmoid(Layer):
    """y = sigmoid(x), dy/dx = y (1 - y). x: any shape."""

    def forward(self, x, cache=True):
        y = sigmoid(x)
        self._cache = y if cache else None
        return y

    def backward(self, dy):
        """dx = dy * y (1 - y)."""
        y = self._take_cache()
        return dy * y * (1 - y)
