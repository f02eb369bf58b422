"""The training step with each side alone in a fresh process: refimpl and every PyTorch configuration, alternated.

bench_step.py runs every side in one process, where two thread pools (OpenBLAS's and
torch's OpenMP) share the cores and disturb each other even with short thread waits. Here
each side runs alone: one fresh process per (side, round) runs ``--warmup`` steps, then
times ``--steps`` steps, and reports their median and its own peak memory. The sides take
turns, the order rotated every round, ``--rounds`` rounds per case, so slow drifts of a
shared machine fall on every side alike. Each library keeps its own thread-wait defaults
(``BENCH_LIBRARY_DEFAULTS=1``, side_by_side.py); refimpl's process never imports torch.

Per case (image channels x dtype x gated/plain step) and side the table gives the median of
the per-process medians and their min-max over the rounds, the fastest torch configuration
and refimpl's ratio to it; then each side's peak memory (``VmHWM``; GPU: CuPy's pool,
torch's ``max_memory_reserved``) and the compiled configurations' first call.

    bench/foreground.sh .venv/bin/python bench/separate_processes.py --out bench/results/step_cpu_separate.md
    .venv/bin/python bench/separate_processes.py --rounds 2 --channels 3 --dtype float32 --step gated
    bench/foreground.sh .venv/bin/python bench/separate_processes.py --rounds 3 --steps 8 \
        --env MALLOC_MMAP_MAX_=0 --env MALLOC_TRIM_THRESHOLD_=4294967295 --out bench/results/step_cpu_separate_malloc.md

``--execution``: refimpl's execution options (refimpl/execution.py) for its children, e.g.
``--execution=--no-parallel-grads`` for the step before issue 25's backward GEMMs side by side;
the torch side is unaffected.

``--env``: settings for every child, both sides alike. The two above keep glibc's malloc
from returning freed memory to the kernel (no mmap for large blocks, no trimming), so a
step reuses its pages instead of taking a first-touch page fault on every fresh 4 KiB
page of its large tensors; on this VM that is a large share of the step (bench/NOTES.md).
    python bench/separate_processes.py --backend cupy --steps 100 --warmup 10 --out bench/results/gpu/step_gpu_separate.md

A child is this script with ``--child SIDE``; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- child: one side, one process


def child(args):
    """Run one side's step ``warmup + steps`` times in this process; print times and peak memory as JSON."""
    if args.child == "refimpl":
        sys.modules["torch"] = None  # torch stays out of refimpl's process
    sys.path.insert(0, str(HERE))
    import bench_step
    import numpy
    from step_memory import status_mib

    gpu = args.backend == "cupy"
    xp, device, sync_ours, sync_theirs = bench_step.device_tools(args.backend)
    dtype = numpy.dtype(args.dtype).type
    gated = args.step == "gated"
    x = bench_step.images(args.batch, args.channels[0])
    model, step = bench_step.refimpl_step(dtype, gated, args.latent, x, xp, execution=execution_of(args.execution))
    sync = sync_ours
    if args.child != "refimpl":
        step, sync = bench_step.torch_step(model, dtype, gated, x, device, args.child), sync_theirs
    times = []
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for i in range(args.warmup - 1 + args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        if i >= args.warmup - 1:
            times.append(time.perf_counter() - t0)
    if gpu and args.child == "refimpl":
        peak = xp.get_default_memory_pool().total_bytes() / 2**20
    elif gpu:
        peak = bench_step.torch.cuda.max_memory_reserved() / 2**20
    else:
        peak = status_mib("VmHWM")
    print(json.dumps({"side": args.child, "times": times, "first": first, "peak_mib": peak}))


# ---------------------------------------------------------------- driver


def execution_of(text: str):
    """refimpl's :class:`~refimpl.execution.Execution` from options as ``refimpl train`` takes them ("" : the
    default setting); a bad option exits with argparse's message."""
    import shlex

    from refimpl import options
    from refimpl.execution import Execution

    parser = argparse.ArgumentParser(prog="separate_processes.py --execution")
    options.add_options(parser, Execution)
    return Execution(**options.given(parser.parse_args(shlex.split(text)), Execution))


def sides_for(backend, wanted=None):
    """refimpl and the torch configurations that apply (asked in a child-free way: torch is imported here only)."""
    sys.path.insert(0, str(HERE))
    try:
        import torch_configs
    except ImportError as exc:
        print(f"PyTorch is not importable ({exc}); timing refimpl only", file=sys.stderr)
        return ["refimpl"]
    names = [c.name for c in torch_configs.configs_for("cpu" if backend == "numpy" else "cuda")]
    if wanted:
        names = [n for n in names if n in wanted]
    why = torch_configs.compile_unavailable()
    if why:
        print(f"torch.compile configurations skipped: {why}", file=sys.stderr)
        names = [n for n in names if torch_configs.BY_NAME[n].compile_mode is None]
    return ["refimpl"] + names


def run_child(side, channels, dtype, step, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--channels", str(channels),
           "--dtype", dtype, "--step", step, "--batch", str(args.batch), "--latent", str(args.latent),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--backend", args.backend,
           f"--execution={args.execution}"]
    env = dict(os.environ, BENCH_LIBRARY_DEFAULTS="1", **dict(kv.split("=", 1) for kv in args.env))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"  {side}: child failed ({done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_ms(times):
    return 1e3 * statistics.median(times)


def cell(medians_ms):
    """'median (min-max)' of per-process medians, ms."""
    if not medians_ms:
        return "failed"
    m, lo, hi = statistics.median(medians_ms), min(medians_ms), max(medians_ms)
    return f"{m:.1f} ({lo:.0f}-{hi:.0f})" if m >= 100 else f"{m:.1f} ({lo:.1f}-{hi:.1f})"


def paired_ratios(ours, theirs):
    """refimpl's per-process median over the torch side's in the same round, for every round both finished.

    The machine's speed drifts between minutes (a VM's neighbours); a round's two processes run back to
    back, so their ratio cancels most of that drift, where the ratio of the two overall medians does not."""
    by_round = {run["round"]: median_ms(run["times"]) for run in theirs}
    return [median_ms(run["times"]) / by_round[run["round"]] for run in ours if run["round"] in by_round]


def to_markdown(results, sides, args, env, wall_s):
    torch_sides = [s for s in sides if s != "refimpl"]
    cmd = (f"{'' if args.backend == 'cupy' else 'bench/foreground.sh '}.venv/bin/python bench/separate_processes.py "
           f"--backend {args.backend} --rounds {args.rounds} --warmup {args.warmup} --steps {args.steps} "
           f"--batch {args.batch} --latent {args.latent} --channels {','.join(map(str, args.channels))} "
           f"--dtype {args.dtype} --step {args.step}" + (f" --configs {','.join(args.configs)}" if args.configs else "")
           + "".join(f" --env {kv}" for kv in args.env)
           + (f" --execution={shlex.quote(args.execution)}" if args.execution else ""))
    lines = ["# Training step, each side alone in a fresh process, alternated", "",
             f"Generated by `bench/separate_processes.py` (bench/README.md). Command: `{cmd}`.", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- timing: per case, {args.rounds} rounds; in each round every side runs once in a fresh process "
              f"(order rotated per round): {args.warmup} warm-up steps, then the median of {args.steps} timed steps. "
              "Cell: median of the per-process medians (min-max over the rounds), ms; the last column: the median "
              "(min-max) of refimpl's per-process median over the fastest torch configuration's in the same round",
              "- each library with its own thread-wait defaults (BENCH_LIBRARY_DEFAULTS=1); refimpl's process "
              "does not import torch",
              f"- bench wall time: {wall_s:.0f} s", "",
              "| image | step | dtype | refimpl | " + " | ".join(f"torch {s}" for s in torch_sides)
              + " | fastest torch | refimpl / fastest | the same, round by round |",
              "|---|---|---|---:|" + "---:|" * len(torch_sides) + "---|---:|---:|"]
    for (channels, dtype, step), per_side in results.items():
        medians = {s: [median_ms(r["times"]) for r in runs] for s, runs in per_side.items()}
        overall = {s: statistics.median(v) for s, v in medians.items() if v}
        theirs = {s: m for s, m in overall.items() if s != "refimpl"}
        best = min(theirs, key=theirs.get) if theirs else None
        ratio = f"{overall['refimpl'] / theirs[best]:.2f}" if best and "refimpl" in overall else ""
        paired = paired_ratios(per_side.get("refimpl", []), per_side.get(best, []))
        lines.append(f"| 64x64x{channels} | {step} | {dtype} | {cell(medians.get('refimpl'))} | "
                     + " | ".join(cell(medians.get(s)) for s in torch_sides) + f" | {best or ''} | {ratio} | "
                     + (f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})" if paired else "")
                     + " |")
    peak_what = ("CuPy's pool / torch's max_memory_reserved" if args.backend == "cupy"
                 else "VmHWM of the process after its steps, median over the rounds")
    lines += ["", f"Peak memory, MiB ({peak_what}):", "",
              "| image | step | dtype | " + " | ".join(sides) + " |", "|---|---|---|" + "---:|" * len(sides)]
    for (channels, dtype, step), per_side in results.items():
        lines.append(f"| 64x64x{channels} | {step} | {dtype} | "
                     + " | ".join(f"{statistics.median(r['peak_mib'] for r in per_side[s]):.0f}" if per_side.get(s)
                                  else "" for s in sides) + " |")
    compiled = [s for s in torch_sides if "compile" in s]
    if compiled:
        lines += ["", "First step of the compiled configurations (s, compilation included, Inductor's on-disk cache "
                  "warm after the first round), median over the rounds:", "",
                  "| image | step | dtype | " + " | ".join(compiled) + " |", "|---|---|---|" + "---:|" * len(compiled)]
        for (channels, dtype, step), per_side in results.items():
            lines.append(f"| 64x64x{channels} | {step} | {dtype} | "
                         + " | ".join(f"{statistics.median(r['first'] for r in per_side[s]):.1f}" if per_side.get(s)
                                      else "" for s in compiled) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per process (the first compiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per process")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[1, 3])
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.add_argument("--step", choices=("gated", "plain", "both"), default="both")
    p.add_argument("--configs", type=lambda s: s.split(","), default=None,
                   help="comma-separated torch configurations (default: all that apply; see torch_configs.py)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in every child's environment (both sides alike), e.g. MALLOC_MMAP_MAX_=0")
    p.add_argument("--execution", default="", metavar="OPTIONS",
                   help="refimpl's execution options, as refimpl train takes them, e.g. --execution=--no-parallel-grads "
                        "(default: none, the default setting)")
    p.add_argument("--out", help="markdown table (written atomically)")
    p.add_argument("--json", help="also write every process's raw times here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    if args.child:
        return child(args)

    execution = execution_of(args.execution)  # a bad option stops here, before any child runs
    sides = sides_for(args.backend, args.configs)
    sys.path.insert(0, str(HERE))
    import timing

    env = timing.environment(sys.modules.get("torch"), threads_note=False)
    env["thread waits"] = "each library's defaults"
    env["children's extra environment"] = " ".join(args.env) or "none (glibc malloc's defaults)"
    import refimpl

    paths = execution.resolve(args.backend)
    env["refimpl"] = (f"{Path(refimpl.__file__).resolve().parents[1]}, execution: {args.execution or 'the default'} "
                      f"(parallel_grads={paths.parallel_grads}, parallel_elementwise={paths.parallel_elementwise}, "
                      f"decoder_passes={paths.decoder_passes}, "
                      f"blas_threads={paths.blas_threads})")
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    steps = ["gated", "plain"] if args.step == "both" else [args.step]
    results, start = {}, time.perf_counter()
    for channels in args.channels:
        for dtype in dtypes:
            for step in steps:
                per_side = results[(channels, dtype, step)] = {s: [] for s in sides}
                for r in range(args.rounds):
                    for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                        out = run_child(side, channels, dtype, step, args)
                        if out is not None:
                            per_side[side].append({**out, "round": r})
                print(f"64x64x{channels} {step} {dtype}: "
                      + "  ".join(f"{s} {cell([median_ms(o['times']) for o in v])}" for s, v in per_side.items()),
                      flush=True)
    env["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    from refimpl.atomic import atomic_write

    if args.json:
        raw = [{"channels": c, "dtype": d, "step": s, "side": side, **run} for (c, d, s), per in results.items()
               for side, runs in per.items() for run in runs]
        atomic_write(args.json, lambda f: f.write(json.dumps(raw, indent=1).encode()))
    text = to_markdown(results, sides, args, env, time.perf_counter() - start)
    print(text)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
