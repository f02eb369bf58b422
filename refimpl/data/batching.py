"""Seeded splits and an endless, checkpointable stream of index batches.

Batches are index arrays ``(B,)`` into a dataset; ``dataset.get(batch)`` turns one
into images ``x: (B, C, H, W)``, so only the current batch is ever float.

- :func:`split_indices`: a held-out evaluation set and the training set, disjoint,
  drawn from a seeded generator (same seed, same split).
- :class:`BatchIterator`: endless training batches. Each epoch is a fresh permutation
  of the training indices drawn from the generator it was given; with
  ``drop_last`` (default) every batch has exactly ``batch_size`` indices and the last
  ``len % batch_size`` indices of an epoch's order are skipped. ``state_dict()`` holds
  the epoch, the position within it, and the generator state from which the current
  epoch's permutation was drawn; ``load_state_dict()`` redraws that permutation, so a
  resumed run yields the same batches bit for bit. Give the iterator a generator of
  its own (e.g. ``refimpl.rng.generator(seed)``): it draws from it and, on
  ``load_state_dict``, resets it.
- :func:`eval_batches`: consecutive batches over fixed indices, last one partial.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy


def split_indices(n: int, holdout: int | float, rng: numpy.random.Generator) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Split range(n) into (train, held_out) int64 index arrays, each sorted, disjoint, covering range(n).

    ``holdout`` is a count (int) or a fraction of n (float in [0, 1)); the held-out
    indices are the first ones of a permutation drawn from ``rng``.
    """
    if n <= 0:
        raise ValueError(f"n={n}: expected a positive number of items")
    if isinstance(holdout, (float, numpy.floating)):
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout={holdout}: a fraction must be in [0, 1)")
        count = int(round(holdout * n))
    else:
        count = int(holdout)
    if not 0 <= count < n:
        raise ValueError(f"holdout={holdout}: expected a count in [0, {n}) or a fraction in [0, 1)")
    perm = rng.permutation(n)
    return numpy.sort(perm[count:]), numpy.sort(perm[:count])


class BatchIterator:
    """Endless batches of ``batch_size`` indices drawn from ``indices`` (an int n means range(n)).

    ``next(it)`` returns an int64 array (B,). Attributes: ``epoch`` (epochs begun
    before the current one), ``position`` (indices of the current epoch already
    handed out), ``batches_per_epoch``.
    """

    def __init__(self, indices, batch_size: int, rng: numpy.random.Generator | None, shuffle: bool = True,
                 drop_last: bool = True):
        idx = numpy.arange(indices, dtype=numpy.int64) if numpy.ndim(indices) == 0 else numpy.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not numpy.issubdtype(idx.dtype, numpy.integer):
            raise ValueError("indices must be a positive int or a non-empty 1-d integer array")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        if drop_last and batch_size > idx.size:
            raise ValueError(f"batch_size={batch_size} exceeds the {idx.size} indices, so no full batch exists")
        if shuffle and not isinstance(rng, numpy.random.Generator):
            raise TypeError("shuffle=True needs a numpy.random.Generator (e.g. refimpl.rng.generator(seed))")
        self.indices = idx.astype(numpy.int64, copy=False)
        self.batch_size = int(batch_size)
        self.rng = rng
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self._start_epoch()

    @property
    def batches_per_epoch(self) -> int:
        n, b = self.indices.size, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _start_epoch(self) -> None:
        if self.shuffle:
            self._epoch_rng_state = self.rng.bit_generator.state
            self._order = self.indices[self.rng.permutation(self.indices.size)]
        else:
            self._epoch_rng_state = None
            self._order = self.indices

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> numpy.ndarray:
        n = self.indices.size
        if self.position >= n or (self.drop_last and n - self.position < self.batch_size):
            self.epoch += 1
            self.position = 0
            self._start_epoch()
        batch = self._order[self.position:self.position + self.batch_size].copy()
        self.position += batch.size
        return batch

    def _fingerprint(self) -> dict:
        return {"n": int(self.indices.size), "indices_crc32": zlib.crc32(self.indices.tobytes()),
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        """Everything needed to continue the same stream: plain Python ints, bools and dicts."""
        return {"epoch": self.epoch, "position": self.position, "epoch_rng_state": self._epoch_rng_state,
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` on an iterator over the same indices)."""
        mine = self._fingerprint()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"batch iterator state has {key}={state.get(key)!r}, but this iterator has {value!r}")
        position = int(state["position"])
        if not 0 <= position <= mine["n"]:
            raise ValueError(f"batch iterator state has position={position}, outside [0, {mine['n']}]")
        if self.shuffle:
            self.rng.bit_generator.state = state["epoch_rng_state"]
        self._start_epoch()
        self.epoch = int(state["epoch"])
        self.position = position


def eval_batches(indices, batch_size: int) -> Iterator[numpy.ndarray]:
    """Consecutive batches of ``indices`` (an int n means range(n)) in order; the last may be short."""
    idx = numpy.arange(indices, dtype=numpy.int64) if numpy.ndim(indices) == 0 else numpy.asarray(indices, numpy.int64)
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    for start in range(0, idx.size, batch_size):
        yield idx[start:start + batch_size]
