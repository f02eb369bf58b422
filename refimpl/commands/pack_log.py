"""write RUN/log.csv.gz from RUN/log.csv, reproducibly, for committing

Write each RUN/log.csv's complete rows to RUN/log.csv.gz (gzip level 9, no name, no
timestamp: the same log gives the same bytes). plot, milestones, evaluate and resume read
log.csv.gz where log.csv is absent, so a study commits the .gz and leaves log.csv out of git.
"""

from __future__ import annotations

from pathlib import Path

from ..runfolder import LOG_FILE
from ..runlog import pack_log


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", nargs="+", help="run folder")


def run(args) -> int:
    for folder in args.run:
        log = Path(folder) / LOG_FILE
        before = log.stat().st_size if log.is_file() else 0
        rows, out = pack_log(log)
        print(f"{out}: {rows} rows, {before / 1e6:.1f} MB -> {out.stat().st_size / 1e6:.1f} MB")
    return 0
