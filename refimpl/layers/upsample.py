"""Nearest-neighbour upsampling by an integer factor: each pixel becomes a factor x factor block."""

from __future__ import annotations

from ..backend import array_module
from .layer import Layer


class Upsample(Layer):
    """x: (N, C, H, W) -> y: (N, C, f*H, f*W), y[n, c, i, j] = x[n, c, i // f, j // f]."""

    def __init__(self, factor=2):
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"Upsample factor={factor!r}: expected an integer >= 1")
        self.factor = int(factor)

    def forward(self, x, cache=True):
        if x.ndim != 4:
            raise ValueError(f"Upsample expected x of shape (N, C, H, W), got {tuple(x.shape)}")
        xp = array_module(x)
        n, c, h, w = x.shape
        f = self.factor
        self._cache = True if cache else None
        if f == 1:
            return x.copy()
        return xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, f, w, f)).reshape(n, c, h * f, w * f)

    def backward(self, dy):
        """dx = the sum of dy over each f x f block (every input pixel fed f^2 outputs)."""
        self._take_cache()
        n, c, hf, wf = dy.shape
        f = self.factor
        return dy.reshape(n, c, hf // f, f, wf // f, f).sum(axis=(3, 5))
