"""Cars3D (Reed et al. 2015): 183 car models x 24 azimuths x 4 elevations, RGB 64x64.

Source (``nips2015-analogy-data.tar.gz``, fetched by ``python data_scripts/cars3d.py``):
``data/cars/car_XXX_mesh.mat`` files, each with ``im``: (128, 128, 3, 24, 4) uint8 =
(H, W, RGB, azimuth, elevation), plus ``list.txt`` naming the files in order.

Each file is reordered to (24 azimuth, 4 elevation, 128, 128, 3) and every image
downsampled to 64x64 with Pillow's LANCZOS filter (as disentanglement_lib does).
:func:`convert_cars3d` writes all of them once into ``cars3d.npz`` (uncompressed, so it
is read lazily, row by row, on load):

- ``images``: (n_cars * 96, 64, 64, 3) uint8, flat index = car * 96 + azimuth * 4 + elevation;
- ``factors``: (n_cars * 96, 3) int64 columns (car, azimuth, elevation);
- ``names``: (n_cars,) the .mat file stems in car order.

``open_cars3d(path)`` reads that npz (fast path) or, given the folder of .mat files,
converts in memory (slow: about a minute for 183 files).

``get(indices) -> x: (B, 3, 64, 64)`` float in [0, 1].
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy

from .base import ArrayImages, check_indices
from .errors import DatasetError, bad_file, not_found
from .npz import load_member, read_members, write_npz

FILENAME = "cars3d.npz"
TITLE = "Cars3D"
N_CARS = 183
N_AZIMUTH, N_ELEVATION = 24, 4
PER_CAR = N_AZIMUTH * N_ELEVATION
MAT_SHAPE = (128, 128, 3, N_AZIMUTH, N_ELEVATION)
SIZE = 64


def read_cars3d_mat(path: str | os.PathLike, size: int = SIZE) -> numpy.ndarray:
    """One ``car_*_mesh.mat``: images (96, size, size, 3) uint8, row = azimuth * 4 + elevation."""
    import scipy.io
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise not_found(TITLE, path, "cars3d.py", path.parent.parent if path.parent.name == "cars" else path.parent)
    try:
        mat = scipy.io.loadmat(path, variable_names=["im"])
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, MatReadError... for bad files
        raise bad_file(TITLE, path, f"not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    if "im" not in mat:
        raise bad_file(TITLE, path, "has no variable 'im'; expected im (128, 128, 3, 24, 4) uint8")
    im = mat["im"]
    if im.shape != MAT_SHAPE:
        raise bad_file(TITLE, path, f"im has shape {im.shape}, expected {MAT_SHAPE} (H, W, RGB, azimuth, elevation)")
    if im.dtype != numpy.uint8:
        raise bad_file(TITLE, path, f"im has dtype {im.dtype}, expected uint8")
    frames = numpy.ascontiguousarray(im.transpose(3, 4, 0, 1, 2)).reshape(PER_CAR, 128, 128, 3)
    out = numpy.empty((PER_CAR, size, size, 3), dtype=numpy.uint8)
    for k in range(PER_CAR):
        out[k] = numpy.asarray(Image.fromarray(frames[k]).resize((size, size), Image.Resampling.LANCZOS))
    return out


def list_cars3d_mats(folder: str | os.PathLike) -> list[Path]:
    """The .mat files of a Cars3D folder, in ``list.txt`` order if present, else sorted by name."""
    folder = Path(folder)
    out = folder.parent if folder.name == "cars" else folder  # load_cars3d's path: where cars3d.npz would be
    if not folder.is_dir():
        raise not_found(TITLE, folder, "cars3d.py", out)
    listing = folder / "list.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        paths = [folder / (n if n.endswith(".mat") else n + ".mat") for n in names]
    else:
        paths = sorted(folder.glob("car_*_mesh.mat"))
    if not paths:
        raise DatasetError(f"{TITLE} folder {folder}: no car_*_mesh.mat files; download them with: "
                           f"python data_scripts/cars3d.py --out {shlex.quote(str(out))}")
    return paths


def cars3d_arrays(folder: str | os.PathLike) -> dict[str, numpy.ndarray]:
    """Read and downsample every .mat in ``folder``: the arrays that go into ``cars3d.npz``."""
    paths = list_cars3d_mats(folder)
    images = numpy.empty((len(paths) * PER_CAR, SIZE, SIZE, 3), dtype=numpy.uint8)
    for car, p in enumerate(paths):
        images[car * PER_CAR:(car + 1) * PER_CAR] = read_cars3d_mat(p)
    return {"images": images, "factors": cars3d_factors(len(paths)), "names": numpy.array([p.stem for p in paths])}


def cars3d_factors(n_cars: int) -> numpy.ndarray:
    """Factor classes (n_cars * 96, 3) int64: (car, azimuth, elevation) of each flat index."""
    idx = numpy.arange(n_cars * PER_CAR, dtype=numpy.int64)
    return numpy.stack([idx // PER_CAR, (idx // N_ELEVATION) % N_AZIMUTH, idx % N_ELEVATION], axis=1)


def convert_cars3d(folder: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert the .mat files in ``folder`` into the npz ``out_path``, written atomically."""
    arrays = cars3d_arrays(folder)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out_path, arrays)
    return out_path


class Cars3D(ArrayImages):
    """Cars3D images (N = n_cars * 96) with their (car, azimuth, elevation) classes."""

    factor_names = ("car", "azimuth", "elevation")

    def __init__(self, images: numpy.ndarray, factors: numpy.ndarray, names=None, path=None):
        super().__init__("cars3d", images, "NHWC", max_value=255)
        self.factors = factors
        self.names = names
        self.path = path
        self.factor_sizes = (images.shape[0] // PER_CAR, N_AZIMUTH, N_ELEVATION)

    def latents_classes(self, indices) -> numpy.ndarray:
        """Factor classes (B, 3) int64 (car, azimuth, elevation) of ``indices`` (B,)."""
        return numpy.asarray(self.factors[check_indices(indices, len(self))], dtype=numpy.int64)


def load_cars3d(path: str | os.PathLike) -> Cars3D:
    """Open Cars3D from the converted ``cars3d.npz`` (read lazily), a folder holding it,
    or a folder of ``car_*_mesh.mat`` files (converted in memory)."""
    path = Path(path)
    if path.is_dir() and not (path / FILENAME).is_file():
        mats = path / "cars" if (path / "cars").is_dir() else path
        arrays = cars3d_arrays(mats)
        return Cars3D(arrays["images"], arrays["factors"], arrays["names"], path=mats)
    if path.is_dir() or not path.suffix:  # a folder (perhaps not there yet)
        path = path / FILENAME
    if not path.is_file():
        raise not_found(TITLE, path, "cars3d.py", path.parent)
    members = read_members(path, TITLE)
    if "images" not in members:
        raise bad_file(TITLE, path, f"has no array 'images' (found {sorted(members)}); expected images "
                       "(N, 64, 64, 3) uint8 written by data_scripts/cars3d.py")
    info = members["images"]
    if len(info.shape) != 4 or info.shape[1:] != (SIZE, SIZE, 3) or info.shape[0] == 0 or info.shape[0] % PER_CAR:
        raise bad_file(TITLE, path, f"images has shape {info.shape}, expected (n_cars * 96, 64, 64, 3) "
                       f"(n_cars = {N_CARS})")
    if info.dtype != numpy.uint8:
        raise bad_file(TITLE, path, f"images has dtype {info.dtype}, expected uint8")
    images = load_member(path, "images", info, TITLE)
    n_cars = info.shape[0] // PER_CAR
    names = None
    if "names" in members and members["names"].shape == (n_cars,) and members["names"].dtype.kind == "U":
        names = load_member(path, "names", members["names"], TITLE, lazy=False)
    return Cars3D(images, cars3d_factors(n_cars), names, path=path)
