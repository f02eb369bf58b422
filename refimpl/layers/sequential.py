"""Sequential: layers applied in order; backward in reverse. Children are named "0", "1", ... as in torch.nn.Sequential."""

from __future__ import annotations

from .layer import Layer


class Sequential(Layer):
    def __init__(self, *layers: Layer):
        super().__init__()
        self.layers = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x, cache=True):
        for layer in self.layers:
            x = layer.forward(x, cache=cache)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy
