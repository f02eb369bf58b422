"""The ``refimpl`` command line.

    refimpl train [DATASET] [--tau T] [--latent N] [--batches B] [--out DIR] [--resume] ...
    refimpl train --from RUN [--at STEP] --out NEW [options]   a branch of RUN (refimpl/branch.py)
    refimpl evaluate RUN        held-out error, open gates -> RUN/eval.json
    refimpl export RUN          the pruned plain VAE -> RUN/export/model.{npz,json}
    refimpl reconstruct RUN     originals over reconstructions -> RUN/reconstructions.png
    refimpl plot RUN            Figure 1 of a run, gate by gate -> RUN/plot.png (refimpl/plot.py)
    refimpl factors RUN         which generative factor each kept dimension holds (refimpl/factors.py)
    refimpl milestones RUN      Section 4.1's events (lambda' peak, staircase, reopenings) from log.csv
    refimpl study DIR...        one table over many runs (sweeps), grouped by arm, with each seed's result
    refimpl sweep --grid ...    a grid of runs on Dask, one CSV row per run (refimpl/sweep.py)
    refimpl pack-log RUN...     RUN/log.csv -> RUN/log.csv.gz, reproducibly (to commit a study's logs)
    refimpl trace, compare      golden traces (refimpl/trace.py, refimpl/compare.py)

    refimpl experiment NAME ... the paper's experiments (refimpl/experiments/), as python -m refimpl.experiments.NAME

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``
(:mod:`refimpl.commands` for those with no module of their own); its docstring's first
line is its help. This module is the table of (name, module) and the top-level parser.
Errors are one line with the exit statuses of :mod:`refimpl.exits`.
"""

from __future__ import annotations

import argparse
import re

from . import __version__, compare, factors, milestones, plot, study, sweep, trace
from .commands import evaluate, experiment, export, pack_log, reconstruct, train
from .exits import ArgumentParser, run_command

PROG = "refimpl"
COMMANDS = (("train", train), ("evaluate", evaluate), ("export", export), ("reconstruct", reconstruct),
            ("pack-log", pack_log), ("plot", plot), ("factors", factors), ("milestones", milestones),
            ("study", study), ("sweep", sweep), ("trace", trace), ("compare", compare), ("experiment", experiment))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Dynamic narrowing of VAE bottlenecks with GECO and L0-ARM "
                                                   "(De Boom et al.): a NumPy/CuPy reference implementation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS:
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", module.__doc__.strip()).replace("``", "")  # plain text, not reST
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), f"{PROG} {args.command}",
                       lambda out: f"continue with: refimpl train --out {out} --resume" if out
                       else "run the same command again to continue")


if __name__ == "__main__":
    raise SystemExit(main())
