"""Table 1: how close Algorithm 1 gets to a known-sufficient bottleneck.

For each n: (1) a plain VAE with n dimensions and tau = 0 (``refimpl train --baseline``)
for B batches; its reconstruction error, the moving average (factor 0.95) of E2 over
training, becomes (2) the tau of a gated VAE with 2n dimensions, trained for 2B batches;
||nu||_0 is read from its log after B, 1.5B and 2B batches. Writes ``table1.csv`` (n,
baseline error, ||nu||_0 at the three budgets) and ``table1.png`` (open gates over
training for each n, the budgets marked, n dashed).

Default (small): built-in synthetic dSprites pooled to 16x16 (paper pattern, convs 32, 64),
n in {3, 5}, B = 3,000, two runs at a time. Measured (seed 0): baseline errors 1.12 (n = 3)
and 0.67 (n = 5); the gated runs go 6 -> 6, 6, 5 and 10 -> 10, 8, 6 open gates at 3,000,
4,500 and 6,000 batches: the procedure end to end, pruning towards n and still moving at
2B (the paper's budgets are 70 times longer). About 9 minutes on 2 busy CPU cores.

``--full``: the paper's protocol on dSprites (official file, 64x64): n in {5, 10, 30},
B = 200,000 (baseline 200K, gated 400K batches). Other datasets: ``--dataset shapes3d``
etc. with ``--full``. On a GPU: ``--full --backend cupy``.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_csv
from ..runlog import moving_average, read_log
from ..sweep import Cluster, Sweep
from ..training import LOG_FILE
from ..optionspec import int_list
from .. import figures
from . import common

PROG = "python -m refimpl.experiments.table1"
SMALL = {"dataset": "synthetic-dsprites", "data": None, "batches": 3000, "batch_size": 64, "image_size": 16,
         "channels": None, "latents": (3, 5), "jobs": 2}
FULL = {"dataset": "dsprites", "data": None, "batches": 200000, "batch_size": 64, "image_size": None,
        "channels": None, "latents": (5, 10, 30), "jobs": 1}


def build_parser(prog: str = PROG):
    p = common.parser(prog, __doc__, own=("latent", "tau"))
    p.add_argument("--latents", type=int_list, default=None, metavar="N1,N2,...",
                   help="baseline dimensions n (default: 3,5 small; 5,10,30 full)")
    return p


def open_gates_at(log: dict, step: int) -> int:
    """The logged open-gate count after batch ``step``."""
    steps = [int(s) for s in log["step"]]
    if step not in steps:
        raise ValueError(f"the log has no row for batch {step} (it ends at {steps[-1] if steps else 0})")
    return int(log["open_gates"][steps.index(step)])


def baseline_tau(summary: dict) -> float:
    """Step one's result: the 0.95 moving average of the baseline's final error E2 (the gated run's tau)."""
    return moving_average(read_log(Path(summary["out"]) / LOG_FILE)["E2"], 0.95)


def run(argv=None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    s = common.settings(args, SMALL, FULL, prog)
    latents = args.latents or s["latents"]
    budget = s["batches"]
    out = Path(args.out or "experiments/table1")
    # The task graph: per n, baseline run -> its tau -> the gated 2n run; the n proceed independently.
    with Sweep(out, Cluster.from_args(args, jobs=s["jobs"]), backend=args.backend) as sweep:
        base, gated = [], []
        for n in latents:
            # step one: a plain VAE with n dimensions, tau = 0, B batches
            base.append(sweep.submit(common.spec(out / "runs" / f"baseline-n{n}", s, latent=n, batches=budget,
                                                 baseline=True, backend=args.backend)))
            tau = sweep.submit_function(baseline_tau, base[-1])
            # step two: a gated VAE with 2n dimensions, tau = the baseline's error, 2B batches
            gated.append(sweep.submit(common.spec(out / "runs" / f"gated-n{2 * n}", s, latent=2 * n, tau=1.0,
                                                  batches=2 * budget, backend=args.backend), tau=tau))
        base, gated = sweep.gather(base), sweep.gather(gated)
    taus = [baseline_tau(b) for b in base]

    marks = (budget, budget * 3 // 2, 2 * budget)
    rows, logs = [], []
    for n, tau, g in zip(latents, taus, gated):
        log = read_log(Path(g["out"]) / LOG_FILE)
        logs.append(log)
        rows.append({"dataset": s["dataset"], "n": n, "baseline_error_ma95": tau, "gated_n": 2 * n,
                     **{f"open_gates_{m}": open_gates_at(log, m) for m in marks}})
    written = [write_csv(out / "table1.csv", rows)]
    png = plot(latents, logs, marks, out / "table1.png")
    written += [png] if png else []
    for r in rows:
        counts = ", ".join(f"{r[f'open_gates_{m}']} at {m}" for m in marks)
        print(f"table1: n={r['n']}: baseline error {r['baseline_error_ma95']:.4g}; 2n={r['gated_n']} -> {counts}")
    common.report("table1", written)
    return {"files": written, "rows": rows}


def plot(latents, logs, marks, path):
    """Open gates of the gated runs over batches; the path written, or None without matplotlib."""
    plt = figures.pyplot()
    if plt is None:
        figures.no_plot_note(path)
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (n, log) in enumerate(zip(latents, logs)):
        color = f"C{i}"
        ax.plot(log["step"], log["open_gates"], color=color, lw=1, label=f"gated, 2n = {2 * n}")
        ax.plot(log["step"], log["gates_l1"], color=color, lw=0.5, alpha=0.5)
        ax.axhline(n, color=color, ls="--", lw=0.8)
    for m in marks:
        ax.axvline(m, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("batch")
    ax.set_ylabel(r"$\|\nu\|_0$ (open gates); thin: $\|\sigma(k\gamma)\|_1$")
    ax.set_title("gated VAE with 2n dimensions, tau = baseline error (dashed: n)")
    ax.legend()
    ax.grid(alpha=0.3)
    return figures.save_figure(fig, path)


def main(argv=None, prog: str = PROG) -> int:
    return common.main_wrapper(run, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
