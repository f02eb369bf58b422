"""Atomic file writes: a temporary file in the target's folder, flushed, fsynced, then
renamed over the target with ``os.replace``. A reader, or a process killed mid-write,
sees the old file or the new one, never a torn one. Every file refimpl writes for a
user (checkpoints, logs' companions, traces, exports, converted datasets, bench
results) goes through :func:`atomic_write`.

Temporaries are named ``.tmp-<target name>.<8 random characters>`` (:func:`temporary_name`);
:func:`remove_stale_temporaries` deletes only names of that form, for targets it is told.
A failed write raises an ``OSError`` that names the target, not the temporary.

Test hook: ``$REFIMPL_TEST_SLOW_WRITE`` (seconds) sleeps between writing the temporary and
the rename, so that a test can kill a process there (:func:`slow_write_pause`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

TMP_PREFIX = ".tmp-"
SLOW_WRITE_ENV = "REFIMPL_TEST_SLOW_WRITE"


def slow_write_pause() -> None:
    """Sleep ``$REFIMPL_TEST_SLOW_WRITE`` seconds, if set (fault-injection tests only)."""
    delay = os.environ.get(SLOW_WRITE_ENV)
    if delay:
        time.sleep(float(delay))


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` raises; an ``OSError`` is raised again as
    the same kind of error naming ``path`` ("cannot write PATH: No space left on device").
    The folder is fsynced after the rename where the platform allows it.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        slow_write_pause()
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
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


def temporary_name(target: str) -> re.Pattern:
    """The names :func:`atomic_write` gives the temporaries of a file named ``target``."""
    return re.compile(re.escape(TMP_PREFIX + target + ".") + r"[a-z0-9_]{8}")


def remove_stale_temporaries(folder, targets) -> list[Path]:
    """Delete the temporaries that a process killed inside :func:`atomic_write` left in
    ``folder`` for the files named ``targets`` (nothing else); returns them."""
    patterns = [temporary_name(t) for t in targets]
    removed = []
    for p in Path(folder).glob(TMP_PREFIX + "*"):
        if p.is_file() and any(pat.fullmatch(p.name) for pat in patterns):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def write_json(path, data) -> Path:
    """``data`` as indented JSON at ``path``, written atomically; returns the path."""
    path = Path(path)
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def write_csv(path, rows: list[dict]) -> Path:
    """``rows`` as CSV (columns in order of first appearance), written atomically; returns the path."""
    path = Path(path)
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    return path
