"""``log.csv``: one row per training step, every scalar Algorithm 1's step returns.

Columns: ``step, E1, E2, C, C_ma, lambda_eff, lambda_raw, loss, kl, gates_l1,
open_gates, hit_fraction, hit, l0_added`` (:func:`refimpl.algorithm1.train_step`),
``tau``, ``seconds`` (wall time of the step) and ``gamma_0 .. gamma_{n-1}``. Row i
holds what step i computed: its ``gates_l1`` and ``lambda_eff`` are those the step used
(from the parameters before its Adam update), while ``lambda_raw``, ``open_gates`` and
the ``gamma_j`` are the values after the update, which the next step uses. Each value is
written as the shortest string that reads back to the same number in its own dtype; a
row is flushed as soon as it is written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy

from .atomic import atomic_write


def _format(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numpy.floating):
        return str(value)  # the shortest string that reads back to it in its own dtype (float32: 0.42)
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return str(value)


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
        self._file.write(",".join(_format(row.get(c, "")) for c in self.columns) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def truncate(path, last_step: int) -> int:
        """Keep the header and the complete rows with step <= ``last_step`` (rows a killed
        run wrote after its last checkpoint, or a torn last line, are dropped). Returns the
        number of rows kept."""
        path = Path(path)
        if not path.is_file():
            return 0
        lines = path.read_text().split("\n")
        header = lines[0].split(",")
        kept = [lines[0]]
        for line in lines[1:]:
            cells = line.split(",")
            if len(cells) != len(header):
                break  # a torn line can only be the last one
            try:
                step = int(cells[header.index("step")])
            except ValueError:
                break
            if step > last_step:
                break
            kept.append(line)
        text = "\n".join(kept) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))
        return len(kept) - 1


def read_log(path) -> dict:
    """``log.csv`` as columns: name -> list of floats."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
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
