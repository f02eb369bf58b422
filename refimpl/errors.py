"""The errors of refimpl's commands, in one module that imports none of them.

:mod:`refimpl.exits` maps each to an exit status; the modules that raise them (training,
sweep, trace) import them from here, so the exit rules never pull in a command. Errors
of the building blocks (BackendError, CheckpointError, DatasetError, OptionError, ...)
stay beside the code that raises them; those modules import no command either.
"""

from __future__ import annotations

import signal
from pathlib import Path


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the kept checkpoint."""


class RunExistsError(FileExistsError):
    """A new run was asked for in a folder that holds one (a run-folder problem: exit status 1)."""


class RunConflictError(FileExistsError):
    """A folder that should hold this run holds one with other settings (a file problem: exit status 1)."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, step: int, signum: int, path: Path):
        self.step, self.signum, self.path = step, signum, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}; checkpoint saved to {path}")

    def __reduce__(self):  # picklable, so that it crosses from a worker process
        return (type(self), (self.step, self.signum, self.path))


class SchedulerError(OSError):
    """The Dask scheduler cannot be reached; the message names its address."""


class SweepSetupError(OSError):
    """What a sweep needs is missing (Dask); the message says what to install."""


class RunFolderNotVisible(OSError):
    """A worker cannot see the sweep's folder; the message names the folder and the worker."""


class SweepInterrupted(Exception):
    """The sweep stopped on a signal; every run in progress saved its checkpoint (exit status 128 + signal)."""

    def __init__(self, signum: int, out: Path, saved: int):
        super().__init__(f"{signal.Signals(signum).name}: {saved} run(s) in progress saved their checkpoints in {out}")
        self.signum, self.path = signum, None


class TraceError(ValueError):
    """A trace file is missing, unreadable or malformed; the message names the file."""


class TraceKeyError(TraceError, KeyError):
    """A key is not in the trace; the message names the file and the key."""

    def __str__(self):
        return self.args[0] if self.args else ""
