"""Seeded random draws that give the same numbers on every backend.

All randomness in refimpl flows from explicit ``numpy.random.Generator`` objects
(PCG64) that the caller creates from a seed and passes in; nothing uses global
state. Draws are made on the host in float64 and then cast and copied to the
backend, so NumPy and CuPy runs (and float32 and float64 runs) see the same
underlying numbers for the same seed. Draws used by one training step are small
(batch x latent size), so the host round trip costs little.
"""

from __future__ import annotations

import numpy

from .backend import to_device


def generator(seed: int) -> numpy.random.Generator:
    """A fresh PCG64 generator for ``seed`` (a non-negative int)."""
    if not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")
    return numpy.random.Generator(numpy.random.PCG64(int(seed)))


def standard_normal(rng: numpy.random.Generator, shape, xp, dtype):
    """N(0, 1) draws of ``shape`` on backend ``xp`` in ``dtype``."""
    return to_device(rng.standard_normal(shape), xp, dtype)


def uniform(rng: numpy.random.Generator, shape, xp, dtype, low: float = 0.0, high: float = 1.0):
    """U(low, high) draws of ``shape`` on backend ``xp`` in ``dtype``."""
    return to_device(rng.uniform(low, high, shape), xp, dtype)


def get_state(rng: numpy.random.Generator) -> dict:
    """The generator's full state, as a plain dict (for checkpoints)."""
    return rng.bit_generator.state


def set_state(rng: numpy.random.Generator, state: dict) -> None:
    """Restore a state taken by :func:`get_state`, so draws continue bit for bit."""
    rng.bit_generator.state = state
