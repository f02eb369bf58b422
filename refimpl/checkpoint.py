"""Training checkpoints: one ``.npz`` file, written atomically.

A checkpoint holds everything that :func:`refimpl.algorithm1.train_step` and the run
loop carry from one step to the next, so a resumed run continues bit for bit:

- ``model/<name>``: every parameter and buffer of the GatedVAE (PyTorch state_dict names);
- ``lambda``: GECO's raw multiplier (0-d);
- ``adam/m/<name>``, ``adam/v/<name>``: Adam's moments, for the model's parameters and ``lambda``;
- ``meta``: one JSON document (stored as uint8 bytes) with the step, Adam's step count,
  the GECO state (``hit``, ``c_ma``, ``last_constraint_met``), the training generator's
  state, the batch iterator's state, the run configuration (dataset, architecture,
  Hyper, seed, ...), and ``timing`` (wall-clock seconds; not part of the training state).

Floats in ``meta`` round-trip exactly (JSON writes Python's shortest repr), as do the
128-bit integers of the PCG64 states.

Writing goes to a temporary file in the same folder, which is flushed, fsynced and
then renamed over the target with ``os.replace``: a reader (or a run killed mid-write)
sees the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy

from .atomic import atomic_write

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a refimpl checkpoint; the message is one line."""


def pack(arrays: dict, meta: dict) -> dict:
    """The npz members for host ``arrays`` and a JSON-able ``meta``."""
    for name in arrays:
        if name == "meta":
            raise ValueError("checkpoint array name 'meta' is reserved")
    blob = json.dumps({"format": FORMAT, **meta}, sort_keys=True).encode("utf-8")
    return {**arrays, "meta": numpy.frombuffer(blob, dtype=numpy.uint8)}


def save(path, arrays: dict, meta: dict) -> None:
    """Write host ``arrays`` (name -> numpy array) and ``meta`` to ``path`` atomically."""
    members = pack(arrays, meta)
    atomic_write(path, lambda f: numpy.savez(f, **members))


def read_npz(path, error, missing: str, unreadable: str) -> dict:
    """Every member of the .npz file ``path`` as host arrays (no pickles); ``error`` with the message
    ``missing`` if there is no such file, ``unreadable + " not a .npz file ..."`` (what it holds instead) or
    ``unreadable + " not a readable .npz file (...)"`` if it is not one or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    if not zipfile.is_zipfile(path):  # numpy.load would try it as a pickle and say so
        raise error(f"{unreadable} not a .npz file (a zip archive of arrays): {_what_it_holds(path)}")
    try:
        with numpy.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise error(f"{unreadable} not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _what_it_holds(path: Path) -> str:
    """A few words on a file that is not a zip archive: empty, a damaged zip, a .npy array, text, other bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "it is empty"
    if head.startswith(b"PK"):
        return "a zip archive cut short or damaged"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array"
    try:
        return f"it holds text ({(head.decode('utf-8').splitlines() or [''])[0][:40]!r} ...)"
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:16]!r}"


def load(path) -> tuple[dict, dict]:
    """Read a checkpoint: ``(arrays, meta)``; arrays are host numpy arrays."""
    path = Path(path)
    arrays = read_npz(path, CheckpointError, f"checkpoint not found: {path}", f"checkpoint {path}:")
    if "meta" not in arrays:
        raise CheckpointError(f"checkpoint {path}: no 'meta' member; not a refimpl checkpoint")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'meta' is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT}")
    return arrays, meta


def check_contents(path, arrays: dict, meta: dict, shapes: dict, keys) -> None:
    """CheckpointError naming ``path`` and the entry unless ``arrays`` holds a float array of
    each shape in ``shapes`` (name -> shape) and ``meta`` each of ``keys``."""
    for key in keys:
        if key not in meta:
            raise CheckpointError(f"checkpoint {path}: meta has no {key!r}; not a refimpl training checkpoint")
    for name, shape in shapes.items():
        if name not in arrays:
            raise CheckpointError(f"checkpoint {path}: no array {name!r}, which the run's model needs")
        a = arrays[name]
        if tuple(a.shape) != tuple(shape) or a.dtype.kind != "f":
            raise CheckpointError(f"checkpoint {path}: {name!r} is {a.dtype} of shape {tuple(a.shape)}, the run's "
                                  f"model needs floats of shape {tuple(shape)}")


def prefixed(arrays: dict, prefix: str) -> dict:
    """The entries of ``arrays`` under ``prefix`` (e.g. ``"model/"``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
