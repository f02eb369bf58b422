"""How a command ends: one line for each error a user can cause, and its exit status.

2 -- the command line itself is wrong: an unknown command or option, a value out of range,
options that exclude each other, a value the run or dataset rules out (``--indices``
beyond the dataset, ``--batches`` below a resumed run's step, options that differ from
the run being resumed). argparse's errors and :class:`OptionError`.

1 -- what the command line points at is wrong: a run folder that does not exist, holds
no run (``--resume``, ``evaluate``), already holds one (a new run without ``--resume``
or ``--overwrite``), is not a run folder, or is in use; a missing or damaged checkpoint,
log, trace or dataset file, a dataset without generative factors; the backend; a
diverging run (NonFiniteLoss); no matplotlib for a figure asked for. OSError and the
errors of :data:`FAILURES`. (``refimpl compare`` also exits 1 when the traces diverge.)

128 + signal number -- Ctrl-C (130) or SIGTERM (143), after a checkpoint is saved.

Anything else is a bug in refimpl and keeps its traceback. ``refimpl`` and the
experiment scripts both end through :func:`run_command`.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from .backend import BackendError
from .checkpoint import CheckpointError
from .data import DatasetError
from .figures import PlottingUnavailable
from .errors import NonFiniteLoss, SweepInterrupted, TraceError, TrainingInterrupted
from .optionspec import OptionError

USAGE, FAILURE = 2, 1
FAILURES = (BackendError, DatasetError, CheckpointError, TraceError, NonFiniteLoss, PlottingUnavailable, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: ...`` and exit status 2.

    An unknown ``--option`` is named at once, with the closest known one (argparse would
    otherwise hand its value to a positional and blame that); an error after the command's
    name carries the command's prefix (``refimpl train: error: ...``). A command that hands
    the rest of its line on (``nargs=argparse.REMAINDER``: ``refimpl experiment NAME ...``)
    leaves its options to the parser it hands them to.
    """

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _parse_optional(self, arg_string):
        parsed = super()._parse_optional(arg_string)
        if (parsed is not None and parsed[0] is None and self._subparsers is None  # a command's unknown --option,
                and not any(a.nargs == argparse.REMAINDER for a in self._actions)):  # unless it hands them on
            self.error(unknown_option(arg_string.split("=", 1)[0], self._option_string_actions))
        return parsed

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(namespace)
            options = [a for a in extras if a.startswith("--")]
            parser.error(unknown_option(options[0].split("=", 1)[0], parser._option_string_actions) if options
                         else f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _command_parser(self, namespace) -> argparse.ArgumentParser:
        """The parser of the command in ``namespace`` (this one when it has no commands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(getattr(namespace, action.dest, None), self)
        return self


def unknown_option(name: str, known) -> str:
    """The error for option ``name``, which is none of ``known`` (option strings): the closest one suggested."""
    spelled = sorted(k[2:] for k in known if k.startswith("--") and "_" not in k)  # lambda-max, not lambda_max too
    close = difflib.get_close_matches(name.lstrip("-").replace("_", "-"), spelled, n=1, cutoff=0.6)
    return f"unrecognized option {name}" + (f"; did you mean --{close[0]}?" if close else "")


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
    except OptionError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return USAGE
    except FAILURES as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return FAILURE
