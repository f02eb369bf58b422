"""Elementwise activations: LeakyReLU (the paper's leakiness 0.02) and a stable Sigmoid."""

from __future__ import annotations

from ..backend import array_module
from .layer import Layer


class LeakyReLU(Layer):
    """y = x for x > 0, slope * x otherwise. x: any shape.

    At x == 0 exactly the derivative is taken as ``slope`` (as PyTorch does).
    """

    def __init__(self, slope=0.02):
        super().__init__()
        self.slope = slope

    def forward(self, x, cache=True):
        xp = array_module(x)
        positive = x > 0
        self._cache = positive if cache else None
        return xp.where(positive, x, x * self.slope)

    def backward(self, dy):
        positive = self._take_cache()
        xp = array_module(dy)
        return xp.where(positive, dy, dy * self.slope)


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp is only taken of -|x|."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))."""
    xp = array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


class Sigmoid(Layer):
    """y = sigmoid(x), dy/dx = y (1 - y). x: any shape."""

    def forward(self, x, cache=True):
        y = sigmoid(x)
        self._cache = y if cache else None
        return y

    def backward(self, dy):
        y = self._take_cache()
        return dy * y * (1 - y)
