"""MNIST: 28x28 grey digits from the idx files (gzipped or not).

Files (fetched by ``python data_scripts/mnist.py``): ``train-images-idx3-ubyte`` (60,000),
``t10k-images-idx3-ubyte`` (10,000) and the matching ``*-labels-idx1-ubyte``, each
optionally ``.gz`` (detected from the content, not the name).

idx format: big-endian int32 header. Images: magic 2051, count, rows, cols, then
count * rows * cols uint8 pixels from byte 16. Labels: magic 2049, count, then count
uint8 from byte 8.

``get(indices) -> x: (B, 1, 28, 28)`` float in [0, 1] (pixels / 255).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy

from .base import ArrayImages
from .errors import bad_file, not_found

TITLE = "MNIST"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic 1f 8b."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise bad_file(TITLE, path, f"cannot be read or gunzipped ({type(exc).__name__}: {exc})") from None
    return data


def _check_magic(path: Path, data: bytes, expected: int, what: str) -> None:
    """The big-endian int32 at byte 0 must be ``expected`` (2051 images, 2049 labels)."""
    if len(data) < 4:
        raise bad_file(TITLE, path, f"is {len(data)} bytes, too short for an idx header")
    magic = int(numpy.frombuffer(data, ">i4", 1)[0])
    if magic != expected:
        other = {IMAGES_MAGIC: " (that is an image file)", LABELS_MAGIC: " (that is a label file)"}.get(magic, "")
        raise bad_file(TITLE, path, f"magic number {magic}{other}, expected {expected} for idx {what}")


def read_idx_images(path: str | os.PathLike) -> numpy.ndarray:
    """An idx3 image file: (N, rows, cols) uint8."""
    path = Path(path)
    if not path.is_file():
        raise not_found(TITLE, path, "mnist.py", path.parent)
    data = _read_bytes(path)
    _check_magic(path, data, IMAGES_MAGIC, "images")
    if len(data) < 16:
        raise bad_file(TITLE, path, f"is {len(data)} bytes, too short for an idx image header (16 bytes)")
    magic, n, rows, cols = (int(v) for v in numpy.frombuffer(data, ">i4", 4))
    if n < 0 or rows <= 0 or cols <= 0:
        raise bad_file(TITLE, path, f"header says {n} images of {rows}x{cols}, expected positive sizes")
    need = 16 + n * rows * cols
    if len(data) != need:
        raise bad_file(TITLE, path, f"is {len(data)} bytes, expected {need} for {n} images of {rows}x{cols} "
                       "(truncated or corrupt)")
    return numpy.frombuffer(data, numpy.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: str | os.PathLike) -> numpy.ndarray:
    """An idx1 label file: (N,) uint8."""
    path = Path(path)
    if not path.is_file():
        raise not_found(TITLE, path, "mnist.py", path.parent)
    data = _read_bytes(path)
    _check_magic(path, data, LABELS_MAGIC, "labels")
    if len(data) < 8:
        raise bad_file(TITLE, path, f"is {len(data)} bytes, too short for an idx label header (8 bytes)")
    magic, n = (int(v) for v in numpy.frombuffer(data, ">i4", 2))
    if len(data) != 8 + n:
        raise bad_file(TITLE, path, f"is {len(data)} bytes, expected {8 + n} for {n} labels (truncated or corrupt)")
    return numpy.frombuffer(data, numpy.uint8, offset=8).copy()


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(path: str | os.PathLike, split: str = "train", labels: bool = True) -> ArrayImages:
    """MNIST ``split`` ("train" or "test") from a folder of idx files, or one idx image file.

    Labels (N,) uint8 are read from the matching label file when it is there (``ds.labels``).
    """
    if split not in FILES:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    path = Path(path)
    label_path = None
    folder = path.is_dir() or not (path.exists() or path.name.startswith(("train-", "t10k-")))  # perhaps not there yet
    if folder:
        image_path = _find(path, FILES[split][0])
        if image_path is None:
            raise not_found(TITLE, path / (FILES[split][0] + ".gz"), "mnist.py", path)
        if labels:
            label_path = _find(path, FILES[split][1])
    else:
        image_path = path
    images = read_idx_images(image_path)
    y = read_idx_labels(label_path) if label_path is not None else None
    if y is not None and y.shape[0] != images.shape[0]:
        raise bad_file(TITLE, label_path, f"has {y.shape[0]} labels but {image_path} has {images.shape[0]} images")
    return ArrayImages("mnist", images, "NHW", max_value=255, labels=y)
