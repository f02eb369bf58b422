"""Shapes3D (Burgess & Kim 2018): 480,000 RGB 64x64 renders, read lazily from ``3dshapes.h5``.

File (fetch it with ``python data_scripts/shapes3d.py``):

- ``images``: (480000, 64, 64, 3) uint8, 0..255, RGB;
- ``labels``: (480000, 6) float64, factors floor_hue(10), wall_hue(10),
  object_hue(10), scale(8), shape(4), orientation(15); orientation varies fastest
  (flat index = classes @ [48000, 4800, 480, 60, 15, 1]).

The images (5.9 GB as uint8) are never loaded whole: ``get`` reads only the requested
rows through h5py. h5py's fancy indexing needs strictly increasing indices, so a
batch is read at its sorted unique indices and then put back in the asked order.

The official file is gzip-compressed in large chunks, so every random read
decompresses whole chunks; opening such a file warns. The fast path is
:func:`convert_shapes3d` (``python data_scripts/shapes3d.py --uncompressed``): it
copies the file once, chunk by chunk, into an uncompressed ``3dshapes.npz`` (5.9 GB
on disk) that :func:`load_shapes3d` reads in place, row by row. A folder is opened through its
``3dshapes.npz`` if present, else its ``3dshapes.h5``.

``get(indices) -> x: (B, 3, 64, 64)`` float in [0, 1] (RGB channels in order).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy

from .base import ArrayImages, check_indices, uint8_to_float
from .errors import DatasetError, bad_file, not_found
from .npz import load_member, read_members, write_npz

FILENAME = "3dshapes.h5"
FAST_FILENAME = "3dshapes.npz"
LARGE_CHUNK = 8 * 2**20  # compressed chunks above this make random batch reads slow
TITLE = "Shapes3D"
N_IMAGES = 480000
FACTOR_NAMES = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
FACTOR_SIZES = (10, 10, 10, 8, 4, 15)
FACTOR_BASES = (48000, 4800, 480, 60, 15, 1)


class Shapes3D:
    """Lazy reader of ``3dshapes.h5``; see the module docstring.

    ``labels``: (N, 6) float64 factor values, read at open (23 MB). ``chunk_cache_mb``
    sizes h5py's chunk cache (neighbouring reads reuse decompressed chunks).
    """

    name = "shapes3d"
    shape = (3, 64, 64)
    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, path: str | os.PathLike, chunk_cache_mb: int = 64):
        import h5py

        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise not_found(TITLE, path, "shapes3d.py", path.parent)
        self.path = path
        self._chunk_cache = int(chunk_cache_mb) * 2**20
        try:
            self._file = h5py.File(path, "r", rdcc_nbytes=self._chunk_cache)
        except (OSError, ValueError) as exc:
            raise bad_file(TITLE, path, f"not a readable HDF5 file ({exc})") from None
        try:
            self._images, labels = self._check(h5py)
            self.labels = numpy.asarray(labels[...], dtype=numpy.float64)  # (N, 6) factor values, 23 MB
        except (OSError, ValueError, RuntimeError) as exc:
            self._file.close()
            if isinstance(exc, DatasetError):
                raise
            raise bad_file(TITLE, path, f"reading labels failed, the file may be truncated or corrupt ({exc})") from None

    def _check(self, h5py):
        f, path = self._file, self.path
        for key in ("images", "labels"):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise bad_file(TITLE, path, f"has no dataset {key!r} (found {sorted(f.keys())}); "
                               "expected images (N, 64, 64, 3) uint8 and labels (N, 6)")
        images, labels = f["images"], f["labels"]
        if images.ndim != 4 or images.shape[1:] != (64, 64, 3) or images.shape[0] == 0:
            raise bad_file(TITLE, path, f"images has shape {images.shape}, expected (N, 64, 64, 3) (N = {N_IMAGES})")
        if images.dtype != numpy.uint8:
            raise bad_file(TITLE, path, f"images has dtype {images.dtype}, expected uint8")
        if labels.shape != (images.shape[0], 6):
            raise bad_file(TITLE, path, f"labels has shape {labels.shape}, expected ({images.shape[0]}, 6)")
        if images.chunks and images.compression:
            chunk_bytes = int(numpy.prod(images.chunks)) * images.dtype.itemsize
            if chunk_bytes > LARGE_CHUNK:
                warnings.warn(f"{path}: images are {images.compression}-compressed in chunks of "
                              f"{chunk_bytes / 2**20:.0f} MiB, so random batches are slow to read; convert once with "
                              f"python data_scripts/shapes3d.py --out {path.parent} --uncompressed", stacklevel=3)
        return images, labels

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __repr__(self) -> str:
        return f"<Shapes3D {str(self.path)!r}: {len(self)} images of shape {self.shape}>"

    def close(self) -> None:
        """Close the HDF5 file; later ``get`` calls fail."""
        self._file.close()

    def __getstate__(self):  # an open h5py handle does not pickle: reopen on unpickling
        return {"path": self.path, "chunk_cache_mb": self._chunk_cache // 2**20}

    def __setstate__(self, state):
        self.__init__(state["path"], state["chunk_cache_mb"])

    def get_uint8(self, indices) -> numpy.ndarray:
        """Raw images (B, 3, 64, 64) uint8 for ``indices`` (B,)."""
        idx = check_indices(indices, len(self))
        if idx.size == 0:
            return numpy.zeros((0, 3, 64, 64), dtype=numpy.uint8)
        unique, inverse = numpy.unique(idx, return_inverse=True)
        try:
            if unique[-1] - unique[0] + 1 == unique.size:  # a contiguous run: one slice read
                rows = self._images[int(unique[0]):int(unique[-1]) + 1]
            else:
                rows = self._images[unique]
        except (OSError, ValueError, RuntimeError) as exc:
            raise DatasetError(f"{TITLE} file {self.path}: reading images failed, the file may be truncated "
                               f"or corrupt ({exc})") from None
        return numpy.ascontiguousarray(rows[inverse].transpose(0, 3, 1, 2))

    def get(self, indices, dtype=numpy.float32) -> numpy.ndarray:
        """Images ``x: (B, 3, 64, 64)`` in [0, 1] for ``indices`` (B,)."""
        return uint8_to_float(self.get_uint8(indices), 255, dtype)


class Shapes3DArray(ArrayImages):
    """Shapes3D from the uncompressed ``3dshapes.npz`` (read lazily); same interface as :class:`Shapes3D`."""

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, images: numpy.ndarray, labels: numpy.ndarray, path=None):
        super().__init__("shapes3d", images, "NHWC", max_value=255, labels=labels)
        self.path = path

    def close(self) -> None:
        """Nothing to close (the memory map goes with the object); for symmetry with :class:`Shapes3D`."""


def convert_shapes3d(h5_path: str | os.PathLike, out_path: str | os.PathLike, rows: int = 10000) -> Path:
    """Copy ``3dshapes.h5`` into an uncompressed npz (images, labels), ``rows`` images at a time, atomically."""
    src = Shapes3D(h5_path)
    try:
        n = len(src)
        step = max(int(rows), 1)
        if src._images.chunks:  # whole chunks per read: each is decompressed once
            step = max(step // src._images.chunks[0], 1) * src._images.chunks[0]

        def chunks():
            for start in range(0, n, step):
                try:
                    yield src._images[start:min(start + step, n)]
                except (OSError, ValueError, RuntimeError) as exc:
                    raise DatasetError(f"{TITLE} file {src.path}: reading images {start}.. failed ({exc})") from None

        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(out_path, {"images": ((n, 64, 64, 3), numpy.uint8, chunks()), "labels": src.labels})
    finally:
        src.close()
    return out_path


def _load_npz(path: Path) -> Shapes3DArray:
    members = read_members(path, TITLE)
    for key in ("images", "labels"):
        if key not in members:
            raise bad_file(TITLE, path, f"has no array {key!r} (found {sorted(members)}); expected images "
                           "(N, 64, 64, 3) uint8 and labels (N, 6) written by data_scripts/shapes3d.py")
    info, lab = members["images"], members["labels"]
    if len(info.shape) != 4 or info.shape[1:] != (64, 64, 3) or info.shape[0] == 0:
        raise bad_file(TITLE, path, f"images has shape {info.shape}, expected (N, 64, 64, 3) (N = {N_IMAGES})")
    if info.dtype != numpy.uint8:
        raise bad_file(TITLE, path, f"images has dtype {info.dtype}, expected uint8")
    if lab.shape != (info.shape[0], 6):
        raise bad_file(TITLE, path, f"labels has shape {lab.shape}, expected ({info.shape[0]}, 6)")
    images = load_member(path, "images", info, TITLE)
    labels = load_member(path, "labels", lab, TITLE, lazy=False)
    return Shapes3DArray(images, labels, path=path)


def load_shapes3d(path: str | os.PathLike, chunk_cache_mb: int = 64) -> Shapes3D | Shapes3DArray:
    """Open Shapes3D at ``path``: ``3dshapes.h5`` (read lazily), the converted ``3dshapes.npz``
    (read lazily, row by row), or a folder holding either (the npz preferred)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:  # a folder (perhaps not there yet)
        path = path / FAST_FILENAME if (path / FAST_FILENAME).is_file() else path / FILENAME
    if path.suffix == ".npz":
        if not path.is_file():
            raise not_found(TITLE, path, "shapes3d.py", path.parent)
        return _load_npz(path)
    return Shapes3D(path, chunk_cache_mb)
