"""Built-in dSprites: the 737,280-image factor grid drawn on demand, no file needed.

Same factors, flat index order and interface as :class:`refimpl.data.dsprites.DSprites`
(``name``, ``shape = (1, 64, 64)``, ``len``, ``get(indices) -> x: (B, 1, 64, 64)`` in
{0, 1}, ``latents_classes``, ``latents_values``), so training can use either.

Geometry (measured from the official frames; see shared/notes/datasets.md):

- pixel (row i, column j) is on iff its centre (x, y) = (j + 0.5, i + 0.5) is inside
  the shape: binary, no anti-aliasing;
- sprite centre (16 + 32 posX, 16 + 32 posY); posX = 0 left, posY = 0 top;
- orientation t turns the shape counter-clockwise on screen: a body point (u, v)
  (y down) is drawn at centre + (u cos t + v sin t, -u sin t + v cos t), so a screen
  offset (dx, dy) is inside iff the body point
  (dx cos t - dy sin t, dx sin t + dy cos t) is inside the unrotated shape;
- at scale s: square half-side 9.6 s; ellipse semi-axes 12.76 s (along x) by 7.22 s;
  heart (lobes up) = two discs of radius 5.2 s centred at (+-4.6 s, -4.0 s) joined by
  their outer tangent lines to a tip at (0, +8.5 s).

Images are rendered in batches, one vectorised (B, 64, 64) computation per shape
present; the whole grid (3.0 GB as uint8) is built only with ``cache=True``.
Rendering involves no randomness; :meth:`SyntheticDSprites.sample` draws indices from
the generator it is given.
"""

from __future__ import annotations

import numpy

from .base import check_float_dtype, check_indices
from .dsprites import (
    FACTOR_NAMES,
    FACTOR_SIZES,
    N_IMAGES,
    ORIENTATIONS,
    POSITIONS,
    SCALES,
    classes_to_values,
    index_to_classes,
)

SIZE = 64
SQUARE_HALF_SIDE = 9.6
ELLIPSE_SEMI_AXES = (12.76, 7.22)  # along x, along y, at t = 0
HEART_RADIUS = 5.2
HEART_CENTRES = ((-4.6, -4.0), (4.6, -4.0))
HEART_TIP = (0.0, 8.5)


def _square(u, v):
    return numpy.maximum(numpy.abs(u), numpy.abs(v)) <= SQUARE_HALF_SIDE


def _ellipse(u, v):
    a, b = ELLIPSE_SEMI_AXES
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _heart(u, v):
    """Union of the two lobes and, for each lobe, the triangle tip-tangent-tangent.

    The convex hull of a disc and the tip is the disc plus an isosceles triangle with
    apex at the tip, axis towards the disc centre, half-angle asin(r / d) and height
    sqrt(d^2 - r^2) cos(half-angle), d the tip-to-centre distance.
    """
    r = HEART_RADIUS
    tx, ty = HEART_TIP
    inside = numpy.zeros(u.shape, dtype=bool)
    for cx, cy in HEART_CENTRES:
        inside |= (u - cx) ** 2 + (v - cy) ** 2 <= r * r
        ax, ay = cx - tx, cy - ty
        d = numpy.hypot(ax, ay)
        ex, ey = ax / d, ay / d
        half = numpy.arcsin(r / d)
        height = numpy.sqrt(d * d - r * r) * numpy.cos(half)
        px, py = u - tx, v - ty
        along = px * ex + py * ey
        across = numpy.abs(px * ey - py * ex)
        inside |= (along >= 0) & (along <= height) & (across <= along * numpy.tan(half))
    return inside


_SHAPES = (_square, _ellipse, _heart)


def render(shape, scale, orientation, pos_x, pos_y) -> numpy.ndarray:
    """Draw B sprites: ``shape`` (B,) classes 0/1/2 (square/ellipse/heart), ``scale``,
    ``orientation`` (radians), ``pos_x``, ``pos_y`` (B,) factor values. Returns (B, 64, 64) uint8 {0, 1}."""
    shape = numpy.asarray(shape, dtype=numpy.int64).reshape(-1)
    s = numpy.asarray(scale, dtype=numpy.float64).reshape(-1, 1, 1)
    t = numpy.asarray(orientation, dtype=numpy.float64).reshape(-1, 1, 1)
    cx = 16.0 + 32.0 * numpy.asarray(pos_x, dtype=numpy.float64).reshape(-1, 1, 1)
    cy = 16.0 + 32.0 * numpy.asarray(pos_y, dtype=numpy.float64).reshape(-1, 1, 1)
    centres = numpy.arange(SIZE, dtype=numpy.float64) + 0.5
    dx = centres[None, None, :] - cx  # (B, 1, 64): column offsets
    dy = centres[None, :, None] - cy  # (B, 64, 1): row offsets, y down
    cos, sin = numpy.cos(t), numpy.sin(t)
    u = (dx * cos - dy * sin) / s  # body coordinates in units of the scale
    v = (dx * sin + dy * cos) / s
    out = numpy.zeros((shape.size, SIZE, SIZE), dtype=numpy.uint8)
    for k, inside in enumerate(_SHAPES):
        sel = shape == k
        if sel.any():
            out[sel] = inside(u[sel], v[sel])
    return out


def render_classes(classes) -> numpy.ndarray:
    """Draw the sprites of factor classes (B, 6) (color, shape, scale, orientation, posX, posY): (B, 64, 64) uint8."""
    c = numpy.asarray(classes, dtype=numpy.int64)
    return render(c[:, 1], SCALES[c[:, 2]], ORIENTATIONS[c[:, 3]], POSITIONS[c[:, 4]], POSITIONS[c[:, 5]])


class SyntheticDSprites:
    """dSprites drawn on demand; see the module docstring. ``cache=True`` renders all 737,280 (3.0 GB uint8)."""

    name = "synthetic-dsprites"
    shape = (1, SIZE, SIZE)
    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, cache: bool = False, chunk: int = 8192):
        self.images = None
        if cache:
            images = numpy.empty((N_IMAGES, SIZE, SIZE), dtype=numpy.uint8)
            for start in range(0, N_IMAGES, chunk):
                idx = numpy.arange(start, min(start + chunk, N_IMAGES))
                images[start:start + idx.size] = render_classes(index_to_classes(idx))
            self.images = images

    def __len__(self) -> int:
        return N_IMAGES

    def __repr__(self) -> str:
        return f"<SyntheticDSprites: {N_IMAGES} images of shape {self.shape}, cached={self.images is not None}>"

    def get_uint8(self, indices) -> numpy.ndarray:
        """uint8 images (B, 1, 64, 64) with values {0, 1}."""
        idx = check_indices(indices, N_IMAGES)
        if self.images is not None:
            return self.images[idx][:, None]
        return render_classes(index_to_classes(idx))[:, None]

    def get(self, indices, dtype=numpy.float32) -> numpy.ndarray:
        """Images ``x: (B, 1, 64, 64)`` in {0, 1} for flat indices ``indices: (B,)``."""
        return self.get_uint8(indices).astype(check_float_dtype(dtype))

    def latents_classes(self, indices) -> numpy.ndarray:
        """Factor classes (B, 6) int64 of ``indices`` (B,)."""
        return index_to_classes(check_indices(indices, N_IMAGES))

    def latents_values(self, indices) -> numpy.ndarray:
        """Factor values (B, 6) float64 of ``indices`` (B,), as in the official ``latents_values``."""
        return classes_to_values(self.latents_classes(indices))

    def sample(self, rng: numpy.random.Generator, batch_size: int, dtype=numpy.float32):
        """``batch_size`` images drawn uniformly (with replacement) with ``rng``: ``(x, indices)``."""
        idx = rng.integers(0, N_IMAGES, size=batch_size)
        return self.get(idx, dtype), idx
