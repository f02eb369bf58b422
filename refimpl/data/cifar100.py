"""CIFAR-100: 32x32 RGB photos from the python pickles, upscaled to 64x64.

Files (``cifar-100-python/`` from ``cifar-100-python.tar.gz``, fetched by
``python data_scripts/cifar100.py``): ``train`` (50,000 images), ``test`` (10,000),
``meta``. Each split is a pickled dict (read with ``encoding="latin1"``) holding
``data``: (N, 3072) uint8, every row the R, G and B planes of 1024 pixels each,
row-major, so ``data.reshape(N, 3, 32, 32)`` is NCHW; and ``fine_labels`` (N ints
0..99), ``coarse_labels``, ``filenames``.

Upscaling 32 -> 64: the paper says it upscales but not how. The default here is
nearest neighbour (``upscale="nearest"``): every pixel becomes a 2x2 block. It is
exact and implementation-independent, adds no pixel values that were not in the
photo, and is invertible (take every second pixel), so the 64x64 data hold exactly
the information of the 32x32 data. ``upscale="bilinear"`` uses Pillow's bilinear
resize instead (smoother, but it invents in-between values). Images are kept as
32x32 uint8 (150 MB for train) and upscaled per batch in ``get``.

The pickles are read with an unpickler that only builds dicts, lists, strings and
numpy arrays, so a tampered file cannot run code.

``get(indices) -> x: (B, 3, 64, 64)`` float in [0, 1] (RGB channels in order).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy

from .base import ArrayImages
from .errors import bad_file, not_found

TITLE = "CIFAR-100"
FOLDER = "cifar-100-python"
SPLITS = ("train", "test")
UPSCALES = ("nearest", "bilinear")

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar100_pickle(path: str | os.PathLike) -> tuple[numpy.ndarray, numpy.ndarray]:
    """One split file: images (N, 3, 32, 32) uint8 (RGB) and fine labels (N,) int64."""
    path = Path(path)
    if not path.is_file():
        raise not_found(TITLE, path, "cifar100.py", path.parent.parent if path.parent.name == FOLDER else path.parent)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise bad_file(TITLE, path, f"is not a readable CIFAR python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise bad_file(TITLE, path, f"holds a {type(obj).__name__}, expected a dict with 'data' and 'fine_labels'")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for key in ("data", "fine_labels"):
        if key not in obj:
            raise bad_file(TITLE, path, f"has no key {key!r} (found {sorted(obj)}); expected data (N, 3072) uint8 "
                           "and fine_labels")
    data = obj["data"]
    if not isinstance(data, numpy.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise bad_file(TITLE, path, f"data has shape {shape}, expected (N, 3072) (R, G, B planes of 32x32)")
    if data.dtype != numpy.uint8:
        raise bad_file(TITLE, path, f"data has dtype {data.dtype}, expected uint8")
    try:
        labels = numpy.asarray(obj["fine_labels"], dtype=numpy.int64)
    except (TypeError, ValueError):
        raise bad_file(TITLE, path, "fine_labels is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise bad_file(TITLE, path, f"fine_labels has shape {labels.shape}, expected ({data.shape[0]},)")
    return numpy.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels


def upscale_nearest(x: numpy.ndarray, factor: int = 2) -> numpy.ndarray:
    """x: (B, C, H, W) -> (B, C, factor H, factor W), each pixel a factor x factor block."""
    return x.repeat(factor, axis=2).repeat(factor, axis=3)


def upscale_bilinear(x: numpy.ndarray, size: int = 64) -> numpy.ndarray:
    """x: (B, C, H, W) uint8 -> (B, C, size, size) uint8 with Pillow's bilinear resize."""
    from PIL import Image

    out = numpy.empty(x.shape[:2] + (size, size), dtype=numpy.uint8)
    for b in range(x.shape[0]):
        img = Image.fromarray(numpy.ascontiguousarray(x[b].transpose(1, 2, 0)))
        out[b] = numpy.asarray(img.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    return out


class CIFAR100(ArrayImages):
    """CIFAR-100 split held as (N, 3, 32, 32) uint8; ``get`` returns (B, 3, 64, 64) upscaled."""

    def __init__(self, images: numpy.ndarray, labels: numpy.ndarray, upscale: str = "nearest", path=None):
        if upscale not in UPSCALES:
            raise ValueError(f"upscale={upscale!r}: expected one of {', '.join(UPSCALES)}")
        super().__init__("cifar100", images, "NCHW", max_value=255, labels=labels)
        self.upscale = upscale
        self.path = path
        self.shape = (3, 64, 64)

    def get_uint8(self, indices) -> numpy.ndarray:
        """Upscaled uint8 images (B, 3, 64, 64)."""
        small = super().get_uint8(indices)
        return upscale_nearest(small) if self.upscale == "nearest" else upscale_bilinear(small)


def load_cifar100(path: str | os.PathLike, split: str = "train", upscale: str = "nearest") -> CIFAR100:
    """CIFAR-100 ``split`` from the split file, ``cifar-100-python/``, or the folder holding it."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    if upscale not in UPSCALES:
        raise ValueError(f"upscale={upscale!r}: expected one of {', '.join(UPSCALES)}")
    path = Path(path)
    if path.is_dir():
        path = path / split if (path / split).is_file() or not (path / FOLDER).is_dir() else path / FOLDER / split
    elif not path.exists() and path.name not in SPLITS:  # a folder not there yet: where the script unpacks
        path = path / split if path.name == FOLDER else path / FOLDER / split
    images, labels = read_cifar100_pickle(path)
    return CIFAR100(images, labels, upscale, path=path)
