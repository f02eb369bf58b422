"""dSprites (Matthey et al. 2017): 737,280 binary 64x64 sprites, read from the official npz.

File ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (fetch it with
``python data_scripts/dsprites.py``) holds

- ``imgs``: (737280, 64, 64) uint8 with values {0, 1};
- ``latents_classes``: (737280, 6) int64, ``latents_values``: (737280, 6) float64,
  columns color(1), shape(3), scale(6), orientation(40), posX(32), posY(32);
- ``metadata`` (a pickled dict; not read).

The flat index of an image is ``latents_classes @ FACTOR_BASES``: posY varies fastest.
The official file is compressed, so ``imgs`` cannot be read in place: it is read once
into memory as uint8 (3.0 GB); ``get`` converts only the requested batch to float.
An uncompressed copy (``numpy.savez``) is instead read lazily, row by row.

``get(indices) -> x: (B, 1, 64, 64)`` float in {0, 1}. The same interface is offered by
:class:`refimpl.data.synthetic_dsprites.SyntheticDSprites`, which draws the images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy

from .base import ArrayImages, check_indices
from .errors import bad_file, not_found
from .npz import load_member, read_members

FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
TITLE = "dSprites"
N_IMAGES = 737280
FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
FACTOR_BASES = (737280, 245760, 40960, 1024, 32, 1)
SHAPE_NAMES = ("square", "ellipse", "heart")  # shape classes 0, 1, 2 (values 1, 2, 3)
SCALES = numpy.linspace(0.5, 1.0, 6)
ORIENTATIONS = numpy.linspace(0.0, 2 * numpy.pi, 40)  # both ends included: 0 and 39 draw alike
POSITIONS = numpy.linspace(0.0, 1.0, 32)


def index_to_classes(indices) -> numpy.ndarray:
    """Factor classes (B, 6) of flat indices (B,), in the order of the official file."""
    idx = numpy.asarray(indices, dtype=numpy.int64)
    sizes = numpy.asarray(FACTOR_SIZES, dtype=numpy.int64)
    bases = numpy.asarray(FACTOR_BASES, dtype=numpy.int64)
    return (idx[..., None] // bases) % sizes


def classes_to_index(classes) -> numpy.ndarray:
    """Flat indices (B,) of factor classes (B, 6): ``classes @ FACTOR_BASES``."""
    cls = numpy.asarray(classes, dtype=numpy.int64)
    if cls.shape[-1] != 6 or (cls < 0).any() or (cls >= numpy.asarray(FACTOR_SIZES)).any():
        raise ValueError(f"classes must be (..., 6) within sizes {FACTOR_SIZES}")
    return cls @ numpy.asarray(FACTOR_BASES, dtype=numpy.int64)


def classes_to_values(classes) -> numpy.ndarray:
    """Factor values (B, 6) float64 of factor classes (B, 6), as in ``latents_values``."""
    cls = numpy.asarray(classes, dtype=numpy.int64)
    values = numpy.empty(cls.shape, dtype=numpy.float64)
    values[..., 0] = 1.0
    values[..., 1] = cls[..., 1] + 1.0
    values[..., 2] = SCALES[cls[..., 2]]
    values[..., 3] = ORIENTATIONS[cls[..., 3]]
    values[..., 4] = POSITIONS[cls[..., 4]]
    values[..., 5] = POSITIONS[cls[..., 5]]
    return values


class DSprites(ArrayImages):
    """The official dSprites images; ``len`` is the file's N (737,280 for the full file)."""

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, images: numpy.ndarray, classes: numpy.ndarray, values: numpy.ndarray | None, path=None):
        super().__init__("dsprites", images, "NHW", max_value=1)
        self.path = path
        self._classes = classes
        self._values = values

    def latents_classes(self, indices) -> numpy.ndarray:
        """Factor classes (B, 6) int64 of images ``indices`` (B,)."""
        return numpy.asarray(self._classes[check_indices(indices, len(self))], dtype=numpy.int64)

    def latents_values(self, indices) -> numpy.ndarray:
        """Factor values (B, 6) float64 of images ``indices`` (B,)."""
        idx = check_indices(indices, len(self))
        if self._values is None:
            return classes_to_values(self._classes[idx])
        return numpy.asarray(self._values[idx], dtype=numpy.float64)


def check_dsprites_file(path: str | os.PathLike) -> dict:
    """Check the npz at ``path`` from its array headers alone (no data read); return the headers.

    Raises DatasetError naming the file if a key is missing or a shape or dtype is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise not_found(TITLE, path, "dsprites.py", path.parent)
    members = read_members(path, TITLE)
    for key in ("imgs", "latents_classes"):
        if key not in members:
            raise bad_file(TITLE, path, f"has no array {key!r} (found {sorted(members)}); expected keys imgs, "
                           "latents_classes, latents_values")
    imgs, cls = members["imgs"], members["latents_classes"]
    if len(imgs.shape) != 3 or imgs.shape[1:] != (64, 64) or imgs.shape[0] == 0:
        raise bad_file(TITLE, path, f"imgs has shape {imgs.shape}, expected (N, 64, 64) (N = {N_IMAGES})")
    if imgs.dtype != numpy.uint8:
        raise bad_file(TITLE, path, f"imgs has dtype {imgs.dtype}, expected uint8")
    n = imgs.shape[0]
    if cls.shape != (n, 6) or not numpy.issubdtype(cls.dtype, numpy.integer):
        raise bad_file(TITLE, path, f"latents_classes is {cls.dtype} {cls.shape}, expected integer ({n}, 6)")
    vals = members.get("latents_values")
    if vals is not None and (vals.shape != (n, 6) or not numpy.issubdtype(vals.dtype, numpy.floating)):
        raise bad_file(TITLE, path, f"latents_values is {vals.dtype} {vals.shape}, expected float ({n}, 6)")
    return members


def load_dsprites(path: str | os.PathLike, check_values: bool = True) -> DSprites:
    """Open the dSprites npz at ``path`` (a file, or a folder holding :data:`FILENAME`).

    Checks keys, shapes and dtypes from the headers before reading; with
    ``check_values`` also that ``imgs`` is binary (about a second on the full file).
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:  # a folder (perhaps not there yet)
        path = path / FILENAME
    members = check_dsprites_file(path)
    vals = members.get("latents_values")
    images = load_member(path, "imgs", members["imgs"], TITLE)
    classes = load_member(path, "latents_classes", members["latents_classes"], TITLE, lazy=False)
    values = None if vals is None else load_member(path, "latents_values", vals, TITLE, lazy=False)
    if ((classes < 0) | (classes >= numpy.asarray(FACTOR_SIZES))).any():
        raise bad_file(TITLE, path, f"latents_classes has entries outside the factor sizes {FACTOR_SIZES}")
    if check_values and _max_uint8(images) > 1:
        raise bad_file(TITLE, path, "imgs has values above 1, expected binary images with values {0, 1}")
    return DSprites(images, classes, values, path=path)


def _max_uint8(images, chunk: int = 8192) -> int:
    """Max of a large uint8 array, in chunks (a lazily read array is never read whole at once)."""
    return max(int(images[i:i + chunk].max()) for i in range(0, images.shape[0], chunk))
