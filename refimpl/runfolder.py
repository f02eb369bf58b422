"""The run folder's rules: where refimpl starts a run, what it deletes there, who may train it.

- A new run starts only in a new or empty folder; with ``overwrite``, also in one that
  holds a run (``config.json`` and ``checkpoint.npz`` written by refimpl). Any other
  folder, or a file, is refused (:func:`check_new_run_folder`) and nothing is written.
- refimpl deletes only files it made: the names in :data:`RUN_FILES`, ``export/``'s
  :data:`EXPORT_FILES` (and ``export/`` once empty), the kept checkpoints
  ``checkpoints/step-XXXXXXXX.npz`` (and ``checkpoints/`` once empty), and the temporaries of
  :func:`refimpl.atomic.atomic_write` for those names. ``overwrite`` deletes all of them
  (:func:`remove_run_files`), so nothing of the old run stays beside the new one; the
  user's own files in the folder are left alone.
- One process at a time trains a run: :class:`RunLock` holds an exclusive ``flock`` on
  ``.lock`` (which records the holder's PID, and is removed on release); the OS releases
  the lock when the process ends, however it ends, so a killed run never leaves a stale
  lock (only a ``.lock`` file that the next holder reuses). Read-only commands
  (evaluate, export, reconstruct, plot, factors) take no lock: they read the last
  complete checkpoint, which is always replaced atomically.

A run folder (``refimpl train --out DIR``, :class:`refimpl.training.Run`) holds:

- ``config.json``: the run's configuration (:class:`refimpl.config.RunConfig`) and architecture;
- ``log.csv``: one row per step (:mod:`refimpl.runlog`; a branch's holds only its own rows,
  :mod:`refimpl.branch`), or ``log.csv.gz`` (``refimpl pack-log``) read in its place;
- ``checkpoint.npz``: the latest good checkpoint (:mod:`refimpl.checkpoint`), written at
  step 0, every ``checkpoint_every`` steps, at the end and on Ctrl-C / SIGTERM;
- ``checkpoints/step-XXXXXXXX.npz``: with ``keep_checkpoints`` N, a copy of the checkpoint of
  every N-th step, kept (a later run can branch there);
- ``summary.json``: written when the run reaches its target: final gates, errors, time;
- ``sessions.jsonl``: one line per training session (start or resume): the step, code version,
  BLAS threads and execution setting it trained under (:mod:`refimpl.provenance`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

from .atomic import TMP_PREFIX, remove_stale_temporaries, temporary_name

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
LOG_GZ_FILE = "log.csv.gz"  # refimpl pack-log: the log compressed, for committing (refimpl.runlog.pack_log)
CHECKPOINT_FILE = "checkpoint.npz"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"  # refimpl evaluate
RECONSTRUCTIONS_FILE = "reconstructions.png"  # refimpl reconstruct
PLOT_FILE = "plot.png"  # refimpl plot (refimpl.plot.PLOT_FILE)
FACTORS_FILES = ("factors.json", "factors.png")  # refimpl factors (refimpl.factors.JSON_FILE, PNG_FILE)
MILESTONES_FILE = "milestones.md"  # refimpl milestones
SESSIONS_FILE = "sessions.jsonl"  # what trained the run, one line per session (refimpl.provenance)
LOCK_FILE = ".lock"
EXPORT_DIR = "export"  # refimpl export
EXPORT_FILES = ("model.npz", "model.json", "model.safetensors")
KEPT_DIR = "checkpoints"  # --keep-checkpoints N: a checkpoint every N batches, named by step
KEPT_NAME = re.compile(r"step-(\d{8,})\.npz")
# Every file refimpl writes into a run folder, removed in this order on overwrite: a folder
# cut short mid-way still holds a run (config and checkpoint) or only a config (leftovers).
RUN_FILES = (EVAL_FILE, RECONSTRUCTIONS_FILE, PLOT_FILE, *FACTORS_FILES, MILESTONES_FILE, SUMMARY_FILE, SESSIONS_FILE,
             LOG_GZ_FILE, LOG_FILE, CHECKPOINT_FILE, CONFIG_FILE)
PARENT_KEY = "parent"  # config.json of a branch: {"run": parent folder relative to the branch's, "step", "changed"}


class NotARunFolder(FileExistsError):
    """``out`` exists but is neither empty nor a run folder (a file problem: exit status 1)."""


class NoRun(FileNotFoundError):
    """A command needs a run (to resume or read) where there is none (a run-folder problem: exit status 1)."""


class RunLocked(OSError):
    """Another process trains this run (exit status 1); the message names the folder and its PID."""


# ----------------------------------------------------------------------------------------
# What is in a folder


def is_refimpl_config(path) -> bool:
    """``path`` is a config.json written by refimpl: a JSON object with ``config`` and ``architecture``
    (and ``parent`` for a branch)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and set(data) - {PARENT_KEY} == {"config", "architecture"}


def kept_checkpoint(folder, step: int) -> Path:
    """Where ``--keep-checkpoints`` keeps the checkpoint of ``step``: ``folder/checkpoints/step-XXXXXXXX.npz``."""
    return Path(folder) / KEPT_DIR / f"step-{int(step):08d}.npz"


def kept_checkpoints(folder) -> dict:
    """The kept checkpoints of run folder ``folder``: step -> path, in step order."""
    found = {}
    for name in kept_names(folder):
        p = Path(folder) / KEPT_DIR / name
        if p.is_file():
            found[int(KEPT_NAME.fullmatch(name).group(1))] = p
    return dict(sorted(found.items()))


def kept_names(folder) -> list[str]:
    """The names of kept checkpoints in ``folder/checkpoints/``, and of those a killed write left temporaries of."""
    kept = Path(folder) / KEPT_DIR
    names = set()
    for p in kept.iterdir() if kept.is_dir() else ():
        name = p.name[len(TMP_PREFIX):-9] if p.name.startswith(TMP_PREFIX) else p.name  # .tmp-NAME.xxxxxxxx
        if KEPT_NAME.fullmatch(name):
            names.add(name)
    return sorted(names)


def holds_run(folder) -> bool:
    """``folder`` holds a refimpl run: its config.json and a checkpoint.npz."""
    folder = Path(folder)
    return (folder / CHECKPOINT_FILE).is_file() and is_refimpl_config(folder / CONFIG_FILE)


def existing_run_path(path) -> Path:
    """``path`` (a run folder or its checkpoint) as a Path, or :class:`NoRun` when there is nothing there."""
    path = Path(path)
    if not path.exists():
        raise NoRun(f"{path}: no such run folder or checkpoint")
    return path


def _own_temporary(name: str, targets=RUN_FILES) -> bool:
    return name.startswith(TMP_PREFIX) and any(temporary_name(t).fullmatch(name) for t in targets)


def _leftovers_only(folder: Path) -> bool:
    """Only what a run creation cut short leaves: ``.lock``, refimpl's config.json, temporaries."""
    for p in folder.iterdir():
        if p.name == LOCK_FILE or _own_temporary(p.name):
            continue
        if p.name == CONFIG_FILE and is_refimpl_config(p):
            continue
        return False
    return True


def check_new_run_folder(folder, overwrite: bool) -> bool:
    """May a new run start in ``folder``? True when it holds a run (then ``overwrite`` was
    given and :func:`remove_run_files` must clear it), False when it is new or empty.

    Raises :class:`NotARunFolder` for a file or a folder with other content, and
    ``FileExistsError`` from ``exists`` (the caller's) for a run without ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotARunFolder(f"{folder} is a file, not a folder; refimpl writes a run into a new or empty folder, "
                            "or one that holds a run: choose another --out")
    if not folder.exists() or _leftovers_only(folder):
        return False
    if holds_run(folder):
        return True
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    raise NotARunFolder(f"{folder} is not empty and holds no refimpl run ({shown}); refimpl writes a run only into "
                        "a new or empty folder, or one that holds a run: choose another --out")


def remove_run_files(folder) -> list[Path]:
    """Delete every file a run made in ``folder`` (:data:`RUN_FILES`, ``export/``'s files, their
    temporaries), and only those; returns what was deleted."""
    folder = Path(folder)
    removed = remove_stale_temporaries(folder, RUN_FILES)
    removed += _remove_subfolder_files(folder / EXPORT_DIR, EXPORT_FILES)
    removed += _remove_subfolder_files(folder / KEPT_DIR, kept_names(folder))
    for name in RUN_FILES:
        if (folder / name).is_file():
            (folder / name).unlink()
            removed.append(folder / name)
    return removed


def _remove_subfolder_files(sub: Path, names) -> list[Path]:
    """Delete ``names`` and their temporaries in folder ``sub``, and ``sub`` once empty; returns what was deleted."""
    if not sub.is_dir():
        return []
    removed = remove_stale_temporaries(sub, names)
    for name in names:
        if (sub / name).is_file():
            (sub / name).unlink()
            removed.append(sub / name)
    if not any(sub.iterdir()):
        sub.rmdir()
        removed.append(sub)
    return removed


def check_output_folder(folder, names) -> None:
    """A folder refimpl writes ``names`` into (e.g. ``export/``) must be new, empty or hold only
    those files (and their temporaries): NotARunFolder otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotARunFolder(f"{folder} is a file, not a folder: choose another --out")
    if folder.is_dir():
        other = sorted(p.name for p in folder.iterdir() if p.name not in names and not _own_temporary(p.name, names))
        if other:
            raise NotARunFolder(f"{folder} holds other files ({', '.join(other[:5])}); refimpl writes "
                                f"{' and '.join(names)} only into a new or empty folder or one holding just "
                                "them: choose another --out")


# ----------------------------------------------------------------------------------------
# The lock

_HELD: dict = {}  # lock file (real path) -> [fd, holders] of this process


def _forget_inherited_locks() -> None:  # a forked child does not hold its parent's runs
    for fd, _ in _HELD.values():
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_inherited_locks)


class RunLock:
    """An exclusive lock on run folder ``folder`` (``folder/.lock``), held from :meth:`acquire`
    to :meth:`release` (or the process's end).

    Non-blocking: a folder another process holds raises :class:`RunLocked` at once. Within
    one process it is re-entrant (two Run objects on one folder share the lock), so a
    process never waits for itself.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._key = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> "RunLock":
        if self._key is not None:
            return self
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            fd = self._lock_file()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD[key] = [fd, 1]
        self._key = key
        return self

    def _lock_file(self) -> int:
        """A descriptor of ``.lock`` holding the flock; RunLocked if another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                pid = f"PID {holder}" if holder.isdigit() else "PID unknown"
                raise RunLocked(f"{self.folder} is in use by another refimpl process ({pid}); wait for it to "
                                "finish or stop it, or choose another --out") from None
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)  # the holder removed this file while we locked it: lock the new one

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            fd = _HELD.pop(key)[0]
            try:
                os.unlink(self.path)  # while still holding it: a process that opened it retries (_lock_file)
            except FileNotFoundError:
                pass
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter shutdown
            pass
