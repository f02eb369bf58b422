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

from ..runlog import read_log
from ..training import LOG_FILE
from .. import figures
from . import common

SMALL = {"dataset": "synthetic-dsprites", "data": None, "batches": 10000, "batch_size": 64, "image_size": 16,
         "channels": None, "latent": 10, "tau": 2.5}
FULL = {"dataset": "dsprites", "data": None, "batches": 50000, "batch_size": 64, "image_size": None,
        "channels": None, "latent": 10, "tau": 25.0}
COLUMNS = ("step", "E2", "tau", "gates_l1", "lambda_eff", "hit_fraction", "open_gates")


def build_parser():
    p = common.parser("python -m refimpl.experiments.figure1", __doc__)
    p.add_argument("--latent", type=int, default=None, help="initial latent dimensions n (default 10)")
    p.add_argument("--tau", type=float, default=None, help="GECO tolerance (default: 2.5 small, 25 full)")
    return p


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    s = common.settings(args, SMALL, FULL)
    tau = args.tau if args.tau is not None else s["tau"]
    out = Path(args.out or "experiments/figure1")
    spec = common.run_spec(out / "runs" / "run", s, tau=tau, backend=args.backend)
    summary = common.train_many([spec], jobs=args.jobs, quiet=args.quiet, blas_threads=args.blas_threads)[0]
    log = read_log(Path(summary["out"]) / LOG_FILE)
    n_rows = len(log["step"])
    rows = [{c: (int(log[c][i]) if c in ("step", "open_gates") else log[c][i]) for c in COLUMNS}
            for i in range(n_rows)]
    csv_path = common.write_csv(out / "figure1.csv", rows)
    png = out / "figure1.png"
    plot(log, tau, s["latent"], png)
    print(f"figure1: {summary['open_gates']}/{s['latent']} gates open after {summary['step']} batches; {csv_path}, {png}")
    return {"csv": csv_path, "png": png, "summary": summary}


def plot(log: dict, tau: float, latent: int, path) -> None:
    plt = figures.pyplot()
    if plt is None:
        figures.no_plot_note(path)
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    step = log["step"]
    panels = [
        (axes[0, 0], "E2", "reconstruction error E2 (SSE)"),
        (axes[0, 1], "gates_l1", r"$\|\sigma(k\gamma)\|_1$"),
        (axes[1, 0], "lambda_eff", r"$\lambda'$"),
        (axes[1, 1], "hit_fraction", "fraction of batch with $e_2 \\leq \\tau$"),
    ]
    for ax, key, title in panels:
        noisy = key in ("E2", "hit_fraction")
        ax.plot(step, log[key], lw=0.6, color="C0", alpha=0.35 if noisy else 1.0)
        if noisy:  # the per-batch values and their moving average (0.99)
            ax.plot(step, smooth(log[key], 0.99), lw=1.0, color="C0")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(tau, color="red", lw=1.2, label=f"tau = {tau:g}")
    axes[0, 0].legend(loc="upper right")
    axes[0, 0].set_yscale("log")
    axes[0, 1].set_ylim(-0.2, latent + 0.5)
    axes[1, 0].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("batch")
    fig.suptitle(f"Algorithm 1, n = {latent}, tau = {tau:g}")
    figures.save_figure(fig, path)


def smooth(values, factor: float) -> list:
    """Running exponential moving average of ``values`` (started at the first value)."""
    out, m = [], None
    for v in values:
        m = v if m is None else factor * m + (1 - factor) * v
        out.append(m)
    return out


def main(argv=None) -> int:
    return common.main_wrapper(run, argv, prog="python -m refimpl.experiments.figure1")


if __name__ == "__main__":
    raise SystemExit(main())
