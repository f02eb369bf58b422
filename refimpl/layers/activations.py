"""Elementwise activations: LeakyReLU (the paper's leakiness 0.02) and a stable Sigmoid."""

from __future__ import annotations

from ..backend import array_module
from ..execution import default_paths
from ..threads import elementwise_runner, in_halves
from .layer import Layer


class LeakyReLU(Layer):
    """y = x for x > 0, slope * x otherwise; 0 <= slope <= 1. x: any shape.

    At x == 0 exactly the derivative is taken as ``slope`` (as PyTorch does). Forward is
    y = max(x, slope * x), which for 0 <= slope <= 1 is exactly x or exactly slope * x
    (three passes with the mask instead of five, bench/NOTES.md). Backward multiplies by
    scale = 1[x > 0] (1 - slope) + slope, exactly 1 or exactly slope in floating point;
    arithmetic on the mask is several times faster than ``where`` or ``copyto(where=)``.
    """

    def __init__(self, slope=0.02, *, paths=None):
        super().__init__()
        if not 0 <= slope <= 1:
            raise ValueError(f"LeakyReLU slope={slope!r}: expected a value in [0, 1]")
        self.slope = slope
        self.paths = paths or default_paths("numpy")  # only parallel_elementwise, and only on NumPy arrays

    def _scale(self, positive, dtype):
        scale = array_module(positive).multiply(positive, dtype.type(1 - self.slope), dtype=dtype)  # 0 or 1 - slope
        scale += dtype.type(self.slope)
        return scale

    def forward(self, x, cache=True):
        if elementwise_runner(self.paths, x) is in_halves:
            return self._forward_in_halves(x, cache)
        self._cache = x > 0 if cache else None
        y = x * x.dtype.type(self.slope)
        return array_module(x).maximum(x, y, out=y)

    def backward(self, dy):
        """dx = dy * (1 if x > 0 else slope)."""
        if elementwise_runner(self.paths, dy) is in_halves:
            return self._backward_in_halves(dy)
        scale = self._scale(self._take_cache(), dy.dtype)
        return array_module(dy).multiply(dy, scale, out=scale)

    def _forward_in_halves(self, x, cache):
        """:meth:`forward`'s twin (``parallel_elementwise``, large maps): its lines over the batch's two halves
        side by side (:func:`refimpl.threads.in_halves`); the same values bit for bit."""
        xp, slope = array_module(x), x.dtype.type(self.slope)
        positive = xp.empty(x.shape, dtype=bool) if cache else None
        y = xp.empty_like(x)

        def lines(s):
            if cache:
                xp.greater(x[s], 0, out=positive[s])
            part = xp.multiply(x[s], slope, out=y[s])
            xp.maximum(x[s], part, out=part)
        in_halves(lines, len(x))
        self._cache = positive
        return y

    def _backward_in_halves(self, dy):
        """:meth:`backward`'s twin (``parallel_elementwise``, large maps), over the batch's two halves side by side."""
        positive, dtype = self._take_cache(), dy.dtype
        xp = array_module(dy)
        dx = xp.empty_like(dy)

        def lines(s):
            part = xp.multiply(positive[s], dtype.type(1 - self.slope), dtype=dtype, out=dx[s])
            part += dtype.type(self.slope)
            xp.multiply(dy[s], part, out=part)
        in_halves(lines, len(dy))
        return dx


def sigmoid(x):
    """1 / (1 + exp(-x)) of a float array (or 0-d array) without overflow: exp(min(x, 0)) / (1 + exp(-|x|)).

    For x >= 0 that is 1 / (1 + exp(-x)); for x < 0, exp(x) / (1 + exp(x)); no
    exponent is ever positive, and no ``where`` is needed.
    """
    xp = array_module(x)
    x = xp.asarray(x)
    numerator = xp.minimum(x, 0, out=xp.empty_like(x))
    xp.exp(numerator, out=numerator)
    denominator = xp.abs(x, out=xp.empty_like(x))  # the operations in two arrays instead of six (page faults)
    xp.negative(denominator, out=denominator)
    xp.exp(denominator, out=denominator)
    denominator += 1
    numerator /= denominator
    return numerator


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
