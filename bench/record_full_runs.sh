#!/bin/sh
# Everything docs/claims.md quotes from the 64x64 Figure 1 / Figure 3 runs, recomputed from
# their run folders (a minute or two on 2 CPU cores; the runs themselves are trained with
# `refimpl train --out DIR --resume`, see docs/claims.md):
#   RUN/plot.png              Figure 1 of the run, gate by gate, with reconstructions
#   RUN/milestones.md         Section 4.1's events read off log.csv
#   RUN/eval.json             held-out error with the inference gates and with all open
#   RUN/factors.json, .png    which factor each dimension holds: the 1,000 held-out images
#   RUN/factors-training.*    the same on 5,000 training images (a tighter estimate)
#   RUN/reconstructions.png   16 held-out originals over their reconstructions
#   figure3-64x64.png         Figure 3: originals, tau = 20, tau = 35
# Usage: bench/record_full_runs.sh [FOLDER]   (default bench/results/experiments/full)
set -eu
FULL=${1:-bench/results/experiments/full}
REFIMPL=${REFIMPL:-.venv/bin/refimpl}
for run in "$FULL"/dsprites64-n10-tau20 "$FULL"/dsprites64-n10-tau35; do
    $REFIMPL plot "$run"
    $REFIMPL milestones "$run" > /dev/null
    $REFIMPL evaluate "$run"
    $REFIMPL factors "$run" --count 5000
    $REFIMPL factors "$run" --count 5000 --sample training \
        --out-json "$run/factors-training.json" --out-png "$run/factors-training.png"
    $REFIMPL reconstruct "$run" --count 16
done
$REFIMPL reconstruct "$FULL"/dsprites64-n10-tau20 "$FULL"/dsprites64-n10-tau35 --count 16 \
    --out "$FULL/figure3-64x64.png"
