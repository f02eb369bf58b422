"""The one module that chooses between NumPy and CuPy.

Everything else gets its array module ``xp`` from here: either from a backend name
(:func:`get_xp`, for creating parameters and moving data) or from the arrays it is
handed (:func:`array_module`, inside ops), so both backends can live in one process.

The backend name comes from ``--backend`` on the command line or the environment
variable ``REFIMPL_BACKEND`` (default ``numpy``). Computation dtype is float32 by
default, float64 on request (:func:`get_dtype`).
"""

from __future__ import annotations

import os

import numpy

BACKENDS = ("numpy", "cupy")
DTYPES = {"float32": numpy.float32, "float64": numpy.float64}
ENV_VAR = "REFIMPL_BACKEND"


class BackendError(RuntimeError):
    """A backend or dtype was asked for that cannot be had; the message is one line."""


def backend_name(name: str | None = None) -> str:
    """Resolve ``name`` (or ``$REFIMPL_BACKEND``, or ``numpy``) to a known backend name."""
    resolved = name if name is not None else (os.environ.get(ENV_VAR) or "numpy")
    if resolved not in BACKENDS:
        source = "backend" if name is not None else f"${ENV_VAR}"
        raise BackendError(f"{source}={resolved!r}: expected one of {', '.join(BACKENDS)}")
    return resolved


def get_xp(name: str | None = None):
    """The array module for backend ``name``: ``numpy`` or ``cupy``.

    Asking for CuPy without CuPy installed, or without a usable CUDA device, raises a
    one-line :class:`BackendError` instead of an ImportError or CUDA trace.
    """
    resolved = backend_name(name)
    if resolved == "numpy":
        return numpy
    try:
        import cupy
    except ImportError as exc:
        raise BackendError(
            f"backend 'cupy' needs CuPy, which is not importable ({exc}); "
            "install it with: pip install 'refimpl[gpu]'"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver/runtime errors come in several types
        raise BackendError(f"backend 'cupy' needs a CUDA device, but CUDA reported: {exc}") from None
    if count < 1:
        raise BackendError("backend 'cupy' needs a CUDA device, but none is visible")
    return cupy


def cuda_available() -> bool:
    """True when the cupy backend can be used (for tests that skip without CUDA)."""
    try:
        get_xp("cupy")
    except BackendError:
        return False
    return True


def array_module(*arrays):
    """The array module (numpy or cupy) that owns ``arrays``; numpy for host arrays."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    return numpy


def get_dtype(name: str = "float32"):
    """The NumPy dtype for ``name`` (``float32`` or ``float64``)."""
    if name not in DTYPES:
        raise BackendError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return numpy.dtype(DTYPES[name])


def to_device(host_array, xp, dtype=None):
    """``host_array`` on backend ``xp``, cast to ``dtype`` if given: a copy on CuPy; on NumPy the
    same array when no cast is needed."""
    a = numpy.asarray(host_array)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    return a if xp is numpy else xp.asarray(a)


def to_host(a):
    """A NumPy copy (or view) of ``a``, wherever it lives; Python scalars pass through as 0-d arrays."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return numpy.asarray(a)
