"""Flatten (N, C, H, W) -> (N, C*H*W) in row-major (C, H, W) order, as torch.flatten(x, 1); and its inverse."""

from __future__ import annotations

import math

from .layer import Layer


class Flatten(Layer):
    """x: (N, ...) -> y: (N, prod(...))."""

    def forward(self, x, cache=True):
        self._cache = x.shape if cache else None
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        """dx = dy reshaped to x's shape."""
        return dy.reshape(self._take_cache())


class Reshape(Layer):
    """x: (N, prod(shape)) -> y: (N, *shape)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x, cache=True):
        if x.ndim != 2 or x.shape[1] != math.prod(self.shape):
            raise ValueError(f"Reshape{self.shape} expected x of shape (N, {math.prod(self.shape)}), got {tuple(x.shape)}")
        self._cache = x.shape if cache else None
        return x.reshape(x.shape[0], *self.shape)

    def backward(self, dy):
        """dx = dy reshaped to x's shape."""
        return dy.reshape(self._take_cache())
