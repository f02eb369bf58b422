"""Figure 1: four quantities over one training run with n = 10 on dSprites.

E2 (the batch's summed squared error) with tau as a red line, ||sigmoid(k gamma)||_1
(a continuous count of open gates), lambda' and the fraction of the batch within
tolerance (e2 <= tau), against the batch number. Writes ``figure1.csv`` (those columns
and ``open_gates``, one row per batch) and ``figure1.png``.

Default (small): built-in synthetic dSprites average-pooled to 16x16, the paper's network
pattern scaled to that size (convs 32, 64), n = 10, tau = 2.5, 10,000 batches of 64,
Section 4's hyperparameters. Measured (seed 0): E2 falls below tau within ~400 batches
and the hit fraction goes to ~0.95; lambda' peaks at 2.1 and then drifts down (Adam moves
raw lambda ~1e-3 per batch); from batch ~1,000 gates close: ||sigmoid(k gamma)||_1 goes
10 -> 5 by batch 3,800 and -> 4 at batch ~6,200 (the paper's staircase), while E2 climbs
to tau and the hit fraction drops to ~0.6, where it stays with lambda' ~0.35. About 12
minutes on 2 busy CPU cores (0.05-0.07 s per batch, one BLAS thread).

``--full``: dSprites (the official file, ``--data`` or $REFIMPL_DATA), 64x64, the paper's
network, n = 10, tau = 25 (our choice: the paper gives no tau for Fig. 1; Fig. 3 reports
5 dimensions at tau = 25, as Fig. 1 ends with 5 gates), 50,000 batches. On a GPU:
``--full --backend cupy``.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_csv
from ..plot import plot_run
from ..runlog import read_log
from ..sweep import Cluster, Sweep
from ..training import LOG_FILE
from .. import figures
from . import common

SMALL = {"dataset": "synthetic-dsprites", "data": None, "batches": 10000, "batch_size": 64, "image_size": 16,
         "channels": None, "latent": 10, "tau": 2.5}
FULL = {"dataset": "dsprites", "data": None, "batches": 50000, "batch_size": 64, "image_size": None,
        "channels": None, "latent": 10, "tau": 25.0}
COLUMNS = ("step", "E2", "tau", "gates_l1", "lambda_eff", "hit_fraction", "open_gates")
PROG = "python -m refimpl.experiments.figure1"


def build_parser(prog: str = PROG):
    p = common.parser(prog, __doc__)
    p.add_argument("--tau", type=float, default=None, help="GECO tolerance (default: 2.5 small, 25 full)")
    return p


def run(argv=None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    s = common.settings(args, SMALL, FULL, prog)
    tau = args.tau if args.tau is not None else s["tau"] * s["tau_scale"]
    out = Path(args.out or "experiments/figure1")
    with Sweep(out, Cluster.from_args(args), backend=args.backend) as sweep:
        summary = sweep.gather([sweep.submit(common.spec(out / "runs" / "run", s, tau=tau, backend=args.backend))])[0]
    log = read_log(Path(summary["out"]) / LOG_FILE)
    rows = [{c: (int(log[c][i]) if c in ("step", "open_gates") else log[c][i]) for c in COLUMNS}
            for i in range(len(log["step"]))]
    written = [write_csv(out / "figure1.csv", rows)]
    if figures.pyplot() is None:
        figures.no_plot_note(out / "figure1.png")
    else:  # refimpl plot's Figure 1 of the run: the four panels, a line per gate, reconstructions
        written.append(plot_run(summary["out"], out=out / "figure1.png", backend=args.backend))
    print(f"figure1: {summary['open_gates']}/{s['latent']} gates open after {summary['step']} batches")
    common.report("figure1", written)
    return {"files": written, "summary": summary}


def main(argv=None, prog: str = PROG) -> int:
    return common.main_wrapper(run, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
