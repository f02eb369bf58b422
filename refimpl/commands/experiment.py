"""run one of the paper's experiments (refimpl/experiments/): figure1, figure2, figure3, table1

refimpl experiment NAME [ARGS...] runs refimpl.experiments.NAME with ARGS, the same as
python -m refimpl.experiments.NAME [ARGS...], with the same exit statuses. NAME is one of
figure1, figure2, figure3, table1; refimpl experiment NAME --help lists its options.
"""

from __future__ import annotations

import argparse
import importlib

PROG = "refimpl experiment"
NAMES = ("figure1", "figure2", "figure3", "table1")


def add_arguments(p) -> None:
    p.add_argument("name", choices=NAMES, metavar="NAME", help=f"the experiment: {', '.join(NAMES)}")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its options (NAME --help lists them)")


def run(args) -> int:
    """The experiment's own ``main``: its parser, messages (named ``refimpl experiment NAME``) and exit statuses."""
    return importlib.import_module(f"refimpl.experiments.{args.name}").main(args.args, prog=f"{PROG} {args.name}")
