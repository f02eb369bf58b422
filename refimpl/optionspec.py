"""How a dataclass field declares its command-line option: default, help, choices, parser.

A run option is declared once, as a field of :class:`refimpl.config.RunConfig`,
:class:`refimpl.config.Schedule` or :class:`refimpl.algorithm1.Hyper` made with
:func:`option`; :mod:`refimpl.options` derives the argparse options of ``train``,
``trace`` and the experiments from those fields. This module imports nothing of
refimpl, so the dataclasses can use it without an import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses


class OptionError(ValueError):
    """A run option has a bad value or a bad combination (exit status 2); the message is one line."""


def option(default=dataclasses.MISSING, help: str = "", *, parse=None, metavar=None, choices=None,
           letter=None, flag=True, positional=False, default_factory=dataclasses.MISSING):
    """A dataclass field whose metadata declares its command-line option ``--name`` (dashes or underscores).

    parse: argparse ``type`` (default: that of the default value; ``bool``: a switch,
    ``--name`` / ``--no-name`` when the default is None); choices: allowed values;
    letter: the interpretation's letter in INTERPRETATIONS.md (an Algorithm 1 switch);
    flag: False for a field with no option (set by the program, not the user);
    positional: an optional positional argument where a command allows it.
    """
    meta = {"help": help, "parse": parse, "metavar": metavar, "choices": choices, "letter": letter, "flag": flag,
            "positional": positional}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def comma_list(cast, minimum, kind: str):
    """An argparse type: comma-separated ``cast`` values, each >= ``minimum`` (e.g. "32,32,64")."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(cast(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind} >= {minimum}, got {text!r}")
        return values

    return parse


def integer(minimum: int):
    """An argparse type: an integer >= ``minimum`` (0: non-negative, 1: positive)."""
    kind = "positive integer" if minimum == 1 else f"integer >= {minimum}" if minimum else "non-negative integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind}, got {value}")
        return value

    return parse


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def float_pair(text: str) -> tuple:
    """An argparse type: two comma-separated numbers (Adam's betas)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return values


positive_int = integer(1)
nonnegative_int = integer(0)
int_list = comma_list(int, 1, "integers")
index_list = comma_list(int, 0, "integers")
