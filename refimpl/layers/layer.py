"""The layer protocol every building block follows (Chainer's link, without the graph).

A layer owns three dicts of backend arrays, named as in PyTorch's ``state_dict`` so
weights move between the two without glue:

- ``params``: trainable arrays (``weight``, ``bias``);
- ``grads``: one array per parameter, same shape; ``backward`` *adds* into it;
- ``buffers``: non-trainable state (BatchNorm's running statistics).

``forward(x, cache=True)`` returns the output and, when ``cache`` is true, keeps only
what ``backward`` needs. ``cache=False`` is for passes that are never differentiated
(Algorithm 1 l. 12, the E1 pass): nothing is kept. ``backward(dy)`` returns ``dx``
and accumulates parameter gradients. ``training`` selects batch statistics vs running
statistics in BatchNorm and is ignored by other layers.
"""

from __future__ import annotations

import copy

from ..backend import array_module, to_device, to_host


class Layer:
    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.training = True
        self._cache = None
        self._scratch = {}  # name -> array kept between calls (_buffer)

    def forward(self, x, cache: bool = True):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy):
        """dy: dL/dy shaped like forward's output -> dL/dx; accumulates parameter gradients into ``grads``."""
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def children(self) -> list[tuple[str, "Layer"]]:
        """Named sub-layers; containers override this."""
        return []

    def train(self, mode: bool = True) -> "Layer":
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> "Layer":
        return self.train(False)

    def named_parameters(self, prefix: str = ""):
        """Yield ``(name, param, grad)`` for this layer and its children, PyTorch-style names."""
        for name, p in self.params.items():
            yield prefix + name, p, self.grads[name]
        for child_name, child in self.children():
            yield from child.named_parameters(f"{prefix}{child_name}.")

    def named_buffers(self, prefix: str = ""):
        for name, b in self.buffers.items():
            yield prefix + name, b
        for child_name, child in self.children():
            yield from child.named_buffers(f"{prefix}{child_name}.")

    def parameters(self) -> dict:
        return {name: p for name, p, _ in self.named_parameters()}

    def gradients(self) -> dict:
        return {name: g for name, _, g in self.named_parameters()}

    def state_dict(self) -> dict:
        """Parameters and buffers by name (the arrays themselves, not copies)."""
        state = self.parameters()
        state.update(dict(self.named_buffers()))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into this layer's parameters and buffers, in place; names and shapes must match."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        for name, target in own.items():
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(f"state dict entry {name!r}: expected shape {tuple(target.shape)}, "
                                 f"got {tuple(state[name].shape)}")
        for name, target in own.items():  # host or device values, onto this layer's backend
            target[...] = to_device(to_host(state[name]), array_module(target), target.dtype)

    def twin(self) -> "Layer":
        """A layer that shares this one's ``params``, ``grads`` and ``buffers`` (the same dicts and arrays)
        with its own forward cache, scratch arrays and modes: a second forward may run on it at the same
        time as one on this layer (refimpl/threads.py). Containers twin their children."""
        twin = copy.copy(self)
        twin._cache, twin._scratch = None, {}
        return twin

    def zero_grad(self) -> None:
        for _, _, g in self.named_parameters():
            g[...] = 0

    def _buffer(self, name, shape, dtype, xp):
        """The scratch array ``name``: the kept one when shape, dtype and backend fit, else a new (kept) one.

        For arrays a layer writes and reads itself and never returns (column matrices, GEMM
        outputs): fresh multi-megabyte arrays cost a page fault per 4 KiB page on first touch
        (bench/NOTES.md). Safe because scratch is only read within one call or by the backward
        of the latest cached forward, and every forward replaces (cache=True) or drops
        (cache=False) that cache.
        """
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or array_module(buf) is not xp:
            buf = self._scratch[name] = xp.empty(shape, dtype=dtype)
        return buf

    def _take_cache(self):
        """Return and clear the forward cache; a backward without a cached forward is an error."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a cached forward (forward(x, cache=True))")
        cache, self._cache = self._cache, None
        return cache
