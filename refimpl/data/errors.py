"""Errors raised by the dataset loaders.

Every problem with a user's file (missing, wrong keys, wrong shape or dtype, bad
magic number, truncated or corrupt) is raised as a :class:`DatasetError` whose
one-line message names the file and what was expected, instead of a traceback
from deep inside numpy, h5py, scipy or pickle.
"""

from __future__ import annotations

import os
import shlex


class DatasetError(ValueError):
    """A dataset file is missing, malformed or corrupt; the message says which and why."""


class DatasetNotFoundError(DatasetError):
    """A dataset file or folder does not exist; the message names the script that fetches it."""


def not_found(title: str, path: str | os.PathLike, script: str, out_dir: str | os.PathLike) -> DatasetNotFoundError:
    """The error for a missing ``path``: names ``data_scripts/<script>`` and its ``--out`` folder."""
    return DatasetNotFoundError(
        f"{title} file not found: {path}; download it with: python data_scripts/{script} --out "
        f"{shlex.quote(str(out_dir))}"
    )


def bad_file(title: str, path: str | os.PathLike, problem: str) -> DatasetError:
    """The error for a file that exists but is not what the loader expects."""
    return DatasetError(f"{title} file {path}: {problem}")
