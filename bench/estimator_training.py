"""Training with each of l. 29's gradient estimators (``Hyper.estimator``, interpretation (o)): ARM (the
paper's), DisARM and REINFORCE-LOO, on the README's small synthetic setup, three seeds each.

The runs are one ``refimpl sweep`` (``--run`` starts it; running it again reuses finished runs
and resumes the others):

    refimpl sweep --grid estimator=arm,disarm,reinforce_loo --grid seed=0,1,2 --image-size 16 --tau 4 \\
        --batches 3000 --jobs 2 --out bench/results/estimators/training

(synthetic dSprites 16x16, n = 10, tau = 4, batch 64, float32; ~2 minutes a run on an idle
2-core machine). From each run's ``log.csv`` this script reads: the first hit (l. 25), the
batch at which the first and the fifth gate close (the first step with at most n - 1,
resp. n - 5, open gates, ``open_gates`` = #{gamma_j > 0}), how often a closed gate opens
again, the open gates at the end, and E2 against tau (E2's mean over the last 500 batches,
the share of those batches with E2 > tau, the largest E2 after the first hit). It writes
``bench/results/estimators/training.md``:

    .venv/bin/python bench/estimator_training.py [--run] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refimpl.runlog import read_log  # noqa: E402

OUT = ROOT / "bench" / "results" / "estimators"
ESTIMATORS = ("arm", "disarm", "reinforce_loo")
SEEDS = (0, 1, 2)
NAMES = {"arm": "ARM", "disarm": "DisARM", "reinforce_loo": "REINFORCE-LOO"}
SWEEP = ["sweep", "--grid", "estimator=" + ",".join(ESTIMATORS), "--grid", "seed=" + ",".join(map(str, SEEDS)),
         "--image-size", "16", "--tau", "4", "--batches", "3000", "--jobs", "2"]
TAIL = 500  # batches at the end over which E2 is summarised


def first_step(steps, values, test):
    return next((int(s) for s, v in zip(steps, values) if test(v)), None)


def summarise(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())["config"]
    log = read_log(run / "log.csv")
    n, tau = config["latent"], config["hyper"]["tau"]
    steps, open_gates, e2, hit = log["step"], log["open_gates"], log["E2"], log["hit"]
    first_hit = first_step(steps, hit, lambda v: v > 0)
    reopened = sum(1 for a, b in zip(open_gates, open_gates[1:]) if b > a)
    tail = e2[-TAIL:]
    after_hit = [v for s, v in zip(steps, e2) if first_hit is not None and s > first_hit]
    return {"estimator": config["hyper"].get("estimator", "arm"), "seed": config["seed"], "batches": int(steps[-1]),
            "first_hit": first_hit, "first_closed": first_step(steps, open_gates, lambda v: v <= n - 1),
            "fifth_closed": first_step(steps, open_gates, lambda v: v <= n - 5), "reopened": reopened,
            "final_open": int(open_gates[-1]), "tau": tau, "E2_tail": statistics.fmean(tail),
            "over_tau_tail": sum(v > tau for v in tail) / len(tail), "E2_max_after_hit": max(after_hit, default=None)}


def cell(v, fmt="{:,}"):
    return "-" if v is None else fmt.format(v)


def markdown(rows: list) -> str:
    lines = ["# Training with ARM, DisARM and REINFORCE-LOO at l. 29", "",
             "Written by `bench/estimator_training.py` from the runs of `refimpl " + " ".join(SWEEP) +
             " --out bench/results/estimators/training` (synthetic dSprites 16x16, n = 10, tau = 4, batch 64, "
             "float32, NumPy). Batch numbers are Algorithm 1 steps; a gate is closed when gamma_j <= 0; "
             "'closed, then open again' counts the steps at which the number of open gates went up; E2 is the "
             f"per-batch summed squared error of l. 13, summarised over the last {TAIL} batches. "
             "'-': not reached within the run. (Wall times are not compared: the runs shared a 2-core machine "
             "with other jobs. Each estimator makes the same two decoder passes a step; REINFORCE-LOO draws n more "
             "uniforms.)", "",
             "| estimator | seed | first hit | first gate closed | fifth gate closed | closed, then open again | "
             f"open gates at the end | E2, last {TAIL} (tau) | E2 > tau, last {TAIL} | "
             "largest E2 after the first hit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {NAMES[r['estimator']]} | {r['seed']} | {cell(r['first_hit'])} | {cell(r['first_closed'])} | "
                     f"{cell(r['fifth_closed'])} | {r['reopened']} | {r['final_open']} | "
                     f"{r['E2_tail']:.2f} ({r['tau']:g}) | {r['over_tau_tail']:.1%} | "
                     f"{cell(r['E2_max_after_hit'], '{:.2f}')} |")
    lines += ["", "Per estimator (mean over the seeds; a mean of a milestone counts only the runs that reached it, "
              "their number in brackets):", "",
              "| estimator | first gate closed | fifth gate closed | open gates at the end | closed, then open again | "
              f"E2, last {TAIL} |", "|---|---:|---:|---:|---:|---:|"]
    for est in ESTIMATORS:
        mine = [r for r in rows if r["estimator"] == est]
        if not mine:
            continue

        def mean(key, fmt="{:,.0f}"):
            got = [r[key] for r in mine if r[key] is not None]
            return f"{fmt.format(statistics.fmean(got))} ({len(got)}/{len(mine)})" if got else f"- (0/{len(mine)})"

        lines.append(f"| {NAMES[est]} | {mean('first_closed')} | {mean('fifth_closed')} | "
                     f"{mean('final_open', '{:.1f}')} | {mean('reopened', '{:.1f}')} | {mean('E2_tail', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Summarise the sweep's runs (after running it, with --run) into training.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default: {OUT}); the runs are in "
                                                                "its training/ folder")
    parser.add_argument("--run", action="store_true", help="run (or continue) the sweep first")
    args = parser.parse_args(argv)
    sweep_out = args.out / "training"
    if args.run:
        refimpl = Path(sys.executable).with_name("refimpl")
        subprocess.run([str(refimpl), *SWEEP, "--out", str(sweep_out), "--quiet"], check=True)
    runs = sorted((sweep_out / "runs").glob("*/log.csv"))
    if not runs:
        parser.error(f"no runs under {sweep_out / 'runs'}; start them with --run")
    rows = sorted((summarise(p.parent) for p in runs),
                  key=lambda r: (ESTIMATORS.index(r["estimator"]), r["seed"]))
    (args.out / "training.md").write_text(markdown(rows) + "\n")
    for r in rows:
        print(f"{r['estimator']:>13} seed {r['seed']}: first closed {r['first_closed']}, fifth {r['fifth_closed']}, "
              f"final open {r['final_open']} after {r['batches']} batches, E2 {r['E2_tail']:.2f} (tau {r['tau']:g})")
    print(f"wrote {args.out / 'training.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
