#!/usr/bin/env bash
# Everything a session with a CUDA GPU checks, in one go (see bench/README.md, "On a GPU"):
#   1. the whole test suite, where the `cuda` tests (CuPy vs NumPy parity) now run;
#   2. the whole test suite again with REFIMPL_BACKEND=cupy, so every test that takes the
#      default backend (the CLI runs among them) computes on the GPU;
#   3. a short `refimpl train --backend cupy` on synthetic dSprites, timed against numpy;
#   4. bench_step.py (one process; the gated step also as refimpl/device_step.py's DeviceStep,
#      which reads nothing back mid-step), separate_processes.py (each side alone, alternated)
#      and bench_layers.py against every PyTorch CUDA configuration on the same GPU;
#   5. profile_step.py with refimpl/kernels.py's fused kernels on and off, alternating.
# Run from the repository root, with python3 holding cupy, torch (CUDA), pytest and
# hypothesis. Logs and tables go to $OUT (default bench/results/gpu).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, numpy, cupy, torch; print('python', sys.version.split()[0], '| numpy', numpy.__version__,
'| cupy', cupy.__version__, '| torch', torch.__version__, '| torch.cuda', torch.cuda.is_available())"
    nproc
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

step() {  # step NAME COMMAND...: run, keep the log, print its last lines and the exit code
    local name=$1
    shift
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc, $((SECONDS - t0)) s"
    tail -n 4 "$OUT/$name.log"
}

step pytest_default $PY -m pytest -q -p no:cacheprovider -rs
step pytest_backend_cupy env REFIMPL_BACKEND=cupy $PY -m pytest -q -p no:cacheprovider -rs

train() {  # train BACKEND: 300 batches of the README's main job
    local t0=$SECONDS
    $PY -m refimpl train --backend "$1" --batches 300 --out "/tmp/refimpl_gpu_train_$1" --quiet && \
        $PY -m refimpl evaluate "/tmp/refimpl_gpu_train_$1" --backend "$1" && echo "train $1: $((SECONDS - t0)) s"
}
step train_cupy train cupy
step train_numpy train numpy

step bench_step $PY bench/bench_step.py --backend cupy --repeats 100 --warmup 10 --out "$OUT/step_gpu.md"
step bench_step_device $PY bench/bench_step.py --backend cupy --repeats 100 --warmup 10 --step gated --device-step \
    --out "$OUT/step_gpu_device_step.md"
step bench_step_separate $PY bench/separate_processes.py --backend cupy --steps 100 --warmup 10 \
    --out "$OUT/step_gpu_separate.md" --json "$OUT/step_gpu_separate.json"
step bench_layers $PY bench/bench_layers.py --backend cupy --repeats 100 --warmup 10 --out "$OUT/layers_gpu.md"
for round in 1 2; do
    step "profile_kernels_on_$round" $PY bench/profile_step.py --backend cupy --steps 40 --top 40
    step "profile_kernels_off_$round" $PY bench/profile_step.py --backend cupy --steps 40 --top 40 --no-cuda-kernels
done
