#!/bin/sh
# Keep every study run's committed pair resumable while it trains: whenever a run's checkpoint.npz is
# newer than its log.csv.gz, pack log.csv again (refimpl pack-log), so that a session stopped without
# warning leaves a log that reaches the checkpoint (resume refuses a log that ends before it, and
# log.csv itself is not committed). Run it in the background beside the sweeps; stop it with kill.
# Usage: bench/watch_study.sh [FOLDER] [SECONDS]   (defaults bench/results/study, 20)
STUDY=${1:-bench/results/study}
PAUSE=${2:-20}
REFIMPL=${REFIMPL:-.venv/bin/refimpl}
while true; do
    for run in "$STUDY"/*/runs/*; do
        [ -f "$run/log.csv" ] && [ -f "$run/checkpoint.npz" ] || continue
        if [ ! -f "$run/log.csv.gz" ] || [ "$run/checkpoint.npz" -nt "$run/log.csv.gz" ]; then
            sleep 2  # the log's rows up to the checkpoint are written before it; let a step finish
            nice -n 19 $REFIMPL pack-log "$run" > /dev/null
        fi
    done
    sleep "$PAUSE"
done
