"""The interface every dataset offers, and the uint8-array dataset most of them are.

A dataset is a small object with

- ``name``: its registry name, e.g. ``"dsprites"``;
- ``shape``: one image's shape ``(C, H, W)``;
- ``len(ds)``: the number of images N;
- ``ds.get(indices, dtype=float32)``: images ``x: (B, C, H, W)`` for ``indices: (B,)``,
  a new host (NumPy) array with values in [0, 1], in the order of ``indices``.

Images stay on the host as uint8 (in memory, or on disk read row by row); only the batch that
``get`` returns is float. The model moves it to the device with
``refimpl.backend.to_device``.
"""

from __future__ import annotations

from typing import Protocol

import numpy


class Dataset(Protocol):
    """What training and evaluation use: see the module docstring."""

    name: str
    shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get(self, indices, dtype=numpy.float32) -> numpy.ndarray: ...


def check_indices(indices, n: int) -> numpy.ndarray:
    """``indices`` as an int64 array (B,), every entry in [0, n); IndexError otherwise."""
    idx = numpy.asarray(indices)
    if idx.ndim != 1:
        raise IndexError(f"indices must be one-dimensional, got shape {idx.shape}")
    if idx.size == 0:
        return idx.astype(numpy.int64)
    if not numpy.issubdtype(idx.dtype, numpy.integer):
        raise IndexError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(numpy.int64, copy=False)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= n:
        bad = low if low < 0 else high
        raise IndexError(f"index {bad} out of range for a dataset of {n} images")
    return idx


def check_float_dtype(dtype) -> numpy.dtype:
    """``dtype`` as a NumPy floating dtype (float32 or float64)."""
    dt = numpy.dtype(dtype)
    if dt not in (numpy.float32, numpy.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def uint8_to_float(batch: numpy.ndarray, max_value: int, dtype) -> numpy.ndarray:
    """uint8 ``batch`` divided by ``max_value`` (1 for binary images, 255 otherwise) as ``dtype``."""
    dt = check_float_dtype(dtype)
    out = batch.astype(dt)
    if max_value != 1:
        out /= dt.type(max_value)
    return out


class ArrayImages:
    """A dataset backed by one uint8 array of images.

    ``images`` is ``(N, H, W)`` (one channel), ``(N, H, W, C)`` (``layout="NHWC"``) or
    ``(N, C, H, W)`` (``layout="NCHW"``); a numpy array, or anything indexable by an
    index array with that shape (e.g. :class:`refimpl.data.npz.FileRows`). Pixel
    values are 0..``max_value``; ``get`` divides by ``max_value``. ``labels`` (N,) or
    (N, K), if given, are kept for evaluation and plots.
    """

    def __init__(self, name: str, images: numpy.ndarray, layout: str, max_value: int, labels=None):
        if layout not in ("NHW", "NHWC", "NCHW"):
            raise ValueError(f"layout={layout!r}: expected NHW, NHWC or NCHW")
        self.name = name
        self.images = images
        self.layout = layout
        self.max_value = int(max_value)
        self.labels = labels
        if layout == "NHW":
            self.shape = (1, images.shape[1], images.shape[2])
        elif layout == "NHWC":
            self.shape = (images.shape[3], images.shape[1], images.shape[2])
        else:
            self.shape = tuple(images.shape[1:4])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} images of shape {self.shape}>"

    def get_uint8(self, indices) -> numpy.ndarray:
        """The raw uint8 images for ``indices``, as ``(B, C, H, W)``."""
        idx = check_indices(indices, len(self))
        batch = numpy.asarray(self.images[idx])
        if self.layout == "NHW":
            return batch[:, None, :, :]
        if self.layout == "NHWC":
            return numpy.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return batch

    def get(self, indices, dtype=numpy.float32) -> numpy.ndarray:
        """Images ``x: (B, C, H, W)`` in [0, 1] for ``indices: (B,)``."""
        return uint8_to_float(self.get_uint8(indices), self.max_value, dtype)


def downsample(x, factor: int):
    """Average-pool images x: (B, C, H, W) by ``factor`` in both directions -> (B, C, H/f, W/f)."""
    if factor == 1:
        return x
    b, c, h, w = x.shape
    return x.reshape(b, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
