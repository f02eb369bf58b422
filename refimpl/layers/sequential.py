"""Sequential: layers applied in order, backward in reverse.

Children are named "0", "1", ... as in ``torch.nn.Sequential``, or by the caller when
given ``(name, layer)`` pairs (as ``torch.nn.Sequential(OrderedDict(...))``), so that
parameter names do not depend on parameter-free layers in between.
"""

from __future__ import annotations

from .layer import Layer


class Sequential(Layer):
    def __init__(self, *layers):
        super().__init__()
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(layers)]
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            raise ValueError(f"Sequential child names must be unique, got {names}")
        self.named_layers = named

    @property
    def layers(self):
        return [layer for _, layer in self.named_layers]

    def __getitem__(self, name: str) -> Layer:
        return dict(self.named_layers)[name]

    def children(self):
        return list(self.named_layers)

    def twin(self) -> "Sequential":
        twin = super().twin()
        twin.named_layers = [(name, layer.twin()) for name, layer in self.named_layers]
        return twin

    def forward(self, x, cache=True):
        for _, layer in self.named_layers:
            x = layer.forward(x, cache=cache)
        return x

    def backward(self, dy):
        """The chain rule: each layer's backward, last layer first."""
        for _, layer in reversed(self.named_layers):
            dy = layer.backward(dy)
        return dy
