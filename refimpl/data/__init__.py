"""Datasets of the paper, one module each, behind one interface and one registry.

Every dataset has ``name``, ``shape`` (C, H, W), ``len`` and
``get(indices, dtype=float32) -> x: (B, C, H, W)``, a host NumPy array in [0, 1]
(see :mod:`refimpl.data.base`). :func:`open_dataset` opens one by name:

- ``synthetic-dsprites`` (the default): (1, 64, 64), drawn on demand, no file;
- ``dsprites``: (1, 64, 64), ``dsprites/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``;
- ``shapes3d``: (3, 64, 64), ``shapes3d/`` (its ``3dshapes.npz`` if converted, else ``3dshapes.h5``);
- ``cars3d``: (3, 64, 64), ``cars3d/cars3d.npz`` (or a folder of ``car_*_mesh.mat`` files);
- ``mnist``: (1, 28, 28), ``mnist/`` (idx files, gzipped or not);
- ``cifar100``: (3, 64, 64) upscaled from 32x32, ``cifar100/`` (holding ``cifar-100-python/``).

Default paths are under ``$REFIMPL_DATA`` (default ``data``), where the scripts in
``data_scripts/`` put the files.

Batches of indices come from :mod:`refimpl.data.batching`. Bad or missing files
raise :class:`DatasetError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import ArrayImages, Dataset
from .batching import BatchIterator, eval_batches, split_indices
from .errors import DatasetError, DatasetNotFoundError

DATA_ENV = "REFIMPL_DATA"
DEFAULT_DATASET = "synthetic-dsprites"
DEFAULT_PATHS = {
    "dsprites": "dsprites/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
    "shapes3d": "shapes3d",
    "cars3d": "cars3d/cars3d.npz",
    "mnist": "mnist",
    "cifar100": "cifar100",
}
DATASET_NAMES = ("synthetic-dsprites", "dsprites", "shapes3d", "cars3d", "mnist", "cifar100")


def data_root() -> Path:
    """Folder the default paths are under: ``$REFIMPL_DATA`` or ``data``."""
    return Path(os.environ.get(DATA_ENV, "data"))


def default_path(name: str) -> Path:
    """Where :func:`open_dataset` looks for ``name`` when no path is given."""
    if name not in DEFAULT_PATHS:
        raise ValueError(f"dataset {name!r} has no file; file-backed datasets: {', '.join(DEFAULT_PATHS)}")
    return data_root() / DEFAULT_PATHS[name]


def open_dataset(name: str = DEFAULT_DATASET, path: str | os.PathLike | None = None, **opts) -> Dataset:
    """Open dataset ``name`` from ``path`` (default :func:`default_path`).

    Options: dsprites ``check_values``; synthetic-dsprites ``cache``; shapes3d
    ``chunk_cache_mb``; mnist ``split`` ("train"/"test"), ``labels``; cifar100
    ``split``, ``upscale`` ("nearest"/"bilinear").
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if name == "synthetic-dsprites":
        if path is not None:
            raise ValueError("synthetic-dsprites is drawn on demand and takes no path")
        from .synthetic_dsprites import SyntheticDSprites

        return SyntheticDSprites(**opts)
    path = Path(path) if path is not None else default_path(name)
    if name == "dsprites":
        from .dsprites import load_dsprites

        return load_dsprites(path, **opts)
    if name == "shapes3d":
        from .shapes3d import load_shapes3d

        return load_shapes3d(path, **opts)
    if name == "cars3d":
        from .cars3d import load_cars3d

        return load_cars3d(path, **opts)
    if name == "mnist":
        from .mnist import load_mnist

        return load_mnist(path, **opts)
    from .cifar100 import load_cifar100

    return load_cifar100(path, **opts)


__all__ = [
    "ArrayImages", "BatchIterator", "DATASET_NAMES", "DEFAULT_DATASET", "Dataset", "DatasetError",
    "DatasetNotFoundError", "data_root", "default_path", "eval_batches", "open_dataset", "split_indices",
]
