#!/bin/sh
# What bench/results/study/ commits of its runs, recomputed from their run folders (the runs
# themselves are trained by the sweeps of bench/results/study/README.md):
#   RUN/log.csv.gz   the run's log, compressed (refimpl pack-log; log.csv stays out of git;
#                    a branch's log holds only its own rows)
#   RUN/plot.png     Figure 1 of the run (a branch's whole history, its parent's rows first)
#   RUN/milestones.md  Section 4.1's events, the bumps and the constraint's last 10,000 batches
#   q1-seeds-s32/study.md, q1-budget.md, q2-tau20.md, q2-tau35.md, s44-n-vs-2n-s16/study.md   the tables
#   q2x-b64-tau35-g-per-step-70k/study.md   (g) at tau = 35 continued to 70,000, beside its control
#   study.md         Q1's and Q2's runs (every q1-*/q2-* folder) in one table, one row per arm
#   figure3-5-and-3.png, factors-training.*   Figure 3 and the factors of the runs with the paper's 5 and 3
# Run folders still at step 0 (a sweep creates each run's folder when it is stopped before the
# run's first batch) hold nothing worth keeping and are skipped here; delete them before committing.
# Usage: bench/record_study.sh [FOLDER]   (default bench/results/study)
set -eu
STUDY=${1:-bench/results/study}
REFIMPL=${REFIMPL:-.venv/bin/refimpl}
for run in "$STUDY"/*/runs/*; do
    [ -f "$run/log.csv" ] || [ -f "$run/log.csv.gz" ] || continue
    if [ -f "$run/log.csv" ]; then $REFIMPL pack-log "$run"; fi  # a fresh clone has only the .gz
    [ -f "$run/checkpoint.npz" ] || continue  # s44's runs keep no checkpoint: their plot and milestones stay
    $REFIMPL plot "$run" --count 8 > /dev/null
    $REFIMPL milestones "$run" > /dev/null
done
table() {  # OUT DIR...: one study table, when its runs have started
    out=$1; shift
    ls "$@" > /dev/null 2>&1 || return 0
    $REFIMPL study "$@" --out "$out" > /dev/null
}
table "$STUDY/q1-seeds-s32/study.md" "$STUDY/q1-seeds-s32"
table "$STUDY/q2-tau20.md" "$STUDY"/q2-b64-tau20-*
table "$STUDY/q1-budget.md" "$STUDY/q2-b64-tau20-control" "$STUDY/q2-b64-tau20-control-reseeded" "$STUDY/q1-b64-tau20-budget" \
    "$STUDY/q1-b64-tau35-budget" "$STUDY/q2-b64-tau35-control-reseeded"
table "$STUDY/q2-tau35.md" "$STUDY/q1-b64-tau35-budget" "$STUDY"/q2-b64-tau35-*
table "$STUDY/q2x-b64-tau35-g-per-step-70k/study.md" "$STUDY/q1-b64-tau35-budget" "$STUDY/q2x-b64-tau35-g-per-step-70k"
table "$STUDY/s44-n-vs-2n-s16/study.md" "$STUDY/s44-n-vs-2n-s16"
table "$STUDY/study.md" "$STUDY"/q1-*/ "$STUDY"/q2-*/
# The two runs that reach the paper's 5 and 3 dimensions (docs/claims.md, rows 9 and 10): which factors their
# open dimensions hold (5,000 training images), and Figure 3 beside the 50,000-batch runs of FULL
FULL=${FULL:-bench/results/experiments/full}
FIVE="$STUDY/q1-b64-tau20-budget/runs/hitsticky"
THREE="$STUDY/q2x-b64-tau35-g-per-step-70k/runs/hitper_step"
for run in "$FIVE" "$THREE"; do
    [ -f "$run/checkpoint.npz" ] || continue
    $REFIMPL factors "$run" --count 5000 --sample training \
        --out-json "$run/factors-training.json" --out-png "$run/factors-training.png" > /dev/null
done
if [ -f "$FIVE/checkpoint.npz" ] && [ -f "$THREE/checkpoint.npz" ] && [ -d "$FULL" ]; then
    $REFIMPL reconstruct "$FULL/dsprites64-n10-tau20" "$FIVE" "$FULL/dsprites64-n10-tau35" "$THREE" --count 16 \
        --out "$STUDY/figure3-5-and-3.png" > /dev/null
fi
