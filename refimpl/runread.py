"""Reading a run folder without building its run: which folder a path names, its log's whole
history, and the log's gamma columns.

The analysis commands (``plot``, ``milestones``, ``study``) read run folders through this
module; it imports neither the model nor the training loop, so reading a log never builds a
network. A branch's log holds only its own rows; :func:`load_history` puts its parents' rows
first (:func:`refimpl.branch.read_history`).
"""

from __future__ import annotations

from pathlib import Path

import numpy

from .branch import lineage, read_history
from .runfolder import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE, LOG_GZ_FILE

REQUIRED_COLUMNS = ("step", "E2", "gates_l1", "lambda_eff", "hit_fraction")


class RunReadError(OSError):
    """A path is not a run folder, or its log is empty or unreadable; the message names the file.

    An OSError, like the missing-file case, so that every command's error handling (which
    reports OSError in one line, exit status 1) covers it without naming it."""


def run_folder(path) -> Path:
    """The run folder ``path`` names (a folder, or its checkpoint.npz); RunReadError when it is not one."""
    path = Path(path)
    folder = path.parent if path.is_file() and path.name == CHECKPOINT_FILE else path
    if not folder.is_dir():
        raise RunReadError(f"{path}: no such run folder")
    missing = [name for name in (CONFIG_FILE, CHECKPOINT_FILE) if not (folder / name).is_file()]
    if missing:
        raise RunReadError(f"{folder}: not a refimpl run folder (no {' or '.join(missing)})")
    return folder


def load_history(folder) -> dict:
    """Run folder ``folder``'s log as columns name -> float64 array: its ``log.csv`` (or ``log.csv.gz``),
    after its parents' rows for a branch (:func:`refimpl.branch.read_history`). FileNotFoundError /
    RunReadError naming the file."""
    folder = Path(folder)
    path = folder / LOG_FILE
    if not lineage(folder)[1:] and not (path.is_file() or (folder / LOG_GZ_FILE).is_file()):
        raise FileNotFoundError(f"{path}: no such file (the run has not trained a batch yet)")
    try:
        columns = read_history(folder)
    except (ValueError, IndexError) as exc:  # a non-number or a short row
        raise RunReadError(f"{path}: not a readable training log ({type(exc).__name__}: {exc})") from None
    if not columns or not columns.get("step"):
        raise RunReadError(f"{path}: the log is empty (no rows)")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise RunReadError(f"{path}: not a training log (no column {', '.join(missing)})")
    return {name: numpy.asarray(values, dtype=numpy.float64) for name, values in columns.items()}


def gamma_columns(log: dict) -> list[str]:
    """The log's ``gamma_0 .. gamma_{n-1}`` columns in index order ([] for logs that predate them)."""
    names = [c for c in log if c.startswith("gamma_") and c[6:].isdigit()]
    return sorted(names, key=lambda c: int(c[6:]))
