"""What trained a run, session by session: ``sessions.jsonl`` in the run folder.

A run's numbers depend on more than its configuration: the code, the fast paths taken
(:class:`refimpl.execution.FastPaths`, not part of the run, so a run may resume under
another setting) and the BLAS library's threads (OpenBLAS rounds float32 GEMMs
differently with 1 and 2 threads). A run continues bit for bit only under the same ones,
so each time training starts or resumes, :func:`record` appends one JSON line saying
under what: the step it starts from and its target, the time, refimpl's version and
git commit (``dirty`` when the package's files differ from it), Python, NumPy (and
CuPy), the BLAS libraries with their thread counts, the threads of the step and the
execution setting. Nothing reads it back to train; it is for whoever asks later why two
runs' numbers differ (``bench/results/study/README.md``, *What was lost*).
"""

from __future__ import annotations

import datetime
import functools
import json
import platform
import subprocess
from pathlib import Path

import numpy

from . import __version__
from .atomic import atomic_write
from .backend import get_xp
from .runfolder import SESSIONS_FILE


@functools.lru_cache(maxsize=None)
def git_commit(path=Path(__file__).parent) -> dict | None:
    """{"commit", "dirty"} of the git checkout holding ``path`` (refimpl's package), None outside one
    or without git; asked once per process."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def blas_libraries() -> list[dict]:
    """The BLAS libraries loaded in this process, with their version and thread count (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    keys = ("internal_api", "version", "num_threads", "architecture")
    return [{k: lib.get(k) for k in keys} for lib in threadpool_info() if lib.get("user_api") == "blas"]


def session(run, step: int, target: int) -> dict:
    """One session's record: ``run`` (a :class:`refimpl.training.Run`) training from ``step`` to ``target``."""
    versions = {"refimpl": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    if run.backend == "cupy":
        versions["cupy"] = get_xp("cupy").__version__
    threads = run.state.passes.threads
    return {"from_step": int(step), "target": int(target),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "git": git_commit(), "backend": run.backend, "blas": blas_libraries(),
            "threads": {"blas": threads.blas, "pass_blas": threads.pass_blas,
                        "parallel_passes": threads.parallel_passes},
            "execution": run.paths.to_dict()}


def record(run, step: int, target: int) -> dict:
    """Append this session's line to ``run``'s ``sessions.jsonl`` (atomically: the old lines and the new
    one written to a temporary, then renamed) and return it."""
    path = Path(run.out) / SESSIONS_FILE
    line = session(run, step, target)
    old = path.read_bytes() if path.is_file() else b""
    atomic_write(path, lambda f: f.write(old + json.dumps(line, sort_keys=True).encode() + b"\n"))
    return line


def read(folder) -> list[dict]:
    """The sessions recorded in run folder ``folder``, oldest first ([] when none)."""
    path = Path(folder) / SESSIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
