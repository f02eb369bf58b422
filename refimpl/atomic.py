"""Atomic file writes: a temporary file in the target's folder, flushed, fsynced, then
renamed over the target with ``os.replace``. A reader, or a process killed mid-write,
sees the old file or the new one, never a torn one. Every file refimpl writes for a
user (checkpoints, logs' companions, traces, exports, converted datasets, bench
results) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` raises. The folder is fsynced after the
    rename where the platform allows it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete temporary files left by a run killed during :func:`atomic_write`; returns them."""
    removed = []
    for p in Path(folder).glob(TMP_PREFIX + "*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def write_json(path, data) -> Path:
    """``data`` as indented JSON at ``path``, written atomically; returns the path."""
    path = Path(path)
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
