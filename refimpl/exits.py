"""How a command ends: one line for each error a user can cause, and its exit status.

=========================================================  =======
a bad option or combination (argparse, OptionError,       2
a new run in a folder that holds one)
a backend, dataset, checkpoint, trace or file problem,     1
a diverging run (NonFiniteLoss), no matplotlib for a figure
Ctrl-C / SIGTERM (a checkpoint is saved first)              128 + signal number
=========================================================  =======

Anything else is a bug in refimpl and keeps its traceback. ``refimpl`` and the
experiment scripts both end through :func:`run_command`.
"""

from __future__ import annotations

import argparse
import sys

from .backend import BackendError
from .checkpoint import CheckpointError
from .data import DatasetError
from .figures import PlottingUnavailable
from .optionspec import OptionError
from .sweep import SweepInterrupted
from .trace import TraceError
from .training import NonFiniteLoss, RunExistsError, TrainingInterrupted

USAGE, FAILURE = 2, 1
FAILURES = (BackendError, DatasetError, CheckpointError, TraceError, NonFiniteLoss, PlottingUnavailable, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: ...`` and exit status 2."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def run_command(func, prog: str, continue_hint=None) -> int:
    """``func()`` with the exit statuses above.

    continue_hint(out): how to continue an interrupted run whose folder is ``out`` (None
    when unknown); its text follows the interruption's line.
    """
    def hint(out) -> str:
        text = continue_hint(out) if continue_hint else "run the same command again to continue"
        return f"; {text}" if text else ""

    try:
        return func() or 0
    except (TrainingInterrupted, SweepInterrupted) as exc:
        print(f"\n{prog}: interrupted: {exc}{hint(exc.path.parent if exc.path else None)}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted{hint(None)}", file=sys.stderr)
        return 130
    except (OptionError, RunExistsError) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return USAGE
    except FAILURES as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return FAILURE
