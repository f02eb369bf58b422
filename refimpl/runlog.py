"""``log.csv``: one row per training step, every scalar Algorithm 1's step returns.

Columns: ``step, E1, E2, C, C_ma, lambda_eff, lambda_raw, loss, kl, gates_l1,
open_gates, hit_fraction, hit, l0_added`` (:func:`refimpl.algorithm1.train_step`),
``tau``, ``seconds`` (wall time of the step) and ``gamma_0 .. gamma_{n-1}``. Row i
holds what step i computed: its ``gates_l1`` and ``lambda_eff`` are those the step used
(from the parameters before its Adam update), while ``lambda_raw``, ``open_gates`` and
the ``gamma_j`` are the values after the update, which the next step uses. Each value is
written as the shortest string that reads back to the same number in its own dtype; a
row is flushed as soon as it is written.

On resume, :func:`verify_log` cuts the log back to the checkpoint's step and refuses to
go on if any row up to it is missing or damaged (``--repair-log`` drops damaged extra
lines when every row is still there). A branch's log (:mod:`refimpl.branch`) holds only
its own rows, from the step after its parent's checkpoint on.

``log.csv.gz`` (:func:`pack_log`, ``refimpl pack-log``): the log gzipped reproducibly
(no name, no timestamp), so that a study commits it while ``log.csv`` stays out of git.
:func:`read_log` reads it when ``log.csv`` is absent, and :func:`verify_log` (resume)
first restores ``log.csv`` from it.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from pathlib import Path

import numpy

from .atomic import SLOW_WRITE_ENV, atomic_write, slow_write_pause


def _format(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numpy.floating):
        return str(value)  # the shortest string that reads back to it in its own dtype (float32: 0.42)
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return str(value)


class LogError(OSError):
    """log.csv does not hold the rows the checkpoint vouches for (a file problem: exit status 1)."""


class CsvLog:
    """``log.csv``: a header, then one row per step; flushed every row, fsynced on :meth:`sync`."""

    def __init__(self, path):
        self.path = Path(path)
        self.columns = None
        self._file = None
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        if self._file is None:
            new = self.columns is None
            self._file = open(self.path, "a", newline="")
            if new:
                self.columns = list(row)
                self._file.write(",".join(self.columns) + "\n")
        line = ",".join(_format(row.get(c, "")) for c in self.columns) + "\n"
        if os.environ.get(SLOW_WRITE_ENV):  # fault-injection tests: a kill lands inside the row
            self._file.write(line[:len(line) // 2])
            self._file.flush()
            slow_write_pause()
            line = line[len(line) // 2:]
        self._file.write(line)
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _row_problem(cells: list, header: list, step: int) -> str | None:
    """Why ``cells`` is not row ``step`` of a log with ``header`` (None if it is)."""
    if len(cells) != len(header):
        return f"{len(cells)} field{'s' * (len(cells) != 1)}, expected {len(header)}"
    try:
        values = [float(c) for c in cells]
    except ValueError:
        bad = next(c for c in cells if not _is_number(c))
        return f"field {bad[:20]!r} is not a number"
    got = values[header.index("step")]
    return None if got == step else f"step {got:g} where step {step} belongs"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _split_lines(data: bytes) -> list[str | None]:
    """The complete (newline-terminated) lines of ``data``; None for a line that is not ASCII text."""
    out = []
    for raw in data.split(b"\n")[:-1]:  # the last piece is a torn line or empty
        try:
            out.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def gz_path(path) -> Path:
    """``log.csv.gz`` beside ``log.csv``."""
    path = Path(path)
    return path.with_name(path.name + ".gz")


def pack_log(path) -> tuple[int, Path]:
    """Write ``path`` (a ``log.csv``)'s complete lines to ``log.csv.gz`` beside it, atomically and
    reproducibly: the same log gives the same bytes (gzip level 9, no file name, mtime 0).
    Returns (rows packed, the .gz path); FileNotFoundError naming ``path`` if there is none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; nothing to pack")
    data = path.read_bytes()
    data = data[:data.rfind(b"\n") + 1]  # a torn last line (a row being written) is left out
    out = gz_path(path)

    def write(f):
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=f, mtime=0) as z:
            z.write(data)

    atomic_write(out, write)
    return max(0, data.count(b"\n") - 1), out


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, or of ``path.gz`` decompressed when ``path`` is absent; OSError naming the file."""
    if path.is_file() or not gz_path(path).is_file():
        return path.read_bytes()
    try:
        return gzip.decompress(gz_path(path).read_bytes())
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise LogError(f"{gz_path(path)}: not a readable gzip file ({type(exc).__name__}: {exc})") from None


def restore_log(path) -> bool:
    """If ``path`` (a ``log.csv``) is absent and ``log.csv.gz`` is there (a fresh clone), write ``path``
    from it, atomically; True if it did."""
    path = Path(path)
    if path.exists() or not gz_path(path).is_file():
        return False
    data = _read_bytes(path)
    atomic_write(path, lambda f: f.write(data))
    return True


def verify_log(path, last_step: int, repair: bool = False, first_step: int = 0) -> list[int]:
    """Cut ``log.csv`` back to rows ``first_step`` + 1..``last_step`` (the checkpoint's step) before
    training on; ``first_step``: 0, or a branch's parent step (its log starts after it).

    A folder with only ``log.csv.gz`` gets ``log.csv`` restored from it first (:func:`restore_log`).
    Rows after ``last_step`` and a torn last line (what a killed run leaves) are dropped.
    Every row up to ``last_step`` must be there and parse; otherwise :class:`LogError` names
    the file, the line and the problem. ``repair``: keep the rows that parse and follow on
    from the first step and drop the other lines, which works only if every row up to ``last_step``
    is there; missing rows cannot be rebuilt, so that is refused too. Returns the line numbers
    dropped before ``last_step``'s row (empty unless ``repair`` dropped some).
    """
    path = Path(path)
    restore_log(path)
    if last_step == first_step:  # nothing to keep but a header; the next write starts a fresh one if none
        if not path.is_file():
            return []
        lines = _split_lines(path.read_bytes())
        keep = lines[0] if lines and lines[0] and "step" in lines[0].split(",") else ""
        atomic_write(path, lambda f: f.write(keep.encode() + (b"\n" if keep else b"")))
        return []
    start = first_step + 1
    if not path.is_file():
        raise LogError(f"{path}: no such file; {_lost(start, start, last_step)}")
    lines = _split_lines(path.read_bytes())
    header = lines[0].split(",") if lines and lines[0] is not None else None
    if not lines:
        raise LogError(f"{path}: empty; {_lost(start, start, last_step)}")
    if header is None or "step" not in header or len(set(header)) != len(header) or "" in header:
        raise LogError(f"{path} line 1: not the log's header (no 'step' column); {_lost(start, start, last_step)}")
    kept, dropped, first = [lines[0]], [], None
    for number, line in enumerate(lines[1:], start=2):
        step = first_step + len(kept)
        if step > last_step:
            break
        problem = "not ASCII text" if line is None else _row_problem(line.split(","), header, step)
        if problem is None:
            kept.append(line)
            continue
        first = first or (number, problem)
        dropped.append(number)
    found = first_step + len(kept) - 1
    where = f"{path} line {first[0]}: {first[1]}" if first else f"{path}: rows end at step {found}"
    if found < last_step:
        raise LogError(f"{where}; {_lost(start, found + 1, last_step)}")
    if dropped and not repair:
        bad = f"line {dropped[0]}" if len(dropped) == 1 else f"lines {', '.join(map(str, dropped))}"
        raise LogError(f"{where}; the other lines hold rows {start}-{last_step}: continue with --repair-log to drop "
                       f"{bad} and keep the checkpoint")
    text = "\n".join(kept) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return dropped


def _lost(start: int, first: int, last: int) -> str:
    return (f"the checkpoint is at step {last}, so rows {start}-{last} must be there, but row {first} is missing or "
            "damaged; "
            "it cannot be rebuilt (not even by --repair-log), so the run cannot continue with a complete log: start "
            "afresh with --overwrite (evaluate, export and reconstruct still read the checkpoint)")


def read_log(path) -> dict:
    """``log.csv`` as columns: name -> list of floats (a torn last line, being written, is left out).

    Reads ``log.csv.gz`` when ``path`` is absent and that is there; a branch's log holds only its
    own rows (its whole history: :func:`refimpl.branch.read_history`)."""
    text = _read_bytes(Path(path)).decode()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    return {name: [float(r[i]) for r in body] for i, name in enumerate(header)}


def moving_average(values, factor: float = 0.95) -> float:
    """Exponential moving average m <- factor m + (1 - factor) v, started at the first value (Table 1)."""
    m = None
    for v in values:
        m = v if m is None else factor * m + (1 - factor) * v
    return float("nan") if m is None else m
