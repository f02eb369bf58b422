"""Datasets of the paper, one module each, behind one interface and one registry.

Every dataset has ``name``, ``shape`` (C, H, W), ``len`` and
``get(indices, dtype=float32) -> x: (B, C, H, W)``, a host NumPy array in [0, 1]
(see :mod:`refimpl.data.base`). :data:`DATASETS` is the registry: one
:class:`DatasetInfo` row per dataset (name, image shape, default tau, default path,
loader, fetch script), the one place these facts are declared; :func:`open_dataset`
opens one by name. ``synthetic-dsprites`` (the default) is drawn on demand, with no
file; CIFAR-100's 32x32 images are upscaled to 64x64 by its loader.

Default paths are under ``$REFIMPL_DATA`` (default ``data``), where the scripts in
``data_scripts/`` put the files.

Batches of indices come from :mod:`refimpl.data.batching`. Bad or missing files
raise :class:`DatasetError` with a one-line message naming the file.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from .base import ArrayImages, Dataset
from .batching import BatchIterator, eval_batches, split_indices
from ..optionspec import OptionError
from .errors import DatasetError, DatasetNotFoundError

DATA_ENV = "REFIMPL_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """One row of the registry: everything refimpl knows about a dataset before opening it."""

    name: str
    shape: tuple  # (C, H, W) of the images the loader returns
    tau: float  # default GECO tolerance at that size: summed squared error per image, chosen inside the
    #             paper's ranges (Fig. 1-3, Table 1); scaled by the pixel ratio when images are pooled
    path: str | None  # default path under $REFIMPL_DATA; None: drawn on demand, no file
    loader: str  # "module:function" in refimpl.data, called as function(path, **opts) (or (**opts) without path)
    script: str | None  # the data_scripts/ file that fetches it


DATASETS = {row.name: row for row in (
    DatasetInfo("synthetic-dsprites", (1, 64, 64), 30.0, None, "synthetic_dsprites:SyntheticDSprites", None),
    DatasetInfo("dsprites", (1, 64, 64), 30.0, "dsprites/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
                "dsprites:load_dsprites", "dsprites.py"),
    DatasetInfo("shapes3d", (3, 64, 64), 40.0, "shapes3d", "shapes3d:load_shapes3d", "shapes3d.py"),
    DatasetInfo("cars3d", (3, 64, 64), 100.0, "cars3d/cars3d.npz", "cars3d:load_cars3d", "cars3d.py"),
    DatasetInfo("mnist", (1, 28, 28), 10.0, "mnist", "mnist:load_mnist", "mnist.py"),
    DatasetInfo("cifar100", (3, 64, 64), 300.0, "cifar100", "cifar100:load_cifar100", "cifar100.py"),
)}
DEFAULT_DATASET = "synthetic-dsprites"
DATASET_NAMES = tuple(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registry row of dataset ``name``; an OptionError naming the known ones otherwise."""
    if name not in DATASETS:
        raise OptionError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


def data_root() -> Path:
    """Folder the default paths are under: ``$REFIMPL_DATA`` or ``data``."""
    return Path(os.environ.get(DATA_ENV, "data"))


def default_path(name: str) -> Path:
    """Where :func:`open_dataset` looks for ``name`` when no path is given."""
    info = dataset_info(name)
    if info.path is None:
        file_backed = ", ".join(row.name for row in DATASETS.values() if row.path is not None)
        raise OptionError(f"dataset {name!r} has no file; file-backed datasets: {file_backed}")
    return data_root() / info.path


def open_dataset(name: str = DEFAULT_DATASET, path: str | os.PathLike | None = None, **opts) -> Dataset:
    """Open dataset ``name`` from ``path`` (default :func:`default_path`).

    Options: dsprites ``check_values``; synthetic-dsprites ``cache``; shapes3d
    ``chunk_cache_mb``; mnist ``split`` ("train"/"test"), ``labels``; cifar100
    ``split``, ``upscale`` ("nearest"/"bilinear").
    """
    info = dataset_info(name)
    module, function = info.loader.split(":")
    load = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    if info.path is None:
        if path is not None:
            raise OptionError(f"{name} is drawn on demand and takes no path")
        return load(**opts)
    return load(Path(path) if path is not None else default_path(name), **opts)


__all__ = [
    "ArrayImages", "BatchIterator", "DATASETS", "DATASET_NAMES", "DEFAULT_DATASET", "Dataset", "DatasetError",
    "DatasetInfo", "DatasetNotFoundError", "data_root", "dataset_info", "default_path", "eval_batches",
    "open_dataset", "split_indices",
]
