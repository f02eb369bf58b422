"""What ``refimpl sweep`` shows while its runs train: runs done, running and waiting, and each
running run's batches, speed and ETA.

The runs train elsewhere (Dask workers) and write ``log.csv`` as they go, one row per batch;
the client counts each run's rows (:class:`LogRows`, reading only what was added since its
last look), :class:`SweepWatch` turns the counts into a status, and :class:`StatusBoard`
shows it: on a terminal a block of lines redrawn in place, otherwise one summary line
every ``interval`` seconds. The clock is a parameter, so the arithmetic is tested with a
fake one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .console import hms


class LogRows:
    """The batches a growing CSV log has recorded, read incrementally: its rows after the header, counted
    from the step before its first row (0 for a run from scratch; a branch's log starts after its
    parent's step, so it counts from there to its target like any run)."""

    def __init__(self, path):
        self.path = Path(path)
        self._reset()

    def _reset(self):
        self._offset = self._lines = 0
        self._start = None  # the step before the first row, read once that row is complete

    def __call__(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self._reset()
            return 0
        if size < self._offset:  # cut back on resume, or rewritten: count afresh
            self._reset()
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
            self._offset += len(chunk)
            self._lines += chunk.count(b"\n")
            if self._start is None and self._lines >= 2:
                f.seek(0)
                self._start = _first_step(f.read(65536)) - 1
        rows = max(0, self._lines - 1)
        return self._start + rows if rows else 0


def _first_step(head: bytes) -> int:
    """The step of a log's first row (its first column; 1 where it cannot be read). head: the log's start."""
    try:
        return int(head.split(b"\n")[1].split(b",", 1)[0])
    except (IndexError, ValueError):
        return 1


@dataclass
class RunState:
    """One run as the client sees it: ``rows`` of ``target`` batches; ``since``: (time, rows) when it
    was first seen moving (its speed is measured from there, so a resumed run's old rows do not count)."""

    name: str
    target: int
    rows: int = 0
    done: bool = False
    since: tuple | None = None
    rate: float = math.nan  # batches per second
    first_rows: int | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return not self.done and self.since is not None

    @property
    def eta(self) -> float:
        return (self.target - self.rows) / self.rate if self.rate > 0 else math.nan


class SweepWatch:
    """The status of a sweep's runs, from their logs' row counts at the times ``clock()`` gives."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.runs: dict[str, RunState] = {}
        self._counters: dict[str, object] = {}

    def add(self, key: str, name: str, target: int, rows) -> None:
        """Watch run ``key`` (shown as ``name``) of ``target`` batches; ``rows()``: its log's row count."""
        self.runs[key] = RunState(name, int(target))
        self._counters[key] = rows

    def finished(self, key: str) -> None:
        self.runs[key].done = True

    def poll(self) -> None:
        """Count every unfinished run's rows; a run whose count moved is running, with its speed since then."""
        now = self.clock()
        for key, run in self.runs.items():
            if run.done:
                continue
            run.rows = self._counters[key]()
            if run.first_rows is None:
                run.first_rows = run.rows
            if run.since is None and run.rows != run.first_rows:
                run.since = (now, run.rows)
            elif run.since is not None and now > run.since[0] and run.rows > run.since[1]:
                run.rate = (run.rows - run.since[1]) / (now - run.since[0])

    def counts(self) -> tuple[int, int, int]:
        """(done, running, waiting)."""
        done = sum(r.done for r in self.runs.values())
        running = sum(r.running for r in self.runs.values())
        return done, running, len(self.runs) - done - running

    def eta(self) -> float:
        """Seconds until every run is done, at the running runs' summed speed (NaN before one is measured)."""
        speed = sum(r.rate for r in self.runs.values() if r.running and r.rate > 0)
        left = sum(r.target - r.rows for r in self.runs.values() if not r.done)
        return 0.0 if left == 0 else left / speed if speed > 0 else math.nan

    def summary(self) -> str:
        done, running, waiting = self.counts()
        batches = sum(r.target if r.done else r.rows for r in self.runs.values())
        total = sum(r.target for r in self.runs.values())
        return (f"sweep: {done}/{len(self.runs)} runs done, {running} running, {waiting} waiting; "
                f"{batches:,}/{total:,} batches; ETA {hms(self.eta())}")

    def lines(self) -> list[str]:
        """The summary, then one line per running run."""
        running = [r for r in self.runs.values() if r.running]
        width = max((len(r.name) for r in running), default=0)
        return [self.summary()] + [
            f"  {r.name:<{width}}  {r.rows:,}/{r.target:,} batches  "
            + (f"{r.rate:.1f} batch/s  ETA {hms(r.eta)}" if r.rate > 0 else "starting")
            for r in running]


class StatusBoard:
    """Shows a :class:`SweepWatch` on ``stream``: on a terminal its lines, redrawn in place at most every
    ``redraw`` seconds; elsewhere its summary every ``interval`` seconds. :meth:`say` prints a line above it."""

    def __init__(self, watch: SweepWatch, stream=None, interval: float = 30.0, redraw: float = 1.0,
                 enabled: bool = True):
        self.watch, self.enabled = watch, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = redraw if self.tty else interval
        self._drawn = 0  # lines of the block on screen
        self._last = -math.inf

    def update(self, force: bool = False) -> None:
        """Poll the runs and show their status if ``every`` seconds have passed (or ``force``)."""
        now = self.watch.clock()
        if not self.enabled or (not force and now - self._last < self.every):
            return
        self._last = now
        self.watch.poll()
        if self.tty:
            self._clear()
            lines = self.watch.lines()
            self.stream.write("".join(line + "\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.stream.write(self.watch.summary() + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        """One line that stays (a run finished), above the redrawn block."""
        if not self.enabled:
            return
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, erase to the end
            self._drawn = 0
